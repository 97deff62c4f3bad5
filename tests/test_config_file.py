"""`stcp serve --config FILE`: every option can come from a TOML file, typed options win,
and a wrong file is refused in one line naming the file and the key (exit 2)."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from stcp.cli import config_file
from stcp.cli.main import build_parser
from tests.support.procs import wait_for_stderr_line

STCP = [sys.executable, "-m", "stcp.cli.main"]


def parse(tmp_path, text: str, *typed: str, command: str = "serve"):
    path = tmp_path / "stcp.toml"
    path.write_text(text)
    parser = build_parser()
    argv = config_file.expand(parser, [command, "--config", str(path), *typed])
    return parser.parse_args(argv)


def test_file_values_are_parsed_like_typed_options(tmp_path):
    args = parse(tmp_path, 'listen = "127.0.0.1:9000"\nidle-timeout = 5\nhandshake_timeout = 2.5\n'
                           'cipher = "chacha20-poly1305"\nforward = "127.0.0.1:80"\n')
    assert args.listen == "127.0.0.1:9000"
    assert args.idle_timeout == 5.0 and args.handshake_timeout == 2.5   # through argparse's type=float
    assert args.cipher == "chacha20-poly1305"
    assert args.forward == "127.0.0.1:80"


def test_a_typed_option_overrides_the_file(tmp_path):
    args = parse(tmp_path, "idle-timeout = 5\n", "--idle-timeout", "9")
    assert args.idle_timeout == 9.0


def test_tunnel_takes_a_config_file_too(tmp_path):
    args = parse(tmp_path, 'listen = "127.0.0.1:8000"\nto = "example.net:7443"\n', command="tunnel")
    assert (args.listen, args.to) == ("127.0.0.1:8000", "example.net:7443")


@pytest.mark.parametrize("text, words", [
    ("no-such-option = 1\n", "unknown key 'no-such-option'"),
    ("config = \"other.toml\"\n", "unknown key 'config'"),
    ("listen = [\"a:1\", \"b:2\"]\n", "listen takes one value"),
    ("idle-timeout = { a = 1 }\n", "idle-timeout must be a string or a number"),
    ("listen = \n", "is not valid TOML"),
])
def test_a_wrong_file_is_one_line_naming_the_key(tmp_path, text, words):
    with pytest.raises(config_file.UsageError, match=words):
        parse(tmp_path, text)


def test_a_value_of_the_wrong_type_fails_as_a_typed_one_would(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(tmp_path, 'idle-timeout = "soon"\n')
    assert exc.value.code == 2
    assert "--idle-timeout: invalid float value: 'soon'" in capsys.readouterr().err


def test_serve_listens_where_the_file_says(tmp_path):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    conf = tmp_path / "serve.toml"
    conf.write_text(f'listen = "127.0.0.1:{port}"\ncipher = "chacha20-poly1305"\nstate-dir = "{tmp_path}"\n')
    proc = subprocess.Popen([*STCP, "serve", "--workers", "1", "--config", str(conf)], stderr=subprocess.PIPE)
    try:
        said = wait_for_stderr_line(proc, "serving on", timeout=60)
        assert f"serving on 127.0.0.1:{port}" in said[-1], said
        assert (tmp_path / "server.key").exists()        # the state dir came from the file too
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_serve_refuses_a_missing_file_in_one_line(tmp_path):
    r = subprocess.run([*STCP, "serve", "--config", str(tmp_path / "absent.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "cannot read config file" in r.stderr and "absent.toml" in r.stderr
