"""An AF_XDP worker pool without root: in-process "workers" (servers with the afxdp driver
class but no AF_XDP socket, so everything goes through their UDP socket), each serving its
registry on a unix socket as a worker process does, and the supervisor's exporter over
them. Used by tests/test_metrics_workers.py and, for the dashboards, tests/test_metrics.py."""
from __future__ import annotations

import os
from typing import Dict, List

import stcp
from stcp.metrics import serve_pool_metrics, serve_worker_metrics
from stcp.supervisor import WorkerSlot
from tests.support.metrics import fake_xdp_collector
from tests.support.servers import echo, quiet, transfer


class NoXskDatapath:
    """The afxdp datapath's driver with no AF_XDP socket (a stcp.datapath.base.Datapath):
    every datagram goes through its UDP socket, counted as a worker counts it."""

    name = "afxdp"
    iface = None

    def server_config(self, config):
        return config

    def open_driver(self, loop, host, port, endpoint, on_new, on_ended):
        from stcp.datapath.afxdp import AfxdpServerDriver
        from stcp.datapath.socket import bind_udp
        return AfxdpServerDriver(loop, bind_udp(host, port), endpoint, on_new, on_ended, [])

    def server_hooks(self):
        return ()

    def close(self):
        pass


class FakeWorker:
    """A server with the AF_XDP driver class and no AF_XDP socket, serving its metrics on
    a unix socket as a worker of `stcp serve --datapath afxdp --workers N --metrics ADDR` does."""

    def __init__(self, directory: str, w: int, pid: int, key: bytes):
        self.directory, self.w, self.pid, self.key = directory, w, pid, key
        self.server = self.metrics = None

    async def start(self) -> "FakeWorker":
        srv = await stcp.serve(echo, "127.0.0.1", 0, datapath=NoXskDatapath(), server_key=self.key)
        self.server = srv
        self.metrics = serve_worker_metrics(srv, self.directory, self.w,
                                            path=os.path.join(self.directory, f"w{self.w}-{self.pid}.sock"))
        return self

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    @property
    def path(self) -> str:
        return self.metrics.http.path

    def kill(self) -> None:
        """As SIGKILL would: the exporter goes, the connections vanish without a word."""
        self.metrics.close()
        self.server.driver.close()         # no CLOSE sent, no connection_ended hook

    def stop(self) -> None:
        if self.server is not None:
            self.metrics.close()
            self.server.close()


class FakePool:
    def __init__(self, directory: str, n: int):
        self.directory = directory
        self.workers: Dict[int, FakeWorker] = {}
        self.alive: Dict[int, bool] = {}
        self.restarts = {w: 0 for w in range(n)}
        self.n = n
        self._pid = 1000
        self.key = stcp.generate_private_key()         # a pool's workers share one identity
        self.public_key = stcp.public_key(self.key)

    async def spawn(self, w: int) -> FakeWorker:
        self._pid += 1
        self.workers[w] = await FakeWorker(self.directory, w, self._pid, self.key).start()
        self.alive[w] = True
        return self.workers[w]

    def slots(self) -> List[WorkerSlot]:
        return [WorkerSlot(w, self.workers[w].pid, self.alive[w], self.workers[w].path, self.restarts[w])
                for w in range(self.n) if w in self.workers]


def pool_exporter(pool: FakePool, xdp: bool = True):
    return serve_pool_metrics(pool.slots, "127.0.0.1:0", "afxdp", "aes-256-gcm",
                              kernel=fake_xdp_collector() if xdp else None)


async def fake_pool_with_traffic(directory: str, xdp: bool = False):
    """A 2-worker fake pool and its supervisor exporter, with a transfer through each worker
    (for the dashboard tests in tests/test_metrics.py). Returns (exporter, pool); close both."""
    pool = FakePool(directory, 2)
    for w in range(2):
        await pool.spawn(w)
    for w in range(2):
        await transfer(pool.workers[w].port, os.urandom(3000 * (w + 1)), pool.public_key)
        await quiet(pool.workers[w].server)
    return pool_exporter(pool, xdp=xdp), pool


def close_pool(exporter, pool: FakePool) -> None:
    exporter.close()
    for fw in pool.workers.values():
        fw.stop()
