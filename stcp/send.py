"""The send path of a Connection (PROTOCOL.md §3.2, §8): records out, acknowledgements in.

A mixin of stcp.connection.Connection, whose __init__ holds the state used here. Packet
numbers are allocated in one place (_take_pns), which also leaves one out now and then and
stops before 2^48 - 1; an ACK of a number left out ends the connection (_on_ack).
"""
from __future__ import annotations

import secrets
from bisect import bisect_left
from typing import List, Optional, Tuple

from . import wire
from .crypto import CONFIDENTIALITY_LIMIT, reset_token
from .errors import CloseCode, KeyUpdateError, ProtocolViolation, STCPError
from .events import KeyUpdated
from .fields import ConnectionFields
from .recovery import (
    CLIENT_AUTH as _CLIENT_AUTH,
    CLOSE as _CLOSE,
    KEY_UPDATE as _KEY_UPDATE,
    MAX_DATA as _MAX_DATA,
    PING as _PING,
    RESET_TOKEN as _RESET_TOKEN,
    STREAM as _STREAM,
    Group,
    SentPacket,
    SentRun,
)
from .state import State

_ENCRYPTED = State.ENCRYPTED
_EPOCH_SHIFT = wire.EPOCH_SHIFT
_STREAM_OVERHEAD = wire.STREAM_FRAME_OVERHEAD
_RECORD_OVERHEAD = wire.HEADER_LEN + wire.AEAD_TAG_LEN
_ACK_HEADER_LEN = wire.ACK_HEADER_LEN
_ACK_RANGE_LEN = wire.ACK_RANGE_LEN
# A record with a PING is padded to be longer than a stateless RESET: a server that lost our
# state answers only longer records (no amplification), so an idle client learns of a restart
# through its keepalive (PROTOCOL.md §5.7; RFC 9000 §10.3 pads for the same reason).
_MIN_PING_PAYLOAD = wire.RESET_RECORD_LEN + 1 - _RECORD_OVERHEAD
_PN_LAST = wire.PN_MASK - 2        # from here on the general path allocates (and says when they run out)

# RFC 9000 §21.4: the sender leaves out one packet number at random, once per SKIP_SPAN / 2
# records on average (anywhere from 1 to SKIP_SPAN - 1 apart, so the next is unpredictable);
# a peer that acknowledges one acknowledges what it never received (an optimistic-ACK attack)
# and the connection ends. The newest _SKIPPED_KEPT skipped numbers are checked.
SKIP_SPAN = 384
_SKIPPED_KEPT = 64
# An ACK reports no range lying entirely more than this many packet numbers below the largest
# received once an earlier ACK has reported it: the gaps skipping leaves would otherwise fill
# every ACK with stale ranges (ReceivedPackets.ack_ranges keeps the "once" promise).
ACK_HORIZON = 256
_MIN_STREAM_CHUNK = 64
# Bulk records go to the kernel as UDP GSO buffers: at most 64 segments each, and the whole
# buffer must fit one UDP datagram's length.
_MAX_RUN_RECORDS = 64
_MAX_RUN_BYTES = 65000
# A run (one _send_stream_run: one packet-number allocation, one recovery entry) may fill
# this many GSO buffers: the Python cost per run is then shared by up to ~180 records.
_MAX_RUN_BUFFERS = 4


class PacketNumbersExhausted(STCPError):
    code = CloseCode.INTERNAL_ERROR


def skip_gap() -> int:
    return 1 + secrets.randbelow(SKIP_SPAN - 1)


class SendPath(ConnectionFields):
    _small_path = True          # tests turn it off to compare _small_record with the general path

    def _on_ack(self, ranges: Tuple[Tuple[int, int], ...], delay_us: int, now: float) -> None:
        if ranges[0][1] >= self._next_pn:
            raise ProtocolViolation(f"ack of packet {ranges[0][1]} that was never sent")
        skipped = self._skipped
        if skipped and ranges[-1][0] <= skipped[-1]:
            kept = len(skipped)
            for low, high in ranges:
                i = bisect_left(skipped, low)
                if i < kept and skipped[i] <= high:
                    raise ProtocolViolation(f"ack of packet {skipped[i]}, a packet number never sent "
                                            f"(acknowledging what was not received)")
        acked, lost = self._recovery.on_ack(ranges, delay_us / 1e6, now)
        send_epoch = self._keys.send.epoch
        on_acked = self._send.on_acked
        start = end = -1                  # adjacent acknowledged stream ranges, merged
        for first, last, p in acked:
            if p.epoch == send_epoch:
                self._key_update_allowed = True
            # a single record's frames as they are (frames_between is for runs)
            for desc in p.frames if type(p) is SentPacket else p.frames_between(first, last):
                if desc[0] == _STREAM:
                    if desc[3]:
                        on_acked(desc[1], desc[2], True)
                    elif desc[1] == end:
                        end = desc[2]
                    else:
                        if end > start:
                            on_acked(start, end, False)
                        start, end = desc[1], desc[2]
                elif desc[0] == _CLIENT_AUTH:
                    self._client_auth = None
                elif desc[0] == _RESET_TOKEN:
                    self._reset_token_acked = True
        if end > start:
            on_acked(start, end, False)
        if acked and self._recovery.rtt.has_sample:
            self.stats.rtt_samples.append(self._recovery.rtt.latest)
            if len(self.stats.rtt_samples) > 1024:
                del self.stats.rtt_samples[:512]
        if lost:
            self._on_lost(lost)

    def _on_lost(self, lost: List[Group]) -> None:
        for first, last, p in lost:
            for desc in p.frames_between(first, last):
                kind = desc[0]
                if kind == _STREAM:
                    self._send.on_lost(desc[1], desc[2], desc[3])
                elif kind == _MAX_DATA:
                    self._max_data_due = True
                elif kind == _KEY_UPDATE and desc[1] == self._keys.send.epoch:
                    self._key_update_frame_due = True
                elif kind == _RESET_TOKEN and not self._reset_token_acked:
                    self._reset_token_due = True

    # --- send --------------------------------------------------------------
    def datagrams_to_send(self, now: float) -> List[bytes]:
        """Every datagram due now, one record each."""
        return wire.expand_datagrams(self.datagram_batches(now))

    def datagram_batches(self, now: float) -> List[Tuple[bytes, int]]:
        """What datagrams_to_send gives, as (buffer, segment size) pairs: a buffer holds records
        of `segment size` bytes back to back (the last may be shorter), ready for one UDP GSO
        send; a single record comes as (record, len(record))."""
        # The small path's precondition (_small_record), then its commonest case first: a
        # driver asks after every datagram in and out, and mostly nothing is due yet.
        # It is read here whole, not kept as a flag by the fields' writers: _next_pn and
        # _sealed_under_key change with every record and retransmit/fin_requested live in the
        # SendStream, so a flag could stand only for the rest, whose twenty-odd writers (in
        # connection.py and this file: handshake, timers, ACKs, losses, close) would each have to
        # keep it; one that forgot would let the small path send past a due control frame or
        # while draining. Read here, the condition cannot go out of date.
        if self._small_path and not self._out and self.state is _ENCRYPTED \
                and not (self._max_data_due or self._ping_due or self._key_update_frame_due
                         or self._reset_token_due or self._probes_due or self._client_auth is not None
                         or self._draining_until is not None or self._next_pn >= _PN_LAST
                         or self._sealed_under_key + 1 >= self.config.key_update_interval):
            send = self._send
            if not send.retransmit and not send.fin_requested:
                deadline = self._ack_deadline
                if send.next_offset == send.end and (deadline is None or deadline > now):
                    return []            # nothing due
                record = self._small_record(now)
                if record is not None:
                    return [(record, len(record))]
        out, self._out = self._out, []
        if self.state == State.ENCRYPTED:
            try:
                self._build_packets(now, out)
            except STCPError as exc:
                self._fail(exc, now)
                out.extend(self._out)
                self._out = []
        return [item if isinstance(item, tuple) else (item, len(item)) for item in out]

    def _build_packets(self, now: float, out: List[wire.DatagramEntry]) -> None:
        """Fill `out` with records: acks and control frames always, stream data as cwnd allows."""
        max_payload = self.config.max_datagram - wire.HEADER_LEN - wire.AEAD_TAG_LEN
        overhead = wire.STREAM_FRAME_OVERHEAD
        cc = self._recovery.cc
        send = self._send
        stats = self.stats
        while True:
            if self._sealed_under_key >= self.config.key_update_interval:
                self._maybe_update_send_key()
            if self._ack_deadline is None and not (self._max_data_due or self._key_update_frame_due
                                                   or self._ping_due or self._draining_until is not None
                                                   or self._client_auth is not None or self._reset_token_due) \
                    and self._send_stream_run(now, out):
                continue
            frames: List[bytes] = []
            descs: list = []
            if self._ack_deadline is not None and (self._ack_deadline <= now or self._ack_can_ride()):
                frames.append(wire.encode_ack(self._received.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON)))
                self._received.mark_reported()
                self._ack_deadline = None
                self._ack_eliciting_unacked = 0
            pinged = self._ping_due
            if self._max_data_due or self._key_update_frame_due or self._ping_due or self._reset_token_due or \
                    (self._close_frame is not None and self._draining_until is not None):
                self._add_control_frames(frames, descs)
            budget = max_payload - (len(self._client_auth) if self._client_auth is not None else 0)
            for f in frames:
                budget -= len(f)
            retransmit = False
            if self._draining_until is None and (self._probes_due or cc.can_send(self.config.max_datagram)):
                while budget >= overhead + _MIN_STREAM_CHUNK or (budget >= overhead and send.wants_fin()):
                    new_from = send.next_offset
                    chunk = send.next_chunk(budget - overhead, self._peer_max_data)
                    if chunk is None:
                        break
                    offset, data, fin = chunk
                    n = len(data)
                    retransmit |= offset < new_from
                    frames.append(wire.encode_stream(offset, data, fin))
                    descs.append((_STREAM, offset, offset + n, fin))
                    budget -= overhead + n
                    stats.stream_bytes_sent += n
                if self._probes_due and descs:
                    self._probes_due -= 1
            if not frames:
                return
            if pinged and self._client_auth is None:
                short = _MIN_PING_PAYLOAD - sum(map(len, frames))
                if short > 0:
                    frames.append(wire.encode_frame(wire.PaddingFrame(short)))
            if retransmit:
                stats.retransmitted_records += 1
            out.append(self._seal_frames(frames, descs, bool(descs), now))

    def _small_record(self, now: float) -> Optional[bytes]:
        """The request/response case in one pass, once datagram_batches has found something
        due and no control frame, retransmission, FIN, probe or key update pending: the one
        record that is everything due (an ACK that is due, new stream data that fits one
        record, or both), or None when more is due (more than a record, the congestion window
        or the peer's limit in the way): the general path (_build_packets) then runs.
        It builds what _build_packets would, byte for byte (tests/test_small_path.py)."""
        send = self._send
        start, end = send.next_offset, send.end
        deadline = self._ack_deadline
        if start == end:                       # no data: the ACK that is due, alone
            frames = wire.encode_ack_stream(self._received.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON), 0, 0, None)
            descs: list = []
            eliciting = False
        else:
            config = self.config
            size = config.max_datagram
            cc = self._recovery.cc
            if end > self._peer_max_data or cc.bytes_in_flight + size > cc.cwnd:
                return None
            ranges = self._received.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON) if deadline is not None else None
            n = end - start
            ack_len = _ACK_HEADER_LEN + (len(ranges) - 1) * _ACK_RANGE_LEN if ranges else 0
            if ack_len + _STREAM_OVERHEAD + (n if n > _MIN_STREAM_CHUNK else _MIN_STREAM_CHUNK) \
                    > size - _RECORD_OVERHEAD:
                return None
            frames = wire.encode_ack_stream(ranges, 0, start, send.view(start, end))
            send.next_offset = end
            self.stats.stream_bytes_sent += n
            descs = [(_STREAM, start, end, False)]
            eliciting = True
        if deadline is not None:
            self._received.mark_reported()
            self._ack_deadline = None
            self._ack_eliciting_unacked = 0
        key = self._keys.send
        pn = self._next_pn
        if pn < self._pn_plain_below:    # _take_pns(1) would hand out pn and do nothing else
            self._next_pn = pn + 1
        else:
            pn = self._take_pns(1)
        self._sealed_under_key += 1
        record = key.seal(self.peer_cid, (key.epoch << _EPOCH_SHIFT) | pn, frames)
        stats = self.stats
        stats.records_sent += 1
        record_len = len(record)
        stats.bytes_sent += record_len
        self._recovery.on_sent(SentPacket(pn, now, record_len, eliciting, descs, key.epoch))
        return record

    def _send_stream_run(self, now: float, out: list) -> bool:
        """Bulk data: as many full records of new stream data as the congestion window, the
        peer's flow-control limit and the key allow, up to _MAX_RUN_BUFFERS GSO buffers, each
        sealed in one call. One run, however many buffers: one allocation of packet numbers and
        one entry in recovery. False (nothing sent) when fewer than two such records can go:
        the general path then builds the next record."""
        send = self._send
        if send.retransmit or self._probes_due:
            return False
        size = self.config.max_datagram
        chunk = size - wire.HEADER_LEN - wire.AEAD_TAG_LEN - wire.STREAM_FRAME_OVERHEAD
        per_buffer = min(_MAX_RUN_RECORDS, _MAX_RUN_BYTES // size)
        cc = self._recovery.cc
        start = send.next_offset
        n = min((cc.cwnd - cc.bytes_in_flight) // size, _MAX_RUN_BUFFERS * per_buffer,
                self.config.key_update_interval - self._sealed_under_key,
                (min(send.end, self._peer_max_data) - start) // chunk,
                wire.PN_MASK - 1 - self._next_pn)      # near the last packet number: one by one
        if n < 2:
            return False
        if n > per_buffer:
            # a skip falls between runs (_take_pns): a run of several buffers ends where the
            # next skip is due, so skips come no later than with runs of one buffer
            n = max(per_buffer, min(n, self._skip_at - self._next_pn))
        stop = start + n * chunk
        fin = send.fin_requested and stop == send.end
        key = self._keys.send
        pn = self._take_pns(n)
        seq = wire.make_seq(key.epoch, pn)
        cid = self.peer_cid
        step = per_buffer * chunk
        sent = 0
        for first in range(start, stop, step):
            last = first + step if first + step < stop else stop
            buf = key.seal_stream(cid, seq, send.view(first, last), first, chunk, fin and last == stop)
            seq += per_buffer
            sent += len(buf)
            out.append((buf, size))
        send.next_offset = stop
        if fin:
            send.fin_sent = True
        self._sealed_under_key += n
        stats = self.stats
        stats.records_sent += n
        stats.bytes_sent += sent
        stats.stream_bytes_sent += n * chunk
        self._recovery.on_sent_run(SentRun(pn, now, size, key.epoch, n, start, chunk, fin))
        return True

    def _add_control_frames(self, frames: List[bytes], descs: list) -> None:
        if self._max_data_due:
            self._max_data_due = False
            frames.append(wire.encode_frame(wire.MaxDataFrame(self._recv.max_data)))
            descs.append((_MAX_DATA,))
        if self._reset_token_due:
            self._reset_token_due = False
            key = self.config.reset_key
            if key is not None:            # a server's: derived from its identity key
                frames.append(wire.encode_frame(wire.ResetTokenFrame(reset_token(key, self.local_cid))))
                descs.append((_RESET_TOKEN,))
        if self._key_update_frame_due:
            self._key_update_frame_due = False
            frames.append(wire.encode_frame(wire.KeyUpdateFrame(self._keys.send.epoch)))
            descs.append((_KEY_UPDATE, self._keys.send.epoch))
        if self._ping_due:
            self._ping_due = False
            frames.append(wire.encode_frame(wire.PingFrame()))
            descs.append((_PING,))
        if self._close_frame is not None and self._draining_until is not None:
            frames.append(wire.encode_frame(self._close_frame))
            descs.append((_CLOSE,))
            self._close_frame = None

    def _ack_can_ride(self) -> bool:
        """A record is about to go out anyway: carry the pending ACK in it, not in its own later."""
        return self._max_data_due or self._ping_due or self._key_update_frame_due or self._reset_token_due \
            or self._send.pending()

    def _maybe_update_send_key(self) -> None:
        """Move to the next key epoch before a record is assembled, so its KEY_UPDATE frame
        fits the record and names the epoch the record is sealed under."""
        if self._sealed_under_key < self.config.key_update_interval:
            return
        if self._key_update_allowed:
            keys = self._keys
            keys.send = keys.send.next()
            self._sealed_under_key = 0
            self._key_update_allowed = False
            self._key_update_frame_due = True
            self.stats.key_updates_sent += 1
            self.events.append(KeyUpdated("send", keys.send.epoch))
        elif self._sealed_under_key >= CONFIDENTIALITY_LIMIT[self.suite]:
            raise KeyUpdateError("key usage limit reached before the peer allowed a key update")

    def _take_pns(self, n: int, closing: bool = False) -> int:
        """The first of n consecutive packet numbers for records about to be sealed. A skip
        happens only here, between records or runs, so a bulk run costs nothing extra. The
        last packet number, 2^48 - 1, is kept for the CLOSE that says they ran out.
        _pn_plain_below, written with _skip_at, is where this rule next does more than hand out
        _next_pn for one record (a skip or the end): _small_record takes numbers below it
        itself, without a call, and comes here for the rest."""
        pn = self._next_pn
        if pn >= self._skip_at and not closing:
            self._skipped.append(pn)
            if len(self._skipped) > _SKIPPED_KEPT:
                del self._skipped[0]
            pn += 1
            self._skip_at = pn + skip_gap()
            self._pn_plain_below = min(self._skip_at, wire.PN_MASK)
        if pn + n - 1 > (wire.PN_MASK if closing else wire.PN_MASK - 1):
            raise PacketNumbersExhausted(f"packet numbers exhausted: the next record would need packet "
                                         f"number {pn + n - 1}, above 2^48 - 1")
        self._next_pn = pn + n
        return pn

    def _seal_frames(self, frames: List[bytes], descs: list, ack_eliciting: bool, now: float = 0.0,
                     closing: bool = False) -> bytes:
        if self._client_auth is not None:    # first in every record until one carrying it is acknowledged
            frames = [self._client_auth] + frames
            descs = [(_CLIENT_AUTH,)] + descs
            ack_eliciting = True
        keys = self._keys
        pn = self._take_pns(1, closing)
        self._sealed_under_key += 1
        record = keys.send.seal(self.peer_cid, wire.make_seq(keys.send.epoch, pn), b"".join(frames))
        self.stats.records_sent += 1
        self.stats.bytes_sent += len(record)
        self._recovery.on_sent(SentPacket(pn, now, len(record), ack_eliciting, descs, keys.send.epoch))
        return record
