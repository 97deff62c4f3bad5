"""What a Connection hands the application (Connection.next_event)."""
from __future__ import annotations

from dataclasses import dataclass


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
