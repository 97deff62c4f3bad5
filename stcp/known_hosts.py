"""Trust on first use, as ssh does it: a known-hosts file recording each server's public key.

One line per server, `HOST:PORT KEY` (`[IPv6]:PORT` for an IPv6 literal), KEY the base64 of
its 32-byte static public key; blank lines and lines starting with '#' are ignored. HOST is
the name the user connected to, as typed (lower-cased), so `localhost:7443` and
`127.0.0.1:7443` are two entries, as in ssh.

A client without a pinned key looks the server up (`KnownHosts.policy`): a recorded key
must be presented again, anything else is refused with a message saying how to accept a
change deliberately (`stcp known-hosts remove HOST:PORT`, or editing the file); a server
not in the file is accepted, and recorded once the handshake has completed (`record`).
"""
from __future__ import annotations

import hmac
import os
import tempfile
from typing import Callable, List, NamedTuple, Optional

from .handshake import ServerKeyRefused
from .identity import InvalidKey, decode_key, encode_key, fingerprint, key_file_lines


class Entry(NamedTuple):
    host: str                   # "host:port" / "[v6]:port"
    key: bytes
    line: int                   # 1-based line number in the file


def default_path() -> str:
    """$XDG_CONFIG_HOME/stcp/known_hosts, else ~/.config/stcp/known_hosts."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "stcp", "known_hosts")


def host_entry(host: str, port: int) -> str:
    """The file's name for a server: 'host:port', '[v6]:port' for an IPv6 literal."""
    host = host.strip("[]").lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class KnownHosts:
    def __init__(self, path: Optional[str] = None):
        self.path = path or default_path()

    def entries(self) -> List[Entry]:
        """Every entry; a missing file has none. A line that is not `HOST:PORT KEY` is an
        InvalidKey naming the file and the line (fix or delete it)."""
        out = []
        for n, fields in key_file_lines(self.path, "known-hosts file", missing_ok=True):
            if len(fields) != 2 or ":" not in fields[0]:
                raise InvalidKey(f"known-hosts file {self.path} line {n} is not 'HOST:PORT KEY': fix or delete it")
            out.append(Entry(fields[0].lower(), decode_key(fields[1], f"known-hosts file {self.path} line {n}"), n))
        return out

    def lookup(self, host: str) -> Optional[Entry]:
        """The entry of `host` (a host_entry() name), if any."""
        return next((e for e in self.entries() if e.host == host), None)

    def policy(self, host: str) -> Callable[[bytes], bool]:
        """A Config.server_key policy for `host`: the recorded key only, or any key when
        there is none yet (the caller records it once connected: record()). The file is
        read now, once: what a connection accepts does not change under it."""
        entry = self.lookup(host)

        def accept(presented: bytes) -> bool:
            if entry is None:
                return True
            if hmac.compare_digest(entry.key, presented):
                return True
            raise ServerKeyRefused(
                f"the server key of {host} has changed: expected {fingerprint(entry.key)} (known-hosts file "
                f"{self.path} line {entry.line}), presented {fingerprint(presented)}; if you know why, accept "
                f"the new key with `stcp known-hosts remove {host}` and connect again")
        return accept

    def record(self, host: str, key: bytes) -> bool:
        """Add `host KEY` unless the host is already there; True if it was added. Creates
        the file (0600) and its directory (0700) as needed."""
        if self.lookup(host) is not None:
            return False
        directory = os.path.dirname(self.path) or "."
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as f:
                if f.tell() and not self._ends_with_newline():
                    f.write("\n")
                f.write(f"{host} {encode_key(key)}\n")
        except OSError as exc:
            raise InvalidKey(f"cannot record the server key in {self.path}: {exc.strerror}") from None
        return True

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def remove(self, host: str) -> int:
        """Delete every line of `host`; the number deleted. Comments and other lines stay."""
        entries = [e for e in self.entries() if e.host == host]
        if not entries:
            return 0
        drop = {e.line for e in entries}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines(keepends=True)
        keep = [line for n, line in enumerate(lines, 1) if n not in drop]
        directory = os.path.dirname(self.path) or "."
        fd, tmp = tempfile.mkstemp(prefix=".known_hosts.", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(keep)
            os.chmod(tmp, os.stat(self.path).st_mode & 0o777)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        return len(entries)
