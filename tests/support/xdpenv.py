"""The XDP program attached in a namespace pair, with sockets around it: a receiver in
host a (behind the program), senders in host b, and a check that crafted traffic moves
exactly the verdict counters it should. Shared by the XDP datapath tests."""
from __future__ import annotations

import select
import socket
import time
from typing import Callable, Dict, List, Optional, Tuple

from tests.support.netns import Host, ns_socket
from tests.support.packets import udp_frame

PORT = 4433


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
