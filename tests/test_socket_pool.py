"""`stcp serve --workers N` on the socket datapath: N processes on one UDP port, each record
steered to its connection's worker by the reuseport program (stcp.datapath.socket_pool).

With root (CAP_BPF): connections spread over the workers and all share one identity key;
a killed worker's clients are told at once by a stateless RESET (from a sibling while the
slot is empty, or from the replacement), every other connection carries on intact, and the
replacement serves new connections; the pool's metrics show each worker and the steering,
and the workers' memory budgets add up to the server's.
Without CAP_BPF (root dropping to nobody): one line says why, and one process serves.
Without root: the worker count's default and limits.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from stcp import cid_layout
from stcp.budget import default_memory_budget
from stcp.cli.common import UsageError
from stcp.cli.serve import worker_count
from stcp.errors import CloseCode
from tests.support.procs import (
    STCP,
    announced_key,
    as_nobody,
    nobody_key,
    nobody_unavailable,
    session_key,
    stop,
    wait_for_stderr_line,
)

ROOT = Path(__file__).resolve().parent.parent
LOADCLIENT = [sys.executable, "-m", "tests.support.loadclient"]


def free_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_pool(port: int, n: int, *extra: str) -> tuple:
    """A socket pool on loopback under the session's key, serving; (process, {worker: pid},
    the public key it announced)."""
    proc = subprocess.Popen([*STCP, "serve", "--listen", f"127.0.0.1:{port}", "--workers", str(n),
                             "--key", session_key()[0], *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    lines = wait_for_stderr_line(proc, f"(socket datapath, {n} workers)", timeout=180)
    pids = {int(m.group(1)): int(m.group(2)) for m in
            (re.search(r"worker (\d+) started \(pid (\d+)\)", ln) for ln in lines) if m}
    assert len(pids) == n, lines
    assert announced_key(lines[-1]) == session_key()[1], lines[-1]
    return proc, pids, session_key()[1]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(body: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in body.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not exported")


@pytest.mark.root
def test_killed_worker_is_reset_at_once_and_the_others_carry_on(xdp_toolchain):
    n_conns, size = 24, 200_000
    port = free_port()
    metrics = f"127.0.0.1:{free_port()}"
    server, pids, key = serve_pool(port, 2, "--metrics", metrics, "--server-id", "5")
    client = subprocess.Popen([*LOADCLIENT, f"127.0.0.1:{port}", "--server-key", key, "--connections", str(n_conns),
                               "--size", str(size),
                               "--phases", "2", "--timeout", "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        opened = json.loads(client.stdout.readline())
        phase1 = json.loads(client.stdout.readline())
        assert opened["opened"] == n_conns and all(r["result"] == "ok" for r in phase1["results"]), phase1
        owner = {c["i"]: cid_layout.worker_of(c["cid"]) for c in opened["conns"]}
        per_worker = collections.Counter(owner.values())
        assert set(per_worker) == {0, 1}, f"hellos reach every worker by the kernel's hash: {per_worker}"
        assert {cid_layout.server_id_of(c["cid"], 8) for c in opened["conns"]} == {5}, \
            "every worker's CIDs carry the server id"
        assert len({c["key"] for c in opened["conns"]}) == 1, "every worker serves with the same identity key"

        body = scrape(metrics)
        assert sample(body, "stcp_build_info", cipher="aes-256-gcm", datapath="socket", version="0.1.0") == 1
        for w in (0, 1):
            assert sample(body, "stcp_worker_connections", worker=str(w)) == per_worker[w]
            assert sample(body, "stcp_worker_up", worker=str(w)) == 1
            # each worker received and sent at least its connections' share of the phase-1 echo
            for name in ("stcp_worker_records_received_total", "stcp_worker_records_sent_total"):
                assert sample(body, name, path="socket", worker=str(w)) > per_worker[w] * size / 1500
                assert sample(body, name, path="afxdp", worker=str(w)) == 0
        assert sample(body, "stcp_connections_active") == n_conns
        # the memory budget is per process: the workers' shares add up to the server's
        assert sample(body, "stcp_memory_budget_bytes") == default_memory_budget() // 2 * 2
        # (per skb: a GSO buffer over loopback is one, however many records it holds)
        assert sample(body, "stcp_reuseport_datagrams_total", verdict="pass_worker") >= n_conns
        assert sample(body, "stcp_reuseport_datagrams_total", verdict="pass_hello") >= n_conns

        os.kill(pids[1], signal.SIGKILL)
        client.stdin.write("go\n")
        client.stdin.flush()
        phase2 = json.loads(client.stdout.readline())
        client.stdin.close()
        assert client.wait(60) == 0, client.stderr.read()
        lines = wait_for_stderr_line(server, "worker 1 started", timeout=60)
        assert any("worker 1 (pid" in ln and "died (signal 9)" in ln for ln in lines), lines
        wait_for_stderr_line(server, "[worker 1] serving on", timeout=60)   # the replacement joined

        # the replacement serves: new connections reach both workers again
        again = subprocess.run([*LOADCLIENT, f"127.0.0.1:{port}", "--server-key", key, "--connections", "16",
                                "--size", "10000"],
                               capture_output=True, text=True, timeout=120, cwd=ROOT)
        docs = [json.loads(ln) for ln in again.stdout.splitlines()]
        assert docs[0]["opened"] == 16 and all(r["result"] == "ok" for r in docs[1]["results"]), again.stdout
        assert {cid_layout.worker_of(c["cid"]) for c in docs[0]["conns"]} == {0, 1}
        body = scrape(metrics)
        assert sample(body, "stcp_worker_restarts_total", worker="1") == 1
        orphans = sample(body, "stcp_reuseport_datagrams_total", verdict="pass_orphan")
    finally:
        if client.poll() is None:
            client.kill()
        err = stop(server)
    assert server.returncode == 0, err
    results = {r["i"]: r for r in phase2["results"]}
    for i, w in owner.items():
        r = results[i]
        if w == 0:
            assert r["result"] == "ok", f"connection {i} of the live worker: {r}"
        else:
            assert r["result"] == "terminated" and r["code"] == CloseCode.STATELESS_RESET, r
            # at once: a RESET answers the first record after the death (one round trip),
            # far below the idle timeout (30 s) the client would otherwise wait out
            assert r["after"] < 2.0, r
    assert orphans > 0, "the dead worker's records went to a live worker while its slot was empty"
    resets = [results[i]["after"] for i, w in owner.items() if w == 1]
    print(f"{len(resets)} connections of the killed worker reset after {min(resets):.3f}-{max(resets):.3f} s; "
          f"{n_conns - len(resets)} of the live one intact")


@pytest.mark.root
def test_without_cap_bpf_one_line_and_one_worker():
    why = nobody_unavailable()
    if why:
        pytest.skip(why)
    port = free_port()
    key, pub = nobody_key()
    proc = subprocess.Popen([*as_nobody("-all"), *STCP, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2",
                             "--key", key],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        lines = wait_for_stderr_line(proc, "serving on", timeout=120)
        assert len(lines) == 2, lines
        assert lines[0].startswith("stcp: 2 workers need the SO_REUSEPORT steering program: cannot create the "
                                   "reuseport socket map (Operation not permitted)"), lines
        assert "CAP_BPF" in lines[0] and lines[0].endswith("; serving with one worker")
        assert lines[1].startswith(f"stcp: serving on 127.0.0.1:{port} (echo, socket datapath); server key {pub}")
        r = subprocess.run([*STCP, "connect", "--server-key", pub, f"127.0.0.1:{port}"], input=b"still serving",
                           capture_output=True,
                           timeout=60)
        assert r.returncode == 0 and r.stdout == b"still serving", r.stderr
    finally:
        err = stop(proc)
    assert proc.returncode == 0, err


def test_worker_count_default_and_limits():
    cpus = len(os.sched_getaffinity(0))
    args = lambda datapath, workers: SimpleNamespace(datapath=datapath, workers=workers)  # noqa: E731
    assert worker_count(args("socket", None)) == min(cpus, 256)
    assert worker_count(args("afxdp", None)) == worker_count(args("xdp", None)) == 1
    assert worker_count(args("socket", 1)) == 1 and worker_count(args("afxdp", 3)) == 3
    with pytest.raises(UsageError, match="at least 1"):
        worker_count(args("socket", 0))
    with pytest.raises(UsageError, match="xdp datapath serves from one process"):
        worker_count(args("xdp", 2))


@pytest.mark.parametrize("flags, message", [
    (["--server-id", "256"], "stcp: --server-id 256 does not fit in 8 server-id bits (0..255); raise --server-id-bits"),
    (["--server-id", "300", "--server-id-bits", "8"], "stcp: --server-id 300 does not fit in 8 server-id bits"),
    (["--server-id-bits", "25"], "stcp: --server-id-bits must be between 0 and 24"),
])
def test_server_id_out_of_range_is_one_line_and_exit_2(flags, message, capsys):
    from stcp.cli.main import main
    assert main(["serve", "--listen", "127.0.0.1:0", "--workers", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
