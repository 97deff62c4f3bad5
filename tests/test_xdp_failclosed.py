"""The XDP program fails closed, and limits hellos per source prefix and globally.

Crafted frames through BPF_PROG_TEST_RUN (tests/support/testrun.py): each must end in its
verdict, move that verdict's counter by exactly one, and return the matching XDP action.
- A frame passes untouched only when its headers show it is not UDP to the STCP port; an
  IPv6 chain longer than 6 extension headers, a third VLAN tag, truncated or malformed
  headers are drop_unparsed, whatever they carry.
- A later IP fragment of UDP has no port: drop_fragment, whatever its port; later
  fragments of other protocols pass.
- Hello buckets: IPv6 sources share one per /64 (hs_prefix6), IPv4 one per /32
  (hs_prefix4); a global bucket bounds all sources together (drop_hs_global).
Then end to end in two namespaces, the program attached by `stcp-loader attach` with the
new limits (which `status` shows): a CLIENT_HELLO behind 7 destination-options headers,
sent as a raw frame, is dropped and counted in the kernel and never reaches the socket,
where the same hello behind 6 does; two addresses of one /64 share a bucket.

Needs root, bcc and kernel headers; skips with the reason otherwise.
"""
from __future__ import annotations

import json
import time

import pytest

from tests.support import frames as F
from tests.support.netns import veth_pair
from tests.support.packets import data_record, hello
from tests.support.procs import loader
from tests.support.testrun import PORT, XDP_DROP, XDP_PASS
from tests.support.xdpenv import Env, expect_verdicts

pytestmark = pytest.mark.xdp

KNOWN_CID = 0x1122334455667788


@pytest.fixture(scope="module")
def prog(xdp_prog):
    """conftest's program of each build, its maps as a fresh load leaves them, with one live CID."""
    xdp_prog.dp.add_cid(KNOWN_CID)
    return xdp_prog


@pytest.fixture
def fresh(prog):
    """The program with default test limits (nothing limits hellos) and empty buckets."""
    prog.configure()
    prog.reset_buckets()
    return prog


def check(prog, frame: bytes, verdict: str) -> None:
    action = XDP_DROP if verdict.startswith("drop_") else XDP_PASS
    assert prog.run(frame) == (action, verdict), f"frame {frame.hex()}"


def v6(payload: bytes, exts=(), **kw) -> bytes:
    return F.udp6_frame(payload, exts=exts, **kw)


# ---------------------------------------------------------------------------------------
# IPv6 extension chains
@pytest.mark.root
@pytest.mark.parametrize("n", range(0, 7))
def test_extension_chain_up_to_6_is_walked(fresh, n):
    """Up to 6 headers the program reaches the record and judges it."""
    check(fresh, v6(hello(), F.dst_opts_chain(n)), "pass_handshake")
    check(fresh, v6(bytes(10), F.dst_opts_chain(n)), "drop_short_header")
    check(fresh, v6(data_record(KNOWN_CID), F.dst_opts_chain(n)), "pass_data")
    check(fresh, v6(data_record(0xDEAD), F.dst_opts_chain(n)), "drop_unknown_cid")
    check(fresh, v6(hello(), F.dst_opts_chain(n), dport=PORT + 1), "pass_not_stcp")


@pytest.mark.root
@pytest.mark.parametrize("n", [7, 8, 12, 40])
def test_extension_chain_beyond_6_is_unparsed(fresh, n):
    """The finding: 7 or more headers used to pass as pass_not_stcp, hellos and garbage
    alike. Now dropped as unparsed, whatever the chain ends in: the program cannot tell."""
    check(fresh, v6(hello(), F.dst_opts_chain(n)), "drop_unparsed")
    check(fresh, v6(bytes(10), F.dst_opts_chain(n)), "drop_unparsed")
    check(fresh, v6(hello(), F.dst_opts_chain(n), dport=PORT + 1), "drop_unparsed")
    tcp = F.eth(F.ipv6(bytes(20), "fd00::2", "fd00::1", F.TCP, F.dst_opts_chain(n)), F.ETH_P_IPV6)
    check(fresh, tcp, "drop_unparsed")


@pytest.mark.root
def test_mixed_chain_and_long_headers(fresh):
    """Hop-by-hop, routing, a first fragment and destination options of every size are
    walked; the count, not the kind, sets the limit."""
    six = [(F.HOPOPTS, F.ext_opts(0, 3)), (F.DSTOPTS, F.ext_opts(0, 1)), (F.ROUTING, F.ext_routing(0, 2)),
           (F.DSTOPTS, F.ext_opts(0, 0)), (F.DSTOPTS, F.ext_opts(0, 5)), (F.DSTOPTS, F.ext_opts(0, 0))]
    check(fresh, v6(hello(), six), "pass_handshake")
    check(fresh, v6(hello(), six + [(F.DSTOPTS, F.ext_opts(0))]), "drop_unparsed")
    with_frag = six[:5] + [(F.FRAGMENT, F.ext_frag(0, 0, more=True))]
    check(fresh, v6(hello(), with_frag), "drop_fragment")
    check(fresh, v6(hello(), with_frag, dport=PORT + 1), "pass_not_stcp")


@pytest.mark.root
def test_truncated_chains_are_unparsed(fresh):
    full = v6(hello(), [(F.DSTOPTS, F.ext_opts(0, 4))])
    hdr_end = 14 + 40 + 40                      # Ethernet, IPv6, one 40-byte header
    for cut in (14 + 40 + 1, 14 + 40 + 8, hdr_end - 1, hdr_end, hdr_end + 7):
        check(fresh, full[:cut], "drop_unparsed")
    frag_hdr = v6(hello(), [(F.FRAGMENT, F.ext_frag(0, 5))])
    check(fresh, frag_hdr[:14 + 40 + 7], "drop_unparsed")


@pytest.mark.root
def test_ipsec_and_other_upper_layers_pass(fresh):
    """The walk ends at a header it does not walk: not UDP, so not STCP. IPsec's contents
    are the kernel's to authenticate."""
    for nh in (F.TCP, F.ICMPV6, F.ESP, F.AH, F.NONE, 0x8F):
        frame = F.eth(F.ipv6(bytes(40), "fd00::2", "fd00::1", nh, F.dst_opts_chain(2)), F.ETH_P_IPV6)
        check(fresh, frame, "pass_not_stcp")


# ---------------------------------------------------------------------------------------
# VLAN tags
QINQ = [(F.ETH_P_8021AD, 100), (F.ETH_P_8021Q, 200)]


@pytest.mark.root
@pytest.mark.parametrize("tags", [[(F.ETH_P_8021Q, 7)], [(F.ETH_P_8021AD, 7)], QINQ,
                                  [(F.ETH_P_8021Q, 1), (F.ETH_P_8021Q, 2)]], ids=["dot1q", "dot1ad", "qinq", "q-q"])
def test_up_to_two_vlan_tags_are_parsed(fresh, tags):
    check(fresh, F.udp4_frame(hello(), vlans=tags), "pass_handshake")
    check(fresh, F.udp6_frame(bytes(5), vlans=tags), "drop_short_header")
    check(fresh, F.udp4_frame(data_record(KNOWN_CID), vlans=tags), "pass_data")
    check(fresh, F.eth(bytes(28), F.ETH_P_ARP, tags), "pass_not_stcp")


@pytest.mark.root
@pytest.mark.parametrize("depth", [3, 4])
def test_vlan_tags_beyond_qinq_are_unparsed(fresh, depth):
    """A third tag: the program cannot see the EtherType, so even ARP inside is dropped."""
    tags = QINQ + [(F.ETH_P_8021Q, 300 + i) for i in range(depth - 2)]
    check(fresh, F.udp4_frame(hello(), vlans=tags), "drop_unparsed")
    check(fresh, F.udp6_frame(hello(), vlans=tags), "drop_unparsed")
    check(fresh, F.eth(bytes(28), F.ETH_P_ARP, tags), "drop_unparsed")
    check(fresh, F.udp4_frame(hello(), vlans=tags)[:14 + 4 * depth - 2], "drop_unparsed")


# ---------------------------------------------------------------------------------------
# fragments
@pytest.mark.root
def test_ipv4_fragments(fresh):
    rec = hello()
    # a later fragment of UDP: no port in it, dropped whatever port its first fragment had
    for dport in (PORT, 53):
        check(fresh, F.udp4_frame(rec, dport=dport, frag_off=185), "drop_fragment")
        check(fresh, F.udp4_frame(rec, dport=dport, frag_off=185, mf=True), "drop_fragment")
    # the first fragment shows its port
    check(fresh, F.udp4_frame(rec, mf=True), "drop_fragment")
    check(fresh, F.udp4_frame(rec, dport=53, mf=True), "pass_not_stcp")
    # fragments of other protocols pass, first or later
    tcp = F.eth(F.ipv4(bytes(40), "10.0.0.2", "10.0.0.1", proto=F.TCP, frag_off=185), F.ETH_P_IP)
    check(fresh, tcp, "pass_not_stcp")


@pytest.mark.root
def test_ipv6_fragments(fresh):
    def later(nexthdr, payload=bytes(64)):
        return F.eth(F.ipv6(payload, "fd00::2", "fd00::1", nexthdr, [(F.FRAGMENT, F.ext_frag(0, 181, True))]),
                     F.ETH_P_IPV6)
    check(fresh, later(F.UDP), "drop_fragment")
    check(fresh, later(F.DSTOPTS), "drop_fragment")    # may lead to UDP
    check(fresh, later(F.TCP), "pass_not_stcp")
    check(fresh, later(F.ICMPV6), "pass_not_stcp")
    first = [(F.FRAGMENT, F.ext_frag(0, 0, more=True))]
    check(fresh, v6(hello(), first), "drop_fragment")
    check(fresh, v6(hello(), first, dport=53), "pass_not_stcp")
    # an atomic fragment (offset 0, no more): STCP never sends one
    check(fresh, v6(hello(), [(F.FRAGMENT, F.ext_frag(0, 0, more=False))]), "drop_fragment")
    # later fragment behind other headers: still only a fragment
    chain = F.dst_opts_chain(3) + [(F.FRAGMENT, F.ext_frag(0, 9, True))]
    check(fresh, F.eth(F.ipv6(bytes(64), "fd00::2", "fd00::1", F.UDP, chain), F.ETH_P_IPV6), "drop_fragment")


# ---------------------------------------------------------------------------------------
# malformed or truncated L2/L3: unparsed; clearly not STCP: passed
@pytest.mark.root
def test_malformed_headers_are_unparsed(fresh):
    ok4 = F.udp4_frame(hello())
    cases = {
        "ethernet only": ok4[:14],
        "ipv4 cut": ok4[:14 + 19],
        "ipv4 ihl 4": F.udp4_frame(hello(), ihl=4),
        "ipv4 version 6": F.udp4_frame(hello(), version=6),
        "ipv4 options past the end": F.udp4_frame(b"", ihl=15)[:14 + 40],
        "udp header cut": ok4[:14 + 20 + 7],
        "ipv6 cut": F.udp6_frame(hello())[:14 + 39],
        "ipv6 version 4": F.eth(F.ipv6(bytes(8), "fd00::2", "fd00::1", version=4), F.ETH_P_IPV6),
        "ipv6 udp header cut": F.udp6_frame(hello())[:14 + 40 + 4],
        "vlan tag cut": F.udp4_frame(hello(), vlans=[(F.ETH_P_8021Q, 5)])[:16],
    }
    for name, frame in cases.items():
        assert fresh.run(frame) == (XDP_DROP, "drop_unparsed"), name


@pytest.mark.root
def test_clearly_not_stcp_passes(fresh):
    cases = {
        "arp": F.eth(bytes(28), F.ETH_P_ARP),
        "lldp": F.eth(bytes(40), 0x88CC),
        "802.3 length": F.eth(bytes(46), 46),
        "ipv4 tcp to the port": F.eth(F.ipv4(bytes(40), "10.0.0.2", "10.0.0.1", proto=F.TCP), F.ETH_P_IP),
        "ipv4 icmp": F.eth(F.ipv4(bytes(16), "10.0.0.2", "10.0.0.1", proto=1), F.ETH_P_IP),
        "ipv4 udp other port": F.udp4_frame(hello(), dport=53),
        "ipv4 with options, other port": F.udp4_frame(hello(), dport=53, options=bytes(12)),
        "ipv6 udp other port": F.udp6_frame(hello(), dport=PORT - 1),
        "ipv6 icmp": F.eth(F.ipv6(bytes(16), "fd00::2", "fd00::1", F.ICMPV6), F.ETH_P_IPV6),
    }
    for name, frame in cases.items():
        assert fresh.run(frame) == (XDP_PASS, "pass_not_stcp"), name
    check(fresh, F.udp4_frame(hello(), options=bytes(12)), "pass_handshake")


@pytest.mark.root
def test_unconfigured_program_passes_everything(prog):
    prog.configure(port=0)
    try:
        for frame in (F.udp6_frame(hello(), exts=F.dst_opts_chain(9)), F.udp4_frame(hello(), frag_off=3),
                      F.udp4_frame(bytes(3))):
            check(prog, frame, "pass_not_stcp")
    finally:
        prog.configure()


# ---------------------------------------------------------------------------------------
# hello buckets
def _hellos(prog, sources, **kw) -> list:
    out = []
    for s in sources:
        frame = F.udp6_frame(hello(), src=s) if ":" in s else F.udp4_frame(hello(), src=s)
        out.append(prog.run(frame)[1])
    return out


@pytest.mark.root
def test_ipv6_sources_in_one_64_share_a_bucket(fresh):
    """Burst 2 per /64 (rate 1/s: no refill while the test runs): two addresses in one /64
    get 2 hellos between them; another /64 gets its own 2."""
    fresh.configure(hs_rate=1, hs_burst=2)
    t0 = time.monotonic()
    got = _hellos(fresh, ["2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2::1",
                          "2001:db8:1:2:8000::9", "2001:db8:1:3::1", "2001:db8:1:3::2", "2001:db8:1:3::3"])
    assert time.monotonic() - t0 < 0.9
    assert got == ["pass_handshake", "pass_handshake", "drop_hs_rate", "drop_hs_rate",
                   "pass_handshake", "pass_handshake", "drop_hs_rate"]


@pytest.mark.root
def test_prefix_lengths_are_configurable(fresh):
    fresh.configure(hs_rate=1, hs_burst=1, hs_prefix6=128, hs_prefix4=24)
    got = _hellos(fresh, ["2001:db8::1", "2001:db8::2", "2001:db8::1", "192.0.2.1", "192.0.2.200",
                          "192.0.3.1"])
    assert got == ["pass_handshake", "pass_handshake", "drop_hs_rate",
                   "pass_handshake", "drop_hs_rate", "pass_handshake"]
    fresh.reset_buckets()
    fresh.configure(hs_rate=1, hs_burst=1)                  # defaults: /32 and /64
    got = _hellos(fresh, ["192.0.2.1", "192.0.2.2", "192.0.2.1", "::ffff:192.0.2.2"])
    # an IPv6 source that spells an IPv4 address falls in ::/64, not in that IPv4 bucket
    assert got == ["pass_handshake", "pass_handshake", "drop_hs_rate", "pass_handshake"]


@pytest.mark.root
def test_global_budget_bounds_spoofed_sources(fresh):
    """Every hello from a fresh /64 passes its own bucket; the global bucket (burst 3,
    1/s) lets 3 through, then drops the rest as drop_hs_global."""
    fresh.configure(hs_global_rate=1, hs_global_burst=3)
    t0 = time.monotonic()
    got = _hellos(fresh, [f"2001:db8:{i:x}::1" for i in range(1, 11)])
    assert time.monotonic() - t0 < 0.9
    assert got == ["pass_handshake"] * 3 + ["drop_hs_global"] * 7
    fresh.configure(hs_global_rate=0)                       # 0: no global budget
    assert _hellos(fresh, [f"2001:db8:{i:x}::1" for i in range(20, 30)]) == ["pass_handshake"] * 10


@pytest.mark.root
def test_source_bucket_comes_before_the_global_one(fresh):
    """A single source over its own rate does not use up the budget the others share."""
    fresh.configure(hs_rate=1, hs_burst=1, hs_global_rate=1, hs_global_burst=3)
    got = _hellos(fresh, ["198.51.100.7"] * 6 + ["198.51.100.8", "198.51.100.9", "198.51.100.10"])
    assert got == ["pass_handshake"] + ["drop_hs_rate"] * 5 + ["pass_handshake"] * 2 + ["drop_hs_global"]


@pytest.mark.root
def test_loader_writes_and_reads_the_hello_fields(prog):
    from stcp.datapath import xdp_prog as xdp
    prog.configure(hs_prefix4=28, hs_prefix6=56, hs_global_rate=500, hs_global_burst=700)
    try:
        cfg = xdp.read_config(prog.h)
        assert {k: cfg[k] for k in ("hs_prefix4", "hs_prefix6", "hs_global_rate", "hs_global_burst")} == \
            {"hs_prefix4": 28, "hs_prefix6": 56, "hs_global_rate": 500, "hs_global_burst": 700}
        assert cfg["abi"] == xdp.MAP_ABI
    finally:
        prog.configure()
    for bad in ({"hs_prefix4": 33}, {"hs_prefix6": 129}, {"hs_global_rate": -1}, {"hs_global_burst": -1}):
        with pytest.raises(xdp.XdpSetupError):
            xdp.validate_limits(PORT, "auto", 1400, 20, 40, **bad)


# ---------------------------------------------------------------------------------------
# end to end: two namespaces, the program attached to a's veth by stcp-loader
@pytest.fixture(scope="module", params=["native", "generic"])
def env(request, xdp_toolchain):
    from stcp.datapath.xdp import XdpDatapath
    with veth_pair() as (a, b):
        r = loader("--netns", a.ns, "attach", a.ifname, "--mode", request.param, "--port", str(PORT),
                   "--hs-rate", "1", "--hs-burst", "3", "--hs-prefix4", "30", "--hs-prefix6", "64",
                   "--hs-global-rate", "900", "--hs-global-burst", "1800")
        assert r.returncode == 0, r.stderr
        dp = XdpDatapath.open(a.ifname, netns=a.ns)
        e = Env(a, b, dp, request.param)
        try:
            yield e
        finally:
            e.close()
            dp.close()
            loader("--netns", a.ns, "detach", a.ifname)


@pytest.mark.root
def test_loader_sets_and_shows_the_hello_limits(env):
    st = json.loads(loader("--netns", env.a.ns, "status", env.a.ifname, "--json").stdout)["interfaces"][0]
    assert {k: st["config"][k] for k in ("hs_rate", "hs_burst", "hs_prefix4", "hs_prefix6", "hs_global_rate",
                                         "hs_global_burst")} == \
        {"hs_rate": 1, "hs_burst": 3, "hs_prefix4": 30, "hs_prefix6": 64, "hs_global_rate": 900,
         "hs_global_burst": 1800}
    assert {"drop_unparsed", "drop_hs_global"} <= set(st["counters"])
    text = loader("--netns", env.a.ns, "status", env.a.ifname).stdout
    assert "per IPv4 /30 and IPv6 /64, 900/s burst 1800 in all" in text, text
    r = loader("--netns", env.a.ns, "attach", env.a.ifname, "--hs-prefix6", "129", "--force")
    assert r.returncode == 2 and "0..128" in r.stderr, r.stderr


@pytest.mark.root
def test_extension_chain_of_7_is_dropped_in_the_kernel(env):
    """A CLIENT_HELLO behind 7 destination-options headers, sent as a raw frame from the
    other namespace: drop_unparsed in the kernel, nothing at the socket. The same hello
    behind 6 is walked, passes and reaches the socket: the kernel delivers such chains,
    so it is the program that stops the 7."""
    env.add_source("chain", 40)                    # a /64 of its own: a fresh bucket
    src = env.src(6, "chain")

    def frame(n):
        return F.udp6_frame(hello(), src=src, dst=env.a.ip6, exts=F.dst_opts_chain(n),
                            mac_src=env.b.mac, mac_dst=env.a.mac)
    expect_verdicts(env, lambda: env.send_frame(frame(7)), {"drop_unparsed": 1})
    time.sleep(0.1)
    assert env.drain() == [], "the 7-header hello reached the socket"
    expect_verdicts(env, lambda: env.send_frame(frame(6)), {"pass_handshake": 1})
    got = env.recv_wait(1)
    assert [(g[0], g[1]) for g in got] == [(hello(), src)]


@pytest.mark.root
def test_two_addresses_of_one_64_share_a_bucket(env):
    """Burst 3 at 1/s per /64: 3 hellos from one address, then its neighbour in the same
    /64 is over the limit, while an address of another /64 is not."""
    pre = env.b.ip6.rsplit("::", 1)[0]
    one, two = f"{pre}:0:77::1", f"{pre}:0:77::2"     # one /64
    other = f"{pre}:0:78::1"
    for addr in (one, two, other):
        env.b.run("ip", "-6", "addr", "add", f"{addr}/64", "dev", env.b.ifname, "nodad")
        env.extra[addr] = ("", addr)             # a named IPv6 source for env.send (no IPv4 twin)

    def send():
        for _ in range(3):
            env.send(6, hello(), source=one)
        env.send(6, hello(), source=two)
        env.send(6, hello(), source=two)
        env.send(6, hello(), source=other)
    expect_verdicts(env, send, {"pass_handshake": 4, "drop_hs_rate": 2})
    got = env.recv_wait(4)
    assert sorted(g[1] for g in got) == sorted([one, one, one, other])
