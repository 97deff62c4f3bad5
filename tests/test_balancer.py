"""STCP behind a 5-tuple-hashing load balancer, unchanged: three servers sharing one identity
key, each with its own --server-id, behind kernel nftables DNAT through a jhash map (the
mechanism of kube-proxy's nftables mode; tests/support/balancer.py builds it in namespaces).

A client namespace opens 210 connections to the virtual IP: every transfer is intact
(SHA-256), the connections spread over every server (the server id in each server CID
says which), every server presents the same key. Then server 3 leaves the map (its flows
are forgotten, as kube-proxy forgets a removed endpoint's UDP flows): only its connections
are affected, and their clients learn it at once, from the stateless RESET of the server
that now receives their records (same key, so the same reset token); every other
connection completes its second transfer intact.
"""
from __future__ import annotations

import base64
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stcp import cid_layout
from stcp.errors import CloseCode
from tests.support.balancer import balanced_hosts, nft_unavailable
from tests.support.procs import STCP, stop, wait_for_stderr_line

ROOT = Path(__file__).resolve().parent.parent
PORT = 7443
SID_BITS = 8


def start_servers(net, key_file: Path) -> dict:
    servers = {}
    for k, host in net.servers.items():
        servers[k] = host.popen([*STCP, "serve", "--listen", f"{host.ip4}:{PORT}", "--key", str(key_file),
                                 "--workers", "1", "--server-id", str(k), "--server-id-bits", str(SID_BITS)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    keys = set()
    for proc in servers.values():
        lines = wait_for_stderr_line(proc, "serving on", timeout=60)
        keys.add(next(m.group(1) for m in (re.search(r"server key (\S+)", ln) for ln in lines) if m))
    assert len(keys) == 1, f"every server presents the one key: {keys}"
    return {"procs": servers, "key": keys.pop()}


def client_line(client: subprocess.Popen) -> dict:
    line = client.stdout.readline()
    if not line:
        client.wait(10)
        pytest.fail(f"the client ended (exit {client.returncode}): {client.stderr.read()[-3000:]}")
    return json.loads(line)


@pytest.mark.root
@pytest.mark.netns
def test_five_tuple_balancer_spreads_and_a_removed_server_resets_only_its_own(tmp_path):
    why = nft_unavailable()
    if why:
        pytest.skip(why)
    n_conns, size = 210, 32 << 10
    key_file = tmp_path / "server.key"
    subprocess.run([*STCP, "keygen", "--out", str(key_file)], check=True, capture_output=True, cwd=ROOT)
    with balanced_hosts(3, PORT) as net:
        started = start_servers(net, key_file)
        client = net.client.popen([sys.executable, "-m", "tests.support.loadclient", f"{net.vip}:{PORT}",
                                   "--server-key", started["key"], "--connections", str(n_conns), "--size", str(size),
                                   "--phases", "2", "--timeout", "30"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            opened, phase1 = client_line(client), client_line(client)
            assert opened["opened"] == n_conns, opened
            assert {c["key"] for c in opened["conns"]} == {base64.b64decode(started["key"]).hex()}
            assert all(r["result"] == "ok" for r in phase1["results"]), phase1
            home = {c["i"]: cid_layout.server_id_of(c["cid"], SID_BITS) for c in opened["conns"]}
            spread = collections.Counter(home.values())
            assert set(spread) == {1, 2, 3}, f"connections over every server: {spread}"
            flows = net.flows()
            assert {ip: n for ip, n in flows.items()} == {net.servers[k].ip4: spread[k] for k in (1, 2, 3)}

            forgotten = net.remove(3)
            assert forgotten == spread[3]
            client.stdin.write("go\n")
            client.stdin.flush()
            phase2 = client_line(client)
            client.stdin.close()
            assert client.wait(60) == 0, client.stderr.read()
        finally:
            if client.poll() is None:
                client.kill()
            errs = {k: stop(p) for k, p in started["procs"].items()}
        assert all(p.returncode == 0 for p in started["procs"].values()), errs
    results = {r["i"]: r for r in phase2["results"]}
    for i, k in home.items():
        r = results[i]
        if k == 3:
            assert r["result"] == "terminated" and r["code"] == CloseCode.STATELESS_RESET, r
            # the first record after the move gets the RESET: far below the 30 s idle timeout
            # the client would otherwise wait out (5 s: 210 connections start their phase from one
            # client process on a loaded 2-CPU machine)
            assert r["after"] < 5.0, r
        else:
            assert r["result"] == "ok", f"connection {i} on server {k}: {r}"
    resets = [results[i]["after"] for i, k in home.items() if k == 3]
    print(f"{n_conns} connections over servers {dict(sorted(spread.items()))}; server 3 removed: its "
          f"{len(resets)} reset after {min(resets):.3f}-{max(resets):.3f} s, the other "
          f"{n_conns - len(resets)} intact")
