"""The AF_XDP datapath: good records arrive through AF_XDP sockets, one per RX queue.

Receive: the XDP program is compiled with -DSTCP_AFXDP (bpf/stcp_xdp.c), so every record
that passes all of its checks is redirected to the stcp_xsks XSKMAP entry of the RX queue
it arrived on (see "Steering" below). One stcp._xsk.XskSocket per RX queue sits in that
map; the loop reads each with add_reader and hands the batches to the ServerEndpoint, so
they take the same C receive path as the socket datapath's (group_by_cid, open_records).
A queue without a socket falls back to XDP_PASS, i.e. to the UDP socket, which the driver
keeps reading too (and counts: `rx_socket`).

Transmit: by default through the UDP socket bound to the server's port (Driver._send_group:
sendmmsg, bulk runs as GSO buffers), the kernel building headers and checksums. With
tx="afxdp" (`--afxdp-tx afxdp`) replies go out on the TX ring of the AF_XDP socket the
peer's records arrive on, headers built in C from the received frame; see
docs/OPERATIONS.md, "The AF_XDP datapath", for why that stays opt-in.

Workers (`--workers N`, N > 1): a supervisor (stcp.supervisor) attaches the program
(attach_program) and runs N worker processes, each joining it (AfxdpDatapath.join); worker
W owns the AF_XDP sockets of the RX queues q with q % N == W and its own UDP socket on the
port (SO_REUSEPORT). A worker that
dies is reported and replaced; its connections are lost (their peers time out), the other
workers' carry on.

Steering by connection ID: every server CID carries its worker's number in the top
wire.CID_WORKER_BITS (8) bits, then the server id if it has one, the rest random
(stcp.cid_layout, docs/PROTOCOL.md 3.1.1); serving alone is worker 0 of 1. The loader
writes N into stcp_config.nworkers. The kernel redirects a
frame only into the AF_XDP socket bound to the queue it arrived on, so the program cannot
move a record to its worker; it checks instead. A client hello goes to its arrival
queue's socket, and that queue's worker creates the connection and names itself in the
CID. A data record for a live CID goes to its arrival queue's socket if the CID's worker
owns that queue, and is dropped and counted as drop_wrong_worker otherwise. So a
connection is owned by the worker of the queue its flow hashes to (RSS on a NIC, the
peer's TX queue on veth), all its records reach that worker and no other, and the workers
share no connection state. Limit: a flow whose RX queue changes mid-connection (RSS
indirection table rewritten, queue count changed, the peer's port or address changed)
has its records dropped from then on, counted as drop_wrong_worker, until its idle timeout
ends it.

With --metrics the supervisor serves /metrics and reads each worker's counters from a unix
socket at scrape time (stcp.metrics); this module knows nothing of metrics.

Every setup failure raises AfxdpSetupError with one line that says what to use instead.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, Iterable, Iterator, List, Optional, Tuple

from .. import cid_layout, wire
from ..connection import Config, Connection
from ..endpoint import ServerEndpoint
from ..wire import MAX_CID_WORKERS
from . import bpf
from .base import LiveCidHooks
from .errors import XdpAlreadyAttached, XdpSetupError
from .socket import RECV_ROUNDS, ServerDriver, bind_udp
from .xdp import XdpDatapath
from .xdp_prog import XSK_MAX, require_privileges

if TYPE_CHECKING:
    from .._xsk import XskSocket

log = logging.getLogger("stcp.datapath.afxdp")

XSKMAP_NAME = "stcp_xsks"
BPF_MAP_TYPE_XSKMAP = 17
# Rings of 4096 (RX and fill) and 8192 4-KiB frames (32 MiB of UMEM per queue): a burst of
# a full congestion window must fit, as SOCKET_BUFFER lets it fit in the UDP socket.
XSK_DEFAULTS = {"ring_size": 4096, "frame_count": 8192}
# Frames taken off an RX ring per recv(): one flow's consecutive datagrams become one entry
# (stcp/_ext/xsk_gro.c), so the Python work per call is per connection, not per frame,
# and a larger batch costs little more than a small one.
XSK_RECV_BATCH = 256
RX_GRO_MAX = 64                   # datagrams joined into one entry (RX_GRO_MAX in xsk_gro.h)
FALLBACK = "use --datapath xdp (kernel UDP socket behind the XDP filter) or --datapath socket"
TX_PATHS = ("socket", "afxdp")


class AfxdpSetupError(XdpSetupError):
    """AF_XDP cannot be set up here; str() is one line naming the datapath to use instead."""


def load_xsk() -> Any:
    """The stcp._xsk extension, or AfxdpSetupError saying how to get it."""
    try:
        from .. import _xsk
    except ImportError as e:
        raise AfxdpSetupError(f"the afxdp datapath needs the stcp._xsk extension, which this install lacks ({e}; "
                              "install libxdp-dev and libbpf-dev with 'sudo make system-deps', then "
                              f"'pip install -e .'); {FALLBACK}") from None
    return _xsk


def rx_queue_count(iface: str) -> int:
    """RX queues of iface in this network namespace (/sys/class/net/IFACE/queues/rx-N)."""
    n = len(glob.glob(f"/sys/class/net/{iface}/queues/rx-*"))
    return max(1, min(n, XSK_MAX))


def require_afxdp_privileges(what: str) -> None:
    """AfxdpSetupError unless this process has the capabilities of the afxdp datapath."""
    try:
        require_privileges(what, "afxdp")
    except XdpSetupError as e:
        raise AfxdpSetupError(f"{e}; or {FALLBACK}") from None


def attach_program(iface: str, port: int, mode: str = "auto", nworkers: int = 1,
                   max_record_len: Optional[int] = None, xdp_kw: Optional[Dict[str, Any]] = None) -> XdpDatapath:
    """Attach the afxdp variant of the XDP program to iface, steering over nworkers workers
    (each owning whole RX queues, so at most one per queue), through a BPF link (see
    XdpDatapath.attach). xdp_kw goes to XdpDatapath.attach (hs_rate, hs_burst, max_cids,
    ...). AfxdpSetupError says what to do."""
    require_afxdp_privileges("the afxdp datapath (attaching XDP, creating AF_XDP sockets)")
    load_xsk()
    if nworkers > 1:
        queues = rx_queue_count(iface)
        if nworkers > MAX_CID_WORKERS:
            raise AfxdpSetupError(f"--workers {nworkers}: a connection ID names at most {MAX_CID_WORKERS} workers")
        if nworkers > queues:
            raise AfxdpSetupError(f"--workers {nworkers} exceeds the {queues} RX queue(s) of {iface} (a worker "
                                  f"owns whole queues); use --workers {queues} or fewer")
    kw = dict(xdp_kw or {})
    if max_record_len is not None:
        kw["max_record_len"] = max_record_len
    try:
        return XdpDatapath.attach(iface, port, mode, afxdp=True, nworkers=nworkers, link=True, **kw)
    except XdpAlreadyAttached as e:
        raise AfxdpSetupError(f"{e} (the afxdp datapath attaches its own program variant); "
                              f"or {FALLBACK}") from None
    except XdpSetupError as e:
        raise AfxdpSetupError(f"XDP attach for AF_XDP failed: {e}; {FALLBACK}") from None


class AfxdpDatapath:
    """The afxdp variant of the XDP program on one interface, and an AF_XDP socket per RX
    queue in its XSKMAP. close() closes the sockets and detaches the program.

    As a server's Datapath (stcp.datapath.base): records in through the AF_XDP sockets (and
    the UDP socket for queues without one), replies out through the UDP socket or, with
    tx="afxdp", the TX ring of the AF_XDP socket the peer's records arrive on."""

    name = "afxdp"

    def __init__(self, xdp: XdpDatapath, xsks: list, xskmap_fd: int, worker: Optional[str] = None,
                 tx: str = "socket"):
        if tx not in TX_PATHS:
            raise ValueError(f"tx must be 'socket' or 'afxdp', not {tx!r}")
        self.xdp = xdp
        self.xsks = xsks
        self._xskmap_fd = xskmap_fd
        self.worker = worker              # "W/N" in a worker process, None when serving alone
        self.tx = tx
        # the worker number the server's CIDs carry (wire.CID_WORKER_BITS); serving alone is
        # worker 0 of 1
        self.worker_index = 0 if worker is None else int(worker.split("/")[0])
        self._lock_fd = -1
        self._tag = 1
        self._final_stats: Optional[Dict[str, int]] = None
        if worker is not None:
            # workers share the kernel's CID prefilter words (read-modify-write): serialise
            self._lock_fd = cid_lock_fd(xdp.prog_id)
            self._tag = worker_tag(self.worker_index)

    @property
    def iface(self) -> str:
        return self.xdp.iface

    @property
    def mode(self) -> str:
        return self.xdp.mode

    @property
    def zerocopy(self) -> bool:
        return bool(self.xsks) and all(x.zerocopy for x in self.xsks)

    @classmethod
    def open(cls, iface: str, port: int, mode: str = "auto", max_record_len: Optional[int] = None,
             queues: Optional[int] = None, xdp_kw: Optional[Dict[str, Any]] = None, tx: str = "socket",
             **xsk_kw: Any) -> "AfxdpDatapath":
        """Attach the afxdp program variant to iface and open an AF_XDP socket per RX queue
        (or the first `queues`). xdp_kw goes to XdpDatapath.attach (hs_rate, hs_burst,
        max_cids, ...); xsk_kw to stcp._xsk.XskSocket."""
        if tx not in TX_PATHS:
            raise ValueError(f"tx must be 'socket' or 'afxdp', not {tx!r}")
        xdp = attach_program(iface, port, mode, 1, max_record_len, xdp_kw)
        xsks, mfd = _open_sockets(load_xsk(), xdp, iface, range(queues or rx_queue_count(iface)),
                                  lambda q, e: f"cannot create an AF_XDP socket on {iface} queue {q} ({e}); "
                                               f"{FALLBACK}", xsk_kw)
        log.info("AF_XDP on %s: %d queue(s), %s mode, %s", iface, len(xsks), xdp.mode,
                 "zero-copy" if all(x.zerocopy for x in xsks) else "copy")
        return cls(xdp, xsks, mfd, tx=tx)

    @classmethod
    def join(cls, iface: str, port: int, worker: int, nworkers: int, tx: str = "socket",
             **xsk_kw: Any) -> "AfxdpDatapath":
        """In worker process `worker` of `nworkers`: the program the supervisor attached, and
        AF_XDP sockets for this worker's RX queues (q % nworkers == worker)."""
        if tx not in TX_PATHS:
            raise ValueError(f"tx must be 'socket' or 'afxdp', not {tx!r}")
        xsk_mod = load_xsk()
        require_afxdp_privileges(f"worker {worker} of the afxdp datapath (joining XDP, creating AF_XDP sockets)")
        try:
            xdp = XdpDatapath.open(iface)
        except XdpSetupError as e:
            raise AfxdpSetupError(f"worker {worker}: {e}") from None
        if xdp.port != port:
            xdp.close()
            raise AfxdpSetupError(f"worker {worker}: the program on {iface} serves port {xdp.port}, not {port}")
        if xdp.config.get("nworkers") != nworkers:
            xdp.close()
            raise AfxdpSetupError(f"worker {worker}: the program on {iface} steers over "
                                  f"{xdp.config.get('nworkers')} worker(s), not {nworkers}")
        own = [q for q in range(rx_queue_count(iface)) if q % nworkers == worker]
        xsks, mfd = _open_sockets(xsk_mod, xdp, iface, own,
                                  lambda q, e: f"worker {worker}: cannot create an AF_XDP socket on {iface} "
                                               f"queue {q} ({e})", xsk_kw)
        return cls(xdp, xsks, mfd, worker=f"{worker}/{nworkers}", tx=tx)

    # -- a server's datapath (stcp.datapath.base.Datapath) --------------------------------
    def server_config(self, config: Config) -> Config:
        # every CID this server picks names this worker in its top bits: the XDP program
        # delivers a connection's records only on the queues of the worker named there
        return cid_layout.for_worker(config, self.worker_index)

    def open_driver(self, loop: asyncio.AbstractEventLoop, host: str, port: int, endpoint: ServerEndpoint,
                    on_new: Callable[[Connection], None],
                    on_ended: Optional[Callable[[Connection], None]]) -> "AfxdpServerDriver":
        sock = bind_udp(host, port, reuse_port=self.worker is not None)
        driver = AfxdpServerDriver(loop, sock, endpoint, on_new, on_ended, self.xsks, tx=self.tx)
        # the program's cookie keys: serving alone only (workers each hold secrets of their own)
        self.xdp.serve_endpoint(loop, endpoint, driver, cookies=self.worker is None and self.xdp.kernel_cookies)
        return driver

    def server_hooks(self) -> Tuple[object, ...]:
        return (LiveCidHooks(self, touch=self.xdp.touch),)

    # -- the live-connection table, as XdpDatapath -------------------------------------
    @contextlib.contextmanager
    def _cid_lock(self) -> Iterator[None]:
        if self._lock_fd < 0:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def add_cid(self, cid: int) -> bool:
        with self._cid_lock():
            return self.xdp.add_cid(cid, self._tag)

    def add_half_open(self, cid: int) -> None:
        with self._cid_lock():
            self.xdp.add_half_open(cid, self._tag)

    def promote(self, cid: int) -> bool:
        with self._cid_lock():
            return self.xdp.promote(cid, self._tag)

    def remove_cid(self, cid: int) -> None:
        with self._cid_lock():
            self.xdp.remove_cid(cid)

    def counters(self) -> Dict[str, Tuple[int, int]]:
        return self.xdp.counters()

    def hand_over(self, uid: int, gid: int) -> None:
        """As XdpDatapath.hand_over: the AF_XDP sockets, their rings and the XSKMAP are
        file descriptors already; the CID lock file is held open."""
        self.xdp.hand_over(uid, gid)

    def stats(self) -> Dict[str, int]:
        """XSK counters summed over the queues (their last values once closed)."""
        if self._final_stats is not None:
            return dict(self._final_stats)
        out: Dict[str, int] = {}
        for x in self.xsks:
            if not x.closed:
                for k, v in x.stats().items():
                    out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        if self._final_stats is None:
            self._final_stats = self.stats()
        for x in self.xsks:
            try:
                x.close()
            except Exception as e:  # busy in another thread: the fd closes with the process
                log.warning("closing AF_XDP socket: %s", e)
        if self._xskmap_fd >= 0:
            os.close(self._xskmap_fd)
            self._xskmap_fd = -1
        with self._cid_lock():
            self.xdp.close()              # a worker's: removes only the CIDs it added
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> "AfxdpDatapath":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_xskmap(xdp: XdpDatapath) -> int:
    """An fd of the attached program's stcp_xsks map: the one we hold if we compiled it
    (xdp_prog.handles_of), else opened by id."""
    held = xdp.handles.maps.get(XSKMAP_NAME)
    if held is not None:
        return os.dup(held)
    for mid in bpf.prog_info(xdp.handles.prog_fd)["map_ids"]:
        fd = bpf.map_fd_by_id(mid)
        info = bpf.map_info(fd)
        if info["name"] == XSKMAP_NAME and info["type"] == BPF_MAP_TYPE_XSKMAP:
            return fd
        os.close(fd)
    raise AfxdpSetupError(f"the XDP program on {xdp.iface} has no {XSKMAP_NAME} map (bpf/ without the "
                          f"STCP_AFXDP variant?); {FALLBACK}")


class AfxdpServerDriver(ServerDriver):
    """ServerDriver whose datagrams arrive through AF_XDP sockets (and, for queues without
    one, the UDP socket); replies leave through the UDP socket, or with tx="afxdp" the TX ring."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, endpoint: ServerEndpoint,
                 on_new: Callable[[Connection], None], on_ended: Optional[Callable[[Connection], None]],
                 xsks: List, tx: str = "socket"):
        self.connections_accepted = 0

        def counted_new(conn: Connection) -> None:
            self.connections_accepted += 1
            on_new(conn)

        super().__init__(loop, sock, endpoint, counted_new, on_ended)
        self.xsks = list(xsks)
        # addresses as the UDP socket would report them, so replies go where they should
        self._v4mapped = sock.family == socket.AF_INET6
        self.rx_xsk = 0
        self.rx_xsk_wakeups = 0           # readiness callbacks on the AF_XDP sockets
        self.rx_xsk_batches = 0           # recv() calls that returned entries (each one flushed)
        self.rx_xsk_entries = 0           # ... and the entries they returned
        self.rx_per_queue: Dict[int, int] = {x.queue_id: 0 for x in self.xsks}
        if tx not in ("socket", "afxdp"):
            raise ValueError(f"tx must be 'socket' or 'afxdp', not {tx!r}")
        self.tx_afxdp = tx == "afxdp"
        if self.tx_afxdp:
            self.gso = False              # the TX ring takes whole datagrams, not GSO buffers
        self.tx_xsk = 0                   # datagrams sent on an AF_XDP TX ring
        self.tx_socket = 0                # ... and through the UDP socket
        # peer address -> (the AF_XDP socket it arrived on, headers of a reply to it)
        self._routes: Dict[object, tuple] = {}
        self.rx_socket = 0
        for x in self.xsks:
            loop.add_reader(x.fileno(), self._on_xsk_readable, x)

    def _recv_batch(self) -> list:
        batch = super()._recv_batch()
        self.rx_socket += len(batch)
        return batch

    def _on_xsk_readable(self, xsk: XskSocket) -> None:
        self.rx_xsk_wakeups += 1
        for _ in range(RECV_ROUNDS):
            try:
                got = xsk.recv(XSK_RECV_BATCH, self._v4mapped, self.tx_afxdp)
            except (OSError, ValueError):
                break
            if self.tx_afxdp:
                batch, templates = got
            else:
                batch, templates = got, {}
            if not batch:
                break
            records = entry_records(batch)
            self.rx_xsk_batches += 1
            self.rx_xsk_entries += len(batch)
            self.rx_xsk += records
            self.rx_per_queue[xsk.queue_id] += records
            now = self.loop.time()
            for conn in self.route_batch(batch, now):
                self._dirty[conn] = None
                if self.tx_afxdp:      # replies leave where the connection's records arrive
                    addr = self.endpoint.peer_addr.get(conn.local_cid)
                    if addr in templates:
                        self._routes[addr] = (xsk, templates[addr])
            # answer (acks, credit) after every batch, as the socket datapath does: a sender
            # waiting on acks should not wait for the whole backlog to be read
            self.flush(now)
            if records < XSK_RECV_BATCH:
                break

    def _send_group(self, datagrams: List[bytes], addr: Optional[Hashable], segment_size: int = 0) -> int:
        route = self._routes.get(addr) if self.tx_afxdp else None
        n = 0
        if route is not None and not route[0].closed:
            try:
                n = route[0].send_udp(datagrams, route[1])
            except (OSError, ValueError):   # a datagram too long for a frame: the socket takes it
                n = 0
            self.tx_xsk += n
            if n == len(datagrams):
                return n
            datagrams = datagrams[n:]
        sent = super()._send_group(datagrams, addr, segment_size)
        # count datagrams, not GSO buffers
        self.tx_socket += wire.count_datagrams([(d, segment_size) for d in datagrams[:sent]]) \
            if segment_size else sent
        return n + sent

    def connection_ended(self, conn: Connection) -> None:
        addr = self.endpoint.peer_addr.get(conn.local_cid)
        super().connection_ended(conn)
        self._routes.pop(addr, None)

    def close(self) -> None:
        if self.closed:
            return
        for x in self.xsks:
            if not x.closed:
                self.loop.remove_reader(x.fileno())
        super().close()
        log.info("AF_XDP driver: %d datagrams through AF_XDP, %d through the UDP socket",
                 self.rx_xsk, self.rx_socket)


def entry_records(entries: list) -> int:
    """Records (datagrams on the wire) in recv() entries: (payload, addr) is one, (buffer,
    addr, segment_size) one per segment."""
    return sum(-(-len(e[0]) // e[2]) if len(e) == 3 else 1 for e in entries)


def _batch_segment(payload: bytes) -> int:
    """The segment size of a datagram holding several records back to back: its first
    record's size, when shorter than the datagram and at least a header and a tag; else 0."""
    if len(payload) < wire.HEADER_LEN + wire.AEAD_TAG_LEN:
        return 0
    length = int.from_bytes(payload[:8], "big")
    if length >= len(payload) - wire.HEADER_LEN or length < wire.AEAD_TAG_LEN:
        return 0
    return length + wire.HEADER_LEN


def rx_entries(frames: Iterable[bytes], v4mapped: bool = False, ifindex: int = 0, templates: bool = False,
               gro: bool = True) -> Any:
    """The pure-Python reference of what XskSocket.recv returns for these frames, in the
    order the RX ring held them (stcp/_ext/xsk_gro.c; tests/test_afxdp.py compares): frames
    that do not parse are skipped; one flow's consecutive datagrams (same link, IP and UDP
    headers) are joined into (buffer, addr, segment_size) as UDP GRO joins them, every one
    the size of the first but the last, which may be shorter and ends the entry, at most
    RX_GRO_MAX of them and wire.MAX_UDP_PAYLOAD bytes; a single datagram is (payload, addr);
    a datagram holding several records is an entry of its own, cut at its first record's
    size. With templates, (entries, {addr: the reply template of its last frame})."""
    xsk = load_xsk()
    out: list = []
    replies: dict = {}
    run: list = []                # the open entry: [flow, addr, segment size, payloads, closed]

    def flush() -> None:
        if run:
            _flow, addr, seg, pieces, _ = run
            out.append((b"".join(pieces), addr, seg) if len(pieces) > 1 else (pieces[0], addr))
            run.clear()

    for frame in frames:
        try:
            payload, addr = xsk.parse_frame(frame, v4mapped, ifindex)
        except ValueError:
            continue
        flow = xsk.reply_template(frame)      # every header field that makes a flow
        replies[addr] = flow
        seg = _batch_segment(payload)
        if seg or not gro:
            flush()
            out.append((payload, addr, seg) if seg else (payload, addr))
        elif (run and run[0] == flow and not run[4] and len(run[3]) < RX_GRO_MAX and len(payload) <= run[2]
              and sum(map(len, run[3])) + len(payload) <= wire.MAX_UDP_PAYLOAD):
            run[3].append(payload)
            run[4] = len(payload) < run[2]
        else:
            flush()
            run[:] = [flow, addr, len(payload), [payload], not payload]
    flush()
    return (out, replies) if templates else out


# --------------------------------------------------------------------------------------
# the workers' shared CID table: each worker tags its CIDs, and all of them (and the
# supervisor) change the table under one lock file per program
def cid_lock_path(prog_id: int) -> str:
    """The lock file of the program's CID table (the only place this path is written)."""
    return f"/run/stcp-afxdp-{prog_id}.lock"


def cid_lock_fd(prog_id: int) -> int:
    """The lock file the workers (and the supervisor) hold while changing the CID table."""
    return os.open(cid_lock_path(prog_id), os.O_RDWR | os.O_CREAT, 0o600)


def remove_cid_lock(prog_id: int) -> None:
    """Remove the lock file once the program is detached (nothing uses it any more)."""
    with contextlib.suppress(OSError):
        os.unlink(cid_lock_path(prog_id))


def worker_tag(w: int) -> int:
    """The value worker w stores with its CIDs in the kernel table (1 is the unworked default)."""
    return 2 + w % 254


def forget_worker_cids(xdp: XdpDatapath, w: int) -> List[int]:
    """Remove a dead worker's connection IDs (those carrying its tag) from the kernel table;
    return them."""
    fd = cid_lock_fd(xdp.prog_id)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        cids = xdp.cids_tagged(worker_tag(w))
        for cid in cids:
            xdp.remove_cid(cid)
    finally:
        os.close(fd)                  # releases the lock
    return cids


class AfxdpPoolKernel:
    """The AF_XDP pool's part in the kernel (a stcp.supervisor.PoolKernel): the afxdp
    program attach_program attached; a dead worker's CIDs leave its table."""

    datapath = "afxdp"

    def __init__(self, xdp: XdpDatapath):
        self.xdp = xdp
        self.port = xdp.port

    @classmethod
    def attach(cls, iface: str, port: int, mode: str, nworkers: int, max_record_len: Optional[int] = None,
               xdp_kw: Optional[Dict[str, Any]] = None) -> "AfxdpPoolKernel":
        return cls(attach_program(iface, port, mode, nworkers, max_record_len, xdp_kw))

    def describe(self, nworkers: int) -> str:
        return (f"AF_XDP supervisor on {self.xdp.iface}: {nworkers} workers over "
                f"{rx_queue_count(self.xdp.iface)} RX queue(s), XDP {self.xdp.mode} mode")

    def worker_fds(self) -> Tuple[int, ...]:
        return ()                     # each worker opens the program by its interface

    def worker_died(self, worker: int) -> Optional[str]:
        cids = forget_worker_cids(self.xdp, worker)
        return f"removed worker {worker}'s {len(cids)} connection ID(s) from the kernel table" if cids else None

    def close(self) -> None:
        prog_id = self.xdp.prog_id
        self.xdp.close()
        remove_cid_lock(prog_id)


def _open_sockets(xsk_mod: Any, xdp: XdpDatapath, iface: str, queues: Any,
                  describe_failure: Callable[[int, OSError], str], xsk_kw: Dict[str, Any]) -> Tuple[list, int]:
    """One AF_XDP socket per queue, each put into the program's XSKMAP; on any failure
    everything opened so far (and the XDP handle) is released. Returns (sockets, map fd)."""
    xsks: list = []
    mfd = -1
    try:
        mfd = find_xskmap(xdp)
        for q in queues:
            try:
                x = xsk_mod.XskSocket(iface, q, **{**XSK_DEFAULTS, **xsk_kw})
            except OSError as e:
                raise AfxdpSetupError(describe_failure(q, e)) from None
            xsks.append(x)
            bpf.map_update(mfd, struct.pack("=I", q), struct.pack("=I", x.fileno()))
    except BaseException:
        for x in xsks:
            x.close()
        if mfd >= 0:
            os.close(mfd)
        xdp.close()
        raise
    return xsks, mfd
