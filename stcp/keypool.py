"""Server ephemeral keys made ahead of need: a bounded pool, each key handed out once.

A server hello needs a fresh X25519 key pair f, F (docs/PROTOCOL.md section 5); making it is
the costliest step of the server's handshake after the two DHs, and nothing about it
depends on the hello. So the datapath makes keys when it has nothing else to do
(`refill`, a few at a time) and the hello path takes one (`take`). Every key is fresh and
used once: `take` removes it from the pool, nothing else reads the pool, and from an empty
pool the handshake makes its key on the spot (stcp.handshake.ServerHandshake), so a burst
of hellos is never refused for want of one. The pool is bounded (`size` keys, 32 bytes of secret each).

What a key in the pool costs forward secrecy: nothing a session depends on. An unused key
protects no traffic yet; one taken is gone from the pool, and its handshake forgets it as
before (ServerHandshake.finish). A forked child (a worker of a pool) must not share its
parent's keys: `take` and `refill` notice a change of process and drop every key made
before it, as OpenSSL's random generator reseeds across fork.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Callable, Deque, Optional, Tuple

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .crypto import generate_keypair

KeyPair = Tuple[X25519PrivateKey, bytes]
POOL_SIZE = 64        # keys kept ready: a burst of 64 hellos without a key generation in its path
REFILL_STEP = 4       # keys made per refill call, so a refill delays arriving datagrams little


class EphemeralKeys:
    """A bounded pool of fresh X25519 key pairs (private key, 32-byte public key)."""

    def __init__(self, size: int = POOL_SIZE, generate: Callable[[], KeyPair] = generate_keypair):
        if size < 0:
            raise ValueError(f"a key pool holds 0 keys or more, not {size}")
        self.size = size
        self._generate = generate
        self._keys: Deque[KeyPair] = deque()
        self._pid = os.getpid()
        self.taken_ready = 0         # keys handed out from the pool
        self.misses = 0              # take() found the pool empty (the handshake made its own key)
        self.made_ahead = 0          # keys made by refill()
        self.dropped_at_fork = 0     # keys a forked child found and threw away

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def wanted(self) -> int:
        """How many keys refill() would make to fill the pool."""
        self._check_process()
        return self.size - len(self._keys)

    def take(self) -> Optional[KeyPair]:
        """A key pair no one else has had or will have, or None when the pool is empty."""
        self._check_process()
        if self._keys:
            self.taken_ready += 1
            return self._keys.popleft()
        self.misses += 1
        return None

    def refill(self, limit: int = REFILL_STEP) -> int:
        """Make up to `limit` keys, never past `size`; return how many were made."""
        self._check_process()
        n = max(0, min(limit, self.size - len(self._keys)))
        for _ in range(n):
            self._keys.append(self._generate())
        self.made_ahead += n
        return n

    def clear(self) -> None:
        """Forget every key in the pool (a server shutting down)."""
        self._keys.clear()

    def _check_process(self) -> None:
        pid = os.getpid()
        if pid != self._pid:
            self.dropped_at_fork += len(self._keys)
            self._keys.clear()
            self._pid = pid
