"""Handshake cookies in the XDP program (docs/PROTOCOL.md section 4.5, bpf/stcp_cookie.h).

Crafted frames through BPF_PROG_TEST_RUN (tests/support/testrun.py), each moving exactly
its verdict's counter:
- a version 2 hello with a cookie made by user space (stcp.cookie, the same secrets as the
  kernel's) passes without the global budget (pass_cookie), still within its prefix's;
- a cookie-less hello past the global budget is answered in the kernel (XDP_TX): the reply
  is checked byte for byte against a COOKIE record built here from stcp.wire and frames
  built from scratch, so addresses, ports, MACs, TTL and both checksums are right and the
  reply is exactly as long as the hello; user space accepts the kernel's cookie;
- a wrong cookie is never passed: answered with a fresh COOKIE within the prefix's reply
  budget, dropped as drop_bad_cookie beyond it;
- rotation: a cookie of the previous secret still verifies, one of the secret before is
  refused; a rotation of the endpoint's secrets reaches the kernel through the hook
  (stcp.datapath.xdp_cookie.KernelCookies), and expired keys are ignored;
- replies toward one source prefix are bounded by its bucket; what the kernel must not
  answer (version 1 or malformed hellos, broadcast / loopback sources, IPv4 options, IPv6
  extension headers) is not answered.
Then end to end in two namespaces: with the global hello budget at 0, an honest client
still connects through `stcp serve --datapath xdp` (its cookie from the kernel, its hello
with the cookie accepted by the kernel and by user space).

Needs root, bcc and kernel headers; skips with the reason otherwise.
"""
from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time

import pytest

from stcp import cookie, wire
from stcp.connection import Config
from stcp.cookie import CookieSecrets
from stcp.datapath import xdp_cookie
from stcp.endpoint import ServerEndpoint
from tests.support import frames as F, xdpserver
from tests.support.procs import STCP, xdp_status
from tests.support.testrun import XDP_DROP, XDP_PASS, XDP_TX
from tests.support.xdpenv import xdp_pass

pytestmark = pytest.mark.xdp

E = bytes(range(200, 232))
CID = 0x0123456789ABCDEF
SPORT, DPORT = 40000, 4433
V4, V6 = ("10.0.0.2", "10.0.0.1"), ("fd00::2", "fd00::1")


@pytest.fixture(scope="module")
def prog(xdp_prog):
    return xdp_prog


@pytest.fixture
def secrets(prog):
    """Fresh secrets, written into the program as a server does; the global hello budget at 0."""
    prog.configure(hs_global_rate=1, hs_global_burst=0)
    prog.reset_buckets()
    s = CookieSecrets(time.monotonic())
    s.on_rotate(lambda sec: xdp_cookie.write_keys(prog.h.maps["cookie"], sec))
    yield s
    xdp_cookie.clear_keys(prog.h.maps["cookie"])


def hello_record(c: bytes = bytes(16), cid: int = CID, e: bytes = E, suite: int = wire.SUITE_AES_256_GCM,
                 version: int = wire.PROTOCOL_VERSION) -> bytes:
    payload = wire.encode_hello(wire.Hello(wire.HS_CLIENT_HELLO, version, suite, cid, e, cookie=c))
    return wire.pack_header(len(payload), 0, wire.HANDSHAKE_SEQ) + payload


def frame(rec: bytes, fam: int = 4, src: str = None, **kw) -> bytes:
    s, d = V4 if fam == 4 else V6
    if fam == 4:
        return F.udp4_frame(rec, src=src or s, dst=d, sport=SPORT, dport=DPORT, **kw)
    return F.udp6_frame(rec, src=src or s, dst=d, sport=SPORT, dport=DPORT, **kw)


def run(prog, fr: bytes):
    return prog.run(fr)


# ---------------------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("fam", [4, 6])
def test_cookieless_hello_past_the_budget_gets_a_cookie_built_in_the_kernel(prog, secrets, fam):
    hello = frame(hello_record(suite=wire.SUITE_CHACHA20_POLY1305), fam)
    assert run(prog, hello) == (XDP_TX, "tx_cookie")
    s, d = V4 if fam == 4 else V6
    want_cookie = cookie.compute(secrets.current, (s, SPORT), CID, E)
    # the COOKIE record a server sends (stcp.handshake), from the server's address to the client's
    payload = wire.encode_hello(wire.Hello(wire.HS_COOKIE, wire.PROTOCOL_VERSION, wire.SUITE_CHACHA20_POLY1305,
                                           cookie=want_cookie))
    rec = wire.pack_header(len(payload), CID, wire.HANDSHAKE_SEQ) + payload
    if fam == 4:
        want = F.eth(F.ipv4(F.udp(rec, DPORT, SPORT, d, s), d, s, ident=0x4242), F.ETH_P_IP, src=F.MAC_A,
                     dst=F.MAC_B)
    else:
        want = F.udp6_frame(rec, src=d, dst=s, sport=DPORT, dport=SPORT, mac_src=F.MAC_A, mac_dst=F.MAC_B)
    assert prog.out == want
    assert len(prog.out) == len(hello)                   # amplification 1
    # the client takes it (stcp.handshake's parser) and user space verifies the kernel's cookie
    got = wire.decode_hello(prog.out[-wire.HANDSHAKE_PAYLOAD_LEN:])
    assert got.kind == wire.HS_COOKIE and got.cookie == want_cookie
    assert secrets.verify(got.cookie, (s, SPORT), CID, E, time.monotonic())


@pytest.mark.root
def test_ttl_and_checksums_of_a_reply_from_a_far_client(prog, secrets):
    """A hello that crossed routers (TTL 50, a real UDP checksum over IPv4) gets a reply
    with TTL 64 and both checksums right."""
    s, d = V4
    fr = F.eth(F.ipv4(F.udp(hello_record(), SPORT, DPORT, s, d), s, d), F.ETH_P_IP)
    fr = bytearray(fr)
    fr[14 + 8] = 50
    fr[14 + 10:14 + 12] = b"\0\0"
    fr[14 + 10:14 + 12] = struct.pack("!H", F.csum(bytes(fr[14:34])))
    assert run(prog, bytes(fr)) == (XDP_TX, "tx_cookie")
    out = prog.out
    assert out[14 + 8] == 64 and F.csum(out[14:34]) == 0, "IPv4 header checksum"
    udp = out[34:]
    pseudo = bytes(out[26:34]) + struct.pack("!BBH", 0, 17, len(udp))
    assert F.csum(pseudo + udp) == 0, "UDP checksum"
    assert struct.unpack("!HH", udp[:4]) == (DPORT, SPORT)


@pytest.mark.root
@pytest.mark.parametrize("fam", [4, 6])
def test_a_user_space_cookie_passes_without_the_global_budget(prog, secrets, fam):
    """The endpoint under load answers with a COOKIE (stcp.endpoint); the hello repeated
    with it passes the kernel although the global budget is 0, and user space admits it."""
    s, _ = V4 if fam == 4 else V6
    ep = ServerEndpoint(Config(hello_rate=0, hello_burst=0))
    ep.cookies = secrets
    hello = hello_record()
    conn, _ = ep.receive(hello, (s, SPORT), time.monotonic())
    assert conn is None and ep.stats.cookies_sent == 1
    reply = wire.decode_hello(ep.replies.pop()[0][wire.HEADER_LEN:])
    with_cookie = hello_record(reply.cookie)
    assert run(prog, frame(hello, fam))[1] == "tx_cookie"           # no cookie: not passed
    assert run(prog, frame(with_cookie, fam)) == (XDP_PASS, "pass_cookie")
    assert prog.out == frame(with_cookie, fam), "a passed frame is left as it came"
    conn, new = ep.receive(with_cookie, (s, SPORT), time.monotonic())
    assert new and ep.stats.cookie_admitted == 1


@pytest.mark.root
def test_a_valid_cookie_still_spends_the_prefix_bucket(prog, secrets):
    prog.configure(hs_rate=1, hs_burst=2, hs_global_rate=1, hs_global_burst=0)
    prog.reset_buckets()
    good = frame(hello_record(cookie.compute(secrets.current, (V4[0], SPORT), CID, E)))
    assert [run(prog, good)[1] for _ in range(4)] == ["pass_cookie"] * 2 + ["drop_hs_rate"] * 2


@pytest.mark.root
def test_cookie_mode_outlasts_the_budget(prog, secrets):
    """A hello over the global budget starts cookie mode: cookie-less hellos get COOKIEs
    even once the bucket has tokens again, until a second after the last one over it, so
    a flood's budgeted share of spoofed hellos never reaches X25519. Without keys there is
    no cookie mode."""
    prog.configure(hs_global_rate=1, hs_global_burst=2)
    prog.reset_buckets()
    got = [run(prog, frame(hello_record(cid=CID + i)))[1] for i in range(3)]
    assert got == ["pass_handshake", "pass_handshake", "tx_cookie"]
    refill = struct.pack("=I", 0)
    prog.bpf.map_update(prog.global_fd, refill, struct.pack("=Q", 0))        # tokens again
    assert run(prog, frame(hello_record(cid=CID + 9)))[1] == "tx_cookie"       # still in cookie mode
    assert run(prog, frame(hello_record(cookie.compute(secrets.current, (V4[0], SPORT), CID, E))))[1] == \
        "pass_cookie"
    prog.reset_buckets()                                                       # the mode's end
    assert run(prog, frame(hello_record(cid=CID + 10)))[1] == "pass_handshake"
    prog.set_cookie_keys(None)
    prog.reset_buckets()
    got = [run(prog, frame(hello_record(cid=CID + 20 + i)))[1] for i in range(3)]
    prog.bpf.map_update(prog.global_fd, refill, struct.pack("=Q", 0))
    assert got + [run(prog, frame(hello_record(cid=CID + 30)))[1]] == \
        ["pass_handshake", "pass_handshake", "drop_hs_global", "pass_handshake"]


@pytest.mark.root
def test_a_wrong_cookie_is_never_passed(prog, secrets):
    """Within the prefix's reply budget it gets a fresh, valid cookie (a client holding a
    forged or outdated one loses a round trip); beyond it, it is dropped."""
    prog.configure(hs_global_rate=0, ck_rate=1, ck_burst=2)      # global budget open: still not passed
    prog.reset_buckets()
    wrong = frame(hello_record(bytes(range(16))))
    assert run(prog, wrong) == (XDP_TX, "tx_cookie")
    fresh = wire.decode_hello(prog.out[-wire.HANDSHAKE_PAYLOAD_LEN:]).cookie
    assert fresh == cookie.compute(secrets.current, (V4[0], SPORT), CID, E)
    assert run(prog, wrong) == (XDP_TX, "tx_cookie")
    assert run(prog, wrong) == (XDP_DROP, "drop_bad_cookie")
    assert run(prog, frame(hello_record(fresh))) == (XDP_PASS, "pass_cookie")
    # a cookie for another port, client CID or key is as wrong
    for other in (cookie.compute(secrets.current, (V4[0], SPORT + 1), CID, E),
                  cookie.compute(secrets.current, (V4[0], SPORT), CID + 1, E),
                  cookie.compute(secrets.current, (V4[0], SPORT), CID, bytes(32))):
        assert run(prog, frame(hello_record(other))) == (XDP_DROP, "drop_bad_cookie")


@pytest.mark.root
def test_rotation_reaches_the_kernel_previous_verifies_older_does_not(prog, secrets):
    addr = (V4[0], SPORT)
    first = secrets.current
    c1 = cookie.compute(first, addr, CID, E)
    keys = xdp_cookie.read_keys(prog.h.maps["cookie"])
    assert keys["current"] == first and keys["previous"] is None
    secrets.tick(secrets.rotate_at)                     # one rotation: the hook writes the kernel's keys
    keys = xdp_cookie.read_keys(prog.h.maps["cookie"])
    assert keys["current"] == secrets.current != first and keys["previous"] == first
    assert run(prog, frame(hello_record(c1)))[1] == "pass_cookie"         # made under the previous secret
    c2 = cookie.compute(secrets.current, addr, CID, E)
    secrets.tick(secrets.rotate_at)                     # again: c1's secret is gone
    assert run(prog, frame(hello_record(c1)))[1] == "tx_cookie"
    assert wire.decode_hello(prog.out[-wire.HANDSHAKE_PAYLOAD_LEN:]).cookie == \
        cookie.compute(secrets.current, addr, CID, E)
    assert run(prog, frame(hello_record(c2)))[1] == "pass_cookie"
    # user space and kernel agree on every cookie
    for c in (c1, c2, cookie.compute(secrets.current, addr, CID, E)):
        assert secrets.verify(c, addr, CID, E, secrets.rotate_at - 1) == \
            (run(prog, frame(hello_record(c)))[1] == "pass_cookie")


@pytest.mark.root
def test_expired_or_absent_keys_turn_the_kernel_cookies_off(prog, secrets):
    good = frame(hello_record(cookie.compute(secrets.current, (V4[0], SPORT), CID, E)))
    assert run(prog, good)[1] == "pass_cookie"
    prog.set_cookie_keys(secrets.current, None, expires_ns=1)
    assert run(prog, good) == (XDP_DROP, "drop_hs_global")
    assert run(prog, frame(hello_record())) == (XDP_DROP, "drop_hs_global")
    prog.set_cookie_keys(None)
    assert run(prog, good) == (XDP_DROP, "drop_hs_global")


@pytest.mark.root
def test_kernel_cookies_follows_the_endpoint_on_a_loop(prog):
    """KernelCookies: the keys written at start, again at every rotation (from its timer,
    with no hello in sight), and removed at close."""
    fd = prog.h.maps["cookie"]

    async def main():
        loop = asyncio.get_running_loop()
        s = CookieSecrets(loop.time(), rotation=0.2)
        kc = xdp_cookie.KernelCookies(fd, s, loop)
        kc.start()
        seen = [xdp_cookie.read_keys(fd)["current"]]
        assert seen[0] == s.current
        for _ in range(2):
            await asyncio.sleep(0.25)
            keys = xdp_cookie.read_keys(fd)
            assert keys["current"] == s.current and keys["previous"] == seen[-1]
            assert keys["expires_ns"] / 1e9 > time.monotonic()
            seen.append(keys["current"])
        assert len(set(seen)) == 3 and kc.writes >= 3
        kc.close()
        assert xdp_cookie.read_keys(fd) is None

    asyncio.run(main())


@pytest.mark.root
def test_replies_toward_one_prefix_are_bounded(prog, secrets):
    """A spoofed flood 'from' a victim gets it at most the prefix's COOKIE budget; another
    prefix has its own."""
    prog.configure(hs_global_rate=1, hs_global_burst=0, ck_rate=1, ck_burst=3)
    prog.reset_buckets()
    victim = [run(prog, frame(hello_record(cid=CID + i), src="10.0.0.9"))[1] for i in range(8)]
    assert victim == ["tx_cookie"] * 3 + ["drop_hs_global"] * 5
    assert run(prog, frame(hello_record(), src="10.0.0.10"))[1] == "tx_cookie"
    assert run(prog, frame(hello_record(), 6, src="fd00:0:0:5::1"))[1] == "tx_cookie"
    prog.configure(hs_global_rate=1, hs_global_burst=0, ck_rate=0)          # rate 0: the kernel never answers
    assert run(prog, frame(hello_record(), src="10.0.0.11"))[1] == "drop_hs_global"


@pytest.mark.root
@pytest.mark.parametrize("case", ["v1 hello", "version 3", "client cid 0", "padding", "broadcast source",
                                  "loopback source", "multicast destination", "ipv4 options", "ipv6 dstopts",
                                  "ipv6 multicast source"])
def test_what_the_kernel_does_not_answer(prog, secrets, case):
    """Hellos user space would not answer with a COOKIE, or whose reply would go where no
    reply may (or carry options back): past the budget they are dropped, not answered."""
    rec = hello_record()
    kw = {}
    fam, src = 4, None
    if case == "v1 hello":
        rec = wire.pack_header(80, 0, 0) + bytes([1, 1]) + bytes(78)
    elif case == "version 3":
        rec = hello_record(version=3)
    elif case == "client cid 0":
        rec = hello_record(cid=0)
    elif case == "padding":
        rec = rec[:-1] + b"\x01"
    elif case == "broadcast source":
        src = "255.255.255.255"
    elif case == "loopback source":
        src = "127.0.0.1"
    elif case == "ipv4 options":
        kw = {"options": b"\x01\x01\x01\x00"}
    elif case == "ipv6 dstopts":
        fam, kw = 6, {"exts": F.dst_opts_chain(1)}
    elif case == "ipv6 multicast source":
        fam, src = 6, "ff02::1"
    if case == "multicast destination":
        fr = F.udp4_frame(rec, src=V4[0], dst="224.0.0.9", sport=SPORT, dport=DPORT)
    else:
        fr = frame(rec, fam, src, **kw)
    assert run(prog, fr) == (XDP_DROP, "drop_hs_global")
    assert prog.out == fr


@pytest.mark.root
def test_the_cookie_input_matches_user_space_for_every_length_of_port_and_cid(prog, secrets):
    """Ports and CIDs with bytes that exercise the two-byte shift of the input words."""
    for port, cid, e in ((1, 1, bytes(32)), (0xFFFF, 2**64 - 1, bytes([0xFF]) * 32), (0x1234, 0x8000000000000001,
                                                                                      os.urandom(32))):
        rec = hello_record(cid=cid, e=e)
        fr = F.udp6_frame(rec, src=V6[0], dst=V6[1], sport=port, dport=DPORT)
        assert run(prog, fr)[1] == "tx_cookie"
        assert wire.decode_hello(prog.out[-wire.HANDSHAKE_PAYLOAD_LEN:]).cookie == \
            cookie.compute(secrets.current, (V6[0], port), cid, e)


# ---------------------------------------------------------------------------------------
# end to end: `stcp connect` against an xdp-datapath server whose global hello budget is 0
E2E_PORT = 4481


def _counts(ns: str) -> dict:
    return {k: v["packets"] for k, v in xdp_status(ns)["counters"].items()}


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["native", "generic"])
def test_an_honest_client_connects_with_the_global_budget_at_0(mode, netns_pair, xdp_toolchain):
    """The global hello budget at 0 and user space demanding a cookie of every hello: the
    kernel answers the client's first hello with a COOKIE, passes the repeat that carries
    it, and user space admits it; the echo comes back intact. Without the cookie keys in
    the kernel the same client cannot get in."""
    a, b = netns_pair
    addr = f"{a.ip4}:{E2E_PORT}"
    env = dict(os.environ, STCP_GSO="0") if mode == "generic" else None
    data = os.urandom(256 << 10)
    args = {"listen": addr, "iface": a.ifname, "mode": mode, "limits": {"hs_global_rate": 1, "hs_global_burst": 0},
            "config": {"hello_rate": 0, "hello_burst": 0}}
    with xdp_pass(b):                   # so that b's veth takes what a's program sends back
        server = xdpserver.start(a, args)
        try:
            before = _counts(a.ns)
            r = subprocess.run(b.cmd(*STCP, "connect", addr), input=data, capture_output=True, timeout=60, env=env)
            assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
            assert r.stdout == data
            after = _counts(a.ns)
        finally:
            stats = xdpserver.finish(server)
        d = {k: after[k] - before[k] for k in after}
        assert d["tx_cookie"] >= 1 and d["pass_cookie"] >= 1, d
        assert d["pass_handshake"] == 0 and d["drop_bad_cookie"] == 0, d
        assert stats["cookie_admitted"] >= 1 and stats["cookies_sent"] == 0, stats   # the kernel made the cookie

        # the control: no cookie keys in the kernel (cookies=False), the same client is shut out
        server = xdpserver.start(a, {**args, "limits": {**args["limits"], "cookies": False}})
        try:
            before = _counts(a.ns)
            r = subprocess.run(b.cmd(*STCP, "connect", "--handshake-timeout", "1.5", addr), input=b"x",
                               capture_output=True, timeout=60, env=env)
            after = _counts(a.ns)
        finally:
            stats = xdpserver.finish(server)
    assert r.returncode != 0 and r.stdout == b""
    d = {k: after[k] - before[k] for k in after}
    assert d["drop_hs_global"] >= 1 and d["tx_cookie"] == 0 and d["pass_cookie"] == 0, d
    assert stats["cookie_admitted"] == 0
