"""Recovery's segment bookkeeping: runs acknowledged and lost in parts give exactly what a
packet-by-packet account of the same sends and ACKs gives (RFC 9002 §6.1 thresholds)."""
import random

import pytest

from stcp import wire
from stcp.recovery import PACKET_THRESHOLD, STREAM, Recovery, SentPacket, SentRun
from stcp.replay import ReceivedPackets
from stcp.send import ACK_HORIZON

MSS = 1200
CHUNK = 1000


def _run(rec: Recovery, pn: int, count: int, t: float, offset: int = 0, fin: bool = False) -> SentRun:
    run = SentRun(pn, t, MSS, 0, count, offset, CHUNK, fin)
    rec.on_sent_run(run)
    return run


def _spans(groups):
    return [(lo, hi) for lo, hi, _ in groups]


def test_an_ack_inside_a_run_splits_it_and_keeps_both_ends_in_flight():
    rec = Recovery(MSS)
    run = _run(rec, 10, 64, 0.0, fin=True)              # pns 10..73
    acked, lost = rec.on_ack([(30, 40)], 0.0, 0.001)
    assert _spans(acked) == [(30, 40)] and acked[0][2] is run
    assert acked[0][2].frames_between(30, 40) == [(STREAM, 20 * CHUNK, 31 * CHUNK, False)]
    assert _spans(lost) == [(10, 29)] and lost[0][2] is run      # 3 or more below 40
    assert rec.sent == [(41, 73, run)] and rec.loss_time is None
    assert rec.ack_eliciting_in_flight == 33 and rec.cc.bytes_in_flight == 33 * MSS
    acked, lost = rec.on_ack([(72, 73)], 0.0, 0.001)
    assert _spans(acked) == [(72, 73)] and acked[0][2].frames_between(72, 73)[0][3]      # the FIN record
    # 71 is less than 3 below 73 and was sent too recently: it waits for the time threshold
    assert _spans(lost) == [(41, 70)] and rec.sent == [(71, 71, run)]
    assert rec.loss_time is not None and rec.ack_eliciting_in_flight == 1
    assert rec.detect_lost(rec.loss_time) == [(71, 71, run)] and not rec.sent


def test_one_record_lost_in_a_run_is_the_only_one_declared_lost():
    rec = Recovery(MSS)
    run = _run(rec, 0, 64, 0.0)
    acked, lost = rec.on_ack([(18, 63), (0, 16)], 0.0, 0.001)       # pn 17 never arrived
    assert _spans(acked) == [(0, 16), (18, 63)] and lost and _spans(lost) == [(17, 17)]
    assert lost[0][2] is run and run.frames_between(17, 17) == [(STREAM, 17 * CHUNK, 18 * CHUNK, False)]
    assert rec.sent == [] and rec.ack_eliciting_in_flight == 0 and rec.cc.bytes_in_flight == 0


def test_adjacent_ack_ranges_over_one_run_give_one_group():
    rec = Recovery(MSS)
    run = _run(rec, 0, 10, 0.0)
    acked, lost = rec.on_ack([(5, 9), (0, 4)], 0.0, 0.001)
    assert acked == [(0, 9, run)] and lost == []


@pytest.mark.parametrize("ack_every", [100, 640])
def test_a_run_spanning_the_ack_horizon_is_acknowledged_once_and_only_its_hole_is_lost(ack_every):
    """The receiver gets ten runs with one hole near the start and acknowledges every
    `ack_every` records: the hole's lower range falls past ACK_HORIZON (or lies past it when
    the one ACK goes out) and the sender, fed only what ack_ranges reports, acknowledges
    every record that arrived and declares exactly the hole lost."""
    rec, received = Recovery(MSS), ReceivedPackets()
    for pn in range(0, 640, 64):
        _run(rec, pn, 64, 0.0, offset=pn * CHUNK)
    hole = 5
    acked_pns, lost_pns = [], []
    now = 0.0
    for pn in range(640):
        if pn != hole:
            received.add(pn)
        if pn % ack_every == ack_every - 1 or pn == 639:
            now += 0.0001
            ranges = received.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON)
            received.mark_reported()
            acked, lost = rec.on_ack(ranges, 0.0, now)
            acked_pns += [n for lo, hi, _ in acked for n in range(lo, hi + 1)]
            lost_pns += [n for lo, hi, _ in lost for n in range(lo, hi + 1)]
    assert received.ack_ranges(wire.MAX_ACK_RANGES, ACK_HORIZON)[-1][0] > hole      # past the horizon
    assert sorted(acked_pns) == [pn for pn in range(640) if pn != hole]
    assert lost_pns == [hole] and not rec.sent
    assert rec.ack_eliciting_in_flight == 0 and rec.cc.bytes_in_flight == 0


def test_the_loss_timer_follows_the_oldest_record_still_waiting():
    rec = Recovery(MSS)
    _run(rec, 0, 10, 0.0)                                # pns 0..9
    single = SentPacket(10, 0.0005, 100, True, [(STREAM, 0, 1, False)], 0)
    rec.on_sent(single)
    _run(rec, 11, 2, 0.001)                              # pns 11, 12
    _, lost = rec.on_ack([(12, 12)], 0.0, 0.0012)
    assert _spans(lost) == [(0, 9)]                       # 3 or more below 12
    assert rec.sent == [(10, 10, single), (11, 11, rec.sent[1][2])]
    delay = max(9 / 8 * max(rec.rtt.latest, rec.rtt.smoothed), 0.001)
    assert rec.loss_time == 0.0005 + delay               # pn 10's, not pn 11's
    assert rec.detect_lost(0.0005 + delay) == [(10, 10, single)]
    assert rec.loss_time == 0.001 + delay


def _groups(pns, objs):
    """Maximal runs of consecutive pns sent in one object: the packet-by-packet account."""
    out = []
    for pn, p in zip(pns, objs, strict=True):
        if out and out[-1][2] is p and out[-1][1] + 1 == pn:
            out[-1] = (out[-1][0], pn, p)
        else:
            out.append((pn, pn, p))
    return out


def _random_ranges(r: random.Random, top: int):
    """ACK ranges as the wire carries them: highest first, neither overlapping nor adjacent."""
    out, high = [], top
    while high >= 0 and len(out) < 6:
        low = max(0, high - r.randrange(0, 80))
        out.append((low, high))
        high = low - 2 - r.randrange(0, 40)
    return out


def test_segments_agree_with_a_packet_by_packet_account_under_random_acks():
    for seed in range(40):
        r = random.Random(seed)
        rec = Recovery(MSS)
        flight = {}                          # pn -> (time_sent, eliciting, object), in pn order
        pn, now = 0, 0.0
        for _ in range(300):
            now += r.choice((0.0, 0.0001, 0.002, 0.05))
            op = r.random()
            if op < 0.45:
                pn += r.random() < 0.1       # a skipped packet number now and then
                if r.random() < 0.7:
                    count = r.randrange(2, 65)
                    run = _run(rec, pn, count, now, offset=pn * CHUNK)
                    flight.update((n, (now, True, run)) for n in range(pn, pn + count))
                    pn += count
                else:
                    eliciting = r.random() < 0.8
                    p = SentPacket(pn, now, 100, eliciting, [(STREAM, 0, 1, False)] if eliciting else [], 0)
                    rec.on_sent(p)
                    flight[pn] = (now, eliciting, p)
                    pn += 1
                continue
            elif op < 0.9 and pn:
                ranges = _random_ranges(r, r.randrange(max(0, pn - 200), pn))
                before = rec.largest_acked
                acked, lost = rec.on_ack(ranges, 0.0, now)
                want = [n for n in flight if any(lo <= n <= hi for lo, hi in ranges)]
                assert acked == _groups(want, [flight[n][2] for n in want])
                if want and ranges[0][1] > before and want[-1] == ranges[0][1] and flight[want[-1]][1]:
                    assert rec.rtt.latest == now - flight[want[-1]][0]
                for n in want:
                    del flight[n]
                if not acked:
                    assert lost == []
                    continue
            else:
                lost = rec.detect_lost(now)
            largest = rec.largest_acked
            delay = max(9 / 8 * max(rec.rtt.latest, rec.rtt.smoothed), 0.001)
            gone = [n for n, (t, _, _) in flight.items()
                    if n <= largest and (largest - n >= PACKET_THRESHOLD or t + delay <= now)]
            assert lost == _groups(gone, [flight[n][2] for n in gone])
            for n in gone:
                del flight[n]
            waiting = [t for n, (t, _, _) in flight.items() if n <= largest]
            assert rec.loss_time == (waiting[0] + delay if waiting else None)
            expanded = [n for lo, hi, _ in rec.sent for n in range(lo, hi + 1)]
            assert expanded == list(flight)
            assert all(a[1] + 1 < b[0] or a[2] is not b[2] for a, b in zip(rec.sent, rec.sent[1:], strict=False))
            assert rec.ack_eliciting_in_flight == sum(e for _, e, _ in flight.values())
            assert rec.cc.bytes_in_flight == sum((MSS if isinstance(p, SentRun) else 100)
                                                 for _, e, p in flight.values() if e)
            oldest = rec.oldest_ack_eliciting()
            first = next((n for n, (_, e, _) in flight.items() if e), None)
            assert (oldest is None and first is None) or (oldest[:2] == (first, first)
                                                          and oldest[2] is flight[first][2])
