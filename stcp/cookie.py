"""Stateless handshake cookies (docs/PROTOCOL.md section 4.5), shaped like WireGuard's
cookie reply and QUIC's Retry.

A server past its hello budget answers a CLIENT_HELLO that carries no valid cookie with a
COOKIE record instead of doing X25519 or keeping state; the client repeats its hello with
the cookie, which proves it receives datagrams at its source address. The cookie is

    SipHash-2-4-128(secret, src_addr (16, IPv4 as ::ffff:a.b.c.d) || src_port (u16)
                            || client_cid (8, as on the wire) || E (32))

under a 16-byte secret that rotates every ROTATION seconds; the previous secret still
verifies, so a cookie lives between one and two periods.
"""
from __future__ import annotations

import hmac
import os
import socket
import struct
from typing import Hashable, Optional, Tuple, cast

from .siphash import siphash128

ROTATION = 120.0
SECRET_LEN = 16
INPUT_LEN = 16 + 2 + 8 + 32
_PORT_CID = struct.Struct("!HQ")
_V4_MAPPED = bytes(10) + b"\xff\xff"


def address_bytes(addr: Hashable) -> Tuple[bytes, int]:
    """(16-byte address, port) of a datagram source as the socket module gives it: (host,
    port) or (host, port, flowinfo, scope_id), IPv4 hosts mapped to ::ffff:a.b.c.d."""
    host, port = cast(Tuple[str, int], addr)[:2]
    host = host.split("%", 1)[0]
    try:
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, host), port
    except OSError:
        return socket.inet_pton(socket.AF_INET6, host), port


def cookie_input(addr: Hashable, client_cid: int, client_key: bytes) -> bytes:
    """The 58 bytes a cookie is computed over."""
    raw, port = address_bytes(addr)
    return raw + _PORT_CID.pack(port, client_cid) + client_key


def compute(secret: bytes, addr: Hashable, client_cid: int, client_key: bytes) -> bytes:
    return siphash128(secret, cookie_input(addr, client_cid, client_key))


class CookieSecrets:
    """The current and the previous cookie secret, rotated on use every ROTATION seconds."""

    def __init__(self, now: float, rotation: float = ROTATION):
        self.rotation = rotation
        self.current = os.urandom(SECRET_LEN)
        self.previous: Optional[bytes] = None
        self._rotate_at = now + rotation

    def _rotate(self, now: float) -> None:
        if now < self._rotate_at:
            return
        if now >= self._rotate_at + self.rotation:     # idle for two periods: both are stale
            self.previous = None
        else:
            self.previous = self.current
        self.current = os.urandom(SECRET_LEN)
        self._rotate_at = now + self.rotation

    def make(self, addr: Hashable, client_cid: int, client_key: bytes, now: float) -> bytes:
        self._rotate(now)
        return compute(self.current, addr, client_cid, client_key)

    def verify(self, cookie: bytes, addr: Hashable, client_cid: int, client_key: bytes, now: float) -> bool:
        """Constant-time check against the current and the previous secret."""
        self._rotate(now)
        data = cookie_input(addr, client_cid, client_key)
        ok = hmac.compare_digest(siphash128(self.current, data), cookie)
        if self.previous is not None:
            ok |= hmac.compare_digest(siphash128(self.previous, data), cookie)
        return ok
