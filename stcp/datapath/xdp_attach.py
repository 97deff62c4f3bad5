"""How a freshly built STCP XDP program gets onto an interface (XdpDatapath.attach).

Two ways. It is attached alone (attach_alone): by netlink (`stcp-loader attach` without
clang or libxdp, the afxdp variant of the loader), built by bcc; or through a BPF link that
a server holds (link=True), which it can close with no privilege once it has dropped them,
built by clang (from the build cache) and loaded by libbpf where both are there, else by
bcc (either variant). Or clang builds it and libxdp attaches it, behind libxdp's
dispatcher where the kernel can run one (attach_libxdp; OPERATIONS.md, "Sharing the
interface"). Both return the program's handles, configured, and the mode it got. Every
failure raises XdpSetupError (or XdpAlreadyAttached) with a one-line message that says
what to do.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from . import bpf, libxdp
from .errors import XdpAlreadyAttached, XdpSetupError
from .netlink import MODE_FLAGS, XDP_FLAGS_UPDATE_IF_NOEXIST, Netlink, netlink_msg
from .xdp_handover import plan
from .xdp_object import ObjectDir, find_clang
from .xdp_prog import (
    DEFAULT_HALF_OPEN,
    MAP_NAMES,
    PROG_NAME,
    ProgHandles,
    compile_prog,
    dispatched_by,
    ensure_bpffs,
    find_stcp,
    handles_of,
    handles_of_fds,
    open_prog,
    pin_prog,
    prog_name,
    release_bcc,
    remove_pins,
)

log = logging.getLogger("stcp.datapath.xdp")


def libxdp_unavailable() -> Optional[str]:
    """None if the plain program can be built with clang and attached through libxdp,
    else why not. STCP_XDP_LOADER=bcc chooses bcc regardless."""
    if os.environ.get("STCP_XDP_LOADER") == "bcc":
        return "STCP_XDP_LOADER=bcc"
    if find_clang() is None:
        return "clang not found"
    return libxdp.available()


def dispatcher_of(state: Dict[str, int]) -> Optional[Tuple[str, int]]:
    """(mode, prog id) of the libxdp dispatcher attached to the interface, if there is one."""
    for m, pid in state.items():
        if prog_name(pid) == "xdp_dispatcher" or dispatched_by([pid])[pid]:
            return m, pid
    return None


def _clear_direct(nl: Netlink, ifindex: int, state: Dict[str, int]) -> List[Tuple[str, int]]:
    """Detach the programs in state (mode -> id); returns (mode, fd) of each, to restore."""
    held = []
    for m, pid in state.items():
        try:
            held.append((m, bpf.prog_fd_by_id(pid)))
        except OSError:
            pass                                   # gone already
        nl.clear_xdp(ifindex, m)
    return held


def _restore(nl: Netlink, ifindex: int, held: List[Tuple[str, int]]) -> None:
    for m, fd in held:
        try:
            nl.set_xdp(ifindex, fd, XDP_FLAGS_UPDATE_IF_NOEXIST | MODE_FLAGS.get(m, 0))
        except Exception as e:
            log.error("could not put the replaced XDP program back on ifindex %d: %s", ifindex, e)
    _close_fds(fd for _m, fd in held)


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _set_hint(iface: str) -> str:
    return f"change limits with 'stcp-loader set {iface} --hs-rate N ...' instead"


def attach_alone(nl: Netlink, ifindex: int, iface: str, mode: str, old: Optional[ProgHandles],
                 state: Dict[str, int], configure: Callable[[ProgHandles], None], netns: Optional[str], *,
                 max_cids: int, hs_sources: int, afxdp: bool, priority: int,
                 link: bool, half_open: int = DEFAULT_HALF_OPEN) -> Tuple[ProgHandles, str, int]:
    """Built, and configured before it is attached alone: by netlink, or through a BPF
    link (returned, else -1). A link's program is never opened by id (handles_of), which
    would take CAP_SYS_ADMIN. The program for a link is clang's build (cached,
    xdp_object.py) loaded by libbpf where libxdp_unavailable() allows it: a server's
    start then costs no compile; otherwise bcc builds it."""
    if old:
        plan(old, None, iface, _set_hint(iface))       # refuses if a server needs the maps
    h = _load_alone(link, max_cids, hs_sources, half_open, afxdp)
    try:
        configure(h)
        cleared = _clear_direct(nl, ifindex, state)     # force: what is there goes first
        link_fd = -1
        try:
            if link:
                got, link_fd = _link_prog(ifindex, iface, h.prog_fd, mode)
            else:
                got = _attach_prog(nl, ifindex, iface, h.prog_fd, mode)
        except BaseException:
            _restore(nl, ifindex, cleared)
            raise
        _close_fds(fd for _m, fd in cleared)
        return h, got, link_fd
    except BaseException:
        h.close()
        raise


def _load_alone(link: bool, max_cids: int, hs_sources: int, half_open: int, afxdp: bool) -> ProgHandles:
    """The program loaded, not attached, as attach_alone takes it: for a link clang's build
    where libxdp_unavailable() allows it, else bcc's, whose own references are dropped
    here (the handles hold fds of their own)."""
    if link and libxdp_unavailable() is None:
        return _load_clang_build(max_cids, hs_sources, half_open, afxdp)
    b, fn = compile_prog(max_cids, hs_sources, afxdp, half_open)
    try:
        if link:
            return handles_of(b, fn, ("stcp_xsks",) if afxdp else ())
        h = open_prog(bpf.prog_info(fn.fd)["id"])
        if h is None:
            raise XdpSetupError("the compiled program has unexpected maps; is bpf/ from this version?")
        return h
    finally:
        release_bcc(b)


def _load_clang_build(max_cids: int, hs_sources: int, half_open: int, afxdp: bool) -> ProgHandles:
    """The program built by clang (from the build cache where it is there), loaded with
    its maps by libbpf and not attached: its handles, with the afxdp variant's XSKMAP
    under its own name (stcp_xsks) as handles_of() gives it."""
    extra = ["stcp_xsks"] if afxdp else []
    with ObjectDir(max_cids, hs_sources, half_open, afxdp) as obj:
        prog_fd, fds = libxdp.load(obj.path, PROG_NAME, [*MAP_NAMES.values(), *extra])
    short = {name: short for short, name in MAP_NAMES.items()}
    return handles_of_fds(prog_fd, {short.get(name, name): fd for name, fd in fds.items()})


def attach_libxdp(nl: Netlink, ifindex: int, iface: str, mode: str, old: Optional[ProgHandles],
                   state: Dict[str, int], configure: Callable[[ProgHandles], None], netns: Optional[str], *,
                   max_cids: int, hs_sources: int, afxdp: bool, priority: int,
                   link: bool, half_open: int = DEFAULT_HALF_OPEN) -> Tuple[ProgHandles, str, int]:
    """clang builds it and libxdp attaches it (taking over old's maps where they fit),
    configured right after: until then its config reads port 0 and it passes
    everything, as the interface did before. An old STCP program behind the dispatcher
    leaves after the new one has joined; one attached alone leaves first (libxdp cannot
    put a dispatcher in its place) and comes back if the new one fails."""
    disp = dispatcher_of(state)
    if mode == "auto" and disp:
        mode = disp[0]                              # join the dispatcher in its mode
    with ObjectDir(max_cids, hs_sources, half_open) as obj:
        reuse = plan(old, libxdp.object_maps(obj.path), iface, _set_hint(iface)) if old else {}
        try:
            if old is not None and old.dispatcher_id is not None:
                pid, got, _multi = libxdp.attach(obj.path, ifindex, iface, mode, reuse=reuse,
                                                 priority=priority, netns=netns)
                libxdp.detach(ifindex, iface, old.prog_id, got, netns)
            else:
                cleared = _clear_direct(nl, ifindex, {} if disp else state)
                try:
                    pid, got, _multi = libxdp.attach(obj.path, ifindex, iface, mode, reuse=reuse,
                                                     priority=priority, netns=netns)
                except BaseException:
                    _restore(nl, ifindex, cleared)
                    raise
                _close_fds(fd for _m, fd in cleared)
        finally:
            _close_fds(reuse.values())
    got_mode, h, _state = find_stcp(nl, ifindex)
    if h is None or h.prog_id != pid:
        if h:
            h.close()
        raise XdpSetupError(f"libxdp attached prog {pid} to {iface} but it is not found there as STCP's")
    try:
        configure(h)
    except BaseException:
        h.close()
        libxdp.detach(ifindex, iface, pid, got_mode or got, netns)
        raise
    return h, got_mode or got, -1

def bpffs_or_none(iface: str) -> Optional[bool]:
    """ensure_bpffs(), or None (with a warning) where bpffs cannot be mounted: the pins
    are for operators and other tools, and a server started with CAP_NET_ADMIN + CAP_BPF
    alone (no CAP_SYS_ADMIN) serves without them."""
    try:
        return ensure_bpffs()
    except XdpSetupError as e:
        log.warning("not pinning the XDP program of %s: %s", iface, e)
        return None

def pin_or_none(h: ProgHandles, pins: str) -> Optional[str]:
    """Pin the program and its maps at pins; None (with a warning) where bpffs is not
    writable to us (it is root's, mode 0700, and we may not be root)."""
    try:
        remove_pins(pins)              # stale pins of a program that is gone
        pin_prog(h, pins)
        return pins
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM):
            raise
        remove_pins(pins)
        log.warning("not pinning the XDP program at %s: %s", pins, e.strerror or e)
        return None

def _link_prog(ifindex: int, iface: str, fd: int, mode: str) -> Tuple[str, int]:
    tries = ["native", "generic"] if mode == "auto" else [mode]
    errors = []
    for m in tries:
        try:
            return m, bpf.xdp_link_create(fd, ifindex, MODE_FLAGS[m])
        except OSError as e:
            errors.append(f"{m}: {e.strerror}")
            if e.errno in (errno.EEXIST, errno.EBUSY):
                raise XdpAlreadyAttached(f"{iface} got another XDP program meanwhile ({e.strerror}); "
                                         "use --force to replace it") from None
    raise XdpSetupError(f"attaching XDP to {iface} failed ({'; '.join(errors)})"
                        + ("; try --mode generic" if mode == "native" else ""))

def _attach_prog(nl: Netlink, ifindex: int, iface: str, fd: int, mode: str) -> str:
    tries = ["native", "generic"] if mode == "auto" else [mode]
    errors = []
    for m in tries:
        try:
            nl.set_xdp(ifindex, fd, XDP_FLAGS_UPDATE_IF_NOEXIST | MODE_FLAGS[m])
            return m
        except Exception as e:  # NetlinkError
            errors.append(f"{m}: {netlink_msg(e)}")
            if getattr(e, "code", None) in (errno.EEXIST, errno.EBUSY):
                raise XdpAlreadyAttached(f"{iface} got another XDP program meanwhile ({netlink_msg(e)}); "
                                         "use --force to replace it") from None
    raise XdpSetupError(f"attaching XDP to {iface} failed ({'; '.join(errors)})"
                        + ("; try --mode generic" if mode == "native" else ""))
