"""`stcp connect` (like ncat: stdin to the server, the server's stream to stdout) and
`stcp tunnel` (each local TCP client over its own STCP connection), each accepting only
the server key pinned with --server-key, or else the one in the known-hosts file."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from typing import Any, Optional, Tuple

from ..api import StreamReader, StreamWriter, open_connection
from ..connection import Config
from ..errors import HandshakeFailed, STCPError
from ..wire import DEFAULT_PORT
from .common import CHUNK, config_from_args, parse_hostport, splice
from .identity import ServerCheck, client_key


def _stdin_chunks(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """Read stdin in a thread: it may be a file, a pipe or a terminal.

    os.read on the raw descriptor, not sys.stdin.buffer: a daemon thread blocked inside the
    buffered reader holds its lock, and the interpreter aborts at exit (SIGABRT) when the
    connection ends before stdin does."""
    fd = sys.stdin.fileno()
    while True:
        try:
            data = os.read(fd, CHUNK)
        except OSError:
            data = b""
        try:
            loop.call_soon_threadsafe(queue.put_nowait, data)
        except RuntimeError:       # the loop is gone: the command is exiting
            return
        if not data:
            return


async def _open(check: ServerCheck, host: str, port: int, key: Optional[bytes],
                config: Config) -> Tuple[StreamReader, StreamWriter]:
    """open_connection under the command line's server-key policy; a first-used key is
    recorded once connected."""
    reader, writer = await open_connection(host, port, server_key=check.policy(), client_key=key, config=config)
    check.connected(writer.get_extra_info("peer_key"))
    return reader, writer


async def connect(args: Any) -> int:
    host, port = parse_hostport(args.address, DEFAULT_PORT)
    config = config_from_args(args)
    check = ServerCheck(args, host, port)
    reader, writer = await _open(check, host, port, client_key(args), config)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=0)
    threading.Thread(target=_stdin_chunks, args=(loop, queue), daemon=True).start()
    out = sys.stdout.buffer

    async def upload() -> None:
        while True:
            data = await queue.get()
            if not data:
                writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async def download() -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                out.flush()
                return
            out.write(data)

    up = asyncio.create_task(upload())
    try:
        await download()           # raises the connection's own reason if it ends badly
    finally:
        if not up.done():          # the server finished first: stop reading stdin
            up.cancel()
        (upload_error,) = await asyncio.gather(up, return_exceptions=True)
    if isinstance(upload_error, Exception):
        raise upload_error
    writer.write_eof()
    await writer.wait_closed()
    return 0


async def tunnel(args: Any) -> int:
    """Listen for TCP clients; each gets its own STCP connection. A server that presents
    another key than the pinned or recorded one (with no acceptable hello from the right
    one within the handshake timeout) ends the tunnel: every later client would meet it too."""
    lhost, lport = parse_hostport(args.listen)
    target = parse_hostport(args.to, DEFAULT_PORT)
    config = config_from_args(args)
    check = ServerCheck(args, *target)
    key = client_key(args)
    refused: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_client(tcp_reader: asyncio.StreamReader, tcp_writer: asyncio.StreamWriter) -> None:
        try:
            reader, writer = await _open(check, *target, key, config)
        except (OSError, STCPError) as exc:
            tcp_writer.close()
            if isinstance(exc, HandshakeFailed) and check.refused is not None:
                if not refused.done():
                    refused.set_exception(exc)
            else:
                print(f"stcp: tunnel: {exc}", file=sys.stderr)
            return
        error = await splice(reader, writer, tcp_reader, tcp_writer)
        if isinstance(error, STCPError):       # the STCP side ended it (e.g. ACCESS_DENIED): say why
            print(f"stcp: tunnel: {error}", file=sys.stderr, flush=True)

    try:
        server = await asyncio.start_server(on_client, lhost, lport)
    except OSError as exc:
        raise STCPError(f"cannot listen on {lhost}:{lport}: {exc.strerror or exc}") from None
    print(f"stcp: tunnel from tcp {lhost}:{lport} to stcp {target[0]}:{target[1]}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.close)
    async with server:
        serving = asyncio.ensure_future(server.serve_forever())
        await asyncio.wait({serving, refused}, return_when=asyncio.FIRST_COMPLETED)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    if refused.done():
        raise refused.exception()        # type: ignore[misc]
    return 0
