"""The asyncio user API: `open_connection`, and the stream reader and writer a connection is
used through (a server's handler gets them from stcp.server), shaped like their asyncio
namesakes (the blocking `connect` is in stcp.blocking); and how a client names the server
key it accepts (`server_key=`, `stcp.UNAUTHENTICATED`) and its own key (`client_key=`).
"""
from __future__ import annotations

import asyncio
import copy
import os
from typing import Any, Callable, Iterable, List, Optional, Tuple, Union

from . import wire
from .address import hostport
from .chunks import ChunkBuffer
from .connection import Config, Connection, ConnectionClosed, DataReceived, HandshakeCompleted, StreamFinished
from .datapath.socket import ClientDriver, Driver, connect_udp
from .errors import CloseCode, ConnectionTerminated, HandshakeFailed, HandshakeTimeout, PeerUnreachable
from .handshake import ServerKeyPolicy
from .identity import KEY_LEN, decode_key, load_private_key, load_public_keys

DEFAULT_PORT = 7443
WRITE_HIGH_WATER = 4 << 20     # drain() waits while more than this is unacknowledged


class Unauthenticated:
    """stcp.UNAUTHENTICATED, as server_key=: accept any server key: an active attacker can
    read and change everything.

    The connection is still encrypted (a passive eavesdropper learns nothing), but nothing
    says who is at the other end: a relay in the middle runs one handshake with you and one
    with the server, and reads and rewrites what passes. Pin the server's public key instead
    (`stcp serve` prints it; `server.public_key` in Python). There is one instance."""

    _instance: Optional["Unauthenticated"] = None

    def __new__(cls) -> "Unauthenticated":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "stcp.UNAUTHENTICATED"


UNAUTHENTICATED = Unauthenticated()


class Missing:
    """The type of MISSING, the default of a required server_key= (a TypeError when left)."""

    def __repr__(self) -> str:
        return "<required>"


MISSING = Missing()       # the default of a required server_key=: omitting it is a TypeError

# What a client may pass as server_key=: the server's public key (32 raw bytes, or the base64
# text `stcp serve` and `stcp keygen` print), a function deciding on the presented key (it may
# raise stcp.handshake.ServerKeyRefused to say why not), or stcp.UNAUTHENTICATED.
ServerKey = Union[bytes, str, Callable[[bytes], bool], Unauthenticated]
# A private key: 32 raw bytes, or the path of a key file (`stcp keygen --out FILE`).
PrivateKey = Union[bytes, str, "os.PathLike[str]"]
# An allow list: public keys (32 raw bytes or base64 text), or the path of a file of them.
PublicKeys = Union[Iterable[Union[bytes, str]], str, "os.PathLike[str]"]


def server_key_policy(server_key: Union[ServerKey, Missing], where: str) -> ServerKeyPolicy:
    """The Config.server_key of a server_key= argument (TypeError when it is missing)."""
    if server_key is MISSING or server_key is None:
        raise TypeError(f"{where}() needs server_key=: the server's public key (32 bytes, or the base64 "
                        f"text `stcp serve` prints), or stcp.UNAUTHENTICATED to accept any server key "
                        f"(then an active attacker can read and change everything)")
    if isinstance(server_key, Unauthenticated):
        return None
    if isinstance(server_key, (bytes, bytearray, memoryview)):
        key = bytes(server_key)
        if len(key) != KEY_LEN:
            raise ValueError(f"server_key is {len(key)} bytes; the server's public key is {KEY_LEN} "
                             f"(or its base64 text)")
        return key
    if isinstance(server_key, str):
        return decode_key(server_key, "server_key")
    if callable(server_key):
        return server_key
    raise TypeError(f"server_key must be the server's public key (bytes or base64 text) or "
                    f"stcp.UNAUTHENTICATED, not {type(server_key).__name__}")


def private_key(key: PrivateKey, what: str) -> bytes:
    """32 raw private-key bytes from a private key or a key file's path."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        if len(raw) != KEY_LEN:
            raise ValueError(f"{what} is {len(raw)} bytes; a private key is {KEY_LEN} (or a key file's path)")
        return raw
    if isinstance(key, (str, os.PathLike)):
        return load_private_key(os.fspath(key))
    raise TypeError(f"{what} must be a {KEY_LEN}-byte private key or a key file's path, not {type(key).__name__}")


def public_keys(keys: PublicKeys, what: str) -> List[bytes]:
    """Public keys from raw keys, base64 texts, or an allow list file's path."""
    if isinstance(keys, (str, os.PathLike)):
        return load_public_keys(os.fspath(keys))
    out = []
    for k in keys:
        if isinstance(k, str):
            out.append(decode_key(k, f"a key in {what}"))
        elif isinstance(k, (bytes, bytearray, memoryview)) and len(k) == KEY_LEN:
            out.append(bytes(k))
        else:
            raise ValueError(f"{what} must hold {KEY_LEN}-byte public keys or their base64 text")
    return out


def with_keys(config: Config, policy: ServerKeyPolicy, static: Optional[bytes]) -> Config:
    """config with this server-key policy and static key (config itself when it has them
    already: deriving a static key's public half costs an X25519 multiplication)."""
    # equal, not identical: a server_key= given as base64 text decodes to new bytes on each
    # call, and a copy per connect is most of a client_config's cost (public values only)
    if config.server_key == policy and config.static_key == static:
        return config
    out = copy.copy(config)
    out.server_key = policy
    if static != config.static_key:
        out.static_key = static
        out.__post_init__()
    return out


# client_config's last answer: (config given, a copy of its fields, policy, static, cipher,
# result). Sequential connects with the same arguments reuse the Config instead of building
# and copying one per connect (the fields are compared, so a config changed since is seen).
# Only public values and the caller's own long-term key are kept; every connection still
# makes its own ephemeral key and secrets.
_last_client: Optional[tuple] = None


def client_config(config: Optional[Config], cipher: Optional[str], server_key: Union[ServerKey, Missing],
                  client_key: Optional[PrivateKey], where: str) -> Config:
    """The Config of a client call: its server_key= and client_key= over config (or cipher)."""
    global _last_client
    policy = server_key_policy(server_key, where)
    static = private_key(client_key, "client_key") if client_key is not None else None
    last = _last_client
    if (last is not None and last[0] is config and last[2] == policy and last[3] == static
            and last[4] == cipher and (config is None or last[1] == config.__dict__)):
        return last[5]
    base = config or make_config(cipher)
    out = with_keys(base, policy, static if client_key is not None else base.static_key)
    _last_client = (config, None if config is None else dict(config.__dict__), policy, static, cipher, out)
    return out


def make_config(cipher: Optional[str] = None, **overrides: Any) -> Config:
    if cipher is not None:
        if cipher not in wire.SUITES:
            raise ValueError(f"unknown cipher {cipher!r}; choose one of {', '.join(wire.SUITES)}")
        overrides["suite"] = wire.SUITES[cipher]
    return Config(**overrides)


def closed_error(info: ConnectionClosed) -> Optional[Exception]:
    """The exception an application sees for how the connection ended, or None if it ended well."""
    if not info.error and info.code in (CloseCode.NO_ERROR,):
        return None
    if info.code in (CloseCode.HANDSHAKE_TIMEOUT, CloseCode.PORT_UNREACHABLE):
        return None    # reported by open_connection (handshake_error)
    if info.code == CloseCode.HANDSHAKE_FAILED and not info.by_peer:
        return HandshakeFailed(info.reason)
    return ConnectionTerminated(info.code, info.reason, by_peer=info.by_peer)


def handshake_error(info: ConnectionClosed, config: Config) -> Exception:
    """The exception for a connection that ended before it was established."""
    if info.code == CloseCode.HANDSHAKE_TIMEOUT:
        return HandshakeTimeout(config.handshake_timeout)
    if info.code == CloseCode.PORT_UNREACHABLE:
        return PeerUnreachable()
    return closed_error(info) or ConnectionTerminated(info.code, info.reason, info.by_peer)


class ConnectionHandle:
    """Glue between one sans-IO Connection and its reader/writer. owns_driver: the driver
    (and its socket) is this connection's alone (a client's), released when it ends."""

    def __init__(self, driver: Driver, conn: Connection, owns_driver: bool = False):
        self.driver = driver
        self.conn = conn
        self.owns_driver = owns_driver
        self.loop = driver.loop
        self.reader = StreamReader(self)
        self.writer = StreamWriter(self)
        self.established = self.loop.create_future()
        self.closed = self.loop.create_future()
        self._drain_waiters: List[asyncio.Future] = []
        driver.hooks[conn] = self

    def process_events(self) -> None:
        conn = self.conn
        events = conn.events
        while events:
            ev = events.popleft()     # stcp.events classes have no subclasses: `type() is`, not isinstance
            if type(ev) is DataReceived:
                self.reader._feed(ev.chunks)
            elif type(ev) is StreamFinished:
                self.reader._feed_eof()
            elif type(ev) is HandshakeCompleted:
                if not self.established.done():
                    self.established.set_result(ev)
            elif type(ev) is ConnectionClosed:
                self._on_closed(ev)
        if self._drain_waiters and conn.send_buffered <= WRITE_HIGH_WATER:
            self._wake_drainers(None)

    def _on_closed(self, info: ConnectionClosed) -> None:
        exc = closed_error(info)
        if not self.established.done():
            self.established.set_exception(handshake_error(info, self.conn.config))
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


class StreamReader:
    """Reads the peer's byte stream; reading returns flow-control credit to the peer."""

    def __init__(self, handle: ConnectionHandle):
        self._handle = handle
        self._buffer = ChunkBuffer()
        self._eof = False
        self._exception: Optional[Exception] = None
        self._waiter: Optional[asyncio.Future] = None

    def _feed(self, chunks: List[bytes]) -> None:
        self._buffer.extend(chunks)
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
            chunks: List[bytes] = []
            while True:
                chunk = await self.read(1 << 20)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
        buffer = self._buffer
        if not buffer.size:               # (.size, not len(): read runs once per message)
            while not buffer.size and not self._eof:
                if self._exception is not None:
                    raise self._exception
                # _wait inline: one coroutine fewer to create and resume per message
                self._waiter = waiter = self._handle.loop.create_future()
                await waiter
            if not buffer.size:
                if self._exception is not None:
                    raise self._exception
                return b""
        data = buffer.take_some(n)
        if self._handle.conn.consume(len(data)):     # _consumed, inline
            self._handle.touch()
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

    def __aiter__(self) -> StreamReader:
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
            conn = handle.conn
            conn.send(data if type(data) is bytes else bytes(data))
            handle.driver.flush_now(conn)

    def writelines(self, lines: Iterable[bytes]) -> None:
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
            exc = closed_error(handle.closed.result())
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
        """Until the connection has ended and, on a client, its socket is closed (after a
        graceful end the connection lingers a few round trips to re-acknowledge the peer's
        last records, as TCP's TIME_WAIT): then no descriptor of it is left open."""
        handle = self._handle
        info = await asyncio.shield(handle.closed)
        if handle.owns_driver:
            await asyncio.shield(handle.driver.released)
        exc = closed_error(info)
        if exc is not None:
            raise exc

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As asyncio's, plus "peer_key": the peer's proven static public key (on a client,
        the server's; on a server, the client's, or None if it proved none), "cipher", "cid"
        and "connection"."""
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
        if name == "peer_key":
            return conn.peer_static_key
        return default


# --- client -----------------------------------------------------------------
def explain_timeout(exc: HandshakeTimeout, host: str, port: int, icmp_errors: int, not_stcp: int) -> None:
    """Say in a handshake timeout what the server's address did answer: ICMP "port
    unreachable", or datagrams that are not STCP (no record or handshake reply naming this
    connection, no RESET: a UDP service of another protocol, an echo). Those cannot end the
    handshake (they are unauthenticated: anyone can send them), but they explain its failure."""
    address = hostport(host, port)
    if icmp_errors:
        exc.args = (f"{exc.args[0]} (the host answered 'port unreachable': is an STCP server "
                    f"listening on {address}?)",)
    elif not_stcp:
        what = "datagram that is" if not_stcp == 1 else "datagrams that are"
        exc.args = (f"{exc.args[0]}: {address} answered with {not_stcp} {what} not STCP "
                    f"(is this an STCP server?)",)


async def open_connection(host: str, port: int = DEFAULT_PORT, *, server_key: Union[ServerKey, Missing] = MISSING,
                          client_key: Optional[PrivateKey] = None, config: Optional[Config] = None,
                          cipher: Optional[str] = None) -> Tuple[StreamReader, StreamWriter]:
    """Handshake with an STCP server; return (reader, writer) once the connection is ENCRYPTED.

    server_key (required): the server's public key, 32 bytes or the base64 text `stcp serve`
      prints; only the holder of its private key gets past the handshake (anyone else, a
      relay included, ends in a HandshakeFailed "expected server key ..., presented ..."
      at the handshake timeout, before any byte of yours is sent). stcp.UNAUTHENTICATED:
      accept any server key: an active attacker can read and change everything.
    client_key: this client's private key (32 bytes, or a key file's path), proven to the
      server (which may admit only listed keys); None proves none.
    """
    config = client_config(config, cipher, server_key, client_key, "open_connection")
    loop = asyncio.get_running_loop()
    sock = connect_udp(host, port)
    conn = Connection.client(config, loop.time())
    driver = ClientDriver(loop, sock, conn)
    handle = ConnectionHandle(driver, conn, owns_driver=True)
    driver.touch(conn)
    try:
        await handle.established
    except HandshakeTimeout as exc:
        explain_timeout(exc, host, port, driver.icmp_errors, driver.dropped)
        raise
    except PeerUnreachable:
        driver.close()
        raise PeerUnreachable(hostport(host, port)) from None
    except BaseException:
        if not conn.is_closed:
            conn.close(CloseCode.APPLICATION_ABORT, "cancelled")
        driver.close()
        raise
    return handle.reader, handle.writer
