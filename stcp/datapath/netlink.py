"""rtnetlink through pyroute2: interface lookup, and attaching, querying and removing XDP
programs, in this network namespace or a named one (`ip netns`).

pyroute2's synchronous IPRoute drives an event loop of its own and refuses to run inside
one, so callers that may run on an asyncio loop go through off_loop().
"""
from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from .errors import XdpSetupError

# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}   # attach mode -> flags
_NETLINK_MODES = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload"}

T = TypeVar("T")


def off_loop(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Call fn here, or in a helper thread when this thread runs an asyncio loop: pyroute2's
    synchronous IPRoute drives an event loop of its own and refuses to run inside one
    (`stcp serve` calls us from its loop). Blocks the caller either way."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args, **kw)
    return in_thread("stcp-xdp-netlink", fn, *args, **kw)


def in_thread(name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """fn(*args, **kw) in a new thread, waited for: its result, or its exception re-raised here."""
    box: Dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class Netlink:
    """An rtnetlink socket in this network namespace, or in the named one (ip netns)."""

    def __init__(self, netns: Optional[str] = None):
        from pyroute2 import IPRoute
        self.netns = netns
        if netns is None:
            self.ipr = IPRoute()
        else:
            if not os.path.exists(f"/run/netns/{netns}"):
                raise XdpSetupError(f"network namespace '{netns}' not found (list them with: ip netns list)")
            self.ipr = IPRoute(netns=netns, flags=0)

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ifindex(self, iface: str) -> int:
        idx = self.ipr.link_lookup(ifname=iface)
        if not idx:
            where = f" in network namespace '{self.netns}'" if self.netns else ""
            raise XdpSetupError(f"interface '{iface}' not found{where} (list interfaces with: ip link show)")
        return int(idx[0])

    def links(self) -> List[Tuple[str, int]]:
        return [(ln.get_attr("IFLA_IFNAME"), ln["index"]) for ln in self.ipr.get_links()]

    def xdp_state(self, ifindex: int) -> Dict[str, int]:
        """{mode: prog_id} of every XDP program on the interface: native, generic, offload."""
        (link,) = self.ipr.get_links(ifindex)
        xdp = link.get_attr("IFLA_XDP")
        if not xdp:
            return {}
        attached = xdp.get_attr("IFLA_XDP_ATTACHED")
        out: Dict[str, int] = {}
        for attr, mode in (("IFLA_XDP_DRV_PROG_ID", "native"), ("IFLA_XDP_SKB_PROG_ID", "generic"),
                           ("IFLA_XDP_HW_PROG_ID", "offload")):
            pid = xdp.get_attr(attr)
            if pid:
                out[mode] = pid
        if not out and attached in _NETLINK_MODES and xdp.get_attr("IFLA_XDP_PROG_ID"):
            out[_NETLINK_MODES[attached]] = xdp.get_attr("IFLA_XDP_PROG_ID")
        return out

    def set_xdp(self, ifindex: int, fd: int, flags: int) -> None:
        """Attach the program fd (-1: remove the one attached with these mode flags)."""
        self.ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})

    def clear_xdp(self, ifindex: int, mode: str) -> None:
        """Remove the XDP program attached in mode (native, generic, offload)."""
        self.set_xdp(ifindex, -1, MODE_FLAGS.get(mode, 0))


def netlink_msg(e: Exception) -> str:
    """A NetlinkError as one line: its message and errno."""
    code = getattr(e, "code", None)
    text = str(e.args[1]) if len(getattr(e, "args", ())) > 1 else str(e)
    return f"{text} (errno {code})" if code else text
