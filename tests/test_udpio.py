"""stcp._udpio: sendmmsg/recvmmsg on loopback, IPv4 and IPv6, GSO/GRO, and bad input
(stcp._demux.group_by_cid, which groups what recvmmsg returns, is tested in test_demux.py)."""
from __future__ import annotations

import errno
import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from stcp import endpoint

try:
    from stcp import _aead, _udpio
except ImportError as exc:
    pytest.fail(f"stcp C extensions are not built ({exc}); run 'make' or 'pip install -e .'", pytrace=False)


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = [pytest.param((socket.AF_INET, "127.0.0.1"), id="ipv4"),
            pytest.param((socket.AF_INET6, "::1"), id="ipv6",
                         marks=pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback"))]


def udp(family, host):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def recv_all(sock, want, bufsize=2048, gro=False, timeout=2.0):
    """recvmmsg until `want` items arrived or timeout."""
    got, deadline = [], time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        batch = _udpio.recvmmsg(sock, 64, bufsize, gro=gro) if gro else _udpio.recvmmsg(sock, 64, bufsize)
        if not batch:
            time.sleep(0.002)
        got.extend(batch)
    return got


@pytest.fixture(params=FAMILIES)
def pair(request):
    family, host = request.param
    a, b = udp(family, host), udp(family, host)
    yield a, b
    a.close()
    b.close()


def test_send_recv_unconnected(pair):
    a, b = pair
    dgrams = [bytes([i]) * i for i in range(50)]
    assert _udpio.sendmmsg(a, dgrams, b.getsockname()) == 50
    got = recv_all(b, 50)
    assert [d for d, _ in got] == dgrams
    assert {addr for _, addr in got} == {a.getsockname()}
    # the reply goes back to the address as received
    assert _udpio.sendmmsg(b.fileno(), [b"pong"], got[0][1]) == 1
    assert recv_all(a, 1) == [(b"pong", b.getsockname())]


def test_connected_socket_addr_none(pair):
    a, b = pair
    a.connect(b.getsockname())
    assert _udpio.sendmmsg(a, [b"one", bytearray(b"two"), memoryview(b"xthreex")[1:-1]]) == 3
    assert [d for d, _ in recv_all(b, 3)] == [b"one", b"two", b"three"]


def test_empty_is_nonblocking(pair):
    a, b = pair
    assert a.getblocking()
    start = time.monotonic()
    assert _udpio.recvmmsg(a, 16, 2048) == []
    assert time.monotonic() - start < 0.5
    assert _udpio.sendmmsg(a, [], b.getsockname()) == 0


def test_more_than_one_kernel_batch(pair):
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    n = _udpio.MAX_BATCH + 300
    dgrams = [i.to_bytes(4, "big") for i in range(n)]
    assert _udpio.sendmmsg(a, dgrams, b.getsockname()) == n
    got = [int.from_bytes(d, "big") for d, _ in recv_all(b, n, timeout=1.0)]
    assert got and got == sorted(got)          # the receive buffer may drop some, never reorder


def test_truncation_keeps_prefix(pair):
    a, b = pair
    _udpio.sendmmsg(a, [b"0123456789"], b.getsockname())
    assert recv_all(b, 1, bufsize=4)[0][0] == b"0123"


def test_dual_stack_maps_ipv4():
    if not has_ipv6():
        pytest.skip("no IPv6")
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    v6.bind(("::", 0))
    v4 = udp(socket.AF_INET, "127.0.0.1")
    try:
        assert _udpio.sendmmsg(v6, [b"hi"], ("127.0.0.1", v4.getsockname()[1])) == 1
        data, addr = recv_all(v4, 1)[0]
        assert data == b"hi" and addr == ("127.0.0.1", v6.getsockname()[1])
        _udpio.sendmmsg(v4, [b"back"], ("127.0.0.1", v6.getsockname()[1]))
        data, addr = recv_all(v6, 1)[0]
        assert data == b"back" and addr == ("::ffff:127.0.0.1", v4.getsockname()[1], 0, 0)
    finally:
        v6.close()
        v4.close()


def gso_works(sock, dest) -> bool:
    try:
        _udpio.sendmmsg(sock, [b"\0" * 20], dest, segment_size=10)
        return True
    except OSError as exc:
        if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return False
        raise


def test_gso_send_and_gro_receive_of_sealed_records(pair):
    """The socket datapath's bulk pipeline: seal_stream into one buffer, one GSO send, GRO
    receive, group_by_cid, open_records: the data arrives whole, as one stretch."""
    a, b = pair
    if not gso_works(a, b.getsockname()):
        pytest.skip("kernel without UDP GSO")
    recv_all(b, 2, timeout=0.5)   # drain the probe
    b.setsockopt(_udpio.SOL_UDP, _udpio.UDP_GRO, 1)
    c = _aead.RecordCipher(1, bytes(range(32)), bytes(12))
    data = bytes(range(256)) * 40
    chunk = 1000
    seg = _aead.HEADER_LEN + _aead.STREAM_FRAME_OVERHEAD + chunk + _aead.TAG_LEN
    out = c.seal_stream(77, 500, data, 0, chunk, False)
    assert _udpio.sendmmsg(a, [out], b.getsockname(), segment_size=seg) == 1
    batch, deadline = [], time.monotonic() + 2
    while sum(len(d) for d, _, _ in batch) < len(out) and time.monotonic() < deadline:
        for item in _udpio.recvmmsg(b, 16, 65535, gro=True):
            assert item[1] == a.getsockname() and item[2] == seg
            batch.append(item)
    groups = endpoint.group_by_cid(batch)
    assert [(cid, addr) for cid, addr, _ in groups] == [(77, a.getsockname())]
    got = c.open_records(groups[0][2], 77, 0, -1, 1 << 62)
    assert got == [(0, (len(data) + chunk - 1) // chunk, data, 500, len(out))]


def test_gso_without_gro_arrives_split(pair):
    a, b = pair
    if not gso_works(a, b.getsockname()):
        pytest.skip("kernel without UDP GSO")
    recv_all(b, 2, timeout=0.5)
    assert _udpio.sendmmsg(a, [b"a" * 2500, b"short"], b.getsockname(), segment_size=1000) == 2
    assert [d for d, _ in recv_all(b, 4)] == [b"a" * 1000, b"a" * 1000, b"a" * 500, b"short"]


def test_bad_arguments(pair):
    a, b = pair
    dest = b.getsockname()
    bad = [
        (TypeError, lambda: _udpio.sendmmsg(a, [b"x", "str"], dest)),
        (TypeError, lambda: _udpio.sendmmsg(a, None, dest)),
        (TypeError, lambda: _udpio.sendmmsg(a, [b"x"], "127.0.0.1")),
        (TypeError, lambda: _udpio.sendmmsg(a, [b"x"], ("127.0.0.1",))),
        (TypeError, lambda: _udpio.sendmmsg(a, [b"x"], (1, 2))),
        (ValueError, lambda: _udpio.sendmmsg(a, [b"x"], ("localhost", 9))),
        (ValueError, lambda: _udpio.sendmmsg(a, [b"x"], ("not an address", 9))),
        (OverflowError, lambda: _udpio.sendmmsg(a, [b"x"], (dest[0], 70000))),
        (OverflowError, lambda: _udpio.sendmmsg(a, [b"x"], (dest[0], -1))),
        (ValueError, lambda: _udpio.sendmmsg(a, [b"x"], dest, segment_size=-1)),
        (ValueError, lambda: _udpio.sendmmsg(a, [b"x"], dest, segment_size=1 << 20)),
        (OSError, lambda: _udpio.sendmmsg(a, [b"x"])),                      # not connected
        (OSError, lambda: _udpio.sendmmsg(a, [b"x" * 70000], dest)),        # EMSGSIZE
        (ValueError, lambda: _udpio.recvmmsg(a, 0, 2048)),
        (ValueError, lambda: _udpio.recvmmsg(a, _udpio.MAX_BATCH + 1, 2048)),
        (ValueError, lambda: _udpio.recvmmsg(a, 4, 0)),
        (ValueError, lambda: _udpio.recvmmsg(a, 1024, 1 << 20)),
        (TypeError, lambda: _udpio.recvmmsg(a, "4", 2048)),
        (TypeError, lambda: _udpio.recvmmsg("fd", 4, 2048)),
        (ValueError, lambda: _udpio.recvmmsg(-1, 4, 2048)),
    ]
    for exc, call in bad:
        with pytest.raises(exc):
            call()
    if a.family == socket.AF_INET:
        with pytest.raises(ValueError):
            _udpio.sendmmsg(a, [b"x"], ("::1", 9))


def test_closed_and_non_inet_descriptors():
    s = udp(socket.AF_INET, "127.0.0.1")
    fd = s.fileno()
    s.close()
    with pytest.raises(OSError):
        _udpio.recvmmsg(fd, 4, 2048)
    with pytest.raises(OSError):
        _udpio.sendmmsg(fd, [b"x"], ("127.0.0.1", 9))
    u1, u2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError):
            _udpio.sendmmsg(u1, [b"x"], ("127.0.0.1", 9))
        assert _udpio.sendmmsg(u1, [b"unix"]) == 1
        assert _udpio.recvmmsg(u2, 4, 100) == [(b"unix", None)]
    finally:
        u1.close()
        u2.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(args=st.lists(st.one_of(st.none(), st.integers(-(1 << 40), 1 << 40), st.binary(max_size=32),
                               st.text(max_size=12), st.lists(st.binary(max_size=16), max_size=3),
                               st.tuples(st.sampled_from(["127.0.0.1", "::1", "x"]),
                                         st.sampled_from([-5, 0, 65536, 70000]))),  # never a live port
                     max_size=4),
       fn=st.sampled_from(["sendmmsg", "recvmmsg"]))
def test_fuzz_arguments(pair, args, fn):
    a, _ = pair
    args = [a if i == 0 and isinstance(x, int) else x for i, x in enumerate(args)]
    try:
        getattr(_udpio, fn)(*args)
    except (TypeError, ValueError, OverflowError, OSError):
        pass
