"""Replacing the STCP XDP program under a running server: what carries over, and who
would lose what.

A server with `--datapath xdp` keeps its connections' IDs in the program's stcp_cids map
(through map fds it holds open). A replacement program with new, empty maps would drop
every record of those connections as drop_unknown_cid. So `stcp-loader attach --force`
gives the new program the old program's maps themselves (libbpf's map reuse, before the
new program loads) wherever their definitions match: the connection table with its
prefilter, the configuration, the hello buckets and the verdict counters (which then
keep counting, as Prometheus expects of a counter). Nothing is copied, so there is no
moment at which an ID the server adds goes to a table the new program does not read, and
the server's own fds keep pointing at the live table.

Where a map cannot carry over (another --max-cids, a map layout from another version,
bcc without libxdp) and a process still holds the program's maps, the replacement is
refused with what to do instead (`stcp-loader set` for limits).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from . import bpf
from .errors import XdpAlreadyAttached
from .xdp_prog import MAP_ABI, MAP_NAMES, ProgHandles, read_config

# The connection table and its prefilter hold one invariant (bpf/stcp_wire.h): they move
# together or not at all.
_TABLE = (MAP_NAMES["cids"], MAP_NAMES["cid_filter"])
XSK_MAP = "stcp_xsks"


def owners(h: ProgHandles) -> List[Tuple[int, str]]:
    """(pid, command line) of the other processes holding the program's connection table
    open: a running `stcp serve --datapath xdp|afxdp` on that interface."""
    want = h.map_ids.get("cids")
    me = os.getpid()
    out: List[Tuple[int, str]] = []
    if want is None:
        return out
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid == me or not _holds_map(pid, want):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append((pid, cmd or "?"))
    return out


def _holds_map(pid: int, map_id: int) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("map_id:") and int(line.split()[1]) == map_id:
                        return True
        except (OSError, ValueError):
            continue
    return False


def _old_maps(h: ProgHandles) -> Dict[str, Tuple[int, Tuple[int, int, int, int]]]:
    """Every map of the program: kernel name -> (fd, (type, key, value, max entries))."""
    out: Dict[str, Tuple[int, Tuple[int, int, int, int]]] = {}
    for mid in bpf.prog_info(h.prog_fd)["map_ids"]:
        fd = bpf.map_fd_by_id(mid)
        info = bpf.map_info(fd)
        if info["name"] in out or "." in info["name"]:       # internal maps (.rodata, ...) stay
            os.close(fd)
            continue
        out[info["name"]] = (fd, (info["type"], info["key_size"], info["value_size"], info["max_entries"]))
    return out


def _who(users: List[Tuple[int, str]]) -> str:
    return ", ".join(f"pid {pid} ({cmd[:60]})" for pid, cmd in users)


def plan(old: ProgHandles, new_maps: Optional[Dict[str, Tuple[int, int, int, int]]], iface: str,
         set_hint: str) -> Dict[str, int]:
    """The maps of `old` the new program (maps as new_maps declares them; None: it cannot
    take any, bcc without libxdp) takes over: kernel map name -> fd (the caller closes
    them). Raises XdpAlreadyAttached, saying what to do, if a server uses `old` and would
    lose its connection table or its AF_XDP sockets."""
    users = owners(old)
    maps = _old_maps(old)
    try:
        if users and XSK_MAP in maps:
            raise XdpAlreadyAttached(
                f"the STCP XDP program on {iface} belongs to an AF_XDP server ({_who(users)}); a replacement "
                f"would cut it off from its sockets: {set_hint}, or stop that server first")
        same_abi = read_config(old)["abi"] == MAP_ABI
        take = {name: fd for name, (fd, spec) in maps.items()
                if same_abi and new_maps is not None and new_maps.get(name) == spec}
        table_ok = all(n in take for n in _TABLE)
        if not table_ok:
            for n in _TABLE:
                take.pop(n, None)
            if users:
                why = ("it was built by bcc, which cannot hand maps over (clang and libxdp can: "
                       "'sudo make system-deps')" if new_maps is None else
                       f"its map layout is version {read_config(old)['abi']}, this stcp's is {MAP_ABI}"
                       if not same_abi else "the new table has another size (--max-cids)")
                raise XdpAlreadyAttached(
                    f"a server uses the STCP XDP program on {iface} ({_who(users)}) and its connection table "
                    f"cannot carry over to the replacement: {why}; {set_hint}, or stop that server first")
        for name, (fd, _spec) in maps.items():
            if name not in take:
                os.close(fd)
        return take
    except BaseException:
        for fd, _spec in maps.values():
            try:
                os.close(fd)
            except OSError:
                pass
        raise
