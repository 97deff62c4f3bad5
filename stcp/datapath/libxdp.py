"""libxdp through ctypes: attach an XDP object file to an interface the way xdp-loader
does, and detach one program from it.

libxdp puts the program behind its dispatcher (one XDP program on the interface that
calls each attached program in priority order while they return XDP_PASS), so STCP runs
beside other programs loaded through libxdp (xdp-loader, xdp-filter, ...). When the kernel
cannot run the dispatcher (it needs freplace programs, BPF_PROG_TYPE_EXT) libxdp falls
back to attaching the one program directly, as xdp-loader does; attach() says which
happened. libxdp keeps a dispatcher's state pinned under /sys/fs/bpf/xdp/.

libxdp and libbpf report errors through a print callback: while a call runs, their
messages are collected (not printed) and the last warning is named in the one-line
XdpSetupError. Calls run in a thread that has entered the network namespace (setns(2)
moves only the calling thread), so `--netns NS` works as it does for netlink.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, TypeVar

from .errors import XdpAlreadyAttached, XdpSetupError
from .netlink import in_thread

MODES = {"native": 1, "generic": 2}          # enum xdp_attach_mode: XDP_MODE_NATIVE, XDP_MODE_SKB
MODE_UNSPEC = 0
DEFAULT_PRIORITY = 50                        # XDP_DEFAULT_RUN_PRIO, xdp-loader's default
CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_lock = threading.Lock()
_libs: Optional[Tuple[ctypes.CDLL, ctypes.CDLL, ctypes.CDLL]] = None
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


def libraries() -> Tuple[ctypes.CDLL, ctypes.CDLL, ctypes.CDLL]:
    """(libxdp, libbpf, libc) with the signatures used here declared; XdpSetupError if
    libxdp is missing."""
    global _libs
    with _lock:
        if _libs is None:
            try:
                xdp = ctypes.CDLL(ctypes.util.find_library("xdp") or "libxdp.so.1", use_errno=True)
            except OSError as e:
                raise XdpSetupError(f"libxdp not loadable ({e}); run 'sudo make system-deps' (libxdp-dev)") from None
            bpf = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
            libc = ctypes.CDLL(None, use_errno=True)
            vp, cp, i, u = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint
            for lib, name, res, args in [
                (xdp, "xdp_program__open_file", vp, [cp, cp, vp]),
                (xdp, "xdp_program__from_id", vp, [ctypes.c_uint32]),
                (xdp, "xdp_program__close", None, [vp]),
                (xdp, "xdp_program__bpf_obj", vp, [vp]),
                (xdp, "xdp_program__set_run_prio", i, [vp, u]),
                (xdp, "xdp_program__attach", i, [vp, i, i, u]),
                (xdp, "xdp_program__detach", i, [vp, i, i, u]),
                (xdp, "xdp_program__id", ctypes.c_uint32, [vp]),
                (xdp, "xdp_multiprog__get_from_ifindex", vp, [i]),
                (xdp, "xdp_multiprog__is_legacy", ctypes.c_bool, [vp]),
                (xdp, "xdp_multiprog__close", None, [vp]),
                (xdp, "libxdp_get_error", ctypes.c_long, [vp]),
                (xdp, "libxdp_set_print", vp, [vp]),
                (bpf, "libbpf_set_print", vp, [vp]),
                (bpf, "bpf_object__find_map_by_name", vp, [vp, cp]),
                (bpf, "bpf_object__open_file", vp, [cp, vp]),
                (bpf, "bpf_object__close", None, [vp]),
                (bpf, "bpf_object__next_map", vp, [vp, vp]),
                (bpf, "bpf_map__name", cp, [vp]),
                (bpf, "bpf_map__type", i, [vp]),
                (bpf, "bpf_map__key_size", ctypes.c_uint32, [vp]),
                (bpf, "bpf_map__value_size", ctypes.c_uint32, [vp]),
                (bpf, "bpf_map__max_entries", ctypes.c_uint32, [vp]),
                (bpf, "bpf_map__map_flags", ctypes.c_uint32, [vp]),
                (bpf, "bpf_object__load", i, [vp]),
                (bpf, "bpf_object__find_program_by_name", vp, [vp, cp]),
                (bpf, "bpf_program__fd", i, [vp]),
                (bpf, "bpf_map__fd", i, [vp]),
                (bpf, "bpf_program__set_type", i, [vp, i]),
                (bpf, "bpf_program__set_expected_attach_type", i, [vp, i]),
                (bpf, "bpf_program__set_attach_target", i, [vp, i, cp]),
                (bpf, "bpf_map__reuse_fd", i, [vp, i]),
                (libc, "setns", i, [i, i]),
                (libc, "vsnprintf", i, [cp, ctypes.c_size_t, cp, vp]),
            ]:
                f = getattr(lib, name)
                f.restype, f.argtypes = res, args
            _libs = (xdp, bpf, libc)
        return _libs


def available() -> Optional[str]:
    """None if libxdp can be used, else why not (one line)."""
    try:
        libraries()
    except XdpSetupError as e:
        return str(e)
    return None


class _Messages:
    """libxdp's and libbpf's log lines while installed (a with block), not printed."""

    def __init__(self) -> None:
        self.lines: List[Tuple[int, str]] = []
        _xdp, _bpf, libc = libraries()
        # va_list is a pointer on x86-64; elsewhere keep the format string alone
        can_format = platform.machine() in ("x86_64", "AMD64")

        def collect(level: int, fmt: bytes, ap: int) -> int:
            if can_format:
                buf = ctypes.create_string_buffer(1024)
                libc.vsnprintf(buf, len(buf), fmt, ap)
                text = buf.value.decode(errors="replace")
            else:
                text = fmt.decode(errors="replace")
            self.lines.append((level, text.strip()))
            return 0

        self._fn = _PRINT_FN(collect)         # kept alive while installed

    def __enter__(self) -> "_Messages":
        xdp, bpf, _ = libraries()
        self._old = (xdp.libxdp_set_print(ctypes.cast(self._fn, ctypes.c_void_p)),
                     bpf.libbpf_set_print(ctypes.cast(self._fn, ctypes.c_void_p)))
        return self

    def __exit__(self, *exc: object) -> None:
        xdp, bpf, _ = libraries()
        xdp.libxdp_set_print(self._old[0])
        bpf.libbpf_set_print(self._old[1])

    def reason(self) -> str:
        """The last warning (level 0), else the last line, else '' (without the library's
        "libxdp: " / "libbpf: " prefix)."""
        warns = [t for lvl, t in self.lines if lvl == 0 and t]
        lines = warns or [t for _lvl, t in self.lines if t]
        last = lines[-1] if lines else ""
        for prefix in ("libxdp: ", "libbpf: "):
            last = last.removeprefix(prefix)
        return last

    def said(self, text: str) -> bool:
        return any(text in t for _lvl, t in self.lines)


def _open_object(bpf: ctypes.CDLL, msgs: _Messages, obj_path: str) -> int:
    """libbpf's bpf_object for obj_path (the caller closes it), or XdpSetupError with libbpf's reason."""
    obj = bpf.bpf_object__open_file(obj_path.encode(), None)
    if not obj or _err(obj):
        raise XdpSetupError(f"libbpf cannot open {obj_path}: {msgs.reason()}")
    return obj


def object_maps(obj_path: str) -> Dict[str, Tuple[int, int, int, int, int]]:
    """map name -> (type, key size, value size, max entries, flags) as the object file declares
    them, without loading anything."""
    _xdp, bpf, _ = libraries()
    with _Messages() as msgs:
        obj = _open_object(bpf, msgs, obj_path)
    try:
        out = {}
        m = bpf.bpf_object__next_map(obj, None)
        while m:
            out[bpf.bpf_map__name(m).decode()] = (bpf.bpf_map__type(m), bpf.bpf_map__key_size(m),
                                                  bpf.bpf_map__value_size(m), bpf.bpf_map__max_entries(m),
                                                  bpf.bpf_map__map_flags(m))
            m = bpf.bpf_object__next_map(obj, m)
        return out
    finally:
        bpf.bpf_object__close(obj)


def load(obj_path: str, prog_name: str, map_names: Iterable[str]) -> Tuple[int, Dict[str, int]]:
    """Load the object's program and maps with libbpf, attaching nothing: (the program's
    fd, map name -> fd), descriptors of the caller's that outlive the object (closed here)."""
    _xdp, bpf, _ = libraries()
    with _Messages() as msgs:
        obj = _open_object(bpf, msgs, obj_path)
        fds: List[int] = []
        try:
            rc = bpf.bpf_object__load(obj)
            if rc < 0:
                raise XdpSetupError(f"loading {obj_path} failed ({os.strerror(-rc)}): {msgs.reason()}")
            prog = bpf.bpf_object__find_program_by_name(obj, prog_name.encode())
            if not prog:
                raise XdpSetupError(f"{obj_path} has no program {prog_name}; is bpf/ from this version?")
            fds.append(os.dup(bpf.bpf_program__fd(prog)))
            maps = {}
            for name in map_names:
                m = bpf.bpf_object__find_map_by_name(obj, name.encode())
                if not m:
                    raise XdpSetupError(f"{obj_path} has no map {name}; is bpf/ from this version?")
                fds.append(os.dup(bpf.bpf_map__fd(m)))
                maps[name] = fds[-1]
            return fds[0], maps
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            bpf.bpf_object__close(obj)


def freplace_refused(obj_path: str, prog_name: str) -> Optional[str]:
    """None if this kernel loads freplace programs (BPF_PROG_TYPE_EXT), which libxdp's
    dispatcher is made of; else the kernel's answer. Loads the object's program twice, as
    XDP and as its own replacement, and attaches neither. Needs root."""
    _xdp, bpf, _ = libraries()
    objs = []
    try:
        with _Messages() as msgs:
            for as_ext in (False, True):
                obj = bpf.bpf_object__open_file(obj_path.encode(), None)
                if not obj or _err(obj):
                    return f"cannot open {obj_path}: {msgs.reason()}"
                objs.append(obj)
                prog = bpf.bpf_object__find_program_by_name(obj, prog_name.encode())
                if as_ext:
                    target = bpf.bpf_program__fd(bpf.bpf_object__find_program_by_name(objs[0], prog_name.encode()))
                    bpf.bpf_program__set_type(prog, 28)               # BPF_PROG_TYPE_EXT
                    bpf.bpf_program__set_expected_attach_type(prog, 0)
                    bpf.bpf_program__set_attach_target(prog, target, prog_name.encode())
                rc = bpf.bpf_object__load(obj)
                if rc < 0:
                    what = "an freplace program" if as_ext else "the XDP program"
                    return f"loading {what} failed: {os.strerror(-rc)}"
        return None
    finally:
        for obj in objs:
            bpf.bpf_object__close(obj)


def in_netns(netns: Optional[str], fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a helper thread inside network namespace netns (this one if None)."""

    def run() -> T:
        if netns is not None:
            _xdp, _bpf, libc = libraries()
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise XdpSetupError(f"cannot enter network namespace '{netns}' ({os.strerror(e)})")
            finally:
                os.close(fd)
        return fn(*args)

    return in_thread("stcp-libxdp", run)


def _err(ptr: Optional[int]) -> int:
    """The errno of a libxdp pointer result: 0 for a valid object."""
    xdp, _bpf, _ = libraries()
    e = -int(xdp.libxdp_get_error(ptr))
    return e if e > 0 else (errno.EINVAL if not ptr else 0)


def attach(obj_path: str, ifindex: int, iface: str, mode: str, *, reuse: Optional[Dict[str, int]] = None,
           priority: int = DEFAULT_PRIORITY, netns: Optional[str] = None) -> Tuple[int, str, bool]:
    """Attach the "xdp" program of obj_path to the interface through libxdp; its maps
    named in `reuse` are the given map fds instead of new ones. mode: native, generic or
    auto (native, else generic). Returns (prog id, mode attached, True if it runs behind
    libxdp's dispatcher, False if libxdp attached it alone)."""
    return in_netns(netns, _attach, obj_path, ifindex, iface, mode, reuse or {}, priority)


def _attach(obj_path: str, ifindex: int, iface: str, mode: str, reuse: Dict[str, int],
            priority: int) -> Tuple[int, str, bool]:
    xdp, bpf, _ = libraries()
    tries = ["native", "generic"] if mode == "auto" else [mode]
    errors = []
    for m in tries:
        with _Messages() as msgs:
            prog = xdp.xdp_program__open_file(obj_path.encode(), b"xdp", None)
            if _err(prog):
                raise XdpSetupError(f"libxdp cannot open {obj_path}: {msgs.reason() or os.strerror(_err(prog))}")
            try:
                obj = xdp.xdp_program__bpf_obj(prog)
                for name, fd in reuse.items():
                    mp = bpf.bpf_object__find_map_by_name(obj, name.encode())
                    if not mp:
                        raise XdpSetupError(f"the new XDP program has no map {name} to carry over")
                    rc = bpf.bpf_map__reuse_fd(mp, fd)
                    if rc < 0:
                        raise XdpSetupError(f"map {name} of the program on {iface} cannot be carried over "
                                            f"({os.strerror(-rc)}): its size or layout differs")
                xdp.xdp_program__set_run_prio(prog, priority)
                rc = xdp.xdp_program__attach(prog, ifindex, MODES[m], 0)
                if rc == 0:
                    prog_id = int(xdp.xdp_program__id(prog))
                    return prog_id, m, not _is_legacy(ifindex)
            finally:
                xdp.xdp_program__close(prog)
        why = msgs.reason() or os.strerror(-rc)
        if -rc in (errno.EEXIST, errno.EBUSY) or msgs.said("not using a dispatcher"):
            raise XdpAlreadyAttached(f"{iface} already has an XDP program that libxdp cannot run beside STCP "
                                     f"({why}); use --force to replace it, or remove it first")
        errors.append(f"{m}: {why}")
    raise XdpSetupError(f"attaching XDP to {iface} failed ({'; '.join(errors)})"
                        + ("; try --mode generic" if mode == "native" else ""))


def _is_legacy(ifindex: int) -> bool:
    xdp, _bpf, _ = libraries()
    with _Messages():
        mp = xdp.xdp_multiprog__get_from_ifindex(ifindex)
        if _err(mp):
            return True
        try:
            return bool(xdp.xdp_multiprog__is_legacy(mp))
        finally:
            xdp.xdp_multiprog__close(mp)


def detach(ifindex: int, iface: str, prog_id: int, mode: Optional[str], netns: Optional[str] = None) -> None:
    """Detach the program with this id, attached in mode (native, generic), from the
    interface: from libxdp's dispatcher (the other programs keep running) or, attached
    alone, from the interface."""
    in_netns(netns, _detach, ifindex, iface, prog_id, MODES.get(mode or "", MODE_UNSPEC))


def _detach(ifindex: int, iface: str, prog_id: int, mode: int) -> None:
    xdp, _bpf, _ = libraries()
    with _Messages() as msgs:
        prog = xdp.xdp_program__from_id(prog_id)
        if _err(prog):
            raise XdpSetupError(f"cannot open XDP program id {prog_id}: {msgs.reason() or os.strerror(_err(prog))}")
        try:
            rc = xdp.xdp_program__detach(prog, ifindex, mode, 0)
        finally:
            xdp.xdp_program__close(prog)
    if rc != 0:
        raise XdpSetupError(f"detaching XDP program id {prog_id} from {iface} failed: "
                            f"{msgs.reason() or os.strerror(-rc)}")
