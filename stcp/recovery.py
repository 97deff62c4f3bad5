"""Loss detection and RTT estimation (RFC 9002 §5-6), driven by time passed in.

Sent packets are tracked by packet number; an ACK's ranges mark them acknowledged,
then packet and time thresholds declare older ones lost. The probe timeout (PTO)
fires when nothing is acknowledged for too long.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .congestion import PERSISTENT_CONGESTION_THRESHOLD, NewReno

PACKET_THRESHOLD = 3
TIME_THRESHOLD = 9 / 8
GRANULARITY = 0.001
INITIAL_RTT = 0.1
MAX_ACK_DELAY = 0.010
# Backoff stops growing here (unless the RTT itself is longer): through a long burst of losses
# the sender keeps probing four times a second instead of at ever longer intervals that
# would outlast the idle timeout.
MAX_PTO_INTERVAL = 0.25


class SentPacket:
    __slots__ = ("pn", "time_sent", "size", "ack_eliciting", "frames", "epoch")

    def __init__(self, pn: int, time_sent: float, size: int, ack_eliciting: bool, frames: list, epoch: int):
        self.pn = pn
        self.time_sent = time_sent
        self.size = size
        self.ack_eliciting = ack_eliciting
        self.frames = frames      # retransmittable descriptions, see Connection
        self.epoch = epoch


class RttEstimator:
    __slots__ = ("latest", "smoothed", "rttvar", "min_rtt", "has_sample")

    def __init__(self) -> None:
        self.latest = 0.0
        self.smoothed = INITIAL_RTT
        self.rttvar = INITIAL_RTT / 2
        self.min_rtt = float("inf")
        self.has_sample = False

    def update(self, sample: float, ack_delay: float) -> None:
        self.latest = sample
        self.min_rtt = min(self.min_rtt, sample)
        if not self.has_sample:
            self.has_sample = True
            self.smoothed, self.rttvar = sample, sample / 2
            return
        if sample - ack_delay >= self.min_rtt:
            sample -= min(ack_delay, MAX_ACK_DELAY)
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.smoothed - sample)
        self.smoothed = 0.875 * self.smoothed + 0.125 * sample


class Recovery:
    def __init__(self, max_datagram: int):
        self.sent: Dict[int, SentPacket] = {}      # unacknowledged, in send order
        self.rtt = RttEstimator()
        self.cc = NewReno(max_datagram)
        self.largest_acked = -1
        self.pto_count = 0
        self.loss_time: Optional[float] = None
        self.last_ack_eliciting_sent: Optional[float] = None
        self.ack_eliciting_in_flight = 0
        self.largest_sent = -1

    def on_sent(self, pkt: SentPacket) -> None:
        self.sent[pkt.pn] = pkt
        self.largest_sent = pkt.pn
        if pkt.ack_eliciting:
            self.ack_eliciting_in_flight += 1
            self.last_ack_eliciting_sent = pkt.time_sent
            self.cc.on_sent(pkt.size)

    def on_sent_run(self, pkts: List[SentPacket]) -> None:
        """Ack-eliciting packets of one size, sent together (a bulk run)."""
        sent = self.sent
        for p in pkts:
            sent[p.pn] = p
        self.largest_sent = pkts[-1].pn
        self.ack_eliciting_in_flight += len(pkts)
        self.last_ack_eliciting_sent = pkts[-1].time_sent
        self.cc.on_sent(pkts[0].size * len(pkts))

    def pto_interval(self) -> float:
        rtt = self.rtt
        base = rtt.smoothed + max(4 * rtt.rttvar, GRANULARITY) + MAX_ACK_DELAY
        return min(base * (2 ** min(self.pto_count, 16)), max(base, MAX_PTO_INTERVAL))

    def timer(self) -> Optional[float]:
        if self.loss_time is not None:
            return self.loss_time
        if not self.ack_eliciting_in_flight or self.last_ack_eliciting_sent is None:
            return None
        return self.last_ack_eliciting_sent + self.pto_interval()

    def on_ack(self, ranges: Sequence[Tuple[int, int]], ack_delay: float, now: float
               ) -> Tuple[List[SentPacket], List[SentPacket]]:
        """Process an ACK frame; return (newly acked, newly lost) packets."""
        sent = self.sent
        acked: List[SentPacket] = []
        largest = ranges[0][1]
        if sent:
            pns = list(sent)          # ascending: packet numbers are allocated in order
            for low, high in reversed(ranges):     # ascending, so `acked` comes out in pn order
                i = bisect_left(pns, low)
                while i < len(pns) and pns[i] <= high:
                    acked.append(sent.pop(pns[i]))
                    i += 1
        if not acked:
            return [], []
        newest = acked[-1]
        if largest > self.largest_acked:
            self.largest_acked = largest
            if newest.pn == largest and newest.ack_eliciting:
                self.rtt.update(now - newest.time_sent, ack_delay)
                self.cc.on_rtt_sample(self.rtt.latest, largest, self.largest_sent)
        for p in acked:
            if p.ack_eliciting:
                self.ack_eliciting_in_flight -= 1
                self.cc.on_acked(p.size, p.time_sent)
        self.pto_count = 0
        lost = self.detect_lost(now)
        return acked, lost

    def detect_lost(self, now: float) -> List[SentPacket]:
        self.loss_time = None
        rtt = self.rtt
        loss_delay = max(TIME_THRESHOLD * max(rtt.latest, rtt.smoothed), GRANULARITY)
        lost: List[SentPacket] = []
        largest = self.largest_acked
        for pn, p in self.sent.items():
            if pn > largest:
                break
            if largest - pn >= PACKET_THRESHOLD or p.time_sent + loss_delay <= now:
                lost.append(p)
            elif self.loss_time is None:
                self.loss_time = p.time_sent + loss_delay
        if lost:
            for p in lost:
                del self.sent[p.pn]
                if p.ack_eliciting:
                    self.ack_eliciting_in_flight -= 1
                    self.cc.on_lost(p.size, p.time_sent, now)
            self._check_persistent_congestion(lost)
        return lost

    def _check_persistent_congestion(self, lost: List[SentPacket]) -> None:
        if not self.rtt.has_sample:
            return
        eliciting = [p for p in lost if p.ack_eliciting]
        if len(eliciting) < 2:
            return
        duration = (self.rtt.smoothed + max(4 * self.rtt.rttvar, GRANULARITY) + MAX_ACK_DELAY) \
            * PERSISTENT_CONGESTION_THRESHOLD
        if eliciting[-1].time_sent - eliciting[0].time_sent >= duration:
            self.cc.on_persistent_congestion()

    def on_pto(self) -> None:
        self.pto_count += 1

    def forget_all(self, on_each: Callable[[SentPacket], None] | None = None) -> None:
        for p in self.sent.values():
            if p.ack_eliciting:
                self.cc.on_forgotten(p.size)
            if on_each:
                on_each(p)
        self.sent.clear()
        self.ack_eliciting_in_flight = 0
        self.loss_time = None
