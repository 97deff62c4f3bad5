"""The STCP XDP program (bpf/stcp_xdp.c) as objects in the kernel: build it, find it, and
read and write its maps.

bcc compiles the C program at load time (sources are read from bpf/ as files); for
attaching beside other programs, xdp_object.py compiles the same source with clang. A
loaded program is named by its id; open_prog() opens it and its maps by id (ProgHandles),
so the same code serves the process that attached it, `stcp-loader status` in another
process, and the metrics exporter. find_stcp() goes from an interface to the STCP program
on it (netlink: interface -> XDP program id; behind libxdp's dispatcher, the kernel's
freplace links: dispatcher -> the programs it runs). The pins under
/sys/fs/bpf/stcp/IFACE/ are for operators and other tools (bpftool map dump pinned ...).

The layouts here mirror bpf/stcp_wire.h (tests/test_constants.py checks them).
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..privileges import require_capabilities
from ..wire import DEFAULT_MAX_DATAGRAM, HEADER_LEN
from . import bpf
from .bcc_import import import_bcc
from .errors import XdpSetupError
from .netlink import Netlink
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
# COOKIE replies the kernel sends toward one source prefix (a victim of spoofed hellos
# gets at most this many, each no larger than the hello it answers)
DEFAULT_CK_RATE = 10
DEFAULT_CK_BURST = 20
# Unknown-CID data records let through to user space, all sources together: enough for the
# clients of a restarted server to get their RESETs soon, far below what user space takes.
DEFAULT_UK_RATE = 100
DEFAULT_UK_BURST = 200
# The live table holds at least the server's connection limit (stcp.server.serve's default
# max_connections, 100000): a server refuses a table smaller than its limit.
DEFAULT_MAX_CIDS = 131072
DEFAULT_HALF_OPEN = 16384     # half-open CIDs: twice the endpoint's default hard cap (2 x 4096)
DEFAULT_HS_SOURCES = 65536
CID_FILTER_WORDS = 8192       # STCP_CID_FILTER_WORDS in bpf/stcp_wire.h
CID_FILTER_SLOTS = CID_FILTER_WORDS * 8
MAP_ABI = 5                   # STCP_MAP_ABI in bpf/stcp_wire.h
XSK_MAX = 64                  # entries (RX queues) of stcp_xsks, the XSKMAP of the afxdp variant

BPFFS = "/sys/fs/bpf"
PIN_ROOT = BPFFS + "/stcp"
PROG_NAME = "stcp_xdp"
MAP_NAMES = {"counters": "stcp_counters", "cids": "stcp_cids", "half_open": "stcp_half_open",
             "hs_bucket": "stcp_hs_bucket", "buckets": "stcp_buckets", "config": "stcp_config",
             "cid_filter": "stcp_cid_filter", "cookie": "stcp_cookie"}
MODES = ("native", "generic", "auto")

CONFIG = struct.Struct("=IIIIIIQQIIIIQQIIQQIIQQ")    # struct stcp_config
COUNTER = struct.Struct("=QQ")           # struct stcp_counter
CID = struct.Struct("!Q")                # CIDs are stored as their wire bytes
FILTER_WORD = struct.Struct("=Q")        # one word of stcp_cid_filter: 8 one-byte slot counts
_KEY0 = struct.pack("=I", 0)


def cid_filter_slot(cid: int) -> int:
    """cid_slot() of bpf/stcp_xdp.c: the prefilter slot of a CID."""
    raw = FILTER_WORD.unpack(CID.pack(cid))[0]          # the u64 the program loads from the packet
    return int(((raw & 0xFFFFFFFF) ^ (raw >> 32)) & (CID_FILTER_SLOTS - 1))


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
def require_privileges(what: str, datapath: str = "xdp") -> None:
    """XdpSetupError (one line naming the missing capabilities) unless this process may do
    `what`: the capabilities of stcp.privileges.REQUIRED[datapath], root or not."""
    require_capabilities(datapath, what, XdpSetupError)


def mounted_fstype(path: str) -> Optional[str]:
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
    if mounted_fstype(root) == "bpf":
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


def check_toolchain() -> None:
    """bcc importable and kernel headers where bcc looks for them."""
    import_bcc()
    release = os.uname().release
    mods = Path("/lib/modules") / release
    if not (mods / "build" / "include").is_dir() or not (mods / "source" / "include" / "linux").is_dir():
        raise XdpSetupError(f"kernel headers for bcc not found under {mods}/build and {mods}/source; "
                            "run 'sudo make system-deps' (installs linux-headers-amd64 and links them)")


def validate_limits(port: int, mode: str, max_record_len: int, hs_rate: int, hs_burst: int,
                    hs_prefix4: int = DEFAULT_HS_PREFIX4, hs_prefix6: int = DEFAULT_HS_PREFIX6,
                    hs_global_rate: int = DEFAULT_HS_GLOBAL_RATE, hs_global_burst: int = DEFAULT_HS_GLOBAL_BURST,
                    ck_rate: int = DEFAULT_CK_RATE, ck_burst: int = DEFAULT_CK_BURST,
                    uk_rate: int = DEFAULT_UK_RATE, uk_burst: int = DEFAULT_UK_BURST) -> None:
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
    if ck_rate < 0 or ck_burst < 0:
        raise XdpSetupError("cookie reply rate must be >= 0 per second (0: the kernel sends no COOKIE) "
                            "and burst >= 0")
    if uk_rate < 0 or uk_burst < 0:
        raise XdpSetupError("unknown-CID rate must be >= 0 per second (0: drop them all) and burst >= 0")


# --------------------------------------------------------------------------------------
# build
def prog_cflags(max_cids: int = DEFAULT_MAX_CIDS, hs_sources: int = DEFAULT_HS_SOURCES,
                afxdp: bool = False, half_open: int = DEFAULT_HALF_OPEN) -> List[str]:
    """The -D flags of a build, the same for bcc and for clang (xdp_object.py)."""
    flags = [f"-DSTCP_MAX_CIDS={max_cids}", f"-DSTCP_HS_SOURCES={hs_sources}", f"-DSTCP_HALF_OPEN={half_open}"]
    if afxdp:
        flags += ["-DSTCP_AFXDP", f"-DSTCP_XSK_MAX={XSK_MAX}"]
    return flags


def compile_prog(max_cids: int = DEFAULT_MAX_CIDS, hs_sources: int = DEFAULT_HS_SOURCES,
                 afxdp: bool = False, half_open: int = DEFAULT_HALF_OPEN) -> Tuple[Any, Any]:
    """Compile and load (not attach) bpf/stcp_xdp.c: (the bcc BPF object, the loaded
    function; its .fd is the program). afxdp=True builds the variant that redirects good
    records to its stcp_xsks XSKMAP. release_bcc() the BPF object once the program is
    held by an fd of ours (open_prog) or attached."""
    BPF = import_bcc()
    src = bpf_source_dir()
    cflags = [f"-I{src}", *prog_cflags(max_cids, hs_sources, afxdp, half_open)]
    try:
        b = BPF(src_file=str(src / "stcp_xdp.c").encode(), cflags=cflags)
        fn = b.load_func(PROG_NAME.encode(), BPF.XDP)
    except Exception as e:
        raise XdpSetupError(f"compiling/loading {src / 'stcp_xdp.c'} failed ({e}); see the compiler or verifier "
                            "output above; 'sudo make system-deps' installs bcc and the kernel headers") from None
    return b, fn


def release_bcc(b: Any) -> None:
    """Drop bcc's own references (and its atexit hook): the program lives on through ours."""
    import atexit
    try:
        b.cleanup()
    finally:
        atexit.unregister(b.cleanup)


# --------------------------------------------------------------------------------------
# a loaded program and its maps
@dataclass
class ProgHandles:
    """Open fds of one loaded STCP program and its maps."""
    prog_id: int
    prog_fd: int
    maps: Dict[str, int]                  # our short name (MAP_NAMES) -> fd
    map_ids: Dict[str, int] = field(default_factory=dict)
    dispatcher_id: Optional[int] = None   # the libxdp dispatcher running it, None if attached alone

    def close(self) -> None:
        for fd in [self.prog_fd, *self.maps.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.maps = {}
        self.prog_fd = -1


def open_prog(prog_id: int) -> Optional[ProgHandles]:
    """Handles to the program with this id if it is an STCP program, else None."""
    try:
        pfd = bpf.prog_fd_by_id(prog_id)
    except OSError:
        return None
    try:
        info = bpf.prog_info(pfd)
        if info["name"] != PROG_NAME:
            os.close(pfd)
            return None
        by_name = {v: k for k, v in MAP_NAMES.items()}
        maps: Dict[str, int] = {}
        ids: Dict[str, int] = {}
        for mid in info["map_ids"]:
            mfd = bpf.map_fd_by_id(mid)
            short = by_name.get(bpf.map_info(mfd)["name"])
            if short and short not in maps:
                maps[short], ids[short] = mfd, mid
            else:
                os.close(mfd)
        h = ProgHandles(prog_id, pfd, maps, ids)
        if set(maps) != set(MAP_NAMES):
            h.close()
            return None
        return h
    except Exception:
        os.close(pfd)
        raise


def handles_of(b: Any, fn: Any, extra_maps: Tuple[str, ...] = ()) -> ProgHandles:
    """Handles to a program we compiled (compile_prog()): its fd and its maps' fds taken
    from bcc (duplicated, so they outlive release_bcc()), never opened by id, which takes
    CAP_SYS_ADMIN (a server started with CAP_BPF alone cannot). extra_maps: more maps by
    their names in the program ("stcp_xsks" of the afxdp variant), under those names."""
    pfd = os.dup(fn.fd)
    maps: Dict[str, int] = {}
    try:
        for short, name in [*MAP_NAMES.items(), *((n, n) for n in extra_maps)]:
            maps[short] = os.dup(b.get_table(name).get_fd())
    except BaseException:
        ProgHandles(0, pfd, maps).close()
        raise
    return handles_of_fds(pfd, maps)


def handles_of_fds(prog_fd: int, maps: Dict[str, int]) -> ProgHandles:
    """Handles owning these fds of a program we loaded and of its maps (short name -> fd),
    as handles_of() makes them; closes them all if the program is not STCP's."""
    h = ProgHandles(0, prog_fd, maps)
    try:
        info = bpf.prog_info(prog_fd)
        if info["name"] != PROG_NAME:
            raise XdpSetupError(f"the compiled program is {info['name']!r}, not {PROG_NAME}; "
                                "is bpf/ from this version?")
        h.prog_id = info["id"]
        h.map_ids = {short: bpf.map_info(fd)["id"] for short, fd in maps.items()}
    except BaseException:
        h.close()
        raise
    return h


def dispatched_by(dispatcher_ids: List[int]) -> Dict[int, List[int]]:
    """dispatcher (or any freplace target) program id -> ids of the programs it runs."""
    out: Dict[int, List[int]] = {d: [] for d in dispatcher_ids}
    if dispatcher_ids:
        for target, prog in bpf.freplace_links():
            if target in out and prog not in out[target]:
                out[target].append(prog)
    return out


def find_stcp(nl: Netlink, ifindex: int) -> Tuple[Optional[str], Optional[ProgHandles], Dict[str, int]]:
    """(mode, handles) of the STCP program attached to the interface, alone or behind
    libxdp's dispatcher (then handles.dispatcher_id is set), and all XDP state."""
    state = nl.xdp_state(ifindex)
    for mode, pid in state.items():
        h = open_prog(pid)
        if h:
            return mode, h, state
    links = dispatched_by(list(state.values()))
    for mode, pid in state.items():
        for prog_id in links[pid]:
            h = open_prog(prog_id)
            if h:
                h.dispatcher_id = pid
                return mode, h, state
    return None, None, state


def attached_ids(nl: Netlink, ifindex: int) -> List[int]:
    """Ids of every XDP program that runs on the interface: attached ones and, behind a
    dispatcher, the programs it runs."""
    state = nl.xdp_state(ifindex)
    ids = list(state.values())
    for progs in dispatched_by(ids).values():
        ids += progs
    return ids


def prog_name(prog_id: int) -> str:
    """The kernel's name of a program ('?' if it cannot be opened)."""
    try:
        fd = bpf.prog_fd_by_id(prog_id)
    except OSError:
        return "?"
    try:
        return str(bpf.prog_info(fd)["name"])
    finally:
        os.close(fd)


def other_layout(state: Dict[str, int]) -> Optional[Tuple[str, int, Optional[int]]]:
    """(mode, prog id, dispatcher id or None) of an STCP program in state (find_stcp's)
    whose maps open_prog() does not recognise: one built by another stcp version, with
    another map layout (MAP_ABI), which this one can neither hand over nor read."""
    links = dispatched_by(list(state.values()))
    for mode, pid in state.items():
        if prog_name(pid) == PROG_NAME:
            return mode, pid, None
        for prog_id in links[pid]:
            if prog_name(prog_id) == PROG_NAME:
                return mode, prog_id, pid
    return None


def read_config(h: ProgHandles) -> Dict[str, int]:
    raw = bpf.map_lookup(h.maps["config"], _KEY0, CONFIG.size) or bytes(CONFIG.size)
    (abi, port, max_len, rate, burst, nworkers, _cost, _cap, prefix4, prefix6, grate, gburst, _gcost,
     _gcap, ck_rate, ck_burst, _ccost, _ccap, uk_rate, uk_burst, _ucost, _ucap) = CONFIG.unpack(raw)
    return {"abi": abi, "port": port, "max_record_len": max_len, "hs_rate": rate, "hs_burst": burst,
            "nworkers": nworkers, "hs_prefix4": prefix4, "hs_prefix6": prefix6,
            "hs_global_rate": grate, "hs_global_burst": gburst, "ck_rate": ck_rate, "ck_burst": ck_burst,
            "uk_rate": uk_rate, "uk_burst": uk_burst}


def _bucket(rate: int, burst: int) -> Tuple[int, int]:
    """(cost, cap) in ns of a token bucket of rate per second and depth burst; rate 0: (0, 0)."""
    cost = 1_000_000_000 // rate if rate else 0
    return cost, cost * burst


def write_config(h: ProgHandles, port: int, max_record_len: int, hs_rate: int, hs_burst: int,
                 nworkers: int = 0, *, hs_prefix4: int = DEFAULT_HS_PREFIX4, hs_prefix6: int = DEFAULT_HS_PREFIX6,
                 hs_global_rate: int = DEFAULT_HS_GLOBAL_RATE, hs_global_burst: int = DEFAULT_HS_GLOBAL_BURST,
                 ck_rate: int = DEFAULT_CK_RATE, ck_burst: int = DEFAULT_CK_BURST,
                 uk_rate: int = DEFAULT_UK_RATE, uk_burst: int = DEFAULT_UK_BURST) -> None:
    """nworkers: the afxdp variant steers data records by their CID's worker bits over that
    many workers (0: no steering; the plain xdp variant ignores it). Hellos are limited per
    source prefix (hs_rate/hs_burst per /hs_prefix4 of IPv4, /hs_prefix6 of IPv6) and then
    all together (hs_global_rate/hs_global_burst; rate 0: no global budget). With cookie
    keys written (stcp.datapath.xdp_cookie), the program answers hellos past the global
    budget with COOKIEs, ck_rate/ck_burst per source prefix (rate 0: none). uk_rate/uk_burst
    data records naming no known CID are let through, all sources together, for user space
    to answer with a RESET (rate 0: none)."""
    cost, cap = _bucket(hs_rate, hs_burst)
    gcost, gcap = _bucket(hs_global_rate, hs_global_burst)
    ccost, ccap = _bucket(ck_rate, ck_burst)
    ucost, ucap = _bucket(uk_rate, uk_burst)
    value = CONFIG.pack(MAP_ABI, port, max_record_len, hs_rate, hs_burst, nworkers, cost, cap,
                        hs_prefix4, hs_prefix6, hs_global_rate, hs_global_burst, gcost, gcap,
                        ck_rate, ck_burst, ccost, ccap, uk_rate, uk_burst, ucost, ucap)
    bpf.map_update(h.maps["config"], _KEY0, value)


def read_counters_per_cpu(h: ProgHandles) -> Dict[str, List[Tuple[int, int]]]:
    """verdict name -> [(packets, bytes) of each possible CPU]."""
    ncpu = bpf.possible_cpus()
    stride = (COUNTER.size + 7) & ~7
    out: Dict[str, List[Tuple[int, int]]] = {}
    for v in Verdict:
        raw = bpf.map_lookup(h.maps["counters"], struct.pack("=I", int(v)), stride * ncpu)
        out[v.key] = ([COUNTER.unpack_from(raw, cpu * stride) for cpu in range(ncpu)]
                      if raw else [(0, 0)] * ncpu)
    return out


def read_counters(h: ProgHandles) -> Dict[str, Tuple[int, int]]:
    """verdict name ('pass_data', 'drop_unknown_cid', ...) -> (packets, bytes), all CPUs."""
    return {k: (sum(p for p, _ in cpus), sum(b for _, b in cpus))
            for k, cpus in read_counters_per_cpu(h).items()}


def count_cids(h: ProgHandles, table: str = "cids") -> int:
    """Entries in the live-connection-ID table (table="half_open": the half-open one)."""
    fd = h.maps[table]
    return sum(1 for _ in bpf.map_keys(fd, 8, bpf.map_info(fd)["max_entries"] * 4))


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


def pin_prog(h: ProgHandles, path: str) -> None:
    """Pin the program (path/prog) and each of its maps (path/<short name>)."""
    os.makedirs(path, exist_ok=True)
    bpf.pin(h.prog_fd, f"{path}/prog")
    for short, fd in h.maps.items():
        bpf.pin(fd, f"{path}/{short}")


def pinned_prog_id(path: str) -> Optional[int]:
    """The id of the program pinned at path/prog, None if nothing (readable) is pinned there."""
    try:
        fd = bpf.obj_get(f"{path}/prog")
    except OSError:
        return None
    try:
        return int(bpf.prog_info(fd)["id"])
    finally:
        os.close(fd)


def remove_pins(path: str) -> bool:
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
