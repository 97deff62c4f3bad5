"""What a Connection (and a ServerEndpoint) is configured with: Config.

The fields are checked once, at construction, with an error that names the field and the
allowed range; what costs something to derive from them (the static key's public half, the
stateless-reset key) is derived here once, not per connection.
"""
from __future__ import annotations

import os
from dataclasses import InitVar, dataclass, field
from typing import Collection, Optional, Tuple

from . import wire
from .cid_layout import check_server_id
from .crypto import CONFIDENTIALITY_LIMIT, reset_key
from .handshake import ServerKeyPolicy
from .identity import KEY_LEN, StaticKey


@dataclass
class Config:
    suite: int = wire.SUITE_AES_256_GCM     # the cipher's number; by name: cipher= below
    accepted_suites: Tuple[int, ...] = (wire.SUITE_AES_256_GCM, wire.SUITE_CHACHA20_POLY1305)
    max_datagram: int = wire.DEFAULT_MAX_DATAGRAM
    handshake_timeout: float = 10.0
    hello_retransmit: float = 0.2          # first client-hello retransmission; doubles each time
    idle_timeout: float = 30.0
    keepalive: Optional[float] = 10.0      # ping after this much silence; None disables
    recv_window: int = 16 << 20
    key_update_interval: int = 1 << 22     # records sealed under one key before updating it
    cid_prefix_bits: int = 0               # top CID bits a datapath fixes (stcp.cid_layout.for_worker)
    cid_prefix: int = 0
    # server: this host's id in its CIDs, for a CID-aware load balancer (stcp.cid_layout,
    # PROTOCOL.md section 3.1.1); 0 bits: no server id
    server_id: int = 0
    server_id_bits: int = 0
    # server: bytes of stream buffers all connections together may hold (stcp.budget);
    # None: an eighth of the machine's memory, at most 1 GiB
    memory_budget: Optional[int] = None
    # identity (PROTOCOL.md section 5). static_key: this side's X25519 private key, 32 raw
    # bytes: a server's identity (None: ServerEndpoint makes a fresh one), a client's key to
    # prove with CLIENT_AUTH (None: it proves none).
    static_key: Optional[bytes] = field(default=None, repr=False)
    # client: the server static key it accepts: the pinned public key, a callable deciding on
    # the presented key (True accepts), or None for any key (no protection from an active attacker)
    server_key: ServerKeyPolicy = None
    # server: the client public keys it admits (a valid CLIENT_AUTH proof required); None: anyone
    allowed_clients: Optional[Collection[bytes]] = None
    # server hello path under load (section 4.5): hellos per second that may reach X25519
    # without a cookie, the bucket's depth, and the half-open connections above which a
    # cookie is required (None: min(4096, max_connections)); twice that is a hard cap
    hello_rate: float = 2000.0
    hello_burst: int = 500
    max_half_open: Optional[int] = None
    reset_rate: float = 1000.0             # stateless RESETs per second, at most (section 5.7)
    # the cipher by name, as the CLI's --cipher: 'aes-256-gcm' or 'chacha20-poly1305' (sets suite)
    cipher: InitVar[Optional[str]] = None

    def __post_init__(self, cipher: Optional[str] = None) -> None:
        if cipher is not None:
            self.suite = wire.suite_number(cipher)
        elif isinstance(self.suite, str):
            raise ValueError(f"suite is a cipher suite number; name the cipher with cipher={self.suite!r}")
        self.suite = wire.suite_number(self.suite)
        self.accepted_suites = tuple(wire.suite_number(s) for s in self.accepted_suites)
        if not wire.HANDSHAKE_RECORD_LEN <= self.max_datagram <= wire.MAX_UDP_PAYLOAD:
            raise ValueError(f"max_datagram must be between {wire.HANDSHAKE_RECORD_LEN} and {wire.MAX_UDP_PAYLOAD}")
        limit = min(CONFIDENTIALITY_LIMIT[s] for s in self.accepted_suites + (self.suite,))
        if not 1 <= self.key_update_interval <= limit // 2:
            raise ValueError(f"key_update_interval must be between 1 and {limit // 2}")
        if self.static_key is not None and len(self.static_key) != KEY_LEN:
            raise ValueError(f"static_key must be {KEY_LEN} raw bytes")
        if isinstance(self.server_key, (bytes, bytearray)) and len(self.server_key) != KEY_LEN:
            raise ValueError(f"server_key must be the server's {KEY_LEN}-byte public key")
        if self.allowed_clients is not None:
            allowed = frozenset(bytes(k) for k in self.allowed_clients)
            if any(len(k) != KEY_LEN for k in allowed):
                raise ValueError(f"allowed_clients must hold {KEY_LEN}-byte public keys")
            self.allowed_clients = allowed
        if self.hello_rate < 0 or self.hello_burst < 0 or self.reset_rate < 0:
            raise ValueError("hello_rate, hello_burst and reset_rate cannot be negative")
        if self.max_half_open is not None and self.max_half_open < 1:
            raise ValueError("max_half_open must be at least 1 (or None for the default)")
        check_server_id(self.server_id, self.server_id_bits)
        # derived once: the public key costs an X25519 base-point multiplication
        self.identity: Optional[StaticKey] = StaticKey(self.static_key) if self.static_key is not None else None
        self.reset_key: Optional[bytes] = reset_key(self.static_key) if self.static_key is not None else None

    def new_cid(self) -> int:
        while True:
            bits = 64 - self.cid_prefix_bits
            cid = int.from_bytes(os.urandom(8), "big") & ((1 << bits) - 1)
            if self.cid_prefix_bits:
                cid |= self.cid_prefix << bits
            if cid:
                return cid
