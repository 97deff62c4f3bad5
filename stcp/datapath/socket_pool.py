"""The socket datapath as N worker processes on one UDP port (`stcp serve --workers N`).

Supervisor side, SocketPoolKernel (a stcp.supervisor.PoolKernel): loads the reuseport
steering (stcp/datapath/reuseport.py: a REUSEPORT_SOCKARRAY and an SK_REUSEPORT program,
which needs CAP_BPF) and hands its fds to every worker. Worker side, SocketWorkerDatapath
(a stcp.datapath.base.Datapath): binds an SO_REUSEPORT socket to the pool's port and joins
the steering at its worker's key; every CID it picks carries its worker byte
(stcp.cid_layout), so the program sends every record of its connections to its socket.
Hellos reach the workers by the kernel's 4-tuple hash; whoever gets one owns the
connection. The workers share the identity key (the supervisor hands it down) and nothing
else.

A worker that dies closes its socket, which empties its key: from then on its records go
by the kernel's hash to a live worker, which finds the key empty (worker_gone) and answers
with a stateless RESET, so the dead worker's clients learn at once that their connections
are gone; the replacement joins the same key and answers its predecessor's CIDs the same
way. No other connection notices. A worker never answers for a CID whose key holds a live
socket: that connection is alive in a sibling (PROTOCOL.md section 5.7).
"""
from __future__ import annotations

import asyncio
import socket
from typing import Callable, Hashable, List, Optional, Tuple

from .. import cid_layout
from ..connection import Config, Connection
from ..endpoint import ServerEndpoint
from .reuseport import MAX_WORKERS, ReuseportError, ReuseportSteering
from .socket import ServerDriver, SocketDatapath, bind_udp, resolve


def free_port(host: str) -> int:
    """A UDP port free on host now, for a pool told to serve on port 0: the supervisor picks
    it once, so that every worker binds the same one."""
    family, sockaddr = resolve(host, 0)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind(sockaddr)
        return int(s.getsockname()[1])


class SocketPoolKernel:
    """The socket pool's part in the kernel: the steering, loaded once (module docstring)."""

    datapath = "socket"

    def __init__(self, steering: ReuseportSteering, port: int):
        self.steering = steering
        self.port = port

    @classmethod
    def load(cls, host: str, port: int, nworkers: int) -> "SocketPoolKernel":
        """ReuseportError (one line) where the program cannot be loaded."""
        if not 1 <= nworkers <= MAX_WORKERS:
            raise ReuseportError(f"--workers {nworkers}: a connection ID names 1 to {MAX_WORKERS} workers")
        steering = ReuseportSteering.load()
        return cls(steering, port or free_port(host))

    def describe(self, nworkers: int) -> str:
        return (f"socket pool: {nworkers} workers on port {self.port}, records steered by connection ID "
                f"(SO_REUSEPORT program id {self.steering.prog_id})")

    def worker_fds(self) -> Tuple[int, ...]:
        return self.steering.fds()

    def worker_died(self, worker: int) -> Optional[str]:
        return None                   # its socket closed with it, emptying its key (module docstring)

    def close(self) -> None:
        self.steering.close()


class WorkerServerDriver(ServerDriver):
    """ServerDriver counting what a pool's worker metrics show (stcp.metrics.workers)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, endpoint: ServerEndpoint,
                 on_new: Callable[[Connection], None], on_ended: Optional[Callable[[Connection], None]],
                 gro: bool = False):
        self.connections_accepted = 0
        self.rx_socket = 0                # datagrams received (a GRO buffer counts its segments)
        self.tx_socket = 0                # datagrams sent

        def counted_new(conn: Connection) -> None:
            self.connections_accepted += 1
            on_new(conn)

        super().__init__(loop, sock, endpoint, counted_new, on_ended, gro=gro)

    def _recv_batch(self) -> list:
        batch = super()._recv_batch()
        self.rx_socket += sum(-(-len(e[0]) // e[2]) if len(e) == 3 and e[2] else 1 for e in batch)
        return batch

    def _send_group(self, datagrams: List[bytes], addr: Optional[Hashable], segment_size: int = 0) -> int:
        sent = super()._send_group(datagrams, addr, segment_size)
        self.tx_socket += sum(-(-len(d) // segment_size) for d in datagrams[:sent]) if segment_size else sent
        return sent


class SocketWorkerDatapath(SocketDatapath):
    """Worker `worker` of a socket pool: its SO_REUSEPORT socket in the steering."""

    def __init__(self, steering: ReuseportSteering, worker: int, gro: bool = True):
        super().__init__(gro=gro)
        self.steering = steering
        self.worker = worker

    @classmethod
    def join(cls, fds: Tuple[int, ...], worker: int) -> "SocketWorkerDatapath":
        """The datapath of worker `worker`, from the steering fds its supervisor passed."""
        if len(fds) != 3:
            raise ReuseportError(f"worker {worker}: expected the 3 steering fds from the supervisor, got {len(fds)}")
        return cls(ReuseportSteering.from_fds(*fds), worker)

    def server_config(self, config: Config) -> Config:
        return cid_layout.for_worker(config, self.worker)

    def worker_gone(self, worker: int) -> bool:
        """No socket at worker's key: no live process owns its CIDs (a lookup failure
        counts as alive: when in doubt, no RESET)."""
        try:
            return self.steering.cookie(worker) is None
        except (OSError, ReuseportError):
            return False

    def open_driver(self, loop: asyncio.AbstractEventLoop, host: str, port: int, endpoint: ServerEndpoint,
                    on_new: Callable[[Connection], None],
                    on_ended: Optional[Callable[[Connection], None]]) -> ServerDriver:
        sock = bind_udp(host, port, reuse_port=True)
        try:
            self.steering.join(self.worker, sock)
        except BaseException:
            sock.close()
            raise
        return WorkerServerDriver(loop, sock, endpoint, on_new, on_ended, gro=self.gro)

    def close(self) -> None:
        self.steering.close()
