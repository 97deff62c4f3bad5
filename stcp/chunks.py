"""Received stream bytes kept as the pieces they arrived in, for the readers of both APIs."""
from __future__ import annotations

from collections import deque
from typing import Deque, Iterable


class ChunkBuffer:
    """Received bytes as the chunks they arrived in. A read takes from the first chunk only
    (copying nothing when it wants the whole chunk); readexactly joins what it needs."""

    __slots__ = ("chunks", "size", "head")

    def __init__(self) -> None:
        self.chunks: Deque[bytes] = deque()
        self.size = 0
        self.head = 0            # bytes of chunks[0] already taken

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.size += len(data)

    def extend(self, pieces: Iterable[bytes]) -> None:
        for data in pieces:
            if data:
                self.chunks.append(data)
                self.size += len(data)

    def take_some(self, n: int) -> bytes:
        """Up to n bytes from the first chunk, removed (at least one byte if any is buffered)."""
        first, head = self.chunks[0], self.head
        if head == 0 and len(first) <= n:
            self.chunks.popleft()
            self.size -= len(first)
            return first
        data = first[head:head + n]
        self.head = head + len(data)
        if self.head == len(first):
            self.chunks.popleft()
            self.head = 0
        self.size -= len(data)
        return data

    def take(self, n: int) -> bytes:
        """Exactly min(n, size) bytes, removed."""
        piece = self.take_some(n)
        if len(piece) == n or not self.size:
            return piece
        out = [piece]
        want = n - len(piece)
        while want and self.size:
            piece = self.take_some(want)
            out.append(piece)
            want -= len(piece)
        return b"".join(out)

    def find(self, sep: bytes, start: int) -> int:
        if len(self.chunks) > 1 or self.head:     # a separator may span chunks: search one piece
            joined = self.take(self.size)
            self.chunks.append(joined)
            self.size = len(joined)
        return self.chunks[0].find(sep, start) if self.chunks else -1
