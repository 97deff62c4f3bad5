"""The byte stream of one connection: send buffer with retransmission, receive reassembly.

Offsets are absolute stream offsets. The send side keeps every byte until it is
acknowledged; lost ranges go back into a retransmit queue. The receive side delivers
bytes to the application strictly in order, whatever order records arrive in.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from typing import Deque, Iterable, List, Optional, Sequence, Tuple, Union

from .errors import FlowControlError, ProtocolViolation
from .wire import INITIAL_MAX_DATA


class SendStream:
    """The application's writes are kept as the bytes objects they were written as (no copy);
    a chunk is dropped once every byte of it is acknowledged."""

    def __init__(self) -> None:
        self._chunks: List[bytes] = []
        self._starts: List[int] = []   # stream offset of each chunk
        self.end = 0               # stream offset after the last byte written
        self.acked_to = 0          # every byte below is acknowledged
        self.acked_above: List[Tuple[int, int]] = []   # acknowledged [start, end) above acked_to
        self.next_offset = 0       # first byte never sent
        self.retransmit: List[Tuple[int, int]] = []    # [start, end) to send again, ascending
        self.fin_requested = False
        self.fin_sent = False
        self.fin_acked = False
        self.fin_lost = False

    @property
    def unacked_bytes(self) -> int:
        return self.end - self.acked_to

    def write(self, data: bytes) -> None:
        if self.fin_requested:
            raise ProtocolViolation("write after the sending direction was finished")
        if data:
            self._chunks.append(bytes(data))
            self._starts.append(self.end)
            self.end += len(data)

    def finish(self) -> None:
        self.fin_requested = True

    def has_new_data(self) -> bool:
        return self.next_offset < self.end

    def wants_fin(self) -> bool:
        return self.fin_requested and (not self.fin_sent or self.fin_lost) and not self.fin_acked \
            and self.next_offset == self.end and not self.retransmit

    def pending(self) -> bool:
        return bool(self.retransmit) or self.has_new_data() or self.wants_fin()

    def next_chunk(self, max_len: int, flow_limit: int) -> Optional[Tuple[int, bytes, bool]]:
        """The next (offset, data, fin) to send: retransmissions first, then new bytes."""
        while self.retransmit:
            start, end = self.retransmit[0]
            start = max(start, self.acked_to)
            if start >= end:
                self.retransmit.pop(0)
                continue
            stop = min(end, start + max_len)
            if stop == end:
                self.retransmit.pop(0)
            else:
                self.retransmit[0] = (stop, end)
            data = self._slice(start, stop)
            fin = self.fin_requested and stop == self.end and self.next_offset == self.end \
                and not self.retransmit and not self.fin_acked
            if fin:
                self.fin_sent, self.fin_lost = True, False
            return start, data, fin
        start = self.next_offset
        stop = min(self.end, start + max_len, flow_limit)
        if stop > start:
            self.next_offset = stop
            fin = self.fin_requested and stop == self.end
            if fin:
                self.fin_sent = True
            return start, self._slice(start, stop), fin
        if self.wants_fin():
            self.fin_sent, self.fin_lost = True, False
            return self.end, b"", True
        return None

    def view(self, start: int, stop: int) -> Union[memoryview, bytes]:
        """Bytes [start, stop) of the stream (not yet acknowledged): a memoryview when they lie
        in one written chunk, else a joined copy."""
        i = bisect_right(self._starts, start) - 1
        chunk, base = self._chunks[i], self._starts[i]
        if stop <= base + len(chunk):
            return memoryview(chunk)[start - base:stop - base]
        pieces = [memoryview(chunk)[start - base:]]
        while base + len(chunk) < stop:
            i += 1
            chunk, base = self._chunks[i], self._starts[i]
            pieces.append(memoryview(chunk)[:stop - base])
        return b"".join(pieces)

    def _slice(self, start: int, stop: int) -> bytes:
        return bytes(self.view(start, stop))

    def on_acked(self, start: int, end: int, fin: bool) -> None:
        if fin:
            self.fin_acked = True
        if end <= self.acked_to:
            return
        if start > self.acked_to:
            self._add_acked_above(start, end)
            return
        self.acked_to = end
        above = self.acked_above
        while above and above[0][0] <= self.acked_to:
            self.acked_to = max(self.acked_to, above.pop(0)[1])
        # drop the chunks wholly acknowledged: they lie back to back from starts[0], so those
        # are all of them, or the ones before the chunk holding acked_to
        chunks, starts = self._chunks, self._starts
        n = len(chunks) if self.acked_to >= self.end else bisect_right(starts, self.acked_to) - 1
        if n > 0:
            del chunks[:n], starts[:n]

    def _add_acked_above(self, start: int, end: int) -> None:
        above = self.acked_above
        above.append((start, end))
        above.sort()
        merged = [above[0]]
        for s, e in above[1:]:
            if s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        self.acked_above[:] = merged

    def on_lost(self, start: int, end: int, fin: bool) -> None:
        if fin and not self.fin_acked:
            self.fin_lost = True
        start = max(start, self.acked_to)
        if start >= end:
            return
        for s, e in self.acked_above:     # skip parts acknowledged by a later packet
            if s <= start < e:
                start = e
        if start >= end:
            return
        self.retransmit.append((start, end))
        self.retransmit.sort()

    @property
    def all_acked(self) -> bool:
        return self.fin_acked and self.acked_to == self.end


# Out-of-order data is held as fragments: maximal runs of contiguous received bytes above the
# delivered point, each a deque of pieces. A fragment is one hole's worth of state, however many
# records filled it; the cap bounds them (PROTOCOL.md §8.5).
MAX_FRAGMENTS = 1024
# Two adjacent pieces are joined into one bytes object when one is shorter than JOIN_BELOW and
# the other shorter than JOIN_UPTO, so a fragment never holds runs of tiny objects: at least
# one of two neighbours is JOIN_BELOW bytes or more, and Python's per-object overhead stays a
# small fraction of the bytes held. A join copies fewer than JOIN_BELOW + JOIN_UPTO bytes.
JOIN_BELOW = 1024
JOIN_UPTO = 4096


def _joinable(a: bytes, b: bytes) -> bool:
    la, lb = len(a), len(b)
    return (la < JOIN_BELOW and lb < JOIN_UPTO) or (lb < JOIN_BELOW and la < JOIN_UPTO)


def _append(pieces: Deque[bytes], more: Iterable[bytes]) -> None:
    for x in more:
        if pieces and _joinable(pieces[-1], x):
            pieces[-1] = pieces[-1] + x
        else:
            pieces.append(x)


def _prepend(pieces: Deque[bytes], more: Sequence[bytes]) -> None:
    for x in reversed(more):
        if pieces and _joinable(x, pieces[0]):
            pieces[0] = x + pieces[0]
        else:
            pieces.appendleft(x)


class RecvStream:
    """Reassembly of the peer's stream. Bytes held out of order never exceed the advertised
    limit minus the delivered point (overlaps are trimmed on insert: the bytes that arrived
    first win), adjacent pieces coalesce into one fragment, and finding where data goes costs a
    bisection over the fragments, so any sequence of frames costs time linear in their bytes
    (up to a log factor) and memory bounded by the window."""

    def __init__(self, window: int, max_fragments: int = MAX_FRAGMENTS):
        if window < INITIAL_MAX_DATA:
            raise ValueError(f"receive window must be at least {INITIAL_MAX_DATA} bytes")
        self.window = window
        self.max_fragments = max_fragments
        self.delivered_to = 0                 # bytes handed to the application
        self.consumed = 0                     # bytes the application has read
        self.max_data = INITIAL_MAX_DATA      # the limit the peer has been told
        self.granted = window <= INITIAL_MAX_DATA     # nothing above the initial credit to give
        self.fin_offset: Optional[int] = None
        self.fin_delivered = False
        self.highest = 0
        self.held = 0                         # bytes held out of order
        # fragments, ascending and pairwise separated by a hole: [start, end) and their pieces
        self._starts: List[int] = []
        self._ends: List[int] = []
        self._pieces: List[Deque[bytes]] = []

    @property
    def fragments(self) -> int:
        return len(self._starts)

    @property
    def buffered(self) -> int:
        """Receive memory: held out of order plus delivered but not yet read by the application."""
        return self.held + self.delivered_to - self.consumed

    def opens_fragment(self, offset: int, end: int) -> bool:
        """Would stream data [offset, end) need a fragment of its own (open a new hole)?"""
        start = max(offset, self.delivered_to)
        if end <= start or start == self.delivered_to:
            return False
        i = bisect_left(self._ends, start)
        return i == len(self._starts) or self._starts[i] > end

    def receive(self, offset: int, data: bytes, fin: bool) -> bytes:
        """Accept a stream frame; return the bytes now deliverable in order."""
        end = offset + len(data)
        if offset == self.delivered_to and not fin and self.fin_offset is None and end <= self.max_data \
                and not self._starts:
            self.delivered_to = end            # the in-order case: every check below passes
            if end > self.highest:
                self.highest = end
            return data
        if end > self.max_data:
            raise FlowControlError(f"peer sent up to byte {end}, beyond the {self.max_data} allowed")
        if fin:
            if self.fin_offset is not None and self.fin_offset != end:
                raise ProtocolViolation("stream end moved")
            if end < self.highest:
                raise ProtocolViolation("stream end below data already received")
            self.fin_offset = end
        elif self.fin_offset is not None and end > self.fin_offset:
            raise ProtocolViolation("data beyond the end of the stream")
        self.highest = max(self.highest, end)
        if end <= self.delivered_to or not data:     # nothing new: an empty frame holds nothing
            return b""
        if offset < self.delivered_to:
            data = data[self.delivered_to - offset:]
            offset = self.delivered_to
        starts = self._starts
        if offset == self.delivered_to and (not starts or starts[0] > end):
            self.delivered_to = end           # in order, and touching nothing held
            return data
        self._insert(offset, data)
        if starts[0] != self.delivered_to:
            return b""
        # the fragment at the delivered point: everything in it goes to the application
        starts.pop(0)
        self.delivered_to = self._ends.pop(0)
        pieces = self._pieces.pop(0)
        out = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self.held -= len(out)
        return out

    def _insert(self, start: int, data: bytes) -> None:
        """Hold [start, start + len(data)) (start >= delivered_to, data not empty): only the
        bytes no fragment holds yet are kept, and every fragment it touches becomes one."""
        end = start + len(data)
        starts, ends, frags = self._starts, self._ends, self._pieces
        i = bisect_left(ends, start)          # first fragment reaching start
        j = bisect_right(starts, end)         # fragments i..j-1 overlap or touch the data
        if i == j:
            starts.insert(i, start)
            ends.insert(i, end)
            frags.insert(i, deque((data,)))
            self.held += len(data)
            return
        if j == i + 1 and (start >= starts[i] or end <= ends[i]):
            # the common cases: data running on from one fragment's end, or up to its start
            if end > ends[i]:
                tail = data[ends[i] - start:]
                _append(frags[i], (tail,))
                ends[i] = end
                self.held += len(tail)
            if start < starts[i]:
                head = data[:starts[i] - start]
                _prepend(frags[i], (head,))
                starts[i] = start
                self.held += len(head)
            return
        # fill what lies before, between and after the touched fragments, then join them,
        # moving the smaller deques into the largest (a fragment's pieces move O(log n) times)
        parts: list = []                      # deques and gap fills, in stream order
        added = 0
        if start < starts[i]:
            parts.append(data[:starts[i] - start])
        for k in range(i, j):
            parts.append(frags[k])
            if k + 1 < j:
                parts.append(data[ends[k] - start:starts[k + 1] - start])
        if end > ends[j - 1]:
            parts.append(data[ends[j - 1] - start:])
        base = max(range(len(parts)), key=lambda n: len(parts[n]) if type(parts[n]) is deque else -1)
        pieces = parts[base]
        for part in parts[:base][::-1]:
            if type(part) is deque:
                _prepend(pieces, part)
            else:
                added += len(part)
                _prepend(pieces, (part,))
        for part in parts[base + 1:]:
            if type(part) is deque:
                _append(pieces, part)
            else:
                added += len(part)
                _append(pieces, (part,))
        new_start, new_end = min(start, starts[i]), max(end, ends[j - 1])
        starts[i:j] = [new_start]
        ends[i:j] = [new_end]
        frags[i:j] = [pieces]
        self.held += added

    @property
    def finished(self) -> bool:
        return self.fin_offset is not None and self.delivered_to == self.fin_offset

    def on_consumed(self, n: int) -> None:
        """The application read n bytes."""
        self.consumed += n

    def credit_due(self) -> bool:
        """Is a new limit due? The first time as soon as the window exceeds the initial credit,
        then once the application has read half a window since the last one."""
        if self.fin_offset is not None:
            return False
        gain = self.consumed + self.window - self.max_data
        return gain >= self.window // 2 if self.granted else gain > 0

    def grant(self) -> int:
        """Raise the limit to a window past what the application has read; return it."""
        self.granted = True
        self.max_data = self.consumed + self.window
        return self.max_data
