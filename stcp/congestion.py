"""NewReno congestion control (RFC 9002 §7, RFC 6582) in bytes."""
from __future__ import annotations

INITIAL_WINDOW_PACKETS = 10
MINIMUM_WINDOW_PACKETS = 2
LOSS_REDUCTION = 0.5
PERSISTENT_CONGESTION_THRESHOLD = 3


class NewReno:
    __slots__ = ("max_datagram", "cwnd", "ssthresh", "bytes_in_flight", "recovery_start", "_acked_in_ca")

    def __init__(self, max_datagram: int):
        self.max_datagram = max_datagram
        self.cwnd = INITIAL_WINDOW_PACKETS * max_datagram
        self.ssthresh = float("inf")
        self.bytes_in_flight = 0
        self.recovery_start = -1.0   # time_sent of packets at or before this are in the recovery period
        self._acked_in_ca = 0

    def can_send(self, size: int) -> bool:
        return self.bytes_in_flight + size <= self.cwnd

    def on_sent(self, size: int) -> None:
        self.bytes_in_flight += size

    def on_acked(self, size: int, time_sent: float) -> None:
        self.bytes_in_flight -= size
        if time_sent <= self.recovery_start:
            return
        if self.cwnd < self.ssthresh:
            self.cwnd += size
        else:
            self._acked_in_ca += size
            if self._acked_in_ca >= self.cwnd:
                self._acked_in_ca -= self.cwnd
                self.cwnd += self.max_datagram

    def on_lost(self, size: int, time_sent: float, now: float) -> None:
        self.bytes_in_flight -= size
        if time_sent > self.recovery_start:
            self.recovery_start = now
            self.cwnd = max(int(self.cwnd * LOSS_REDUCTION), MINIMUM_WINDOW_PACKETS * self.max_datagram)
            self.ssthresh = self.cwnd
            self._acked_in_ca = 0

    def on_forgotten(self, size: int) -> None:
        """A packet leaves flight without an ack or loss verdict (connection teardown)."""
        self.bytes_in_flight -= size

    def on_persistent_congestion(self) -> None:
        self.cwnd = MINIMUM_WINDOW_PACKETS * self.max_datagram
        self.recovery_start = -1.0
