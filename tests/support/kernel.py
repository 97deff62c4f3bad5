"""What the privileged tests need, each as a check that returns None when it is there and
otherwise the reason it is not (tests/conftest.py turns the markers into skips with these
reasons; bench/ asks the same questions). Each answer is computed once per process."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from typing import Optional

from tests.support.netns import have_root_netns


@functools.lru_cache(maxsize=None)
def root_unavailable() -> Optional[str]:
    return None if os.geteuid() == 0 else "needs root"


@functools.lru_cache(maxsize=None)
def netns_unavailable() -> Optional[str]:
    """Network namespaces and veth pairs can be made here (root and iproute2's ip)."""
    return have_root_netns()


@functools.lru_cache(maxsize=None)
def xdp_unavailable() -> Optional[str]:
    """The XDP program can be built and attached: namespaces, bcc with kernel headers, a
    bpffs (mounted if missing, as systemd would) and libbpf."""
    why = netns_unavailable()
    if why:
        return why
    try:
        from stcp.datapath import bpf, xdp_prog
        xdp_prog.check_toolchain()
        xdp_prog.ensure_bpffs()
        bpf.libbpf()
    except Exception as e:  # XdpSetupError with the reason
        return f"XDP toolchain unavailable: {e}"
    return None


@functools.lru_cache(maxsize=None)
def dispatcher_unavailable() -> Optional[str]:
    """libxdp's dispatcher can run several XDP programs on one interface here: the XDP
    toolchain, clang, libxdp, xdp-loader, and a kernel that loads freplace programs."""
    why = xdp_unavailable()
    if why:
        return why
    import tempfile

    from stcp.datapath import libxdp
    from stcp.datapath.xdp import libxdp_unavailable
    from stcp.datapath.xdp_object import build_object
    from stcp.datapath.xdp_prog import PROG_NAME
    why = libxdp_unavailable()
    if why:
        return f"the clang build through libxdp is unavailable: {why}"
    if shutil.which("xdp-loader") is None:
        return "needs xdp-loader (Debian package xdp-tools; scripts/system-deps.sh installs it)"
    with tempfile.TemporaryDirectory(prefix="stcp-probe-") as d:
        why = libxdp.freplace_refused(build_object(d), PROG_NAME)
    if why:
        return (f"this kernel refuses freplace programs (BPF_PROG_TYPE_EXT: {why}), which libxdp's dispatcher is "
                "made of: libxdp and xdp-loader attach one program per interface here")
    return None


@functools.lru_cache(maxsize=None)
def xsk_unavailable() -> Optional[str]:
    """The stcp._xsk extension (AF_XDP sockets, frame parsing) was built."""
    try:
        import stcp._xsk  # noqa: F401
    except ImportError:
        return "stcp._xsk not built (needs libxdp-dev, libbpf-dev: 'sudo make system-deps' then 'pip install -e .')"
    return None


def afxdp_unavailable() -> Optional[str]:
    """The AF_XDP datapath can run: the XDP toolchain and stcp._xsk."""
    return xdp_unavailable() or xsk_unavailable()


@functools.lru_cache(maxsize=None)
def unshare_unavailable() -> Optional[str]:
    """A private mount namespace can be made (unshare -m), for the fresh-machine tests."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace (unshare -m)"
    if shutil.which("unshare") is None or shutil.which("make") is None:
        return "needs util-linux's unshare and make"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -m is not permitted here: {probe.stderr.strip()}"
    return None
