"""Loss detection and RTT estimation (RFC 9002 §5-6), driven by time passed in.

Sent packets are tracked as segments: (first pn, last pn, the packet object they share),
a single record or the still-unacknowledged part of a bulk run, ascending and disjoint.
An ACK's ranges mark them acknowledged, then packet and time thresholds declare older
ones lost. An ACK costs O(ranges * log segments + segments it touches), not O(packets in
flight): a run's records are never listed one by one. The probe timeout (PTO)
fires when nothing is acknowledged for too long.
"""
from __future__ import annotations

from bisect import bisect_left
from operator import itemgetter
from typing import List, Optional, Sequence, Tuple

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


# What a sent packet carried, so loss and acks can act on it (descriptions in `frames`).
STREAM, MAX_DATA, PING, CLOSE, KEY_UPDATE, CLIENT_AUTH, RESET_TOKEN = range(7)

# A group of acknowledged or lost packets: (first pn, last pn, the packet object they share).
Group = Tuple[int, int, "SentPacket"]


class SentPacket:
    __slots__ = ("pn", "time_sent", "size", "ack_eliciting", "frames", "epoch")

    def __init__(self, pn: int, time_sent: float, size: int, ack_eliciting: bool, frames: list, epoch: int):
        self.pn = pn
        self.time_sent = time_sent
        self.size = size
        self.ack_eliciting = ack_eliciting
        self.frames = frames      # retransmittable descriptions: (kind, ...) with kinds above
        self.epoch = epoch

    def frames_between(self, first: int, last: int) -> list:
        """Descriptions of what packets first..last of this object carried."""
        return self.frames


class SentRun(SentPacket):
    """One bulk run (Connection._send_stream_run): `count` ack-eliciting records of `size`
    bytes with consecutive pns from `pn`, record i carrying stream bytes
    [offset + i*chunk, offset + (i+1)*chunk), the last one FIN if `fin`. A run costs one
    object and one entry in Recovery.sent, not one per record."""
    __slots__ = ("count", "offset", "chunk", "fin")

    def __init__(self, pn: int, time_sent: float, size: int, epoch: int, count: int, offset: int, chunk: int,
                 fin: bool):
        super().__init__(pn, time_sent, size, True, [], epoch)
        self.count = count
        self.offset = offset
        self.chunk = chunk
        self.fin = fin

    def frames_between(self, first: int, last: int) -> list:
        start = self.offset + (first - self.pn) * self.chunk
        end = self.offset + (last + 1 - self.pn) * self.chunk
        return [(STREAM, start, end, self.fin and last == self.pn + self.count - 1)]


_last_pn = itemgetter(1)


class RttEstimator:
    __slots__ = ("latest", "smoothed", "rttvar", "min_rtt", "has_sample", "pto_base")

    def __init__(self) -> None:
        self.latest = 0.0
        self.smoothed = INITIAL_RTT
        self.rttvar = INITIAL_RTT / 2
        self.min_rtt = float("inf")
        self.has_sample = False
        self.pto_base = self._pto_base()

    def _pto_base(self) -> float:
        """The probe timeout before backoff (RFC 9002 §6.2.1), kept with the estimate it follows."""
        return self.smoothed + max(4 * self.rttvar, GRANULARITY) + MAX_ACK_DELAY

    def update(self, sample: float, ack_delay: float) -> None:
        self.latest = sample
        self.min_rtt = min(self.min_rtt, sample)
        if not self.has_sample:
            self.has_sample = True
            self.smoothed, self.rttvar = sample, sample / 2
        else:
            if sample - ack_delay >= self.min_rtt:
                sample -= min(ack_delay, MAX_ACK_DELAY)
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.smoothed - sample)
            self.smoothed = 0.875 * self.smoothed + 0.125 * sample
        self.pto_base = self._pto_base()


class Recovery:
    def __init__(self, max_datagram: int):
        # unacknowledged packets as segments (first pn, last pn, packet object), ascending and
        # disjoint; two segments of one object are never adjacent (what lay between was acked)
        self.sent: List[Group] = []
        self.rtt = RttEstimator()
        self.cc = NewReno(max_datagram)
        self.largest_acked = -1
        self.pto_count = 0
        self.loss_time: Optional[float] = None
        self.last_ack_eliciting_sent: Optional[float] = None
        self.ack_eliciting_in_flight = 0
        self.largest_sent = -1

    def on_sent(self, pkt: SentPacket) -> None:
        self.sent.append((pkt.pn, pkt.pn, pkt))
        self.largest_sent = pkt.pn
        if pkt.ack_eliciting:
            self.ack_eliciting_in_flight += 1
            self.last_ack_eliciting_sent = pkt.time_sent
            self.cc.on_sent(pkt.size)

    def on_sent_run(self, run: SentRun) -> None:
        last = run.pn + run.count - 1
        self.sent.append((run.pn, last, run))
        self.largest_sent = last
        self.ack_eliciting_in_flight += run.count
        self.last_ack_eliciting_sent = run.time_sent
        self.cc.on_sent(run.size * run.count)

    def pto_interval(self) -> float:
        base = self.rtt.pto_base
        if not self.pto_count:
            return base
        return min(base * (2 ** min(self.pto_count, 16)), max(base, MAX_PTO_INTERVAL))

    def timer(self) -> Optional[float]:
        if self.loss_time is not None:
            return self.loss_time
        if not self.ack_eliciting_in_flight or self.last_ack_eliciting_sent is None:
            return None
        if not self.pto_count:
            return self.last_ack_eliciting_sent + self.rtt.pto_base
        return self.last_ack_eliciting_sent + self.pto_interval()

    def on_ack(self, ranges: Sequence[Tuple[int, int]], ack_delay: float, now: float
               ) -> Tuple[List[Group], List[Group]]:
        """Process an ACK frame; return (newly acked, newly lost) packets as groups in pn order."""
        sent = self.sent
        largest = ranges[0][1]
        if len(sent) == 1:          # request/response: the one record in flight, acknowledged or not
            pn, last, p = group = sent[0]
            if pn == last and ranges[0][0] <= pn <= largest:
                # the steps below without the bisection and the loss scan of an empty flight
                cc = self.cc
                limited = cc.cwnd_limited()
                sent.clear()
                if largest > self.largest_acked:
                    self.largest_acked = largest
                    if pn == largest and p.ack_eliciting:
                        self.rtt.update(now - p.time_sent, ack_delay)
                        cc.on_rtt_sample(self.rtt.latest, largest, self.largest_sent)
                if p.ack_eliciting:
                    self.ack_eliciting_in_flight -= 1
                    cc.on_acked(p.size, p.time_sent, limited)
                self.pto_count = 0
                self.loss_time = None          # nothing left in flight to be lost
                return [group], []
        acked: List[Group] = []
        for low, high in reversed(ranges):     # ascending, so the groups come out in pn order
            i = j = bisect_left(sent, low, key=_last_pn)     # the first segment ending at or after low
            end = len(sent)
            rest: List[Group] = []             # what segments i..j-1 keep: a head, a tail
            while j < end:
                group = sent[j]
                first, last, p = group
                if first > high:
                    break
                j += 1
                if first < low:
                    rest.append((first, low - 1, p))
                    first = low
                if last > high:
                    rest.append((high + 1, last, p))
                    last = high
                if acked and acked[-1][2] is p and acked[-1][1] + 1 == first:    # adjacent ranges
                    acked[-1] = (acked[-1][0], last, p)
                elif first != group[0] or last != group[1]:
                    acked.append((first, last, p))
                else:
                    acked.append(group)
            if j > i:
                sent[i:j] = rest
        if not acked:
            return [], []
        cc = self.cc
        limited = cc.cwnd_limited()          # before this ACK takes anything out of flight
        _, newest_pn, newest = acked[-1]
        if largest > self.largest_acked:
            self.largest_acked = largest
            if newest_pn == largest and newest.ack_eliciting:
                self.rtt.update(now - newest.time_sent, ack_delay)
                self.cc.on_rtt_sample(self.rtt.latest, largest, self.largest_sent)
        for first, last, p in acked:
            if p.ack_eliciting:
                n = last - first + 1
                self.ack_eliciting_in_flight -= n
                cc.on_acked(p.size * n, p.time_sent, limited)
        self.pto_count = 0
        lost = self.detect_lost(now)
        return acked, lost

    def detect_lost(self, now: float) -> List[Group]:
        """Declare lost each packet at or below the largest acknowledged that is PACKET_THRESHOLD
        below it or sent loss_delay ago; loss_time is when the oldest other one will be. Only
        the segments below the largest acknowledged (the holes an ACK left) are visited."""
        self.loss_time = None
        rtt = self.rtt
        loss_delay = max(TIME_THRESHOLD * max(rtt.latest, rtt.smoothed), GRANULARITY)
        largest = self.largest_acked
        by_count = largest - PACKET_THRESHOLD      # lost by the packet threshold at or below this
        sent = self.sent
        lost: List[Group] = []
        kept: List[Group] = []
        k = 0
        for group in sent:
            first, last, p = group
            if first > largest:
                break
            k += 1
            top = last if last < largest else largest
            if p.time_sent + loss_delay <= now:
                cut = top
            else:
                # within a segment (one time_sent) the lost pns are a prefix: up to by_count
                cut = by_count if by_count < top else top
                if cut < top and self.loss_time is None:
                    self.loss_time = p.time_sent + loss_delay
            if cut < first:
                kept.append(group)
            elif cut == last:
                lost.append(group)
            else:
                lost.append((first, cut, p))
                kept.append((cut + 1, last, p))
        if not lost:
            return []
        sent[:k] = kept
        for first, last, p in lost:
            if p.ack_eliciting:
                n = last - first + 1
                self.ack_eliciting_in_flight -= n
                self.cc.on_lost(p.size * n, p.time_sent, now)
        self._check_persistent_congestion(lost)
        return lost

    def _check_persistent_congestion(self, lost: List[Group]) -> None:
        if not self.rtt.has_sample:
            return
        eliciting = [p for _, _, p in lost if p.ack_eliciting]
        if sum(last - first + 1 for first, last, p in lost if p.ack_eliciting) < 2:
            return
        duration = self.rtt.pto_base * PERSISTENT_CONGESTION_THRESHOLD
        if eliciting[-1].time_sent - eliciting[0].time_sent >= duration:
            self.cc.on_persistent_congestion()

    def oldest_ack_eliciting(self) -> Optional[Group]:
        """The oldest ack-eliciting packet still in flight, as a one-packet group."""
        return next(((pn, pn, p) for pn, _, p in self.sent if p.ack_eliciting), None)

    def on_pto(self) -> None:
        self.pto_count += 1

    def forget_all(self) -> None:
        for first, last, p in self.sent:
            if p.ack_eliciting:
                self.cc.on_forgotten(p.size * (last - first + 1))
        self.sent.clear()
        self.ack_eliciting_in_flight = 0
        self.loss_time = None
