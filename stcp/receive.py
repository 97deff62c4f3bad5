"""The receive path of a Connection (PROTOCOL.md §6, §7, §10.2): datagrams in, frames acted on.

A mixin of stcp.connection.Connection, whose __init__ holds the state used here (and whose
handshake methods, _receive_handshake and _server_confirms, it calls). A record is
authenticated before anything in it is believed; what does not authenticate ends the
connection only when it came from the peer's current address (`from_peer`), and is
otherwise discarded and counted by reason (DISCARD_REASONS); a client in KEY_EXCHANGE has
nothing to authenticate with, so nothing it receives ends it (§5.5). Frames are dispatched
through _FRAME_HANDLERS.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from . import wire
from .errors import (
    AuthenticationFailure,
    CloseCode,
    FlowControlError,
    KeyUpdateError,
    MalformedRecord,
    ProtocolViolation,
    STCPError,
)
from .events import ConnectionClosed, DataReceived, KeyUpdated, StreamFinished
from .fields import ConnectionFields
from .recovery import MAX_ACK_DELAY
from .state import Event, State

# Why a record that reached a connection was discarded without acting on it (Stats.discarded):
#   malformed   a bad header, length, CID or packet number, from an address not the peer's
#   auth        failed authentication, from an address not the peer's
#   key_epoch   an epoch more than one ahead, from an address not the peer's
#   handshake   a handshake-class record (seq 0) that is not a repeat of the connection's own
#               hello (nor, at a client in KEY_EXCHANGE, a reply to its hello, nor a valid RESET)
#   oversize    a protected record longer than this endpoint's max_datagram, from anywhere
#   reassembly  an authenticated record whose stream data would open a fragment beyond the cap
#               (not acknowledged: the sender sends it again)
DISCARD_REASONS = ("malformed", "auth", "key_epoch", "handshake", "oversize", "reassembly")


class Discard(STCPError):
    """A record to discard (counted under `reason`) wherever it came from."""

    def __init__(self, reason: str, what: str):
        super().__init__(what)
        self.reason = reason


_UNAUTHENTICATED_REASON = {MalformedRecord: "malformed", AuthenticationFailure: "auth",
                           KeyUpdateError: "key_epoch"}
_ENCRYPTED = State.ENCRYPTED


def printable(text: str) -> str:
    """The peer's text (a CLOSE reason) made safe for terminals and logs: every character that
    is not printable (control characters, line breaks, bidirectional overrides...) becomes its
    escape, e.g. "\\x1b", so the peer cannot forge log lines or drive a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class ReceivePath(ConnectionFields):
    # --- receive -----------------------------------------------------------
    # `from_peer` says whether a datagram came from the peer's current address. Only the
    # peer's own traffic may end the connection: from anywhere else, input that does not
    # authenticate is discarded and counted (PROTOCOL.md §10.2). The receive calls return True
    # when an authenticated record became the newest the peer has sent (the highest packet
    # number): an endpoint then moves the connection to that record's source address.
    def receive_datagram(self, data: bytes, now: float, from_peer: bool = True) -> bool:
        """Process one UDP datagram addressed to this connection. Never raises for bad input."""
        newest = self._receive_one(data, now, from_peer)
        self._rx_event = None          # the next receive call starts its own DataReceived
        if self.budget is not None:
            self._after_receive()
        return newest

    def receive_datagrams(self, datagrams: list, now: float, from_peer: bool = True) -> bool:
        """Process datagrams addressed to this connection, all from one source address (an
        entry may be a (buffer, segment_size) pair from UDP GRO: wire.expand_datagrams), in
        order, as receive_datagram on each would: replays are discarded, a bad record from the
        peer ends the connection after the good ones before it. The crypto of new records
        happens in one C call (RecordKey.open_records) and a stretch of in-order stream records
        is taken as one piece of data."""
        newest = False
        if self.state != State.ENCRYPTED:
            for data in wire.expand_datagrams(datagrams):
                newest |= self._receive_one(data, now, from_peer)
            self._rx_event = None
            if self.budget is not None:
                self._after_receive()
            return newest
        key = self._keys.recv
        epoch = key.epoch
        received = self._received
        recv = self._recv
        ranges = received.ranges           # received.largest, inline
        for item in key.open_records(datagrams, self.local_cid, epoch, ranges[-1][1] if ranges else -1,
                                     recv.max_data,
                                     self.config.max_datagram):
            if self.state == State.CLOSED:  # type: ignore[comparison-overlap]  # a CLOSE frame ends it here
                break
            if type(item) is not tuple:
                newest |= self._receive_one(item, now, from_peer)
                continue
            try:
                if len(item) == 3:
                    plaintext, pn, record_len = item
                    newest |= self._accept(plaintext, pn, epoch, record_len, now)
                    continue
                # records of contiguous stream data: accounted for as _accept would one by one
                offset, count, data, first_pn, record_bytes = item
                if recv.held and recv.fragments >= recv.max_fragments \
                        and recv.opens_fragment(offset, offset + len(data)):
                    self.stats.discarded["reassembly"] += count
                    continue
                received.add_consecutive(first_pn, first_pn + count - 1)
                stats = self.stats
                stats.records_received += count
                stats.bytes_received += record_bytes
                self._last_activity = now
                newest = True
                self._on_stream_data(offset, data, False)
                self._ack_eliciting_unacked += count - 1
                self._ack_eliciting_received(first_pn + count - 1, now)
                self._check_finished(now)
            except STCPError as exc:
                self._on_receive_error(exc, now)
        self._rx_event = None
        if self.budget is not None:
            self._after_receive()
        return newest

    def _after_receive(self) -> None:
        """A server connection: retry a postponed credit grant, charge the budget what it holds."""
        if self._credit_withheld:
            self._grant_credit()
        self._account()

    def _receive_one(self, data: bytes, now: float, from_peer: bool = True) -> bool:
        if self.state == State.CLOSED:
            return False
        try:
            _, cid, seq = wire.parse_header(data)
            if seq == wire.HANDSHAKE_SEQ:
                self._receive_handshake(data, now)
                return False
            opened = self._authenticate(data, cid, seq)
        except Discard as exc:
            self.stats.discarded[exc.reason] += 1
            return False
        except STCPError as exc:
            if from_peer:
                self._on_receive_error(exc, now)
            else:
                self.stats.discarded[_UNAUTHENTICATED_REASON.get(type(exc), "malformed")] += 1
            return False
        if opened is None:
            return False
        try:
            return self._accept(opened[0], opened[1], opened[2], len(data), now)
        except STCPError as exc:
            self._on_receive_error(exc, now)
            return False

    def _on_receive_error(self, exc: STCPError, now: float) -> None:
        if isinstance(exc, AuthenticationFailure):
            self.stats.auth_failures += 1
        if self.is_client and self.state == State.KEY_EXCHANGE:
            self.stats.handshake_hints_ignored += 1    # nothing reaching it is authenticated yet
            return
        self._fail(exc, now)

    def _authenticate(self, record: bytes, cid: int, seq: int) -> Optional[Tuple[bytes, int, int]]:
        """(plaintext, pn, epoch) of a protected record not received before, or None for a
        duplicate or a straggler of a retired key; raise for a record that does not
        authenticate (the caller decides whether that is fatal or a discard)."""
        if self.is_client and self.state != State.ENCRYPTED:
            self.stats.handshake_hints_ignored += 1     # no keys yet: it cannot be checked
            return None
        if cid != self.local_cid:
            raise MalformedRecord("record addressed to another connection ID")
        if len(record) > self.config.max_datagram:
            raise Discard("oversize", f"record of {len(record)} bytes, above max_datagram")
        if len(record) < wire.HEADER_LEN + wire.AEAD_TAG_LEN:
            raise MalformedRecord("record shorter than the authentication tag")
        epoch, pn = seq >> wire.EPOCH_SHIFT, seq & wire.PN_MASK
        if not pn:
            raise MalformedRecord("packet number 0 in a protected record")
        if self._received.is_duplicate(pn):
            self.stats.duplicates_discarded += 1
            return None
        plaintext = self._open(record, seq, epoch)
        if plaintext is None:
            self.stats.stale_epoch_discarded += 1
            return None
        return plaintext, pn, epoch

    def _accept(self, plaintext: bytes, pn: int, epoch: int, record_len: int, now: float) -> bool:
        """Act on the frames of an authenticated record that is not a duplicate; True when it
        was taken (its pn marked received) and is the newest from the peer."""
        if self.state == State.KEY_EXCHANGE:
            self._server_confirms(plaintext)        # raises unless the client may come in
        recv = self._recv
        small = wire.decode_ack_stream(plaintext) if self._small_path else None
        if small is not None and (small[0] is None or self.state is _ENCRYPTED):
            # the common records, an ACK, a STREAM frame or an ACK then a STREAM frame (a small
            # message and its echo; bulk data), parsed in one call (stcp._frames) and acted on
            # as the general path below would, without frame objects and the dispatch
            ranges, delay_us, offset, data, fin = small
            if data is not None and recv.held and recv.fragments >= recv.max_fragments \
                    and recv.opens_fragment(offset, offset + len(data)):
                self.stats.discarded["reassembly"] += 1
                return False
            if self.state is _ENCRYPTED:     # _mark_received, inline (no handshake to confirm)
                ranges_seen = self._received.ranges
                if ranges_seen and pn == ranges_seen[-1][1] + 1:     # received.add's in-order case
                    ranges_seen[-1][1] = pn
                    newest = True
                else:
                    newest = self._received.add(pn)
                stats = self.stats
                stats.records_received += 1
                stats.bytes_received += record_len
                self._last_activity = now
            else:
                newest = self._mark_received(pn, record_len, now)
            if ranges is not None:
                self._on_ack(ranges, delay_us, now)
            if data is not None:
                self._on_stream_data(offset, data, fin)
                if newest and not self._ack_eliciting_unacked and not recv.fin_delivered:
                    # _ack_eliciting_received, inline for the newest record (pn is the largest)
                    self._ack_eliciting_unacked = 1
                    if self._ack_deadline is None:
                        self._ack_deadline = now + MAX_ACK_DELAY
                else:
                    self._ack_eliciting_received(pn, now)
            if recv.fin_offset is not None:      # _check_finished needs the stream finished
                self._check_finished(now)
            return newest
        frames = wire.decode_frames(plaintext)
        if recv.fragments + len(frames) > recv.max_fragments:
            opening = sum(1 for f in frames if type(f) is wire.StreamFrame
                          and recv.opens_fragment(f.offset, f.offset + len(f.data)))
            if opening and recv.fragments + opening > recv.max_fragments:
                self.stats.discarded["reassembly"] += 1
                return False
        newest = self._mark_received(pn, record_len, now)
        ack_eliciting = False
        handlers = _FRAME_HANDLERS
        for frame in frames:
            verdict = handlers[type(frame)](self, frame, epoch, now)
            if verdict is None:          # CLOSE: the connection ended, later frames are ignored
                return False
            ack_eliciting |= verdict
        if ack_eliciting:
            self._ack_eliciting_received(pn, now)
        self._check_finished(now)
        return newest

    def _mark_received(self, pn: int, record_len: int, now: float) -> bool:
        """Count the record as received; True when its pn is the largest received."""
        newest = self._received.add(pn)
        self.stats.records_received += 1
        self.stats.bytes_received += record_len
        self._last_activity = now
        if self.state == State.KEY_EXCHANGE:
            self._keys_confirmed(now)
        return newest

    # frame handlers (_FRAME_HANDLERS): True if the frame is ack-eliciting, None to stop
    def _frame_stream(self, frame: wire.StreamFrame, epoch: int, now: float) -> Optional[bool]:
        self._on_stream_data(frame.offset, frame.data, frame.fin)
        return True

    def _frame_ack(self, frame: wire.AckFrame, epoch: int, now: float) -> Optional[bool]:
        self._on_ack(frame.ranges, frame.delay_us, now)
        return False

    def _frame_max_data(self, frame: wire.MaxDataFrame, epoch: int, now: float) -> Optional[bool]:
        self._peer_max_data = max(self._peer_max_data, frame.limit)
        return True

    def _frame_ping(self, frame: wire.PingFrame, epoch: int, now: float) -> Optional[bool]:
        return True

    def _frame_padding(self, frame: wire.PaddingFrame, epoch: int, now: float) -> Optional[bool]:
        return False

    def _frame_key_update(self, frame: wire.KeyUpdateFrame, epoch: int, now: float) -> Optional[bool]:
        if frame.epoch != epoch:
            raise KeyUpdateError(f"key update to epoch {frame.epoch} in a record of epoch {epoch}")
        return True

    def _frame_close(self, frame: wire.CloseFrame, epoch: int, now: float) -> Optional[bool]:
        self._on_close(frame)
        return None

    def _frame_client_auth(self, frame: wire.ClientAuthFrame, epoch: int, now: float) -> Optional[bool]:
        # the first one was checked by _server_confirms; a client repeats it until acknowledged
        if self.is_client:
            raise ProtocolViolation("CLIENT_AUTH frame from the server")
        if frame.static_key != self.peer_static_key:    # the proven key repeated is ignored
            raise ProtocolViolation("CLIENT_AUTH frame with another key than the handshake's")
        return True

    def _frame_reset_token(self, frame: wire.ResetTokenFrame, epoch: int, now: float) -> Optional[bool]:
        if not self.is_client:
            raise ProtocolViolation("RESET_TOKEN frame from the client")
        self._reset_token = frame.token
        return True

    def _ack_eliciting_received(self, pn: int, now: float) -> None:
        self._ack_eliciting_unacked += 1
        if self._ack_eliciting_unacked >= 2 or pn != self._received.largest or self._recv.fin_delivered:
            self._ack_deadline = now                    # ack with the next flush
        elif self._ack_deadline is None:
            self._ack_deadline = now + MAX_ACK_DELAY

    def _open(self, record: bytes, seq: int, epoch: int) -> Optional[bytes]:
        keys = self._keys
        current = keys.recv
        if epoch == current.epoch:
            return current.open(record, seq)
        if epoch == current.epoch + 1:
            if self._recv_next is None:     # kept: forged next-epoch records cost one derivation
                self._recv_next = current.next()
            nxt = self._recv_next
            plaintext = nxt.open(record, seq)      # rotate only once a record authenticates
            self._recv_prev, keys.recv, self._recv_next = current, nxt, None
            self.stats.key_updates_received += 1
            self.events.append(KeyUpdated("recv", nxt.epoch))
            return plaintext
        if self._recv_prev is not None and epoch == self._recv_prev.epoch:
            return self._recv_prev.open(record, seq)
        if epoch < current.epoch:
            return None          # a straggler from a retired key: nothing can check it, drop it
        raise KeyUpdateError(f"record of key epoch {epoch} while receiving epoch {current.epoch}")

    def _on_stream_data(self, offset: int, data: bytes, fin: bool) -> None:
        if offset + len(data) >= 1 << 62:
            raise FlowControlError("stream offset out of range")
        data = self._recv.receive(offset, data, fin)
        if data:
            self.stats.stream_bytes_received += len(data)
            events = self.events
            rx_event = self._rx_event
            if rx_event is not None and events and events[-1] is rx_event:   # nothing else since: extend it
                rx_event.add(data)
            else:
                self._rx_event = DataReceived(data)
                events.append(self._rx_event)
        recv = self._recv
        if recv.fin_offset is not None and not recv.fin_delivered and recv.finished:
            self._recv.fin_delivered = True
            self.events.append(StreamFinished())

    def _on_close(self, frame: wire.CloseFrame) -> None:
        reason = printable(frame.reason)
        clean = frame.code == CloseCode.NO_ERROR and self._recv.finished
        if clean:
            self._finish(Event.FINISHED, ConnectionClosed(frame.code, reason, by_peer=True, error=False))
            return
        if frame.code == CloseCode.NO_ERROR:
            reason = reason or "peer closed before finishing its stream"
        self._finish(Event.FAILURE, ConnectionClosed(frame.code, reason, by_peer=True, error=True))


# frame type -> the ReceivePath method acting on it (PROTOCOL.md §7)
_FRAME_HANDLERS: Dict[type, Callable[[ReceivePath, Any, int, float], Optional[bool]]] = {
    wire.StreamFrame: ReceivePath._frame_stream,
    wire.AckFrame: ReceivePath._frame_ack,
    wire.MaxDataFrame: ReceivePath._frame_max_data,
    wire.PingFrame: ReceivePath._frame_ping,
    wire.PaddingFrame: ReceivePath._frame_padding,
    wire.KeyUpdateFrame: ReceivePath._frame_key_update,
    wire.CloseFrame: ReceivePath._frame_close,
    wire.ClientAuthFrame: ReceivePath._frame_client_auth,
    wire.ResetTokenFrame: ReceivePath._frame_reset_token,
}
