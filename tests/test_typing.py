"""The public API is typed for the user's checker (the package ships py.typed): what
`stcp.connect`, `stcp.open_connection` and `stcp.serve` hand out has a concrete type, never
Any, so a typo in `conn.sendal(...)` is an error before it runs."""
from __future__ import annotations

import pytest

api = pytest.importorskip("mypy.api", reason="mypy comes with the lint extra (make installs it)")

USER_CODE = '''
import stcp

def blocking() -> None:
    with stcp.connect(("127.0.0.1", 7443), config=stcp.Config(cipher="chacha20-poly1305")) as conn:
        reveal_type(conn)
        reveal_type(conn.recv(10))
        conn.sendal(b"typo")

async def streams() -> None:
    reader, writer = await stcp.open_connection("127.0.0.1", 7443, cipher="aes-256-gcm")
    reveal_type(reader)
    reveal_type(writer)
    server = await stcp.serve(lambda r, w: None, "127.0.0.1", 0)
    reveal_type(server)
'''


def test_the_public_api_reaches_the_users_checker_typed(tmp_path):
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    # its own cache: a shared .mypy_cache replays an earlier run's messages under that run's path
    out, err, _ = api.run([str(user), "--no-error-summary", "--show-error-codes",
                           "--cache-dir", str(tmp_path / "mypy_cache")])
    lines = [ln.split(": ", 1)[1] for ln in out.splitlines() if ln.startswith(str(user))]
    lines = [ln.split(";")[0] if "sendal" in ln else ln for ln in lines]    # mypy's suggestions vary
    assert lines == [
        'note: Revealed type is "stcp.blocking.BlockingConnection"',
        'note: Revealed type is "bytes"',
        'error: "BlockingConnection" has no attribute "sendal"',
        'note: Revealed type is "stcp.api.StreamReader"',
        'note: Revealed type is "stcp.api.StreamWriter"',
        'note: Revealed type is "stcp.server.Server"',
    ], out + err
