"""Test hosts: two network namespaces joined by a veth pair, with addresses assigned there,
and sockets made inside a namespace.

Used by the integration tests and by bench/. Every address lives inside the namespaces
this module creates; nothing is sent anywhere else.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass
from typing import Iterator, Sequence


def have_root_netns() -> str | None:
    """None when namespaces can be made here, otherwise the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's ip command"
    return None


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


@dataclass
class Host:
    ns: str          # namespace name
    ifname: str      # this host's veth end
    ip4: str
    ip6: str
    mac: str = ""

    def cmd(self, *args: str) -> list[str]:
        """argv that runs `args` inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *args]

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return sh(*self.cmd(*args), check=check, **kw)

    def popen(self, args: Sequence[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*args), **kw)


@contextlib.contextmanager
def veth_pair(mtu: int = 1500, tag: str | None = None, queues: int = 1) -> Iterator[tuple[Host, Host]]:
    """Two namespaces `a` (10.77.x.1, fd77::1) and `b` (.2, ::2) joined by one veth pair
    (with `queues` RX and TX queues on each end)."""
    tag = tag or uuid.uuid4().hex[:6]
    octet = int(tag[:2], 16) % 250 + 1
    a = Host(f"stcp-a-{tag}", "veth0", f"10.77.{octet}.1", f"fd77:{octet:x}::1")
    b = Host(f"stcp-b-{tag}", "veth0", f"10.77.{octet}.2", f"fd77:{octet:x}::2")
    tmp_a, tmp_b = f"sa{tag}", f"sb{tag}"
    try:
        for h in (a, b):
            sh("ip", "netns", "add", h.ns)
        q = ["numtxqueues", str(queues), "numrxqueues", str(queues)] if queues != 1 else []
        sh("ip", "link", "add", tmp_a, "mtu", str(mtu), *q, "type", "veth", "peer", "name", tmp_b, "mtu", str(mtu), *q)
        for tmp, h in ((tmp_a, a), (tmp_b, b)):
            sh("ip", "link", "set", tmp, "netns", h.ns)
            h.run("ip", "link", "set", tmp, "name", h.ifname)
            h.run("ip", "link", "set", "lo", "up")
            h.run("ip", "addr", "add", f"{h.ip4}/24", "dev", h.ifname)
            h.run("ip", "-6", "addr", "add", f"{h.ip6}/64", "dev", h.ifname, "nodad")
            h.run("ip", "link", "set", h.ifname, "up")
            h.mac = h.run("cat", f"/sys/class/net/{h.ifname}/address").stdout.strip()
        yield a, b
    finally:
        for h in (a, b):
            sh("ip", "netns", "del", h.ns, check=False)


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
