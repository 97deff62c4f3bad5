"""NewReno congestion control (RFC 9002 §7, RFC 6582) in bytes, with HyStart++ (RFC 9406).

Slow start alone only stops at a loss: against a receiver whose socket buffer is the
bottleneck (a CPU-bound server) it fills that buffer, the queueing delay climbs to tens of
milliseconds and a burst of records is dropped at once. HyStart++ watches the minimum RTT
of each round trip and leaves slow start when it rises, before the buffer overflows; a
few rounds of conservative slow start guard against leaving on a delay spike.
"""
from __future__ import annotations

INITIAL_WINDOW_PACKETS = 10
MINIMUM_WINDOW_PACKETS = 2
LOSS_REDUCTION = 0.5
PERSISTENT_CONGESTION_THRESHOLD = 3
MAX_BURST_PACKETS = 3             # free window below which the sender counts as window-limited

# RFC 9406 §4.3
MIN_RTT_THRESH = 0.004
MAX_RTT_THRESH = 0.016
MIN_RTT_DIVISOR = 8
N_RTT_SAMPLE = 8
CSS_GROWTH_DIVISOR = 4
CSS_ROUNDS = 5

INF = float("inf")


class NewReno:
    __slots__ = ("max_datagram", "cwnd", "ssthresh", "bytes_in_flight", "recovery_start", "_acked_in_ca",
                 "_window_end", "_last_round_min_rtt", "_round_min_rtt", "_rtt_samples", "_css_baseline",
                 "_css_rounds", "slow_start_exits")

    def __init__(self, max_datagram: int):
        self.max_datagram = max_datagram
        self.cwnd = INITIAL_WINDOW_PACKETS * max_datagram
        self.ssthresh = INF
        self.bytes_in_flight = 0
        self.recovery_start = -1.0   # time_sent of packets at or before this are in the recovery period
        self._acked_in_ca = 0
        # HyStart++ state: a round ends when a packet sent after it began is acknowledged
        self._window_end = -1
        self._last_round_min_rtt = INF
        self._round_min_rtt = INF
        self._rtt_samples = 0
        self._css_baseline = INF      # finite while in conservative slow start
        self._css_rounds = 0
        self.slow_start_exits = 0     # times HyStart++ ended slow start on a delay increase

    def can_send(self, size: int) -> bool:
        return self.bytes_in_flight + size <= self.cwnd

    def on_sent(self, size: int) -> None:
        self.bytes_in_flight += size

    def cwnd_limited(self) -> bool:
        """Is the window in use (RFC 9002 §7.8)? Asked with the bytes in flight before an ACK is
        processed: in slow start when more than half of it is in flight, otherwise when less
        than MAX_BURST_PACKETS datagrams of it are free. The window grows only then, so it
        never gets far ahead of what the sender has actually had in flight."""
        in_flight = self.bytes_in_flight
        if self.cwnd < self.ssthresh and 2 * in_flight > self.cwnd:
            return True
        return in_flight + MAX_BURST_PACKETS * self.max_datagram >= self.cwnd

    def on_acked(self, size: int, time_sent: float, cwnd_limited: bool = True) -> None:
        """`size` bytes of packets sent at `time_sent` were acknowledged (one packet or a run);
        `cwnd_limited`: what cwnd_limited() said before the ACK that acknowledged them."""
        self.bytes_in_flight -= size
        if time_sent <= self.recovery_start or not cwnd_limited:
            return
        if self.cwnd < self.ssthresh:
            self.cwnd += size if self._css_baseline == INF else size // CSS_GROWTH_DIVISOR
        else:
            self._acked_in_ca += size
            while self._acked_in_ca >= self.cwnd:      # one datagram more per window acknowledged
                self._acked_in_ca -= self.cwnd
                self.cwnd += self.max_datagram

    def on_rtt_sample(self, rtt: float, largest_acked: int, largest_sent: int) -> None:
        """One RTT sample from an ACK (RFC 9406 §4.2); only slow start listens."""
        if self.cwnd >= self.ssthresh:
            return
        if largest_acked > self._window_end:          # a new round begins
            self._window_end = largest_sent
            self._last_round_min_rtt = self._round_min_rtt
            self._round_min_rtt = INF
            self._rtt_samples = 0
            if self._css_baseline != INF:
                self._css_rounds += 1
                if self._css_rounds >= CSS_ROUNDS:     # the delay stayed up: congestion avoidance
                    self.ssthresh = self.cwnd
                    self._css_baseline = INF
                    return
        self._round_min_rtt = min(self._round_min_rtt, rtt)
        self._rtt_samples += 1
        if self._css_baseline == INF:
            if self._rtt_samples >= N_RTT_SAMPLE and self._last_round_min_rtt != INF:
                thresh = min(max(self._last_round_min_rtt / MIN_RTT_DIVISOR, MIN_RTT_THRESH), MAX_RTT_THRESH)
                if self._round_min_rtt >= self._last_round_min_rtt + thresh:
                    self._css_baseline = self._round_min_rtt
                    self._css_rounds = 0
                    self.slow_start_exits += 1
        elif self._round_min_rtt < self._css_baseline:   # the delay was a spike: back to slow start
            self._css_baseline = INF

    def on_lost(self, size: int, time_sent: float, now: float) -> None:
        self.bytes_in_flight -= size
        if time_sent > self.recovery_start:
            self.recovery_start = now
            self.cwnd = max(int(self.cwnd * LOSS_REDUCTION), MINIMUM_WINDOW_PACKETS * self.max_datagram)
            self.ssthresh = self.cwnd
            self._acked_in_ca = 0
            self._css_baseline = INF

    def on_forgotten(self, size: int) -> None:
        """A packet leaves flight without an ack or loss verdict (connection teardown)."""
        self.bytes_in_flight -= size

    def on_persistent_congestion(self) -> None:
        self.cwnd = MINIMUM_WINDOW_PACKETS * self.max_datagram
        self.recovery_start = -1.0
