"""`stcp connect` (like ncat: stdin to the server, the server's stream to stdout) and
`stcp tunnel` (each local TCP client over its own STCP connection)."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from typing import Any

from ..api import open_connection
from ..errors import STCPError
from ..wire import DEFAULT_PORT
from .common import CHUNK, config_from_args, parse_hostport, splice


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


async def connect(args: Any) -> int:
    host, port = parse_hostport(args.address, DEFAULT_PORT)
    config = config_from_args(args)
    reader, writer = await open_connection(host, port, config=config)
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
    lhost, lport = parse_hostport(args.listen)
    target = parse_hostport(args.to, DEFAULT_PORT)
    config = config_from_args(args)

    async def on_client(tcp_reader: asyncio.StreamReader, tcp_writer: asyncio.StreamWriter) -> None:
        try:
            reader, writer = await open_connection(*target, config=config)
        except (OSError, STCPError) as exc:
            print(f"stcp: tunnel: {exc}", file=sys.stderr)
            tcp_writer.close()
            return
        await splice(reader, writer, tcp_reader, tcp_writer)

    try:
        server = await asyncio.start_server(on_client, lhost, lport)
    except OSError as exc:
        raise STCPError(f"cannot listen on {lhost}:{lport}: {exc.strerror or exc}") from None
    print(f"stcp: tunnel from tcp {lhost}:{lport} to stcp {target[0]}:{target[1]}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # an event, not server.close() under serve_forever(): uvloop's close does not end a
    # serve_forever() that the main task awaits, and the tunnel would ignore SIGTERM
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    return 0
