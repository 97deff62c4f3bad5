"""STCP on the socket datapath, through its asyncio-streams API:
`stcp.start_server(handler, host, port)` and `stcp.open_connection(host, port)`.

Same server handler and client tests as the asyncio TLS and aioquic peers
(bench.peers.streams), so the comparison is transport against transport.
"""
from __future__ import annotations

import socket

from bench import common as C
from bench.peers import streams


def import_stcp():
    # Imported late: `python -m bench.peers.stcp` must not shadow the real package, and
    # run.py asks for availability before anything runs.
    import importlib
    return importlib.import_module("stcp")


def free_udp_port(host: str) -> int:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


async def start_server(args, handler):
    stcp = import_stcp()
    host, port = C.split_hostport(args.listen)
    if port == 0:
        port = free_udp_port(host)
    srv = await stcp.start_server(handler, host, port)
    return srv, port


class _Conn:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def cipher(self):
        return self.writer.get_extra_info("cipher")

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


async def connect(args):
    host, port = C.split_hostport(args.connect)
    r, w = await import_stcp().open_connection(host, port)
    return _Conn(r, w)


def available() -> str | None:
    """None when this peer can run, otherwise why not."""
    try:
        stcp = import_stcp()
    except Exception as e:
        return f"import stcp failed: {e!r}"
    missing = [n for n in ("open_connection", "start_server") if not hasattr(stcp, n)]
    return f"stcp has no {', '.join(missing)} yet" if missing else None


def main(argv=None) -> None:
    C.run_main(lambda a: streams.run_server(start_server, a),
               lambda a: streams.run_client(connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
