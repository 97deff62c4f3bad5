"""What a Connection hands the application (Connection.next_event)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
