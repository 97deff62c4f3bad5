"""The socket datapath: sans-IO connections driven over one UDP socket on an asyncio loop.

Receive drains the socket in batches (recvmmsg through stcp._udpio when it is built, with
UDP GRO where the kernel offers it), hands each connection its datagrams of the batch in one
call, then flushes every connection that has something to say. Sends go out with sendmmsg;
a run of equal-sized bulk records is one UDP GSO buffer, cut into datagrams by the kernel
(or the NIC). Each connection has at most one pending loop timer. Other datapaths reuse
`Driver` with their own way of getting datagrams in and out; the blocking client
(stcp.blocking) reuses the socket helpers (recv_batch, Outbox, own_records) without a loop.
"""
from __future__ import annotations

import asyncio
import errno
import os
import socket
from types import ModuleType
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Protocol, Tuple, cast

from .. import cid_layout, wire
from ..address import hostport, listen_error
from ..connection import Config, Connection
from ..endpoint import ServerEndpoint, group_by_cid
from ..errors import STCPError
from ..state import State
from .heap import tune_heap

_udpio: Optional[ModuleType]
try:
    from .. import _udpio
except ImportError:       # the C helpers are optional; plain socket calls work everywhere
    _udpio = None

RECV_BATCH = 64
RECV_ROUNDS = 16          # batches per readiness callback before yielding to the loop
SOCKET_BUFFER = 32 << 20
GSO = os.environ.get("STCP_GSO", "1") != "0"
_CLOSED = State.CLOSED


class ConnectionHooks(Protocol):
    """What the API layer attaches to each connection (stcp.api.ConnectionHandle)."""

    def process_events(self) -> None: ...


def _literal(host: str, port: int) -> Optional[Tuple[int, tuple]]:
    """resolve()'s answer for a numeric IPv4/IPv6 address, without getaddrinfo (about 100 us
    a call, most of a client connect's non-crypto time); None for anything else (names,
    scoped or non-canonical spellings, odd ports), which getaddrinfo answers as before."""
    if not 0 <= port <= 0xFFFF:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            packed = socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        canonical = socket.inet_ntop(family, packed)   # the spelling getaddrinfo returns
        if family == socket.AF_INET:
            return family, (canonical, port)
        return family, (canonical, port, 0, 0)
    return None


def resolve(host: str, port: int) -> Tuple[int, tuple]:
    """(address family, socket address) of host:port for UDP."""
    literal = _literal(host, port) if isinstance(host, str) else None
    if literal is not None:
        return literal
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise STCPError(f"cannot resolve {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def connect_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket connected to host:port, for one client connection."""
    family, sockaddr = resolve(host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect(sockaddr)
    except OSError as exc:
        sock.close()
        raise STCPError(f"cannot reach {hostport(host, port)}: {exc.strerror or exc}") from None
    return sock


def bind_udp(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A UDP socket bound to host:port (dual-stack for IPv6); reuse_port lets several worker
    processes send from the same port."""
    family, sockaddr = resolve(host, port)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise listen_error(host, port, exc) from None
    return sock


def tune_socket(sock: socket.socket) -> None:
    """Large buffers: a burst of a full congestion window must not overflow the socket."""
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):    # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass


def enable_gro(sock: socket.socket) -> bool:
    """Ask the kernel to coalesce a flow's datagrams (UDP_GRO); False where it cannot."""
    if _udpio is None:
        return False
    try:
        sock.setsockopt(_udpio.SOL_UDP, _udpio.UDP_GRO, 1)
    except OSError:
        return False
    return True


def recv_batch(fd: int, gro: bool = False) -> list:
    """Up to RECV_BATCH datagrams waiting on a non-blocking socket's descriptor fd, [] if none:
    (datagram, source) pairs, or with gro (buffer, source, segment size) from UDP GRO.
    ConnectionRefusedError when an ICMP "port unreachable" is the first thing waiting.
    Callers pass the descriptor they keep, sparing a fileno() call per batch."""
    if _udpio is not None:
        return _udpio.recvmmsg(fd, RECV_BATCH, 65536, gro)
    batch: list = []
    sock = socket.socket(fileno=fd)     # a view of the caller's socket: detached, never closed
    try:
        for _ in range(RECV_BATCH):
            try:
                batch.append(sock.recvfrom(65536))
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                if not batch:
                    raise
                break
    finally:
        sock.detach()
    return batch


def send_datagrams(fd: int, datagrams: List[bytes], addr: Optional[Hashable],
                   segment_size: int = 0) -> int:
    """Send datagrams on a non-blocking socket's descriptor fd (GSO buffers when segment_size
    is set; addr None on a connected socket); return how many went (fewer when the socket
    buffer is full)."""
    if _udpio is not None:
        return _udpio.sendmmsg(fd, datagrams, addr, segment_size)
    sent = 0
    sock = socket.socket(fileno=fd)     # a view of the caller's socket: detached, never closed
    try:
        for d in datagrams:
            try:
                if addr is None:
                    sock.send(d)
                else:                   # the core keeps addresses opaque; here they are the socket's
                    sock.sendto(d, cast(Tuple[Any, ...], addr))
            except (BlockingIOError, InterruptedError):
                break
            sent += 1
    finally:
        sock.detach()
    return sent


def own_records(batch: list, cid: int) -> Tuple[list, int]:
    """A client connection's share of a received batch: its data records, handshake records
    naming it and stateless RESETs (cid 0: the server that sends one no longer knows ours;
    the connection checks its token), as Connection.receive_datagrams takes them, and the
    number of datagrams dropped. Stray or spoofed datagrams that name nothing of ours must
    not be able to end the connection, just as the server endpoint drops them."""
    mine: list = []
    dropped = 0
    cid_bytes = cid.to_bytes(8, "big")
    for group_cid, _, entries in group_by_cid(batch):
        first = cast(bytes, entries[0])     # a group of cid -1 is one datagram
        if group_cid == cid or (group_cid == -1 and (first[8:16] == cid_bytes or (
                len(first) == wire.RESET_RECORD_LEN and first[8:24] == bytes(16)))):
            mine += entries
        else:
            dropped += wire.count_datagrams(entries)
    return mine, dropped


class Outbox:
    """Datagrams waiting to leave one UDP socket, as (buffer, address, segment size) entries
    (segment size 0 for a single datagram), sent with as few sendmmsg calls as they allow.

    gso: send bulk runs as UDP GSO buffers (turned off for good if the kernel refuses).
    STCP_GSO=0 turns it off, to measure the per-datagram path a real link gives a receiver
    (bench/xdp_flood.py): across a veth pair a GSO buffer stays whole."""

    def __init__(self, send_group: Callable[[List[bytes], Optional[Hashable], int], int]):
        self.entries: List[Tuple[bytes, Optional[Hashable], int]] = []
        self.gso = GSO and _udpio is not None
        self._send_group = send_group

    def add(self, batches: List[Tuple[bytes, int]], addr: Optional[Hashable]) -> None:
        """Queue what Connection.datagram_batches gave, for addr (None: a connected socket)."""
        if not self.gso:
            batches = [(d, len(d)) for d in wire.expand_datagrams(batches)]
        if len(batches) == 1:             # the request/response case: no generator per call
            buf, size = batches[0]
            self.entries.append((buf, addr, size if size < len(buf) else 0))
            return
        self.entries.extend((buf, addr, size if size < len(buf) else 0) for buf, size in batches)

    def send(self) -> bool:
        """Send from the front; False when the socket buffer filled first (the rest waits)."""
        entries = self.entries
        while entries:
            if len(entries) == 1:         # the request/response case: nothing to group
                buf, addr, seg = entries[0]
                datagrams, n = [buf], 1
            else:
                datagrams, addr, seg, n = self._next_group()
            try:
                sent = self._send_group(datagrams, addr, seg)
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    sent = n          # the datagrams are lost; recovery will resend what matters
                elif seg and exc.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                    self._stop_gso()  # e.g. a device without checksum offload: send them one by one
                    continue
                else:
                    raise
            del entries[:sent]
            if sent < n:
                return False
        return True

    def _next_group(self) -> Tuple[List[bytes], Optional[Hashable], int, int]:
        """The front stretch one sendmmsg takes: (datagrams, address, segment size, count).
        A stretch goes to one address, its GSO buffers sharing a segment size (single
        datagrams no longer than it ride along unsegmented)."""
        entries = self.entries
        addr, seg, longest, n = entries[0][1], 0, 0, 0
        while n < len(entries) and n < 1024:
            buf, a, size = entries[n]
            if a != addr:
                break
            if size:
                if (seg and size != seg) or longest > size:
                    break
                seg = size
            else:
                if seg and len(buf) > seg:
                    break
                longest = max(longest, len(buf))
            n += 1
        return [d for d, _, _ in entries[:n]], addr, seg, n

    def _stop_gso(self) -> None:
        self.gso = False
        self.entries[:] = [(d, addr, 0) for buf, addr, size in self.entries
                           for d in wire.expand_datagrams([(buf, size) if size else buf])]


class Driver:
    """Runs connections over one UDP socket. Subclasses route received datagrams.

    gro: receive through UDP GRO. Leave it off only where a filter after GRO (an XDP
    program in generic mode) cannot take coalesced datagrams; the STCP program takes a
    batch of one connection's records whole (docs/OPERATIONS.md section 6)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, gro: bool = False):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        tune_socket(sock)
        tune_heap()
        self.gro = gro and enable_gro(sock)
        self.outbox = Outbox(self._send_group)
        self.hooks: Dict[Connection, ConnectionHooks] = {}
        self._timers: Dict[Connection, Tuple[float, asyncio.TimerHandle]] = {}
        self._dirty: Dict[Connection, None] = {}
        self._flush_scheduled = False
        self.icmp_errors = 0
        self.closed = False
        self.released: "asyncio.Future[None]" = loop.create_future()     # done once close() has closed the socket
        loop.add_reader(self.fd, self._on_readable)

    # --- receive -----------------------------------------------------------
    def _recv_batch(self) -> list:
        try:
            return recv_batch(self.fd, self.gro)
        except ConnectionRefusedError:
            self.icmp_errors += 1
            # libuv (uvloop) stops polling a descriptor that reported an error: poll it again,
            # or a connection that outlives the error (an ENCRYPTED one ignores it) goes deaf
            if not self.closed and not self.loop.is_closed():
                self.loop.remove_reader(self.fd)
                self.loop.add_reader(self.fd, self._on_readable)
            self.port_unreachable()
            return []

    def port_unreachable(self) -> None:
        """The socket reported an ICMP port unreachable (only a connected client socket gets one)."""

    def _on_readable(self) -> None:
        for _ in range(RECV_ROUNDS):
            if self.closed:               # the last connection ended in this callback
                break
            try:
                batch = self._recv_batch()
            except OSError:
                break
            if not batch:
                break
            now = self.loop.time()
            dirty = self._dirty
            for conn in self.route_batch(batch, now):
                dirty[conn] = None
            # Answer (acks, window updates) after every batch, not once per readiness callback:
            # a sender waiting on acks should not wait for the whole backlog to be read.
            self.flush(now)
            if len(batch) < RECV_BATCH:
                break

    def route_batch(self, batch: list, now: float) -> Iterable[Connection]:
        """Hand each received datagram to its connection; return the connections that got any.
        Entries are (datagram, source), or with GRO (buffer, source, segment_size)."""
        raise NotImplementedError

    # --- send --------------------------------------------------------------
    def peer_address(self, conn: Connection) -> Optional[Hashable]:
        return None          # connected socket

    def touch(self, conn: Connection) -> None:
        """The application changed conn (wrote, read, closed): flush it soon, once per loop pass."""
        self._dirty[conn] = None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush_now(self, conn: Connection) -> None:
        """Send what conn has to say right away (the application just wrote): as asyncio's own
        transports do, a write goes out without waiting for the next loop pass."""
        self._dirty.pop(conn, None)
        # a write raises no event and, adding to what is unacknowledged, wakes no drain()
        # waiter: the hooks need a look first only if the connection has events pending
        self._service(conn, self.loop.time(), events_first=bool(conn.events))
        self._send_backlog()

    def flush(self, now: Optional[float] = None) -> None:
        """Service every connection marked dirty, then send; now: the loop time, when the
        caller has just read it."""
        self._flush_scheduled = False
        if now is None:
            now = self.loop.time()
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for conn in dirty:
                self._service(conn, now)
        self._send_backlog()

    def _service(self, conn: Connection, now: float, events_first: bool = True) -> None:
        hooks = self.hooks.get(conn)
        if hooks is not None and events_first:
            hooks.process_events()
        batches = conn.datagram_batches(now)
        if batches:
            self.outbox.add(batches, self.peer_address(conn))
        if hooks is not None and conn.events:       # what sending raised (a failure's close)
            hooks.process_events()
        if conn.state is _CLOSED:
            self._forget(conn)
        else:
            self._arm_timer(conn)

    @property
    def gso(self) -> bool:
        return self.outbox.gso

    @gso.setter
    def gso(self, on: bool) -> None:
        self.outbox.gso = on

    def _send_backlog(self) -> None:
        if self.closed or not self.outbox.entries:
            return
        if not self.outbox.send():       # socket buffer full: wait until it drains
            self.loop.add_writer(self.fd, self._on_writable)

    def _send_group(self, datagrams: List[bytes], addr: Optional[Hashable], segment_size: int = 0) -> int:
        """Send datagrams (GSO buffers when segment_size is set); return how many went."""
        return send_datagrams(self.fd, datagrams, addr, segment_size)

    def _on_writable(self) -> None:
        self.loop.remove_writer(self.fd)
        self._send_backlog()

    # --- timers ------------------------------------------------------------
    def _arm_timer(self, conn: Connection) -> None:
        when = conn.get_timer()
        current = self._timers.get(conn)
        if when is None:
            if current is not None:
                current[1].cancel()
                del self._timers[conn]
            return
        if current is not None:
            if current[0] <= when:
                return           # the earlier timer fires first and re-arms for the later deadline
            current[1].cancel()
        self._timers[conn] = (when, self.loop.call_at(when, self._on_timer, conn))

    def _on_timer(self, conn: Connection) -> None:
        self._timers.pop(conn, None)
        now = self.loop.time()
        when = conn.get_timer()
        if when is not None and when <= now:
            conn.handle_timer(now)
        self._dirty[conn] = None
        self.flush(now)

    def _forget(self, conn: Connection) -> None:
        entry = self._timers.pop(conn, None)
        if entry is not None:
            entry[1].cancel()
        self.hooks.pop(conn, None)
        self.connection_ended(conn)

    def connection_ended(self, conn: Connection) -> None:
        """Called once when a connection reaches CLOSED (subclasses drop routing state)."""

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self.outbox.entries.clear()
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        self.sock.close()
        if not self.released.done() and not self.loop.is_closed():
            self.released.set_result(None)


class ClientDriver(Driver):
    """One client connection over a connected UDP socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, conn: Connection,
                 gro: bool = True):
        super().__init__(loop, sock, gro)
        self.conn = conn
        self.dropped = 0

    def route_batch(self, batch: list, now: float) -> Iterable[Connection]:
        mine, dropped = own_records(batch, self.conn.local_cid)
        self.dropped += dropped
        if not mine:
            return ()
        self.conn.receive_datagrams(mine, now)
        return (self.conn,)

    def port_unreachable(self) -> None:
        self.conn.port_unreachable(self.loop.time())     # ends a handshake that heard nothing yet
        self.touch(self.conn)

    def connection_ended(self, conn: Connection) -> None:
        # The socket is this connection's alone: send its last datagrams (they are queued
        # already) and release the socket now, not on a later loop pass that a loop about to
        # stop may never run (the descriptor would then wait for the garbage collector).
        try:
            self.outbox.send()
        except OSError:
            pass                  # the peer learns of the end from its idle timeout instead
        self.close()


class ServerDriver(Driver):
    """Many server connections over one bound UDP socket, demultiplexed by ServerEndpoint."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, endpoint: ServerEndpoint,
                 on_new: Callable[[Connection], None],
                 on_ended: Optional[Callable[[Connection], None]] = None, gro: bool = False):
        super().__init__(loop, sock, gro)
        self.endpoint = endpoint
        self._on_new = on_new
        self._on_ended = on_ended
        self._refill_scheduled = False
        self._schedule_refill()

    def route_batch(self, batch: list, now: float) -> Iterable[Connection]:
        touched, new = self.endpoint.receive_batch(batch, now)
        if self.endpoint.replies:          # REJECT, COOKIE, RESET: stateless answers
            self.outbox.entries.extend((d, addr, 0) for d, addr in self.endpoint.replies)
            self.endpoint.replies.clear()
        for conn in new:
            self._on_new(conn)
        if new and not self._refill_scheduled:
            self._schedule_refill()
        return touched

    def _schedule_refill(self) -> None:
        """Make server hello keys ahead of need (stcp.keypool), a few per loop pass after the
        datagrams already waiting, so a hello finds its key made and waits for no key generation."""
        if not self.closed and self.endpoint.ephemeral_keys.wanted:
            self._refill_scheduled = True
            self.loop.call_soon(self._refill_keys)

    def _refill_keys(self) -> None:
        self._refill_scheduled = False
        if not self.closed:
            self.endpoint.ephemeral_keys.refill()
            self._schedule_refill()

    def peer_address(self, conn: Connection) -> Optional[Hashable]:
        return self.endpoint.peer_addr.get(conn.local_cid)

    def connection_ended(self, conn: Connection) -> None:
        self.endpoint.remove(conn)
        if self._on_ended is not None:
            self._on_ended(conn)

    def close(self) -> None:
        for conn in list(self.endpoint.connections.values()):
            if not conn.is_closed:
                conn.close(reason="server shutting down")
                self._service(conn, self.loop.time())
        self._send_backlog()
        self.endpoint.ephemeral_keys.clear()
        super().close()


class SocketDatapath:
    """The plain UDP socket datapath (a stcp.datapath.base.Datapath): nothing in the kernel
    but the socket.

    gro: receive through UDP GRO. Pass False only when a filter that runs after GRO (an
    XDP program in generic mode) cannot take coalesced datagrams; the STCP program
    (stcp-loader) takes a batch of one connection's records whole. sock: serve on this
    bound socket instead of binding one."""

    name = "socket"
    iface: Optional[str] = None

    def __init__(self, gro: bool = True, sock: Optional[socket.socket] = None):
        self.gro = gro
        self.sock = sock

    def server_config(self, config: Config) -> Config:
        return cid_layout.for_worker(config, None)       # a server id, if it has one

    def worker_gone(self, worker: int) -> bool:
        """A lone process has no sibling: a CID naming another worker is nobody's."""
        return True

    def open_driver(self, loop: asyncio.AbstractEventLoop, host: str, port: int, endpoint: ServerEndpoint,
                    on_new: Callable[[Connection], None],
                    on_ended: Optional[Callable[[Connection], None]]) -> ServerDriver:
        sock = self.sock or bind_udp(host, port)
        return ServerDriver(loop, sock, endpoint, on_new, on_ended, gro=self.gro)

    def server_hooks(self) -> Tuple[object, ...]:
        return ()

    def close(self) -> None:
        pass
