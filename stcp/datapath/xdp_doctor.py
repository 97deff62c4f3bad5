"""`stcp-loader doctor`: what the kernel datapath needs on this machine, what is there, and
what to do about what is not.

`attach` needs privileges, libbpf, and one way to build the program: clang with libxdp
(the program can then run beside other XDP programs, through libxdp's dispatcher, where
the kernel can run that) or bcc with kernel headers (the program runs alone). A wheel
installed in a virtual environment finds Debian's bcc by itself (bcc_import.py); doctor
says where it found it.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
from typing import List, Tuple

OK, MISSING, NOTE = "ok", "missing", "note"
Check = Tuple[str, str, str]          # (state, what, detail / what to do)
_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _privileges() -> Check:
    caps = _effective_caps()
    have = [n for n, bit in _CAPS.items() if caps >> bit & 1]
    if os.geteuid() == 0:
        return OK, "privileges", "root (" + ", ".join(have) + ")"
    return MISSING, "privileges", "not root: attaching XDP and reading BPF maps needs root (sudo stcp-loader ...)"


def _clang() -> Check:
    from .xdp_object import find_clang
    clang = find_clang()
    if clang is None:
        return MISSING, "clang", "not found: 'sudo make system-deps' installs it (or set STCP_CLANG)"
    r = subprocess.run([clang, "--version"], capture_output=True, text=True)
    return OK, "clang", f"{clang}: {(r.stdout.splitlines() or ['?'])[0]}"


def checks() -> List[Check]:
    from . import bpf, libxdp
    from .bcc_import import bcc_origin
    from .errors import XdpSetupError
    from .xdp_attach import libxdp_unavailable
    from .xdp_prog import BPFFS, check_toolchain, mounted_fstype

    out: List[Check] = [_privileges()]
    out.append((OK, "bpffs", f"mounted at {BPFFS}") if mounted_fstype(BPFFS) == "bpf" else
               (NOTE, "bpffs", f"not mounted at {BPFFS}; attach mounts it"))
    try:
        bpf.libbpf()
        out.append((OK, "libbpf", "loadable"))
    except XdpSetupError as e:
        out.append((MISSING, "libbpf", str(e)))
    out.append(_clang())
    why = libxdp.available()
    out.append((OK, "libxdp", "loadable") if why is None else (MISSING, "libxdp", why))
    origin = bcc_origin()
    out.append((MISSING, "bcc", origin.removeprefix("missing: ")) if origin.startswith("missing") else
               (OK, "bcc", f"{origin}" + ("" if origin.startswith(sys.prefix) else " (the distribution's)")))
    try:
        check_toolchain()
        out.append((OK, "kernel headers", f"for bcc, under /lib/modules/{os.uname().release}"))
    except XdpSetupError as e:
        out.append((MISSING, "kernel headers", str(e)))
    loader_why = libxdp_unavailable()
    bcc_ok = all(s == OK for s, what, _ in out if what in ("bcc", "kernel headers"))
    if loader_why is None:
        out.append((OK, "attach", "builds the program with clang and attaches it through libxdp"))
        out.append(_dispatcher())
    elif bcc_ok:
        out.append((NOTE, "attach", f"builds the program with bcc and attaches it alone ({loader_why}); "
                                    "clang and libxdp let it run beside other XDP programs"))
    else:
        out.append((MISSING, "attach", f"no way to build the program: clang+libxdp ({loader_why}) or bcc "
                                       "with kernel headers; run 'sudo make system-deps'"))
    try:
        importlib.import_module("stcp._xsk")
        out.append((OK, "AF_XDP", "stcp._xsk built (--datapath afxdp)"))
    except ImportError:
        out.append((NOTE, "AF_XDP", "stcp._xsk not built (libxdp-dev at install time): --datapath afxdp unavailable"))
    return out


def _dispatcher() -> Check:
    """Whether the kernel runs libxdp's dispatcher (it loads freplace programs)."""
    from . import libxdp
    from .errors import XdpSetupError
    from .xdp_object import build_object
    from .xdp_prog import PROG_NAME

    if os.geteuid() != 0:
        return NOTE, "dispatcher", "not checked (needs root)"
    with tempfile.TemporaryDirectory(prefix="stcp-doctor-") as d:
        try:
            why = libxdp.freplace_refused(build_object(d), PROG_NAME)
        except XdpSetupError as e:
            return MISSING, "dispatcher", str(e)
    if why is None:
        return OK, "dispatcher", "the kernel runs libxdp's dispatcher: STCP can share an interface"
    return NOTE, "dispatcher", (f"this kernel refuses freplace programs ({why}): libxdp attaches one program per "
                                "interface, so STCP cannot share one with another XDP program (xdp-loader falls "
                                "back the same way)")


def run_doctor(version: str) -> int:
    """Print every check under a header naming `version` (the package's; the datapath layer
    does not import the package root); 0 if attach can work."""
    rows = checks()
    print(f"stcp-loader doctor (stcp {version}, Python {sys.version.split()[0]}, kernel {os.uname().release})")
    for state, what, detail in rows:
        print(f"  {state:<8} {what}: {detail}")
    ok = all(s != MISSING for s, what, _ in rows if what in ("privileges", "libbpf", "attach"))
    print("attach can work" if ok else "attach cannot work: fix the lines marked missing above")
    return 0 if ok else 1
