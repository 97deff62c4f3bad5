"""The XDP program in the kernel: every verdict, over IPv4 and IPv6, native and generic.

Two namespaces joined by veth (tests/netns.py): the program is attached to a's veth0 and
a plain UDP socket listens on the STCP port in a; b sends crafted datagrams (kernel UDP
sockets for anything a socket can send, AF_PACKET frames for what it cannot: broken UDP
length fields, VLAN tags). Each crafted datagram must bump exactly its verdict counter,
and the dropped ones must never reach the socket.

Needs root, bcc and kernel headers; skips with the reason otherwise.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import struct
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from tests.netns import Host, have_root_netns, veth_pair
from tests.xdp_frames import csum

PORT = 4433
MAX_RECORD = 1400          # below the 1428 default so TOO_LONG can be sent over IPv6 unfragmented
HS_RATE, HS_BURST = 10, 20
KNOWN_CID = 0x1122334455667788
MARK_CID = 0x0BADC0FFEE0DDF00


# ---------------------------------------------------------------------------------------
# skip logic shared with the other test_xdp_* modules
def xdp_unavailable() -> Optional[str]:
    why = have_root_netns()
    if why:
        return why
    try:
        from stcp.datapath import bpf, xdp_prog
        xdp_prog.check_toolchain()
        xdp_prog.ensure_bpffs()
        bpf.libbpf()
    except Exception as e:  # XdpSetupError with the reason
        return f"XDP toolchain unavailable: {e}"
    return None


def require_xdp() -> None:
    why = xdp_unavailable()
    if why:
        pytest.skip(why)


# ---------------------------------------------------------------------------------------
# namespaces and packets
@contextlib.contextmanager
def in_ns(ns: str) -> Iterator[None]:
    """Run the body (socket creation) in network namespace ns; sockets stay there."""
    from pyroute2 import netns as pnetns
    pnetns.pushns(ns)
    try:
        yield
    finally:
        pnetns.popns()


def ns_socket(ns: str, family: int, type_: int, proto: int = 0) -> socket.socket:
    with in_ns(ns):
        return socket.socket(family, type_, proto)


def record(length: int, cid: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("!QQQ", length, cid, seq) + payload


def data_record(cid: int, n: int = 32, seq: int = 1) -> bytes:
    return record(n, cid, seq, bytes(n))


def hello(cid: int = 0, kind: int = 1, n: int = 80) -> bytes:
    return record(n, cid, 0, bytes([kind]) + bytes(n - 1))


def udp_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int, payload: bytes,
              udp_len: Optional[int] = None, vlan: Optional[int] = None) -> bytes:
    """An Ethernet frame with IPv4 or IPv6 + UDP; udp_len overrides the UDP length field."""
    ulen = 8 + len(payload) if udp_len is None else udp_len
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload          # checksum 0: none
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x4242, 0, 64, 17, 0, s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:] + udp
        ethertype = 0x0800
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", 8 + len(payload), 17)
        udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
        ck = csum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", ck) + udp[8:]
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(udp), 17, 64, s.packed, d.packed) + udp
        ethertype = 0x86DD
    mac = lambda m: bytes.fromhex(m.replace(":", ""))  # noqa: E731
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return mac(dst_mac) + mac(src_mac) + tag + struct.pack("!H", ethertype) + ip


# ---------------------------------------------------------------------------------------
class Env:
    """The attached program plus sockets: a receiver in a, senders in b."""

    def __init__(self, a: Host, b: Host, dp, mode: str):
        self.a, self.b, self.dp, self.mode = a, b, dp, mode
        self.rx = ns_socket(a.ns, socket.AF_INET6, socket.SOCK_DGRAM)
        self.rx.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.rx.bind(("::", PORT))
        self.rx.setblocking(False)
        self._tx: Dict[Tuple[int, str], socket.socket] = {}
        self.extra: Dict[str, Tuple[str, str]] = {}   # name -> (ip4, ip6) extra source addresses of b

    def close(self) -> None:
        self.rx.close()
        for s in self._tx.values():
            s.close()

    def dst(self, fam: int) -> str:
        return self.a.ip4 if fam == 4 else self.a.ip6

    def src(self, fam: int, name: Optional[str] = None) -> str:
        if name:
            return self.extra[name][0 if fam == 4 else 1]
        return self.b.ip4 if fam == 4 else self.b.ip6

    def add_source(self, name: str, octet: int) -> None:
        """Another address of b, for per-source rate limiting: IPv4 in b's /24, IPv6 in a
        /64 of its own (the program limits hellos per IPv6 /64)."""
        if name in self.extra:
            return
        ip4 = self.b.ip4.rsplit(".", 1)[0] + f".{octet}"
        ip6 = self.b.ip6.rsplit("::", 1)[0] + f":0:{octet:x}::2"
        self.b.run("ip", "addr", "add", f"{ip4}/24", "dev", self.b.ifname)
        self.b.run("ip", "-6", "addr", "add", f"{ip6}/64", "dev", self.b.ifname, "nodad")
        self.extra[name] = (ip4, ip6)

    def tx(self, fam: int, source: Optional[str] = None) -> socket.socket:
        key = (fam, source or "")
        if key not in self._tx:
            af = socket.AF_INET if fam == 4 else socket.AF_INET6
            s = ns_socket(self.b.ns, af, socket.SOCK_DGRAM)
            if fam == 4:
                s.setsockopt(socket.IPPROTO_IP, 10, 0)          # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: may fragment
            else:
                s.setsockopt(socket.IPPROTO_IPV6, 23, 0)       # IPV6_MTU_DISCOVER = DONT
            s.bind((self.src(fam, source), 0))
            self._tx[key] = s
        return self._tx[key]

    def send(self, fam: int, payload: bytes, source: Optional[str] = None, port: int = PORT) -> None:
        self.tx(fam, source).sendto(payload, (self.dst(fam), port))

    def send_frame(self, frame: bytes) -> None:
        s = ns_socket(self.b.ns, socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.bind((self.b.ifname, 0))
            s.send(frame)
        finally:
            s.close()

    def frame(self, fam: int, payload: bytes, **kw) -> bytes:
        return udp_frame(self.b.mac, self.a.mac, self.src(fam), self.dst(fam), 40000, PORT, payload, **kw)

    def counters(self) -> Dict[str, Tuple[int, int]]:
        return self.dp.counters()

    def drain(self) -> List[Tuple[bytes, str]]:
        got = []
        while True:
            try:
                data, addr = self.rx.recvfrom(70000)
            except BlockingIOError:
                return got
            host = addr[0]
            if host.startswith("::ffff:"):
                host = host[7:]
            got.append((data, host))

    def recv_wait(self, count: int, timeout: float = 3.0) -> List[Tuple[bytes, str]]:
        got: List[Tuple[bytes, str]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            select.select([self.rx], [], [], max(0.0, deadline - time.monotonic()))
            got += self.drain()
        return got


def deltas(before: Dict[str, Tuple[int, int]], after: Dict[str, Tuple[int, int]]) -> Dict[str, int]:
    return {k: after[k][0] - before[k][0] for k in after}


def expect_verdicts(env: Env, send: Callable[[], None], expected: Dict[str, int], timeout: float = 3.0,
                    settle: float = 0.05) -> Dict[str, int]:
    """Run send(), wait until the counters show `expected` packet deltas, then check that
    no other verdict moved (pass_not_stcp may: ARP, neighbour discovery) and return them."""
    env.drain()
    before = env.counters()
    send()
    deadline = time.monotonic() + timeout
    while True:
        d = deltas(before, env.counters())
        if all(d[k] >= n for k, n in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    time.sleep(settle)
    d = deltas(before, env.counters())
    moved = {k: v for k, v in d.items() if v and k != "pass_not_stcp"}
    want = {k: v for k, v in expected.items() if v and k != "pass_not_stcp"}
    assert moved == want, f"verdict counters moved {moved}, expected {want}"
    return d


# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["native", "generic"])
def env(request):
    require_xdp()
    from stcp.datapath.xdp import XdpDatapath
    with veth_pair() as (a, b):
        dp = XdpDatapath.attach(a.ifname, PORT, request.param, MAX_RECORD, netns=a.ns,
                                hs_rate=HS_RATE, hs_burst=HS_BURST)
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
                               hello(n=81), record(16, 0, 0, bytes(16))],
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
    from stcp.datapath.xdp import cid_filter_slot
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
