"""STCP on the socket datapath with client authentication: the server admits only the
run's client key (`allowed_clients=`), the client proves it (CLIENT_AUTH: one X25519 more
per side) and pins the server's key. Like for like with bench.peers.tls_asyncio_mtls
(TLS 1.3 with client certificates); otherwise the `stcp` peer."""
from __future__ import annotations

from bench import common as C
from bench.peers import stcp as speer, streams


async def start_server(args, handler):
    return await speer.start_server(args, handler, client_auth=True)


async def connect(args):
    return await speer.connect(args, client_auth=True)


def available() -> str | None:
    return speer.available()


def main(argv=None) -> None:
    C.run_main(lambda a: streams.run_server(start_server, a),
               lambda a: streams.run_client(connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
