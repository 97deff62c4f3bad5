"""SipHash-2-4 with a 128-bit output, the keyed function of the handshake cookie.

SipHash (Aumasson and Bernstein, 2012) is a PRF on short inputs built from 64-bit adds,
rotations and xors only, so the same function can run in an XDP program (the kernel has
it as `siphash`), in C (stcp/_ext/siphash.c) and here. The 128-bit output is the
reference implementation's `outlen = 16` variant: v1 ^= 0xee at the start, v2 ^= 0xee
before the first finalization, v1 ^= 0xdd before the second. `siphash128_ref` is the
reference; `siphash128` is the C one when it is built (tests/test_cookie.py checks that
both give the reference implementation's published 128-bit vectors).
"""
from __future__ import annotations

import os
import struct
from types import ModuleType
from typing import Optional, Tuple

_M64 = (1 << 64) - 1
_WORD = struct.Struct("<Q")
_KEY = struct.Struct("<QQ")


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def _rounds(v0: int, v1: int, v2: int, v3: int, n: int) -> Tuple[int, int, int, int]:
    for _ in range(n):
        v0 = (v0 + v1) & _M64
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _M64
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _M64
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _M64
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash128_ref(key: bytes, data: bytes) -> bytes:
    """SipHash-2-4-128 of `data` under the 16-byte `key` (pure Python, the reference)."""
    if len(key) != 16:
        raise ValueError("SipHash takes a 16-byte key")
    data = bytes(data)
    k0, k1 = _KEY.unpack(key)
    v0 = 0x736F6D6570736575 ^ k0
    v1 = 0x646F72616E646F6D ^ k1 ^ 0xEE
    v2 = 0x6C7967656E657261 ^ k0
    v3 = 0x7465646279746573 ^ k1
    n = len(data)
    full = n - n % 8
    for i in range(0, full, 8):
        m = _WORD.unpack_from(data, i)[0]
        v3 ^= m
        v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
        v0 ^= m
    b = ((n & 0xFF) << 56) | int.from_bytes(data[full:], "little")
    v3 ^= b
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
    v0 ^= b
    v2 ^= 0xEE
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 4)
    first = v0 ^ v1 ^ v2 ^ v3
    v1 ^= 0xDD
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 4)
    return _KEY.pack(first, v0 ^ v1 ^ v2 ^ v3)


# stcp._siphash (stcp/_ext/siphash.c); STCP_PURE_PYTHON=1 keeps the reference, as in stcp.crypto.
_c: Optional[ModuleType] = None
if os.environ.get("STCP_PURE_PYTHON", "") in ("", "0"):
    try:
        from . import _siphash as _c
    except ImportError:
        _c = None
ACCELERATED = _c is not None
siphash128 = _c.siphash128 if _c is not None else siphash128_ref
