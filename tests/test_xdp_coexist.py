"""STCP's XDP program beside another one on the same interface, as an operator running a
DDoS filter or a monitoring program with xdp-loader would have it.

tests/bpf/xdp_icmp_count.c (counts ICMP, passes everything) is loaded with xdp-loader
first. Where the kernel runs libxdp's dispatcher, `stcp-loader attach` joins it: both
programs show in `xdp-loader status`, ping and an STCP transfer both work, each program
counts its traffic, and `stcp-loader detach` leaves the other program running. Where it
cannot (the kernel refuses freplace programs; xdp-loader then attaches the first program
alone), `stcp-loader attach` refuses in one line and leaves the other program alone.
An STCP program of another map layout (tests/bpf/stcp_xdp_other_layout.c, as an older
stcp's) is refused even with --force until it is detached.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import kernel
from tests.support.procs import STCP, loader, pinned, session_key, stop, wait_for_stderr_line, xdp_status

PORT = 4563
SOURCE = Path(__file__).resolve().parent / "bpf" / "xdp_icmp_count.c"
OTHER_LAYOUT = Path(__file__).resolve().parent / "bpf" / "stcp_xdp_other_layout.c"


def xdp_loader(ns: str, *args: str) -> subprocess.CompletedProcess:
    # nsenter --net keeps the host's bpffs, where libxdp pins its dispatcher's state
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "xdp-loader", *args],
                          capture_output=True, text=True, timeout=60)


def icmp_count() -> int:
    r = subprocess.run(["bpftool", "-j", "map", "dump", "name", "icmp_count"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)
    return int(entries[0]["value"]) if isinstance(entries[0]["value"], int) else \
        int.from_bytes(bytes(int(b, 16) for b in entries[0]["value"]), "little")


def load_other(a, tmp_path, source: Path) -> str:
    """Build source with clang and load it on a's veth with xdp-loader; its status."""
    from stcp.datapath.xdp_object import find_clang
    for tool in ("xdp-loader", "bpftool", "nsenter"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            pytest.skip(f"needs {tool} (scripts/system-deps.sh installs xdp-tools and bpftool)")
    clang = find_clang()
    if clang is None:
        pytest.skip("needs clang (scripts/system-deps.sh installs it)")
    obj = tmp_path / (source.stem + ".o")
    multiarch = f"/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run([clang, "-target", "bpf", "-O2", "-g", f"-I{multiarch}", "-c", str(source), "-o", str(obj)],
                   check=True, capture_output=True)
    r = xdp_loader(a.ns, "load", "-m", "native", a.ifname, str(obj))
    assert r.returncode == 0, r.stderr
    return xdp_loader(a.ns, "status", a.ifname).stdout


@pytest.fixture()
def other_prog(xdp_toolchain, netns_pair, tmp_path):
    """The ICMP counter on a's veth, loaded with xdp-loader; (a, b, its status)."""
    a, b = netns_pair
    try:
        st = load_other(a, tmp_path, SOURCE)
        assert "xdp_icmp_count" in st, st
        yield a, b, st
    finally:
        loader("--netns", a.ns, "detach", a.ifname)
        xdp_loader(a.ns, "unload", a.ifname, "--all")


def ping(b, host: str, n: int = 3) -> None:
    r = b.run("ping", "-c", str(n), "-i", "0.2", "-W", "2", host, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.root
@pytest.mark.xdp
def test_stcp_runs_beside_another_xdp_program(other_prog):
    why = kernel.dispatcher_unavailable()
    if why:
        pytest.skip(why)
    a, b, _ = other_prog
    ns = ["--netns", a.ns]
    r = loader(*ns, "attach", a.ifname, "--port", str(PORT))
    assert r.returncode == 0, r.stderr
    assert "behind libxdp's dispatcher" in r.stdout
    st = xdp_status(a.ns)
    assert st["dispatcher_id"] and [p["name"] for p in st["beside"]] == ["xdp_icmp_count"]
    status = xdp_loader(a.ns, "status", a.ifname).stdout
    assert "stcp_xdp" in status and "xdp_icmp_count" in status and "xdp_dispatcher" in status, status

    n0 = icmp_count()
    ping(b, a.ip4)
    assert icmp_count() >= n0 + 3, "the other program stopped counting"

    server = a.popen([*STCP, "serve", "--listen", f"{a.ip4}:{PORT}", "--datapath", "xdp", "--iface", a.ifname,
                      "--key", session_key()[0]],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_stderr_line(server, "serving on", timeout=60)
        base = {k: v["packets"] for k, v in xdp_status(a.ns)["counters"].items()}
        data = os.urandom(1 << 20)
        r = subprocess.run(b.cmd(*STCP, "connect", *pinned(), f"{a.ip4}:{PORT}"), input=data, capture_output=True,
                           timeout=120)
        assert r.returncode == 0 and r.stdout == data, r.stderr.decode(errors="replace")[-1000:]
        d = {k: v["packets"] - base[k] for k, v in xdp_status(a.ns)["counters"].items()}
        assert d["pass_handshake"] >= 1 and d["pass_data"] >= len(data) // 1500, d
    finally:
        err = stop(server)
    assert server.returncode == 0, err

    r = loader(*ns, "detach", a.ifname)
    assert r.returncode == 0, r.stderr
    status = xdp_loader(a.ns, "status", a.ifname).stdout
    assert "xdp_icmp_count" in status and "stcp_xdp" not in status, status
    n1 = icmp_count()
    ping(b, a.ip4)
    assert icmp_count() >= n1 + 3


@pytest.mark.root
@pytest.mark.xdp
def test_refused_beside_a_program_attached_alone(other_prog):
    """Without the dispatcher the other program is attached alone: STCP cannot join it and
    says so in one line; --force would replace it."""
    a, _b, status = other_prog
    if "xdp_dispatcher" in status or not kernel.dispatcher_unavailable():
        pytest.skip("the other program runs behind libxdp's dispatcher here (see the test above)")
    prog_before = xdp_loader(a.ns, "status", a.ifname).stdout
    r = loader("--netns", a.ns, "attach", a.ifname, "--port", str(PORT))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot run beside" in lines[0] and "--force" in lines[0], r.stderr
    assert xdp_loader(a.ns, "status", a.ifname).stdout == prog_before
    assert not xdp_status(a.ns)["attached"]


@pytest.mark.root
@pytest.mark.xdp
def test_stcp_program_of_another_layout(xdp_toolchain, netns_pair, tmp_path):
    """An STCP program whose maps this version does not know (an older stcp's, attached
    before an upgrade): attach, even with --force, refuses in one line saying to stop the
    server and detach first, so a server on the old program never has its table swapped
    away; detach removes it, and attach then works."""
    a, _b = netns_pair
    ns = ["--netns", a.ns]
    try:
        st = load_other(a, tmp_path, OTHER_LAYOUT)
        assert "stcp_xdp" in st, st
        for force in ([], ["--force"]):
            r = loader(*ns, "attach", a.ifname, "--port", str(PORT), *force)
            assert r.returncode == 1, r.stdout + r.stderr
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and "another stcp version" in lines[0], r.stderr
            assert f"stcp-loader detach {a.ifname}" in lines[0], lines[0]
            assert "stcp_xdp" in xdp_loader(a.ns, "status", a.ifname).stdout
        r = loader(*ns, "detach", a.ifname)
        assert r.returncode == 0, r.stderr
        assert "stcp_xdp" not in xdp_loader(a.ns, "status", a.ifname).stdout
        r = loader(*ns, "attach", a.ifname, "--port", str(PORT))
        assert r.returncode == 0, r.stderr
        assert xdp_status(a.ns)["config"]["port"] == PORT
    finally:
        loader(*ns, "detach", a.ifname)
        xdp_loader(a.ns, "unload", a.ifname, "--all")
