"""The handshake cookie's pieces: SipHash-2-4-128 (C and the Python reference, against the
reference implementation's published vectors and each other), the cookie input layout of
docs/PROTOCOL.md section 4.5, and the token bucket of the hello and RESET budgets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from stcp import cookie, siphash
from stcp.ratelimit import TokenBucket

VECTORS = [line for line in (Path(__file__).parent / "siphash128_vectors.txt").read_text().split("\n")
           if line and not line.startswith("#")]
try:
    from stcp import _siphash
except ImportError:        # the fresh-install test fails loudly for a missing build; here the C rows skip
    _siphash = None
PATHS = [siphash.siphash128_ref,
         pytest.param(getattr(_siphash, "siphash128", None),
                      marks=pytest.mark.skipif(_siphash is None, reason="stcp._siphash not built"))]


def test_there_are_64_reference_vectors():
    assert len(VECTORS) == 64 and all(len(v) == 32 for v in VECTORS)


@pytest.mark.parametrize("mac", PATHS, ids=["python", "c"])
def test_reference_vectors(mac):
    key = bytes(range(16))
    for i, expected in enumerate(VECTORS):
        assert mac(key, bytes(range(i))).hex() == expected, f"message of {i} bytes"


@pytest.mark.skipif(_siphash is None, reason="stcp._siphash not built")
@settings(max_examples=500, deadline=None, derandomize=True)
@given(key=st.binary(min_size=16, max_size=16), data=st.binary(max_size=300))
def test_c_equals_the_reference(key, data):
    assert _siphash.siphash128(key, data) == siphash.siphash128_ref(key, data)


@pytest.mark.parametrize("mac", PATHS, ids=["python", "c"])
def test_key_must_be_16_bytes(mac):
    for bad in (b"", bytes(15), bytes(17)):
        with pytest.raises(ValueError):
            mac(bad, b"x")


def test_the_c_path_is_the_default_unless_pure_python_is_asked():
    code = "from stcp import siphash; print(siphash.ACCELERATED)"
    env = dict(os.environ, STCP_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["False"], out.stderr
    if _siphash is not None:
        env.pop("STCP_PURE_PYTHON")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.split() == ["True"], out.stderr


def test_cookie_input_layout():
    E = bytes(range(32))
    v4 = cookie.cookie_input(("192.0.2.1", 5000), 0x0102030405060708, E)
    assert v4 == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1]) + (5000).to_bytes(2, "big") \
        + bytes(range(1, 9)) + E
    assert len(v4) == cookie.INPUT_LEN == 58
    # an IPv4 source seen on a dual-stack socket as ::ffff:a.b.c.d is the same source
    assert cookie.cookie_input(("::ffff:192.0.2.1", 5000, 0, 0), 0x0102030405060708, E) == v4
    v6 = cookie.cookie_input(("2001:db8::1%eth0", 443, 0, 2), 1, E)
    assert v6[:16] == bytes.fromhex("20010db8000000000000000000000001") and v6[16:18] == b"\x01\xbb"


def test_token_bucket():
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.take(0.05) and b.take(0.1)               # one token per 100 ms
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]   # never more than the burst
    zero = TokenBucket(rate=0, burst=0)
    assert not any(zero.take(t) for t in (0.0, 1.0, 1e9))
    with pytest.raises(ValueError):
        TokenBucket(-1, 1)
