"""TLS 1.3 over kernel TCP with asyncio streams and client certificates (mutual TLS): the
server requires a certificate chaining to the run's CA and verifies it, the client
presents one and verifies the server's. Like for like with bench.peers.stcp_cauth;
otherwise the `tls_asyncio` peer."""
from __future__ import annotations

import ssl

from bench import common as C
from bench.peers import streams, tls_asyncio as plain
from bench.peers.tls import client_context, server_context


def mutual_server_context(args) -> ssl.SSLContext:
    ctx = server_context(args)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(args.client_ca)
    return ctx


def mutual_client_context(args) -> ssl.SSLContext:
    ctx = client_context(args)
    ctx.load_cert_chain(args.client_cert, args.client_key)
    return ctx


async def start_server(args, handler):
    return await plain.start_server(args, handler, mutual_server_context(args))


async def connect(args):
    return await plain.connect(args, mutual_client_context)


available = plain.available


def main(argv=None) -> None:
    C.run_main(lambda a: streams.run_server(start_server, a),
               lambda a: streams.run_client(connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
