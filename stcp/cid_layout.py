"""The layout of the connection IDs a server picks for itself (PROTOCOL.md §3.1.1).

    cid = worker (8 bits) || server id (server_id_bits: 0 to 24) || random (the rest, >= 32)

The worker byte lets the kernel steer each record to the process that owns its connection
(the reuseport program of the socket pool, the XDP program of the AF_XDP pool); the server
id lets a CID-aware load balancer route it to the host that owns it, as QUIC-LB does for
QUIC; the random bits keep a CID unguessable. A server with neither workers nor a server
id picks all 64 bits at random, like every client.

This is an agreement between a server, its kernel datapath and its balancer; peers treat
CIDs as opaque.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from .wire import CID_WORKER_BITS, CID_WORKER_SHIFT

if TYPE_CHECKING:
    from .config import Config

MIN_RANDOM_BITS = 32                # what is left to guess is never less than this
MAX_SERVER_ID_BITS = 64 - CID_WORKER_BITS - MIN_RANDOM_BITS       # 24
DEFAULT_SERVER_ID_BITS = 8          # `--server-id` alone: 256 servers, 48 random bits


def check_server_id(server_id: int, bits: int) -> None:
    """ValueError (one line) unless server_id fits in `bits` server-id bits."""
    if not 0 <= bits <= MAX_SERVER_ID_BITS:
        raise ValueError(f"server_id_bits must be between 0 and {MAX_SERVER_ID_BITS} (a CID keeps "
                         f"{CID_WORKER_BITS} worker bits and at least {MIN_RANDOM_BITS} random bits)")
    if not 0 <= server_id < 1 << bits:
        raise ValueError(f"server_id {server_id} does not fit in {bits} server-id bits "
                         f"(0..{(1 << bits) - 1}); raise server_id_bits")


def random_bits(server_id_bits: int) -> int:
    """How many bits of a steering server's CID are random."""
    return 64 - CID_WORKER_BITS - server_id_bits


def worker_of(cid: int) -> int:
    return cid >> CID_WORKER_SHIFT


def server_id_of(cid: int, server_id_bits: int) -> int:
    return (cid >> random_bits(server_id_bits)) & ((1 << server_id_bits) - 1)


def for_worker(config: "Config", worker: Optional[int]) -> "Config":
    """config with the CID prefix of `worker` and config's server id (config.cid_prefix_bits
    and cid_prefix, which Config.new_cid uses). worker None: a server without workers, whose
    CIDs stay fully random unless it has a server id (then its worker byte is 0)."""
    bits = config.server_id_bits
    if worker is None and not bits:
        return config
    return dataclasses.replace(config, cid_prefix_bits=CID_WORKER_BITS + bits,
                               cid_prefix=((worker or 0) << bits) | config.server_id)
