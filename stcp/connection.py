"""One STCP connection, sans-IO: datagrams and `now` in; datagrams, a timer and events out.

No socket, thread or clock lives here (the style of h11 and aioquic). A datapath feeds
`receive_datagram`, sends what `datagrams_to_send` returns, calls `handle_timer` when
`get_timer` says so, and hands `next_event` results to the application.
"""
from __future__ import annotations

import os
import secrets
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Tuple

from . import wire
from .crypto import CONFIDENTIALITY_LIMIT, RecordKey
from .errors import (AuthenticationFailure, CloseCode, FlowControlError, KeyUpdateError,
                     MalformedRecord, NotEncrypted, ProtocolViolation, STCPError)
from .budget import PROGRESS_BYTES, MemoryBudget
from .handshake import ClientHandshake, Keys, server_respond
from .recovery import (CLOSE as _CLOSE, KEY_UPDATE as _KEY_UPDATE, MAX_ACK_DELAY, MAX_DATA as _MAX_DATA,
                       PING as _PING, STREAM as _STREAM, Group, Recovery, SentPacket, SentRun)
from .replay import ReceivedPackets
from .state import Event, State, transition
from .stream import RecvStream, SendStream


@dataclass
class Config:
    suite: int = wire.SUITE_AES_256_GCM
    accepted_suites: Tuple[int, ...] = (wire.SUITE_AES_256_GCM, wire.SUITE_CHACHA20_POLY1305)
    max_datagram: int = wire.DEFAULT_MAX_DATAGRAM
    handshake_timeout: float = 10.0
    hello_retransmit: float = 0.2          # first client-hello retransmission; doubles each time
    idle_timeout: float = 30.0
    keepalive: Optional[float] = 10.0      # ping after this much silence; None disables
    recv_window: int = 16 << 20
    key_update_interval: int = 1 << 22     # records sealed under one key before updating it
    cid_prefix_bits: int = 0               # top CID bits naming the owning worker (AF_XDP steering)
    cid_prefix: int = 0
    # server: bytes of stream buffers all connections together may hold (stcp.budget);
    # None: an eighth of the machine's memory, at most 1 GiB
    memory_budget: Optional[int] = None

    def __post_init__(self) -> None:
        if not wire.HEADER_LEN + wire.AEAD_TAG_LEN + 64 <= self.max_datagram <= wire.MAX_UDP_PAYLOAD:
            raise ValueError(f"max_datagram must be between 104 and {wire.MAX_UDP_PAYLOAD}")
        limit = min(CONFIDENTIALITY_LIMIT[s] for s in self.accepted_suites + (self.suite,))
        if not 1 <= self.key_update_interval <= limit // 2:
            raise ValueError(f"key_update_interval must be between 1 and {limit // 2}")

    def new_cid(self) -> int:
        while True:
            bits = 64 - self.cid_prefix_bits
            cid = int.from_bytes(os.urandom(8), "big") & ((1 << bits) - 1)
            if self.cid_prefix_bits:
                cid |= self.cid_prefix << bits
            if cid:
                return cid


# --- events handed to the application -------------------------------------
@dataclass
class HandshakeCompleted:
    suite: int
    duration: float


@dataclass
class DataReceived:
    data: bytes


@dataclass
class StreamFinished:
    """The peer finished its sending direction; every byte it sent has been delivered."""


@dataclass
class KeyUpdated:
    direction: str     # "send" or "recv"
    epoch: int


@dataclass
class ConnectionClosed:
    code: int
    reason: str = ""
    by_peer: bool = False
    error: bool = False


# Why a record that reached a connection was discarded without acting on it (Stats.discarded):
#   malformed   a bad header, length, CID or packet number, from an address not the peer's
#   auth        failed authentication, from an address not the peer's
#   key_epoch   an epoch more than one ahead, from an address not the peer's
#   handshake   a handshake record (seq 0) that is not a repeat of the connection's own hello
#   oversize    a protected record longer than this endpoint's max_datagram, from anywhere
#   reassembly  an authenticated record whose stream data would open a fragment beyond the cap
#               (not acknowledged: the sender sends it again)
DISCARD_REASONS = ("malformed", "auth", "key_epoch", "handshake", "oversize", "reassembly")


class _Discard(STCPError):
    """A record to discard (counted under `reason`) wherever it came from."""

    def __init__(self, reason: str, what: str):
        super().__init__(what)
        self.reason = reason


_UNAUTHENTICATED_REASON = {MalformedRecord: "malformed", AuthenticationFailure: "auth",
                           KeyUpdateError: "key_epoch"}


@dataclass
class Stats:
    records_sent: int = 0
    records_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    stream_bytes_sent: int = 0
    stream_bytes_received: int = 0
    retransmitted_records: int = 0
    duplicates_discarded: int = 0
    stale_epoch_discarded: int = 0
    auth_failures: int = 0
    # records discarded unread, by reason (DISCARD_REASONS): input that did not authenticate
    # from an address other than the peer's, or that no sender may send (PROTOCOL.md §10.2)
    discarded: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(DISCARD_REASONS, 0))
    key_updates_sent: int = 0
    key_updates_received: int = 0
    rtt_samples: List[float] = field(default_factory=list)


_DRAIN_PTOS = 3
# RFC 9000 §21.4: the sender leaves out one packet number at random, once per _SKIP_SPAN / 2
# records on average (anywhere from 1 to _SKIP_SPAN - 1 apart, so the next is unpredictable);
# a peer that acknowledges one acknowledges what it never received (an optimistic-ACK attack)
# and the connection ends. The newest _SKIPPED_KEPT skipped numbers are checked.
_SKIP_SPAN = 384
_SKIPPED_KEPT = 64
# An ACK reports no range lying entirely more than this many packet numbers below the largest
# received: older ranges were reported many times already, and the gaps skipping leaves would
# otherwise fill every ACK with stale ranges.
_ACK_HORIZON = 1024
_CREDIT_RETRY = 0.2        # seconds between tries of a credit grant the memory budget postponed


class PacketNumbersExhausted(STCPError):
    code = CloseCode.INTERNAL_ERROR


class ConnectionShed(STCPError):
    code = CloseCode.INTERNAL_ERROR


def printable(text: str) -> str:
    """The peer's text (a CLOSE reason) made safe for terminals and logs: every character that
    is not printable (control characters, line breaks, bidirectional overrides...) becomes its
    escape, e.g. "\\x1b", so the peer cannot forge log lines or drive a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _skip_gap() -> int:
    return 1 + secrets.randbelow(_SKIP_SPAN - 1)
_MIN_STREAM_CHUNK = 64
# A run of bulk records goes to the kernel as one UDP GSO buffer: at most 64 segments, and
# the whole buffer must fit one UDP datagram's length.
_MAX_RUN_RECORDS = 64
_MAX_RUN_BYTES = 65000
_STREAM_HDR = wire.STREAM_HEADER_STRUCT


class Connection:
    def __init__(self, config: Config, is_client: bool, now: float):
        self.config = config
        self.is_client = is_client
        self.state = State.INIT
        self.local_cid = config.new_cid()
        self.peer_cid = 0
        self.suite = config.suite
        self.events: Deque[object] = deque()
        self.stats = Stats()
        self.close_info: Optional[ConnectionClosed] = None
        self._created = now
        self._out: List[bytes] = []
        self._keys: Optional[Keys] = None
        self._recv_prev: Optional[RecordKey] = None
        self._recv_next: Optional[RecordKey] = None
        self._next_pn = 1
        self._skip_at = 1 + _skip_gap()            # the next packet number to leave out
        self._skipped: List[int] = []              # packet numbers left out, ascending
        self._sealed_under_key = 0
        self._key_update_allowed = False
        self._key_update_frame_due = False
        self._received = ReceivedPackets()
        self._ack_eliciting_unacked = 0
        self._ack_deadline: Optional[float] = None
        self._recovery = Recovery(config.max_datagram)
        self._send = SendStream()
        self._recv = RecvStream(config.recv_window)
        self.budget: Optional[MemoryBudget] = None    # set by a server endpoint
        self._charged = 0                  # what this connection has charged to the budget
        self._progress_mark = 0
        self._progress_time = now
        self._credit_withheld = False
        self._credit_retry_at: Optional[float] = None
        self._peer_max_data = wire.INITIAL_MAX_DATA
        self._max_data_due = False
        self._ping_due = False
        self._probes_due = 0
        self._close_frame: Optional[wire.CloseFrame] = None
        self._draining_until: Optional[float] = None
        self._last_activity = now
        self._handshake_deadline = now + config.handshake_timeout
        self._hello_next: Optional[float] = None
        self._hello_interval = config.hello_retransmit
        self._rx_event: Optional[DataReceived] = None   # the DataReceived still being added to
        self._rx_chunks: List[bytes] = []
        self._client_hs: Optional[ClientHandshake] = None
        self._hello_record = b""       # client: the accepted server hello; server: the client hello
        self._server_hello = b""

    # --- construction ------------------------------------------------------
    @classmethod
    def client(cls, config: Config, now: float) -> "Connection":
        conn = cls(config, True, now)
        conn._client_hs = ClientHandshake(config.suite, conn.local_cid)
        conn._set_state(Event.SEND_HELLO)
        conn._out.append(conn._client_hs.hello_record)
        conn._hello_next = now + conn._hello_interval
        return conn

    @classmethod
    def server(cls, config: Config, hello_record: bytes, hello: wire.Hello, now: float) -> "Connection":
        """Accept a client hello; raises handshake.Rejected if it cannot be served."""
        conn = cls(config, False, now)
        conn.suite = hello.suite
        conn.peer_cid = hello.sender_cid
        conn._server_hello, conn._keys = server_respond(hello_record, hello, conn.local_cid, config.accepted_suites)
        conn._hello_record = hello_record
        conn._set_state(Event.RECV_HELLO)
        conn._out.append(conn._server_hello)
        return conn

    # --- application side --------------------------------------------------
    def send(self, data: bytes) -> None:
        self._require_encrypted("send data")
        if self._close_frame is not None or self._draining_until is not None:
            raise NotEncrypted("the connection is closing; no more data can be sent")
        self._send.write(data)
        self._account()

    def shutdown_write(self) -> None:
        """Finish the sending direction (half-close); data already written is still delivered."""
        self._require_encrypted("finish the stream")
        self._send.finish()

    def consume(self, n: int) -> bool:
        """The application has read n delivered bytes: flow-control credit may be returned.
        True when it is due now (the connection has a MAX_DATA to send)."""
        self._recv.on_consumed(n)
        due = self._grant_credit()
        self._account()
        return due

    def shed(self, reason: str, now: float) -> None:
        """End the connection to free memory (the endpoint's budget is exhausted): the peer is
        told with CLOSE(INTERNAL_ERROR, reason)."""
        self._fail(ConnectionShed(reason), now)

    # --- memory (server connections: the endpoint's MemoryBudget) -----------
    @property
    def footprint(self) -> int:
        """Bytes of stream data this connection holds: received and not yet read by the
        application (in order or not), written and not yet acknowledged by the peer."""
        return self._recv.buffered + self._send.unacked_bytes

    def progress_time(self, now: float) -> float:
        """When the application's reads plus the peer's acknowledgements last added up to
        PROGRESS_BYTES more (a trickle is not progress), as far as calls to this method (with
        their `now`) have seen; the creation time if never."""
        mark = self._recv.consumed + self._send.acked_to
        if mark >= self._progress_mark + PROGRESS_BYTES:
            self._progress_mark, self._progress_time = mark, now
        return self._progress_time

    def _account(self) -> None:
        budget = self.budget
        if budget is not None:
            held = 0 if self.state == State.CLOSED else self._recv.buffered + self._send.unacked_bytes
            if held != self._charged:
                budget.charge(held - self._charged)
                self._charged = held

    def _grant_credit(self) -> bool:
        """Advertise a new flow-control limit if one is due and the memory budget allows; a
        grant the budget does not allow is withheld and tried again later."""
        if not self._recv.credit_due():
            self._credit_withheld = False
            return False
        budget = self.budget
        if budget is not None and budget.exhausted:
            if not self._credit_withheld:
                self._credit_withheld = True
                budget.credit_withheld += 1
            return False
        self._credit_withheld = False
        self._recv.grant()
        self._max_data_due = True
        return True

    def close(self, code: int = CloseCode.APPLICATION_ABORT, reason: str = "") -> None:
        """End the connection now, telling the peer why (an abort, not a graceful close)."""
        if self.state in (State.CLOSED, State.ERROR):
            return
        if self.state == State.ENCRYPTED and self._next_pn <= wire.PN_MASK:
            self._close_frame = wire.CloseFrame(int(code), reason)
            self._out.append(self._seal_frames([wire.encode_frame(self._close_frame)], [], True, closing=True))
        self._finish(Event.ABORT, ConnectionClosed(int(code), reason, by_peer=False, error=False))

    @property
    def send_buffered(self) -> int:
        """Bytes written but not yet acknowledged by the peer."""
        return self._send.unacked_bytes

    @property
    def write_finished(self) -> bool:
        """The application has finished the sending direction (shutdown_write)."""
        return self._send.fin_requested

    @property
    def is_closed(self) -> bool:
        return self.state == State.CLOSED

    @property
    def rtt(self) -> float:
        return self._recovery.rtt.smoothed

    @property
    def min_rtt(self) -> float:
        return self._recovery.rtt.min_rtt

    @property
    def send_epoch(self) -> int:
        return self._keys.send.epoch if self._keys else 0

    @property
    def recv_epoch(self) -> int:
        return self._keys.recv.epoch if self._keys else 0

    def next_event(self):
        return self.events.popleft() if self.events else None

    def _require_encrypted(self, what: str) -> None:
        if self.state != State.ENCRYPTED:
            raise NotEncrypted(f"cannot {what} in state {self.state.value}: application data flows only "
                               f"in ENCRYPTED")

    # --- state -------------------------------------------------------------
    def _set_state(self, event: Event) -> None:
        self.state = transition(self.state, event)

    def _finish(self, event: Event, info: ConnectionClosed) -> None:
        self._set_state(event)
        if self.state == State.ERROR:
            self._set_state(Event.TERMINATED)
        self._recovery.forget_all()
        self._account()
        self._report_closed(info)

    def _report_closed(self, info: ConnectionClosed) -> None:
        """Tell the application once; a clean close is reported when draining starts."""
        if self.close_info is None:
            self.close_info = info
            self.events.append(info)

    def _fail(self, exc: STCPError, now: float) -> None:
        """Terminate on a fatal error: ERROR, tell the peer if we can, then CLOSED."""
        if self.state in (State.CLOSED, State.ERROR):
            return
        code = int(getattr(exc, "code", CloseCode.INTERNAL_ERROR))
        reason = str(exc)
        if self._keys is not None and (self.state == State.ENCRYPTED or not self.is_client) \
                and self._next_pn <= wire.PN_MASK:
            frame = wire.CloseFrame(code, reason)
            self._out.append(self._seal_frames([wire.encode_frame(frame)], [], True, closing=True))
        self._finish(Event.FAILURE, ConnectionClosed(code, reason, by_peer=False, error=True))

    # --- receive -----------------------------------------------------------
    # `from_peer` says whether a datagram came from the peer's current address. Only the
    # peer's own traffic may end the connection: from anywhere else, input that does not
    # authenticate is discarded and counted (PROTOCOL.md §10.2). The receive calls return True
    # when an authenticated record became the newest the peer has sent (the highest packet
    # number): an endpoint then moves the connection to that record's source address.
    def receive_datagram(self, data: bytes, now: float, from_peer: bool = True) -> bool:
        """Process one UDP datagram addressed to this connection. Never raises for bad input."""
        newest = self._receive_one(data, now, from_peer)
        self._finish_rx_event()
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
            self._finish_rx_event()
            self._after_receive()
            return newest
        key = self._keys.recv
        epoch = key.epoch
        received = self._received
        recv = self._recv
        for item in key.open_records(datagrams, self.local_cid, epoch, received.largest, recv.max_data,
                                     self.config.max_datagram):
            if self.state == State.CLOSED:
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
                if recv.fragments >= recv.max_fragments and recv.opens_fragment(offset, offset + len(data)):
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
        self._finish_rx_event()
        self._after_receive()
        return newest

    def _after_receive(self) -> None:
        if self.budget is not None:
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
        except _Discard as exc:
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
        self._fail(exc, now)

    def _receive_handshake(self, record: bytes, now: float) -> None:
        """A handshake record (seq 0). A server connection answers a repeat of the hello that
        made it while its own hello may have been lost; any other handshake record at a server,
        or at an ENCRYPTED client, is discarded: handshake records are unauthenticated, and the
        connection they name is past needing one."""
        if not self.is_client:
            if record == self._hello_record:
                if self.state == State.KEY_EXCHANGE:    # our server hello was lost: same answer again
                    self._out.append(self._server_hello)
                else:
                    self.stats.duplicates_discarded += 1
                return
            raise _Discard("handshake", f"handshake record at a server connection in state {self.state.value}")
        if self.state == State.KEY_EXCHANGE:
            hello = wire.decode_hello(record[wire.HEADER_LEN:])
            self._keys, self.peer_cid = self._client_hs.on_server_hello(record, hello)
            self._hello_record = record
            self._client_hs = None
            self._hello_next = None
            self._keys_confirmed(now)
            self._ping_due = True     # gives the server its key confirmation even with no data to send
        elif record == self._hello_record:
            self.stats.duplicates_discarded += 1
        else:
            raise _Discard("handshake", f"handshake record at a client in state {self.state.value}")

    def _keys_confirmed(self, now: float) -> None:
        self._set_state(Event.KEYS_CONFIRMED)
        self._handshake_deadline = None
        self._last_activity = now
        self._grant_credit()
        self.events.append(HandshakeCompleted(self.suite, now - self._created))

    def _authenticate(self, record: bytes, cid: int, seq: int) -> Optional[Tuple[bytes, int, int]]:
        """(plaintext, pn, epoch) of a protected record not received before, or None for a
        duplicate or a straggler of a retired key; raise for a record that does not
        authenticate (the caller decides whether that is fatal or a discard)."""
        keys = self._keys
        if keys is None or (self.is_client and self.state != State.ENCRYPTED):
            raise ProtocolViolation(f"protected record in state {self.state.value}")
        if cid != self.local_cid:
            raise MalformedRecord("record addressed to another connection ID")
        if len(record) > self.config.max_datagram:
            raise _Discard("oversize", f"record of {len(record)} bytes, above max_datagram")
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
        recv = self._recv
        if len(plaintext) >= wire.STREAM_FRAME_OVERHEAD and plaintext[0] == wire.FRAME_STREAM:
            # the bulk case, a record holding one STREAM frame and nothing else, without
            # building frame objects
            _, flags, offset, length = _STREAM_HDR.unpack_from(plaintext)
            if length == len(plaintext) - wire.STREAM_FRAME_OVERHEAD and flags <= wire.STREAM_FLAG_FIN:
                if recv.fragments >= recv.max_fragments and recv.opens_fragment(offset, offset + length):
                    self.stats.discarded["reassembly"] += 1
                    return False
                self._mark_received(pn, record_len, now)
                self._on_stream_data(offset, plaintext[wire.STREAM_FRAME_OVERHEAD:], flags == wire.STREAM_FLAG_FIN)
                self._ack_eliciting_received(pn, now)
                self._check_finished(now)
                return pn == self._received.largest
        frames = wire.decode_frames(plaintext)
        if recv.fragments + len(frames) > recv.max_fragments:
            opening = sum(1 for f in frames if type(f) is wire.StreamFrame
                          and recv.opens_fragment(f.offset, f.offset + len(f.data)))
            if opening and recv.fragments + opening > recv.max_fragments:
                self.stats.discarded["reassembly"] += 1
                return False
        self._mark_received(pn, record_len, now)
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
        return pn == self._received.largest

    def _mark_received(self, pn: int, record_len: int, now: float) -> None:
        self._received.add(pn)
        self.stats.records_received += 1
        self.stats.bytes_received += record_len
        self._last_activity = now
        if self.state == State.KEY_EXCHANGE:
            self._keys_confirmed(now)

    # frame handlers (_FRAME_HANDLERS): True if the frame is ack-eliciting, None to stop
    def _frame_stream(self, frame: wire.StreamFrame, epoch: int, now: float) -> Optional[bool]:
        self._on_stream_data(frame.offset, frame.data, frame.fin)
        return True

    def _frame_ack(self, frame: wire.AckFrame, epoch: int, now: float) -> Optional[bool]:
        self._on_ack(frame, now)
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
            if events and events[-1] is self._rx_event:      # nothing else happened since: extend it
                self._rx_chunks.append(data)
            else:
                self._finish_rx_event()
                self._rx_event = DataReceived(data)
                self._rx_chunks = [data]
                events.append(self._rx_event)
        if self._recv.finished and not self._recv.fin_delivered:
            self._recv.fin_delivered = True
            self.events.append(StreamFinished())

    def _finish_rx_event(self) -> None:
        """Join the data of the DataReceived built up during one receive call."""
        if self._rx_event is not None:
            if len(self._rx_chunks) > 1:
                self._rx_event.data = b"".join(self._rx_chunks)
            self._rx_event = None
            self._rx_chunks = []

    def _on_ack(self, frame: wire.AckFrame, now: float) -> None:
        ranges = frame.ranges
        if ranges[0][1] >= self._next_pn:
            raise ProtocolViolation(f"ack of packet {ranges[0][1]} that was never sent")
        skipped = self._skipped
        if skipped and ranges[-1][0] <= skipped[-1]:
            for low, high in ranges:
                i = bisect_left(skipped, low)
                if i < len(skipped) and skipped[i] <= high:
                    raise ProtocolViolation(f"ack of packet {skipped[i]}, a packet number never sent "
                                            f"(acknowledging what was not received)")
        acked, lost = self._recovery.on_ack(frame.ranges, frame.delay_us / 1e6, now)
        send_epoch = self._keys.send.epoch
        on_acked = self._send.on_acked
        start = end = -1                  # adjacent acknowledged stream ranges, merged
        for first, last, p in acked:
            if p.epoch == send_epoch:
                self._key_update_allowed = True
            for desc in p.frames_between(first, last):
                if desc[0] == _STREAM:
                    if desc[3]:
                        on_acked(desc[1], desc[2], True)
                    elif desc[1] == end:
                        end = desc[2]
                    else:
                        if end > start:
                            on_acked(start, end, False)
                        start, end = desc[1], desc[2]
        if end > start:
            on_acked(start, end, False)
        if acked and self._recovery.rtt.has_sample:
            self.stats.rtt_samples.append(self._recovery.rtt.latest)
            if len(self.stats.rtt_samples) > 1024:
                del self.stats.rtt_samples[:512]
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

    def _on_close(self, frame: wire.CloseFrame) -> None:
        reason = printable(frame.reason)
        clean = frame.code == CloseCode.NO_ERROR and self._recv.finished
        if clean:
            self._finish(Event.FINISHED, ConnectionClosed(frame.code, reason, by_peer=True, error=False))
            return
        if frame.code == CloseCode.NO_ERROR:
            reason = reason or "peer closed before finishing its stream"
        self._finish(Event.FAILURE, ConnectionClosed(frame.code, reason, by_peer=True, error=True))

    def _check_finished(self, now: float) -> None:
        """Both directions done: say goodbye and linger a little to re-ack a lost final ack."""
        if self._draining_until is None and self.state == State.ENCRYPTED \
                and self._send.all_acked and self._recv.finished:
            self._close_frame = wire.CloseFrame(CloseCode.NO_ERROR, "")
            self._draining_until = now + _DRAIN_PTOS * self._recovery.pto_interval()
            self._report_closed(ConnectionClosed(CloseCode.NO_ERROR))

    # --- timers ------------------------------------------------------------
    def get_timer(self) -> Optional[float]:
        if self.state == State.CLOSED:
            return None
        if self.state != State.ENCRYPTED:
            candidates = (self._handshake_deadline, self._hello_next)
            return min((t for t in candidates if t is not None), default=None)
        # ENCRYPTED: the idle deadline always exists; the rest only sometimes
        when = self._last_activity + self.config.idle_timeout
        if self.config.keepalive and not self._recovery.ack_eliciting_in_flight:
            when = min(when, self._last_activity + self.config.keepalive)
        # draining: nothing is probed (a lost CLOSE costs nothing, the peer finishes on its own
        # once it has our acks); only the peer's retransmissions are answered
        recovery_timer = self._recovery.timer() if self._draining_until is None else None
        for t in (self._ack_deadline, self._draining_until, recovery_timer):
            if t is not None and t < when:
                when = t
        if self._credit_withheld:       # the memory budget postponed a grant: try again
            retry = self._credit_retry_at if self._credit_retry_at is not None else self._last_activity
            when = min(when, retry)
        return when

    def handle_timer(self, now: float) -> None:
        if self.state == State.CLOSED:
            return
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            seconds = self.config.handshake_timeout
            self._finish(Event.TIMEOUT, ConnectionClosed(CloseCode.HANDSHAKE_TIMEOUT,
                                                         f"handshake timed out after {seconds:g} s"))
            return
        if self.state == State.ENCRYPTED and now >= self._last_activity + self.config.idle_timeout:
            self._finish(Event.TIMEOUT, ConnectionClosed(
                CloseCode.IDLE_TIMEOUT, f"no record from the peer for {self.config.idle_timeout:g} s"))
            return
        if self._draining_until is not None and now >= self._draining_until:
            self._finish(Event.FINISHED, ConnectionClosed(CloseCode.NO_ERROR))
            return
        if self._hello_next is not None and now >= self._hello_next:
            self._out.append(self._client_hs.hello_record)
            self._hello_interval *= 2
            self._hello_next = now + self._hello_interval
        if self.state != State.ENCRYPTED:
            return
        if self.config.keepalive and now >= self._last_activity + self.config.keepalive \
                and not self._recovery.ack_eliciting_in_flight:
            self._ping_due = True
        if self._credit_withheld and now >= (self._credit_retry_at or 0.0):
            budget = self.budget
            if budget.exhausted and budget.shed_hook is not None:
                budget.shed_hook(now)
            self._credit_retry_at = None if self._grant_credit() else now + _CREDIT_RETRY
        timer = self._recovery.timer() if self._draining_until is None else None
        if timer is not None and now >= timer:
            if self._recovery.loss_time is not None:
                self._on_lost(self._recovery.detect_lost(now))
            else:
                self._on_pto()

    def _on_pto(self) -> None:
        self._recovery.on_pto()
        self._probes_due = 2
        oldest = self._recovery.oldest_ack_eliciting()
        if oldest is not None:     # probe with the oldest unacknowledged data, not just a ping
            for desc in oldest[2].frames_between(oldest[0], oldest[1]):
                if desc[0] == _STREAM:
                    self._send.on_lost(desc[1], desc[2], desc[3])
        if not self._send.pending():
            self._ping_due = True

    # --- send --------------------------------------------------------------
    def datagrams_to_send(self, now: float) -> List[bytes]:
        """Every datagram due now, one record each."""
        return wire.expand_datagrams(self.datagram_batches(now))

    def datagram_batches(self, now: float) -> List[Tuple[bytes, int]]:
        """What datagrams_to_send gives, as (buffer, segment size) pairs: a buffer holds records
        of `segment size` bytes back to back (the last may be shorter), ready for one UDP GSO
        send; a single record comes as (record, len(record))."""
        out, self._out = self._out, []
        if self.state == State.ENCRYPTED:
            try:
                self._build_packets(now, out)
            except STCPError as exc:
                self._fail(exc, now)
                out.extend(self._out)
                self._out = []
        return [item if type(item) is tuple else (item, len(item)) for item in out]

    def _build_packets(self, now: float, out: List[bytes]) -> None:
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
                                                   or self._ping_due or self._draining_until is not None) \
                    and self._send_stream_run(now, out):
                continue
            frames: List[bytes] = []
            descs: list = []
            if self._ack_deadline is not None and (self._ack_deadline <= now or self._ack_can_ride()):
                frames.append(wire.encode_ack(self._received.ack_ranges(wire.MAX_ACK_RANGES, _ACK_HORIZON)))
                self._ack_deadline = None
                self._ack_eliciting_unacked = 0
            if self._max_data_due or self._key_update_frame_due or self._ping_due or \
                    (self._close_frame is not None and self._draining_until is not None):
                self._add_control_frames(frames, descs)
            budget = max_payload
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
            if retransmit:
                stats.retransmitted_records += 1
            out.append(self._seal_frames(frames, descs, bool(descs), now))

    def _send_stream_run(self, now: float, out: list) -> bool:
        """Bulk data: as many full records of new stream data as the congestion window, the
        peer's flow-control limit and the key allow, sealed in one call into one GSO buffer.
        False (nothing sent) when fewer than two such records can go: the general path then
        builds the next record."""
        send = self._send
        if send.retransmit or self._probes_due:
            return False
        size = self.config.max_datagram
        chunk = size - wire.HEADER_LEN - wire.AEAD_TAG_LEN - wire.STREAM_FRAME_OVERHEAD
        cc = self._recovery.cc
        start = send.next_offset
        n = min((cc.cwnd - cc.bytes_in_flight) // size, _MAX_RUN_RECORDS, _MAX_RUN_BYTES // size,
                self.config.key_update_interval - self._sealed_under_key,
                (min(send.end, self._peer_max_data) - start) // chunk,
                wire.PN_MASK - 1 - self._next_pn)      # near the last packet number: one by one
        if n < 2:
            return False
        stop = start + n * chunk
        fin = send.fin_requested and stop == send.end
        key = self._keys.send
        pn = self._take_pns(n)
        buf = key.seal_stream(self.peer_cid, wire.make_seq(key.epoch, pn), send.view(start, stop), start, chunk, fin)
        send.next_offset = stop
        if fin:
            send.fin_sent = True
        self._sealed_under_key += n
        stats = self.stats
        stats.records_sent += n
        stats.bytes_sent += len(buf)
        stats.stream_bytes_sent += n * chunk
        self._recovery.on_sent_run(SentRun(pn, now, size, key.epoch, n, start, chunk, fin))
        out.append((buf, size))
        return True

    def _add_control_frames(self, frames: List[bytes], descs: list) -> None:
        if self._max_data_due:
            self._max_data_due = False
            frames.append(wire.encode_frame(wire.MaxDataFrame(self._recv.max_data)))
            descs.append((_MAX_DATA,))
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
        return self._max_data_due or self._ping_due or self._key_update_frame_due or self._send.pending()

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
        last packet number, 2^48 - 1, is kept for the CLOSE that says they ran out."""
        pn = self._next_pn
        if pn >= self._skip_at and not closing:
            self._skipped.append(pn)
            if len(self._skipped) > _SKIPPED_KEPT:
                del self._skipped[0]
            pn += 1
            self._skip_at = pn + _skip_gap()
        if pn + n - 1 > (wire.PN_MASK if closing else wire.PN_MASK - 1):
            raise PacketNumbersExhausted(f"packet numbers exhausted: the next record would need packet "
                                         f"number {pn + n - 1}, above 2^48 - 1")
        self._next_pn = pn + n
        return pn

    def _seal_frames(self, frames: List[bytes], descs: list, ack_eliciting: bool, now: float = 0.0,
                     closing: bool = False) -> bytes:
        keys = self._keys
        pn = self._take_pns(1, closing)
        self._sealed_under_key += 1
        record = keys.send.seal(self.peer_cid, wire.make_seq(keys.send.epoch, pn), b"".join(frames))
        self.stats.records_sent += 1
        self.stats.bytes_sent += len(record)
        self._recovery.on_sent(SentPacket(pn, now, len(record), ack_eliciting, descs, keys.send.epoch))
        return record


# frame type -> Connection method acting on it (PROTOCOL.md §7)
_FRAME_HANDLERS = {
    wire.StreamFrame: Connection._frame_stream,
    wire.AckFrame: Connection._frame_ack,
    wire.MaxDataFrame: Connection._frame_max_data,
    wire.PingFrame: Connection._frame_ping,
    wire.PaddingFrame: Connection._frame_padding,
    wire.KeyUpdateFrame: Connection._frame_key_update,
    wire.CloseFrame: Connection._frame_close,
}
