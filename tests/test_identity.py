"""Identity key files and key text (docs/PROTOCOL.md section 5.2): WireGuard's format, mode
0600, never overwritten, refused when others can read them; one-line errors."""
from __future__ import annotations

import base64
import os
import stat

import pytest

from stcp import identity
from stcp.identity import InvalidKey


def test_save_and_load_round_trip(tmp_path):
    key = identity.generate_private_key()
    path = tmp_path / "server.key"
    identity.save_private_key(str(path), key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text == base64.b64encode(key).decode() + "\n" and len(text.strip()) == 44
    assert identity.load_private_key(str(path)) == key
    assert identity.public_key(key) == identity.StaticKey(key).public


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "server.key"
    path.write_text("precious\n")
    with pytest.raises(InvalidKey, match="refusing to overwrite"):
        identity.save_private_key(str(path), identity.generate_private_key())
    assert path.read_text() == "precious\n"


def test_save_is_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        identity.save_private_key(str(tmp_path / "k"), identity.generate_private_key())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_load_refuses_loose_permissions(tmp_path, mode):
    path = tmp_path / "server.key"
    identity.save_private_key(str(path), identity.generate_private_key())
    os.chmod(path, mode)
    with pytest.raises(InvalidKey) as info:
        identity.load_private_key(str(path))
    msg = str(info.value)
    assert f"mode {mode:04o}" in msg and f"chmod 600 {path}" in msg and "\n" not in msg


@pytest.mark.parametrize("content,why", [("not base64!!\n", "not base64"), (base64.b64encode(bytes(31)).decode(),
                                                                            "31 bytes"), ("", "0 bytes")])
def test_load_refuses_corrupt_files(tmp_path, content, why):
    path = tmp_path / "server.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(InvalidKey, match=why):
        identity.load_private_key(str(path))


def test_load_missing_file_and_directory(tmp_path):
    with pytest.raises(InvalidKey, match="does not exist"):
        identity.load_private_key(str(tmp_path / "nope"))
    with pytest.raises(InvalidKey, match="not a regular file"):
        os.chmod(tmp_path, 0o700)
        identity.load_private_key(str(tmp_path))


def test_decode_key_text():
    key = bytes(range(32))
    assert identity.decode_key(" " + identity.encode_key(key) + "\n") == key
    with pytest.raises(InvalidKey, match="server key is not base64"):
        identity.decode_key("@@@", "server key")
