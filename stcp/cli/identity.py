"""Keys on the command line: `stcp keygen`, `stcp pubkey`, `stcp known-hosts`, and the key
options of `serve` (--key, --state-dir, --allow-clients) and of `connect` / `tunnel`
(--server-key, --known-hosts, --key)."""
from __future__ import annotations

import hmac
import sys
from typing import Any, Callable, List, Optional, Tuple

from ..handshake import ServerKeyRefused
from ..identity import (
    decode_key,
    encode_key,
    fingerprint,
    generate_private_key,
    load_private_key,
    load_public_keys,
    public_key,
    read_private_key,
    save_private_key,
    state_dir_key,
)
from ..known_hosts import KnownHosts, host_entry


def describe_key(public: bytes) -> str:
    """'BASE64 (SHA256:...)': how a server key is shown to people."""
    return f"{encode_key(public)} ({fingerprint(public)})"


# --- stcp keygen / pubkey / known-hosts ----------------------------------------------
async def keygen(args: Any) -> int:
    private = generate_private_key()
    save_private_key(args.out, private)
    print(encode_key(public_key(private)))
    return 0


async def pubkey(args: Any) -> int:
    text = sys.stdin.read(4096)
    print(encode_key(public_key(read_private_key(text, "the private key on stdin"))))
    return 0


async def known_hosts(args: Any) -> int:
    from .common import parse_hostport
    kh = KnownHosts(args.known_hosts)
    if args.action == "list":
        for e in kh.entries():
            print(f"{e.host} {encode_key(e.key)} {fingerprint(e.key)}")
        return 0
    host = host_entry(*parse_hostport(args.address))
    n = kh.remove(host)
    if not n:
        print(f"stcp: {host} is not in {kh.path}", file=sys.stderr)
        return 1
    print(f"stcp: removed {host} from {kh.path}; the next connection records the key it presents",
          file=sys.stderr)
    return 0


# --- stcp serve ------------------------------------------------------------------------
def server_identity(args: Any) -> Tuple[bytes, str]:
    """The private key `serve` runs under (--key FILE, else the state directory's) and a
    note for the startup lines when one was made."""
    if args.key:
        return load_private_key(args.key), ""
    private, path, made = state_dir_key(args.state_dir)
    return private, (f"made a new server key in {path}: clients pin its public key, keep the file" if made else "")


def allowed_clients(args: Any) -> Optional[List[bytes]]:
    return load_public_keys(args.allow_clients) if args.allow_clients else None


# --- stcp connect / tunnel ---------------------------------------------------------------
class ServerCheck:
    """The client side's server-key policy from the command line: --server-key (pinned) or
    the known-hosts file (trust on first use). Call it as Config.server_key; `refused` is
    the last key it refused (the handshake fails at its timeout if nothing better came);
    after a connection, `connected(key)` records a first-used key and says so once."""

    def __init__(self, args: Any, host: str, port: int):
        self.host = host_entry(host, port)
        self.pinned = decode_key(args.server_key, "--server-key") if args.server_key else None
        self.known = None if self.pinned is not None else KnownHosts(args.known_hosts)
        if self.known is not None:
            self.known.entries()              # a corrupt file fails here, once, not per connection
        self.refused: Optional[bytes] = None
        self._told = False

    def policy(self) -> Callable[[bytes], bool]:
        """A fresh policy for one connection (the known-hosts file read now)."""
        if self.pinned is not None:
            pinned = self.pinned

            def accept(presented: bytes) -> bool:
                if hmac.compare_digest(pinned, presented):
                    return True
                self.refused = presented
                raise ServerKeyRefused(f"expected server key {fingerprint(pinned)} (--server-key), "
                                       f"presented {fingerprint(presented)}")
            return accept
        assert self.known is not None
        check = self.known.policy(self.host)

        def accept_known(presented: bytes) -> bool:
            try:
                return check(presented)
            except ServerKeyRefused:
                self.refused = presented
                raise
        return accept_known

    def connected(self, key: bytes) -> None:
        if self.known is not None and self.known.record(self.host, key) and not self._told:
            self._told = True
            print(f"stcp: first connection to {self.host}: trusting its server key {fingerprint(key)} and "
                  f"recording it in {self.known.path} (pin it instead with --server-key {encode_key(key)})",
                  file=sys.stderr, flush=True)


def client_key(args: Any) -> Optional[bytes]:
    return load_private_key(args.key) if args.key else None

