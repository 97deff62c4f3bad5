"""Kernel datapath metrics against a real XDP program (root, bcc, kernel headers).

The STCP XDP program is attached to a veth inside a network namespace pair
(tests/support/netns.py); crafted malformed datagrams are sent from the other namespace, and
`stcp-loader metrics` (a real subprocess, finding the interface through its pins) must
show each drop counter rising by exactly the number sent. `stcp-loader status` and the
metrics must agree, the run-time counters appear while kernel BPF statistics are on, and
`serve_metrics(..., iface=...)` exports the same counters next to the server's.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, Iterator, List

import pytest

from tests.support.metrics import (
    Scrape,
    dashboard_queries,
    family_of,
    load_dashboard,
    metric_names,
    promtool_check,
    scrape,
    url_of,
)
from tests.support.netns import ns_socket, veth_pair
from tests.support.packets import data_record, record
from tests.support.poll import wait_until

PORT = 4433
KNOWN_CID = 0x1122334455667788
LOADER = [sys.executable, "-m", "stcp.cli.loader"]

pytestmark = [pytest.mark.root, pytest.mark.xdp]


@pytest.fixture(scope="module")
def xdp_env(xdp_toolchain):
    from stcp.datapath.xdp import XdpDatapath
    with veth_pair() as (a, b):
        dp = XdpDatapath.attach(a.ifname, PORT, "auto", netns=a.ns)
        tx = ns_socket(b.ns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            dp.add_cid(KNOWN_CID)
            yield a, b, dp, tx
        finally:
            tx.close()
            dp.close()


def send(env, payloads: List[bytes]) -> None:
    a, _b, _dp, tx = env
    for p in payloads:
        tx.sendto(p, (a.ip4, PORT))


@contextlib.contextmanager
def loader_metrics(*args: str) -> Iterator[str]:
    """`stcp-loader metrics --listen 127.0.0.1:0 ARGS` as a subprocess; yields its URL."""
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([*LOADER, "metrics", "--listen", "127.0.0.1:0", *args],
                            stdout=subprocess.PIPE, stderr=err, text=True)

    def stderr() -> str:
        err.seek(0)
        return err.read()[-2000:]
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        m = re.search(r"http://\S+/metrics", line)
        assert m, f"stcp-loader metrics did not start: {line!r} rc={proc.poll()} {stderr()}"
        yield m.group(0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, stderr()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        err.close()


def drops(s: Scrape, **lab: str) -> Dict[str, float]:
    return {v: n for v, n in s.by("stcp_xdp_packets_total", "verdict", **lab).items() if v.startswith("drop_")}


def wait_drops(get, lab: Dict[str, str], base: Scrape, want: Dict[str, int], timeout: float = 5.0) -> Scrape:
    """Scrape until every wanted drop counter has moved by at least its count, then once
    more after a short settle, so an extra count would show."""
    b = drops(base, **lab)
    deadline = time.monotonic() + timeout
    while True:
        s = get()
        d = drops(s, **lab)
        if all(d[k] - b[k] >= n for k, n in want.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    time.sleep(0.1)
    return get()


CRAFTED = {
    "drop_short_header": [b"\x00" * 5] * 7,
    "drop_unknown_cid": [data_record(0xDEAD0000 + i) for i in range(4)],
    "drop_bad_length": [record(100, KNOWN_CID, 1, bytes(32))] * 3,
}


def test_loader_metrics_count_crafted_drops_exactly(xdp_env):
    a, _b, dp, _tx = xdp_env
    lab = {"iface": a.ifname, "netns": a.ns}
    with loader_metrics() as url:                       # no IFACE: found through its pins
        s0 = scrape(url)
        assert s0.get("stcp_xdp_attached", mode=dp.mode, **lab) == 1
        assert s0.get("stcp_xdp_live_cids", **lab) == 1
        send(xdp_env, [p for ps in CRAFTED.values() for p in ps])
        want = {k: len(v) for k, v in CRAFTED.items()}
        s1 = wait_drops(lambda: scrape(url), lab, s0, want)
        d0, d1 = drops(s0, **lab), drops(s1, **lab)
        moved = {k: d1[k] - d0[k] for k in d1 if d1[k] != d0[k]}
        assert moved == want
        short = 14 + 20 + 8 + 5                         # Ethernet + IPv4 + UDP + 5 bytes
        assert s1.get("stcp_xdp_bytes_total", verdict="drop_short_header", **lab) - \
            s0.get("stcp_xdp_bytes_total", verdict="drop_short_header", **lab) == 7 * short
        for verdict in want:                            # the per-CPU series add up to the total
            assert s1.sum("stcp_xdp_cpu_packets_total", verdict=verdict, **lab) == \
                s1.get("stcp_xdp_packets_total", verdict=verdict, **lab)
        promtool_check(s1.text)
        # every datapath metric the dashboard queries is in the real output (run time
        # only while kernel BPF statistics are on: see the next tests)
        families = s1.family_names()
        used = set().union(*(metric_names(q) for q in dashboard_queries(load_dashboard())))
        xdp_used = {re.sub(r"_total$", "", family_of(n, families)) for n in used if n.startswith("stcp_xdp_")}
        missing = xdp_used - families
        if not s1.get("stcp_xdp_bpf_stats_enabled"):
            missing -= {"stcp_xdp_run_seconds", "stcp_xdp_runs"}
        assert not missing, missing


def _cli(*args: str) -> str:
    r = subprocess.run([*LOADER, *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_status_and_metrics_agree(xdp_env):
    a, _b, dp, _tx = xdp_env
    before = dp.counters()
    send(xdp_env, CRAFTED["drop_unknown_cid"] + [data_record(KNOWN_CID)])
    wait_until(lambda: dp.counters()["drop_unknown_cid"][0] - before["drop_unknown_cid"][0] >= 4 and
               dp.counters()["pass_data"][0] > before["pass_data"][0], 5, "the program to count what was sent")
    lab = {"iface": a.ifname, "netns": a.ns}
    noise = "pass_not_stcp"        # IPv6 neighbour discovery and MLD may move it at any time
    for _attempt in range(3):
        st1 = json.loads(_cli("--netns", a.ns, "status", a.ifname, "--json"))["interfaces"][0]
        s = Scrape(_cli("--netns", a.ns, "metrics", "--once", a.ifname))
        st2 = json.loads(_cli("--netns", a.ns, "status", a.ifname, "--json"))["interfaces"][0]
        if all(st1["counters"][k] == st2["counters"][k] for k in st1["counters"] if k != noise):
            break
    else:
        pytest.fail("the STCP verdict counters never held still for three commands")
    assert st1["attached"] and s.get("stcp_xdp_attached", mode=st1["mode"], **lab) == 1
    assert s.get("stcp_xdp_live_cids", **lab) == st1["live_cids"]
    for verdict, c in st1["counters"].items():
        got_p = s.get("stcp_xdp_packets_total", verdict=verdict, **lab)
        got_b = s.get("stcp_xdp_bytes_total", verdict=verdict, **lab)
        if verdict == noise:       # read between the two status calls
            assert c["packets"] <= got_p <= st2["counters"][verdict]["packets"]
            assert c["bytes"] <= got_b <= st2["counters"][verdict]["bytes"]
        else:
            assert (got_p, got_b) == (c["packets"], c["bytes"]), verdict
    assert set(s.by("stcp_xdp_packets_total", "verdict", **lab)) == set(st1["counters"])
    assert st1["counters"]["pass_data"]["packets"] >= 1 and st1["counters"]["drop_unknown_cid"]["packets"] >= 4


def test_run_time_counters_while_bpf_stats_are_on(xdp_env):
    """kernel BPF statistics, enabled only while this test holds the fd (BPF_ENABLE_STATS)."""
    from prometheus_client import generate_latest

    from stcp.datapath import bpf
    from stcp.metrics import loader_registry
    a, _b, _dp, _tx = xdp_env
    lib = bpf.libbpf()
    lib.bpf_enable_stats.argtypes = [ctypes.c_int]
    fd = lib.bpf_enable_stats(0)                # BPF_STATS_RUN_TIME
    if fd < 0:
        pytest.skip(f"bpf_enable_stats failed: {os.strerror(-fd if fd != -1 else 1)}")
    try:
        reg = loader_registry([a.ifname], netns=a.ns)
        lab = {"iface": a.ifname, "netns": a.ns}
        s0 = Scrape(generate_latest(reg).decode())
        send(xdp_env, [b"\x00" * 5] * 20)
        deadline = time.monotonic() + 5
        while True:
            s1 = Scrape(generate_latest(reg).decode())
            runs = s1.get("stcp_xdp_runs_total", **lab) - s0.sum("stcp_xdp_runs_total", **lab)
            if runs >= 20 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert runs >= 20
        assert s1.get("stcp_xdp_run_seconds_total", **lab) > 0
    finally:
        os.close(fd)


def test_serve_metrics_with_iface_exports_both(xdp_env):
    asyncio.run(_serve_with_iface(xdp_env))


async def _serve_with_iface(env):
    import stcp
    from stcp.metrics import serve_metrics
    a, _b, dp, _tx = env
    lab = {"iface": a.ifname, "netns": a.ns}

    async def handler(r, w):
        w.close()

    server = await stcp.start_server(handler, "127.0.0.1", 0)
    metrics = serve_metrics(server, "127.0.0.1:0", datapath="xdp", cipher="aes-256-gcm", iface=a.ifname, netns=a.ns)
    loop = asyncio.get_running_loop()
    get = lambda: scrape(url_of(metrics))  # noqa: E731
    try:
        s0 = await loop.run_in_executor(None, get)
        assert s0.get("stcp_build_info", version=stcp.__version__, datapath="xdp", cipher="aes-256-gcm") == 1
        assert s0.get("stcp_xdp_attached", mode=dp.mode, **lab) == 1
        send(env, [b"\x00" * 3] * 2)
        s1 = await loop.run_in_executor(None, wait_drops, get, lab, s0, {"drop_short_header": 2})
        assert drops(s1, **lab)["drop_short_header"] - drops(s0, **lab)["drop_short_header"] == 2
        promtool_check(s1.text)
    finally:
        metrics.close()
        server.close()
        await server.wait_closed()
