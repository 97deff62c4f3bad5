"""Connection behaviour in the in-memory simulator: graceful close, half-close, flow control."""
from __future__ import annotations

import os

from stcp.connection import Config, ConnectionClosed
from stcp.errors import CloseCode
from stcp.state import State
from tests.support.sim import Pair


def established_pair(**kw) -> Pair:
    p = Pair(**kw)
    p.run(lambda: p.client.state == State.ENCRYPTED and p.server_conns
          and p.server_conn.state == State.ENCRYPTED)
    return p


def test_graceful_close_is_reported_when_draining_starts_then_frees_the_connection():
    p = established_pair()
    p.client.send(b"x" * 10_000)
    p.client.shutdown_write()
    p.run(lambda: p.finished["server"])
    p.server_conn.shutdown_write()
    p.run(lambda: "client" in p.closed and "server" in p.closed)
    assert p.closed["client"] == ConnectionClosed(CloseCode.NO_ERROR)
    assert not p.closed["client"].error and not p.closed["server"].error
    # whoever reported first may still be draining (re-acking a lost final ack) ...
    p.run(lambda: p.client.state == State.CLOSED and p.server_conn.state == State.CLOSED, max_time=60)
    # ... but each side reports its close exactly once
    for who in ("client", "server"):
        assert sum(isinstance(e, ConnectionClosed) for e in p.events[who]) == 1
    assert bytes(p.received["server"]) == b"x" * 10_000


def test_half_close_keeps_the_other_direction_open():
    p = established_pair()
    p.client.shutdown_write()
    p.run(lambda: p.finished["server"])
    data = os.urandom(200_000)
    p.server_conn.send(data)                 # the server can still talk after the client finished
    p.run(lambda: len(p.received["client"]) == len(data))
    assert bytes(p.received["client"]) == data
    assert p.client.state == State.ENCRYPTED


def test_flow_control_holds_the_sender_at_the_window_until_the_reader_consumes():
    window = 1 << 20
    p = established_pair(server_config=Config(recv_window=window))
    consumed = []

    def hold(conn, data):        # the application does not read: no credit goes back
        consumed.append(len(data))
    p._drain = _draining_without_consuming(p, hold)
    p.client.send(os.urandom(3 * window))
    p.run(lambda: p.client._send.next_offset >= window and not p.up.queue and not p.down.queue,
          max_time=30)
    for _ in range(20):                                    # time passes (keepalives), nothing more moves
        p.step()
    assert p.client._send.next_offset == window            # stopped exactly at the credit
    p.server_conn.consume(sum(consumed))                   # the reader catches up
    p.run(lambda: p.client._send.next_offset > window, max_time=p.now + 30)
    assert p.client.state == State.ENCRYPTED and p.server_conn.state == State.ENCRYPTED


def _draining_without_consuming(p: Pair, on_data):
    from stcp.connection import DataReceived

    def drain(who, conn):
        while (ev := conn.next_event()) is not None:
            p.events[who].append(ev)
            if isinstance(ev, DataReceived):
                if who == "server":
                    on_data(conn, ev.data)
                else:
                    conn.consume(len(ev.data))
    return drain
