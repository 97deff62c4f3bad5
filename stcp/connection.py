"""One STCP connection, sans-IO: datagrams and `now` in; datagrams, a timer and events out.

No socket, thread or clock lives here (the style of h11 and aioquic). A datapath feeds
`receive_datagram`, sends what `datagrams_to_send` returns, calls `handle_timer` when
`get_timer` says so, and hands `next_event` results to the application.
"""
from __future__ import annotations

import hmac
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

from . import wire
from .budget import PROGRESS_BYTES, MemoryBudget
from .config import Config
from .crypto import RecordKey
from .errors import AccessDenied, CloseCode, NotEncrypted, STCPError
from .events import ConnectionClosed, DataReceived, HandshakeCompleted, KeyUpdated, StreamFinished
from .handshake import ClientHandshake, KeySource, ServerHandshake
from .identity import fingerprint
from .receive import DISCARD_REASONS, Discard, ReceivePath, printable
from .recovery import STREAM as _STREAM, Recovery
from .replay import ReceivedPackets
from .send import SendPath, skip_gap
from .state import Event, State, transition
from .stream import RecvStream, SendStream

_ENCRYPTED = State.ENCRYPTED

__all__ = ["Config", "Connection", "Stats", "ConnectionShed", "DISCARD_REASONS", "printable",
           "HandshakeCompleted", "DataReceived", "StreamFinished", "KeyUpdated", "ConnectionClosed"]


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
    # from an address other than the peer's, handshake-class records that are not a repeat,
    # or what no sender may send (PROTOCOL.md §10.2)
    discarded: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(DISCARD_REASONS, 0))
    key_updates_sent: int = 0
    key_updates_received: int = 0
    handshake_hints_ignored: int = 0          # client: unverifiable replies during KEY_EXCHANGE
    client_auth_missing: int = 0              # server with an allow list: a keyless client (ACCESS_DENIED)
    rtt_samples: List[float] = field(default_factory=list)


_DRAIN_PTOS = 3
_CREDIT_RETRY = 0.2        # seconds between tries of a credit grant the memory budget postponed


class ConnectionShed(STCPError):
    code = CloseCode.INTERNAL_ERROR


class Connection(ReceivePath, SendPath):
    """One connection. The receive path (stcp/receive.py) and the send path (stcp/send.py)
    are mixins over the state set up here."""

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
        self._out = []
        self._keys = None  # type: ignore[assignment]  # until the handshake: only then is it read
        self._recv_prev: Optional[RecordKey] = None
        self._recv_next: Optional[RecordKey] = None
        self._next_pn = 1
        self._skip_at = 1 + skip_gap()            # the next packet number to leave out
        self._pn_plain_below = self._skip_at       # SendPath._take_pns says what it means
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
        self._hello_next = None
        self._hello_interval = config.hello_retransmit
        self._rx_event: Optional[DataReceived] = None   # the DataReceived still being added to
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
    def server(cls, config: Config, hello_record: bytes, hello: wire.Hello, now: float,
               take_key: Optional[KeySource] = None) -> "Connection":
        """Accept a client hello; raises handshake.Rejected if it cannot be served. take_key:
        the ephemeral key's source (ServerEndpoint passes its stcp.keypool's)."""
        if config.identity is None:
            raise ValueError("a server connection needs its static key (Config.static_key)")
        conn = cls(config, False, now)
        conn.suite = hello.suite
        conn.peer_cid = hello.sender_cid
        hs = conn._server_hs = ServerHandshake(config.identity, hello_record, hello, conn.local_cid,
                                               config.accepted_suites, take_key)
        conn._server_hello, conn._keys = hs.record, hs.keys
        conn._hello_record = wire.client_hello_transcript_form(hello_record)
        conn._reset_token_due = True
        conn._set_state(Event.RECV_HELLO)
        conn._out.append(conn._server_hello)
        return conn

    # --- application side --------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.state is not _ENCRYPTED:
            self._require_encrypted("send data")
        if self._close_frame is not None or self._draining_until is not None:
            raise NotEncrypted("the connection is closing; no more data can be sent")
        send = self._send
        end = send.end
        send.write(data)
        budget = self.budget
        if budget is not None:       # a server's connection (a client has no budget)
            # _account, incrementally: every public call leaves _charged equal to what the
            # connection holds, and a write adds exactly what it appended to the send buffer
            budget.used += send.end - end
            self._charged += send.end - end

    def shutdown_write(self) -> None:
        """Finish the sending direction (half-close); data already written is still delivered."""
        self._require_encrypted("finish the stream")
        self._send.finish()

    def consume(self, n: int) -> bool:
        """The application has read n delivered bytes: flow-control credit may be returned.
        True when it is due now (the connection has a MAX_DATA to send)."""
        recv = self._recv
        recv.on_consumed(n)
        if recv.credit_due():
            due = self._grant_credit()
        else:                          # the common case: _grant_credit's first step, inline
            self._credit_withheld = due = False
        budget = self.budget
        if budget is not None and self.state is not State.CLOSED:
            # _account, incrementally (see send): reading frees exactly n delivered bytes
            budget.used -= n
            self._charged -= n
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
            recv, send = self._recv, self._send
            held = 0 if self.state is State.CLOSED else \
                recv.held + recv.delivered_to - recv.consumed + send.end - send.acked_to   # footprint
            if held != self._charged:
                budget.used += held - self._charged
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

    def port_unreachable(self, now: float) -> None:
        """The network answered this client's hello with ICMP "port unreachable" (the socket
        reported ECONNREFUSED). While the handshake has heard nothing from the server this ends
        it at once, as TCP ends a connection attempt (RFC 1122 4.2.3.9: port unreachable is a
        hard error): waiting out the handshake timeout tells the user nothing more. Once a
        server has answered, or once ENCRYPTED, it is ignored: only authenticated records end
        a connection that has a peer (PROTOCOL.md section 10.2)."""
        hs = self._client_hs
        if not self.is_client or self.state != State.KEY_EXCHANGE or hs is None or hs.hints:
            return
        self._finish(Event.FAILURE, ConnectionClosed(
            CloseCode.PORT_UNREACHABLE, "the host answered 'port unreachable'", error=True))

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

    def next_event(self) -> Optional[object]:
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

    # --- handshake (PROTOCOL.md §4, §5) ---------------------------------------
    def _receive_handshake(self, record: bytes, now: float) -> None:
        """A handshake-class record (seq 0). It is unauthenticated, so it ends nothing (§10.2):
        a client in KEY_EXCHANGE takes it as a reply to its hello, a verdict only if it is a
        server hello that verifies; a server connection answers a repeat of the hello that made
        it (compared as CH': a repeat that only adds or changes the cookie is the same hello)
        while its own server hello may have been lost; an ENCRYPTED client ends on a RESET
        carrying its token. Anything else is discarded and counted (`handshake`), in any state
        and from any address."""
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
        raise Discard("handshake", f"handshake record at a server connection in state {self.state.value}")

    def _client_handshake_record(self, record: bytes, now: float) -> None:
        if self.state == State.KEY_EXCHANGE:
            hs = self._client_hs
            assert hs is not None                 # a client in KEY_EXCHANGE has its handshake
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
            raise Discard("handshake", f"handshake record at a client in state {self.state.value}")

    def _resend_hello(self, now: float) -> None:
        """A COOKIE changed the hello: send it at once, at most every 100 ms."""
        hs = self._client_hs
        assert hs is not None
        hs.new_cookie = False
        self._cookie_resend_at = now + 0.1
        self._out.append(hs.hello_record)

    def _server_confirms(self, plaintext: bytes) -> None:
        """Server in KEY_EXCHANGE, the client's first authenticated record: check its
        CLIENT_AUTH (PROTOCOL.md section 5.6); raises for a bad proof, a key not on the allow
        list, or no CLIENT_AUTH at a server with one. A client with a key starts every record
        with CLIENT_AUTH until one is acknowledged, and nothing is acknowledged before this
        point, so an authenticated record without it comes from a client that has no key."""
        allowed = self.config.allowed_clients
        if len(plaintext) >= wire.CLIENT_AUTH_FRAME_LEN and plaintext[0] == wire.FRAME_CLIENT_AUTH:
            frame = wire.decode_frames(plaintext[:wire.CLIENT_AUTH_FRAME_LEN])[0]
            assert isinstance(frame, wire.ClientAuthFrame) and self._server_hs is not None
            self._server_hs.verify_client_auth(frame)
            if allowed is not None and frame.static_key not in allowed:
                raise AccessDenied(f"client key {fingerprint(frame.static_key)} is not allowed")
            self.peer_static_key = frame.static_key
        elif allowed is not None:
            self.stats.client_auth_missing += 1
            raise AccessDenied("this server admits only listed client keys, and the client proved none")

    def _keys_confirmed(self, now: float) -> None:
        self._set_state(Event.KEYS_CONFIRMED)
        self._handshake_deadline = None
        self._last_activity = now
        if self._server_hs is not None:
            self._server_hs.finish()
            self._server_hs = None
        self._grant_credit()
        self.events.append(HandshakeCompleted(self.suite, now - self._created, self.peer_static_key))

    def _check_finished(self, now: float) -> None:
        """Both directions done: say goodbye and linger a little to re-ack a lost final ack."""
        if self._draining_until is None and self.state == State.ENCRYPTED \
                and self._send.all_acked and self._recv.finished:
            self._close_frame = wire.CloseFrame(CloseCode.NO_ERROR, "")
            self._draining_until = now + _DRAIN_PTOS * self._recovery.pto_interval()
            self._report_closed(ConnectionClosed(CloseCode.NO_ERROR))

    # --- timers ------------------------------------------------------------
    def get_timer(self) -> Optional[float]:
        if self.state is not _ENCRYPTED:
            if self.state == State.CLOSED:
                return None
            candidates = (self._handshake_deadline, self._hello_next)
            return min((t for t in candidates if t is not None), default=None)
        # ENCRYPTED: the idle deadline always exists; the rest only sometimes
        config = self.config
        last = self._last_activity
        when = last + config.idle_timeout
        recovery = self._recovery
        if config.keepalive and not recovery.ack_eliciting_in_flight and last + config.keepalive < when:
            when = last + config.keepalive
        t = self._ack_deadline
        if t is not None and t < when:
            when = t
        t = self._draining_until
        if t is None:
            t = recovery.timer()
        # draining: nothing is probed (a lost CLOSE costs nothing, the peer finishes on its own
        # once it has our acks); only the peer's retransmissions are answered
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
        hs = self._client_hs                  # set while the client's hello is unanswered
        if self._hello_next is not None and now >= self._hello_next and hs is not None:
            hs.new_cookie = False
            self._out.append(hs.hello_record)
            self._hello_interval *= 2
            self._hello_next = now + self._hello_interval
        if self.state != State.ENCRYPTED:
            return
        if self.config.keepalive and now >= self._last_activity + self.config.keepalive \
                and not self._recovery.ack_eliciting_in_flight:
            self._ping_due = True
        if self._credit_withheld and now >= (self._credit_retry_at or 0.0):
            budget = self.budget              # credit is withheld only under a budget
            if budget is not None and budget.exhausted and budget.shed_hook is not None:
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
