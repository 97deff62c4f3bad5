"""The README's Python snippet runs as one file, as a reader would paste it."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippet_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no Python snippet"
    code = blocks[0]
    assert "server_key=" in code and "stcp.open_connection" in code and "stcp.connect" in code
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)     # 7443 may be taken here: a free port
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    (tmp_path / "snippet.py").write_text(code.replace("7443", str(port)))
    r = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"b'hello' from SHA256:[A-Za-z0-9+/]{43}", lines[0]), lines
    assert lines[1] == "b'hello, blocking'", lines
