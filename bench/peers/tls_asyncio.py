"""TLS 1.3 over kernel TCP with asyncio streams (`asyncio.start_server` / `open_connection`
with an `ssl.SSLContext`).  Full handshakes only (no tickets, no resumption)."""
from __future__ import annotations

import asyncio
import socket

from bench import common as C
from bench.peers import streams
from bench.peers.tls import client_context, server_context

# asyncio's default buffer limits (64 KiB) are kept: larger ones measured slower here
# (more copying in StreamReader's buffer), 180-240 MB/s against 370-410 MB/s on loopback.


def tune(writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        tune(writer)

    def cipher(self):
        return self.writer.get_extra_info("cipher")[0]

    async def stream(self):
        return self.reader, self.writer

    async def drain(self, writer):
        await writer.drain()

    async def close(self):
        self.writer.close()

    async def wait_closed(self):
        try:
            await self.writer.wait_closed()
        except (OSError, ConnectionError):
            pass


async def start_server(args, handler, ctx=None):
    ctx = ctx or server_context(args)
    host, port = C.split_hostport(args.listen)
    async def tuned(r, w):
        tune(w)
        await handler(r, w)

    srv = await asyncio.start_server(tuned, host, port, ssl=ctx, backlog=128)
    return srv, srv.sockets[0].getsockname()[1]


_ctx: dict = {}


async def connect(args, make_context=client_context):
    """A connection; the client's SSLContext (from make_context) is made once per process."""
    if make_context not in _ctx:
        _ctx[make_context] = make_context(args)
    host, port = C.split_hostport(args.connect)
    r, w = await asyncio.open_connection(host, port, ssl=_ctx[make_context], server_hostname=C.SERVER_NAME)
    return _Conn(r, w)


def available() -> str | None:
    return None


def main(argv=None) -> None:
    C.run_main(lambda a: streams.run_server(start_server, a),
               lambda a: streams.run_client(connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
