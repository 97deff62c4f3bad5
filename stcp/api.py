"""The user API: asyncio streams (`open_connection`, and the reader and writer a server's
handler gets from stcp.server) and a blocking socket-like `connect`, shaped like their
asyncio and `socket` namesakes.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from collections import deque
from typing import Deque, List, Optional, Tuple

from . import wire
from .connection import (Config, Connection, ConnectionClosed, DataReceived, HandshakeCompleted,
                         StreamFinished)
from .datapath.socket import ClientDriver, Driver, resolve
from .errors import CloseCode, ConnectionTerminated, HandshakeTimeout, STCPError

DEFAULT_PORT = 7443
WRITE_HIGH_WATER = 4 << 20     # drain() waits while more than this is unacknowledged


def make_config(cipher: Optional[str] = None, **overrides) -> Config:
    if cipher is not None:
        if cipher not in wire.SUITES:
            raise ValueError(f"unknown cipher {cipher!r}; choose one of {', '.join(wire.SUITES)}")
        overrides["suite"] = wire.SUITES[cipher]
    return Config(**overrides)


def _closed_error(info: ConnectionClosed) -> Optional[Exception]:
    """The exception an application sees for how the connection ended, or None if it ended well."""
    if not info.error and info.code in (CloseCode.NO_ERROR,):
        return None
    if info.code == CloseCode.HANDSHAKE_TIMEOUT:
        return None    # reported by open_connection as HandshakeTimeout
    return ConnectionTerminated(info.code, info.reason, by_peer=info.by_peer)


class ConnectionHandle:
    """Glue between one sans-IO Connection and its reader/writer."""

    def __init__(self, driver: Driver, conn: Connection):
        self.driver = driver
        self.conn = conn
        self.loop = driver.loop
        self.reader = StreamReader(self)
        self.writer = StreamWriter(self)
        self.established = self.loop.create_future()
        self.closed = self.loop.create_future()
        self._drain_waiters: List[asyncio.Future] = []
        driver.hooks[conn] = self

    def process_events(self) -> None:
        conn = self.conn
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, DataReceived):
                self.reader._feed(ev.data)
            elif isinstance(ev, StreamFinished):
                self.reader._feed_eof()
            elif isinstance(ev, HandshakeCompleted):
                if not self.established.done():
                    self.established.set_result(ev)
            elif isinstance(ev, ConnectionClosed):
                self._on_closed(ev)
        if self._drain_waiters and conn.send_buffered <= WRITE_HIGH_WATER:
            self._wake_drainers(None)

    def _on_closed(self, info: ConnectionClosed) -> None:
        exc = _closed_error(info)
        if not self.established.done():
            if info.code == CloseCode.HANDSHAKE_TIMEOUT:
                self.established.set_exception(HandshakeTimeout(self.conn.config.handshake_timeout))
            else:
                self.established.set_exception(exc or ConnectionTerminated(info.code, info.reason, info.by_peer))
            self.established.exception()       # retrieved: no "never retrieved" noise
        if exc is not None:
            self.reader._set_exception(exc)
        else:
            self.reader._feed_eof()
        self._wake_drainers(exc)
        if not self.closed.done():
            self.closed.set_result(info)

    def _wake_drainers(self, exc: Optional[Exception]) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                if exc is None:
                    w.set_result(None)
                else:
                    w.set_exception(exc)

    def touch(self) -> None:
        self.driver.touch(self.conn)


class _ChunkBuffer:
    """Received bytes as the chunks they arrived in. A read takes from the first chunk only
    (copying nothing when it wants the whole chunk); readexactly joins what it needs."""

    __slots__ = ("chunks", "size", "head")

    def __init__(self) -> None:
        self.chunks: Deque[bytes] = deque()
        self.size = 0
        self.head = 0            # bytes of chunks[0] already taken

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes) -> None:
        if data:
            self.chunks.append(data)
            self.size += len(data)

    def take_some(self, n: int) -> bytes:
        """Up to n bytes from the first chunk, removed (at least one byte if any is buffered)."""
        first, head = self.chunks[0], self.head
        if head == 0 and len(first) <= n:
            self.chunks.popleft()
            self.size -= len(first)
            return first
        data = first[head:head + n]
        self.head = head + len(data)
        if self.head == len(first):
            self.chunks.popleft()
            self.head = 0
        self.size -= len(data)
        return data

    def take(self, n: int) -> bytes:
        """Exactly min(n, size) bytes, removed."""
        piece = self.take_some(n)
        if len(piece) == n or not self.size:
            return piece
        out = [piece]
        want = n - len(piece)
        while want and self.size:
            piece = self.take_some(want)
            out.append(piece)
            want -= len(piece)
        return b"".join(out)

    def find(self, sep: bytes, start: int) -> int:
        if len(self.chunks) > 1 or self.head:     # a separator may span chunks: search one piece
            joined = self.take(self.size)
            self.chunks.append(joined)
            self.size = len(joined)
        return self.chunks[0].find(sep, start) if self.chunks else -1


class StreamReader:
    """Reads the peer's byte stream; reading returns flow-control credit to the peer."""

    def __init__(self, handle: ConnectionHandle):
        self._handle = handle
        self._buffer = _ChunkBuffer()
        self._eof = False
        self._exception: Optional[Exception] = None
        self._waiter: Optional[asyncio.Future] = None

    def _feed(self, data: bytes) -> None:
        self._buffer.append(data)
        self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _set_exception(self, exc: Exception) -> None:
        self._exception = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    def _consumed(self, n: int) -> None:
        # a loop pass to flush only when reading made a window update due, not on every read
        if n and self._handle.conn.consume(n):
            self._handle.touch()

    async def _wait(self) -> None:
        if self._exception is not None:
            raise self._exception
        self._waiter = self._handle.loop.create_future()
        await self._waiter

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    def exception(self) -> Optional[Exception]:
        return self._exception

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all until EOF if n < 0); b"" at end of stream. Like a socket recv it may
        return less than is buffered: one received piece at a time, uncopied where it fits."""
        if n == 0:
            return b""
        if n < 0:
            chunks = []
            while True:
                chunk = await self.read(1 << 20)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        while not self._buffer and not self._eof:
            await self._wait()
        if not self._buffer and self._exception is not None:
            raise self._exception
        if not self._buffer:
            return b""
        data = self._buffer.take_some(n)
        self._consumed(len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        if n <= 0:
            return b""
        while len(self._buffer) < n:
            if self._eof:
                partial = self._take_all()
                raise asyncio.IncompleteReadError(partial, n)
            await self._wait()
        data = self._buffer.take(n)
        self._consumed(n)
        return data

    def _take_all(self) -> bytes:
        data = self._buffer.take(len(self._buffer)) if self._buffer else b""
        self._consumed(len(data))
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        start = 0
        while True:
            i = self._buffer.find(separator, start)
            if i >= 0:
                return await self.readexactly(i + len(separator))
            start = max(0, len(self._buffer) - len(separator) + 1)
            if self._eof:
                raise asyncio.IncompleteReadError(self._take_all(), None)
            await self._wait()

    async def readline(self) -> bytes:
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class StreamWriter:
    def __init__(self, handle: ConnectionHandle):
        self._handle = handle

    @property
    def connection(self) -> Connection:
        return self._handle.conn

    def write(self, data: bytes) -> None:
        if data:
            handle = self._handle
            handle.conn.send(bytes(data))
            handle.driver.flush_now(handle.conn)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Finish the sending direction; the peer reads EOF once it has every byte."""
        conn = self._handle.conn
        if not conn.is_closed and not conn.write_finished:
            conn.shutdown_write()
            self._handle.touch()

    async def drain(self) -> None:
        handle = self._handle
        if handle.closed.done():
            exc = _closed_error(handle.closed.result())
            if exc is not None:
                raise exc
            return
        if handle.conn.send_buffered <= WRITE_HIGH_WATER:
            return
        fut = handle.loop.create_future()
        handle._drain_waiters.append(fut)
        await fut

    def close(self) -> None:
        """Finish writing and let the connection close once the peer has finished too."""
        conn = self._handle.conn
        if conn.is_closed:
            return
        self.write_eof()

    def abort(self, reason: str = "") -> None:
        """End the connection at once; unsent data is discarded and the peer told why."""
        self._handle.conn.close(CloseCode.APPLICATION_ABORT, reason)
        self._handle.touch()

    def is_closing(self) -> bool:
        conn = self._handle.conn
        return conn.is_closed or conn.write_finished

    async def wait_closed(self) -> None:
        info = await asyncio.shield(self._handle.closed)
        exc = _closed_error(info)
        if exc is not None:
            raise exc

    def get_extra_info(self, name: str, default=None):
        conn = self._handle.conn
        driver = self._handle.driver
        if name == "peername":
            addr = driver.peer_address(conn)
            if addr is None:
                try:
                    addr = driver.sock.getpeername()
                except OSError:
                    addr = None
            return addr
        if name == "sockname":
            return driver.sock.getsockname()
        if name == "cipher":
            return {v: k for k, v in wire.SUITES.items()}[conn.suite]
        if name == "cid":
            return conn.local_cid
        if name == "connection":
            return conn
        return default


# --- client -----------------------------------------------------------------
async def open_connection(host: str, port: int = DEFAULT_PORT, *, config: Optional[Config] = None,
                          cipher: Optional[str] = None) -> Tuple[StreamReader, StreamWriter]:
    """Handshake with an STCP server; return (reader, writer) once the connection is ENCRYPTED."""
    loop = asyncio.get_running_loop()
    config = config or make_config(cipher)
    family, sockaddr = resolve(host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(sockaddr)
    except OSError as exc:
        sock.close()
        raise STCPError(f"cannot reach {host}:{port}: {exc.strerror or exc}") from None
    conn = Connection.client(config, loop.time())
    driver = ClientDriver(loop, sock, conn)
    handle = ConnectionHandle(driver, conn)
    driver.touch(conn)
    try:
        await handle.established
    except HandshakeTimeout as exc:
        if driver.icmp_errors:
            exc.args = (f"{exc.args[0]} (the host answered 'port unreachable': is an STCP server "
                        f"listening on {host}:{port}?)",)
        raise
    except BaseException:
        if not conn.is_closed:
            conn.close(CloseCode.APPLICATION_ABORT, "cancelled")
        driver.close()
        raise
    return handle.reader, handle.writer


# --- blocking API -------------------------------------------------------------
class BlockingConnection:
    """A socket-like STCP connection: sendall, recv, shutdown, close, context manager.

    The connection lives on a private event loop thread. Received bytes are pumped into an
    inbox guarded by a condition variable, so recv() costs one thread wake-up, not a round
    trip through the loop; the pump stops reading (and so stops returning flow-control
    credit) while the inbox holds more than INBOX_LIMIT unread bytes.
    """

    INBOX_LIMIT = 4 << 20

    def __init__(self, address: Tuple[str, int], timeout: Optional[float], config: Optional[Config]):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stcp-connection", daemon=True)
        self._thread.start()
        self.timeout = timeout
        self._cond = threading.Condition()
        self._inbox = _ChunkBuffer()       # shared with the loop thread under _cond
        self._eof = False
        self._error: Optional[BaseException] = None
        host, port = address[0], address[1]
        try:
            self._reader, self._writer = self._call(open_connection(host, port, config=config), None)
            self._room = self._call(self._start_pump(), None)
        except BaseException:
            self._stop()
            raise

    def _call(self, coro, timeout):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise socket.timeout("timed out") from None

    async def _start_pump(self) -> asyncio.Event:
        room = asyncio.Event()
        room.set()
        self._pump_task = asyncio.get_running_loop().create_task(self._pump(room))
        return room

    async def _pump(self, room: asyncio.Event) -> None:
        try:
            while True:
                await room.wait()
                data = await self._reader.read(1 << 20)
                with self._cond:
                    if data:
                        self._inbox.append(data)
                        if len(self._inbox) > self.INBOX_LIMIT:
                            room.clear()
                    else:
                        self._eof = True
                    self._cond.notify_all()
                if not data:
                    return
        except BaseException as exc:     # the connection's end (or cancellation) reaches recv()
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def sendall(self, data: bytes) -> None:
        """Queue data for sending; waits only while more than the write limit is unacknowledged."""
        with self._cond:
            if self._error is not None and not isinstance(self._error, asyncio.CancelledError):
                raise self._error
        # call_soon keeps writes and shutdown() in the order the application made them
        self._loop.call_soon_threadsafe(self._write, data)
        if self._writer.connection.send_buffered + len(data) > WRITE_HIGH_WATER:
            self._call(self._writer.drain(), self.timeout)

    def _write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except STCPError as exc:          # reported by the next sendall() or recv()
            with self._cond:
                self._error = self._error or exc
                self._cond.notify_all()

    def recv(self, bufsize: int) -> bytes:
        """Up to bufsize bytes; b"" once the peer has finished and everything was read."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._inbox or self._eof or self._error is not None,
                                       self.timeout):
                raise socket.timeout("timed out")
            if self._inbox:
                data = self._inbox.take_some(bufsize)
                if len(self._inbox) <= self.INBOX_LIMIT and not self._room.is_set():
                    self._loop.call_soon_threadsafe(self._room.set)
                return data
            if self._eof:
                return b""
            raise self._error

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._loop.call_soon_threadsafe(self._writer.write_eof)

    def close(self) -> None:
        """Finish sending, wait (up to the timeout) for the peer to finish, then release everything."""
        if self._loop.is_closed():
            return
        async def finish():
            self._pump_task.cancel()
            self._writer.close()
            conn = self._writer.connection
            if not conn.is_closed:
                try:
                    await asyncio.wait_for(self._writer.wait_closed(), self.timeout or 10.0)
                except (asyncio.TimeoutError, STCPError):
                    self._writer.abort("closed by the application")
        try:
            self._call(finish(), None)
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def settimeout(self, timeout: Optional[float]) -> None:
        self.timeout = timeout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(address: Tuple[str, int], timeout: Optional[float] = None, *,
            config: Optional[Config] = None, cipher: Optional[str] = None) -> BlockingConnection:
    """Blocking client: `with stcp.connect(("127.0.0.1", 7443)) as c: c.sendall(b"hi")`."""
    return BlockingConnection(address, timeout, config or make_config(cipher))
