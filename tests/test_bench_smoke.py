"""The benchmark harness works: a tiny loopback run (no namespaces, no root) of the TLS
peers, and of aioquic when it is installed, through bench.run as `make bench` uses it."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_harness_loopback_smoke(tmp_path):
    have_quic = importlib.util.find_spec("aioquic") is not None
    peers = "tls,tls_asyncio" + (",quic" if have_quic else "")
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--loopback", "--quick", "--nice", "0",
         "--only", peers, "--repeat", "1", "--bytes", str(1 << 20), "--duration", "2",
         "--handshakes", "5", "--rtts", "20", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["machine"]["kernel"]
    for name in peers.split(","):
        peer = doc["peers"][name]
        assert peer["available"], peer["reason"]
        for test in ("bulk", "handshake", "rtt"):
            s = peer["tests"][test]["summary"]
            assert s and s["ok"], (name, test, peer["tests"][test]["runs"])
        bulk = peer["tests"]["bulk"]["summary"]
        assert bulk["bytes_received_by_server"] == bulk["bytes_sent"] == 1 << 20
        assert peer["tests"]["rtt"]["summary"]["mismatches"] == 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| Ratio |" in md and "TLS 1.3 / TCP" in md
