"""A token bucket on the caller's clock: the server's global hello budget and its RESET budget
(docs/PROTOCOL.md sections 4.5 and 5.7)."""
from __future__ import annotations


class TokenBucket:
    """`rate` tokens a second, at most `burst` banked; a rate of 0 never refills, a burst of 0
    never grants."""

    __slots__ = ("rate", "burst", "tokens", "last")

    def __init__(self, rate: float, burst: float, now: float = 0.0):
        if rate < 0 or burst < 0:
            raise ValueError("a token bucket's rate and burst cannot be negative")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
