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
import os
import re
import signal
import tempfile
import time

import pytest

import stcp
from stcp.metrics import WORKER_METRICS
from tests.support.metrics import Scrape, ascrape, check_invariants, promtool_check, scrape
from tests.support.netns import in_ns
from tests.support.procs import echo_all, serve_afxdp, stop, wait_for_stderr_line
from tests.support.servers import quiet, transfer
from tests.support.workers import FakePool, pool_exporter

PORT = 4481


# ---------------------------------------------------------------------------------------
# in-process workers (tests/support/workers.py)
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
                    await transfer(pool.workers[w].port, os.urandom(n), pool.public_key)
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
            r, wr = await asyncio.wait_for(stcp.open_connection("127.0.0.1", pool.workers[1].port,
                                                                server_key=pool.public_key), 10)
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
            await transfer(pool.workers[1].port, b"after", pool.public_key)
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
@pytest.mark.afxdp
@pytest.mark.slow
def test_real_pool_counts_per_worker_and_survives_a_kill(veth):
    n_clients = 12
    sizes = [20_000 + 7919 * i for i in range(n_clients)]
    a, b = veth(queues=2)
    server = serve_afxdp(a, f"{a.ip4}:{PORT}", "native", "--workers", "2", "--metrics", "127.0.0.1:0")
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

        ok, failed = echo_all(b, f"{a.ip4}:{PORT}", [os.urandom(n) for n in sizes])
        assert ok == n_clients, failed
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
        ok, failed = echo_all(b, f"{a.ip4}:{PORT}", [b"again"] * 4, timeout=60)
        assert ok == 4, failed
        s3 = _wait_scrape(a.ns, url, lambda s: s.get("stcp_connections_opened_total") == n_clients + 4 and
                          s.get("stcp_connections_active") == 0, 20, "the new connections to close")
        assert s3.get("stcp_stream_bytes_total", direction="rx") == sum(sizes) + 4 * 5
        assert sum(s3.by("stcp_worker_connections_accepted_total", "worker").values()) == n_clients + 4
        check_invariants(s3)
    finally:
        err = stop(server)
    assert server.returncode == 0, err
    print(f"connections per worker: {accepted}")
