"""The operator's view of the XDP program (`stcp-loader attach|detach|status`): attach it and
leave it to the kernel, remove it, and report what is attached where, from any process.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from .errors import XdpNotAttached
from .netlink import Netlink, off_loop
from .xdp import XdpDatapath
from .xdp_prog import (
    DEFAULT_MAX_RECORD_LEN,
    ProgHandles,
    count_cids,
    find_stcp,
    pin_dir,
    read_config,
    read_counters,
    remove_pins,
    require_privileges,
)


def attach(iface: str, port: int, mode: str = "auto", max_record_len: int = DEFAULT_MAX_RECORD_LEN,
           force: bool = False, netns: Optional[str] = None, **kw: Any) -> Dict[str, Any]:
    """Attach and leave the program running (the kernel keeps it); return its status."""
    dp = XdpDatapath.attach(iface, port, mode, max_record_len, force=force, netns=netns, **kw)
    try:
        st = status_of(iface, dp.mode, dp.handles, dp.pin_dir or pin_dir(iface, netns))
        st["private_pins"] = dp.private_pins
        return st
    finally:
        dp.release()          # do not detach: the interface keeps the program


def detach(iface: str, netns: Optional[str] = None) -> Dict[str, Any]:
    """Remove the STCP program from iface and its pins. XdpNotAttached if there is none
    (stale pins, if any, are removed all the same)."""
    return off_loop(_detach, iface, netns)


def _detach(iface: str, netns: Optional[str]) -> Dict[str, Any]:
    require_privileges("detaching the STCP XDP program")
    pins = pin_dir(iface, netns)
    with Netlink(netns) as nl:
        ifindex = nl.ifindex(iface)
        mode, h, state = find_stcp(nl, ifindex)
        if not h:
            stale = remove_pins(pins) if os.path.isdir(pins) else False
            extra = f" (removed stale pins at {pins})" if stale else ""
            other = f"; another XDP program is attached ({state})" if state else ""
            raise XdpNotAttached(f"no STCP XDP program attached to {iface}{other}{extra}")
        try:
            nl.clear_xdp(ifindex, mode or "")
            result = {"iface": iface, "detached": True, "mode": mode, "prog_id": h.prog_id, "pin_dir": pins}
        finally:
            h.close()
    remove_pins(pins)
    return result


def status_of(iface: str, mode: Optional[str], h: Optional[ProgHandles], pins: str) -> Dict[str, Any]:
    """One interface's status (what `stcp-loader status --json` prints per interface)."""
    if h is None:
        return {"iface": iface, "attached": False, "pin_dir": pins, "pinned": os.path.isdir(pins)}
    return {
        "iface": iface, "attached": True, "mode": mode, "prog_id": h.prog_id,
        "map_ids": dict(h.map_ids), "config": read_config(h), "live_cids": count_cids(h),
        "pin_dir": pins, "pinned": os.path.exists(f"{pins}/prog"),
        "counters": {k: {"packets": p, "bytes": b} for k, (p, b) in read_counters(h).items()},
    }


def status(iface: Optional[str] = None, netns: Optional[str] = None) -> List[Dict[str, Any]]:
    """Status of iface, or of every interface carrying an STCP program when iface is None."""
    return off_loop(_status, iface, netns)


def _status(iface: Optional[str], netns: Optional[str]) -> List[Dict[str, Any]]:
    require_privileges("reading the STCP XDP program's state")
    out = []
    with Netlink(netns) as nl:
        links = [(iface, nl.ifindex(iface))] if iface else nl.links()
        for name, idx in links:
            mode, h, _state = find_stcp(nl, idx)
            if h is None and not iface:
                continue
            try:
                out.append(status_of(name, mode, h, pin_dir(name, netns)))
            finally:
                if h:
                    h.close()
    return out
