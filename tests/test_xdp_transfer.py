"""A full STCP transfer through an interface carrying the XDP program (`stcp serve
--datapath xdp`): SHA-256 intact over IPv4 and IPv6, the handshake and data counted as
passed, the connection's ID in the kernel table while it lives and gone after, and the
interface left as it was found when the server exits."""
from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest

from tests.support.procs import STCP, pinned, session_key, stop, wait_for_stderr_line, xdp_status

PORT = 4477
SIZE = 4 << 20


@pytest.mark.root
@pytest.mark.xdp
@pytest.mark.slow
@pytest.mark.parametrize("fam,mode,build", [(4, "native", "clang"), (6, "native", "clang"), (4, "generic", "clang"),
                                            (6, "generic", "clang"), (4, "native", "bcc")])
def test_transfer_with_xdp_attached(fam, mode, build, netns_pair):
    """build: the server loads clang's build where it can, bcc's where clang or libxdp is
    missing (STCP_XDP_LOADER=bcc stands in for that here)."""
    a, b = netns_pair
    host = a.ip4 if fam == 4 else a.ip6
    addr = f"{host}:{PORT}" if fam == 4 else f"[{host}]:{PORT}"
    server = a.popen([*STCP, "serve", "--listen", addr, "--datapath", "xdp", "--iface", a.ifname, "--xdp-mode", mode,
                      "--key", session_key()[0]],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                     env={**os.environ, "STCP_XDP_LOADER": "bcc"} if build == "bcc" else None)
    try:
        wait_for_stderr_line(server, "serving on", timeout=60)
        st = xdp_status(a.ns)
        assert st["attached"] and st["mode"] == mode and st["config"]["port"] == PORT
        base = {k: v["packets"] for k, v in st["counters"].items()}
        base_bytes = st["counters"]["pass_data"]["bytes"]

        data = os.urandom(SIZE)
        t0 = time.monotonic()
        # The client sends bulk data as GSO buffers. Native mode makes the veth peer cut them
        # into datagrams; generic XDP sees each buffer whole, a batch of records
        # (docs/OPERATIONS.md section 6), and the server's socket takes it whole (UDP GRO).
        r = subprocess.run(b.cmd(*STCP, "connect", *pinned(), addr), input=data, capture_output=True,
                           timeout=120)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        assert len(r.stdout) == SIZE, f"echoed {len(r.stdout)} of {SIZE} bytes"
        assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()

        st = xdp_status(a.ns)
        d = {k: v["packets"] - base[k] for k, v in st["counters"].items()}
        data_bytes = st["counters"]["pass_data"]["bytes"] - base_bytes
        assert d["pass_handshake"] >= 1
        assert data_bytes >= SIZE, (data_bytes, d)     # the whole upload went through the program
        if mode == "generic":     # GSO buffers passed whole, as batches of records
            assert data_bytes / d["pass_data"] > 1514, (data_bytes, d)
        else:                     # one record per frame
            assert data_bytes / d["pass_data"] <= 1514, (data_bytes, d)
        bad = {k: v for k, v in d.items() if k.startswith("drop_") and v and k != "drop_unknown_cid"}
        assert not bad, f"honest traffic dropped: {bad}"
        # records after the server forgot the connection (a late ACK, a retransmitted
        # close) are rightly dropped as unknown; nothing else may be
        assert d["drop_unknown_cid"] <= 16, d
        deadline = time.monotonic() + 15
        while xdp_status(a.ns)["live_cids"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert xdp_status(a.ns)["live_cids"] == 0, "the closed connection's ID is still in the kernel table"
        print(f"{SIZE >> 20} MiB echoed over IPv{fam} with XDP ({mode}) in {took:.2f}s")
    finally:
        err = stop(server)
    assert server.returncode == 0, err
    # the server attached the program, so it must have detached it
    link = a.run("ip", "-d", "link", "show", a.ifname).stdout
    assert "prog/xdp" not in link, link
