"""The CIDs a server picks for itself (stcp.cid_layout, PROTOCOL.md section 3.1.1): worker
byte, then server id, then random bits; a server with neither stays fully random."""
from __future__ import annotations

import pytest

from stcp import cid_layout
from stcp.connection import Config


def cids(config: Config, n: int = 2000) -> list:
    return [config.new_cid() for _ in range(n)]


def test_worker_then_server_id_then_random():
    for bits, server_id in ((8, 0xAB), (1, 1), (24, 0xABCDEF), (16, 0)):
        config = cid_layout.for_worker(Config(server_id=server_id, server_id_bits=bits), 5)
        rand = cid_layout.random_bits(bits)
        assert rand == 56 - bits >= cid_layout.MIN_RANDOM_BITS
        got = cids(config)
        assert {cid_layout.worker_of(c) for c in got} == {5}
        assert {cid_layout.server_id_of(c, bits) for c in got} == {server_id}
        low = [c & ((1 << rand) - 1) for c in got]
        # every random bit takes both values over 2000 CIDs (each fails with p = 2^-1999)
        assert all(any(x >> b & 1 for x in low) and not all(x >> b & 1 for x in low) for b in range(rand))


def test_a_lone_server_stays_random_and_a_server_id_gives_it_worker_0():
    plain = Config()
    assert cid_layout.for_worker(plain, None) is plain
    assert len({c >> 56 for c in cids(plain)}) > 200          # the top byte is random too
    lone = cid_layout.for_worker(Config(server_id=3, server_id_bits=8), None)
    assert {(c >> 56, c >> 48 & 0xFF) for c in cids(lone)} == {(0, 3)}


def test_server_id_limits():
    with pytest.raises(ValueError, match="between 0 and 24"):
        Config(server_id_bits=25)
    with pytest.raises(ValueError, match="does not fit in 8 server-id bits"):
        Config(server_id=256, server_id_bits=8)
    with pytest.raises(ValueError, match="does not fit in 0 server-id bits"):
        Config(server_id=1)
    Config(server_id=(1 << 24) - 1, server_id_bits=24)
