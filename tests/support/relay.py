"""The attacker of issue 11, built from the stcp package itself: an STCP server with a key of
its own that, for each client, opens an unauthenticated connection to the real server and
relays both ways, rewriting b"100" into b"999" on the way up. A client that accepts any
server key ends ENCRYPTED with it and never knows; one that pinned or recorded the real
server's key must refuse it before sending a byte."""
from __future__ import annotations

import asyncio
from typing import Tuple

import stcp


class Relay:
    def __init__(self, target: Tuple[str, int]):
        self.target = target
        self.handled = 0                # clients that got past the relay's handshake
        self.seen = bytearray()         # what they sent, before the rewrite

    async def handler(self, reader, writer) -> None:
        self.handled += 1
        up_r, up_w = await stcp.open_connection(*self.target, server_key=stcp.UNAUTHENTICATED)

        async def upstream() -> None:
            while data := await reader.read(65536):
                self.seen += data
                up_w.write(data.replace(b"100", b"999"))
            up_w.write_eof()

        async def downstream() -> None:
            while data := await up_r.read(65536):
                writer.write(data)
            writer.write_eof()

        await asyncio.gather(upstream(), downstream())
