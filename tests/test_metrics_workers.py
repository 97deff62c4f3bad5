"""Metrics of the AF_XDP worker pool (`stcp serve --datapath afxdp --workers N --metrics ADDR`).

Without root: the supervisor's WorkerPoolCollector over in-process "workers" (servers with
the afxdp driver class but no AF_XDP socket, so everything goes through their UDP socket),
each serving its registry on a unix socket as a worker process does: the worker label, the
sums, and what happens when a slot's process is replaced (counters carried, never
backwards; its open connections closed as worker_died; up and restarts).

With root, bcc and stcp._xsk: a real 2-worker server on a 2-queue veth pair, clients in the
other namespace; per-worker counters against what the clients sent, then a worker killed
and replaced.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import tempfile
import time
from typing import Dict, List

import pytest

import stcp
from stcp.metrics import WORKER_METRICS, serve_pool_metrics, serve_worker_metrics
from stcp.supervisor import WorkerSlot
from tests.test_metrics import (Scrape, ascrape, check_invariants, echo, fake_xdp_collector, promtool_check,
                                quiet, scrape, transfer)

PORT = 4481


# ---------------------------------------------------------------------------------------
# in-process workers
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

    def __init__(self, directory: str, w: int, pid: int):
        self.directory, self.w, self.pid = directory, w, pid
        self.server = self.metrics = None

    async def start(self) -> "FakeWorker":
        srv = await stcp.serve(echo, "127.0.0.1", 0, datapath=NoXskDatapath())
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

    async def spawn(self, w: int) -> FakeWorker:
        self._pid += 1
        self.workers[w] = await FakeWorker(self.directory, w, self._pid).start()
        self.alive[w] = True
        return self.workers[w]

    def slots(self) -> List[WorkerSlot]:
        return [WorkerSlot(w, self.workers[w].pid, self.alive[w], self.workers[w].path, self.restarts[w])
                for w in range(self.n) if w in self.workers]


def pool_exporter(pool: FakePool, xdp: bool = True):
    return serve_pool_metrics(pool.slots, "127.0.0.1:0", "afxdp", "aes-256-gcm",
                              xdp=fake_xdp_collector() if xdp else None)


async def fake_pool_with_traffic(directory: str, xdp: bool = False):
    """A 2-worker fake pool and its supervisor exporter, with a transfer through each worker
    (for the dashboard tests in tests/test_metrics.py). Returns (exporter, pool); close both."""
    pool = FakePool(directory, 2)
    for w in range(2):
        await pool.spawn(w)
    for w in range(2):
        await transfer(pool.workers[w].port, os.urandom(3000 * (w + 1)))
        await quiet(pool.workers[w].server)
    return pool_exporter(pool, xdp=xdp), pool


def close_pool(exporter, pool: FakePool) -> None:
    exporter.close()
    for fw in pool.workers.values():
        fw.stop()


def test_pool_sums_relabels_and_carries_across_a_restart():
    asyncio.run(_pool())


async def _pool():
    with tempfile.TemporaryDirectory() as d:
        pool = FakePool(d, 2)
        for w in range(2):
            await pool.spawn(w)
        exp = pool_exporter(pool)
        url = exp.http.url
        try:
            s0 = await ascrape(url)
            assert s0.by("stcp_worker_up", "worker") == {"0": 1, "1": 1}
            assert s0.by("stcp_worker_restarts_total", "worker") == {"0": 0, "1": 0}
            assert s0.get("stcp_build_info", version=stcp.__version__, datapath="afxdp", cipher="aes-256-gcm") == 1
            assert s0.sum("stcp_xdp_attached") == 1                       # the datapath once, not per worker
            check_invariants(s0)

            sizes = {0: [1000, 70_000], 1: [5]}
            for w, ns in sizes.items():
                for n in ns:
                    await transfer(pool.workers[w].port, os.urandom(n))
            for w in sizes:
                await quiet(pool.workers[w].server)
            await asyncio.sleep(0.3)              # the clients' last datagrams (after the close)
            s1 = await ascrape(url)
            check_invariants(s1)
            promtool_check(s1.text)
            for w, ns in sizes.items():
                drv = pool.workers[w].server.driver
                lab = {"worker": str(w)}
                assert s1.get("stcp_worker_connections_accepted_total", **lab) == len(ns)
                assert s1.get("stcp_worker_records_received_total", path="socket", **lab) == drv.rx_socket > 0
                assert s1.get("stcp_worker_records_received_total", path="afxdp", **lab) == 0
                assert s1.get("stcp_worker_records_sent_total", path="socket", **lab) == drv.tx_socket > 0
                assert s1.get("stcp_worker_connections", **lab) == 0
            # the server-level series are the sums over the workers
            assert s1.get("stcp_connections_opened_total") == 3
            assert s1.get("stcp_stream_bytes_total", direction="rx") == sum(map(sum, sizes.values()))
            # every received datagram is a hello, an authenticated record, or one the endpoint
            # dropped (a straggler after the close) or discarded as a replay
            # (or, a few per connection, one that reached a connection already CLOSED)
            rx = s1.sum("stcp_worker_records_received_total")
            explained = s1.get("stcp_records_total", direction="rx") + s1.get("stcp_handshakes_started_total") + \
                s1.sum("stcp_endpoint_dropped_datagrams_total") + s1.get("stcp_replays_discarded_total")
            assert explained <= rx <= explained + 2 * 3, (rx, explained)
            # sent: a server hello per connection and the sealed records, plus a few per connection
            # the driver sends but no record counter sees (e.g. a server hello sent again for a
            # repeated client hello)
            tx = s1.sum("stcp_worker_records_sent_total")
            floor = s1.get("stcp_records_total", direction="tx") + s1.get("stcp_handshakes_completed_total")
            assert floor <= tx <= floor + 2 * 3, (tx, floor)

            # worker 1 holds a live connection, is scraped, and dies
            r, wr = await asyncio.wait_for(stcp.open_connection("127.0.0.1", pool.workers[1].port), 10)
            wr.write(b"abc")
            assert await asyncio.wait_for(r.readexactly(3), 10) == b"abc"
            s2 = await ascrape(url)
            assert s2.get("stcp_worker_connections", worker="1") == 1
            assert s2.get("stcp_connections_active") == 1
            pool.workers[1].kill()
            pool.alive[1] = False
            s3 = await ascrape(url)                               # dead, not replaced yet
            assert s3.by("stcp_worker_up", "worker") == {"0": 1, "1": 0}
            assert ("stcp_worker_connections", frozenset({("worker", "1")})) not in s3.values
            assert s3.get("stcp_worker_read_errors_total", worker="1") == 0      # dead is not an error
            for key, v in s2.values.items():                      # no counter went backwards
                if key[0].endswith("_total") and key in s3.values:
                    assert s3.values[key] >= v, key
            old = pool.workers[1]
            pool.restarts[1] += 1
            await pool.spawn(1)
            s4 = await ascrape(url)
            assert s4.by("stcp_worker_up", "worker") == {"0": 1, "1": 1}
            assert s4.get("stcp_worker_restarts_total", worker="1") == 1
            check_invariants(s4)                                  # the lost connection is closed...
            assert s4.get("stcp_connections_closed_total", reason="worker_died") == 1       # ...as worker_died
            assert s4.get("stcp_connections_active") == 0
            for key, v in s2.values.items():
                if key[0].endswith(("_total", "_bucket", "_count")):
                    assert s4.values[key] >= v, key
            # the replacement's counts add to the slot's
            before = s4.get("stcp_worker_connections_accepted_total", worker="1")
            await transfer(pool.workers[1].port, b"after")
            await quiet(pool.workers[1].server)
            s5 = await ascrape(url)
            assert s5.get("stcp_worker_connections_accepted_total", worker="1") == before + 1 == 3
            assert s5.get("stcp_stream_bytes_total", direction="rx") == \
                s2.get("stcp_stream_bytes_total", direction="rx") + len(b"after")
            check_invariants(s5)
            promtool_check(s5.text)
            wr.abort("test over")
            old.server.close()
        finally:
            exp.close()
            for fw in pool.workers.values():
                fw.stop()


def test_worker_metric_names_and_labels_are_declared():
    """What the pool exports under stcp_worker_ is exactly WORKER_METRICS, with its labels."""
    async def run():
        with tempfile.TemporaryDirectory() as d:
            pool = FakePool(d, 1)
            await pool.spawn(0)
            exp = pool_exporter(pool, xdp=False)
            try:
                return await ascrape(exp.http.url)
            finally:
                exp.close()
                pool.workers[0].stop()
    s = asyncio.run(run())
    got = {}
    for (name, labels), _v in s.values.items():
        if name.startswith("stcp_worker_"):
            got.setdefault(name, set()).update(k for k, _ in labels)
    assert got == {n: set(spec[1]) for n, spec in WORKER_METRICS.items()}
    for name, spec in WORKER_METRICS.items():
        fam = s.families[re.sub(r"_total$", "", name)]
        assert fam.type == spec[0] and fam.documentation == spec[2], name


# ---------------------------------------------------------------------------------------
# a real worker pool
def _scrape_in(ns: str, url: str) -> Scrape:
    from tests.test_xdp_datapath import in_ns
    with in_ns(ns):
        return scrape(url)


def _wait_scrape(ns: str, url: str, pred, timeout: float, what: str) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = _scrape_in(ns, url)
            if pred(s):
                return s
        except OSError:
            s = None
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last scrape:\n{s.text if s else None}")
        time.sleep(0.2)


@pytest.mark.root
def test_real_pool_counts_per_worker_and_survives_a_kill():
    from tests.test_afxdp import _clients, _read_all, _serve, _stop, require_afxdp
    from tests.netns import veth_pair, wait_for_stderr_line
    require_afxdp()
    n_clients = 12
    sizes = [20_000 + 7919 * i for i in range(n_clients)]
    with veth_pair(queues=2) as (a, b):
        server = _serve(a, f"{a.ip4}:{PORT}", "native", "--workers", "2", "--metrics", "127.0.0.1:0")
        try:
            lines = wait_for_stderr_line(server, "afxdp datapath, 2 workers", timeout=90)
            m = next(filter(None, (re.search(r"metrics of 2 workers and the XDP program on (http://\S+)", ln)
                                   for ln in lines)), None)
            assert m, lines
            url = m.group(1)
            pids = {int(m.group(1)): int(m.group(2)) for m in
                    (re.search(r"worker (\d+) started \(pid (\d+)\)", ln) for ln in lines) if m}
            s0 = _scrape_in(a.ns, url)
            assert s0.by("stcp_worker_up", "worker") == {"0": 1, "1": 1}
            assert s0.by("stcp_worker_restarts_total", "worker") == {"0": 0, "1": 0}
            assert s0.get("stcp_build_info", version=stcp.__version__, datapath="afxdp", cipher="aes-256-gcm") == 1
            assert s0.by("stcp_xdp_attached", "iface") == {a.ifname: 1}      # the program once, not per worker

            datas = [os.urandom(n) for n in sizes]
            procs = _clients(b, f"{a.ip4}:{PORT}", n_clients)
            outs, readers = _read_all(procs)
            for p, d in zip(procs, datas):
                p.stdin.write(d)
                p.stdin.close()
            for t in readers:
                t.join(timeout=120)
            for p, d, out in zip(procs, datas, outs):
                p.wait(timeout=120)
                assert p.returncode == 0, p.stderr.read().decode(errors="replace")[-1000:]
                assert hashlib.sha256(out).digest() == hashlib.sha256(d).digest()
            s1 = _wait_scrape(a.ns, url, lambda s: s.get("stcp_connections_active") == 0 and
                              s.get("stcp_connections_opened_total") == n_clients, 20, "the connections to close")
            check_invariants(s1)
            promtool_check(s1.text)
            accepted = s1.by("stcp_worker_connections_accepted_total", "worker")
            assert sum(accepted.values()) == n_clients and all(accepted.values()), accepted
            for w in ("0", "1"):
                assert s1.get("stcp_worker_records_received_total", worker=w, path="afxdp") > 0
                assert s1.get("stcp_worker_records_received_total", worker=w, path="socket") == 0
                assert s1.get("stcp_worker_records_sent_total", worker=w, path="socket") > 0
                assert s1.get("stcp_worker_connections", worker=w) == 0
            # what the clients sent, exactly
            assert s1.get("stcp_stream_bytes_total", direction="rx") == sum(sizes)
            assert s1.get("stcp_handshakes_completed_total") == n_clients
            # every datagram a worker received is a hello, an authenticated record, or one the
            # endpoint dropped or discarded as a replay
            rx = s1.sum("stcp_worker_records_received_total")
            explained = (s1.get("stcp_records_total", direction="rx") + s1.get("stcp_handshakes_started_total")
                         + s1.sum("stcp_endpoint_dropped_datagrams_total") + s1.get("stcp_replays_discarded_total"))
            # (a datagram that reaches a connection already CLOSED, or under a key epoch it has
            # dropped, is counted by neither: a few per connection at most)
            assert explained <= rx <= explained + 2 * n_clients, (rx, explained)
            # sent: a server hello per connection and the sealed records, plus a few per connection
            # the driver sends but no record counter sees (e.g. a server hello sent again for a
            # repeated client hello)
            tx = s1.sum("stcp_worker_records_sent_total")
            floor = s1.get("stcp_records_total", direction="tx") + s1.get("stcp_handshakes_completed_total")
            assert floor <= tx <= floor + 2 * n_clients, (tx, floor)
            assert s1.get("stcp_xdp_packets_total", iface=a.ifname, netns="", verdict="pass_data") >= \
                s1.get("stcp_worker_records_received_total", worker="0", path="afxdp")

            os.kill(pids[1], signal.SIGKILL)
            wait_for_stderr_line(server, "[worker 1] serving on", timeout=60)
            s2 = _wait_scrape(a.ns, url, lambda s: s.get("stcp_worker_up", worker="1") == 1 and
                              s.get("stcp_worker_restarts_total", worker="1") == 1, 20, "worker 1 to be back")
            assert s2.get("stcp_worker_up", worker="0") == 1
            assert s2.get("stcp_worker_restarts_total", worker="0") == 0
            for key, v in s1.values.items():                    # the dead worker's counts are kept
                if key[0].endswith("_total"):
                    assert s2.values[key] >= v, key
            check_invariants(s2)
            # the replacement serves: its connections add to the slot's
            more = _clients(b, f"{a.ip4}:{PORT}", 4)
            outs, readers = _read_all(more)
            for p in more:
                p.stdin.write(b"again")
                p.stdin.close()
            for t in readers:
                t.join(timeout=60)
            assert all(p.wait(timeout=60) == 0 for p in more) and outs == [b"again"] * 4
            s3 = _wait_scrape(a.ns, url, lambda s: s.get("stcp_connections_opened_total") == n_clients + 4 and
                              s.get("stcp_connections_active") == 0, 20, "the new connections to close")
            assert s3.get("stcp_stream_bytes_total", direction="rx") == sum(sizes) + 4 * 5
            assert sum(s3.by("stcp_worker_connections_accepted_total", "worker").values()) == n_clients + 4
            check_invariants(s3)
        finally:
            err = _stop(server)
        assert server.returncode == 0, err
        print(f"connections per worker: {accepted}")
