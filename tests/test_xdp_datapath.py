"""The XDP program in the kernel: every verdict, over IPv4 and IPv6, native and generic.

Two namespaces joined by veth (tests/support/netns.py): the program is attached to a's veth0 and
a plain UDP socket listens on the STCP port in a; b sends crafted datagrams (kernel UDP
sockets for anything a socket can send, AF_PACKET frames for what it cannot: broken UDP
length fields, VLAN tags). Each crafted datagram must bump exactly its verdict counter,
and the dropped ones must never reach the socket.

Needs root, bcc and kernel headers; skips with the reason otherwise.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import List

import pytest

from stcp import wire
from tests.support.netns import ns_socket, veth_pair
from tests.support.packets import csum, data_record, hello, record
from tests.support.xdpenv import PORT, Env, deltas, expect_verdicts

MAX_RECORD = 1400          # below the 1428 default so TOO_LONG can be sent over IPv6 unfragmented
HS_RATE, HS_BURST = 10, 20
KNOWN_CID = 0x1122334455667788
MARK_CID = 0x0BADC0FFEE0DDF00


# ---------------------------------------------------------------------------------------
pytestmark = pytest.mark.xdp


@pytest.fixture(scope="module", params=["native", "generic"])
def env(request, xdp_toolchain):
    from stcp.datapath.xdp import XdpDatapath
    with veth_pair() as (a, b):
        # uk_rate 0: every record for an unknown CID is dropped (tests/test_xdp_reset.py
        # covers the share let through for RESETs)
        dp = XdpDatapath.attach(a.ifname, PORT, request.param, MAX_RECORD, netns=a.ns,
                                hs_rate=HS_RATE, hs_burst=HS_BURST, uk_rate=0)
        e = Env(a, b, dp, request.param)
        try:
            assert dp.mode == request.param and dp.attached
            dp.add_cid(KNOWN_CID)
            dp.add_cid(MARK_CID)
            yield e
        finally:
            e.close()
            dp.close()


FAMILIES = [4, 6]


def _bad(name: str) -> List[bytes]:
    """Datagrams (UDP payloads) that must be dropped with verdict `name`."""
    ok = data_record(KNOWN_CID)
    return {
        "drop_short_header": [b"", b"\x00", bytes(23), ok[:23]],
        "drop_bad_length": [record(100, KNOWN_CID, 1, bytes(32)), record(31, KNOWN_CID, 1, bytes(32)),
                            record(1 << 63, KNOWN_CID, 1, bytes(32)), record(80, 0, 0, bytes(81))],
        "drop_too_short": [data_record(KNOWN_CID, 0), data_record(KNOWN_CID, 15)],
        "drop_too_long": [data_record(KNOWN_CID, MAX_RECORD + 1), data_record(KNOWN_CID, MAX_RECORD + 24)],
        "drop_unknown_cid": [data_record(0xDEADBEEF), data_record(KNOWN_CID + 1), data_record(0, seq=5)],
        "drop_bad_handshake": [hello(kind=2), hello(kind=3), hello(kind=0), hello(cid=7), hello(n=79),
                               hello(n=81), hello(n=111), hello(n=113), record(16, 0, 0, bytes(16))],
    }[name]


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("reason", ["drop_short_header", "drop_bad_length", "drop_too_short", "drop_too_long",
                                    "drop_unknown_cid", "drop_bad_handshake"])
def test_drop_reason_socket_crafted(env, fam, reason):
    bad = _bad(reason)
    expect_verdicts(env, lambda: [env.send(fam, p) for p in bad], {reason: len(bad)})
    assert env.drain() == [], "a dropped datagram reached the user-space socket"


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
def test_drop_fragment(env, fam):
    """The kernel fragments a 3000-byte record into 3: the first (which has the UDP header)
    is dropped for its port, the later ones because a later fragment of UDP has no port to
    tell, so none of them reaches the reassembly queue and the socket sees nothing."""
    big = data_record(KNOWN_CID, 3000)
    expect_verdicts(env, lambda: env.send(fam, big), {"drop_fragment": 3})
    time.sleep(0.1)
    assert env.drain() == []


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
def test_drop_bad_udp_length_raw(env, fam):
    good = data_record(KNOWN_CID)
    frames = [env.frame(fam, good, udp_len=8 + len(good) + 64),   # claims bytes past the frame
              env.frame(fam, good, udp_len=4)]                     # shorter than the UDP header
    expect_verdicts(env, lambda: [env.send_frame(f) for f in frames], {"drop_bad_udp": 2})
    assert env.drain() == []


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
def test_vlan_tagged_frames_are_parsed(env, fam):
    """One 802.1Q tag: an invalid record behind it is dropped with its reason and a known
    CID passes (the stack then discards it: there is no VLAN device in a)."""
    bad = env.frame(fam, bytes(10), vlan=100)
    ok = env.frame(fam, data_record(KNOWN_CID), vlan=100)
    unknown = env.frame(fam, data_record(0x5555), vlan=100)
    expect_verdicts(env, lambda: [env.send_frame(f) for f in (bad, ok, unknown)],
                    {"drop_short_header": 1, "pass_data": 1, "drop_unknown_cid": 1})


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
def test_v2_and_v1_client_hellos_pass(env, fam):
    """A version 2 hello (112-byte payload) and a version 1 one (80 bytes, which user space
    answers with a REJECT a v1 client reads) both pass the rate limiter to the socket."""
    v2, v1 = hello(), hello(n=wire.V1_HANDSHAKE_PAYLOAD_LEN)
    expect_verdicts(env, lambda: [env.send(fam, p) for p in (v2, v1)], {"pass_handshake": 2})
    assert sorted(g[0] for g in env.recv_wait(2)) == sorted([v2, v1])


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
def test_raw_frame_valid_data_reaches_socket(env, fam):
    """The raw-frame builder makes frames the stack accepts (so the raw drops above are
    the program's doing, not a broken frame)."""
    rec = data_record(KNOWN_CID, 40, seq=9)
    expect_verdicts(env, lambda: env.send_frame(env.frame(fam, rec)), {"pass_data": 1})
    got = env.recv_wait(1)
    assert [g[0] for g in got] == [rec]


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
def test_valid_records_pass_at_the_limits(env, fam):
    recs = [data_record(KNOWN_CID, 16), data_record(KNOWN_CID, MAX_RECORD), data_record(MARK_CID, 100, seq=1 << 48)]
    expect_verdicts(env, lambda: [env.send(fam, r) for r in recs], {"pass_data": 3})
    got = env.recv_wait(3)
    assert sorted(g[0] for g in got) == sorted(recs)
    assert {g[1] for g in got} == {env.src(fam)}


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
def test_cid_table_add_remove(env, fam):
    cid = int.from_bytes(os.urandom(8), "big") | 1
    rec = data_record(cid, 48)
    expect_verdicts(env, lambda: env.send(fam, rec), {"drop_unknown_cid": 1})
    assert env.drain() == []
    env.dp.add_cid(cid)
    assert env.dp.has_cid(cid)
    expect_verdicts(env, lambda: env.send(fam, rec), {"pass_data": 1})
    assert [g[0] for g in env.recv_wait(1)] == [rec]
    env.dp.remove_cid(cid)
    assert not env.dp.has_cid(cid)
    expect_verdicts(env, lambda: env.send(fam, rec), {"drop_unknown_cid": 1})
    assert env.drain() == []


def _colliding_cid(cid: int) -> int:
    """Another CID in the same prefilter slot (flip the same bit in both folded halves)."""
    from stcp.datapath.xdp_prog import cid_filter_slot
    other = cid ^ ((1 << 7) | (1 << 39))       # wire bytes 7 and 3: same bit of each 32-bit half
    assert other != cid and cid_filter_slot(other) == cid_filter_slot(cid)
    return other


@pytest.mark.root
def test_cid_prefilter_counts_shared_slots(env):
    """Two live CIDs sharing a prefilter slot: removing one keeps the other passing."""
    a_cid = int.from_bytes(os.urandom(8), "big")
    b_cid = _colliding_cid(a_cid)
    base = env.dp.filter_count(a_cid)
    env.dp.add_cid(a_cid)
    env.dp.add_cid(a_cid)                       # idempotent: counted once
    env.dp.add_cid(b_cid)
    assert env.dp.filter_count(a_cid) == base + 2
    env.dp.remove_cid(a_cid)
    env.dp.remove_cid(a_cid)
    assert env.dp.filter_count(b_cid) == base + 1
    expect_verdicts(env, lambda: (env.send(4, data_record(b_cid)), env.send(4, data_record(a_cid))),
                    {"pass_data": 1, "drop_unknown_cid": 1})
    assert [g[0] for g in env.recv_wait(1)] == [data_record(b_cid)]
    env.dp.remove_cid(b_cid)
    assert env.dp.filter_count(b_cid) == base
    expect_verdicts(env, lambda: env.send(4, data_record(b_cid)), {"drop_unknown_cid": 1})


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
def test_hello_flood_is_rate_limited_per_source(env, fam):
    """A flood of client hellos from one address gets its burst and rate through and no
    more; a hello from a second address of the same host (another IPv6 /64), sent right
    after, still passes."""
    env.add_source("flood", 20)
    env.add_source("other", 21)
    n = 400
    env.drain()
    before = env.counters()
    t0 = time.monotonic()
    for _ in range(n):
        env.send(fam, hello(), source="flood")
    env.send(fam, hello(), source="other")
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        d = deltas(before, env.counters())
        if d["pass_handshake"] + d["drop_hs_rate"] >= n + 1:
            break
        time.sleep(0.01)
    time.sleep(0.05)
    d = deltas(before, env.counters())
    assert {k for k, v in d.items() if v} - {"pass_not_stcp"} == {"pass_handshake", "drop_hs_rate"}, d
    assert d["pass_handshake"] + d["drop_hs_rate"] == n + 1, d
    flood_passed = d["pass_handshake"] - 1
    allowed = HS_BURST + HS_RATE * elapsed + 1
    assert HS_BURST <= flood_passed <= allowed, f"{flood_passed} flood hellos passed in {elapsed:.3f}s"
    got = env.recv_wait(d["pass_handshake"], timeout=2)
    srcs = [g[1] for g in got]
    assert len(got) == d["pass_handshake"] and all(g[0] == hello() for g in got)
    assert srcs.count(env.src(fam, "other")) == 1
    assert srcs.count(env.src(fam, "flood")) == flood_passed


@pytest.mark.root
@pytest.mark.parametrize("fam", FAMILIES)
def test_non_stcp_traffic_passes(env, fam):
    """Another UDP port, TCP (even to the STCP port number) and ICMP echo all pass."""
    other = ns_socket(env.a.ns, socket.AF_INET6, socket.SOCK_DGRAM)
    lst = ns_socket(env.a.ns, socket.AF_INET6, socket.SOCK_STREAM)
    try:
        other.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        other.bind(("::", PORT + 1))
        other.settimeout(3)
        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("::", PORT))
        lst.listen(4)
        lst.settimeout(3)
        garbage = bytes(5)                  # would be drop_short_header on the STCP port

        def traffic():
            env.send(fam, garbage, port=PORT + 1)
            af = socket.AF_INET if fam == 4 else socket.AF_INET6
            c = ns_socket(env.b.ns, af, socket.SOCK_STREAM)
            c.settimeout(3)
            c.connect((env.dst(fam), PORT))
            c.sendall(b"x" * 10)
            srv, _ = lst.accept()
            assert srv.recv(100) == b"x" * 10
            srv.close()
            c.close()
            assert _ping(env, fam)

        before = env.counters()
        expect_verdicts(env, traffic, {}, settle=0.1)
        data, _ = other.recvfrom(100)
        assert data == garbage
        assert deltas(before, env.counters())["pass_not_stcp"] >= 6    # 3-way handshake, data, echo...
    finally:
        other.close()
        lst.close()


def _ping(env: Env, fam: int) -> bool:
    """One ICMP / ICMPv6 echo from b to a (no ping binary needed)."""
    if fam == 4:
        s = ns_socket(env.b.ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        req = struct.pack("!BBHHH", 8, 0, 0, 0x5354, 1) + b"stcp-ping"
        req = req[:2] + struct.pack("!H", csum(req)) + req[4:]
        want = 0
    else:
        s = ns_socket(env.b.ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        req = struct.pack("!BBHHH", 128, 0, 0, 0x5354, 1) + b"stcp-ping"   # kernel fills the checksum
        want = 129
    try:
        s.settimeout(0.2)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            s.sendto(req, (env.dst(fam), 0))
            end = time.monotonic() + 0.3
            while time.monotonic() < end:
                try:
                    pkt, _ = s.recvfrom(2000)
                except socket.timeout:
                    break
                icmp = pkt[(pkt[0] & 0x0F) * 4:] if fam == 4 else pkt
                if icmp[0] == want and icmp[4:6] == b"\x53\x54":
                    return True
        return False
    finally:
        s.close()


@pytest.mark.root
def test_counters_count_bytes(env):
    rec = data_record(KNOWN_CID, 64)
    before = env.counters()
    expect_verdicts(env, lambda: env.send(4, rec), {"pass_data": 1})
    after = env.counters()
    # frame bytes: Ethernet 14 + IPv4 20 + UDP 8 + record
    assert after["pass_data"][1] - before["pass_data"][1] == 14 + 20 + 8 + len(rec)
    env.recv_wait(1)


@pytest.mark.root
def test_reuse_shares_the_maps(env):
    """attach_or_reuse finds the program by its id, reuses it (no second program), shares
    the CID table, and close() of the reuser leaves the program and removes only its CIDs."""
    from stcp.datapath.xdp import XdpDatapath, XdpSetupError
    dp2 = XdpDatapath.attach_or_reuse(env.a.ifname, PORT, netns=env.a.ns)
    try:
        assert not dp2.attached and dp2.prog_id == env.dp.prog_id and dp2.mode == env.mode
        assert dp2.has_cid(KNOWN_CID)
        dp2.add_cid(0xABCDEF)
        assert env.dp.has_cid(0xABCDEF)
        assert set(dp2.counters()) == set(env.dp.counters())
    finally:
        dp2.close()
    assert not env.dp.has_cid(0xABCDEF) and env.dp.has_cid(KNOWN_CID)
    assert env.dp.is_attached()
    with pytest.raises(XdpSetupError, match="validates port 4433, not 4434"):
        XdpDatapath.attach_or_reuse(env.a.ifname, PORT + 1, netns=env.a.ns)


@pytest.mark.root
def test_attach_refuses_when_attached(env):
    from stcp.datapath.xdp import XdpAlreadyAttached, XdpDatapath
    with pytest.raises(XdpAlreadyAttached, match="already attached"):
        XdpDatapath.attach(env.a.ifname, PORT, netns=env.a.ns)
