"""The fields of a Connection, declared once for the type checker.

Connection (stcp/connection.py) sets them in __init__; its receive path (stcp/receive.py)
and send path (stcp/send.py) are mixins that read and write them. Both mixins derive from
ConnectionFields, so mypy checks every use against one declaration; at run time the class
holds nothing (annotations, and method signatures only under TYPE_CHECKING).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Deque, List, Optional, Tuple

if TYPE_CHECKING:
    from . import wire
    from .budget import MemoryBudget
    from .config import Config
    from .connection import Stats
    from .crypto import RecordKey
    from .errors import STCPError
    from .events import ConnectionClosed, DataReceived
    from .handshake import ClientHandshake, Keys, ServerHandshake
    from .recovery import Recovery
    from .replay import ReceivedPackets
    from .state import Event, State
    from .stream import RecvStream, SendStream


class ConnectionFields:
    config: Config
    is_client: bool
    state: State
    local_cid: int
    peer_cid: int
    suite: int
    events: Deque[object]
    stats: Stats
    close_info: Optional[ConnectionClosed]
    budget: Optional[MemoryBudget]
    peer_static_key: Optional[bytes]
    # keys and packet numbers
    _keys: Keys                        # None until the handshake gives keys; read only after it
    _recv_prev: Optional[RecordKey]
    _recv_next: Optional[RecordKey]
    _next_pn: int
    _skip_at: int
    _pn_plain_below: int
    _skipped: List[int]
    _sealed_under_key: int
    _key_update_allowed: bool
    _key_update_frame_due: bool
    # receiving, acknowledging, recovery
    _received: ReceivedPackets
    _ack_eliciting_unacked: int
    _ack_deadline: Optional[float]
    _recovery: Recovery
    _out: List[wire.DatagramEntry]
    # the stream and its flow control
    _send: SendStream
    _recv: RecvStream
    _charged: int
    _progress_mark: int
    _progress_time: float
    _credit_withheld: bool
    _credit_retry_at: Optional[float]
    _peer_max_data: int
    _max_data_due: bool
    _ping_due: bool
    _small_path: bool                  # the request/response fast paths on (tests turn them off)
    _probes_due: int
    _rx_event: Optional[DataReceived]
    # handshake and ending
    _close_frame: Optional[wire.CloseFrame]
    _draining_until: Optional[float]
    _last_activity: float
    _handshake_deadline: Optional[float]
    _hello_next: Optional[float]
    _client_hs: Optional[ClientHandshake]
    _server_hs: Optional[ServerHandshake]
    _client_auth: Optional[bytes]
    _reset_token: Optional[bytes]
    _reset_token_due: bool
    _reset_token_acked: bool

    if TYPE_CHECKING:
        # Connection's methods the mixins call (defined in stcp/connection.py, or the other mixin)
        def _account(self) -> None: ...
        def _grant_credit(self) -> bool: ...
        def _finish(self, event: Event, info: ConnectionClosed) -> None: ...
        def _fail(self, exc: STCPError, now: float) -> None: ...
        def _receive_handshake(self, record: bytes, now: float) -> None: ...
        def _server_confirms(self, plaintext: bytes) -> None: ...
        def _keys_confirmed(self, now: float) -> None: ...
        def _check_finished(self, now: float) -> None: ...
        def _on_ack(self, ranges: Tuple[Tuple[int, int], ...], delay_us: int, now: float) -> None: ...
