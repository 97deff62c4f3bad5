"""`stcp connect` (like ncat: stdin to the server, the server's stream to stdout) and
`stcp tunnel` (each local TCP client over its own STCP connection), each accepting only
the server key pinned with --server-key, or else the one in the known-hosts file."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from typing import Any, Callable, List, Optional, Set, Tuple

from ..api import StreamReader, StreamWriter, open_connection
from ..connection import Config
from ..errors import HandshakeFailed, STCPError
from ..wire import DEFAULT_PORT
from .common import CHUNK, config_from_args, parse_hostport, reset_tcp, splice
from .identity import ServerCheck, client_key
from .progress import Progress


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


class Interruption:
    """SIGINT or SIGTERM while `connect` or `tunnel` runs: remembered, and `on_signal` called
    so the command aborts what it has open (the server learns at once that the transfer is
    incomplete, instead of at its idle timeout) rather than dying mid-stream."""

    def __init__(self, on_signal: Callable[[], None]):
        self.signal: Optional[signal.Signals] = None
        self._on_signal = on_signal
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._caught, sig)

    def _caught(self, sig: signal.Signals) -> None:
        self.signal = sig
        loop = asyncio.get_running_loop()
        for s in (signal.SIGINT, signal.SIGTERM):    # a second signal stops the process outright
            loop.remove_signal_handler(s)
        self._on_signal()

    @property
    def reason(self) -> str:
        return f"interrupted by {self.signal.name if self.signal else 'a signal'}"


async def connect(args: Any) -> int:
    """Exit 0 when both directions finished, 1 on an error, 130 when interrupted (the server is
    told with an abort)."""
    host, port = parse_hostport(args.address, DEFAULT_PORT)
    config = config_from_args(args)
    check = ServerCheck(args, host, port)
    main = asyncio.current_task()
    assert main is not None
    opened: List[Any] = []

    def abort() -> None:
        if opened:
            opened[0].abort(f"client {interruption.reason}")
        else:
            main.cancel()                # still in the handshake: open_connection tidies up
    interruption = Interruption(abort)
    progress = Progress() if getattr(args, "progress", False) else None
    try:
        reader, writer = await _open(check, host, port, client_key(args), config)
        opened.append(writer)
        if progress is not None:
            progress.start()
        await _transfer(reader, writer, progress)
    except (STCPError, OSError, asyncio.CancelledError):
        if interruption.signal is None:
            raise
        print(f"stcp: {interruption.reason}: the connection was aborted", file=sys.stderr)
        return 130
    finally:
        if progress is not None:
            progress.stop()
    return 0


async def _transfer(reader: Any, writer: Any, progress: Optional[Progress]) -> None:
    """stdin to the server, the server's stream to stdout, until both directions finished."""
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
            if progress is not None:
                progress.sent += len(data)
            await writer.drain()

    async def download() -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                out.flush()
                return
            out.write(data)
            if progress is not None:
                progress.received += len(data)

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


async def tunnel(args: Any) -> int:
    """Until SIGINT or SIGTERM (then exit 0): each TCP client over its own STCP connection.
    Stopping aborts the STCP connections in flight (their server learns at once) and resets
    their TCP clients: a relay that was cut short never looks finished. A server that
    presents another key than the pinned or recorded one (with no acceptable hello from the
    right one within the handshake timeout) ends the tunnel: every later client would meet it too."""
    lhost, lport = parse_hostport(args.listen)
    target = parse_hostport(args.to, DEFAULT_PORT)
    config = config_from_args(args)
    check = ServerCheck(args, *target)
    key = client_key(args)
    loop = asyncio.get_running_loop()
    refused: asyncio.Future = loop.create_future()
    relays: Set["asyncio.Task[None]"] = set()

    async def relay(tcp_reader: asyncio.StreamReader, tcp_writer: asyncio.StreamWriter) -> None:
        try:
            reader, writer = await _open(check, *target, key, config)
        except (OSError, STCPError) as exc:
            reset_tcp(tcp_writer)
            if isinstance(exc, HandshakeFailed) and check.refused is not None:
                if not refused.done():
                    refused.set_exception(exc)
            else:
                print(f"stcp: tunnel: {exc}", file=sys.stderr)
            return
        except asyncio.CancelledError:
            reset_tcp(tcp_writer)
            raise
        error = await splice(reader, writer, tcp_reader, tcp_writer)
        if isinstance(error, STCPError):       # the STCP side ended it (e.g. ACCESS_DENIED): say why
            print(f"stcp: tunnel: {error}", file=sys.stderr, flush=True)

    def on_client(tcp_reader: asyncio.StreamReader, tcp_writer: asyncio.StreamWriter) -> None:
        task = loop.create_task(relay(tcp_reader, tcp_writer))
        relays.add(task)
        task.add_done_callback(relays.discard)

    try:
        server = await asyncio.start_server(on_client, lhost, lport)
    except OSError as exc:
        raise STCPError(f"cannot listen on {lhost}:{lport}: {exc.strerror or exc}") from None
    print(f"stcp: tunnel from tcp {lhost}:{lport} to stcp {target[0]}:{target[1]}", file=sys.stderr, flush=True)
    stopping: "asyncio.Future[None]" = loop.create_future()
    Interruption(lambda: stopping.set_result(None))     # called once, on the first signal
    try:
        await asyncio.wait({stopping, refused}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.close()
        for task in list(relays):
            task.cancel()          # splice aborts the STCP connection and resets the TCP client
        await asyncio.gather(*relays, return_exceptions=True)
        await asyncio.sleep(0)     # let the drivers send the CLOSEs the aborts queued
    if refused.done():
        raise refused.exception()        # type: ignore[misc]
    return 0
