"""The kernel's connection-ID tables (bpf/stcp_xdp.c, stcp.datapath.xdp, LiveCidHooks).

- A new connection's CID goes into the half-open LRU with its server hello, and into the
  live table only when the connection is ENCRYPTED; the XDP program passes records for
  both (pass_half_open, pass_data), so the client's key-confirming record reaches user
  space, and a hello flood never fills the live table.
- max_connections never exceeds the live table: a program the server attaches is sized
  from it, one found attached that is smaller is refused with a one-line error.
- A full live table (entries the server did not make: a dead server's, another
  process's): hellos are answered with REJECT_BUSY and counted (dropped_cid_table_full)
  while it stays full, and served again once there is room; a connection that still
  finds it full when it becomes ENCRYPTED (it filled meanwhile) is closed at once.
Unit tests of the endpoint and the hooks run anywhere; the rest needs root, bcc and
kernel headers and skips with the reason otherwise.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from stcp import wire
from stcp.connection import Config, Connection
from stcp.datapath.base import LiveCidHooks
from stcp.endpoint import ServerEndpoint
from stcp.errors import CloseCode
from tests.support import frames as F, xdpserver
from tests.support.packets import data_record
from tests.support.procs import STCP, loader, xdp_status
from tests.support.testrun import require_testrun

CID_A, CID_B = 0x1111222233334444, 0x5555666677778888


def client_hello() -> bytes:
    return Connection.client(Config(), 0.0).datagrams_to_send(0.0)[0]


# ---------------------------------------------------------------------------------------
# the endpoint and the hooks (no kernel)
def test_a_full_table_answers_the_hello_with_reject_busy_and_counts_it():
    ep = ServerEndpoint(Config())
    room = [False]
    ep.cid_room = lambda: room[0]
    conn, new = ep.receive(client_hello(), ("192.0.2.1", 5000), 0.0)
    assert conn is None and not new and not ep.connections
    (reply, addr), = ep.replies
    h = wire.decode_hello(reply[wire.HEADER_LEN:])
    assert h.kind == wire.HS_REJECT and h.reject_code == wire.REJECT_BUSY and addr == ("192.0.2.1", 5000)
    assert ep.stats.dropped_cid_table_full == 1 and ep.stats.rejected_busy == 1
    assert ep.stats.dropped_over_capacity == 0
    room[0] = True
    conn, new = ep.receive(client_hello(), ("192.0.2.1", 5001), 0.0)
    assert new and ep.stats.dropped_cid_table_full == 1


class FakeTable:
    def __init__(self, room: bool = True):
        self.room = room
        self.calls: list = []

    def add_half_open(self, cid: int) -> None:
        self.calls.append(("half_open", cid))

    def promote(self, cid: int) -> bool:
        self.calls.append(("promote", cid))
        return self.room

    def remove_cid(self, cid: int) -> None:
        self.calls.append(("remove", cid))


class FakeConn:
    def __init__(self, cid: int):
        self.local_cid = cid
        self.closed_with = None

    @property
    def is_closed(self) -> bool:
        return self.closed_with is not None

    def close(self, code: int, reason: str = "") -> None:
        self.closed_with = (code, reason)


def test_hooks_half_open_at_hello_live_at_encrypted():
    t = FakeTable()
    hooks = LiveCidHooks(t)
    conn = FakeConn(CID_A)
    hooks.connection_created(conn)
    assert t.calls == [("half_open", CID_A)]
    hooks.connection_established(conn, 0.01)
    hooks.connection_ended(conn)
    assert t.calls == [("half_open", CID_A), ("promote", CID_A), ("remove", CID_A)]
    assert conn.closed_with is None


def test_hooks_close_a_connection_the_live_table_has_no_room_for():
    touched = []
    hooks = LiveCidHooks(FakeTable(room=False), touch=touched.append)
    conn = FakeConn(CID_A)
    hooks.connection_created(conn)
    hooks.connection_established(conn, 0.01)
    assert conn.closed_with[0] == CloseCode.INTERNAL_ERROR and "table is full" in conn.closed_with[1]
    assert touched == [conn]                    # the CLOSE gets sent


# ---------------------------------------------------------------------------------------
# the program's tables (BPF_PROG_TEST_RUN)
@pytest.fixture(scope="module")
def prog(xdp_prog):
    return xdp_prog


@pytest.mark.root
@pytest.mark.xdp
def test_half_open_then_live_then_gone(prog):
    prog.configure()
    dp = prog.dp
    rec = F.udp4_frame(data_record(CID_A, 48))
    assert prog.run(rec)[1] == "drop_unknown_cid"
    hooks = LiveCidHooks(dp)
    conn = FakeConn(CID_A)
    hooks.connection_created(conn)
    assert dp.has_half_open(CID_A) and not dp.has_cid(CID_A) and dp.filter_count(CID_A) == 1
    assert prog.run(rec)[1] == "pass_half_open"         # the client's key-confirming record gets through
    hooks.connection_established(conn, 0.01)
    assert dp.has_cid(CID_A) and not dp.has_half_open(CID_A) and dp.filter_count(CID_A) == 1
    assert prog.run(rec)[1] == "pass_data"
    hooks.connection_ended(conn)
    assert not dp.has_cid(CID_A) and not dp.has_half_open(CID_A) and dp.filter_count(CID_A) == 0
    assert prog.run(rec)[1] == "drop_unknown_cid"
    # a handshake that never completes leaves nothing behind either
    conn = FakeConn(CID_B)
    hooks.connection_created(conn)
    hooks.connection_ended(conn)
    assert not dp.has_half_open(CID_B) and dp.filter_count(CID_B) == 0


@pytest.mark.root
@pytest.mark.xdp
def test_a_full_live_table_is_reported_and_refuses_until_there_is_room():
    """A program whose live table holds 4, filled by entries this object did not make:
    has_room() asks the table and says no (counted); promoting a half-open CID fails, the
    CID stays half-open until its connection ends; a freed slot makes room again."""
    require_testrun()
    from stcp.datapath import bpf, xdp_prog
    from stcp.datapath.xdp import XdpDatapath
    b, fn = xdp_prog.compile_prog(max_cids=4)
    h = xdp_prog.open_prog(bpf.prog_info(fn.fd)["id"])
    dp = XdpDatapath("test", 0, "none", h, False, None, None)
    try:
        assert dp.max_cids == 4
        for i in range(3):
            bpf.map_update(h.maps["cids"], xdp_prog.CID.pack(0x100 + i), b"\x01")     # foreign entries
        assert dp.has_room() and xdp_prog.count_cids(h) == 3          # the probe leaves nothing behind
        bpf.map_update(h.maps["cids"], xdp_prog.CID.pack(0x103), b"\x01")
        assert not dp.has_room() and dp.cid_table_full == 1
        dp.add_half_open(CID_A)
        assert not dp.promote(CID_A) and dp.cid_table_full == 2
        assert dp.has_half_open(CID_A) and not dp.has_cid(CID_A)
        bpf.map_delete(h.maps["cids"], xdp_prog.CID.pack(0x100))       # a foreign entry goes
        assert not dp.has_room()                                       # not asked again within FULL_RETRY
        dp._full_until = time.monotonic()                              # ...which passes
        assert dp.has_room() and dp.promote(CID_A) and dp.has_cid(CID_A)
        assert not dp.has_half_open(CID_A) and not dp.has_room()
    finally:
        dp.close()
        xdp_prog.release_bcc(b)


# ---------------------------------------------------------------------------------------
# end to end: `stcp connect` against an xdp-datapath server, in two namespaces
PORT = 4483


@pytest.mark.root
@pytest.mark.xdp
@pytest.mark.slow
def test_full_table_end_to_end(netns_pair, xdp_toolchain):
    """A server whose live table (3 entries, sized from max_connections=3) is full of a
    dead server's entries: clients are answered REJECT_BUSY (counted), which they report
    when their handshake times out; once the stale entries are gone clients connect
    again, their CID live while they last."""
    from stcp.datapath.xdp import XdpDatapath
    a, b = netns_pair
    addr = f"{a.ip4}:{PORT}"
    server = xdpserver.start(a, {"listen": addr, "iface": a.ifname, "mode": "native", "max_connections": 3})
    try:
        assert xdp_status(a.ns)["live_cids"] == 0
        dp = XdpDatapath.open(a.ifname, netns=a.ns)
        try:
            assert dp.max_cids == 3
            stale = [0xDEAD0000 + i for i in range(3)]
            for cid in stale:
                assert dp.add_cid(cid)
            first = subprocess.run(b.cmd(*STCP, "connect", "--handshake-timeout", "1", addr), input=b"hello",
                                   capture_output=True, timeout=60)
            second = subprocess.run(b.cmd(*STCP, "connect", "--handshake-timeout", "1", addr), input=b"hello",
                                    capture_output=True, timeout=60)
            for cid in stale:
                dp.remove_cid(cid)
            time.sleep(1.1)                        # FULL_RETRY: the server tries its table again
            third = subprocess.Popen(b.cmd(*STCP, "connect", addr), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
            third.stdin.write(b"ping")
            third.stdin.flush()
            deadline = time.monotonic() + 20
            while xdp_status(a.ns)["live_cids"] != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            live = dp.cids()
            out, err = third.communicate(b"", timeout=30)
        finally:
            dp.release()
    finally:
        stats = xdpserver.finish(server)
    for r in (first, second):
        assert r.returncode != 0 and b"server busy" in r.stderr, r.stderr
    assert stats["cid_table_full"] >= 1 and stats["dropped_cid_table_full"] >= 2, stats
    assert stats["rejected_busy"] >= 1 and stats["dropped_over_capacity"] == 0, stats
    assert third.returncode == 0 and out == b"ping", err
    assert len(live) == 1                          # the third client's, live while it lasted


@pytest.mark.root
@pytest.mark.xdp
@pytest.mark.slow
def test_max_connections_never_exceeds_the_table(netns_pair, xdp_toolchain):
    """A program attached with room for 8 connections refuses a server that may hold 100,
    in one line that says what to do; a server that attaches its own sizes it."""
    a, _b = netns_pair
    r = loader("--netns", a.ns, "attach", a.ifname, "--port", str(PORT), "--max-cids", "8")
    assert r.returncode == 0, r.stderr
    args = {"listen": f"{a.ip4}:{PORT}", "iface": a.ifname, "max_connections": 100}
    p = a.popen([sys.executable, "-m", "tests.support.xdpserver", json.dumps(args)], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    last = err.decode().strip().splitlines()[-1]
    assert "room for 8 live connections, fewer than the server's limit of 100" in last, last
    assert "--max-cids 100" in last
    assert loader("--netns", a.ns, "detach", a.ifname).returncode == 0
    server = xdpserver.start(a, {"listen": f"{a.ip4}:{PORT}", "iface": a.ifname, "max_connections": 5000})
    try:
        from stcp.datapath import bpf
        from stcp.datapath.xdp import XdpDatapath
        dp = XdpDatapath.open(a.ifname, netns=a.ns)
        try:
            assert dp.max_cids == 5000
            assert bpf.map_info(dp.handles.maps["half_open"])["max_entries"] >= 2 * 4096
        finally:
            dp.release()
    finally:
        xdpserver.finish(server)
