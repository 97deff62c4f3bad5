"""Reconfiguring the XDP program under a running server, as docs/OPERATIONS.md §4 tells an
operator to: `stcp-loader set` changes limits in place, `stcp-loader attach --force` hands
the connection table to the replacement, and a replacement that cannot is refused while
the server needs the table. Clients keep transferring through all of it."""
from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

import pytest

from tests.support.procs import STCP, loader, pinned, session_key, stop, wait_for_stderr_line, xdp_status

PORT = 4561
CHUNK = 64 * 1024


class SlowClient:
    """`stcp connect` that sends a chunk at a time for as long as the test says, reading the
    echo from the start (a full stdout pipe would stall it)."""

    def __init__(self, b, addr: str):
        self.proc = subprocess.Popen(b.cmd(*STCP, "connect", *pinned(), addr), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.sent = hashlib.sha256()
        self.nsent = 0
        self._chunks: list = []
        self.nout = 0
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader.start()
        self._writer.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            self._chunks.append(chunk)
            self.nout += len(chunk)

    def _write(self) -> None:
        try:
            while not self._stop.is_set():
                data = os.urandom(CHUNK)
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
                self.sent.update(data)
                self.nsent += len(data)
                time.sleep(0.05)
        except (BrokenPipeError, ValueError):
            pass
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def echoed(self) -> int:
        return self.nout

    def finish(self, timeout: float = 60) -> None:
        """Stop sending, wait for the echo of everything sent, and check it."""
        self._stop.set()
        self._writer.join(timeout=10)
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        err = self.proc.stderr.read().decode(errors="replace")
        assert self.proc.returncode == 0, err[-2000:]
        out = b"".join(self._chunks)
        assert len(out) == self.nsent, f"echoed {len(out)} of {self.nsent} bytes; {err[-500:]}"
        assert hashlib.sha256(out).digest() == self.sent.digest()


def counters(ns: str) -> dict:
    return {k: v["packets"] for k, v in xdp_status(ns)["counters"].items()}


@pytest.fixture()
def served(xdp_toolchain, netns_pair):
    """The loader's program on a's veth and `stcp serve --datapath xdp` reusing it."""
    a, b = netns_pair
    r = loader("--netns", a.ns, "attach", a.ifname, "--port", str(PORT))
    assert r.returncode == 0, r.stderr
    server = a.popen([*STCP, "serve", "--listen", f"{a.ip4}:{PORT}", "--datapath", "xdp", "--iface", a.ifname,
                      "--key", session_key()[0]],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_stderr_line(server, "serving on", timeout=60)
        yield a, b, server
    finally:
        err = stop(server)
        loader("--netns", a.ns, "detach", a.ifname)
    assert server.returncode == 0, err


@pytest.mark.root
@pytest.mark.xdp
@pytest.mark.slow
def test_server_survives_set_and_forced_reattach(served):
    a, b, _server = served
    ns = ["--netns", a.ns]
    addr = f"{a.ip4}:{PORT}"
    clients = [SlowClient(b, addr) for _ in range(2)]
    try:
        deadline = time.monotonic() + 30
        while min(c.echoed() for c in clients) < 4 * CHUNK:
            assert time.monotonic() < deadline, "the clients did not get going"
            time.sleep(0.1)
        before = xdp_status(a.ns)
        assert before["live_cids"] == 2

        # limits in place: same program, same table, new config
        r = loader(*ns, "set", a.ifname, "--hs-rate", "200", "--hs-burst", "400", "--hs-global-rate", "5000")
        assert r.returncode == 0, r.stderr
        assert "hs-rate 200" in r.stdout and "still attached" in r.stdout
        st = xdp_status(a.ns)
        assert st["prog_id"] == before["prog_id"] and st["live_cids"] == 2
        assert (st["config"]["hs_rate"], st["config"]["hs_burst"], st["config"]["hs_global_rate"]) == (200, 400, 5000)
        assert st["config"]["port"] == PORT and st["config"]["hs_prefix6"] == before["config"]["hs_prefix6"]

        # a forced re-attach: a new program that took the old one's maps over
        echoed = [c.echoed() for c in clients]
        r = loader(*ns, "attach", a.ifname, "--port", str(PORT), "--force", "--hs-rate", "300")
        assert r.returncode == 0, r.stderr
        assert "2 live connection IDs" in r.stdout
        after = xdp_status(a.ns)
        assert after["prog_id"] != before["prog_id"] and after["live_cids"] == 2
        assert after["config"]["hs_rate"] == 300 and after["config"]["hs_global_rate"] == 1000   # attach's defaults
        assert after["map_ids"]["cids"] == before["map_ids"]["cids"], "the connection table was not carried over"
        base = counters(a.ns)
        assert base["pass_data"] >= before["counters"]["pass_data"]["packets"], "counters restarted"

        deadline = time.monotonic() + 20
        while any(c.echoed() < e + 8 * CHUNK for c, e in zip(clients, echoed, strict=True)):
            assert time.monotonic() < deadline, "the clients stopped moving data after the re-attach"
            time.sleep(0.1)

        # a client that connects now is added to the table the new program reads
        fresh = os.urandom(256 * 1024)
        r = subprocess.run(b.cmd(*STCP, "connect", *pinned(), addr), input=fresh, capture_output=True, timeout=60)
        assert r.returncode == 0 and r.stdout == fresh, r.stderr.decode(errors="replace")[-1000:]
    finally:
        for c in clients:
            c.finish()
    d = {k: v - base[k] for k, v in counters(a.ns).items()}
    assert d["pass_data"] > 0 and d["pass_handshake"] >= 1
    assert d["drop_unknown_cid"] <= 16, d          # a late ACK after a close, not live records
    bad = {k: v for k, v in d.items() if k.startswith("drop_") and v and k != "drop_unknown_cid"}
    assert not bad, f"honest traffic dropped: {bad}"


@pytest.mark.root
@pytest.mark.xdp
def test_replacement_that_would_lose_the_table_is_refused(served):
    """A table that cannot carry over (another size; bcc, which cannot hand maps over) is
    not thrown away under a server: one line names the server and `stcp-loader set`."""
    a, b, server = served
    ns = ["--netns", a.ns]
    client = SlowClient(b, f"{a.ip4}:{PORT}")
    try:
        deadline = time.monotonic() + 30
        while xdp_status(a.ns)["live_cids"] < 1:
            assert time.monotonic() < deadline, "the client did not connect"
            time.sleep(0.1)
        prog_id = xdp_status(a.ns)["prog_id"]
        for extra, env, why in ((["--max-cids", "1024"], {}, "another size"),
                                ([], {"STCP_XDP_LOADER": "bcc"}, "built by bcc")):
            r = loader(*ns, "attach", a.ifname, "--port", str(PORT), "--force", *extra, env=env)
            assert r.returncode == 1, r.stdout + r.stderr
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("stcp-loader: "), r.stderr
            assert f"pid {server.pid}" in lines[0] and why in lines[0] and "stcp-loader set" in lines[0], lines[0]
            assert xdp_status(a.ns)["prog_id"] == prog_id, "refused, yet the program changed"
        r = loader(*ns, "set", a.ifname, "--max-record-len", "1000")
        assert r.returncode == 1 and "--force" in r.stderr and "1428" in r.stderr
        assert xdp_status(a.ns)["config"]["max_record_len"] == 1428
    finally:
        client.finish()
