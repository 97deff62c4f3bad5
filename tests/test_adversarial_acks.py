"""Issue 12, finding 6: optimistic acknowledgements (PROTOCOL.md §7.3, §8.2, §8.6).

A client that acknowledged everything without receiving it grew the server's congestion
window to 348 MB in 2 s. The sender now leaves out a random packet number now and then (RFC
9000 §21.4): an acknowledgement of one ends the connection. And the window grows only while
the sender is window-limited (RFC 9002 §7.8).
"""
from __future__ import annotations

import random

from stcp import wire
from stcp.congestion import NewReno
from stcp.errors import CloseCode
from stcp.recovery import STREAM, Recovery, SentPacket
from stcp.replay import ReceivedPackets
from stcp.send import ACK_HORIZON, SKIP_SPAN as _SKIP_SPAN
from stcp.state import State
from tests.support.sim import Link, Pair, Peer

MSS = wire.DEFAULT_MAX_DATAGRAM


def test_an_optimistic_acker_ends_the_connection_before_the_window_grows():
    """The acker knows exactly which packet numbers the server used up and acknowledges all of
    them every millisecond, granting credit it will never use."""
    p = Peer()
    server = p.server
    server.send(bytes(64 << 20))
    peak = server._recovery.cc.cwnd
    sent = 0
    for _ in range(20_000):
        p.now += 0.001
        sent += sum(map(len, server.datagrams_to_send(p.now)))
        if server.state != State.ENCRYPTED:
            break
        p.feed(p.seal(wire.encode_ack([(1, server._next_pn - 1)]) + wire.encode_frame(wire.MaxDataFrame(1 << 40))))
        peak = max(peak, server._recovery.cc.cwnd)
    assert server.close_info is not None and server.close_info.code == CloseCode.PROTOCOL_VIOLATION
    assert "never sent" in server.close_info.reason
    # found within the first skips: the window never got beyond what those records carried
    assert peak < 2 * _SKIP_SPAN * MSS
    assert sent < 4 * _SKIP_SPAN * MSS


def test_honest_peers_never_acknowledge_a_skipped_number():
    """A long transfer with loss, duplication and reordering: the sender skips dozens of
    packet numbers and the receiver's acknowledgements never name one."""
    rng = random.Random(7)

    def fault(d):
        r = rng.random()
        return [] if r < 0.03 else [d, d] if r < 0.05 else [d]
    p = Pair(up=Link(fault=fault, reorder=0.1, seed=3), down=Link(fault=fault, reorder=0.1, seed=4))
    p.run(lambda: bool(p.server_conns) and p.server_conn.state == State.ENCRYPTED)
    data = random.Random(1).randbytes(6 << 20)
    p.client.send(data)
    p.client.shutdown_write()
    p.run(lambda: p.finished["server"] or p.client.is_closed, max_time=300)
    assert bytes(p.received["server"]) == data and not p.closed.get("client")
    assert len(p.client._skipped) >= 10


def test_acks_leave_out_ranges_far_below_the_largest():
    """Skipped numbers leave gaps the receiver reports; ranges lying wholly more than 256
    packet numbers below the largest are not reported again once an ACK has carried them,
    so ACKs stay small."""
    r = ReceivedPackets()
    pn = 1
    for _ in range(100):
        for _ in range(190):
            r.add(pn)
            pn += 1
            if pn % 2 == 0:                       # one ACK per two records
                r.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON)
                r.mark_reported()
        pn += 1                                   # a skipped number
    ranges = r.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON)
    assert ranges[0][1] == pn - 2 and len(ranges) <= ACK_HORIZON // 190 + 2
    assert all(hi >= ranges[0][1] - ACK_HORIZON for _, hi in ranges)


def test_a_batch_of_records_is_acknowledged_whole_however_large():
    """A server that reads a large batch (recvmmsg of GRO buffers) before it sends sends one
    ACK for all of it: ranges the batch left behind the horizon must be in that ACK, or the
    sender never hears of them and retransmits them as lost."""
    r = ReceivedPackets()
    for pn in range(1, 11):
        r.add(pn)
    r.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON)
    r.mark_reported()
    batch = [pn for pn in range(11, 2000) if pn % 300]      # skipped numbers every 300
    for pn in batch:
        r.add(pn)
    reported = {pn for lo, hi in r.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON) for pn in range(lo, hi + 1)}
    assert set(batch) <= reported
    r.mark_reported()
    r.add(2000)
    # once reported, the old ranges fall behind the horizon again
    assert r.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON) == ((1801, 2000), (1501, 1799))


def test_a_lossless_transfer_read_in_large_batches_retransmits_nothing():
    """End to end through the sim with the server reading everything that arrives at once in
    one batch: nothing is lost on the link, so nothing may be retransmitted. (With ranges
    left out before any ACK reported them, 20 MB took 490 spurious retransmissions here and
    the window collapsed with each.)"""
    p = Pair(up=Link(delay=0.002), down=Link(delay=0.002), batched=True)
    p.run(lambda: bool(p.server_conns) and p.server_conn.state == State.ENCRYPTED)
    data = random.Random(2).randbytes(20 << 20)
    p.client.send(data)
    p.run(lambda: len(p.received["server"]) >= len(data), max_time=60)
    assert bytes(p.received["server"]) == data
    assert p.client.stats.retransmitted_records == 0
    assert p.client._recovery.cc.cwnd > 4 * ACK_HORIZON * MSS     # batches far beyond the horizon


def test_the_window_does_not_grow_while_the_sender_is_application_limited():
    rec = Recovery(MSS)
    cwnd = rec.cc.cwnd
    for pn in range(1, 200):                      # one record at a time, each acknowledged
        rec.on_sent(SentPacket(pn, pn * 0.01, MSS, True, [(STREAM, 0, 1, False)], 0))
        rec.on_ack([(pn, pn)], 0.0, pn * 0.01 + 0.005)
    assert rec.cc.cwnd == cwnd
    # a window-limited sender does grow it
    cc = NewReno(MSS)
    cc.on_sent(cc.cwnd)
    assert cc.cwnd_limited()
    before = cc.cwnd
    cc.on_acked(MSS, 0.0, cc.cwnd_limited())
    assert cc.cwnd == before + MSS


def test_a_skip_never_splits_a_bulk_run():
    """The sender skips between runs: every GSO run carries consecutive packet numbers."""
    now = 0.0
    p = Peer()
    c = p.client
    c._peer_max_data = 1 << 40          # as if the server's MAX_DATA had arrived
    c.send(bytes(8 << 20))
    gaps = 0
    last = None
    for _ in range(400):
        now += 0.001
        for buf, size in c.datagram_batches(now):
            seqs = [wire.parse_header(buf[i:i + size])[2] for i in range(0, len(buf), size)]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            if last is not None and seqs[0] != last + 1:
                gaps += 1
            last = seqs[-1]
        c.datagrams_to_send(now)
        acked = c._next_pn - 1
        if acked >= 1:
            ranges = []
            hi = acked
            for s in reversed(c._skipped):
                if s < hi:
                    ranges.append((s + 1, hi))
                    hi = s - 1
            ranges.append((1, hi))
            frame = wire.AckFrame(tuple(r for r in ranges if r[0] <= r[1])[:wire.MAX_ACK_RANGES])
            c._on_ack(frame.ranges, frame.delay_us, now)
    assert c.state == State.ENCRYPTED and gaps == len(c._skipped) >= 5
