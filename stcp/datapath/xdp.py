"""The XDP datapath: one interface's STCP XDP program (bpf/stcp_xdp.c), attached by us or
found attached, and the live-connection table a server keeps in step with it.

The source of truth for "is STCP attached to IFACE" is the kernel, not our pins: the
interface's XDP program id (netlink) -> that program's info (name `stcp_xdp`, map ids)
-> its maps, opened by id (stcp.datapath.xdp_prog). So status and reuse work from any
process and any mount namespace (`ip netns exec` gives each process a private /sys). The
pins under /sys/fs/bpf/stcp/IFACE/ are made on attach and removed on detach.

The pieces: stcp.datapath.bpf (libbpf through ctypes), stcp.datapath.netlink (pyroute2),
stcp.datapath.xdp_prog (build, find, config, counters, pins), stcp.datapath.xdp_attach
(a fresh program onto the interface: alone by netlink or a BPF link, or through libxdp),
stcp.datapath.xdp_cids (the connection-ID tables), this module (XdpDatapath, what `stcp
serve --datapath xdp` runs on) and stcp.datapath.xdp_admin (attach, detach, status of
`stcp-loader`). Every setup failure raises XdpSetupError with a one-line message that
says what to do.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any, Callable, Dict, Optional, Tuple

from .. import cid_layout
from ..connection import Config, Connection
from ..endpoint import ServerEndpoint
from ..wire import MAX_CID_WORKERS
from . import libxdp
from .base import LiveCidHooks
from .errors import XdpAlreadyAttached, XdpNotAttached, XdpSetupError
from .netlink import Netlink, off_loop
from .socket import ServerDriver, bind_udp
from .xdp_attach import attach_alone, attach_libxdp, bpffs_or_none, dispatcher_of, libxdp_unavailable, pin_or_none
from .xdp_cids import CidTables
from .xdp_cookie import KernelCookies
from .xdp_prog import (
    DEFAULT_HALF_OPEN,
    DEFAULT_HS_BURST,
    DEFAULT_HS_RATE,
    DEFAULT_HS_SOURCES,
    DEFAULT_MAX_CIDS,
    DEFAULT_MAX_RECORD_LEN,
    MAP_ABI,
    ProgHandles,
    attached_ids,
    check_toolchain,
    current_netns_name,
    find_stcp,
    other_layout,
    pin_dir,
    pinned_prog_id,
    prog_name,
    read_config,
    read_counters,
    remove_pins,
    require_privileges,
    validate_limits,
    write_config,
)

log = logging.getLogger("stcp.datapath.xdp")

# the limits write_config takes beyond the per-source hello bucket (validate_limits checks them)
LIMITS = ("hs_prefix4", "hs_prefix6", "hs_global_rate", "hs_global_burst", "ck_rate", "ck_burst", "uk_rate",
          "uk_burst")


class XdpDatapath(CidTables):
    """One interface's STCP XDP program, attached by us or found attached.

    attach_or_reuse() is what `stcp serve --datapath xdp` calls; close() leaves the
    interface as it was found: it detaches only what this object attached, and removes
    the CIDs this object added when the program stays.

    As a server's Datapath (stcp.datapath.base): the kernel UDP socket behind the program,
    the server's connections kept in the program's live-CID table by server_hooks().
    """

    name = "xdp"

    def __init__(self, iface: str, ifindex: int, mode: str, handles: ProgHandles, attached: bool,
                 netns: Optional[str], pins: Optional[str]):
        self.iface = iface
        self.ifindex = ifindex
        self.mode = mode
        self.attached = attached          # True if this object attached the program
        self.netns = netns
        self.pin_dir = pins
        CidTables.__init__(self, iface, handles)
        self.private_pins = False         # pins live in a bpffs private to this process
        self.kernel_cookies = True            # as a server's datapath: keep the program's cookie keys
        self._cookies: Optional[KernelCookies] = None
        self._driver: Optional[ServerDriver] = None
        self.loader = "bcc"               # what attached it: "libxdp" (clang build) or "bcc"
        self._link_fd = -1                # the BPF link that attaches the program, when attach(link=True)
        self._pin_dirfd = -1              # the pin directory, for unlinking the pins without privileges
        cfg = read_config(handles)
        self.port: int = cfg["port"]
        self.max_record_len: int = cfg["max_record_len"]
        self.config = cfg

    @property
    def prog_id(self) -> int:
        return self._h.prog_id

    @property
    def handles(self) -> ProgHandles:
        """The program's and its maps' fds (valid until close() or release())."""
        return self._h

    # -- construction ------------------------------------------------------------------
    @classmethod
    def attach(cls, iface: str, port: int, mode: str = "auto", max_record_len: int = DEFAULT_MAX_RECORD_LEN,
               *, force: bool = False, netns: Optional[str] = None, hs_rate: int = DEFAULT_HS_RATE,
               hs_burst: int = DEFAULT_HS_BURST, max_cids: int = DEFAULT_MAX_CIDS,
               hs_sources: int = DEFAULT_HS_SOURCES, afxdp: bool = False, nworkers: int = 0,
               half_open: int = DEFAULT_HALF_OPEN, priority: int = libxdp.DEFAULT_PRIORITY, link: bool = False,
               **limits: int) -> "XdpDatapath":
        """Build and attach a fresh program. Raises XdpAlreadyAttached if STCP, or an XDP
        program it cannot run beside, is attached there, unless force=True, which replaces
        it; a replaced STCP program hands its maps over (xdp_handover.py) or the replacement
        is refused while a server needs them.

        The plain program is built with clang and attached through libxdp, behind its
        dispatcher when the kernel can run one (priority orders the programs there, lower
        first; see libxdp.py), which needs clang and libxdp (`loader` says "libxdp"); without
        them, bcc builds it and netlink attaches it alone ("bcc"). afxdp=True builds the
        variant that redirects good records to its stcp_xsks XSKMAP (-DSTCP_AFXDP, attached
        alone; stcp/datapath/afxdp.py fills the map); nworkers > 0 makes it steer data records by
        their CID's worker bits (see bpf/stcp_xdp.c, steer()). max_cids and half_open size
        the live and half-open CID tables; limits are the other write_config() limits
        (LIMITS).

        link=True (a server's own program) loads clang's build (cached) with libbpf where
        clang and libxdp are usable, else bcc's, and attaches alone, through a BPF link
        that this object holds: the program detaches when the link closes (close(), or
        the process ending however it ends), which takes no privilege, so a server that
        dropped its privileges still detaches. Leaving libxdp's dispatcher, and opening a
        program by id as the libxdp path does, both need privileges such a server no longer
        has; to share the interface, `stcp-loader attach` first and the server reuses it.
        Without link (`stcp-loader attach`) the attachment outlives the process."""
        unknown = set(limits) - set(LIMITS)
        if unknown:
            raise TypeError(f"unknown XDP limits: {', '.join(sorted(unknown))}")
        return off_loop(cls._attach, iface, port, mode, max_record_len, force, netns, hs_rate, hs_burst,
                        max_cids, hs_sources, afxdp, nworkers, limits, priority, link, half_open)

    @classmethod
    def _attach(cls, iface: str, port: int, mode: str, max_record_len: int, force: bool, netns: Optional[str],
                hs_rate: int, hs_burst: int, max_cids: int, hs_sources: int, afxdp: bool = False,
                nworkers: int = 0, hello: Optional[Dict[str, int]] = None,
                priority: int = libxdp.DEFAULT_PRIORITY, link: bool = False,
                half_open: int = DEFAULT_HALF_OPEN) -> "XdpDatapath":
        hello = hello or {}
        validate_limits(port, mode, max_record_len, hs_rate, hs_burst, **hello)
        if not 0 <= nworkers <= MAX_CID_WORKERS:
            raise XdpSetupError(f"{nworkers} workers: CID steering names at most {MAX_CID_WORKERS}")
        if max_cids < 1 or half_open < 1:
            raise XdpSetupError(f"CID tables of {max_cids} live and {half_open} half-open entries: each needs "
                                "room for at least 1")
        require_privileges("attaching the STCP XDP program")
        why_not = None if afxdp else libxdp_unavailable()
        via_libxdp = not afxdp and not link and why_not is None
        with Netlink(netns) as nl:
            ifindex = nl.ifindex(iface)
            if not via_libxdp:
                try:
                    check_toolchain()
                except XdpSetupError as e:
                    if why_not is None:
                        raise
                    raise XdpSetupError(f"cannot build the XDP program: clang with libxdp is not usable "
                                        f"({why_not}), and {e}") from None
            mounted = bpffs_or_none(iface)
            old_mode, old, state = find_stcp(nl, ifindex)
            pins = pin_dir(iface, netns) if mounted is not None else None

            def configure(h: ProgHandles) -> None:
                write_config(h, port, max_record_len, hs_rate, hs_burst, nworkers, **hello)

            stale = None if old else other_layout(state)
            if stale:
                raise XdpAlreadyAttached(
                    f"{iface} carries the STCP XDP program of another stcp version (prog id {stale[1]}), whose "
                    f"map layout this one ({MAP_ABI}) cannot take over; stop any server using it and detach it "
                    f"first (stcp-loader detach {iface})")
            try:
                if old and not force:
                    raise XdpAlreadyAttached(
                        f"STCP XDP program already attached to {iface} (prog id {old.prog_id}, {old_mode} mode); "
                        f"change its limits with 'stcp-loader set {iface} ...', or use --force to replace it "
                        f"(the connection table carries over)")
                if state and not old and not force and not (via_libxdp and dispatcher_of(state)):
                    if link and dispatcher_of(state):
                        raise XdpAlreadyAttached(
                            f"{iface} runs XDP programs behind libxdp's dispatcher; a server attaches its own "
                            f"program alone, through a BPF link, so that it can drop its privileges: attach "
                            f"STCP beside them first (stcp-loader attach {iface} --port {port}), and the "
                            f"server reuses it")
                    desc = ", ".join(f"{prog_name(p)}, id {p}, {m} mode" for m, p in state.items())
                    raise XdpAlreadyAttached(f"{iface} already has an XDP program attached alone ({desc}), which "
                                             f"STCP cannot run beside (only programs behind libxdp's dispatcher "
                                             f"share an interface); use --force to replace it, or remove it first")
                attach = attach_libxdp if via_libxdp else attach_alone
                h, got, link_fd = attach(nl, ifindex, iface, mode, old, state, configure, netns,
                                         max_cids=max_cids, hs_sources=hs_sources, afxdp=afxdp,
                                         priority=priority, link=link, half_open=half_open)
            finally:
                if old:
                    old.close()
            try:
                if pins:
                    pins = pin_or_none(h, pins)   # stale pins, or the replaced program's, go first
            except BaseException:
                if link_fd >= 0:
                    os.close(link_fd)
                h.close()
                raise
            log.info("attached STCP XDP prog %d to %s in %s mode%s", h.prog_id, iface, got,
                     f" behind libxdp's dispatcher (prog {h.dispatcher_id})" if h.dispatcher_id
                     else " (BPF link)" if link_fd >= 0 else "")
            dp = cls(iface, ifindex, got, h, True, netns, pins)
            dp.loader = "libxdp" if via_libxdp else "bcc"
            dp._link_fd = link_fd
            # `ip netns exec` gives the process a private /sys: a bpffs mounted there (and
            # our pins) goes away with the process. The program stays attached regardless.
            dp.private_pins = bool(mounted) and netns is None and current_netns_name() is not None
            return dp

    @classmethod
    def open(cls, iface: str, *, netns: Optional[str] = None) -> "XdpDatapath":
        """The STCP program already attached to iface; XdpNotAttached if there is none."""
        return off_loop(cls._open, iface, netns)

    @classmethod
    def _open(cls, iface: str, netns: Optional[str]) -> "XdpDatapath":
        require_privileges("opening the STCP XDP program")
        with Netlink(netns) as nl:
            ifindex = nl.ifindex(iface)
            mode, h, _state = find_stcp(nl, ifindex)
            if not h or mode is None:
                raise XdpNotAttached(f"no STCP XDP program attached to {iface}")
            abi = read_config(h)["abi"]
            if abi != MAP_ABI:
                h.close()
                raise XdpSetupError(f"the STCP XDP program on {iface} has map layout {abi}, this stcp needs "
                                    f"{MAP_ABI}; re-attach it (stcp-loader attach {iface} --force)")
            return cls(iface, ifindex, mode, h, False, netns, pin_dir(iface, netns))

    @classmethod
    def attach_or_reuse(cls, iface: str, port: int, mode: str = "auto",
                        max_record_len: int = DEFAULT_MAX_RECORD_LEN, *, max_connections: Optional[int] = None,
                        cookies: bool = True, **kw: Any) -> "XdpDatapath":
        """Reuse the STCP program attached to iface (it must serve the same port), else
        attach one. `attached` says which happened; close() undoes only our part.
        max_connections: the server's connection limit; a program this call attaches gets
        a live table that large (unless max_cids says otherwise), one found attached must
        have room for it (XdpSetupError otherwise). cookies=False: as a server's datapath,
        do not give the program the endpoint's cookie keys (it then answers no hello)."""
        validate_limits(port, mode, max_record_len, kw.get("hs_rate", DEFAULT_HS_RATE),
                        kw.get("hs_burst", DEFAULT_HS_BURST), **{k: kw[k] for k in LIMITS if k in kw})
        if max_connections is not None:
            kw.setdefault("max_cids", max_connections)
        try:
            dp = cls.open(iface, netns=kw.get("netns"))
        except XdpNotAttached:
            try:
                dp = cls.attach(iface, port, mode, max_record_len, **kw)
            except XdpAlreadyAttached:
                dp = cls.open(iface, netns=kw.get("netns"))   # lost a race with another attacher
        dp.kernel_cookies = cookies
        if dp.port != port:
            dp.close()
            raise XdpSetupError(f"the STCP XDP program on {iface} validates port {dp.port}, not {port}; "
                                f"detach it (stcp-loader detach {iface}) or serve on port {dp.port}")
        if max_connections is not None and dp.max_cids < max_connections:
            dp.close()
            raise XdpSetupError(f"the STCP XDP program on {iface} has room for {dp.max_cids} live connections, "
                                f"fewer than the server's limit of {max_connections}; re-attach it with "
                                f"stcp-loader attach {iface} --max-cids {max_connections} --force, or serve "
                                f"at most {dp.max_cids} connections")
        if dp.attached:
            return dp
        if mode != "auto" and dp.mode != mode:
            log.warning("reusing the STCP XDP program on %s in %s mode (asked for %s)", iface, dp.mode, mode)
        if dp.max_record_len != max_record_len:
            log.warning("reusing the STCP XDP program on %s with max record length %d (asked for %d)",
                        iface, dp.max_record_len, max_record_len)
        return dp

    # -- a server's datapath (stcp.datapath.base.Datapath) --------------------------------
    def server_config(self, config: Config) -> Config:
        return cid_layout.for_worker(config, None)       # a server id, if it has one

    def open_driver(self, loop: asyncio.AbstractEventLoop, host: str, port: int, endpoint: ServerEndpoint,
                    on_new: Callable[[Connection], None],
                    on_ended: Optional[Callable[[Connection], None]]) -> ServerDriver:
        # UDP GRO in either mode: generic XDP runs after GRO and passes a batch of one live
        # connection's records whole (batch_ok in bpf/stcp_xdp.c), native runs before it
        driver = ServerDriver(loop, bind_udp(host, port), endpoint, on_new, on_ended, gro=True)
        self.serve_endpoint(loop, endpoint, driver)
        return driver

    def serve_endpoint(self, loop: asyncio.AbstractEventLoop, endpoint: ServerEndpoint,
                       driver: ServerDriver, cookies: Optional[bool] = None) -> None:
        """Tie the program to a server's endpoint: hellos are refused (REJECT_BUSY) while the
        live table is full, and (unless cookies=False, or kernel_cookies is off) the
        program gets the endpoint's cookie keys, kept in step until close()."""
        self._driver = driver
        endpoint.cid_room = self.has_room
        if self.kernel_cookies if cookies is None else cookies:
            self._cookies = KernelCookies(self._h.maps["cookie"], endpoint.cookies, loop)
            self._cookies.start()

    def server_hooks(self) -> Tuple[object, ...]:
        return (LiveCidHooks(self, touch=self.touch),)

    def touch(self, conn: Connection) -> None:
        """Get conn's pending records sent soon (the server's driver flushes it)."""
        if self._driver is not None:
            self._driver.touch(conn)

    # -- inspection --------------------------------------------------------------------
    def counters(self) -> Dict[str, Tuple[int, int]]:
        """verdict name ('pass_data', 'drop_unknown_cid', ...) -> (packets, bytes), all CPUs."""
        return read_counters(self._h)

    def is_attached(self) -> bool:
        """True while our program is still the one on the interface."""
        return off_loop(self._is_attached)

    def _is_attached(self) -> bool:
        try:
            with Netlink(self.netns) as nl:
                return self._h.prog_id in attached_ids(nl, self.ifindex)
        except Exception:
            return False

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        """Detach if we attached (and our program is still the one there), else forget the
        CIDs we added and the cookie keys we wrote. Idempotent."""
        if self._h.prog_fd < 0:
            return
        if self._cookies is not None:
            self._cookies.close()
            self._cookies = None
        off_loop(self._close)

    def hand_over(self, uid: int, gid: int) -> None:
        """Before the process gives up its privileges for uid/gid: make what close() must do
        then possible without them. Detaching is closing the BPF link (attach(link=True));
        the pins are unlinked through a descriptor of their directory, given to uid (bpffs
        is root's and mode 0700: no path into it is open to uid). An attachment by netlink
        would need CAP_NET_ADMIN to undo: XdpSetupError."""
        if self.attached and self._link_fd < 0:
            raise XdpSetupError(f"the XDP program on {self.iface} was attached without a BPF link; detaching it "
                                "needs privileges a server that drops them no longer has")
        if self.attached and self.pin_dir and self._pin_dirfd < 0 and os.path.isdir(self.pin_dir):
            os.chown(self.pin_dir, uid, gid)
            self._pin_dirfd = os.open(self.pin_dir, os.O_PATH | os.O_DIRECTORY)

    def release(self) -> None:
        """Forget the program without touching it: it stays attached, with its pins and
        every CID in its table (`stcp-loader attach` leaves it to the kernel)."""
        self._h.close()

    def _close(self) -> None:
        try:
            if self.attached and self._link_fd >= 0:
                os.close(self._link_fd)           # detaches (the last reference to the link)
                self._link_fd = -1
                ours = True
            else:
                ours = self.attached and self._is_attached()
                if ours:
                    self._detach()
            if ours:
                if self._pin_dirfd >= 0:
                    self._unpin_at()
                elif self.pin_dir and self._pins_are_ours(self.pin_dir):
                    remove_pins(self.pin_dir)
            else:
                # not ours, or ours was replaced (`stcp-loader attach --force`) by a program
                # that took over its maps: take back only what we added
                self.forget_own()
        finally:
            self._h.close()

    def _detach(self) -> None:
        if self.loader == "libxdp" or self._h.dispatcher_id is not None:
            try:
                libxdp.detach(self.ifindex, self.iface, self._h.prog_id, self.mode, self.netns)
                return
            except XdpSetupError as e:
                if self._h.dispatcher_id is not None:
                    log.warning("%s", e)
                    return
                log.info("%s; detaching through netlink", e)     # attached alone: netlink can
        try:
            with Netlink(self.netns) as nl:
                for m, pid in nl.xdp_state(self.ifindex).items():
                    if pid == self._h.prog_id:
                        nl.clear_xdp(self.ifindex, m)
        except Exception as e:   # interface or namespace gone: nothing left to detach
            log.info("detach from %s: %s", self.iface, e)

    def _unpin_at(self) -> None:
        """Unlink our pins through the directory's descriptor (hand_over()); the directory
        itself stays, empty, where its parent is not ours to write (the next attach removes it)."""
        for name in ["prog", *self._h.maps]:
            try:
                os.unlink(name, dir_fd=self._pin_dirfd)
            except OSError:
                pass
        os.close(self._pin_dirfd)
        self._pin_dirfd = -1
        if self.pin_dir:
            with contextlib.suppress(OSError):
                remove_pins(self.pin_dir)     # the directory, where we may

    def _pins_are_ours(self, pins: str) -> bool:
        # nothing (readable) pinned: removing the directory is harmless
        return pinned_prog_id(pins) in (None, self._h.prog_id)

    def __enter__(self) -> "XdpDatapath":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"XdpDatapath(iface={self.iface!r}, mode={self.mode!r}, prog_id={self.prog_id}, "
                f"port={self.port}, attached={self.attached})")
