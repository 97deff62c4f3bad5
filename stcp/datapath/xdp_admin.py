"""The operator's view of the XDP program (`stcp-loader attach|set|detach|status`): attach
it and leave it to the kernel, change its limits in place, remove it, and report what is
attached where, from any process.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from . import libxdp, xdp_prog
from .errors import XdpAlreadyAttached, XdpNotAttached, XdpSetupError
from .netlink import Netlink, off_loop
from .xdp import XdpDatapath
from .xdp_cookie import cookie_keys_live

# What `stcp-loader set` may change in a live program: the hello, COOKIE-reply and
# unknown-CID limits, and the record limit (raising it is always safe; lowering it drops
# live connections' larger records). Table sizes (--max-cids, --half-open) need a re-attach.
SETTABLE = ("hs_rate", "hs_burst", "hs_prefix4", "hs_prefix6", "hs_global_rate", "hs_global_burst",
            "ck_rate", "ck_burst", "uk_rate", "uk_burst", "max_record_len")


def attach(iface: str, port: int, mode: str = "auto", max_record_len: int = xdp_prog.DEFAULT_MAX_RECORD_LEN,
           force: bool = False, netns: Optional[str] = None, **kw: Any) -> Dict[str, Any]:
    """Attach and leave the program running (the kernel keeps it); return its status."""
    dp = XdpDatapath.attach(iface, port, mode, max_record_len, force=force, netns=netns, **kw)
    try:
        st = status_of(iface, dp.mode, dp.handles, dp.pin_dir or xdp_prog.pin_dir(iface, netns))
        st["private_pins"] = dp.private_pins
        st["loader"] = dp.loader
        return st
    finally:
        dp.release()          # do not detach: the interface keeps the program


def detach(iface: str, netns: Optional[str] = None) -> Dict[str, Any]:
    """Remove the STCP program from iface and its pins. XdpNotAttached if there is none
    (stale pins, if any, are removed all the same)."""
    return off_loop(_detach, iface, netns)


def _detach(iface: str, netns: Optional[str]) -> Dict[str, Any]:
    xdp_prog.require_privileges("detaching the STCP XDP program")
    pins = xdp_prog.pin_dir(iface, netns)
    with Netlink(netns) as nl:
        ifindex = nl.ifindex(iface)
        mode, h, state = xdp_prog.find_stcp(nl, ifindex)
        if not h and (foreign := xdp_prog.other_layout(state)):
            return _detach_other(nl, ifindex, iface, foreign, pins, netns)
        if not h:
            stale = xdp_prog.remove_pins(pins) if os.path.isdir(pins) else False
            extra = f" (removed stale pins at {pins})" if stale else ""
            other = f"; another XDP program is attached ({state})" if state else ""
            raise XdpNotAttached(f"no STCP XDP program attached to {iface}{other}{extra}")
        try:
            if h.dispatcher_id is not None:     # the dispatcher's other programs stay
                libxdp.detach(ifindex, iface, h.prog_id, mode, netns)
            else:
                nl.clear_xdp(ifindex, mode or "")
            result = {"iface": iface, "detached": True, "mode": mode, "prog_id": h.prog_id, "pin_dir": pins}
        finally:
            h.close()
    xdp_prog.remove_pins(pins)
    return result


def _detach_other(nl: Netlink, ifindex: int, iface: str, other: Tuple[str, int, Optional[int]], pins: str,
                  netns: Optional[str]) -> Dict[str, Any]:
    """Remove an STCP program of another map layout (xdp_prog.other_layout), which this
    version cannot open, so that it can attach its own."""
    mode, prog_id, dispatcher = other
    if dispatcher is not None:
        libxdp.detach(ifindex, iface, prog_id, mode, netns)
    else:
        nl.clear_xdp(ifindex, mode)
    xdp_prog.remove_pins(pins)
    return {"iface": iface, "detached": True, "mode": mode, "prog_id": prog_id, "pin_dir": pins}


def set_limits(iface: str, netns: Optional[str] = None, *, force: bool = False, **changes: int) -> Dict[str, Any]:
    """Change limits (SETTABLE) in the config map of the STCP program on iface, which keeps
    running with its connection table; returns its status. force=True allows lowering
    max_record_len."""
    return off_loop(_set_limits, iface, netns, force, changes)


def _set_limits(iface: str, netns: Optional[str], force: bool, changes: Dict[str, int]) -> Dict[str, Any]:
    unknown = set(changes) - set(SETTABLE)
    if unknown:
        raise XdpSetupError(f"cannot set {', '.join(sorted(unknown))} on a running program; re-attach for that")
    if not changes:
        raise XdpSetupError("nothing to set: name at least one limit (--hs-rate, --hs-burst, ...)")
    dp = XdpDatapath.open(iface, netns=netns)
    try:
        cfg = xdp_prog.read_config(dp.handles)
        new = {k: cfg[k] for k in SETTABLE}
        new.update(changes)
        xdp_prog.validate_limits(cfg["port"], "auto", **new)
        if new["max_record_len"] < cfg["max_record_len"] and not force:
            raise XdpAlreadyAttached(
                f"lowering the record limit of {iface} from {cfg['max_record_len']} to {new['max_record_len']} "
                f"drops every larger record of live connections; add --force if no client sends larger ones")
        xdp_prog.write_config(dp.handles, cfg["port"], new.pop("max_record_len"), new.pop("hs_rate"),
                              new.pop("hs_burst"), cfg["nworkers"], **new)
        return status_of(iface, dp.mode, dp.handles, xdp_prog.pin_dir(iface, netns))
    finally:
        dp.release()


def status_of(iface: str, mode: Optional[str], h: Optional[xdp_prog.ProgHandles], pins: str) -> Dict[str, Any]:
    """One interface's status (what `stcp-loader status --json` prints per interface)."""
    if h is None:
        return {"iface": iface, "attached": False, "pin_dir": pins, "pinned": os.path.isdir(pins)}
    beside = []
    if h.dispatcher_id is not None:
        beside = [{"prog_id": p, "name": xdp_prog.prog_name(p)}
                  for p in xdp_prog.dispatched_by([h.dispatcher_id])[h.dispatcher_id] if p != h.prog_id]
    return {
        "iface": iface, "attached": True, "mode": mode, "prog_id": h.prog_id,
        "dispatcher_id": h.dispatcher_id, "beside": beside,
        "map_ids": dict(h.map_ids), "config": xdp_prog.read_config(h), "live_cids": xdp_prog.count_cids(h),
        "half_open_cids": xdp_prog.count_cids(h, "half_open"), "cookie_keys": cookie_keys_live(h.maps["cookie"]),
        "pin_dir": pins, "pinned": os.path.exists(f"{pins}/prog"),
        "counters": {k: {"packets": p, "bytes": b} for k, (p, b) in xdp_prog.read_counters(h).items()},
    }


def status(iface: Optional[str] = None, netns: Optional[str] = None) -> List[Dict[str, Any]]:
    """Status of iface, or of every interface carrying an STCP program when iface is None."""
    return off_loop(_status, iface, netns)


def _status(iface: Optional[str], netns: Optional[str]) -> List[Dict[str, Any]]:
    xdp_prog.require_privileges("reading the STCP XDP program's state")
    out = []
    with Netlink(netns) as nl:
        links = [(iface, nl.ifindex(iface))] if iface else nl.links()
        for name, idx in links:
            mode, h, _state = xdp_prog.find_stcp(nl, idx)
            if h is None and not iface:
                continue
            try:
                out.append(status_of(name, mode, h, xdp_prog.pin_dir(name, netns)))
            finally:
                if h:
                    h.close()
    return out
