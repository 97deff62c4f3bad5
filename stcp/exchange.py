"""Both directions of one stream connection at once: write a payload while reading what
comes back, as a client of an echo server does (`stcp demo`, the tests).

Writing all before reading would deadlock against an echo server once its send window and
our receive buffer fill; so the upload runs as a task beside the read.
"""
from __future__ import annotations

import asyncio
from typing import Protocol

CHUNK = 1 << 20               # one write (and drain) per MiB: flow control without a copy of it all


class Reader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...

    async def wait_closed(self) -> None: ...


async def exchange(reader: Reader, writer: Writer, data: bytes) -> bytes:
    """Send data and end the stream while reading the peer's bytes to their end; those
    bytes, once the connection has closed (an open_connection() pair, say)."""

    async def upload() -> None:
        for i in range(0, len(data), CHUNK):
            writer.write(data[i:i + CHUNK])
            await writer.drain()
        writer.write_eof()

    up = asyncio.create_task(upload())
    try:
        received = await reader.read()
    except BaseException:
        up.cancel()
        raise
    await up
    await writer.wait_closed()
    return received
