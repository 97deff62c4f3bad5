"""Privileges: what the kernel datapaths need to start, and giving all of it up once started.

The XDP and AF_XDP datapaths need capabilities to set up (require_capabilities names them)
and none to run: once the program is attached and its maps, the AF_XDP sockets and the
UDP socket are open, everything the server does goes through file descriptors it holds
(map updates for the live-CID table, the rings, the exporter's reads), and detaching is
closing the BPF link (stcp.datapath.xdp). So stcp.server.serve() then calls
drop_privileges(user): the process becomes `user` (default DEFAULT_USER, else nobody) with
no supplementary groups, every capability set empty (effective, permitted, inheritable,
ambient and, where CAP_SETPCAP allows, the bounding set), PR_SET_NO_NEW_PRIVS set (no
execve can give any back), and no core dumps (RLIMIT_CORE 0 and PR_SET_DUMPABLE 0: a
dump or a ptrace attach would expose the record keys and the server's static key).
suppress_core_dumps() alone runs on every datapath.

Capabilities are per thread, so drop_privileges() must run while the process has one
thread; serve() calls it before it starts any (the exporters'). It checks the result in
/proc/self/status and raises PrivilegeError if anything is left.

Linux only; ctypes on libc's prctl/capget/capset (no library dependency).
"""
from __future__ import annotations

import ctypes
import os
import pwd
import resource
import threading
import time
from typing import Dict, FrozenSet, List, Optional, Type

from .errors import STCPError

DEFAULT_USER = "stcp"             # used when such an account exists; else FALLBACK_USER
FALLBACK_USER = "nobody"

# linux/capability.h
CAP_NAMES: Dict[int, str] = {0: "CAP_CHOWN", 1: "CAP_DAC_OVERRIDE", 5: "CAP_KILL", 6: "CAP_SETGID",
                             7: "CAP_SETUID", 8: "CAP_SETPCAP", 12: "CAP_NET_ADMIN", 13: "CAP_NET_RAW",
                             14: "CAP_IPC_LOCK", 21: "CAP_SYS_ADMIN", 24: "CAP_SYS_RESOURCE",
                             38: "CAP_PERFMON", 39: "CAP_BPF"}
CAP = {name: num for num, name in CAP_NAMES.items()}
_CAPABILITY_VERSION_3 = 0x20080522

# linux/prctl.h
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# What each kernel datapath needs to start (tests/test_privileges.py runs `stcp serve`
# with exactly these and no root). CAP_BPF loads the program and creates its maps;
# CAP_PERFMON lets the verifier accept its packet-pointer arithmetic (a cursor moved by a
# header length read from the packet), which it refuses to a loader without it;
# CAP_NET_ADMIN attaches it. No CAP_SYS_ADMIN: bpffs is mounted (and pins made) only where
# that is allowed. AF_XDP sockets need CAP_NET_RAW, and their UMEM (32 MiB a queue) is
# locked memory beyond the usual RLIMIT_MEMLOCK without CAP_IPC_LOCK.
REQUIRED: Dict[str, FrozenSet[str]] = {
    "socket": frozenset(),
    "xdp": frozenset({"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"}),
    "afxdp": frozenset({"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_NET_RAW", "CAP_IPC_LOCK"}),
}


class PrivilegeError(STCPError):
    """Capabilities missing, or they could not be given up; one line."""


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    rc = _libc.prctl(option, arg2, arg3, 0, 0)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"prctl({option}): {os.strerror(e)}")
    return rc


def effective_capabilities() -> FrozenSet[str]:
    """The names (CAP_NAMES) of the capabilities this thread has in effect."""
    hdr, data = _Header(_CAPABILITY_VERSION_3, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capget: {os.strerror(e)}")
    bits = data[0].effective | (data[1].effective << 32)
    return frozenset(name for num, name in CAP_NAMES.items() if bits >> num & 1)


def missing_capabilities(datapath: str) -> FrozenSet[str]:
    return REQUIRED.get(datapath, frozenset()) - effective_capabilities()


def require_capabilities(datapath: str, what: str, error: Type[Exception] = PrivilegeError) -> None:
    """`error` (PrivilegeError), one line, unless this process has what `datapath` needs to start."""
    missing = missing_capabilities(datapath)
    if missing:
        need = " + ".join(sorted(REQUIRED[datapath]))
        raise error(f"{what} needs {need} (missing {', '.join(sorted(missing))}); run it as root "
                             f"(it drops to an unprivileged user once set up) or give the service those "
                             f"capabilities (systemd: AmbientCapabilities={' '.join(sorted(REQUIRED[datapath]))})")


def default_user() -> str:
    """DEFAULT_USER if the account exists, else FALLBACK_USER."""
    try:
        pwd.getpwnam(DEFAULT_USER)
        return DEFAULT_USER
    except KeyError:
        return FALLBACK_USER


def account(user: Optional[str] = None) -> pwd.struct_passwd:
    """The account to drop to: `user`, else default_user() where this process may change
    its user (CAP_SETUID), else its own (a service already started as its user with
    ambient capabilities keeps that user and loses the capabilities)."""
    name = user
    if name is None:
        name = default_user() if "CAP_SETUID" in effective_capabilities() else pwd.getpwuid(os.getuid()).pw_name
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"no user {name!r} to run as; create it (useradd --system {name}) or pick "
                             "another with --user") from None


def suppress_core_dumps() -> None:
    """No core file and no ptrace attach by the same user: key material stays in the process."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(PR_SET_DUMPABLE, 0)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def status() -> Dict[str, str]:
    """/proc/self/status as a dict (Uid, Gid, Groups, CapEff, CapPrm, CapInh, CapAmb,
    CapBnd, NoNewPrivs, ...)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def _alone_soon(timeout: float = 2.0) -> bool:
    """True once this is the process's only thread, waiting up to timeout: a Python thread
    that was joined (the netlink helper of off_loop) can still be leaving the kernel's
    task list for a moment after join() returned."""
    deadline = time.monotonic() + timeout
    while len(os.listdir("/proc/self/task")) > 1:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _thread_names() -> List[str]:
    """The process's other threads: threading's by name, a C library's by the kernel's."""
    me = threading.current_thread()
    names = [t.name for t in threading.enumerate() if t is not me]
    known = {t.native_id for t in threading.enumerate()}
    for tid in sorted(os.listdir("/proc/self/task")):
        if int(tid) not in known:
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    names.append(f"{f.read().strip()} (tid {tid})")
            except OSError:
                pass                      # it ended meanwhile
    return names


def drop_privileges(user: Optional[str] = None) -> pwd.struct_passwd:
    """Become `user` (None: account(None)) with no capabilities, no way back and no core
    dumps; returns the account. PrivilegeError if the process has threads besides this
    one, the user does not exist, switching to it is not allowed, or anything is left."""
    pw = account(user)
    name = pw.pw_name
    if threading.active_count() > 1 or not _alone_soon():
        raise PrivilegeError("dropping privileges with other threads running would leave them privileged "
                             f"({', '.join(_thread_names())}); drop before starting them")
    suppress_core_dumps()
    # What the process will import later must be importable now: as `user` it may not read
    # the interpreter's own library (a Python under /root). socket.getaddrinfo loads the
    # idna codec on its first call, which the metrics exporter makes after the drop.
    import encodings.idna  # noqa: F401
    try:
        # the bounding set while CAP_SETPCAP, which dropping from it takes, is still in effect
        if "CAP_SETPCAP" in effective_capabilities():
            for cap in range(_last_cap() + 1):
                if _libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) == 1:
                    _prctl(PR_CAPBSET_DROP, cap)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        # staying ourselves (a service started as its user) without CAP_SETGID, we keep our
        # groups and gid: they are ours anyway, and changing them would take that capability
        regroup = set(os.getresuid()) != {pw.pw_uid} or "CAP_SETGID" in effective_capabilities()
        if regroup:
            if os.getgroups():
                os.setgroups([])
            os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
        hdr, data = _Header(_CAPABILITY_VERSION_3, 0), (_Data * 2)()
        if _libc.capset(ctypes.byref(hdr), data) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"capset: {os.strerror(e)}")
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_DUMPABLE, 0)        # a change of uid resets it to the sysctl's value
    except PermissionError as e:
        raise PrivilegeError(f"cannot switch to user {name!r} ({e.strerror}): that needs CAP_SETUID and "
                             f"CAP_SETGID, or start as {name!r} already") from None
    except OSError as e:
        raise PrivilegeError(f"dropping privileges failed: {e}") from None
    _check(pw, regroup)
    return pw


def _check(pw: pwd.struct_passwd, regrouped: bool) -> None:
    st = status()
    wrong = [f"{k} {st[k]}" for k in ("CapEff", "CapPrm", "CapInh", "CapAmb") if k in st and int(st[k], 16)]
    ids = [("Uid", pw.pw_uid)] + ([("Gid", pw.pw_gid)] if regrouped else [])
    wrong += [f"{k} {st[k]}" for k, v in ids if set(st[k].split()) != {str(v)}]
    if regrouped and st.get("Groups"):
        wrong.append(f"Groups {st['Groups']}")
    if st.get("NoNewPrivs") != "1":
        wrong.append(f"NoNewPrivs {st.get('NoNewPrivs')}")
    if wrong:
        raise PrivilegeError("privileges still held after dropping them: " + ", ".join(wrong))
