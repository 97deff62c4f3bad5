"""deploy/: the systemd units, example config files, Containerfile and Kubernetes manifests
an operator installs. Each is checked by the tool its platform uses (systemd-analyze,
kubernetes-validate) and against stcp's own command line, so a file that names a flag the
CLI no longer has fails here rather than at 3 a.m."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from stcp.cli import config_file, loader as loader_cli, main as stcp_cli

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
CONFIGS = {"serve.toml": "serve", "serve-xdp.toml": "serve", "tunnel.toml": "tunnel"}
# What each unit may hold: the socket server and the tunnel need no capability at all.
CAPABILITIES = {
    "stcp-serve.service": set(),
    "stcp-tunnel.service": set(),
    "stcp-serve-xdp.service": {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"},
    "stcp-loader-exporter.service": {"CAP_BPF", "CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_PERFMON"},
}
INSTALLED_BIN = "/opt/stcp/.venv/bin/"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze not installed (Debian package systemd)")


def unit_settings(path: Path) -> dict[str, list[str]]:
    """[Service]/[Unit]/[Install] settings, every value of a repeated key kept in order."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def parse_command(argv: list[str]) -> None:
    """Parse argv as the installed command would, with the repository's example config in
    place of /etc/stcp; SystemExit (argparse's usage error) fails the test."""
    program, args = Path(argv[0]).name, argv[1:]
    args = [str(DEPLOY / "config" / Path(a).name) if a.startswith("/etc/stcp/") else a for a in args]
    if program == "stcp-loader":
        loader_cli.build_parser().parse_args(args)
        return
    assert program == "stcp", argv
    parser = stcp_cli.build_parser()
    parser.parse_args(config_file.expand(parser, args))


def test_every_unit_is_here():
    assert {u.name for u in UNITS} == set(CAPABILITIES)


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_is_hardened(unit):
    s = unit_settings(unit)
    assert s.get("User"), "runs as a named or dynamic user, never root"
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                       ("ProtectHome", "yes"), ("LimitCORE", "0"), ("SystemCallArchitectures", "native")]:
        assert s.get(key) == [value], (key, s.get(key))
    assert s["SystemCallFilter"][0].split()[0] == "@system-service"
    families = set(s["RestrictAddressFamilies"][0].split())
    assert families <= {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    ambient = set(s.get("AmbientCapabilities", [""])[0].split())
    bounding = set(s.get("CapabilityBoundingSet", [""])[0].split())
    assert ambient == bounding == CAPABILITIES[unit.name]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_command_is_one_stcp_accepts(unit):
    (exec_start,) = unit_settings(unit)["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith(INSTALLED_BIN)
    parse_command(argv)


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's program exists: point it at this venv's commands.
    bindir = str(Path(sys.executable).parent) + "/"
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_BIN, bindir))
    r = subprocess.run(["systemd-analyze", "verify", *sorted(str(tmp_path / unit.name) for unit in UNITS)],
                       capture_output=True, text=True, timeout=120)
    # verify exits 0 on unknown keys and bad values, only saying so: any word about our
    # files is a failure.
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if str(tmp_path) in ln]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_exposure_is_low(unit, tmp_path):
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text())
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(copy)],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze cannot score a unit offline: {r.stderr.strip()[:200]}")
    # systemd's scale: 0 (locked down) to 10 (UNSAFE); below 3 is rated OK.
    assert float(m.group(1)) < 3.0, r.stdout


@pytest.mark.parametrize("name, command", sorted(CONFIGS.items()))
def test_example_config_is_accepted(name, command):
    parser = stcp_cli.build_parser()
    tokens = config_file.tokens(config_file.commands(parser)[command], str(DEPLOY / "config" / name))
    assert tokens
    parser.parse_args(config_file.expand(parser, [command, "--config", str(DEPLOY / "config" / name)]))


def kubernetes_documents() -> list[dict]:
    yaml = pytest.importorskip("yaml", reason="pyyaml is in the test extra")
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "stcp.yaml").read_text()) if d]


@pytest.mark.parametrize("version", ["1.29.0", "1.37.0"])
def test_kubernetes_manifests_validate(version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    docs = kubernetes_documents()
    assert {d["kind"] for d in docs} >= {"DaemonSet", "Service", "ConfigMap"}
    for doc in docs:
        kv.validate(doc, version, strict=True)     # raises ValidationError naming the field


def test_kubernetes_daemonset_runs_what_stcp_accepts(tmp_path):
    docs = {d["kind"]: d for d in kubernetes_documents()}
    pod = docs["DaemonSet"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert pod["spec"]["hostNetwork"] is True
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and {"BPF", "NET_ADMIN"} <= set(caps["add"])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    conf = tmp_path / "serve.toml"
    conf.write_text(docs["ConfigMap"]["data"]["serve.toml"])
    assert tomllib.loads(conf.read_text())["metrics"].endswith(":" + annotations["prometheus.io/port"])
    args = [str(conf) if a == "/etc/stcp/serve.toml" else a for a in container["args"]]
    parse_command(["stcp", *args])


def containerfile_lines() -> list[str]:
    text = (DEPLOY / "container" / "Containerfile").read_text().replace("\\\n", " ")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_containerfile_copies_what_the_repository_has():
    for line in containerfile_lines():
        if line.startswith("COPY") and "--from=" not in line:
            *sources, _dest = line.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"Containerfile copies {src}, which the repository lacks"
    cmd = next(ln for ln in containerfile_lines() if ln.startswith("CMD"))
    import json
    parse_command(["stcp", *json.loads(cmd[3:])])


@pytest.mark.slow
def test_containerfile_wheel_command_builds_all_extensions(tmp_path):
    """The Containerfile's build step, run here: the wheel carries the three C extensions
    and the BPF sources the XDP datapath compiles at attach."""
    step = next(ln for ln in containerfile_lines() if "pip wheel" in ln)
    wheel_args = shlex.split(step[step.index("pip wheel"):])[2:]      # after "pip wheel"
    wheel_args = [str(tmp_path) if a == "/dist" else a for a in wheel_args]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", *wheel_args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("stcp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for ext in ("_aead", "_demux", "_xsk"):
        assert any(n.startswith(f"stcp/{ext}.") and n.endswith(".so") for n in names), (ext, names)
    assert "stcp/cli/main.py" in names and "stcp/bpf/stcp_xdp.c" in names
