"""The request/response fast paths of the sans-IO core act as the general paths do.

A small message and its echo each take one record: the send side builds it in one pass
(SendPath._small_record, its frames from wire.encode_ack_stream) and the receive side takes
a record holding an ACK, a STREAM frame or both without the frame list
(wire.decode_ack_stream); both are stcp._frames when it is built. An ACK of the one record
in flight skips the bisections (Recovery.on_ack's one-in-flight case). The same
request/response session is run with those paths on and off, with everything random made
repeatable (connection IDs, the server's key, the packet numbers left out, the link's
faults): every record sealed must
have the same sequence number and plaintext, and both applications must see the same.
"""
from __future__ import annotations

import itertools
import random

import pytest

from stcp import connection, crypto, send, wire
from stcp.connection import Config, Connection
from tests.support.sim import Link, Pair

SERVER_KEY = bytes(range(1, 33))
_SEAL = crypto.RecordKey.seal


def session(monkeypatch, small: bool, loss: float, sizes, pause_every: int = 0,
            key_update_interval: int = 1 << 22) -> dict:
    rng = random.Random(5)
    monkeypatch.setattr(send, "skip_gap", lambda: 1 + rng.randrange(send.SKIP_SPAN - 1))
    monkeypatch.setattr(connection, "skip_gap", send.skip_gap)
    cids = itertools.count(0x1000)
    monkeypatch.setattr(Config, "new_cid", lambda self: next(cids))
    monkeypatch.setattr(Connection, "_small_path", small)
    sealed = []
    seal = _SEAL

    def recording_seal(self, cid, seq, plaintext):
        sealed.append((seq, bytes(plaintext)))
        return seal(self, cid, seq, plaintext)

    monkeypatch.setattr(crypto.RecordKey, "seal", recording_seal)
    fault_rng = random.Random(9)

    def fault(d):
        return [] if fault_rng.random() < loss else [d]

    p = Pair(client_config=Config(key_update_interval=key_update_interval),
             server_config=Config(static_key=SERVER_KEY, key_update_interval=key_update_interval),
             up=Link(0.001, fault, reorder=0.2, seed=3), down=Link(0.001, fault, reorder=0.2, seed=4))
    p.on_server_data = lambda conn, data: conn.send(data)
    p.run(lambda: p.server_conns and p.client.state.value == "ENCRYPTED"
          and p.server_conn.state.value == "ENCRYPTED")
    expected = 0
    for i, size in enumerate(sizes):
        msg = bytes([i % 251]) * size
        p.client.send(msg)
        expected += size
        p.run(lambda want=expected: len(p.received["client"]) >= want)
        if pause_every and i % pause_every == pause_every - 1:
            p.now += 0.05                 # longer than the delayed-ACK timer: ACK-only records
            p.step()
    p.client.shutdown_write()
    p.run(lambda: p.finished["server"])
    p.server_conn.shutdown_write()
    p.run(lambda: p.client.is_closed and p.server_conn.is_closed)
    return {"sealed": sealed, "client": bytes(p.received["client"]), "server": bytes(p.received["server"]),
            "client_stats": p.client.stats, "server_stats": p.server_conn.stats,
            "closed": dict(p.closed)}


@pytest.fixture(params=["c", "reference"])
def codec(request, monkeypatch):
    """The small paths with stcp._frames (when built) and with the wire references, the
    fallback a build without the C module runs."""
    if request.param == "reference":
        monkeypatch.setattr(wire, "encode_ack_stream", wire.encode_ack_stream_ref)
        monkeypatch.setattr(wire, "decode_ack_stream", wire.decode_ack_stream_ref)
    elif not wire.FRAMES_ACCELERATED:
        pytest.skip("the C frame codec is not built (pip install -e .)")
    return request.param


@pytest.mark.parametrize("loss,pause_every,key_update_interval", [
    (0.0, 0, 1 << 22),        # the common case: every message and echo in one record each
    (0.0, 7, 1 << 22),        # pauses: the delayed ACK goes out alone
    (0.15, 5, 40),            # loss and reordering: retransmissions, probes, key updates between
])
def test_small_paths_seal_and_deliver_what_the_general_paths_do(monkeypatch, codec, loss, pause_every,
                                                                key_update_interval):
    sizes = [64, 1, 1024, 1300, 3000, 64, 16384, 200] * 12
    fast = session(monkeypatch, True, loss, sizes, pause_every, key_update_interval)
    general = session(monkeypatch, False, loss, sizes, pause_every, key_update_interval)
    assert fast["client"] == general["client"] == b"".join(bytes([i % 251]) * s for i, s in enumerate(sizes))
    assert len(fast["sealed"]) == len(general["sealed"])
    for i, (a, b) in enumerate(zip(fast["sealed"], general["sealed"], strict=True)):
        assert a == b, f"record {i} differs"
    assert fast == general


def test_small_paths_are_taken(monkeypatch):
    """The equality above means something only if the fast paths run: count them."""
    calls = {"small": 0, "ack_first": 0}
    small, decode = send.SendPath._small_record, wire.decode_ack_stream

    def counting_small(self, now):
        record = small(self, now)
        calls["small"] += bool(record)
        return record

    def counting_decode(plaintext):
        parsed = decode(plaintext)
        calls["ack_first"] += parsed is not None and parsed[0] is not None
        return parsed

    monkeypatch.setattr(send.SendPath, "_small_record", counting_small)
    monkeypatch.setattr(wire, "decode_ack_stream", counting_decode)
    session(monkeypatch, True, 0.0, [64] * 50)
    assert calls["small"] >= 100 and calls["ack_first"] >= 98
