"""Running stcp as a user other than root, for the privilege tests: an interpreter and an
import path that user can read, and the /proc view of a process's privileges.

The venv's python is often a link into root's home (pyenv), which nobody may read, and
the checkout may be there too. So the candidates are this interpreter and the system's
python of the same version (extensions are built for the version's ABI), with the
checkout and the venv's packages on PYTHONPATH as they are or, failing that, copied
into a directory everyone can read.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
PROBE = "import stcp.cli.main, stcp.datapath.xdp, cryptography.hazmat.primitives.ciphers.aead, bcc"
# what `stcp serve` imports from the venv (besides the checkout's stcp/ and bpf/)
PACKAGES = ("cryptography", "_cffi_backend", "cffi", "pyroute2", "prometheus_client")


def _interpreters() -> List[str]:
    out = [sys.executable]
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if os.path.exists(system):
        out.append(system)
    return out


def _site_packages() -> Optional[str]:
    spec = importlib.util.find_spec("prometheus_client")
    return str(Path(spec.origin).parents[1]) if spec and spec.origin else None


def _copy_tree(dest: Path) -> str:
    """The checkout's package and BPF sources, and the packages stcp imports, under dest
    (world-readable); the PYTHONPATH for them."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "stcp", dest / "stcp", symlinks=False, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "bpf"))
    shutil.copytree(ROOT / "bpf", dest / "stcp" / "bpf", dirs_exist_ok=True)
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, dest / origin.parent.name, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, dest / origin.name)
    for p in [dest, *dest.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644 | (p.stat().st_mode & 0o111))
    return str(dest)


def _probe(prefix: List[str], python: str, env: Dict[str, str]) -> bool:
    r = subprocess.run([*prefix, python, "-c", PROBE], env=env, capture_output=True, timeout=60)
    return r.returncode == 0


def python_as(user_prefix: List[str], scratch: Path) -> Tuple[Optional[List[str]], Dict[str, str], str]:
    """(argv of `python -m stcp.cli.main` runnable under user_prefix (e.g. a setpriv
    command), its environment, '') or (None, {}, why not)."""
    site = _site_packages()
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    layouts = [(os.pathsep.join(p for p in (str(ROOT), site) if p), str(ROOT / "bpf"))]
    tried = []
    for attempt in range(2):
        for python in _interpreters():
            for path, bpf_dir in layouts:
                env = {**base, "PYTHONPATH": path, "STCP_BPF_DIR": bpf_dir}
                if _probe(user_prefix, python, env):
                    return [python, "-m", "stcp.cli.main"], env, ""
                tried.append(f"{python} with {path}")
        if attempt == 0:
            copy = _copy_tree(scratch / "pkgs")
            scratch.chmod(0o755)
            layouts = [(copy, os.path.join(copy, "stcp", "bpf"))]
    return None, {}, "no python that an unprivileged user can run stcp with (tried " + "; ".join(tried) + ")"


def proc_status(pid: int) -> Dict[str, str]:
    """/proc/PID/status as a dict."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def threads_status(pid: int) -> List[Dict[str, str]]:
    """The status of every thread of the process: capabilities are per thread."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            out.append({k: v.strip() for k, _, v in (line.partition(":") for line in f)})
    return out
