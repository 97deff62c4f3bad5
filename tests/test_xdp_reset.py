"""Records for unknown connections through the XDP program, so a restarted server can
answer them with a stateless RESET (docs/PROTOCOL.md section 5.7).

The program drops data records whose CID is in neither table, but lets a budgeted few
through (pass_unknown_cid_sampled: a token bucket of its own, uk_rate/uk_burst in the
config map), only those longer than a RESET, so the server can answer them. Crafted
frames check the budget; end to end, a client whose server died and came back (same
identity key, a fresh program: a reboot) is told at once, and without the budget it is
not.

Needs root, bcc and kernel headers; skips with the reason otherwise.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import time

import pytest

from stcp import wire
from tests.support import frames as F, xdpserver
from tests.support.packets import data_record
from tests.support.poll import wait_until
from tests.support.procs import STCP, xdp_status
from tests.support.testrun import XDP_DROP, XDP_PASS

pytestmark = pytest.mark.xdp


@pytest.fixture(scope="module")
def prog(xdp_prog):
    return xdp_prog


@pytest.mark.root
def test_a_budgeted_share_of_unknown_cid_records_goes_through(prog):
    prog.configure(uk_rate=1, uk_burst=3)
    prog.reset_buckets()
    longer = F.udp4_frame(data_record(0xDEAD, 48))            # 72 bytes: a RESET (56) answers it
    got = [prog.run(longer) for _ in range(5)]
    assert got == [(XDP_PASS, "pass_unknown_cid_sampled")] * 3 + [(XDP_DROP, "drop_unknown_cid")] * 2
    prog.reset_buckets()
    short = F.udp6_frame(data_record(0xDEAD, wire.RESET_RECORD_LEN - wire.HEADER_LEN))   # no smaller reply fits
    assert prog.run(short) == (XDP_DROP, "drop_unknown_cid")
    assert prog.run(longer)[1] == "pass_unknown_cid_sampled"  # the short one spent nothing
    prog.configure(uk_rate=0)
    prog.reset_buckets()
    assert prog.run(longer) == (XDP_DROP, "drop_unknown_cid")


# ---------------------------------------------------------------------------------------
PORT = 4485
KEY = bytes(range(32, 64)).hex()
IDLE = 600


def _echo(client: subprocess.Popen, data: bytes, timeout: float = 20) -> bytes:
    client.stdin.write(data)
    client.stdin.flush()
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < len(data) and time.monotonic() < deadline:
        if select.select([client.stdout], [], [], 0.2)[0]:
            got += os.read(client.stdout.fileno(), 65536)
    return got


def _verdicts(a) -> dict:
    return {k: v["packets"] for k, v in xdp_status(a.ns)["counters"].items()}


def _restart(a, b, limits: dict, wait: float) -> tuple:
    """A client connected to a server that is then killed (its program goes with it, as
    after a reboot) and a server with the same key started with limits. Then the client
    writes: once its record has reached the new program (however loaded the machine, it
    gets there), it has `wait` more seconds to end. (seconds from the write until it
    exited or None, its stderr, program counters, the server's statistics)."""
    addr = f"{a.ip4}:{PORT}"
    args = {"listen": addr, "iface": a.ifname, "mode": "native", "key": KEY}
    first = xdpserver.start(a, args)
    # the client outlives any wait here on its own (idle timeout IDLE): starting the second
    # server (compiling its program) can take a minute on a loaded machine
    client = subprocess.Popen(b.cmd(*STCP, "connect", "--idle-timeout", str(IDLE), addr), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _echo(client, b"before") == b"before"
        first.send_signal(signal.SIGKILL)
        first.wait()
        # the server attached its program through a BPF link: it left with the process, as
        # a reboot leaves the interface, and the new server starts with empty tables
        assert not xdp_status(a.ns)["attached"]
        second = xdpserver.start(a, {**args, "limits": limits})
        try:
            t0 = time.monotonic()
            client.stdin.write(b"after")
            client.stdin.flush()
            wait_until(lambda: client.poll() is not None or sum(
                _verdicts(a)[v] for v in ("pass_unknown_cid_sampled", "drop_unknown_cid")),
                60, "the client's record to reach the new program", interval=0.2)
            try:
                client.wait(timeout=wait)
                took = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                took = None
            counters = _verdicts(a)
        finally:
            stats = xdpserver.finish(second)
    finally:
        if client.poll() is None:
            client.kill()
        client.wait()
        err = client.stderr.read().decode(errors="replace")
        for pipe in (client.stdin, client.stdout, client.stderr):
            pipe.close()
    return took, err, counters, stats


@pytest.mark.root
@pytest.mark.slow
def test_a_client_of_a_restarted_server_is_told_at_once(netns_pair, xdp_toolchain):
    a, b = netns_pair
    took, err, counters, stats = _restart(a, b, {}, wait=30)
    # told by the server's RESET as soon as its record reached the new server (its own idle
    # timeout is far off, and would say otherwise)
    assert took is not None, (err, counters, {k: v for k, v in stats.items() if "reset" in k or "unknown" in k})
    assert "has no state for this connection" in err, err
    assert counters["pass_unknown_cid_sampled"] >= 1 and stats["resets_sent"] >= 1, (counters, stats)


@pytest.mark.root
@pytest.mark.slow
def test_without_the_budget_the_client_is_not_told(netns_pair, xdp_toolchain):
    """The control: the same restart with uk_rate 0; every record of the client dies in the
    kernel and it hears nothing (it would wait for its idle timeout)."""
    a, b = netns_pair
    took, err, counters, stats = _restart(a, b, {"uk_rate": 0}, wait=5)
    assert took is None, err
    assert counters["drop_unknown_cid"] >= 1 and counters["pass_unknown_cid_sampled"] == 0, counters
    assert stats["resets_sent"] == 0
