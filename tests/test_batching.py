"""The batch paths of the sans-IO core give what the one-record paths give.

The datapaths hand a connection all of its datagrams from one receive batch
(Connection.receive_datagrams) and send runs of bulk records as GSO buffers
(Connection.datagram_batches). A session is run twice with the same payload and the same
faults applied by datagram position: once receiving record by record, once in batches.
Keys differ between the two (fresh X25519), the structure does not, so what the
application sees and what the counters say must be equal.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, List

import pytest

from stcp import wire
from stcp.connection import Config, Connection, ConnectionClosed, DataReceived
from stcp.endpoint import ServerEndpoint
from stcp.recovery import STREAM, SentRun
from stcp.state import State

ADDR = ("192.0.2.7", 4000)
STATS = ("records_received", "duplicates_discarded", "auth_failures", "stale_epoch_discarded",
         "key_updates_received", "stream_bytes_received")


def run_session(payload: bytes, batched: bool, mutate: Callable[[int, List[bytes]], List[bytes]],
                client_config: Config | None = None, rounds: int = 400, from_peer: bool = True) -> dict:
    """Client uploads payload to a server connection; returns what the server side saw."""
    now = 0.0
    endpoint = ServerEndpoint(Config())
    client = Connection.client(dataclasses.replace(client_config or Config(), server_key=endpoint.public_key), now)
    _touched, new = endpoint.receive_batch([(d, ADDR) for d in client.datagrams_to_send(now)], now)
    server = new[0]
    for d in server.datagrams_to_send(now):
        client.receive_datagram(d, now)
    client.send(payload)
    client.shutdown_write()
    received = bytearray()
    kinds: List[str] = []
    for rnd in range(rounds):
        now += 0.002
        batches = client.datagram_batches(now)
        assert all(size <= client.config.max_datagram for _, size in batches)
        datagrams = [buf[i:i + size] for buf, size in batches for i in range(0, len(buf), size)]
        datagrams = mutate(rnd, datagrams)
        if batched:
            server.receive_datagrams(datagrams, now, from_peer)
        else:
            for d in datagrams:
                server.receive_datagram(d, now, from_peer)
        while (ev := server.next_event()) is not None:
            if isinstance(ev, DataReceived):
                received += ev.data
                server.consume(len(ev.data))
                if not kinds or kinds[-1] != "data":
                    kinds.append("data")
            else:
                kinds.append(type(ev).__name__ + (f":{ev.code}" if isinstance(ev, ConnectionClosed) else ""))
        if server.state == State.CLOSED and client.state == State.CLOSED:
            break
        for d in server.datagrams_to_send(now):
            client.receive_datagram(d, now)
        for conn in (client, server):
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
        while client.next_event() is not None:
            pass
        if client.state == State.CLOSED and server.state == State.CLOSED:
            break
    return {"data": bytes(received), "events": kinds, "state": server.state,
            "stats": {k: getattr(server.stats, k) for k in STATS}, "discarded": dict(server.stats.discarded)}


def same_both_ways(payload: bytes, mutate=lambda rnd, ds: ds, **kw) -> dict:
    single = run_session(payload, False, mutate, **kw)
    batched = run_session(payload, True, mutate, **kw)
    assert batched == single
    return batched


PAYLOAD = os.urandom(600_000)


def test_in_order_upload_same_and_whole():
    r = same_both_ways(PAYLOAD)
    assert r["data"] == PAYLOAD
    assert r["events"] == ["HandshakeCompleted", "data", "StreamFinished"]


def test_duplicated_and_reordered_records():
    def mutate(rnd, ds):
        if rnd % 3 == 1 and len(ds) > 6:
            ds = ds[:2] + ds[4:6] + ds[2:4] + ds[6:]        # a swapped pair of pairs
        if rnd % 4 == 2 and len(ds) > 3:
            ds = ds + ds[1:3]                                  # replays at the end of the batch
        if rnd % 5 == 3 and len(ds) > 8:
            ds = ds[:5] + [ds[2]] + ds[5:]                     # a replay in the middle
        return ds
    r = same_both_ways(PAYLOAD, mutate)
    assert r["data"] == PAYLOAD and r["stats"]["duplicates_discarded"] > 0


def test_lost_records_are_retransmitted_into_gaps():
    def mutate(rnd, ds):
        return [d for i, d in enumerate(ds) if not (rnd % 2 == 0 and i % 7 == 3)]
    r = same_both_ways(PAYLOAD, mutate)
    assert r["data"] == PAYLOAD


def test_forged_record_mid_batch_ends_the_connection_after_the_good_ones():
    def mutate(rnd, ds):
        if rnd == 3 and len(ds) > 10:
            bad = bytearray(ds[6])
            bad[-3] ^= 0x40
            ds = ds[:6] + [bytes(bad)] + ds[7:]
        return ds
    r = same_both_ways(PAYLOAD, mutate)
    assert r["stats"]["auth_failures"] == 1
    assert r["state"] == State.CLOSED and r["events"][-1].startswith("ConnectionClosed")
    assert 0 < len(r["data"]) < len(PAYLOAD) and PAYLOAD.startswith(r["data"])


def test_key_updates_inside_batches():
    r = same_both_ways(PAYLOAD, client_config=Config(key_update_interval=37))
    assert r["data"] == PAYLOAD and r["stats"]["key_updates_received"] >= 3


def test_bulk_goes_out_as_gso_runs():
    """Full records of new data leave as runs of equal-sized records with consecutive seqs,
    and each record of a run is what the receiver would take on its own."""
    now = 0.0
    endpoint = ServerEndpoint(Config())
    client = Connection.client(Config(server_key=endpoint.public_key), now)
    _, new = endpoint.receive_batch([(d, ADDR) for d in client.datagrams_to_send(now)], now)
    server = new[0]
    for d in server.datagrams_to_send(now):
        client.receive_datagram(d, now)
    client.send(bytes(200_000))
    runs = [(buf, size) for buf, size in client.datagram_batches(now) if size < len(buf)]
    assert runs, "no GSO run for bulk data"
    for buf, size in runs:
        assert size == client.config.max_datagram and len(buf) % size == 0
        seqs = [wire.parse_header(buf[i:i + size])[2] for i in range(0, len(buf), size)]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        for i in range(0, len(buf), size):
            server.receive_datagram(buf[i:i + size], now)
    assert server.state == State.ENCRYPTED and server.stats.auth_failures == 0


def _established_client():
    now = 0.0
    endpoint = ServerEndpoint(Config())
    client = Connection.client(Config(server_key=endpoint.public_key), now)
    _, new = endpoint.receive_batch([(d, ADDR) for d in client.datagrams_to_send(now)], now)
    for d in new[0].datagrams_to_send(now):
        client.receive_datagram(d, now)
    client._peer_max_data = 1 << 40          # as if the server's MAX_DATA had arrived
    client._recovery.cc.cwnd = 1 << 30
    return client


def _seqs(buf, size):
    return [wire.parse_header(buf[i:i + size])[2] & wire.PN_MASK for i in range(0, len(buf), size)]


@pytest.mark.parametrize("skip_in", [10_000, 100])
def test_a_run_of_several_gso_buffers_is_one_recovery_entry_and_ends_at_a_skip(skip_in):
    """With the window open, one run fills several GSO buffers (each within the kernel's
    limits) with consecutive packet numbers and is one entry in recovery; a skip that falls
    due inside it ends it, so runs of several buffers skip no later than runs of one."""
    client = _established_client()
    skip_at = client._skip_at = client._next_pn + skip_in
    client.send(bytes(2 << 20))
    size = client.config.max_datagram
    batches = [(buf, seg) for buf, seg in client.datagram_batches(0.0) if seg < len(buf)]
    runs = [g for g in client._recovery.sent if isinstance(g[2], SentRun)]
    first_pn, last_pn, run = runs[0]
    in_run = [b for b in batches if _seqs(*b)[0] <= last_pn]
    assert len(in_run) > 1 and run.count == last_pn - first_pn + 1
    assert all(len(buf) <= 65000 and len(buf) // seg <= 64 for buf, seg in batches)
    pns = [pn for b in in_run for pn in _seqs(*b)]
    assert pns == list(range(first_pn, last_pn + 1))
    if skip_in == 100:
        assert last_pn == skip_at - 1 and skip_at in client._skipped and runs[1][0] == skip_at + 1
    else:
        assert run.count == 4 * (65000 // size)
    end = run.offset + run.count * run.chunk
    assert run.frames_between(first_pn, last_pn) == [(STREAM, run.offset, end, False)]
    assert runs[1][2].offset == end                   # the next run goes on where this one ended


@pytest.mark.parametrize("cut", [1, 23, 60])
def test_malformed_datagrams_in_a_batch(cut):
    """Short and mis-framed datagrams in a batch end the connection as they would alone."""
    def mutate(rnd, ds):
        if rnd == 2 and len(ds) > 4:
            ds = ds[:3] + [ds[3][:cut]] + ds[4:]
        return ds
    r = same_both_ways(PAYLOAD, mutate)
    assert r["state"] == State.CLOSED


@pytest.mark.parametrize("cut", [1, 23, 60])
def test_bad_records_from_a_stranger_are_discarded_the_same_both_ways(cut):
    """From an address not the peer's (from_peer=False), forged, cut, oversize and
    next-but-one-epoch records in a batch are discarded and counted exactly as one by one,
    and the upload completes."""
    def mutate(rnd, ds):
        if 2 <= rnd <= 40 and len(ds) > 6:
            forged = bytearray(ds[4])
            forged[-3] ^= 0x40
            length, cid, seq = wire.HEADER_STRUCT.unpack_from(ds[5])
            ahead = wire.HEADER_STRUCT.pack(length, cid, seq + (2 << wire.EPOCH_SHIFT)) + ds[5][24:]
            big = wire.HEADER_STRUCT.pack(1600, cid, seq + 5000) + bytes(1600)
            ds = ds[:3] + [bytes(forged), ds[3][:cut], ahead, big] + ds[3:]
        return ds
    r = same_both_ways(PAYLOAD, mutate, from_peer=False)
    assert r["data"] == PAYLOAD and r["events"][-1] == "StreamFinished"
    assert r["discarded"]["auth"] > 0 and r["discarded"]["key_epoch"] > 0 and r["discarded"]["oversize"] > 0
    assert r["discarded"]["malformed"] > 0 and r["stats"]["auth_failures"] == 0
