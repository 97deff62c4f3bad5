"""STCP servers and traffic on loopback: an echo handler, a server on its own event-loop
thread (for the blocking API, and the `stcp_server` fixture), whole echo transfers, and
waiting for a server's connections to end."""
from __future__ import annotations

import asyncio
import threading
from typing import Optional

import stcp
from stcp.connection import Connection
from stcp.exchange import exchange
from tests.support.poll import await_until


async def echo(reader, writer):
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.close()


async def quiet(server, timeout: float = 5.0) -> None:
    await await_until(lambda: not server.endpoint.connections, timeout, "the server's connections to end")


async def echo_transfer(host: str, port: int, data: bytes, server_key, config=None) -> bytes:
    reader, writer = await stcp.open_connection(host, port, server_key=server_key, config=config)
    return await exchange(reader, writer, data)


async def transfer(port: int, payload: bytes, server_key, **kw) -> Connection:
    r, w = await asyncio.wait_for(stcp.open_connection("127.0.0.1", port, server_key=server_key, **kw), 10)
    w.write(payload)
    w.write_eof()
    got = await asyncio.wait_for(r.read(), 20)
    assert got == payload
    await asyncio.wait_for(w.wait_closed(), 10)
    return w.connection


class ServerThread:
    """An STCP server on its own event-loop thread, until close(): a client in the test's
    thread (blocking API, or an asyncio loop of its own) talks to it over loopback."""

    def __init__(self, handler=echo, host: str = "127.0.0.1", port: int = 0, config: Optional[object] = None,
                 server_key: Optional[bytes] = None):
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(stcp.start_server(handler, host, port, config=config,
                                                                     server_key=server_key))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple:
        return self.server.sockets[0].getsockname()[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def public_key(self) -> bytes:
        return self.server.public_key

    def call(self, fn, *args):
        """fn(*args) on the server's loop (a coroutine function's result awaited); its result."""
        async def run():
            r = fn(*args)
            return await r if asyncio.iscoroutine(r) else r
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        async def shut():
            self.server.close()
            await self.server.wait_closed()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            if rest:
                await asyncio.wait(rest, timeout=5)
        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self.loop.close()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
