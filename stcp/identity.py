"""Static X25519 identity keys: generation, key files, allow lists, text form and fingerprints.

A server always has one (docs/PROTOCOL.md section 5); a client may have one to prove with
CLIENT_AUTH. Key files are as WireGuard's: one line of base64 holding the 32-byte private
key, mode 0600. Loading refuses a file others can read (as ssh does) and saving refuses
to overwrite. A fingerprint is ssh's: "SHA256:" + unpadded base64 of SHA-256(public key).
An allow list is a file of public keys, one per line. A server given no key keeps one in
its state directory (state_dir_key), so it keeps its identity across restarts.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from typing import List, Optional, Tuple

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import STCPError

KEY_LEN = 32


class InvalidKey(STCPError, ValueError):
    """A key or key file that cannot be used; the message is one line that says what to do."""


def generate_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def fingerprint(public: bytes) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode().rstrip("=")


def encode_key(key: bytes) -> str:
    """The one-line base64 text of a 32-byte key (44 characters, as `wg genkey` prints)."""
    return base64.b64encode(key).decode()


def decode_key(text: str, what: str = "key") -> bytes:
    """32 raw bytes from base64 text (surrounding whitespace ignored)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey(f"{what} is not base64 text") from None
    if len(raw) != KEY_LEN:
        raise InvalidKey(f"{what} is {len(raw)} bytes, an X25519 key is {KEY_LEN} (base64 of 44 characters)")
    return raw


def save_private_key(path: str, private: bytes) -> None:
    """Write a new key file, mode 0600; never replaces an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidKey(f"{path} already exists: refusing to overwrite a key file (remove it or choose "
                         f"another path)") from None
    except OSError as exc:
        raise InvalidKey(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)     # whatever the umask did to the mode
        f.write(encode_key(private) + "\n")


def load_private_key(path: str) -> bytes:
    """Read a key file, refusing one that its group or others may read or write."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise InvalidKey(f"key file {path} does not exist") from None
    except OSError as exc:
        raise InvalidKey(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InvalidKey(f"key file {path} is not a regular file")
        if mode & 0o077:
            raise InvalidKey(f"key file {path} is accessible by others (mode {stat.S_IMODE(mode):04o}): "
                             f"run chmod 600 {path}")
        text = os.read(fd, 4096).decode("ascii", "replace")
    finally:
        os.close(fd)
    return decode_key(text, f"key file {path}")


class StaticKey:
    """A static private key with its public key computed once (the X25519 base-point
    multiplication is the cost of a handshake DH, not worth repeating per connection)."""

    __slots__ = ("private", "public")

    def __init__(self, private: bytes):
        if len(private) != KEY_LEN:
            raise ValueError(f"a static key is {KEY_LEN} raw bytes, not {len(private)}")
        self.private = X25519PrivateKey.from_private_bytes(private)
        self.public = self.private.public_key().public_bytes_raw()

    def private_bytes(self) -> bytes:
        return self.private.private_bytes_raw()


def read_private_key(text: str, what: str = "private key") -> bytes:
    """A private key from the text of a key file (as `stcp pubkey` reads it from stdin)."""
    return decode_key(text, what)


def key_file_lines(path: str, what: str, missing_ok: bool = False) -> List[Tuple[int, List[str]]]:
    """(line number, whitespace-separated fields) of each line of a text file of keys (an
    allow list, a known-hosts file) that is not blank or a '#' comment. A file that cannot
    be read is an InvalidKey naming `what`; a missing one has no lines if missing_ok."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise InvalidKey(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise InvalidKey(f"cannot read {what} {path}: {exc.strerror}") from None
    return [(n, line.split()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]


def load_public_keys(path: str) -> List[bytes]:
    """An allow list file: one base64 public key per line; blank lines, lines starting with
    '#' and anything after a key and whitespace (a comment naming the client) are ignored.
    A line that is not a key is an InvalidKey naming the file and line."""
    return [decode_key(fields[0], f"allow list {path} line {n}") for n, fields in key_file_lines(path, "allow list")]


# --- the server's key in its state directory ---------------------------------------
SERVER_KEY_FILE = "server.key"


def default_state_dir() -> str:
    """Where `stcp serve` keeps the key it makes when given none: /var/lib/stcp for root,
    else $XDG_STATE_HOME/stcp, else ~/.local/state/stcp."""
    if os.geteuid() == 0:
        return "/var/lib/stcp"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "stcp")


def state_dir_key(state_dir: Optional[str]) -> Tuple[bytes, str, bool]:
    """The server key kept in `state_dir` (None: default_state_dir(), created 0700 with its
    parents if missing); one is made on first use. Returns (private key, path, made now).
    A state directory named explicitly must exist: a typo must not scatter keys about."""
    directory = state_dir or default_state_dir()
    if state_dir is None:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise InvalidKey(f"cannot create state directory {directory}: {exc.strerror} "
                             f"(choose one with --state-dir DIR, or give the key with --key FILE)") from None
    elif not os.path.isdir(directory):
        raise InvalidKey(f"state directory {directory} does not exist: create it (mkdir -m 700 {directory}) "
                         f"or give the key with --key FILE")
    path = os.path.join(directory, SERVER_KEY_FILE)
    if os.path.lexists(path):
        return load_private_key(path), path, False
    private = generate_private_key()
    try:
        save_private_key(path, private)
    except InvalidKey:
        if not os.path.lexists(path):
            raise
        return load_private_key(path), path, False     # another process made it meanwhile
    return private, path, True
