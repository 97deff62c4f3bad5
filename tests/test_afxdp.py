"""The AF_XDP datapath (`stcp serve --datapath afxdp`) and its C extension stcp._xsk.

Without root: the frame parser of stcp._xsk on valid frames (IPv4, IPv6 with extension
headers, VLAN) and on fuzzed ones (ValueError, never a crash), and XskSocket's argument
checks. With root, bcc and stcp._xsk: a full transfer through AF_XDP in a veth namespace
pair (server in a, `stcp connect` from b), SHA-256 intact, IPv4 and IPv6, native and
generic XDP; every upload datagram counted as received through AF_XDP, none through the
UDP socket; ARP/NDP still answered; SIGTERM leaves no XDP program, no pins, no process;
setup failures are one line naming the datapath to use.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from tests.support.netns import in_ns, ns_socket
from tests.support.packets import csum
from tests.support.poll import wait_until
from tests.support.procs import (
    AFXDP_PORT,
    STCP,
    WORKER_RE,
    client_results,
    clients,
    echo_all,
    key_file,
    pinned,
    read_all,
    serve_afxdp,
    serve_workers,
    session_key,
    stop,
    wait_for_stderr_line,
    xdp_status,
)

PORT = AFXDP_PORT
SIZE = 4 << 20

try:
    from stcp import _xsk
except ImportError:          # the tests that need it are marked xsk / afxdp and skip
    _xsk = None


# ---------------------------------------------------------------------------------------
# frames

def eth(proto: int, vlan: int | None = None) -> bytes:
    head = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02"
    if vlan is not None:
        return head + struct.pack("!HHH", 0x8100, vlan, proto)
    return head + struct.pack("!H", proto)


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(src: str, dst: str, l4: bytes, proto: int = 17, frag: int = 0, options: bytes = b"") -> bytes:
    import socket
    ihl = (20 + len(options)) // 4
    return (struct.pack("!BBHHHBBH", 0x40 | ihl, 0, 20 + len(options) + len(l4), 1, frag, 64, proto, 0)
            + socket.inet_aton(src) + socket.inet_aton(dst) + options + l4)


def ipv6(src: str, dst: str, l4: bytes, nexthdr: int = 17, ext: bytes = b"") -> bytes:
    import socket
    return (struct.pack("!IHBB", 0x60000000, len(ext) + len(l4), nexthdr, 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + ext + l4)


@pytest.mark.xsk
def test_parse_valid_frames():
    pl = os.urandom(100)
    f4 = eth(0x0800) + ipv4("10.1.2.3", "10.1.2.4", udp(5555, PORT, pl))
    assert _xsk.parse_frame(f4) == (pl, ("10.1.2.3", 5555))
    assert _xsk.parse_frame(f4, v4mapped=True) == (pl, ("::ffff:10.1.2.3", 5555, 0, 0))
    assert _xsk.parse_frame(f4 + bytes(20)) == (pl, ("10.1.2.3", 5555))          # Ethernet padding
    fv = eth(0x0800, vlan=100) + ipv4("10.1.2.3", "10.1.2.4", udp(5555, PORT, pl), options=bytes(8))
    assert _xsk.parse_frame(fv) == (pl, ("10.1.2.3", 5555))
    f6 = eth(0x86DD) + ipv6("fd00::7", "fd00::8", udp(6000, PORT, pl))
    assert _xsk.parse_frame(f6) == (pl, ("fd00::7", 6000, 0, 0))
    hop = bytes([17, 0]) + bytes(6)                    # hop-by-hop options, then UDP
    f6e = eth(0x86DD) + ipv6("fe80::1", "fe80::2", udp(6000, PORT, pl), nexthdr=0, ext=hop)
    assert _xsk.parse_frame(f6e, ifindex=7) == (pl, ("fe80::1", 6000, 0, 7))       # link-local: scope
    assert _xsk.parse_frame(eth(0x0800) + ipv4("1.2.3.4", "5.6.7.8", udp(1, 2, b""))) == (b"", ("1.2.3.4", 1))


@pytest.mark.xsk
@pytest.mark.parametrize("frame,why", [
    (b"", "shorter than an Ethernet"),
    (eth(0x0806) + bytes(28), "neither IPv4 nor IPv6"),                                 # ARP
    (eth(0x0800) + bytes(10), "truncated IPv4"),
    (eth(0x0800) + ipv4("1.1.1.1", "2.2.2.2", udp(1, 2, b"x"), proto=6), "not UDP"),
    (eth(0x0800) + ipv4("1.1.1.1", "2.2.2.2", udp(1, 2, b"x"), frag=0x2000), "fragment"),
    (eth(0x0800) + ipv4("1.1.1.1", "2.2.2.2", udp(1, 2, b"x"))[:-1], "total length"),
    (eth(0x86DD) + ipv6("::1", "::2", udp(1, 2, b"x"), nexthdr=44, ext=bytes(8)), "fragment"),
    (eth(0x86DD) + ipv6("::1", "::2", bytes(4), nexthdr=0, ext=b""), "extension"),
    (eth(0x0800) + ipv4("1.1.1.1", "2.2.2.2", struct.pack("!HHHH", 1, 2, 200, 0)), "UDP length"),
    (eth(0x0800) + ipv4("1.1.1.1", "2.2.2.2", struct.pack("!HHHH", 1, 2, 4, 0)), "below 8"),
])
def test_parse_malformed_raises(frame, why):
    with pytest.raises(ValueError, match=why):
        _xsk.parse_frame(frame)


@pytest.mark.xsk
def test_parse_fuzz_never_crashes():
    """Truncations, bit flips and random bytes: a tuple or ValueError, nothing else."""
    rng = random.Random(4)
    seeds = [eth(0x0800) + ipv4("10.0.0.1", "10.0.0.2", udp(1, PORT, os.urandom(64))),
             eth(0x86DD) + ipv6("fd00::1", "fd00::2", udp(1, PORT, os.urandom(64)), nexthdr=60,
                                ext=bytes([17, 1]) + bytes(14)),
             eth(0x0800, vlan=5) + ipv4("10.0.0.1", "10.0.0.2", udp(1, PORT, b"abc"), options=bytes(4))]
    ok = bad = 0
    for i in range(20000):
        s = bytearray(rng.choice(seeds))
        op = i % 4
        if op == 0:
            s = s[:rng.randrange(len(s) + 1)]
        elif op == 1:
            for _ in range(rng.randint(1, 6)):
                s[rng.randrange(len(s))] ^= 1 << rng.randrange(8)
        elif op == 2:
            s = bytearray(os.urandom(rng.randrange(120)))
        else:
            s[rng.randrange(12, min(60, len(s)))] = rng.randrange(256)
        try:
            payload, _addr = _xsk.parse_frame(bytes(s), v4mapped=bool(i & 8), ifindex=i & 3)
            assert isinstance(payload, bytes) and len(payload) <= len(s)
            ok += 1
        except ValueError:
            bad += 1
    assert ok and bad


def _verify_udp_frame(frame: bytes) -> None:
    """IPv4 header checksum and UDP checksum (pseudo-header) verify to zero."""
    off = 18 if frame[12:14] == b"\x81\x00" else 14
    if frame[off] >> 4 == 4:
        assert csum(frame[off:off + 20]) == 0
        u = frame[off + 20:]
        ph = frame[off + 12:off + 20] + struct.pack("!BBH", 0, 17, len(u))
    else:
        u = frame[off + 40:]
        ph = frame[off + 8:off + 40] + struct.pack("!I3xB", len(u), 17)
    assert struct.unpack("!H", u[4:6])[0] == len(u)
    assert csum(ph + u) == 0


@pytest.mark.xsk
@pytest.mark.parametrize("frame", [
    eth(0x0800) + ipv4("10.1.2.3", "10.1.2.4", udp(5555, PORT, b"hello"), options=bytes(4)),
    eth(0x0800, vlan=7) + ipv4("10.1.2.3", "10.1.2.4", udp(5555, PORT, b"x")),
    eth(0x86DD) + ipv6("fd00::7", "fd00::8", udp(6000, PORT, b"hello6")),
])
def test_reply_template_and_frame(frame):
    """A reply built from a received frame: MACs, addresses and ports swapped, lengths and
    checksums right for every payload size (odd ones too)."""
    t = _xsk.reply_template(frame)
    _payload_in, src = _xsk.parse_frame(frame)
    for n in (0, 1, 2, 17, 1000, 1452):
        pl = os.urandom(n)
        r = _xsk.udp_frame(t, pl)
        _verify_udp_frame(r)
        assert r[:6] == frame[6:12] and r[6:12] == frame[:6]
        got, dst = _xsk.parse_frame(r)
        assert got == pl and dst[1] == PORT
        back = _xsk.reply_template(r)           # a reply to the reply goes back to the sender
        assert _xsk.parse_frame(_xsk.udp_frame(back, b"z"))[1][:2] == src[:2]


@pytest.mark.xsk
def test_udp_frame_rejects_bad_templates():
    rng = random.Random(7)
    good = _xsk.reply_template(eth(0x0800) + ipv4("10.0.0.1", "10.0.0.2", udp(1, PORT, b"a")))
    for bad in (b"", b"x" * 13, good[:-1], good + b"\0", bytes(100), b"\0" * 42):
        with pytest.raises(ValueError):
            _xsk.udp_frame(bad, b"payload")
    for _ in range(5000):                          # bit flips: a frame or ValueError, never a crash
        t = bytearray(good)
        t[rng.randrange(len(t))] ^= 1 << rng.randrange(8)
        try:
            _xsk.udp_frame(bytes(t), os.urandom(rng.randrange(64)))
        except ValueError:
            pass
    with pytest.raises(ValueError):
        _xsk.udp_frame(good, bytes(70000))


# ---------------------------------------------------------------------------------------
# receive batches: one flow's consecutive datagrams joined as UDP GRO joins them
def _record(n: int, cid: int = 0x77, seq: int = 1) -> bytes:
    return struct.pack("!QQQ", n, cid, seq) + bytes(n)


FLOWS = [                       # (link and IP headers) -> frame for a UDP payload
    lambda pl: eth(0x0800) + ipv4("10.0.0.2", "10.0.0.1", udp(5000, PORT, pl)),
    lambda pl: eth(0x0800) + ipv4("10.0.0.2", "10.0.0.1", udp(5001, PORT, pl)),      # another port
    lambda pl: eth(0x0800, vlan=9) + ipv4("10.0.0.2", "10.0.0.1", udp(5000, PORT, pl)),  # same addr, VLAN
    lambda pl: eth(0x86DD) + ipv6("fd00::2", "fd00::1", udp(5000, PORT, pl)),
    lambda pl: eth(0x86DD) + ipv6("fe80::2", "fe80::1", udp(5000, PORT, pl)),        # link-local
]


@pytest.mark.xsk
def test_receive_batches_join_one_flow():
    """What recv() returns for frames off the ring (parse_frames, the same code): one
    flow's datagrams of one size joined, a shorter one ends the entry, a new flow or a
    longer datagram starts one; a GSO batch passed whole is cut at its first record."""
    f4, f4b = FLOWS[0], FLOWS[1]
    recs = [_record(100, seq=i) for i in range(1, 6)]
    short = _record(50, seq=6)
    got = _xsk.parse_frames([f4(r) for r in recs] + [f4(short), f4(recs[0]), f4b(recs[1]), b"junk"])
    a = ("10.0.0.2", 5000)
    assert got == [(b"".join(recs) + short, a, 124), (recs[0], a), (recs[1], ("10.0.0.2", 5001))]
    batch = b"".join(recs)                            # a GSO buffer that generic XDP passed whole
    assert _xsk.parse_frames([f4(batch)]) == [(batch, a, 124)]
    assert _xsk.parse_frames([f4(r) for r in recs], gro=False) == [(r, a) for r in recs]
    many = [f4(_record(40, seq=i)) for i in range(1, 70)]     # at most 64 per entry
    assert [len(e[0]) // 64 for e in _xsk.parse_frames(many)] == [64, 5]
    _, templates = _xsk.parse_frames([f4(recs[0]), f4b(recs[1])], templates=True)
    assert set(templates) == {a, ("10.0.0.2", 5001)}
    assert templates[a] == _xsk.reply_template(f4(recs[0]))


@pytest.mark.xsk
def test_receive_batches_match_the_reference():
    """Random frame sequences (flows interleaved, record sizes mixed, GSO batches, runs past
    64 datagrams, malformed frames): the C batches equal stcp.datapath.afxdp.rx_entries."""
    from stcp.datapath.afxdp import rx_entries
    rng = random.Random(11)
    for i in range(3000):
        frames = []
        for _ in range(rng.choice([1, 2, 5, 30, 80])):
            flow = rng.choice(FLOWS[:rng.choice([1, 2, 5])])
            kind = rng.random()
            if kind < 0.7:
                pl = _record(rng.choice([16, 40, 100, 100, 100, 1400]), seq=rng.randrange(1, 9))
            elif kind < 0.8:
                n = rng.choice([16, 40, 100])
                pl = b"".join(_record(n, seq=k) for k in range(1, rng.randrange(2, 9)))
                pl += _record(rng.randrange(16, n + 1)) if rng.random() < 0.5 else b""
            elif kind < 0.9:
                pl = os.urandom(rng.randrange(0, 60))
            else:
                pl = b""
            frame = flow(pl)
            if rng.random() < 0.03:
                frame = frame[:rng.randrange(len(frame))]
            frames.append(frame)
        kw = dict(v4mapped=bool(i & 1), ifindex=i & 3, templates=bool(i & 2), gro=(i % 7) != 0)
        assert _xsk.parse_frames(frames, **kw) == rx_entries(frames, **kw), (i, kw)


@pytest.mark.xsk
def test_xsk_arguments_checked():
    with pytest.raises((TypeError, ValueError, OverflowError)):
        _xsk.parse_frame("not bytes")
    with pytest.raises(ValueError):
        _xsk.XskSocket("", 0)
    with pytest.raises(ValueError):
        _xsk.XskSocket("x" * 40, 0)
    with pytest.raises(OSError):
        _xsk.XskSocket("no-such-if9", 0)
    with pytest.raises(ValueError):
        _xsk.XskSocket("lo", 0, ring_size=1000)
    with pytest.raises(ValueError):
        _xsk.XskSocket("lo", 0, frame_size=1000)
    with pytest.raises(ValueError):
        _xsk.XskSocket("lo", 0, frame_count=10)
    s = _xsk.XskSocket.__new__(_xsk.XskSocket)          # never initialised: behaves as closed
    for call in (s.fileno, s.recv, s.poll, s.stats):
        with pytest.raises(ValueError, match="closed"):
            call()
    s.close()
    s.close()


# ---------------------------------------------------------------------------------------
# in namespaces
@pytest.mark.root
@pytest.mark.afxdp
@pytest.mark.slow
@pytest.mark.parametrize("fam,mode,tx", [(4, "native", "socket"), (6, "native", "socket"), (4, "generic", "socket"),
                                         (6, "generic", "socket"), (4, "native", "afxdp"), (6, "native", "afxdp"),
                                         (6, "generic", "afxdp")])
def test_transfer_through_afxdp(fam, mode, tx, veth):
    a, b = veth()
    host = a.ip4 if fam == 4 else a.ip6
    addr = f"{host}:{PORT}" if fam == 4 else f"[{host}]:{PORT}"
    server = serve_afxdp(a, addr, mode, "--afxdp-tx", tx)
    try:
        lines = wait_for_stderr_line(server, "serving on", timeout=60)
        assert any("AF_XDP on" in ln and f"XDP {mode} mode" in ln for ln in lines), lines
        data = os.urandom(SIZE)
        t0 = time.monotonic()
        r = subprocess.run(b.cmd(*STCP, "connect", *pinned(), addr), input=data,
                           capture_output=True, timeout=120)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        assert len(r.stdout) == SIZE, f"echoed {len(r.stdout)} of {SIZE} bytes"
        assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
        # ARP / neighbour discovery went through the program to the stack: b resolved a
        neigh = b.run("ip", "neigh", "show", host).stdout
        assert "lladdr" in neigh, neigh
        link = a.run("ip", "-d", "link", "show", a.ifname).stdout
        assert "prog/xdp" in link, link
    finally:
        err = stop(server)
    assert server.returncode == 0, err
    m = re.search(r"AF_XDP: (\d+) datagrams received through AF_XDP \((\d+) wakeups[^)]*\), (\d+) through the "
                  r"UDP socket; sent (\d+) through AF_XDP, (\d+) through the UDP socket", err)
    assert m, err
    via_xsk, via_sock = int(m.group(1)), int(m.group(3))
    tx_xsk, tx_sock = int(m.group(4)), int(m.group(5))
    assert via_xsk >= SIZE // 1500, err            # the whole upload came through AF_XDP
    assert via_sock == 0, err
    m = re.search(r"(\d+) packets came in pieces \((\d+) gathered", err)
    assert m, err
    pieces, gathered = int(m.group(1)), int(m.group(2))
    if mode == "generic":     # generic XDP passed the client's GSO buffers whole (multi-buffer AF_XDP)
        assert pieces > 0, err
        # most are copied once, straight from their pieces (a packet's pieces reach the ring
        # together, and recv() leaves one cut by its batch for the next call)
        assert gathered * 2 <= pieces, err
    else:                     # native: the veth peer cut them into single frames
        assert pieces == 0, err
    if tx == "afxdp":                              # the echo went out on the TX ring
        assert tx_xsk >= SIZE // 1500 and tx_sock <= tx_xsk // 10, err
    else:
        assert tx_xsk == 0 and tx_sock >= SIZE // 1500, err
    # clean shutdown: no XDP program, no pins, no process
    link = a.run("ip", "-d", "link", "show", a.ifname).stdout
    assert "prog/xdp" not in link, link
    assert not a.run("sh", "-c", "ls /sys/fs/bpf/stcp 2>/dev/null", check=False).stdout.strip()
    assert not os.path.exists("/sys/fs/bpf/stcp/veth0")
    print(f"{SIZE >> 20} MiB echoed over IPv{fam} through AF_XDP ({mode}, replies via {tx}) in {took:.2f}s; "
          f"{via_xsk} datagrams in via AF_XDP, {tx_xsk} out via AF_XDP, {tx_sock} out via the socket")


@pytest.mark.root
@pytest.mark.afxdp
def test_setup_failures_are_one_line(veth):
    a, _b = veth()
    key = session_key()[0]
    base = [*STCP, "serve", "--listen", f"{a.ip4}:{PORT}", "--datapath", "afxdp", "--key", key]
    r = a.run(*base, check=False, timeout=60)
    assert r.returncode == 2 and "--iface" in r.stderr, r.stderr
    r = a.run(*base, "--iface", "nosuch0", check=False, timeout=60)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "nosuch0" in lines[0] and "--datapath xdp" in lines[0] and "--datapath socket" in lines[0]
    if shutil.which("setpriv"):
        nobody_key = os.path.join(os.path.dirname(key), "nobody.key")      # a key nobody (65534) can read
        if not os.path.exists(nobody_key):
            key_file(nobody_key)
            os.chown(nobody_key, 65534, 65534)
        unprivileged = [*base[:-1], nobody_key]
        r = a.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *unprivileged, "--iface", a.ifname,
                  check=False, timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert "needs CAP_" in lines[0] and "CAP_NET_RAW" in lines[0] and "--datapath socket" in lines[0], lines
    # more workers than RX queues (veth0 has one), or none
    r = a.run(*base, "--iface", a.ifname, "--workers", "2", check=False, timeout=60)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "RX queue" in lines[0], r.stderr
    r = a.run(*base, "--iface", a.ifname, "--workers", "0", check=False, timeout=60)
    assert r.returncode == 2 and "--workers" in r.stderr, r.stderr
    assert "prog/xdp" not in a.run("ip", "-d", "link", "show", a.ifname).stdout
    # stcp._xsk missing (built without libxdp-dev): one line, nothing attached
    code = ("import sys; sys.modules['stcp._xsk'] = None\n"
            "from stcp.cli.main import main\n"
            f"sys.exit(main(['serve', '--listen', '{a.ip4}:{PORT}', '--datapath', 'afxdp', '--iface', 'veth0', "
            f"'--key', '{key}']))")
    r = a.run(sys.executable, "-c", code, check=False, timeout=60)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "stcp._xsk" in lines[0] and "--datapath xdp" in lines[0], lines
    assert "prog/xdp" not in a.run("ip", "-d", "link", "show", a.ifname).stdout
    # an interface that already carries an XDP program: refused, left alone
    server = serve_afxdp(a, f"{a.ip4}:{PORT}")
    try:
        wait_for_stderr_line(server, "serving on", timeout=60)
        r = a.run(*base, "--iface", a.ifname, check=False, timeout=60)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1 and "already" in lines[0], r.stderr
        assert "prog/xdp" in a.run("ip", "-d", "link", "show", a.ifname).stdout
    finally:
        stop(server)
    assert "prog/xdp" not in a.run("ip", "-d", "link", "show", a.ifname).stdout


@pytest.mark.root
@pytest.mark.afxdp
def test_xsk_socket_in_namespace(veth):
    """XskSocket directly: binds to an existing queue (no program needed), refuses a queue
    that does not exist, and recv() on an idle socket returns []."""
    code = (
        "import stcp._xsk as x\n"
        "s = x.XskSocket('veth0', 0, frame_count=256, ring_size=256)\n"
        "assert s.fileno() > 0 and s.queue_id == 0 and not s.zerocopy\n"
        "assert s.recv() == [] and s.poll(10) is False\n"
        "st = s.stats(); assert st['rx_frames'] == 0 and 'rx_dropped' in st, st\n"
        "s.close(); assert s.closed\n"
        "try:\n"
        "    x.XskSocket('veth0', 7)\n"
        "except OSError as e:\n"
        "    print('refused', e)\n"
        "else:\n"
        "    raise SystemExit('queue 7 accepted')\n"
    )
    a, _b = veth()
    r = a.run(sys.executable, "-c", code, check=False, timeout=60)
    assert r.returncode == 0 and "refused" in r.stdout, r.stdout + r.stderr


def _udp_frame(src_mac: str, dst_mac: str, src: str, dst: str, payload: bytes, fam: int) -> bytes:
    """A complete Ethernet/IP/UDP frame with every checksum filled in."""
    import socket
    mac = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
    u = udp(5000, 6000, payload)
    if fam == 4:
        ph = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, len(u))
        u = u[:6] + struct.pack("!H", csum(ph + u) or 0xFFFF) + u[8:]
        ip = bytearray(ipv4(src, dst, u))
        ip[10:12] = struct.pack("!H", csum(bytes(ip[:20])))
        return mac + b"\x08\x00" + bytes(ip)
    ph = (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
          + struct.pack("!I3xB", len(u), 17))
    u = u[:6] + struct.pack("!H", csum(ph + u) or 0xFFFF) + u[8:]
    return mac + b"\x86\xdd" + ipv6(src, dst, u)


@pytest.mark.root
@pytest.mark.afxdp
@pytest.mark.parametrize("fam", [4, 6])
def test_xsk_transmit_on_veth(fam, veth):
    """AF_XDP transmit in copy mode on veth reaches the peer's UDP socket (it was expected
    not to); bad frames raise. (The datapath sends its replies with send_udp when asked to.)"""
    import socket
    n = 300
    a, b = veth()
    rx = ns_socket(b.ns, socket.AF_INET if fam == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)       # SO_RCVBUFFORCE: hold every frame
        rx.bind((b.ip4 if fam == 4 else b.ip6, 6000))
        rx.settimeout(2)
        src, dst = (a.ip4, b.ip4) if fam == 4 else (a.ip6, b.ip6)
        frames = [_udp_frame(a.mac, b.mac, src, dst, b"tx %d" % i, fam) for i in range(n)]
        with in_ns(a.ns):
            x = _xsk.XskSocket(a.ifname, 0, frame_count=1024, ring_size=512)
        with x:
            for bad in ([b"short"], [bytes(5000)], [42], "notalist", [None]):
                with pytest.raises((ValueError, TypeError)):
                    x.send(bad)
            sent = 0
            for _ in range(100):
                sent += x.send(frames[sent:sent + 64])
                if sent == n:
                    break
            assert sent == n
            got = set()
            try:
                while len(got) < n:
                    got.add(rx.recv(100))
            except socket.timeout:
                pass
            assert got == {b"tx %d" % i for i in range(n)}, f"{len(got)} of {n} frames arrived"
            assert x.stats()["tx_frames"] == n
    finally:
        rx.close()


# ---------------------------------------------------------------------------------------
# worker processes (--workers N): a worker owns whole RX queues
def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.root
@pytest.mark.afxdp
@pytest.mark.slow
def test_workers_share_the_connections(veth):
    """12 connections over a 2-queue veth, 2 workers: every transfer intact, each connection
    counted by exactly one worker, both workers used, nothing through the UDP sockets; on
    SIGTERM the workers exit, the program is detached."""
    n_clients, size = 12, 1 << 20
    a, b = veth(queues=2)
    server, pids = serve_workers(a, 2)
    try:
        ok, failed = echo_all(b, f"{a.ip4}:{PORT}", [os.urandom(size) for _ in range(n_clients)])
        assert ok == n_clients, failed
    finally:
        err = stop(server)
    assert server.returncode == 0, err
    per = {int(m.group(1)): m.groups()[1:] for m in WORKER_RE.finditer(err)}
    assert set(per) == {0, 1}, err
    conns = {w: int(v[2]) for w, v in per.items()}
    assert sum(conns.values()) == n_clients, err           # each connection in one worker only
    assert all(conns.values()), f"one worker got every connection: {conns}"
    assert all(int(v[1]) == 0 for v in per.values()), err   # nothing through the UDP sockets
    assert all(int(v[3]) <= 16 for v in per.values()), err  # late records after a close only
    assert all(_gone(p) for p in pids.values())
    assert "prog/xdp" not in a.run("ip", "-d", "link", "show", a.ifname).stdout
    print(f"connections per worker: {conns}")


@pytest.mark.root
@pytest.mark.afxdp
@pytest.mark.slow
def test_killed_worker_is_replaced(veth):
    """SIGKILL one worker mid-transfer: the supervisor reports and replaces it; the other
    worker's transfers complete intact; the dead worker's clients end with an error."""
    n_clients, half = 12, 1 << 20
    a, b = veth(queues=2)
    server, pids = serve_workers(a, 2)
    try:
        datas = [os.urandom(2 * half) for _ in range(n_clients)]
        # idle timeout: long enough for a busy machine, short enough that the dead
        # worker's clients give up within the test
        procs = clients(b, f"{a.ip4}:{PORT}", n_clients, "--idle-timeout", "8")
        outs, readers = read_all(procs)
        import threading
        for p, d in zip(procs, datas, strict=True):
            p.stdin.write(d[:half])
            p.stdin.flush()
        # every connection established (its CID in the kernel table) and mid-transfer
        wait_until(lambda: xdp_status(a.ns)["live_cids"] == n_clients, 30, f"{n_clients} live connections")
        os.kill(pids[1], signal.SIGKILL)

        def feed(p, rest):                  # a stalled client must not hold up the others
            try:
                p.stdin.write(rest)
                p.stdin.close()
            except (BrokenPipeError, ValueError):
                pass

        feeders = [threading.Thread(target=feed, args=(p, d[half:]), daemon=True)
                   for p, d in zip(procs, datas, strict=True)]
        for t in feeders:                   # the rest at once: no connection sits idle
            t.start()
        lines = wait_for_stderr_line(server, "[worker 1] serving on", timeout=60)
        assert any("worker 1" in ln and "died (signal 9)" in ln for ln in lines), lines
        for t in readers + feeders:
            t.join(timeout=120)
        ok, failures = client_results(procs, datas, outs)
        for errl in failures:
            assert errl and errl[-1].startswith("stcp: "), errl
        failed = len(failures)
        assert ok >= 1 and failed >= 1, (ok, failed)
        # the dead worker's connection IDs were taken out of the kernel table, the
        # others' left it as their connections ended
        assert any("removed worker 1's" in ln for ln in lines), lines
        deadline = time.monotonic() + 15
        while xdp_status(a.ns)["live_cids"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert xdp_status(a.ns)["live_cids"] == 0, "connection IDs left in the kernel table"
    finally:
        err = stop(server)
    assert server.returncode == 0, err
    per = {int(m.group(1)): int(m.group(4)) for m in WORKER_RE.finditer(err)}
    assert per.get(0) == ok, (per, ok, err)      # exactly worker 0's connections completed
    assert _gone(pids[0])
    assert "prog/xdp" not in a.run("ip", "-d", "link", "show", a.ifname).stdout
    print(f"after killing worker 1: {ok} transfers completed, {failed} ended with an error")
