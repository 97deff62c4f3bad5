"""The XDP datapath orchestrator: compile, attach, pin, inspect and detach bpf/stcp_xdp.c.

bcc compiles the C program at load time (sources are read from bpf/ as files), pyroute2
does the netlink side (interface lookup, attaching in native or generic mode, querying
and removing XDP state), and a few libbpf calls through ctypes read and write the maps.

The source of truth for "is STCP attached to IFACE" is the kernel, not our pins: the
interface's XDP program id (netlink) -> that program's info (name `stcp_xdp`, map ids)
-> its maps, opened by id. So status and reuse work from any process and any mount
namespace (`ip netns exec` gives each process a private /sys). The pins under
/sys/fs/bpf/stcp/IFACE/ are for operators and other tools (bpftool map dump pinned ...);
they are made on attach and removed on detach.

Entry points: XdpDatapath (used by `stcp serve --datapath xdp`), attach(), detach(),
status() (used by `stcp-loader`). Every setup failure raises XdpSetupError with a
one-line message that says what to do.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from ..errors import STCPError
from ..wire import DEFAULT_MAX_DATAGRAM, HEADER_LEN, MAX_CID_WORKERS
from .verdicts import Verdict

log = logging.getLogger("stcp.datapath.xdp")

DEFAULT_MAX_RECORD_LEN = DEFAULT_MAX_DATAGRAM - HEADER_LEN   # 1428
DEFAULT_HS_RATE = 20          # client hellos per second per source prefix
DEFAULT_HS_BURST = 40
DEFAULT_HS_PREFIX4 = 32       # an IPv4 source's bucket: its /32
DEFAULT_HS_PREFIX6 = 64       # an IPv6 source's bucket: its /64 (one host may own all of it)
# All sources together: at the 160-350 us of CPU a hello costs the server, 1000/s is at
# most about a third of one core, and a flood from spoofed prefixes gets no more.
DEFAULT_HS_GLOBAL_RATE = 1000
DEFAULT_HS_GLOBAL_BURST = 2000
DEFAULT_MAX_CIDS = 65536
DEFAULT_HS_SOURCES = 65536
CID_FILTER_WORDS = 8192       # STCP_CID_FILTER_WORDS in bpf/stcp_wire.h
CID_FILTER_SLOTS = CID_FILTER_WORDS * 8
MAP_ABI = 4                   # STCP_MAP_ABI in bpf/stcp_wire.h
XSK_MAX = 64                  # entries (RX queues) of stcp_xsks, the XSKMAP of the afxdp variant

BPFFS = "/sys/fs/bpf"
PIN_ROOT = BPFFS + "/stcp"
PROG_NAME = "stcp_xdp"
MAP_NAMES = {"counters": "stcp_counters", "cids": "stcp_cids",
             "hs_bucket": "stcp_hs_bucket", "config": "stcp_config", "cid_filter": "stcp_cid_filter"}
MODES = ("native", "generic", "auto")

# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
_NETLINK_MODES = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload"}

_CONFIG = struct.Struct("=IIIIIIQQIIIIQQ")     # struct stcp_config
_COUNTER = struct.Struct("=QQ")          # struct stcp_counter
_CID = struct.Struct("!Q")               # CIDs are stored as their wire bytes
_WORD = struct.Struct("=Q")
BPF_NOEXIST = 1


def cid_filter_slot(cid: int) -> int:
    """cid_slot() of bpf/stcp_xdp.c: the prefilter slot of a CID."""
    raw = _WORD.unpack(_CID.pack(cid))[0]          # the u64 the program loads from the packet
    return ((raw & 0xFFFFFFFF) ^ (raw >> 32)) & (CID_FILTER_SLOTS - 1)


class XdpSetupError(STCPError):
    """The XDP datapath cannot be set up or inspected; str() is one line saying what to do."""


class XdpAlreadyAttached(XdpSetupError):
    pass


class XdpNotAttached(XdpSetupError):
    pass


# --------------------------------------------------------------------------------------
# where the C sources are
def bpf_source_dir() -> Path:
    """bpf/ of a source checkout or editable install, else the copy shipped in the package
    (stcp/bpf/, a symlink to ../bpf in the repository); $STCP_BPF_DIR overrides both."""
    override = os.environ.get("STCP_BPF_DIR")
    if override:
        if (Path(override) / "stcp_xdp.c").is_file():
            return Path(override).resolve()
        raise XdpSetupError(f"STCP_BPF_DIR={override} has no stcp_xdp.c; point it at the repository's bpf/ "
                            "directory or unset it")
    pkg = Path(__file__).resolve().parent.parent
    candidates = [pkg / "bpf", pkg.parent / "bpf"]
    for c in candidates:
        if (c / "stcp_xdp.c").is_file():
            return c.resolve()
    raise XdpSetupError(f"bpf/stcp_xdp.c not found (looked in {', '.join(map(str, candidates))}); "
                        "set STCP_BPF_DIR to the repository's bpf/ directory")


# --------------------------------------------------------------------------------------
# environment checks
def require_root() -> None:
    if os.geteuid() != 0:
        raise XdpSetupError("needs root: attaching XDP and reading BPF maps needs CAP_NET_ADMIN and CAP_BPF "
                            "(run it with sudo)")


def _mounted_fstype(path: str) -> Optional[str]:
    fstype = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] == path:
                    fstype = parts[2]           # the last mount on a path wins
    except OSError:
        return None
    return fstype


def ensure_bpffs(root: str = BPFFS) -> bool:
    """Mount bpffs at /sys/fs/bpf if nothing is mounted there (as systemd would); True if
    this call mounted it."""
    if _mounted_fstype(root) == "bpf":
        return False
    if not os.path.isdir(root):
        raise XdpSetupError(f"no bpffs: {root} does not exist (is sysfs mounted?); "
                            f"mount it with: mkdir -p {root} && mount -t bpf bpf {root}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    if libc.mount(b"bpf", root.encode(), b"bpf", 0, b"mode=0700") != 0:
        e = ctypes.get_errno()
        raise XdpSetupError(f"no bpffs at {root} and mounting it failed ({os.strerror(e)}); "
                            f"mount it with: mount -t bpf bpf {root}")
    log.info("mounted bpffs at %s", root)
    return True


def current_netns_name() -> Optional[str]:
    """The `ip netns` name of this process's network namespace, None if it has none."""
    try:
        me = os.stat("/proc/self/ns/net")
        for name in os.listdir("/run/netns"):
            st = os.stat(f"/run/netns/{name}")
            if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                return name
    except OSError:
        pass
    return None


def _import_bcc():
    try:
        import bcc  # noqa: F401  (Debian's python3-bpfcc; the venv sees it through a .pth)
        from bcc import BPF
    except Exception as e:  # ImportError, or libbcc.so missing (OSError)
        raise XdpSetupError(f"bcc is not available ({type(e).__name__}: {e}); install the toolchain with "
                            "'sudo make system-deps' (python3-bpfcc libbpfcc linux-headers-amd64)") from None
    return BPF


def check_toolchain() -> None:
    """bcc importable and kernel headers where bcc looks for them."""
    _import_bcc()
    release = os.uname().release
    mods = Path("/lib/modules") / release
    if not (mods / "build" / "include").is_dir() or not (mods / "source" / "include" / "linux").is_dir():
        raise XdpSetupError(f"kernel headers for bcc not found under {mods}/build and {mods}/source; "
                            "run 'sudo make system-deps' (installs linux-headers-amd64 and links them)")


# --------------------------------------------------------------------------------------
# libbpf through ctypes: the few bpf(2) commands we need on fds and ids
class _BpfProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
    ]


class _BpfMapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _Libbpf:
    _lock = threading.Lock()
    _lib = None

    @classmethod
    def lib(cls):
        with cls._lock:
            if cls._lib is None:
                name = ctypes.util.find_library("bpf") or "libbpf.so.1"
                try:
                    lib = ctypes.CDLL(name, use_errno=True)
                except OSError as e:
                    raise XdpSetupError(f"libbpf not loadable ({e}); run 'sudo make system-deps'") from None
                vp, cp, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32
                for fn, args in {
                    "bpf_obj_get": [cp], "bpf_obj_pin": [ctypes.c_int, cp],
                    "bpf_prog_get_fd_by_id": [u32], "bpf_map_get_fd_by_id": [u32],
                    "bpf_obj_get_info_by_fd": [ctypes.c_int, vp, ctypes.POINTER(u32)],
                    "bpf_map_lookup_elem": [ctypes.c_int, vp, vp],
                    "bpf_map_update_elem": [ctypes.c_int, vp, vp, ctypes.c_uint64],
                    "bpf_map_delete_elem": [ctypes.c_int, vp],
                    "bpf_map_get_next_key": [ctypes.c_int, vp, vp],
                    "libbpf_num_possible_cpus": [],
                }.items():
                    f = getattr(lib, fn)
                    f.argtypes = args
                    f.restype = ctypes.c_int
                cls._lib = lib
            return cls._lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = -rc if rc != -1 else (ctypes.get_errno() or 1)
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def _prog_fd_by_id(prog_id: int) -> int:
    return _check(_Libbpf.lib().bpf_prog_get_fd_by_id(prog_id), f"open BPF program id {prog_id}")


def _map_fd_by_id(map_id: int) -> int:
    return _check(_Libbpf.lib().bpf_map_get_fd_by_id(map_id), f"open BPF map id {map_id}")


def prog_info(fd: int) -> dict:
    """id, name, map ids and (with kernel.bpf_stats_enabled=1) run_time_ns / run_cnt."""
    lib = _Libbpf.lib()
    info = _BpfProgInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "BPF program info")
    count = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    info2 = _BpfProgInfo()
    info2.nr_map_ids = count
    info2.map_ids = ctypes.addressof(ids)
    n = ctypes.c_uint32(ctypes.sizeof(info2))
    _check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info2), ctypes.byref(n)), "BPF program info")
    return {"id": info.id, "name": info.name.decode(errors="replace"), "type": info.type,
            "map_ids": list(ids[:min(count, info2.nr_map_ids)]),
            "run_time_ns": info2.run_time_ns, "run_cnt": info2.run_cnt}


def map_info(fd: int) -> dict:
    info = _BpfMapInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_Libbpf.lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "BPF map info")
    return {"id": info.id, "name": info.name.decode(errors="replace"), "type": info.type,
            "key_size": info.key_size, "value_size": info.value_size, "max_entries": info.max_entries}


def _map_lookup(fd: int, key: bytes, value_size: int) -> Optional[bytes]:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    rc = _Libbpf.lib().bpf_map_lookup_elem(fd, k, v)
    if rc < 0:
        if -rc == errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
            return None
        _check(rc, "BPF map lookup")
    return v.raw


def _map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> bool:
    """False if flags=BPF_NOEXIST and the key exists."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    rc = _Libbpf.lib().bpf_map_update_elem(fd, k, v, flags)
    if rc < 0 and flags & BPF_NOEXIST and (-rc == errno.EEXIST or ctypes.get_errno() == errno.EEXIST):
        return False
    _check(rc, "BPF map update")
    return True


def _map_delete(fd: int, key: bytes) -> bool:
    k = ctypes.create_string_buffer(key, len(key))
    rc = _Libbpf.lib().bpf_map_delete_elem(fd, k)
    if rc < 0:
        if -rc == errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
            return False
        _check(rc, "BPF map delete")
    return True


def _map_keys(fd: int, key_size: int, limit: int) -> Iterator[bytes]:
    lib = _Libbpf.lib()
    prev = None
    nxt = ctypes.create_string_buffer(key_size)
    for _ in range(limit):
        if lib.bpf_map_get_next_key(fd, prev, nxt) < 0:
            return
        yield nxt.raw
        prev = ctypes.create_string_buffer(nxt.raw, key_size)


def _pin(fd: int, path: str) -> None:
    _check(_Libbpf.lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def possible_cpus() -> int:
    return _check(_Libbpf.lib().libbpf_num_possible_cpus(), "possible CPUs")


# --------------------------------------------------------------------------------------
# netlink (pyroute2)
def _off_loop(fn, *args, **kw):
    """Call fn here, or in a helper thread when this thread runs an asyncio loop: pyroute2's
    synchronous IPRoute drives an event loop of its own and refuses to run inside one
    (`stcp serve` calls us from its loop). Blocks the caller either way."""
    import asyncio
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args, **kw)
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="stcp-xdp-netlink", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class _Netlink:
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

    def __enter__(self) -> "_Netlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ifindex(self, iface: str) -> int:
        idx = self.ipr.link_lookup(ifname=iface)
        if not idx:
            where = f" in network namespace '{self.netns}'" if self.netns else ""
            raise XdpSetupError(f"interface '{iface}' not found{where} (list interfaces with: ip link show)")
        return idx[0]

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
        self.ipr.link("set", index=ifindex, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})


def _netlink_msg(e: Exception) -> str:
    code = getattr(e, "code", None)
    text = str(e.args[1]) if len(getattr(e, "args", ())) > 1 else str(e)
    return f"{text} (errno {code})" if code else text


# --------------------------------------------------------------------------------------
# pins
def pin_dir(iface: str, netns: Optional[str] = None) -> str:
    """/sys/fs/bpf/stcp/IFACE, or /sys/fs/bpf/stcp/netns/NS/IFACE for an interface reached
    through --netns NS (names are per namespace). bpffs rejects '.' in names (VLAN
    interfaces such as eth0.100), so a '.' becomes '%'."""
    safe = iface.replace(".", "%")
    if netns:
        return f"{PIN_ROOT}/netns/{netns.replace('.', '%')}/{safe}"
    return f"{PIN_ROOT}/{safe}"


def _remove_pins(path: str) -> bool:
    """Remove a pin directory and the empty parents we made; True if something was there."""
    p = Path(path)
    if not p.exists():
        return False
    for child in p.iterdir():
        try:
            child.unlink()
        except IsADirectoryError:
            shutil.rmtree(child, ignore_errors=True)
        except FileNotFoundError:
            pass
    try:
        p.rmdir()
    except OSError:
        pass
    parent = p.parent
    while str(parent).startswith(PIN_ROOT) and len(str(parent)) >= len(PIN_ROOT):
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
    return True


# --------------------------------------------------------------------------------------
@dataclass
class _Handles:
    """Open fds of one attached STCP program and its maps."""
    prog_id: int
    prog_fd: int
    maps: Dict[str, int]                  # our short name -> fd
    map_ids: Dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for fd in [self.prog_fd, *self.maps.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.maps = {}
        self.prog_fd = -1


def _open_prog(prog_id: int) -> Optional[_Handles]:
    """Handles to the program with this id if it is an STCP program, else None."""
    try:
        pfd = _prog_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        info = prog_info(pfd)
        if info["name"] != PROG_NAME:
            os.close(pfd)
            return None
        by_name = {v: k for k, v in MAP_NAMES.items()}
        maps: Dict[str, int] = {}
        ids: Dict[str, int] = {}
        for mid in info["map_ids"]:
            mfd = _map_fd_by_id(mid)
            short = by_name.get(map_info(mfd)["name"])
            if short and short not in maps:
                maps[short], ids[short] = mfd, mid
            else:
                os.close(mfd)
        h = _Handles(prog_id, pfd, maps, ids)
        if set(maps) != set(MAP_NAMES):
            h.close()
            return None
        return h
    except Exception:
        os.close(pfd)
        raise


def _read_config(h: _Handles) -> dict:
    raw = _map_lookup(h.maps["config"], struct.pack("=I", 0), _CONFIG.size)
    (abi, port, max_len, rate, burst, nworkers, _cost, _cap, prefix4, prefix6, grate, gburst, _gcost,
     _gcap) = _CONFIG.unpack(raw or bytes(_CONFIG.size))
    return {"abi": abi, "port": port, "max_record_len": max_len, "hs_rate": rate, "hs_burst": burst,
            "nworkers": nworkers, "hs_prefix4": prefix4, "hs_prefix6": prefix6,
            "hs_global_rate": grate, "hs_global_burst": gburst}


def _write_config(h: _Handles, port: int, max_record_len: int, hs_rate: int, hs_burst: int,
                  nworkers: int = 0, *, hs_prefix4: int = DEFAULT_HS_PREFIX4, hs_prefix6: int = DEFAULT_HS_PREFIX6,
                  hs_global_rate: int = DEFAULT_HS_GLOBAL_RATE, hs_global_burst: int = DEFAULT_HS_GLOBAL_BURST) -> None:
    """nworkers: the afxdp variant steers data records by their CID's worker bits over that
    many workers (0: no steering; the plain xdp variant ignores it). Hellos are limited per
    source prefix (hs_rate/hs_burst per /hs_prefix4 of IPv4, /hs_prefix6 of IPv6) and then
    all together (hs_global_rate/hs_global_burst; rate 0: no global budget)."""
    cost = 1_000_000_000 // hs_rate
    gcost = 1_000_000_000 // hs_global_rate if hs_global_rate else 0
    value = _CONFIG.pack(MAP_ABI, port, max_record_len, hs_rate, hs_burst, nworkers, cost, cost * hs_burst,
                         hs_prefix4, hs_prefix6, hs_global_rate, hs_global_burst, gcost, gcost * hs_global_burst)
    _map_update(h.maps["config"], struct.pack("=I", 0), value)


def _read_counters(h: _Handles) -> Dict[str, Tuple[int, int]]:
    ncpu = possible_cpus()
    stride = (_COUNTER.size + 7) & ~7
    out: Dict[str, Tuple[int, int]] = {}
    for v in Verdict:
        raw = _map_lookup(h.maps["counters"], struct.pack("=I", int(v)), stride * ncpu)
        pk = by = 0
        if raw:
            for cpu in range(ncpu):
                p, b = _COUNTER.unpack_from(raw, cpu * stride)
                pk += p
                by += b
        out[v.key] = (pk, by)
    return out


def _count_cids(h: _Handles) -> int:
    return sum(1 for _ in _map_keys(h.maps["cids"], 8, DEFAULT_MAX_CIDS * 4))


def _find_stcp(nl: _Netlink, ifindex: int) -> Tuple[Optional[str], Optional[_Handles], Dict[str, int]]:
    """(mode, handles) of the STCP program attached to the interface, and all XDP state."""
    state = nl.xdp_state(ifindex)
    for mode, pid in state.items():
        h = _open_prog(pid)
        if h:
            return mode, h, state
    return None, None, state


def _validate_limits(port: int, mode: str, max_record_len: int, hs_rate: int, hs_burst: int,
                     hs_prefix4: int = DEFAULT_HS_PREFIX4, hs_prefix6: int = DEFAULT_HS_PREFIX6,
                     hs_global_rate: int = DEFAULT_HS_GLOBAL_RATE, hs_global_burst: int = DEFAULT_HS_GLOBAL_BURST) -> None:
    if not 1 <= port <= 65535:
        raise XdpSetupError(f"port {port} is not a UDP port (1-65535)")
    if mode not in MODES:
        raise XdpSetupError(f"mode '{mode}' is not one of {', '.join(MODES)}")
    if not 16 <= max_record_len <= 65507 - HEADER_LEN:
        raise XdpSetupError(f"max record length {max_record_len} is outside 16..{65507 - HEADER_LEN}")
    if hs_rate < 1 or hs_burst < 0:
        raise XdpSetupError("handshake rate must be >= 1 per second and burst >= 0")
    if not (0 <= hs_prefix4 <= 32 and 0 <= hs_prefix6 <= 128):
        raise XdpSetupError(f"hello prefix lengths /{hs_prefix4} (IPv4) and /{hs_prefix6} (IPv6) must be "
                            "0..32 and 0..128")
    if hs_global_rate < 0 or hs_global_burst < 0:
        raise XdpSetupError("global handshake rate must be >= 0 per second (0: no global budget) and burst >= 0")


def _compile(max_cids: int, hs_sources: int, afxdp: bool = False):
    BPF = _import_bcc()
    src = bpf_source_dir()
    cflags = [f"-I{src}", f"-DSTCP_MAX_CIDS={max_cids}", f"-DSTCP_HS_SOURCES={hs_sources}"]
    if afxdp:
        cflags += ["-DSTCP_AFXDP", f"-DSTCP_XSK_MAX={XSK_MAX}"]
    try:
        b = BPF(src_file=str(src / "stcp_xdp.c").encode(), cflags=cflags)
        fn = b.load_func(PROG_NAME.encode(), BPF.XDP)
    except Exception as e:
        raise XdpSetupError(f"compiling/loading {src / 'stcp_xdp.c'} failed ({e}); see the compiler or verifier "
                            "output above; 'sudo make system-deps' installs bcc and the kernel headers") from None
    return b, fn


def _release_bcc(b) -> None:
    import atexit
    try:
        b.cleanup()
    finally:
        atexit.unregister(b.cleanup)


# --------------------------------------------------------------------------------------
class XdpDatapath:
    """One interface's STCP XDP program, attached by us or found attached.

    attach_or_reuse() is what `stcp serve --datapath xdp` calls; close() leaves the
    interface as it was found: it detaches only what this object attached, and removes
    the CIDs this object added when the program stays.
    """

    def __init__(self, iface: str, ifindex: int, mode: str, handles: _Handles, attached: bool,
                 netns: Optional[str], pins: Optional[str]):
        self.iface = iface
        self.ifindex = ifindex
        self.mode = mode
        self.attached = attached          # True if this object attached the program
        self.netns = netns
        self.pin_dir = pins
        self._h = handles
        self._cids: set[int] = set()
        self._lock = threading.Lock()
        self.private_pins = False         # pins live in a bpffs private to this process
        cfg = _read_config(handles)
        self.port: int = cfg["port"]
        self.max_record_len: int = cfg["max_record_len"]
        self.config = cfg

    @property
    def prog_id(self) -> int:
        return self._h.prog_id

    # -- construction ------------------------------------------------------------------
    @classmethod
    def attach(cls, iface: str, port: int, mode: str = "auto", max_record_len: int = DEFAULT_MAX_RECORD_LEN,
               *, force: bool = False, netns: Optional[str] = None, hs_rate: int = DEFAULT_HS_RATE,
               hs_burst: int = DEFAULT_HS_BURST, max_cids: int = DEFAULT_MAX_CIDS,
               hs_sources: int = DEFAULT_HS_SOURCES, afxdp: bool = False, nworkers: int = 0,
               hs_prefix4: int = DEFAULT_HS_PREFIX4, hs_prefix6: int = DEFAULT_HS_PREFIX6,
               hs_global_rate: int = DEFAULT_HS_GLOBAL_RATE,
               hs_global_burst: int = DEFAULT_HS_GLOBAL_BURST) -> "XdpDatapath":
        """Compile and attach a fresh program. Raises XdpAlreadyAttached if STCP (or any
        other XDP program) is attached there, unless force=True, which replaces it.
        afxdp=True compiles the variant that redirects good records to its stcp_xsks
        XSKMAP (-DSTCP_AFXDP; stcp/datapath/afxdp.py fills the map); nworkers > 0 makes it
        steer data records by their CID's worker bits (see bpf/stcp_xdp.c, steer())."""
        hello = {"hs_prefix4": hs_prefix4, "hs_prefix6": hs_prefix6, "hs_global_rate": hs_global_rate,
                 "hs_global_burst": hs_global_burst}
        return _off_loop(cls._attach, iface, port, mode, max_record_len, force, netns, hs_rate, hs_burst,
                         max_cids, hs_sources, afxdp, nworkers, hello)

    @classmethod
    def _attach(cls, iface, port, mode, max_record_len, force, netns, hs_rate, hs_burst, max_cids,
                hs_sources, afxdp=False, nworkers=0, hello=None) -> "XdpDatapath":
        hello = hello or {}
        _validate_limits(port, mode, max_record_len, hs_rate, hs_burst, **hello)
        if not 0 <= nworkers <= MAX_CID_WORKERS:
            raise XdpSetupError(f"{nworkers} workers: CID steering names at most {MAX_CID_WORKERS}")
        require_root()
        with _Netlink(netns) as nl:
            ifindex = nl.ifindex(iface)
            check_toolchain()
            mounted = ensure_bpffs()
            old_mode, old, state = _find_stcp(nl, ifindex)
            if old:
                old.close()
            if state and not force:
                if old:
                    raise XdpAlreadyAttached(
                        f"STCP XDP program already attached to {iface} (prog id {old.prog_id}, {old_mode} mode); "
                        f"use --force to replace it, or detach it first")
                desc = ", ".join(f"id {p} in {m} mode" for m, p in state.items())
                raise XdpAlreadyAttached(f"{iface} already has another XDP program ({desc}); "
                                         f"use --force to replace it, or remove it first")
            pins = pin_dir(iface, netns)
            b, fn = _compile(max_cids, hs_sources, afxdp)
            h = None
            try:
                pid = prog_info(fn.fd)["id"]
                h = _open_prog(pid)
                if h is None:
                    raise XdpSetupError("the compiled program has unexpected maps; is bpf/ from this version?")
                _write_config(h, port, max_record_len, hs_rate, hs_burst, nworkers, **hello)
                _remove_pins(pins)              # stale pins of a program that is gone
                os.makedirs(pins, exist_ok=True)
                _pin(h.prog_fd, f"{pins}/prog")
                for short, fd in h.maps.items():
                    _pin(fd, f"{pins}/{short}")
                for m, p in state.items():     # force: clear what is there first
                    nl.set_xdp(ifindex, -1, _MODE_FLAGS.get(m, 0))
                got = cls._attach_prog(nl, ifindex, iface, h.prog_fd, mode)
            except BaseException:
                if h:
                    h.close()
                _remove_pins(pins)
                raise
            finally:
                _release_bcc(b)
            log.info("attached STCP XDP prog %d to %s in %s mode", h.prog_id, iface, got)
            dp = cls(iface, ifindex, got, h, True, netns, pins)
            # `ip netns exec` gives the process a private /sys: a bpffs mounted there (and
            # our pins) goes away with the process. The program stays attached regardless.
            dp.private_pins = mounted and netns is None and current_netns_name() is not None
            return dp

    @staticmethod
    def _attach_prog(nl: _Netlink, ifindex: int, iface: str, fd: int, mode: str) -> str:
        tries = ["native", "generic"] if mode == "auto" else [mode]
        errors = []
        for m in tries:
            try:
                nl.set_xdp(ifindex, fd, XDP_FLAGS_UPDATE_IF_NOEXIST | _MODE_FLAGS[m])
                return m
            except Exception as e:  # NetlinkError
                errors.append(f"{m}: {_netlink_msg(e)}")
                if getattr(e, "code", None) in (errno.EEXIST, errno.EBUSY):
                    raise XdpAlreadyAttached(f"{iface} got another XDP program meanwhile ({_netlink_msg(e)}); "
                                             "use --force to replace it") from None
        raise XdpSetupError(f"attaching XDP to {iface} failed ({'; '.join(errors)})"
                            + ("; try --mode generic" if mode == "native" else ""))

    @classmethod
    def open(cls, iface: str, *, netns: Optional[str] = None) -> "XdpDatapath":
        """The STCP program already attached to iface; XdpNotAttached if there is none."""
        return _off_loop(cls._open, iface, netns)

    @classmethod
    def _open(cls, iface: str, netns: Optional[str]) -> "XdpDatapath":
        require_root()
        with _Netlink(netns) as nl:
            ifindex = nl.ifindex(iface)
            mode, h, state = _find_stcp(nl, ifindex)
            if not h:
                raise XdpNotAttached(f"no STCP XDP program attached to {iface}")
            abi = _read_config(h)["abi"]
            if abi != MAP_ABI:
                h.close()
                raise XdpSetupError(f"the STCP XDP program on {iface} has map layout {abi}, this stcp needs "
                                    f"{MAP_ABI}; re-attach it (stcp-loader attach {iface} --force)")
            return cls(iface, ifindex, mode, h, False, netns, pin_dir(iface, netns))

    @classmethod
    def attach_or_reuse(cls, iface: str, port: int, mode: str = "auto",
                        max_record_len: int = DEFAULT_MAX_RECORD_LEN, **kw) -> "XdpDatapath":
        """Reuse the STCP program attached to iface (it must serve the same port), else
        attach one. `attached` says which happened; close() undoes only our part."""
        _validate_limits(port, mode, max_record_len, kw.get("hs_rate", DEFAULT_HS_RATE),
                         kw.get("hs_burst", DEFAULT_HS_BURST),
                         **{k: kw[k] for k in ("hs_prefix4", "hs_prefix6", "hs_global_rate", "hs_global_burst")
                            if k in kw})
        try:
            dp = cls.open(iface, netns=kw.get("netns"))
        except XdpNotAttached:
            try:
                return cls.attach(iface, port, mode, max_record_len, **kw)
            except XdpAlreadyAttached:
                dp = cls.open(iface, netns=kw.get("netns"))   # lost a race with another attacher
        if dp.port != port:
            dp.close()
            raise XdpSetupError(f"the STCP XDP program on {iface} validates port {dp.port}, not {port}; "
                                f"detach it (stcp-loader detach {iface}) or serve on port {dp.port}")
        if mode != "auto" and dp.mode != mode:
            log.warning("reusing the STCP XDP program on %s in %s mode (asked for %s)", iface, dp.mode, mode)
        if dp.max_record_len != max_record_len:
            log.warning("reusing the STCP XDP program on %s with max record length %d (asked for %d)",
                        iface, dp.max_record_len, max_record_len)
        return dp

    # -- the live-connection table -----------------------------------------------------
    # A CID lives in the stcp_cids hash and counts in its prefilter slot. Invariant: a CID
    # in the hash has a slot count >= 1 (the filter is raised before the insert and
    # lowered after the delete), so the filter never hides a live connection.
    def add_cid(self, cid: int, tag: int = 1) -> None:
        """Let data records for this connection ID through (cid as parsed from the wire).
        tag (1-255) is the entry's value, which the program ignores: the afxdp supervisor
        tags each worker's CIDs so it can remove a dead worker's (cids_tagged)."""
        with self._lock:
            self._filter_adjust(cid, +1)
            if not _map_update(self._h.maps["cids"], _CID.pack(cid), bytes([tag]), BPF_NOEXIST):
                self._filter_adjust(cid, -1)          # already live: counted once only
            self._cids.add(cid)

    def remove_cid(self, cid: int) -> None:
        with self._lock:
            if _map_delete(self._h.maps["cids"], _CID.pack(cid)):
                self._filter_adjust(cid, -1)
            self._cids.discard(cid)

    def _filter_adjust(self, cid: int, delta: int) -> None:
        slot = cid_filter_slot(cid)
        key = struct.pack("=I", slot >> 3)
        fd = self._h.maps["cid_filter"]
        word = _WORD.unpack(_map_lookup(fd, key, 8) or bytes(8))[0]
        shift = (slot & 7) * 8
        count = (word >> shift) & 0xFF
        if count == 0xFF:
            return                                    # saturated: sticky, the hash decides
        count = max(0, count + delta)
        _map_update(fd, key, _WORD.pack((word & ~(0xFF << shift)) | (count << shift)))

    def has_cid(self, cid: int) -> bool:
        return _map_lookup(self._h.maps["cids"], _CID.pack(cid), 1) is not None

    def filter_count(self, cid: int) -> int:
        """The prefilter count of cid's slot (tests and diagnostics)."""
        slot = cid_filter_slot(cid)
        raw = _map_lookup(self._h.maps["cid_filter"], struct.pack("=I", slot >> 3), 8) or bytes(8)
        return (_WORD.unpack(raw)[0] >> ((slot & 7) * 8)) & 0xFF

    def cids_tagged(self, tag: int) -> List[int]:
        """The live CIDs whose entry carries tag (see add_cid)."""
        out = []
        fd = self._h.maps["cids"]
        for k in _map_keys(fd, 8, DEFAULT_MAX_CIDS * 4):
            v = _map_lookup(fd, k, 1)
            if v is not None and v[0] == tag:
                out.append(_CID.unpack(k)[0])
        return out

    def cids(self) -> List[int]:
        return [_CID.unpack(k)[0] for k in _map_keys(self._h.maps["cids"], 8, DEFAULT_MAX_CIDS * 4)]

    # -- inspection --------------------------------------------------------------------
    def counters(self) -> Dict[str, Tuple[int, int]]:
        """verdict name ('pass_data', 'drop_unknown_cid', ...) -> (packets, bytes), all CPUs."""
        return _read_counters(self._h)

    def is_attached(self) -> bool:
        """True while our program is still the one on the interface."""
        return _off_loop(self._is_attached)

    def _is_attached(self) -> bool:
        try:
            with _Netlink(self.netns) as nl:
                return self._h.prog_id in nl.xdp_state(self.ifindex).values()
        except Exception:
            return False

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        """Detach if we attached (and our program is still the one there), else forget the
        CIDs we added. Idempotent."""
        if self._h.prog_fd < 0:
            return
        _off_loop(self._close)

    def _close(self) -> None:
        try:
            if self.attached:
                try:
                    with _Netlink(self.netns) as nl:
                        state = nl.xdp_state(self.ifindex)
                        for m, pid in state.items():
                            if pid == self._h.prog_id:
                                nl.set_xdp(self.ifindex, -1, _MODE_FLAGS.get(m, 0))
                except Exception as e:   # interface or namespace gone: nothing left to detach
                    log.info("detach from %s: %s", self.iface, e)
                if self.pin_dir and self._pins_are_ours():
                    _remove_pins(self.pin_dir)
            else:
                for cid in list(self._cids):
                    try:
                        _map_delete(self._h.maps["cids"], _CID.pack(cid))
                    except OSError:
                        pass
                self._cids.clear()
        finally:
            self._h.close()

    def _pins_are_ours(self) -> bool:
        try:
            fd = _check(_Libbpf.lib().bpf_obj_get(f"{self.pin_dir}/prog".encode()), "open pinned program")
        except OSError:
            return True      # nothing (readable) pinned: removing the directory is harmless
        try:
            return prog_info(fd)["id"] == self._h.prog_id
        finally:
            os.close(fd)

    def __enter__(self) -> "XdpDatapath":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"XdpDatapath(iface={self.iface!r}, mode={self.mode!r}, prog_id={self.prog_id}, "
                f"port={self.port}, attached={self.attached})")


# --------------------------------------------------------------------------------------
# operator API (stcp-loader)
def attach(iface: str, port: int, mode: str = "auto", max_record_len: int = DEFAULT_MAX_RECORD_LEN,
           force: bool = False, netns: Optional[str] = None, **kw) -> dict:
    """Attach and leave the program running (the kernel keeps it); return its status."""
    dp = XdpDatapath.attach(iface, port, mode, max_record_len, force=force, netns=netns, **kw)
    try:
        st = _status_of(iface, dp.mode, dp._h, dp.pin_dir)
        st["private_pins"] = dp.private_pins
        return st
    finally:
        dp._h.close()          # do not detach: the interface keeps the program


def detach(iface: str, netns: Optional[str] = None) -> dict:
    """Remove the STCP program from iface and its pins. XdpNotAttached if there is none
    (stale pins, if any, are removed all the same)."""
    return _off_loop(_detach, iface, netns)


def _detach(iface: str, netns: Optional[str]) -> dict:
    require_root()
    pins = pin_dir(iface, netns)
    with _Netlink(netns) as nl:
        ifindex = nl.ifindex(iface)
        mode, h, state = _find_stcp(nl, ifindex)
        if not h:
            stale = _remove_pins(pins) if os.path.isdir(pins) else False
            extra = f" (removed stale pins at {pins})" if stale else ""
            other = f"; another XDP program is attached ({state})" if state else ""
            raise XdpNotAttached(f"no STCP XDP program attached to {iface}{other}{extra}")
        try:
            nl.set_xdp(ifindex, -1, _MODE_FLAGS.get(mode, 0))
            result = {"iface": iface, "detached": True, "mode": mode, "prog_id": h.prog_id, "pin_dir": pins}
        finally:
            h.close()
    _remove_pins(pins)
    return result


def _status_of(iface: str, mode: Optional[str], h: Optional[_Handles], pins: str) -> dict:
    if h is None:
        return {"iface": iface, "attached": False, "pin_dir": pins, "pinned": os.path.isdir(pins)}
    return {
        "iface": iface, "attached": True, "mode": mode, "prog_id": h.prog_id,
        "map_ids": dict(h.map_ids), "config": _read_config(h), "live_cids": _count_cids(h),
        "pin_dir": pins, "pinned": os.path.exists(f"{pins}/prog"),
        "counters": {k: {"packets": p, "bytes": b} for k, (p, b) in _read_counters(h).items()},
    }


def status(iface: Optional[str] = None, netns: Optional[str] = None) -> List[dict]:
    """Status of iface, or of every interface carrying an STCP program when iface is None."""
    return _off_loop(_status, iface, netns)


def _status(iface: Optional[str], netns: Optional[str]) -> List[dict]:
    require_root()
    out = []
    with _Netlink(netns) as nl:
        links = [(iface, nl.ifindex(iface))] if iface else nl.links()
        for name, idx in links:
            mode, h, _state = _find_stcp(nl, idx)
            if h is None and not iface:
                continue
            try:
                out.append(_status_of(name, mode, h, pin_dir(name, netns)))
            finally:
                if h:
                    h.close()
    return out
