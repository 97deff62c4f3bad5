"""STCP on the socket datapath, client through the blocking API `stcp.connect((host, port), server_key=...)`
(stcp.blocking: sendall / recv / close, context manager, driven in the caller's thread); the
server is the asyncio one of bench.peers.stcp (STCP has no blocking server API).  Same client
tests as the blocking TLS peer."""
from __future__ import annotations

from bench import common as C
from bench.peers import stcp as speer, streams
from bench.peers.tls import blocking_client


def client(args) -> None:
    stcp = speer.import_stcp()
    addr = C.split_hostport(args.connect)
    server_key, config = speer.client_config(args)
    blocking_client(args, lambda: stcp.connect(addr, server_key=server_key, config=config))


def available() -> str | None:
    why = speer.available()
    if why:
        return why
    return None if hasattr(speer.import_stcp(), "connect") else "stcp has no connect yet"


def main(argv=None) -> None:
    C.run_main(lambda a: streams.run_server(speer.start_server, a), client, __doc__, argv)


if __name__ == "__main__":
    main()
