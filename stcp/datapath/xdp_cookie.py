"""The XDP program's copy of the server's cookie secrets (docs/PROTOCOL.md section 4.5).

The program checks the cookies of version 2 hellos and answers hellos past its global
budget with COOKIEs of its own (bpf/stcp_cookie.h), so it must hold the very secrets the
server's endpoint holds (stcp.cookie.CookieSecrets): a cookie the kernel made must verify
in user space and the other way round. KernelCookies writes them into the program's
stcp_cookie map when the server starts and whenever they rotate, and rotates them on
time from a loop timer even while the kernel answers every hello and none reaches user
space. The kernel stops using keys one rotation period after they were due to be
replaced, so the keys of a server that died without removing them expire on their own.

One process writes a program's keys: the server of the xdp datapath, or of the afxdp
datapath in a single process. A pool of AF_XDP workers (each with secrets of its own)
writes none, and the program then checks no cookie and answers no hello: past its global
budget a hello is dropped, as without cookies.
"""
from __future__ import annotations

import asyncio
import logging
import struct
import time
from typing import Optional, TypedDict

from ..cookie import SECRET_LEN, CookieSecrets
from . import bpf

log = logging.getLogger("stcp.datapath.xdp")

KEYS = struct.Struct("=16s16sQII")     # struct stcp_cookie_keys
_KEY0 = struct.pack("=I", 0)


def pack_keys(current: bytes, previous: Optional[bytes], expires_ns: int) -> bytes:
    """struct stcp_cookie_keys: each secret as the bytes SipHash reads as its key."""
    if len(current) != SECRET_LEN or (previous is not None and len(previous) != SECRET_LEN):
        raise ValueError(f"cookie secrets are {SECRET_LEN} bytes")
    return KEYS.pack(current, previous or bytes(SECRET_LEN), expires_ns, previous is not None, 0)


class Keys(TypedDict):
    current: bytes
    previous: Optional[bytes]
    expires_ns: int


def read_keys(map_fd: int) -> Optional[Keys]:
    """The program's cookie keys ({current, previous (None if absent), expires_ns}), None if it has none."""
    raw = bpf.map_lookup(map_fd, _KEY0, KEYS.size)
    if raw is None:
        return None
    current, previous, expires_ns, has_previous, _ = KEYS.unpack(raw)
    return Keys(current=current, previous=previous if has_previous else None, expires_ns=expires_ns)


def write_keys(map_fd: int, secrets: CookieSecrets) -> bytes:
    """Write secrets into the program; the value written. The keys expire one rotation
    period after their next rotation was due (the clock of `now` is CLOCK_MONOTONIC, as
    the kernel's bpf_ktime_get_ns)."""
    expires = int((secrets.rotate_at + secrets.rotation) * 1e9)
    value = pack_keys(secrets.current, secrets.previous, expires)
    bpf.map_update(map_fd, _KEY0, value)
    return value


def cookie_keys_live(map_fd: int) -> bool:
    """Whether the program holds cookie keys that have not expired (it then checks and makes cookies)."""
    keys = read_keys(map_fd)
    return keys is not None and keys["expires_ns"] >= time.monotonic_ns()


def clear_keys(map_fd: int) -> bool:
    """Remove the program's keys (it then checks no cookie); False if it had none."""
    return bpf.map_delete(map_fd, _KEY0)


class KernelCookies:
    """Keeps a program's cookie keys equal to an endpoint's CookieSecrets, on an asyncio loop
    (whose clock, CLOCK_MONOTONIC, the secrets run on). close() removes the keys if they are
    still the ones written here."""

    def __init__(self, map_fd: int, secrets: CookieSecrets, loop: asyncio.AbstractEventLoop):
        self.map_fd = map_fd
        self.secrets = secrets
        self.loop = loop
        self.writes = 0                       # times the keys were written (tests, diagnostics)
        self._written: Optional[bytes] = None
        self._timer: Optional[asyncio.TimerHandle] = None

    def start(self) -> None:
        self.secrets.tick(self.loop.time())   # secrets made before the loop's clock was known
        self.secrets.on_rotate(self._write)
        self._schedule()

    def _write(self, secrets: CookieSecrets) -> None:
        try:
            self._written = write_keys(self.map_fd, secrets)
            self.writes += 1
        except OSError as e:                   # the program went away: user space still checks cookies
            log.warning("writing the cookie keys into the XDP program failed: %s", e)

    def _schedule(self) -> None:
        self._timer = self.loop.call_at(self.secrets.rotate_at, self._due)

    def _due(self) -> None:
        self.secrets.tick(self.loop.time())
        self._schedule()

    def close(self) -> None:
        """Stop (on the loop's thread) and remove the keys unless another process replaced them."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.secrets.remove_listener(self._write)
        if self._written is not None:
            try:
                if bpf.map_lookup(self.map_fd, _KEY0, KEYS.size) == self._written:
                    clear_keys(self.map_fd)
            except OSError:
                pass
            self._written = None
