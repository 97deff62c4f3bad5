"""Congestion control (NewReno + HyStart++) and loss recovery of bulk runs, sans-IO."""
from __future__ import annotations

from stcp.congestion import CSS_ROUNDS, INF, MIN_RTT_THRESH, N_RTT_SAMPLE, NewReno
from stcp.recovery import STREAM, Recovery, SentPacket, SentRun

MSS = 1452


def feed_round(cc: NewReno, rtt: float, round_no: int, samples: int = N_RTT_SAMPLE) -> None:
    """One round of `samples` RTT samples; packet numbers 100 per round."""
    base = round_no * 100
    for i in range(samples):
        cc.on_rtt_sample(rtt, base + i + 1, base + 100)


def test_slow_start_continues_while_rtt_is_flat():
    cc = NewReno(MSS)
    for r in range(10):
        feed_round(cc, 0.001, r)
    assert cc.ssthresh == INF and cc.slow_start_exits == 0


def test_rtt_rise_enters_conservative_slow_start_then_congestion_avoidance():
    cc = NewReno(MSS)
    feed_round(cc, 0.001, 0)
    feed_round(cc, 0.001 + MIN_RTT_THRESH * 1.5, 1)        # the minimum rose by more than 4 ms
    assert cc.slow_start_exits == 1 and cc.ssthresh == INF
    before = cc.cwnd
    cc.on_acked(4 * MSS, time_sent=1.0)
    assert cc.cwnd == before + MSS                           # a quarter of what was acked
    for r in range(2, 2 + CSS_ROUNDS):
        feed_round(cc, 0.001 + MIN_RTT_THRESH * 1.5, r)
    assert cc.ssthresh == cc.cwnd                            # congestion avoidance from here
    window = cc.cwnd
    cc.on_acked(MSS, time_sent=2.0)
    assert cc.cwnd == window                                 # one MSS per window, not per ack


def test_a_delay_spike_returns_to_slow_start():
    cc = NewReno(MSS)
    feed_round(cc, 0.001, 0)
    feed_round(cc, 0.010, 1)
    assert cc.slow_start_exits == 1
    feed_round(cc, 0.001, 2)                                  # below the baseline: it was a spike
    before = cc.cwnd
    cc.on_acked(4 * MSS, time_sent=1.0)
    assert cc.cwnd == before + 4 * MSS and cc.ssthresh == INF


def test_loss_ends_slow_start_and_halves():
    cc = NewReno(MSS)
    cc.cwnd = 100 * MSS
    cc.on_sent(10 * MSS)
    cc.on_lost(MSS, time_sent=1.0, now=1.1)
    assert cc.cwnd == 50 * MSS == cc.ssthresh
    cc.on_lost(MSS, time_sent=1.05, now=1.2)                 # sent before the reduction: no second cut
    assert cc.cwnd == 50 * MSS


def _run_recovery():
    rec = Recovery(MSS)
    rec.on_sent(SentPacket(1, 0.0, 100, True, [(STREAM, 0, 10, False)], 0))
    rec.on_sent_run(SentRun(2, 0.0, MSS, 0, 10, 10, 1000, True))       # pns 2-11, bytes 10-10010
    return rec


def test_a_run_acknowledged_and_lost_in_parts():
    rec = _run_recovery()
    assert rec.ack_eliciting_in_flight == 11 and rec.cc.bytes_in_flight == 100 + 10 * MSS
    acked, lost = rec.on_ack([(1, 3)], 0.0, 0.01)
    assert [(lo, hi) for lo, hi, _ in acked] == [(1, 1), (2, 3)] and lost == []
    assert acked[1][2].frames_between(2, 3) == [(STREAM, 10, 2010, False)]
    acked, lost = rec.on_ack([(7, 9), (1, 3)], 0.0, 0.02)
    assert [(lo, hi) for lo, hi, _ in acked] == [(7, 9)]
    assert [(lo, hi) for lo, hi, _ in lost] == [(4, 6)]                 # 3 or more below the largest acked
    assert lost[0][2].frames_between(4, 6) == [(STREAM, 2010, 5010, False)]
    assert rec.ack_eliciting_in_flight == 2 and rec.cc.bytes_in_flight == 2 * MSS
    acked, lost = rec.on_ack([(10, 11)], 0.0, 0.03)
    assert acked[0][2].frames_between(10, 11) == [(STREAM, 8010, 10010, True)]    # FIN on the last
    assert rec.ack_eliciting_in_flight == 0 and rec.cc.bytes_in_flight == 0 and not rec.sent


def test_oldest_ack_eliciting_names_one_packet_of_a_run():
    rec = _run_recovery()
    rec.on_ack([(1, 2)], 0.0, 0.01)
    first, last, p = rec.oldest_ack_eliciting()
    assert (first, last) == (3, 3) and p.frames_between(first, last) == [(STREAM, 1010, 2010, False)]
    rec.forget_all()
    assert rec.cc.bytes_in_flight == 0 and rec.ack_eliciting_in_flight == 0
