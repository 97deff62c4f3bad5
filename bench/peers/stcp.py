"""STCP on the socket datapath, through its asyncio-streams API:
`stcp.start_server(handler, host, port, server_key=KEY)` and
`stcp.open_connection(host, port, server_key=PUBLIC)`: the client pins the server's key,
as the TLS clients verify the server's certificate chain.

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


async def start_server(args, handler, client_auth: bool = False):
    """The server under the run's key; with client_auth, admitting only the run's client key."""
    stcp = import_stcp()
    keys = C.stcp_keys(args)
    host, port = C.split_hostport(args.listen)
    if port == 0:
        port = free_udp_port(host)
    srv = await stcp.start_server(handler, host, port, server_key=keys["server_key"],
                                  allowed_clients=keys["allowed_clients"] if client_auth else None)
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


_client: dict = {}


def client_config(args, client_auth: bool = False):
    """(pinned server key, Config) of this client, made once: with client_auth the Config
    holds the client's key, so its public half is derived once, not per connection."""
    if client_auth not in _client:
        stcp = import_stcp()
        keys = C.stcp_keys(args)
        static = stcp.api.private_key(keys["client_key"], "client key") if client_auth else None
        _client[client_auth] = (keys["server_public"], stcp.make_config(static_key=static))
    return _client[client_auth]


async def connect(args, client_auth: bool = False):
    host, port = C.split_hostport(args.connect)
    server_key, config = client_config(args, client_auth)
    r, w = await import_stcp().open_connection(host, port, server_key=server_key, config=config)
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
