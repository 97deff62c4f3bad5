"""The AF_XDP datapath (first slice): good records arrive through AF_XDP sockets, replies
leave through the kernel UDP socket.

Receive: the XDP program is compiled with -DSTCP_AFXDP (bpf/stcp_xdp.c), so every record
that passes all of its checks is redirected to the stcp_xsks XSKMAP entry of the RX queue
it arrived on. One stcp._xsk.XskSocket per RX queue sits in that map; the loop reads each
with add_reader and feeds the batches to the ServerEndpoint as the socket datapath does.
A queue without a socket falls back to XDP_PASS, i.e. to the UDP socket, which the driver
keeps reading too (and counts: `rx_socket`).

Transmit: through the UDP socket bound to the server's port (Driver._send_group,
sendmmsg). AF_XDP transmit on veth is unproven here (see docs/OPERATIONS.md, "AF_XDP
datapath"), and the kernel builds the headers and checksums.

Not yet: one worker process per RX queue with CID-steered redirect, worker restart.
Everything here runs in the server's one process.

Every setup failure raises AfxdpSetupError with one line that says what to use instead.
"""
from __future__ import annotations

import asyncio
import glob
import logging
import os
import socket
import struct
from typing import Callable, Dict, List, Optional

from ..connection import Connection
from ..endpoint import ServerEndpoint
from .socket import RECV_BATCH, RECV_ROUNDS, ServerDriver
from .xdp import (XSK_MAX, XdpAlreadyAttached, XdpDatapath, XdpSetupError, _map_fd_by_id, _map_update,
                  map_info, prog_info)

log = logging.getLogger("stcp.datapath.afxdp")

XSKMAP_NAME = "stcp_xsks"
BPF_MAP_TYPE_XSKMAP = 17
# Rings of 4096 (RX and fill) and 8192 4-KiB frames (32 MiB of UMEM per queue): a burst of
# a full congestion window must fit, as SOCKET_BUFFER lets it fit in the UDP socket.
XSK_DEFAULTS = {"ring_size": 4096, "frame_count": 8192}
FALLBACK = "use --datapath xdp (kernel UDP socket behind the XDP filter) or --datapath socket"


class AfxdpSetupError(XdpSetupError):
    """AF_XDP cannot be set up here; str() is one line naming the datapath to use instead."""


def load_xsk():
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


class AfxdpDatapath:
    """The afxdp variant of the XDP program on one interface, and an AF_XDP socket per RX
    queue in its XSKMAP. close() closes the sockets and detaches the program."""

    def __init__(self, xdp: XdpDatapath, xsks: list, xskmap_fd: int):
        self.xdp = xdp
        self.xsks = xsks
        self._xskmap_fd = xskmap_fd

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
             queues: Optional[int] = None, **xsk_kw) -> "AfxdpDatapath":
        if os.geteuid() != 0:
            raise AfxdpSetupError(f"the afxdp datapath needs root (CAP_NET_ADMIN, CAP_BPF) to attach XDP and "
                                  f"create AF_XDP sockets; run it with sudo, or {FALLBACK}")
        xsk_mod = load_xsk()
        kw = {} if max_record_len is None else {"max_record_len": max_record_len}
        try:
            xdp = XdpDatapath.attach(iface, port, mode, afxdp=True, **kw)
        except XdpAlreadyAttached as e:
            raise AfxdpSetupError(f"{e} (the afxdp datapath attaches its own program variant); "
                                  f"or {FALLBACK}") from None
        except XdpSetupError as e:
            raise AfxdpSetupError(f"XDP attach for AF_XDP failed: {e}; {FALLBACK}") from None
        xsks: list = []
        mfd = -1
        try:
            mfd = _find_xskmap(xdp)
            n = queues or rx_queue_count(iface)
            for q in range(n):
                try:
                    x = xsk_mod.XskSocket(iface, q, **{**XSK_DEFAULTS, **xsk_kw})
                except OSError as e:
                    raise AfxdpSetupError(f"cannot create an AF_XDP socket on {iface} queue {q} ({e}); "
                                          f"{FALLBACK}") from None
                xsks.append(x)
                _map_update(mfd, struct.pack("=I", q), struct.pack("=I", x.fileno()))
        except BaseException:
            for x in xsks:
                x.close()
            if mfd >= 0:
                os.close(mfd)
            xdp.close()
            raise
        log.info("AF_XDP on %s: %d queue(s), %s mode, %s", iface, len(xsks), xdp.mode,
                 "zero-copy" if all(x.zerocopy for x in xsks) else "copy")
        return cls(xdp, xsks, mfd)

    # the live-connection table, as XdpDatapath (the cli's hooks call these)
    def add_cid(self, cid: int) -> None:
        self.xdp.add_cid(cid)

    def remove_cid(self, cid: int) -> None:
        self.xdp.remove_cid(cid)

    def counters(self):
        return self.xdp.counters()

    def stats(self) -> Dict[str, int]:
        """XSK counters summed over the queues."""
        out: Dict[str, int] = {}
        for x in self.xsks:
            if not x.closed:
                for k, v in x.stats().items():
                    out[k] = out.get(k, 0) + v
        return out

    async def start_server(self, handler, host: str, port: int, *, config=None, hooks=(),
                           max_connections: int = 100_000):
        """api.start_server, with the AF_XDP receive path."""
        from ..api import Server, bind_udp, make_config
        loop = asyncio.get_running_loop()
        config = config or make_config(None)
        sock = bind_udp(host, port)
        endpoint = ServerEndpoint(config, max_connections=max_connections)
        server = Server(loop, None, handler, hooks)
        server.driver = AfxdpServerDriver(loop, sock, endpoint, server._on_new, server._on_ended, self.xsks)
        return server

    def close(self) -> None:
        for x in self.xsks:
            try:
                x.close()
            except Exception as e:  # busy in another thread: the fd closes with the process
                log.warning("closing AF_XDP socket: %s", e)
        if self._xskmap_fd >= 0:
            os.close(self._xskmap_fd)
            self._xskmap_fd = -1
        self.xdp.close()

    def __enter__(self) -> "AfxdpDatapath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _find_xskmap(xdp: XdpDatapath) -> int:
    """An fd of the attached program's stcp_xsks map."""
    for mid in prog_info(xdp._h.prog_fd)["map_ids"]:
        fd = _map_fd_by_id(mid)
        info = map_info(fd)
        if info["name"] == XSKMAP_NAME and info["type"] == BPF_MAP_TYPE_XSKMAP:
            return fd
        os.close(fd)
    raise AfxdpSetupError(f"the XDP program on {xdp.iface} has no {XSKMAP_NAME} map (bpf/ without the "
                          f"STCP_AFXDP variant?); {FALLBACK}")


class AfxdpServerDriver(ServerDriver):
    """ServerDriver whose datagrams arrive through AF_XDP sockets (and, for queues without
    one, the UDP socket); everything leaves through the UDP socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, endpoint: ServerEndpoint,
                 on_new: Callable[[Connection], None], on_ended: Optional[Callable[[Connection], None]],
                 xsks: List):
        super().__init__(loop, sock, endpoint, on_new, on_ended)
        self.xsks = list(xsks)
        # addresses as the UDP socket would report them, so replies go where they should
        self._v4mapped = sock.family == socket.AF_INET6
        self.rx_xsk = 0
        self.rx_xsk_wakeups = 0           # readiness callbacks on the AF_XDP sockets
        self.rx_socket = 0
        for x in self.xsks:
            loop.add_reader(x.fileno(), self._on_xsk_readable, x)

    def _recv_batch(self):
        batch = super()._recv_batch()
        self.rx_socket += len(batch)
        return batch

    def _on_xsk_readable(self, xsk) -> None:
        self.rx_xsk_wakeups += 1
        for _ in range(RECV_ROUNDS):
            try:
                batch = xsk.recv(RECV_BATCH, self._v4mapped)
            except (OSError, ValueError):
                break
            if not batch:
                break
            self.rx_xsk += len(batch)
            now = self.loop.time()
            for data, addr in batch:
                conn = self.route(data, addr, now)
                if conn is not None:
                    self._dirty[conn] = None
            if len(batch) < RECV_BATCH:
                break
        self.flush()

    def close(self) -> None:
        if self.closed:
            return
        for x in self.xsks:
            if not x.closed:
                self.loop.remove_reader(x.fileno())
        super().close()
        log.info("AF_XDP driver: %d datagrams through AF_XDP, %d through the UDP socket",
                 self.rx_xsk, self.rx_socket)
