"""Issue 12, findings 2 and 5: reassembly is bounded and linear, and no record costs more than
a bounded multiple of bulk data (PROTOCOL.md §7, §8.5).

The attacks are made by an authenticated peer (it has the keys), against a server connection.
CPU is asserted as counts of Python line events (sys.settrace) and of held fragments and
pieces, never wall time: bench/hostile.py has the timings.
"""
from __future__ import annotations

import random
import sys
from contextlib import contextmanager

import pytest
from hypothesis import given, settings, strategies as st

from stcp import wire
from stcp.connection import Config
from stcp.errors import CloseCode, ProtocolViolation
from stcp.state import State
from stcp.stream import JOIN_BELOW, MAX_FRAGMENTS, RecvStream
from tests.support.sim import Peer

HDR = wire.STREAM_HEADER_STRUCT


@contextmanager
def line_events(module_files):
    """Count the Python lines executed in the given source files while the block runs."""
    count = [0]

    def tracer(frame, event, arg):
        if frame.f_code.co_filename in module_files:
            if event == "line":
                count[0] += 1
            return tracer
        return None

    sys.settrace(tracer)
    try:
        yield count
    finally:
        sys.settrace(None)


def _core_files():
    import stcp.connection
    import stcp.receive
    import stcp.send
    import stcp.stream
    import stcp.wire
    return {m.__file__ for m in (stcp.connection, stcp.receive, stcp.send, stcp.stream, stcp.wire)}


def test_overlapping_frames_hold_no_more_than_the_window():
    """40,000 overlapping 1,400-byte frames (each 16 bytes past the last, none at offset 0)
    held 63.8 MB against a 16 MiB window: overlaps are now trimmed on insert."""
    p = Peer()
    recv = p.server._recv
    peak = 0
    for i in range(40_000):
        p.feed(p.stream(1 + i * 16, bytes([i % 251]) * 1400))
        peak = max(peak, recv.held)
    span = 1 + 39_999 * 16 + 1400 - 1            # bytes 1 .. end: one fragment
    assert recv.held == span and peak <= recv.max_data - recv.delivered_to <= recv.window
    assert recv.fragments == 1
    assert p.server.state == State.ENCRYPTED
    # the earlier bytes won: the first frame's 1,400 bytes, then 16 new bytes of each next one
    p.feed(p.stream(0, b"\x00"))
    got = p.delivered()
    assert len(got) == span + 1
    assert got[1:1401] == bytes(1400) and got[1401:1417] == b"\x01" * 16 and got[1417:1433] == b"\x02" * 16
    assert recv.held == 0 and recv.fragments == 0


def test_one_byte_frames_then_the_hole_filled_costs_linear_work():
    """20,000 one-byte frames then one 53-byte record filling offset 0 cost 4.09 s (a min() over
    a dict per delivered chunk). They now coalesce into one fragment of few pieces, and the
    record that fills the hole costs a bounded number of Python lines."""
    p = Peer()
    recv = p.server._recv
    for i in range(20_000):
        p.feed(p.stream(1 + i, b"y"))
    assert recv.fragments == 1
    pieces = len(recv._pieces[0])
    assert pieces <= 2 * 20_000 // JOIN_BELOW + 2, f"{pieces} pieces for 20,000 bytes"
    fill = p.stream(0, b"z")
    with line_events(_core_files()) as lines:
        p.feed(fill)
    assert p.delivered() == b"z" + b"y" * 20_000
    assert lines[0] < 400, f"{lines[0]} lines to deliver one record"


def test_a_fragment_beyond_the_cap_is_discarded_unacknowledged():
    """Every other byte, out of order: each opens a hole. Past MAX_FRAGMENTS the records are
    discarded and counted, their packet numbers not marked (the sender sends them again);
    data that extends an existing fragment is still taken, and the stream completes."""
    p = Peer()
    recv = p.server._recv
    n = MAX_FRAGMENTS + 50
    records = [(p.pn + 1, p.stream(2 * i + 1, b"a")) for i in range(n)]
    for _, r in records:
        p.feed(r)
    assert recv.fragments == MAX_FRAGMENTS
    assert p.server.stats.discarded["reassembly"] == 50
    dropped_pn = records[-1][0]
    assert p.server._received.is_duplicate(records[0][0]) and not p.server._received.is_duplicate(dropped_pn)
    # a piece touching held fragments opens nothing: taken even at the cap (it joins two)
    p.feed(p.stream(2, b"b"))
    assert recv.fragments == MAX_FRAGMENTS - 1 and p.server.stats.discarded["reassembly"] == 50
    # the same data again under fresh packet numbers (a retransmission) fills every hole
    whole = b"ab" * n
    for k in range(0, len(whole), 1000):
        p.feed(p.stream(k, whole[k:k + 1000]))
    got = p.delivered()
    assert len(got) == 2 * n and recv.fragments == 0 and recv.held == 0
    assert p.server.state == State.ENCRYPTED


def test_batched_stretch_beyond_the_cap_is_discarded_too():
    p = Peer()
    recv = p.server._recv
    for i in range(MAX_FRAGMENTS):
        p.feed(p.stream(1_000_000 + 2 * i, b"a"))
    before = p.server.stats.discarded["reassembly"]
    run = [p.stream(10 + 100 * k, b"x" * 100) for k in range(8)]       # contiguous, opens a new hole
    p.server.receive_datagrams(run, p.now)
    assert p.server.stats.discarded["reassembly"] == before + 8 and recv.fragments == MAX_FRAGMENTS
    assert p.server.state == State.ENCRYPTED


# --- RecvStream against a model -------------------------------------------------------------
@settings(max_examples=300, deadline=None, derandomize=True)
@given(seed=st.integers(0, 1 << 30), n=st.integers(1, 120))
def test_reassembly_delivers_the_stream_exactly_once(seed, n):
    """Random frames of one stream, overlapping, duplicated, out of order, of all sizes: the
    application gets the stream in order, each byte once, the earlier bytes winning where
    overlapping frames disagree; the structure's invariants hold after every frame."""
    rng = random.Random(seed)
    size = rng.randint(1, 20_000)
    truth = bytes(rng.getrandbits(8) for _ in range(size))
    recv = RecvStream(1 << 20, max_fragments=1 << 30)
    frames = []
    for _ in range(n):
        a = rng.randrange(size)
        b = min(size, a + rng.choice([1, 2, 7, 100, 1400, 5000]))
        frames.append((a, b))
    frames.append((0, size))                     # the whole stream, last (a retransmission)
    rng.shuffle(frames[:-1])
    first_write = bytearray(size)               # what the first frame to cover each byte said
    covered = [False] * size
    out = b""
    for a, b in frames:
        noise = rng.random() < 0.3 and (a, b) != (0, size)
        data = bytes((x ^ 0x5A) if noise else x for x in truth[a:b])
        for k in range(a, b):
            if not covered[k] and k >= len(out):
                covered[k] = True
                first_write[k] = data[k - a]
        out += recv.receive(a, data, False)
        _check_structure(recv, len(out))
    assert out == bytes(first_write)
    assert recv.held == 0 and recv.fragments == 0


def _check_structure(recv: RecvStream, delivered: int) -> None:
    assert recv.delivered_to == delivered
    starts, ends, pieces = recv._starts, recv._ends, recv._pieces
    held = 0
    for i, (a, b, ps) in enumerate(zip(starts, ends, pieces, strict=True)):
        assert delivered < a < b and sum(map(len, ps)) == b - a
        if i:
            assert ends[i - 1] < a                       # a hole between fragments
        for x, y in zip(ps, list(ps)[1:], strict=False):
            assert not ((len(x) < 1024 and len(y) < 4096) or (len(y) < 1024 and len(x) < 4096))
        held += b - a
    assert held == recv.held


# --- frames (finding 5) -----------------------------------------------------------------------
def test_a_padding_run_costs_no_python_loop_per_byte():
    payload = b"\x01" + bytes(100_000) + b"\x01"
    with line_events({wire.__file__}) as lines:
        frames = wire.decode_frames(payload)
    assert frames == [wire.PingFrame(), wire.PaddingFrame(100_000), wire.PingFrame()]
    assert lines[0] < 100


def test_at_most_64_frames_per_record():
    assert len(wire.decode_frames(b"\x01" * 64)) == 64
    with pytest.raises(ProtocolViolation, match="more than 64 frames"):
        wire.decode_frames(b"\x01" * 65)
    assert len(wire.decode_frames(b"\x01" * 63 + bytes(500))) == 64      # a padding run is one frame


def test_a_record_of_65_frames_ends_the_connection():
    p = Peer()
    p.feed(p.seal(b"\x01" * 65))
    assert p.server.close_info.code == CloseCode.PROTOCOL_VIOLATION


@pytest.mark.parametrize("batched", [False, True])
def test_a_record_longer_than_max_datagram_is_discarded(batched):
    """The receiver takes nothing longer than its own max_datagram, authentic or not, from the
    peer or not; on both receive paths."""
    p = Peer(Config(max_datagram=1200))
    big = p.stream(0, b"q" * 1500)
    small = p.stream(1500, b"r" * 10)
    if batched:
        p.server.receive_datagrams([big, small], p.now)
    else:
        p.feed(big)
        p.feed(small)
    assert p.server.stats.discarded["oversize"] == 1
    assert p.server.state == State.ENCRYPTED and p.server._recv.held == 10
