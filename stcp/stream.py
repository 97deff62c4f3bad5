"""The byte stream of one connection: send buffer with retransmission, receive reassembly.

Offsets are absolute stream offsets. The send side keeps every byte until it is
acknowledged; lost ranges go back into a retransmit queue. The receive side delivers
bytes to the application strictly in order, whatever order records arrive in.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Dict, List, Optional, Tuple, Union

from .errors import FlowControlError, ProtocolViolation
from .wire import INITIAL_MAX_DATA


class SendStream:
    """The application's writes are kept as the bytes objects they were written as (no copy);
    a chunk is dropped once every byte of it is acknowledged."""

    def __init__(self) -> None:
        self._chunks: List[bytes] = []
        self._starts: List[int] = []   # stream offset of each chunk
        self._end = 0
        self.acked_to = 0          # every byte below is acknowledged
        self.acked_above: List[Tuple[int, int]] = []   # acknowledged [start, end) above acked_to
        self.next_offset = 0       # first byte never sent
        self.retransmit: List[Tuple[int, int]] = []    # [start, end) to send again, ascending
        self.fin_requested = False
        self.fin_sent = False
        self.fin_acked = False
        self.fin_lost = False

    @property
    def end(self) -> int:
        return self._end

    @property
    def unacked_bytes(self) -> int:
        return self.end - self.acked_to

    def write(self, data: bytes) -> None:
        if self.fin_requested:
            raise ProtocolViolation("write after the sending direction was finished")
        if data:
            self._chunks.append(bytes(data))
            self._starts.append(self._end)
            self._end += len(data)

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
        chunks, starts = self._chunks, self._starts
        n = 0
        while n < len(chunks) and starts[n] + len(chunks[n]) <= self.acked_to:
            n += 1
        if n:
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


class RecvStream:
    def __init__(self, window: int):
        if window < INITIAL_MAX_DATA:
            raise ValueError(f"receive window must be at least {INITIAL_MAX_DATA} bytes")
        self.window = window
        self.delivered_to = 0                 # bytes handed to the application
        self.consumed = 0                     # bytes the application has read
        self.max_data = INITIAL_MAX_DATA      # the limit the peer has been told
        self.pending: Dict[int, bytes] = {}   # out-of-order data by offset
        self.fin_offset: Optional[int] = None
        self.fin_delivered = False
        self.highest = 0

    def receive(self, offset: int, data: bytes, fin: bool) -> bytes:
        """Accept a stream frame; return the bytes now deliverable in order."""
        end = offset + len(data)
        if offset == self.delivered_to and not fin and self.fin_offset is None and end <= self.max_data \
                and not self.pending:
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
        if end <= self.delivered_to:
            return b""
        if offset > self.delivered_to:
            old = self.pending.get(offset)
            if old is None or len(old) < len(data):
                self.pending[offset] = data
            return b""
        out = [data[self.delivered_to - offset:]]
        self.delivered_to = end
        pending = self.pending
        while pending:
            nxt = min(pending)
            if nxt > self.delivered_to:
                break
            chunk = pending.pop(nxt)
            if nxt + len(chunk) > self.delivered_to:
                out.append(chunk[self.delivered_to - nxt:])
                self.delivered_to = nxt + len(chunk)
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def finished(self) -> bool:
        return self.fin_offset is not None and self.delivered_to == self.fin_offset

    def initial_limit(self) -> Optional[int]:
        """The limit to advertise as soon as keys are confirmed, if above the protocol default."""
        if self.window > self.max_data:
            self.max_data = self.window
            return self.max_data
        return None

    def on_consumed(self, n: int) -> Optional[int]:
        """The application read n bytes; return a new limit to advertise, if one is due."""
        self.consumed += n
        if self.fin_offset is not None:
            return None
        if self.consumed + self.window - self.max_data >= self.window // 2:
            self.max_data = self.consumed + self.window
            return self.max_data
        return None
