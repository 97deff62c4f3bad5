"""stcp/events.py: what a sans-IO user reads from Connection.next_event."""
from __future__ import annotations

import random

from stcp.events import DataReceived
from stcp.state import State
from tests.support.sim import Link, Pair


def test_data_received_is_its_chunks_joined():
    ev = DataReceived(b"ab")
    ev.add(b"")
    ev.add(b"cde")
    assert ev.size == 5 and ev.chunks == [b"ab", b"", b"cde"]
    assert ev.data == b"abcde" and ev.chunks == [b"abcde"]        # joined once, then kept
    assert ev == DataReceived(b"abcde") and ev != DataReceived(b"abcd")
    assert repr(ev) == "DataReceived(data=b'abcde')"


def test_a_batch_delivers_one_event_in_pieces_and_every_byte_in_order():
    """A server reading a large batch gets one DataReceived for it, made of the pieces the
    records arrived in (nothing copied to join them); the bytes are the sender's, in order."""
    p = Pair(up=Link(delay=0.002), down=Link(delay=0.002), batched=True)
    p.run(lambda: bool(p.server_conns) and p.server_conn.state == State.ENCRYPTED)
    data = random.Random(3).randbytes(2 << 20)
    p.client.send(data)
    p.run(lambda: len(p.received["server"]) >= len(data))
    events = [ev for ev in p.events["server"] if type(ev) is DataReceived]
    assert bytes(p.received["server"]) == data
    assert all(ev.size == len(ev.data) for ev in events)
    assert len(events) < len(data) // 1400 // 8      # many records per event
