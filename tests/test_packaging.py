"""What a packager and a wheel user get: the sdist and the wheel built as `python -m build`
builds them, their contents, and the wheel installed in a fresh virtual environment (no
access to the system's site-packages, no .pth) attaching the XDP program: through clang
and libxdp, and through Debian's bcc, which the package finds by itself."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PORT = 4567


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel of the working tree (the wheel built from the sdist)."""
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.skip("needs the 'build' package (the test extra declares it: pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0 and ("Could not find a version" in r.stderr or "No matching distribution" in r.stderr):
        pytest.skip("the build backend cannot be installed here (no package index): " + r.stderr[-300:])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def tracked(*dirs: str) -> set:
    r = subprocess.run(["git", "ls-files", "-z", *dirs], cwd=REPO, capture_output=True, check=True)
    return {os.fsdecode(n) for n in r.stdout.split(b"\0") if n and (REPO / os.fsdecode(n)).is_file()}


@pytest.mark.slow
def test_sdist_and_wheel_contents(dist):
    (sdist,) = dist.glob("stcp-*.tar.gz")
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for d in ("docs", "dashboards", "deploy", "bpf", "tests", "bench", "scripts"):
        missing = tracked(d) - names
        assert not missing, f"the sdist lacks {sorted(missing)[:5]}"
    assert {"LICENSE", "CHANGELOG.md", "README.md", "Makefile", "pyproject.toml", "setup.py",
            "stcp/bpf/stcp_xdp.c", "stcp/_ext/aead.c"} <= names
    assert not any("__pycache__" in n or n.endswith((".so", ".pyc")) for n in names)
    assert top == "stcp-0.1.0" or top.startswith("stcp-")

    (wheel,) = dist.glob("stcp-*.whl")
    with zipfile.ZipFile(wheel) as z:
        wnames = set(z.namelist())
        meta = z.read(next(n for n in wnames if n.endswith(".dist-info/METADATA"))).decode()
    for f in ("stcp_xdp.c", "stcp_wire.h", "stcp_clang.h"):
        assert f"stcp/bpf/{f}" in wnames, f"the wheel lacks stcp/bpf/{f}: the kernel datapath cannot build"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wnames)
    assert "License-Expression: Apache-2.0" in meta
    for ext in ("_aead", "_udpio", "_demux", "_siphash"):
        assert any(n.startswith(f"stcp/{ext}.") and n.endswith(".so") for n in wnames), ext
    assert (REPO / "LICENSE").read_text().startswith("\n                                 Apache License")


@pytest.fixture(scope="module")
def fresh_venv(dist, tmp_path_factory) -> Path:
    """A new venv (no system site-packages) with the wheel installed; its bin/."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    (wheel,) = dist.glob("stcp-*.whl")
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0 and "No matching distribution" in r.stderr:
        pytest.skip("the wheel's dependencies cannot be installed here (no package index): " + r.stderr[-300:])
    assert r.returncode == 0, r.stderr[-2000:]
    return venv / "bin"


@pytest.mark.root
@pytest.mark.xdp
@pytest.mark.slow
def test_wheel_in_a_fresh_venv_attaches_xdp(fresh_venv, netns_pair, tmp_path):
    a, _b = netns_pair
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "STCP_"))}
    env["STCP_CACHE_DIR"] = str(tmp_path / "cache")     # root's default is the host's /var/cache/stcp

    def run(*args: str, extra: dict | None = None) -> subprocess.CompletedProcess:
        # from an empty directory: nothing of the repository is importable
        return subprocess.run([str(x) for x in args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, env={**env, **(extra or {})})

    py = str(fresh_venv / "python")
    plain = run(py, "-c", "import bcc")
    assert plain.returncode != 0, "this venv sees bcc on its own; the test would prove nothing"
    where = run(py, "-c", "import stcp; print(stcp.__file__)")
    assert str(fresh_venv.parent) in where.stdout, where.stdout + where.stderr

    loader = str(fresh_venv / "stcp-loader")
    r = run(loader, "--version")
    assert r.returncode == 0 and r.stdout.strip() == "stcp-loader (stcp) 0.1.0"
    r = run(loader, "doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok       bcc: /usr/lib/python3/dist-packages/bcc (the distribution's)" in r.stdout, r.stdout
    assert "attach can work" in r.stdout
    assert list((tmp_path / "cache").glob("stcp_xdp-*.o")), "doctor's clang build is not in the build cache"

    for how, extra in (("libxdp", {}), ("bcc", {"STCP_XDP_LOADER": "bcc"})):
        r = run(loader, "--netns", a.ns, "attach", a.ifname, "--port", str(PORT), extra=extra)
        assert r.returncode == 0, f"{how}: {r.stderr}"
        assert ("loaded with bcc" in r.stdout) == (how == "bcc"), r.stdout
        r = run(loader, "--netns", a.ns, "status", a.ifname)
        assert r.returncode == 0 and "STCP XDP attached" in r.stdout and f"port {PORT}" in r.stdout, r.stdout
        r = run(loader, "--netns", a.ns, "detach", a.ifname)
        assert r.returncode == 0, r.stderr
