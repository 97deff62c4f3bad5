"""stcp-loader as an operator runs it: a subprocess, checked with ip, bpftool and bpffs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import loader

PORT = 4555


def one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {r.stderr!r}"
    assert lines[0].startswith("stcp-loader: ")
    return lines[0]


def xdp_on_link(host, ifname: str = "veth0") -> str:
    out = host.run("ip", "-d", "link", "show", ifname).stdout
    return out


def bpftool_prog_exists(prog_id: int) -> bool:
    r = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
    return r.returncode == 0


@pytest.fixture()
def pair(xdp_toolchain, netns_pair):
    """A veth pair for the loader to attach to; detached again whatever the test did."""
    if shutil.which("bpftool") is None:
        pytest.skip("needs bpftool (scripts/system-deps.sh installs it)")
    a, b = netns_pair
    try:
        yield a, b
    finally:
        loader("--netns", a.ns, "detach", a.ifname)


@pytest.mark.root
@pytest.mark.xdp
def test_attach_status_attach_twice_force_detach(pair):
    a, _b = pair
    ns = ["--netns", a.ns]
    pins = Path(f"/sys/fs/bpf/stcp/netns/{a.ns}/{a.ifname}")

    r = loader(*ns, "attach", a.ifname, "--port", str(PORT), "--mode", "auto")
    assert r.returncode == 0, r.stderr
    assert "native mode" in r.stdout                   # veth supports native XDP; auto picks it
    link = xdp_on_link(a)
    assert "prog/xdp id" in link and "name stcp_xdp" in link
    assert sorted(p.name for p in pins.iterdir()) == ["buckets", "cid_filter", "cids", "config", "cookie", "counters",
                                                      "half_open", "hs_bucket", "prog"]

    r = loader(*ns, "status", a.ifname)
    assert r.returncode == 0, r.stderr
    assert "attached, native mode" in r.stdout and f"port {PORT}" in r.stdout
    for name in ("pass_not_stcp", "pass_handshake", "pass_data", "drop_unknown_cid", "drop_fragment"):
        assert name in r.stdout

    r = loader("status", "--json", *ns)                   # no IFACE: every STCP interface
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["interfaces"]
    assert len(st) == 1 and st[0]["attached"] and st[0]["mode"] == "native"
    assert st[0]["config"]["port"] == PORT and st[0]["pinned"]
    assert set(st[0]["counters"]) >= {"pass_not_stcp", "drop_bad_length"}
    prog_id = st[0]["prog_id"]
    assert f"prog/xdp id {prog_id} " in xdp_on_link(a)
    bt = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(pins / "prog")],
                                   capture_output=True, text=True, check=True).stdout)
    assert bt["id"] == prog_id and bt["name"] == "stcp_xdp"

    r = loader(*ns, "attach", a.ifname, "--port", str(PORT))
    assert r.returncode == 1
    assert "already attached" in one_line_error(r) and "--force" in r.stderr
    assert f"prog/xdp id {prog_id} " in xdp_on_link(a)  # untouched

    r = loader(*ns, "attach", a.ifname, "--port", str(PORT), "--force", "--mode", "generic")
    assert r.returncode == 0, r.stderr
    assert "generic mode" in r.stdout
    st = json.loads(loader(*ns, "status", a.ifname, "--json").stdout)["interfaces"][0]
    new_id = st["prog_id"]
    assert new_id != prog_id and st["mode"] == "generic"
    link = xdp_on_link(a)
    assert " xdpgeneric " in link.split("\n")[0]
    assert f"prog/xdp id {new_id} " in link and f"id {prog_id} " not in link
    assert not bpftool_prog_exists(prog_id), "the replaced program is still loaded"

    r = loader(*ns, "detach", a.ifname)
    assert r.returncode == 0, r.stderr
    link = xdp_on_link(a)
    assert "xdp" not in link.split("\n")[0] and "prog/xdp" not in link
    assert not pins.exists() and not Path(f"/sys/fs/bpf/stcp/netns/{a.ns}").exists()
    assert not bpftool_prog_exists(new_id), "program still loaded after detach"
    r = subprocess.run(["bpftool", "prog", "show", "name", "stcp_xdp"], capture_output=True, text=True)
    assert str(new_id) not in r.stdout

    r = loader(*ns, "detach", a.ifname)
    assert r.returncode == 1
    assert "no STCP XDP program attached" in one_line_error(r)

    r = loader(*ns, "status", a.ifname, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["interfaces"][0]["attached"] is False


@pytest.mark.root
@pytest.mark.xdp
def test_attach_via_ip_netns_exec(pair):
    """`ip netns exec NS stcp-loader ...` works too: that gives the process a private /sys
    without bpffs, so the loader mounts one (its pins vanish with the process, which it
    says), and status/detach find the program through the kernel, not through the pins."""
    a, _b = pair
    exec_ns = ("ip", "netns", "exec", a.ns)
    r = loader("attach", a.ifname, "--port", str(PORT), "--mode", "generic", prefix=exec_ns)
    assert r.returncode == 0, r.stderr
    assert "private" in r.stderr                       # the note about the private bpffs
    r = loader("status", a.ifname, "--json", prefix=exec_ns)
    st = json.loads(r.stdout)["interfaces"][0]
    assert st["attached"] and st["mode"] == "generic" and st["config"]["port"] == PORT
    r2 = loader("--netns", a.ns, "status", a.ifname, "--json")
    assert json.loads(r2.stdout)["interfaces"][0]["prog_id"] == st["prog_id"]
    r = loader("detach", a.ifname, prefix=exec_ns)
    assert r.returncode == 0, r.stderr
    assert "xdp" not in xdp_on_link(a).split("\n")[0]
    assert not bpftool_prog_exists(st["prog_id"])


@pytest.mark.root
@pytest.mark.xdp
def test_bad_interface_and_namespace(pair):
    a, _b = pair
    r = loader("--netns", a.ns, "attach", "nosuch0")
    assert r.returncode == 2
    assert "interface 'nosuch0' not found" in one_line_error(r)
    r = loader("--netns", a.ns, "detach", "nosuch0")
    assert r.returncode == 2 and "not found" in one_line_error(r)
    r = loader("--netns", a.ns, "status", "nosuch0")
    assert r.returncode == 2 and "not found" in one_line_error(r)
    r = loader("--netns", "stcp-no-such-ns", "status")
    assert r.returncode == 2 and "network namespace 'stcp-no-such-ns' not found" in one_line_error(r)
    assert not os.path.exists("/run/netns/stcp-no-such-ns")
    r = loader("--netns", a.ns, "attach", a.ifname, "--port", "70000")
    assert r.returncode == 2 and "not a UDP port" in one_line_error(r)
    r = loader("--netns", a.ns, "detach", a.ifname)
    assert r.returncode == 1 and "no STCP XDP program attached" in one_line_error(r)


@pytest.mark.root
@pytest.mark.xdp
def test_missing_toolchain_is_one_line(pair, tmp_path):
    """Without clang the program is built with bcc (and says it runs alone); without either,
    one line names both and what to install. STCP_BCC_DIR hides the distribution's bcc."""
    a, _b = pair
    fake = tmp_path / "bcc"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: no libbcc')\n")
    no_bcc = {"PYTHONPATH": str(tmp_path), "STCP_BCC_DIR": str(tmp_path / "none")}
    no_clang = {"STCP_CLANG": str(tmp_path / "no-clang")}
    r = loader("--netns", a.ns, "attach", a.ifname, env={**no_bcc, **no_clang})
    assert r.returncode == 2
    line = one_line_error(r)
    assert "clang not found" in line and "bcc is not available" in line and "system-deps" in line
    r = loader("--netns", a.ns, "attach", a.ifname, env={**no_bcc, "STCP_XDP_LOADER": "bcc"})
    assert r.returncode == 2 and "bcc is not available" in one_line_error(r)
    assert "prog/xdp" not in xdp_on_link(a)

    r = loader("--netns", a.ns, "attach", a.ifname, "--port", str(PORT), env=no_clang)
    assert r.returncode == 0, r.stderr
    assert "loaded with bcc" in r.stdout and "clang and libxdp" in r.stdout
    assert json.loads(loader("--netns", a.ns, "status", a.ifname, "--json").stdout)["interfaces"][0]["attached"]
    assert loader("--netns", a.ns, "detach", a.ifname).returncode == 0

    empty = tmp_path / "nobpf"
    empty.mkdir()
    r = loader("--netns", a.ns, "attach", a.ifname, env={"STCP_BPF_DIR": str(empty)})
    assert r.returncode == 2
    assert "has no stcp_xdp.c" in one_line_error(r)
    assert "prog/xdp" not in xdp_on_link(a)


@pytest.mark.root
def test_not_root_is_one_line(tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop privileges")
    r = loader("status", prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
            env={"HOME": str(tmp_path)})
    if r.returncode in (126, 127) or ("Permission denied" in r.stderr and "needs CAP_" not in r.stderr):
        pytest.skip("the venv is not readable by an unprivileged user here")
    assert r.returncode == 2
    line = one_line_error(r)         # the capabilities it lacks, not "root"
    assert "needs CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON" in line and "missing CAP_BPF" in line


def test_no_bpffs_message(tmp_path):
    from stcp.datapath.errors import XdpSetupError
    from stcp.datapath.xdp_prog import ensure_bpffs
    with pytest.raises(XdpSetupError, match=r"no bpffs: .* does not exist .*mount -t bpf bpf"):
        ensure_bpffs(str(tmp_path / "missing"))


def test_cli_usage_errors():
    r = loader("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = loader("attach", "x", "--mode", "turbo")
    assert r.returncode == 2


def test_loader_and_serve_default_to_one_port():
    """`stcp-loader attach IFACE` filters the port `stcp serve` listens on unless either is told
    otherwise: both take wire.DEFAULT_PORT (the loader fell back to 4433, serve used 7443)."""
    from stcp import wire
    from stcp.cli import common, loader, main
    assert wire.DEFAULT_PORT == 7443               # docs/PROTOCOL.md §2, README, OPERATIONS.md
    attach = loader.build_parser().parse_args(["attach", "eth0"])
    serve = main.build_parser().parse_args(["serve"])
    assert attach.port == wire.DEFAULT_PORT
    assert common.parse_hostport(serve.listen) == ("127.0.0.1", wire.DEFAULT_PORT)
    assert common.parse_hostport("0.0.0.0", wire.DEFAULT_PORT) == ("0.0.0.0", 7443)


def test_version_and_complete_help():
    """`stcp-loader --version` answers like `stcp --version`; every option and argument of
    every command says what it is for."""
    import argparse

    from stcp import __version__
    from stcp.cli.loader import build_parser
    r = loader("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"stcp-loader (stcp) {__version__}"
    p = build_parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {"attach", "set", "detach", "status", "metrics", "doctor"}
    for name, cmd in sub.choices.items():
        assert cmd.description or any(c.dest == name and c.help for c in sub._choices_actions), name
        for a in cmd._actions:
            if not isinstance(a, argparse._HelpAction):
                assert a.help and a.help != argparse.SUPPRESS, f"stcp-loader {name} {a.option_strings or a.dest}"
    r = loader("set", "eth0")
    assert r.returncode == 2 and "nothing to set" in r.stderr and len(r.stderr.strip().splitlines()) == 1
