"""QUIC with aioquic (asyncio API), one bidirectional stream per connection.

Tuned to give aioquic its best on this link: datagrams sized to the veth MTU (not the
1200-byte default), 16 MiB connection and stream flow-control windows.  aioquic's stream
writer has no backpressure, so the client waits while more than `SEND_BUFFER` bytes are
unacknowledged in the stream's send buffer (otherwise 256 MiB would sit in memory).
"""
from __future__ import annotations

import asyncio

from bench import common as C
from bench.peers import streams

ALPN = ["stcp-bench"]
WINDOW = 16 * 1024 * 1024
SEND_BUFFER = 4 * 1024 * 1024


def _config(is_client: bool, host: str, args):
    from aioquic.quic.configuration import QuicConfiguration

    cfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=ALPN,
        max_datagram_size=1452 if ":" in host else 1472,   # veth MTU 1500 minus IP+UDP
        max_data=WINDOW,
        max_stream_data=WINDOW,
    )
    if is_client:
        cfg.load_verify_locations(args.cafile)
        cfg.server_name = C.SERVER_NAME
    else:
        cfg.load_cert_chain(args.cert, args.key)
    return cfg


async def start_server(args, handler):
    from aioquic.asyncio import serve

    host, port = C.split_hostport(args.listen)
    if port == 0:
        import socket
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
        port = s.getsockname()[1]
        s.close()
    srv = await serve(host, port, configuration=_config(False, host, args),
                      stream_handler=lambda r, w: asyncio.ensure_future(handler(r, w)))
    return srv, port


class _Conn:
    def __init__(self, cm, proto):
        self.cm, self.proto = cm, proto

    def cipher(self):
        from aioquic.tls import CipherSuite
        return CipherSuite(self.proto._quic.tls.key_schedule.cipher_suite).name

    async def stream(self):
        return await self.proto.create_stream()

    async def drain(self, writer):
        quic = self.proto._quic
        sid = writer.get_extra_info("stream_id")
        stream = quic._streams.get(sid)
        while stream is not None:
            snd = stream.sender
            if snd._buffer_stop - snd._buffer_start <= SEND_BUFFER:
                return
            await asyncio.sleep(0.0002)

    async def close(self):
        self.proto.close()  # sends CONNECTION_CLOSE

    async def wait_closed(self):
        # What `async with connect(...)` does on exit: wait out the draining period, then
        # close the UDP socket.
        await self.cm.__aexit__(None, None, None)


async def connect(args):
    from aioquic.asyncio import connect as qconnect

    host, port = C.split_hostport(args.connect)
    cm = qconnect(host, port, configuration=_config(True, host, args))
    proto = await cm.__aenter__()
    return _Conn(cm, proto)


def available() -> str | None:
    try:
        import aioquic  # noqa: F401
    except ImportError as e:
        return f"aioquic is not installed ({e}); `pip install -e '.[bench]'`"
    return None


def main(argv=None) -> None:
    C.run_main(lambda a: streams.run_server(start_server, a),
               lambda a: streams.run_client(connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
