"""One STCP connection, sans-IO: datagrams and `now` in; datagrams, a timer and events out.

No socket, thread or clock lives here (the style of h11 and aioquic). A datapath feeds
`receive_datagram`, sends what `datagrams_to_send` returns, calls `handle_timer` when
`get_timer` says so, and hands `next_event` results to the application.
"""
from __future__ import annotations

import hmac
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Collection, Deque, List, Optional, Tuple

from . import wire
from .cid_layout import check_server_id
from .crypto import CONFIDENTIALITY_LIMIT, RecordKey, reset_key, reset_token
from .errors import (AccessDenied, AuthenticationFailure, CloseCode, FlowControlError, KeyUpdateError,
                     MalformedRecord, NotEncrypted, ProtocolViolation, STCPError)
from .handshake import ClientHandshake, Keys, ServerHandshake, ServerKeyPolicy
from .identity import KEY_LEN, StaticKey, fingerprint
from .recovery import (CLIENT_AUTH as _CLIENT_AUTH, CLOSE as _CLOSE, KEY_UPDATE as _KEY_UPDATE, MAX_ACK_DELAY,
                       MAX_DATA as _MAX_DATA, PING as _PING, RESET_TOKEN as _RESET_TOKEN, STREAM as _STREAM,
                       Group, Recovery, SentPacket, SentRun)
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
    cid_prefix_bits: int = 0               # top CID bits a datapath fixes (stcp.cid.for_worker)
    cid_prefix: int = 0
    # server: this host's id in its CIDs, for a CID-aware load balancer (stcp.cid, PROTOCOL.md
    # section 3.1.1); 0 bits: no server id
    server_id: int = 0
    server_id_bits: int = 0
    # identity (PROTOCOL.md section 5). static_key: this side's X25519 private key, 32 raw
    # bytes: a server's identity (None: ServerEndpoint makes a fresh one), a client's key to
    # prove with CLIENT_AUTH (None: it proves none).
    static_key: Optional[bytes] = field(default=None, repr=False)
    # client: the server static key it accepts: the pinned public key, a callable deciding on
    # the presented key (True accepts), or None for any key (no protection from an active attacker)
    server_key: ServerKeyPolicy = None
    # server: the client public keys it admits (a valid CLIENT_AUTH proof required); None: anyone
    allowed_clients: Optional[Collection[bytes]] = None
    # server hello path under load (section 4.5): hellos per second that may reach X25519
    # without a cookie, the bucket's depth, and the half-open connections above which a
    # cookie is required (None: min(4096, max_connections)); twice that is a hard cap
    hello_rate: float = 2000.0
    hello_burst: int = 500
    max_half_open: Optional[int] = None
    reset_rate: float = 1000.0             # stateless RESETs per second, at most (section 5.7)

    def __post_init__(self) -> None:
        if not wire.HANDSHAKE_RECORD_LEN <= self.max_datagram <= wire.MAX_UDP_PAYLOAD:
            raise ValueError(f"max_datagram must be between {wire.HANDSHAKE_RECORD_LEN} and {wire.MAX_UDP_PAYLOAD}")
        limit = min(CONFIDENTIALITY_LIMIT[s] for s in self.accepted_suites + (self.suite,))
        if not 1 <= self.key_update_interval <= limit // 2:
            raise ValueError(f"key_update_interval must be between 1 and {limit // 2}")
        if self.static_key is not None and len(self.static_key) != KEY_LEN:
            raise ValueError(f"static_key must be {KEY_LEN} raw bytes")
        if isinstance(self.server_key, (bytes, bytearray)) and len(self.server_key) != KEY_LEN:
            raise ValueError(f"server_key must be the server's {KEY_LEN}-byte public key")
        if self.allowed_clients is not None:
            allowed = frozenset(bytes(k) for k in self.allowed_clients)
            if any(len(k) != KEY_LEN for k in allowed):
                raise ValueError(f"allowed_clients must hold {KEY_LEN}-byte public keys")
            self.allowed_clients = allowed
        if self.hello_rate < 0 or self.hello_burst < 0 or self.reset_rate < 0:
            raise ValueError("hello_rate, hello_burst and reset_rate cannot be negative")
        if self.max_half_open is not None and self.max_half_open < 1:
            raise ValueError("max_half_open must be at least 1 (or None for the default)")
        check_server_id(self.server_id, self.server_id_bits)
        # derived once: the public key costs an X25519 base-point multiplication
        self.identity: Optional[StaticKey] = StaticKey(self.static_key) if self.static_key is not None else None
        self.reset_key: Optional[bytes] = reset_key(self.static_key) if self.static_key is not None else None

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
    peer_key: Optional[bytes] = None   # the peer's proven static key: the server's, or the client's if it sent one


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
    key_updates_sent: int = 0
    key_updates_received: int = 0
    handshake_hints_ignored: int = 0          # client: unverifiable replies during KEY_EXCHANGE
    handshake_records_discarded: int = 0      # handshake-class records once ENCRYPTED (not repeats)
    client_auth_missing: int = 0              # server with an allow list: records without CLIENT_AUTH
    rtt_samples: List[float] = field(default_factory=list)


_DRAIN_PTOS = 3
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
        self._sealed_under_key = 0
        self._key_update_allowed = False
        self._key_update_frame_due = False
        self._received = ReceivedPackets()
        self._ack_eliciting_unacked = 0
        self._ack_deadline: Optional[float] = None
        self._recovery = Recovery(config.max_datagram)
        self._send = SendStream()
        self._recv = RecvStream(config.recv_window)
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
        self._server_hs: Optional[ServerHandshake] = None
        self._hello_record = b""       # client: the accepted server hello; server: CH' of the client hello
        self._server_hello = b""
        self._cookie_resend_at = float("-inf")
        self.peer_static_key: Optional[bytes] = None    # proven: the server's key, or the client's
        self._client_auth: Optional[bytes] = None       # client: CLIENT_AUTH frame, until acknowledged
        self._reset_token: Optional[bytes] = None       # client: the server's token for this connection
        self._reset_token_due = False                   # server: RESET_TOKEN to send (again)
        self._reset_token_acked = False

    # --- construction ------------------------------------------------------
    @classmethod
    def client(cls, config: Config, now: float) -> "Connection":
        conn = cls(config, True, now)
        conn._client_hs = ClientHandshake(config.suite, conn.local_cid, config.server_key, config.identity)
        conn._set_state(Event.SEND_HELLO)
        conn._out.append(conn._client_hs.hello_record)
        conn._hello_next = now + conn._hello_interval
        return conn

    @classmethod
    def server(cls, config: Config, hello_record: bytes, hello: wire.Hello, now: float) -> "Connection":
        """Accept a client hello; raises handshake.Rejected if it cannot be served."""
        if config.identity is None:
            raise ValueError("a server connection needs its static key (Config.static_key)")
        conn = cls(config, False, now)
        conn.suite = hello.suite
        conn.peer_cid = hello.sender_cid
        hs = conn._server_hs = ServerHandshake(config.identity, hello_record, hello, conn.local_cid,
                                               config.accepted_suites)
        conn._server_hello, conn._keys = hs.record, hs.keys
        conn._hello_record = wire.client_hello_transcript_form(hello_record)
        conn._reset_token_due = True
        conn._set_state(Event.RECV_HELLO)
        conn._out.append(conn._server_hello)
        return conn

    # --- application side --------------------------------------------------
    def send(self, data: bytes) -> None:
        self._require_encrypted("send data")
        if self._close_frame is not None or self._draining_until is not None:
            raise NotEncrypted("the connection is closing; no more data can be sent")
        self._send.write(data)

    def shutdown_write(self) -> None:
        """Finish the sending direction (half-close); data already written is still delivered."""
        self._require_encrypted("finish the stream")
        self._send.finish()

    def consume(self, n: int) -> bool:
        """The application has read n delivered bytes: flow-control credit may be returned.
        True when it is due now (the connection has a MAX_DATA to send)."""
        if self._recv.on_consumed(n) is not None:
            self._max_data_due = True
            return True
        return False

    def close(self, code: int = CloseCode.APPLICATION_ABORT, reason: str = "") -> None:
        """End the connection now, telling the peer why (an abort, not a graceful close)."""
        if self.state in (State.CLOSED, State.ERROR):
            return
        if self.state == State.ENCRYPTED:
            self._close_frame = wire.CloseFrame(int(code), reason)
            self._out.append(self._seal_frames([wire.encode_frame(self._close_frame)], [], True))
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
    def write_acknowledged(self) -> bool:
        """The sending direction is finished and the peer has acknowledged every byte of it
        and its end: nothing written can be lost any more."""
        return self._send.all_acked

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
        self._client_hs = self._server_hs = None     # a handshake that ends here forgets e or f too
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
        if self._keys is not None and (self.state == State.ENCRYPTED or not self.is_client):
            frame = wire.CloseFrame(code, reason)
            self._out.append(self._seal_frames([wire.encode_frame(frame)], [], True))
        self._finish(Event.FAILURE, ConnectionClosed(code, reason, by_peer=False, error=True))

    # --- receive -----------------------------------------------------------
    def receive_datagram(self, data: bytes, now: float) -> None:
        """Process one UDP datagram addressed to this connection. Never raises for bad input."""
        self._receive_one(data, now)
        self._finish_rx_event()

    def receive_datagrams(self, datagrams: list, now: float) -> None:
        """Process datagrams addressed to this connection (an entry may be a (buffer,
        segment_size) pair from UDP GRO: wire.expand_datagrams), in order, as receive_datagram on
        each would: replays are discarded, a bad record ends the connection after the good ones
        before it. The crypto of new records happens in one C call (RecordKey.open_records)
        and a stretch of in-order stream records is taken as one piece of data."""
        if self.state != State.ENCRYPTED:
            for data in wire.expand_datagrams(datagrams):
                self._receive_one(data, now)
            self._finish_rx_event()
            return
        key = self._keys.recv
        epoch = key.epoch
        received = self._received
        for item in key.open_records(datagrams, self.local_cid, epoch, received.largest, self._recv.max_data):
            if self.state == State.CLOSED:
                break
            if type(item) is not tuple:
                self._receive_one(item, now)
                continue
            try:
                if len(item) == 3:
                    plaintext, pn, record_len = item
                    self._accept(plaintext, pn, epoch, record_len, now)
                    continue
                # records of contiguous stream data: accounted for as _accept would one by one
                offset, count, data, first_pn, record_bytes = item
                received.add_consecutive(first_pn, first_pn + count - 1)
                stats = self.stats
                stats.records_received += count
                stats.bytes_received += record_bytes
                self._last_activity = now
                self._on_stream_data(offset, data, False)
                self._ack_eliciting_unacked += count - 1
                self._ack_eliciting_received(first_pn + count - 1, now)
                self._check_finished(now)
            except STCPError as exc:
                self._on_receive_error(exc, now)
        self._finish_rx_event()

    def _receive_one(self, data: bytes, now: float) -> None:
        if self.state == State.CLOSED:
            return
        try:
            _, cid, seq = wire.parse_header(data)
            if seq == wire.HANDSHAKE_SEQ:
                self._receive_handshake(data, now)
            else:
                self._receive_protected(data, cid, seq, now)
        except STCPError as exc:
            self._on_receive_error(exc, now)

    def _on_receive_error(self, exc: STCPError, now: float) -> None:
        if isinstance(exc, AuthenticationFailure):
            self.stats.auth_failures += 1
        if self.is_client and self.state == State.KEY_EXCHANGE:
            self.stats.handshake_hints_ignored += 1    # nothing reaching it is authenticated yet
            return
        self._fail(exc, now)

    def _receive_handshake(self, record: bytes, now: float) -> None:
        if self.is_client:
            self._client_handshake_record(record, now)
            return
        if len(record) == wire.HANDSHAKE_RECORD_LEN and record[wire.HEADER_LEN] == wire.HS_CLIENT_HELLO \
                and wire.client_hello_transcript_form(record) == self._hello_record:
            if self.state == State.KEY_EXCHANGE:    # our server hello was lost: same answer again
                self._out.append(self._server_hello)
            else:
                self.stats.duplicates_discarded += 1
            return
        if self.state == State.ENCRYPTED:     # a late or forged handshake record: never fatal now
            self.stats.handshake_records_discarded += 1
            return
        wire.decode_hello(record[wire.HEADER_LEN:])
        raise ProtocolViolation(f"unexpected handshake record in state {self.state.value}")

    def _client_handshake_record(self, record: bytes, now: float) -> None:
        if self.state == State.KEY_EXCHANGE:
            hs = self._client_hs
            est = hs.on_record(record)
            if est is None:                   # a hint, not a verdict: keep sending the hello
                self.stats.handshake_hints_ignored += 1
                if hs.new_cookie and now >= self._cookie_resend_at:
                    self._resend_hello(now)
                return
            self._keys, self.peer_cid, self.peer_static_key = est.keys, est.server_cid, est.server_key
            self._client_auth = est.client_auth
            self._hello_record = record
            self._client_hs = None
            self._hello_next = None
            self._keys_confirmed(now)
            self._ping_due = True     # gives the server its key confirmation even with no data to send
            return
        token = self._reset_token
        if token is not None and len(record) == wire.RESET_RECORD_LEN:
            presented = wire.reset_token_of(record)
            if presented is not None and hmac.compare_digest(presented, token):
                self._finish(Event.FAILURE, ConnectionClosed(
                    CloseCode.STATELESS_RESET, "the server has no state for this connection: it restarted "
                    "or its worker died", by_peer=True, error=True))
                return
        if record == self._hello_record:
            self.stats.duplicates_discarded += 1
        else:
            self.stats.handshake_records_discarded += 1

    def _resend_hello(self, now: float) -> None:
        """A COOKIE changed the hello: send it at once, at most every 100 ms."""
        self._client_hs.new_cookie = False
        self._cookie_resend_at = now + 0.1
        self._out.append(self._client_hs.hello_record)

    def _server_confirms(self, plaintext: bytes) -> bool:
        """Server in KEY_EXCHANGE, the client's first authenticated record: check its
        CLIENT_AUTH (PROTOCOL.md section 5.6). False: discard it unacknowledged (an allow list
        and no CLIENT_AUTH first); raises for a bad proof or a key not on the list."""
        allowed = self.config.allowed_clients
        if len(plaintext) >= wire.CLIENT_AUTH_FRAME_LEN and plaintext[0] == wire.FRAME_CLIENT_AUTH:
            frame = wire.decode_frames(plaintext[:wire.CLIENT_AUTH_FRAME_LEN])[0]
            self._server_hs.verify_client_auth(frame)
            if allowed is not None and frame.static_key not in allowed:
                raise AccessDenied(f"client key {fingerprint(frame.static_key)} is not allowed")
            self.peer_static_key = frame.static_key
        elif allowed is not None:
            self.stats.client_auth_missing += 1
            return False
        return True

    def _keys_confirmed(self, now: float) -> None:
        self._set_state(Event.KEYS_CONFIRMED)
        self._handshake_deadline = None
        self._last_activity = now
        if self._server_hs is not None:
            self._server_hs.finish()
            self._server_hs = None
        if self._recv.initial_limit() is not None:
            self._max_data_due = True
        self.events.append(HandshakeCompleted(self.suite, now - self._created, self.peer_static_key))

    def _receive_protected(self, record: bytes, cid: int, seq: int, now: float) -> None:
        if self.is_client and self.state != State.ENCRYPTED:
            self.stats.handshake_hints_ignored += 1     # no keys yet: it cannot be checked
            return
        if cid != self.local_cid:
            raise MalformedRecord("record addressed to another connection ID")
        if len(record) < wire.HEADER_LEN + wire.AEAD_TAG_LEN:
            raise MalformedRecord("record shorter than the authentication tag")
        epoch, pn = seq >> wire.EPOCH_SHIFT, seq & wire.PN_MASK
        if self._received.is_duplicate(pn):
            self.stats.duplicates_discarded += 1
            return
        plaintext = self._open(record, seq, epoch)
        if plaintext is None:
            self.stats.stale_epoch_discarded += 1
            return
        self._accept(plaintext, pn, epoch, len(record), now)

    def _accept(self, plaintext: bytes, pn: int, epoch: int, record_len: int, now: float) -> None:
        """Act on the frames of an authenticated record that is not a duplicate."""
        if self.state == State.KEY_EXCHANGE and not self._server_confirms(plaintext):
            return                    # neither acknowledged nor marked received
        self._received.add(pn)
        self.stats.records_received += 1
        self.stats.bytes_received += record_len
        self._last_activity = now
        if self.state == State.KEY_EXCHANGE:
            self._keys_confirmed(now)
        if len(plaintext) >= wire.STREAM_FRAME_OVERHEAD and plaintext[0] == wire.FRAME_STREAM:
            # the bulk case, a record holding one STREAM frame and nothing else, without
            # building frame objects
            _, flags, offset, length = _STREAM_HDR.unpack_from(plaintext)
            if length == len(plaintext) - wire.STREAM_FRAME_OVERHEAD and flags <= wire.STREAM_FLAG_FIN:
                self._on_stream_data(offset, plaintext[wire.STREAM_FRAME_OVERHEAD:], flags == wire.STREAM_FLAG_FIN)
                self._ack_eliciting_received(pn, now)
                self._check_finished(now)
                return
        ack_eliciting = False
        for frame in wire.decode_frames(plaintext):
            if isinstance(frame, wire.StreamFrame):
                ack_eliciting = True
                self._on_stream(frame)
            elif isinstance(frame, wire.AckFrame):
                self._on_ack(frame, now)
            elif isinstance(frame, wire.MaxDataFrame):
                ack_eliciting = True
                self._peer_max_data = max(self._peer_max_data, frame.limit)
            elif isinstance(frame, wire.PingFrame):
                ack_eliciting = True
            elif isinstance(frame, wire.KeyUpdateFrame):
                ack_eliciting = True
                if frame.epoch != epoch:
                    raise KeyUpdateError(f"key update to epoch {frame.epoch} in a record of epoch {epoch}")
            elif isinstance(frame, wire.CloseFrame):
                self._on_close(frame)
                return
            elif isinstance(frame, wire.ClientAuthFrame):
                ack_eliciting = True
                if self.is_client:
                    raise ProtocolViolation("CLIENT_AUTH frame from the server")
                if frame.static_key != self.peer_static_key:    # the proven key repeated is ignored
                    raise ProtocolViolation("CLIENT_AUTH frame with another key than the handshake's")
            elif isinstance(frame, wire.ResetTokenFrame):
                ack_eliciting = True
                if not self.is_client:
                    raise ProtocolViolation("RESET_TOKEN frame from the client")
                self._reset_token = frame.token
        if ack_eliciting:
            self._ack_eliciting_received(pn, now)
        self._check_finished(now)

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
            nxt = self._recv_next or current.next()
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

    def _on_stream(self, frame: wire.StreamFrame) -> None:
        self._on_stream_data(frame.offset, frame.data, frame.fin)

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
        if frame.ranges[0][1] >= self._next_pn:
            raise ProtocolViolation(f"ack of packet {frame.ranges[0][1]} that was never sent")
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

    def _on_close(self, frame: wire.CloseFrame) -> None:
        clean = frame.code == CloseCode.NO_ERROR and self._recv.finished
        if clean:
            self._finish(Event.FINISHED, ConnectionClosed(frame.code, frame.reason, by_peer=True, error=False))
            return
        reason = frame.reason
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
        return when

    def handle_timer(self, now: float) -> None:
        if self.state == State.CLOSED:
            return
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            seconds = self.config.handshake_timeout
            seen = self._client_hs.failure_reason() if self._client_hs is not None else None
            if seen is not None:       # the most informative reply, now that nothing better came
                info = ConnectionClosed(CloseCode.HANDSHAKE_FAILED, f"{seen} (no acceptable server hello "
                                        f"within {seconds:g} s)", error=True)
            else:
                info = ConnectionClosed(CloseCode.HANDSHAKE_TIMEOUT, f"handshake timed out after {seconds:g} s")
            self._finish(Event.TIMEOUT, info)
            return
        if self.state == State.ENCRYPTED and now >= self._last_activity + self.config.idle_timeout:
            self._finish(Event.TIMEOUT, ConnectionClosed(
                CloseCode.IDLE_TIMEOUT, f"no record from the peer for {self.config.idle_timeout:g} s"))
            return
        if self._draining_until is not None and now >= self._draining_until:
            self._finish(Event.FINISHED, ConnectionClosed(CloseCode.NO_ERROR))
            return
        if self._hello_next is not None and now >= self._hello_next:
            self._client_hs.new_cookie = False
            self._out.append(self._client_hs.hello_record)
            self._hello_interval *= 2
            self._hello_next = now + self._hello_interval
        if self.state != State.ENCRYPTED:
            return
        if self.config.keepalive and now >= self._last_activity + self.config.keepalive \
                and not self._recovery.ack_eliciting_in_flight:
            self._ping_due = True
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
                                                   or self._ping_due or self._draining_until is not None
                                                   or self._client_auth is not None or self._reset_token_due) \
                    and self._send_stream_run(now, out):
                continue
            frames: List[bytes] = []
            descs: list = []
            if self._ack_deadline is not None and (self._ack_deadline <= now or self._ack_can_ride()):
                frames.append(wire.encode_ack(self._received.ack_ranges(wire.MAX_ACK_RANGES)))
                self._ack_deadline = None
                self._ack_eliciting_unacked = 0
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
                (min(send.end, self._peer_max_data) - start) // chunk)
        if n < 2:
            return False
        stop = start + n * chunk
        fin = send.fin_requested and stop == send.end
        key = self._keys.send
        pn = self._next_pn
        buf = key.seal_stream(self.peer_cid, wire.make_seq(key.epoch, pn), send.view(start, stop), start, chunk, fin)
        send.next_offset = stop
        if fin:
            send.fin_sent = True
        self._next_pn = pn + n
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
        if self._reset_token_due:
            self._reset_token_due = False
            frames.append(wire.encode_frame(wire.ResetTokenFrame(reset_token(self.config.reset_key, self.local_cid))))
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

    def _seal_frames(self, frames: List[bytes], descs: list, ack_eliciting: bool, now: float = 0.0) -> bytes:
        if self._client_auth is not None:    # first in every record until one carrying it is acknowledged
            frames = [self._client_auth] + frames
            descs = [(_CLIENT_AUTH,)] + descs
            ack_eliciting = True
        keys = self._keys
        pn = self._next_pn
        self._next_pn += 1
        self._sealed_under_key += 1
        record = keys.send.seal(self.peer_cid, wire.make_seq(keys.send.epoch, pn), b"".join(frames))
        self.stats.records_sent += 1
        self.stats.bytes_sent += len(record)
        self._recovery.on_sent(SentPacket(pn, now, len(record), ack_eliciting, descs, keys.send.epoch))
        return record
