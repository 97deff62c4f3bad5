"""What a Connection hands the application (Connection.next_event)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class HandshakeCompleted:
    suite: int
    duration: float
    peer_key: Optional[bytes] = None   # the peer's proven static key: the server's, or the client's if it sent one


class DataReceived:
    """Stream bytes delivered in order. `chunks` are the pieces as they were decrypted (the
    APIs buffer them as they are); `data` is the same bytes joined, on first use. One receive
    call that delivers many records makes one event: joining them up front copied every byte
    of a bulk transfer once more."""

    __slots__ = ("chunks", "size")

    def __init__(self, data: bytes = b"") -> None:
        self.chunks: List[bytes] = [data]
        self.size = len(data)

    def add(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    @property
    def data(self) -> bytes:
        chunks = self.chunks
        if len(chunks) != 1:
            self.chunks = chunks = [b"".join(chunks)]
        return chunks[0]

    def __eq__(self, other: object) -> bool:
        return type(other) is DataReceived and other.data == self.data

    __hash__ = None     # type: ignore[assignment]   # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return f"DataReceived(data={self.data!r})"


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
