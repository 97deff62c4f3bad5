"""Assembling an STCP server: the one place it is done, for every datapath.

    server = await stcp.serve(handler, "0.0.0.0", 7443)                         # UDP socket
    server = await stcp.serve(handler, "0.0.0.0", 7443, datapath="xdp", iface="eth0",
                              metrics="127.0.0.1:9400")                          # + XDP early drop
    server = await stcp.serve(handler, "0.0.0.0", 7443, datapath="afxdp", iface="eth0")
    ...
    server.close()            # closes every connection, the exporter, and detaches what it attached

serve() opens the datapath (stcp.datapath.base.Datapath), runs a ServerEndpoint on its
driver, installs the datapath's hooks (the kernel's live-CID table) before the caller's
and, when asked, a Prometheus exporter (stcp.metrics). `handler(reader, writer)` runs for
each connection once it is ENCRYPTED. start_server() is serve() on the socket datapath with
asyncio's argument names.

A pool of worker processes on one port (`stcp serve --workers N` on the socket datapath,
`--datapath afxdp --workers N`) is a WorkerPool: a stcp.supervisor.Supervisor setting up
the kernel part (the reuseport steering, the afxdp program) and starting the workers (each
of which calls serve(..., worker=WorkerRole.from_env())), plus the pool's exporter.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import socket
import tempfile
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Set, TextIO, Union

from . import privileges, wire
from .address import hostport
from .api import (
    DEFAULT_PORT,
    ConnectionHandle,
    PrivateKey,
    PublicKeys,
    StreamReader,
    StreamWriter,
    make_config,
    private_key,
    public_keys,
)
from .budget import default_memory_budget
from .connection import Config, Connection
from .datapath.base import Datapath
from .datapath.socket import ServerDriver, SocketDatapath
from .endpoint import ServerEndpoint
from .errors import CloseCode, ConnectionTerminated
from .identity import fingerprint, generate_private_key, public_key

# The kernel datapaths (ctypes, libbpf, the worker supervisor) are imported when a server
# asks for one: a client or a socket-datapath server does not load them.
if TYPE_CHECKING:
    from .supervisor import Spawn, WorkerRole

Handler = Callable[[StreamReader, StreamWriter], Union[Awaitable[None], None]]
DATAPATHS = ("socket", "xdp", "afxdp")
# One record per connection at its end and one per backend failure, with their fields in
# `record.fields`; where they go (stderr, text or JSON) is the CLI's choice (stcp.cli.logs).
log = logging.getLogger("stcp.server")


def format_address(addr: object) -> str:
    """host:port, [v6host]:port, or the address as it is when it is not an IP socket address."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return hostport(str(addr[0]), addr[1])
    return str(addr)


def connection_fields(conn: Connection, peer: object) -> Dict[str, Any]:
    """What names a connection in a log record: the peer's address, the server CID's first
    32 bits (as the CID appears, in hex), the client key's fingerprint once proven."""
    fields: Dict[str, Any] = {"peer": format_address(peer), "cid": f"{conn.local_cid:016x}"[:8]}
    if conn.peer_static_key is not None:
        fields["key"] = fingerprint(conn.peer_static_key)
    return fields


class ConnectionLog:
    """Server hooks logging one INFO record per established connection when it ends: peer,
    CID prefix, stream bytes each way, duration, how it ended (`finished`, else the close
    code's name; who closed; the reason). Handshakes that never completed are not logged: a flood of hellos must not
    become a flood of log lines."""

    def __init__(self, server: "Server"):
        self._server = server
        self._open: Dict[Connection, tuple[object, float]] = {}

    def connection_established(self, conn: Connection, handshake_seconds: float) -> None:
        self._open[conn] = (self._server.driver.peer_address(conn), time.monotonic() - handshake_seconds)

    def connection_ended(self, conn: Connection) -> None:
        entry = self._open.pop(conn, None)
        if entry is None or not log.isEnabledFor(logging.INFO):
            return
        peer, started = entry
        info, stats = conn.close_info, conn.stats
        fields = connection_fields(conn, peer)
        fields.update(sent=stats.stream_bytes_sent, received=stats.stream_bytes_received,
                      duration=round(time.monotonic() - started, 3))
        if info is not None:
            try:
                close = "finished" if info.code == CloseCode.NO_ERROR else CloseCode(info.code).name.lower()
            except ValueError:
                close = f"code_0x{info.code:x}"
            fields.update(close=close, by="peer" if info.by_peer else "server")
            if info.reason:
                fields["reason"] = info.reason
        log.info("connection closed", extra={"fields": fields})


class Server:
    """A running server: its driver, the connections' handler tasks and hooks, and what it
    owns (the datapath, an exporter), all released by close().

    Each of `hooks` may define connection_created(conn) (server hello sent),
    connection_established(conn, handshake_seconds) and connection_ended(conn) (CLOSED;
    conn.close_info says why). They run on the loop; the kernel datapath keeps its table of
    live connection IDs in step through them, and metrics count through them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, driver: Optional[ServerDriver], handler: Handler,
                 hooks: Sequence[object] = (), datapath: Optional[Datapath] = None):
        self._loop = loop
        self.driver: ServerDriver = driver      # type: ignore[assignment]  # set by serve() when None
        self._handler = handler
        self._tasks: Set["asyncio.Task[None]"] = set()
        self._closed: "asyncio.Future[None]" = loop.create_future()
        self.hooks = list(hooks)
        self.datapath = datapath
        self.metrics: Optional[Any] = None       # the exporter serve() started (has close())

    def _notify(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is not None:
                method(*args)

    @property
    def sockets(self) -> List[socket.socket]:
        return [self.driver.sock]

    @property
    def endpoint(self) -> ServerEndpoint:
        return self.driver.endpoint

    @property
    def public_key(self) -> bytes:
        """The server's static public key (32 bytes): what its clients pin (server_key=)."""
        return self.endpoint.public_key

    def _on_new(self, conn: Connection) -> None:
        handle = ConnectionHandle(self.driver, conn)
        self._notify("connection_created", conn)
        handle.established.add_done_callback(lambda fut: self._start(handle, fut))

    def _on_ended(self, conn: Connection) -> None:
        self._notify("connection_ended", conn)

    def _start(self, handle: ConnectionHandle, fut: "asyncio.Future[Any]") -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        self._notify("connection_established", handle.conn, fut.result().duration)
        result = self._handler(handle.reader, handle.writer)
        if asyncio.iscoroutine(result):
            task = self._loop.create_task(self._run_handler(handle, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, handle: ConnectionHandle, coro: Awaitable[None]) -> None:
        try:
            await coro
        except (ConnectionTerminated, asyncio.IncompleteReadError):
            pass                      # the connection ended; its close reason is already recorded
        except Exception as exc:       # a handler bug ends its own connection, never the server
            handle.conn.close(CloseCode.INTERNAL_ERROR, f"handler failed: {type(exc).__name__}")
            handle.touch()

    def close(self) -> None:
        """Close every connection (the peers are told), stop the exporter, release the
        datapath (detaching what it attached). Idempotent."""
        if self._closed.done():
            return
        try:
            if self.driver is not None:
                self.driver.close()
            for task in self._tasks:
                task.cancel()
            if self.metrics is not None:
                self.metrics.close()
        finally:
            try:
                if self.datapath is not None:
                    self.datapath.close()
            finally:
                self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


def cipher_name(config: Config) -> str:
    """The cipher suite of config by its name ('aes-256-gcm', 'chacha20-poly1305')."""
    return {v: k for k, v in wire.SUITES.items()}[config.suite]


def identity_config(config: Config, server_key: Optional[PrivateKey] = None,
                    allowed_clients: Optional[PublicKeys] = None) -> Config:
    """config with the server's identity: server_key (a private key or a key file's path;
    None: config.static_key, else a fresh key, which a restarted server will not have) and
    allowed_clients (None: config.allowed_clients)."""
    changes: Dict[str, Any] = {}
    if server_key is not None:
        changes["static_key"] = private_key(server_key, "server_key")
    elif config.static_key is None:
        changes["static_key"] = generate_private_key()
    if allowed_clients is not None:
        changes["allowed_clients"] = public_keys(allowed_clients, "allowed_clients")
    return dataclasses.replace(config, **changes) if changes else config


def open_datapath(datapath: str, port: int, *, iface: Optional[str] = None, xdp_mode: str = "auto",
                  max_record_len: Optional[int] = None, xdp_limits: Optional[Mapping[str, int]] = None,
                  afxdp_tx: str = "socket", worker: Optional[WorkerRole] = None,
                  max_connections: Optional[int] = None) -> Datapath:
    """The datapath named `datapath` for a server on `port` (see serve() for the rest). A
    kernel datapath's live-CID table holds at least max_connections: one this call attaches
    is made that large, one found attached that is smaller is refused."""
    if datapath not in DATAPATHS:
        raise ValueError(f"datapath must be one of {', '.join(DATAPATHS)}, not {datapath!r}")
    if datapath == "socket":
        if worker is not None:
            from .datapath.socket_pool import SocketWorkerDatapath
            return SocketWorkerDatapath.join(worker.fds, worker.index)
        return SocketDatapath()
    if not iface:
        raise ValueError(f"the {datapath} datapath needs an interface (iface=...)")
    limits: Dict[str, Any] = dict(xdp_limits or {})
    if datapath == "xdp":
        from .datapath.xdp import XdpDatapath
        if max_record_len is not None:
            limits["max_record_len"] = max_record_len
        return XdpDatapath.attach_or_reuse(iface, port, mode=xdp_mode, max_connections=max_connections, link=True,
                                           **limits)
    from .datapath.afxdp import AfxdpDatapath
    if worker is not None:
        return AfxdpDatapath.join(iface, port, worker.index, worker.count, tx=afxdp_tx)
    if max_connections is not None:
        limits.setdefault("max_cids", max_connections)
    cookies = limits.pop("cookies", True)
    dp = AfxdpDatapath.open(iface, port, mode=xdp_mode, max_record_len=max_record_len, xdp_kw=limits, tx=afxdp_tx)
    dp.xdp.kernel_cookies = bool(cookies)
    return dp


async def serve(handler: Handler, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                datapath: Union[str, Datapath] = "socket", iface: Optional[str] = None, xdp_mode: str = "auto",
                xdp_limits: Optional[Mapping[str, int]] = None, afxdp_tx: str = "socket",
                worker: Optional[WorkerRole] = None, config: Optional[Config] = None,
                cipher: Optional[str] = None, server_key: Optional[PrivateKey] = None,
                allowed_clients: Optional[PublicKeys] = None, metrics: Optional[str] = None,
                hooks: Sequence[object] = (), max_connections: int = 100_000,
                drop_privileges: Union[bool, str] = False) -> Server:
    """Serve STCP on host:port; `handler(reader, writer)` runs for each connection once ENCRYPTED.

    server_key: the server's private key (32 bytes, or a key file's path, `stcp keygen
      --out FILE`). None: config.static_key, else a fresh key for this server alone (a
      restart gets another, and clients that pinned the old one refuse it). Clients pin
      `server.public_key`. In a worker (below), the key the supervisor handed down.
    allowed_clients: admit only clients that prove one of these public keys (32 bytes or
      base64 text each, or an allow list file's path); the others end ACCESS_DENIED.
      None: anyone; `writer.get_extra_info("peer_key")` tells a handler who proved what.

    datapath: "socket" (a UDP socket), "xdp" (the UDP socket behind the XDP program on
      `iface`, which drops what belongs to no live connection; an STCP program already
      attached there for this port is reused), "afxdp" (records through AF_XDP sockets on
      `iface`'s RX queues), or a Datapath object of your own.
    xdp_mode: "native", "generic" or "auto" (native, else generic) for attaching XDP.
    xdp_limits: XdpDatapath.attach options for a program this call attaches (hs_rate,
      hs_burst, max_cids, hs_sources, ...; stcp.datapath.xdp.LIMITS), and for the xdp
      datapath `cookies` (False: the program gets no cookie keys, checks no cookie and
      answers no hello); the max record length follows config.max_datagram, the live-CID
      table's size max_connections.
    afxdp_tx: "socket" (replies through the kernel UDP socket) or "afxdp" (the TX ring).
    worker: in a process a stcp.supervisor.Supervisor started (WorkerRole.from_env()): join
      what it set up in the kernel ("socket": its reuseport steering, "afxdp": the program
      it attached), serve on its port with its identity key and a 1/N share of the memory
      budget, die with it and serve metrics to it. Call worker.notify_ready() once the server
      is announced: the supervisor
      reports the pool as serving when every worker has.
    config / cipher: the connections' Config (or just the cipher's name).
    metrics: "HOST:PORT" to export Prometheus metrics on (stcp.metrics.serve_metrics).
    hooks: more connection hooks (see Server), run after the datapath's.
    drop_privileges: once the datapath and the sockets are open, become an unprivileged
      user with no capabilities (stcp.privileges.drop_privileges): True for the default
      account (`stcp` if it exists, else nobody; the current one where changing user is not
      allowed), or an account's name. Everything after goes through descriptors already
      open. `stcp serve` always does this; a library caller's process is its own, so the
      default keeps its privileges. Core dumps are off either way (the keys live here).

    Returns the running Server; close() releases everything it made. Setup failures raise
    STCPError subclasses whose message is one line saying what to do.
    """
    privileges.suppress_core_dumps()
    config = config or make_config(cipher)
    if worker is not None and worker.static_key is not None:
        if server_key is not None or config.static_key not in (None, worker.static_key):
            raise ValueError("a worker serves under its pool's key (WorkerRole.static_key), not a key of its own")
        server_key = worker.static_key
    config = identity_config(config, server_key, allowed_clients)
    if worker is not None:
        if metrics:
            raise ValueError("a worker serves its metrics to its supervisor (WorkerRole.metrics_dir), "
                             "not on an address of its own")
        from .supervisor import die_with_parent
        die_with_parent()
        port = worker.port or port
        # the memory budget is per process: the pool's is shared out among its workers
        share = max(1, (config.memory_budget or default_memory_budget()) // worker.count)
        config = dataclasses.replace(config, memory_budget=share)
        if worker.static_key is not None:
            config = dataclasses.replace(config, static_key=worker.static_key)
    if isinstance(datapath, str):
        dp = open_datapath(datapath, port, iface=iface, xdp_mode=xdp_mode,
                           max_record_len=config.max_datagram - wire.HEADER_LEN, xdp_limits=xdp_limits,
                           afxdp_tx=afxdp_tx, worker=worker, max_connections=max_connections)
    else:
        dp = datapath
    loop = asyncio.get_running_loop()
    server = Server(loop, None, handler, [*dp.server_hooks(), *hooks], datapath=dp)
    server.hooks.append(ConnectionLog(server))
    try:
        endpoint = ServerEndpoint(dp.server_config(config), max_connections=max_connections,
                                  worker_gone=getattr(dp, "worker_gone", None))
        server.driver = dp.open_driver(loop, host, port, endpoint, server._on_new, server._on_ended)
        if worker is not None and worker.metrics_dir:
            from .metrics import serve_worker_metrics
            # bound now, in the supervisor's private directory; serving once privileges are gone
            server.metrics = serve_worker_metrics(server, worker.metrics_dir, worker.index, dp.name,
                                                  cipher_name(config), start=False)
        if drop_privileges:
            drop_to(dp, None if drop_privileges is True else drop_privileges)
            if worker is not None:
                from .supervisor import die_with_parent
                die_with_parent()             # a change of user clears the parent-death signal
        if server.metrics is not None:
            server.metrics.http.start()
        elif metrics:
            from .metrics import serve_metrics
            server.metrics = serve_metrics(server, metrics, dp.name, cipher_name(config), iface=dp.iface)
    except BaseException:
        server.close()
        raise
    return server


def drop_to(dp: Datapath, user: Optional[str]) -> None:
    """Give up the process's privileges for `user` (stcp.privileges.account) once `dp` is
    set up, after the datapath made what its close() needs possible without them."""
    pw = privileges.account(user)
    hand_over = getattr(dp, "hand_over", None)
    if hand_over is not None:
        hand_over(pw.pw_uid, pw.pw_gid)
    privileges.drop_privileges(pw.pw_name)


async def start_server(handler: Handler, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                       server_key: Optional[PrivateKey] = None, allowed_clients: Optional[PublicKeys] = None,
                       config: Optional[Config] = None, cipher: Optional[str] = None,
                       sock: Optional[socket.socket] = None, hooks: Sequence[object] = (),
                       max_connections: int = 100_000, gro: bool = True) -> Server:
    """serve() on the UDP socket datapath, named like asyncio.start_server.

    server_key, allowed_clients: the server's identity and whom it admits, as for serve();
    clients pin `server.public_key`.

    sock: serve on this bound UDP socket instead of binding host:port.
    gro: receive through UDP GRO (fewer, larger reads). Pass False only when a filter that
    runs after GRO (an XDP program in generic mode) cannot take coalesced datagrams; the
    STCP program takes a batch of one connection's records whole (docs/OPERATIONS.md 6).
    """
    return await serve(handler, host, port, datapath=SocketDatapath(gro=gro, sock=sock), config=config,
                       cipher=cipher, server_key=server_key, allowed_clients=allowed_clients, hooks=hooks,
                       max_connections=max_connections)


class WorkerPool:
    """Worker processes serving one port (`stcp serve --workers N`, `stcp serve --datapath
    afxdp --iface IFACE --workers N`): the supervisor and, with `metrics`, the pool's
    exporter (the workers' counters summed and labelled, the kernel part's read once).

        pool = WorkerPool(spawn, port, datapath="socket", host="0.0.0.0", workers=4,
                          config=config, metrics="127.0.0.1:9400")
        await pool.start()             # set up, every worker serving
        await pool.serve_forever()     # until close(); SupervisorError if workers keep dying
        pool.close(); await pool.wait_closed()

    spawn(w, n) says how to start worker w of n (a stcp.supervisor.WorkerCommand); the
    worker process calls serve(..., datapath=<the same>, worker=WorkerRole.from_env()).
    datapath "socket": the workers bind host:port with SO_REUSEPORT, steered by connection
    ID (stcp.datapath.socket_pool; setting up needs CAP_BPF, else start() raises
    ReuseportError); port 0 picks a free port. "afxdp": on `iface`, one worker per RX
    queue at most. xdp_limits and max_restarts are as for serve() and Supervisor.
    server_key is as for serve(): the pool's one identity, loaded (or made) here once and
    handed to every worker, replacements included; `public_key` is what clients pin.
    """

    def __init__(self, spawn: Spawn, port: int, *, workers: int, datapath: str = "afxdp", host: str = "0.0.0.0",
                 iface: Optional[str] = None, xdp_mode: str = "auto", xdp_limits: Optional[Mapping[str, int]] = None,
                 config: Optional[Config] = None, server_key: Optional[PrivateKey] = None,
                 metrics: Optional[str] = None, max_restarts: Optional[int] = None, out: Optional[TextIO] = None):
        from .supervisor import MAX_RESTARTS, PoolKernel, Supervisor
        config = identity_config(config or make_config(), server_key)
        assert config.static_key is not None
        self.public_key = public_key(config.static_key)
        self.datapath = datapath
        self.iface = iface
        self.metrics_address = metrics
        self.cipher = cipher_name(config)
        self.metrics: Optional[Any] = None
        self.metrics_dir: Optional[str] = None
        if datapath not in ("socket", "afxdp"):
            raise ValueError(f"a worker pool runs the socket or the afxdp datapath, not {datapath!r}")
        if datapath == "afxdp" and not iface:
            raise ValueError("the afxdp datapath needs an interface (iface=...)")
        record_len = config.max_datagram - wire.HEADER_LEN

        def setup(n: int) -> PoolKernel:
            if datapath == "socket":
                from .datapath.socket_pool import SocketPoolKernel
                return SocketPoolKernel.load(host, port, n)
            from .datapath.afxdp import AfxdpPoolKernel
            assert iface is not None                          # checked above
            return AfxdpPoolKernel.attach(iface, port, xdp_mode, n, record_len, dict(xdp_limits or {}))

        self.supervisor = Supervisor(spawn, setup, workers, out=out,
                                     max_restarts=MAX_RESTARTS if max_restarts is None else max_restarts,
                                     static_key=config.static_key)

    async def start(self, ready_timeout: float = 60.0) -> None:
        """Start the exporter, attach the program and start every worker; on failure what
        was made is undone before the error propagates."""
        try:
            if self.metrics_address:
                from .metrics import serve_pool_metrics
                # the workers' metrics sockets: a directory only we can enter (0700), removed at the end
                self.metrics_dir = tempfile.mkdtemp(prefix="stcp-workers-",
                                                    dir="/run" if os.path.isdir("/run") else None)  # noqa: ASYNC240 - once, at start
                self.supervisor.metrics_dir = self.metrics_dir
                kernel = None
                if self.datapath == "socket":
                    from .metrics import ReuseportCollector
                    kernel = ReuseportCollector(lambda: getattr(self.supervisor.kernel, "steering", None))
                self.metrics = serve_pool_metrics(self.supervisor.worker_slots, self.metrics_address, self.datapath,
                                                  self.cipher, iface=self.iface, kernel=kernel)
            self.supervisor.setup()
            if self.metrics is not None:
                what = "the steering program" if self.datapath == "socket" else "the XDP program"
                self.supervisor.say(f"metrics of {self.supervisor.n} workers and {what} on {self.metrics.http.url}")
            await self.supervisor.start(ready_timeout)
        except BaseException:
            await self.wait_closed()
            raise

    async def serve_forever(self) -> None:
        await self.supervisor.wait()

    def close(self) -> None:
        self.supervisor.close()

    def signal_workers(self, sig: int) -> None:
        self.supervisor.signal_workers(sig)

    async def wait_closed(self) -> None:
        """Terminate the workers, release the kernel part, stop the exporter."""
        try:
            await self.supervisor.wait_closed()
        finally:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
                self.metrics_dir = None
