"""The README's first command on a fresh machine: `make run` in a new clone must succeed
with or without the libxdp/libbpf headers (the optional stcp._xsk extension is then
skipped, and `--datapath afxdp` says what to install).

The machine without headers is made with a mount namespace: an empty tmpfs over the
header directories hides them from that one process tree only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEADER_DIRS = ["/usr/include/xdp", "/usr/include/bpf"]


def _fresh_copy(dest: Path) -> None:
    """The repository's tracked and new files as they stand now (a clone of the working
    tree, so an uncommitted change is what gets tested), without build products."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / os.fsdecode(name)
        if not src.is_file():
            continue  # deleted in the working tree
        target = dest / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


@pytest.mark.slow
@pytest.mark.unshare
def test_make_run_without_xdp_headers(tmp_path):
    clone = tmp_path / "stcp"
    _fresh_copy(clone)
    hide = " && ".join(f"mount -t tmpfs tmpfs {d}" for d in HEADER_DIRS if os.path.isdir(d))
    # `test ! -e` proves the headers are hidden before make runs.
    script = f"{hide + ' && ' if hide else ''}test ! -e /usr/include/xdp/xsk.h && make run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix))))
    run = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                         cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, f"make run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    py = clone / ".venv" / "bin" / "python"
    # In the clone: `python -c` imports from its working directory first, and this one's
    # stcp/ may hold every extension, built.
    assert subprocess.run([str(py), "-c", "import stcp._aead, stcp._udpio, stcp._demux, stcp._siphash"],
                          cwd=clone).returncode == 0
    # Without the extension the afxdp datapath refuses with what to install, in one line.
    probe = subprocess.run([str(py), "-c", "import stcp._xsk"], cwd=clone, capture_output=True)
    assert probe.returncode != 0
    key = subprocess.run([str(clone / ".venv" / "bin" / "stcp"), "keygen", "--out", str(tmp_path / "server.key")],
                         capture_output=True, text=True, timeout=60)
    assert key.returncode == 0, key.stderr
    cli = subprocess.run([str(clone / ".venv" / "bin" / "stcp"), "serve", "--datapath", "afxdp",
                          "--iface", "lo", "--listen", "127.0.0.1:17443", "--key", str(tmp_path / "server.key")],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0
    assert "libxdp-dev" in cli.stderr and "Traceback" not in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


def test_all_extensions_built_where_headers_exist():
    """With the libxdp headers present (as `make test` installs them), the install built
    every extension; a skipped stcp._xsk would silently turn the AF_XDP tests off."""
    if not os.path.exists("/usr/include/xdp/xsk.h"):
        pytest.skip("libxdp headers are not installed here (make system-deps installs them)")
    import stcp._aead
    import stcp._demux
    import stcp._siphash
    import stcp._udpio
    import stcp._xsk  # noqa: F401
