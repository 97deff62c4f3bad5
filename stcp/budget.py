"""The server-wide memory budget for stream buffers (PROTOCOL.md §11), sans-IO.

Every server connection charges the budget with what it holds: received bytes held out of
order or delivered but not yet read by the application, and written bytes the peer has not
acknowledged. While the sum is at or above the limit, no connection grants its peer new
flow-control credit; if it stays above, the endpoint sheds the connections holding the most
that have made no progress (nothing read by the application, nothing acknowledged by the
peer) for SHED_AFTER seconds. A window already granted cannot be taken back, so the sum can
exceed the limit by credit granted before it was reached; shedding brings it back.
Progress means PROGRESS_BYTES read or acknowledged, so a peer cannot keep a full window
pinned by acknowledging a byte now and then.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Iterable, List, Optional

if TYPE_CHECKING:
    from .connection import Connection

DEFAULT_CAP = 1 << 30          # the default is an eighth of the machine's memory, at most this
SHED_AFTER = 1.0               # seconds without progress before a connection may be shed
SHED_INTERVAL = 0.1            # the endpoint looks for connections to shed at most this often
PROGRESS_BYTES = 64 << 10      # reads + acknowledgements that count as progress


def default_memory_budget() -> int:
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return DEFAULT_CAP
    return max(64 << 20, min(DEFAULT_CAP, ram // 8))


class MemoryBudget:
    __slots__ = ("limit", "used", "shed", "credit_withheld", "shed_hook")

    def __init__(self, limit: int):
        if limit <= 0:
            raise ValueError("the memory budget must be a positive number of bytes")
        self.limit = limit
        self.used = 0               # bytes the connections hold now (each adds its own changes)
        self.shed = 0               # connections shed to get back under the limit
        self.credit_withheld = 0    # credit grants postponed because the budget was exhausted
        # the endpoint's shed(now): a connection whose grant is postponed calls it from its
        # timer, so a server that receives nothing still sheds
        self.shed_hook: Optional[Callable[[float], object]] = None

    @property
    def exhausted(self) -> bool:
        return self.used >= self.limit

    def victims(self, connections: Iterable["Connection"], now: float,
                shed_after: float = SHED_AFTER) -> List["Connection"]:
        """The connections to shed to get back under the limit: those without progress for
        shed_after seconds, holding the most first, as many as it takes (or all there are)."""
        excess = self.used - self.limit
        if excess <= 0:
            return []
        stuck = [c for c in connections if c.footprint and now - c.progress_time(now) >= shed_after]
        stuck.sort(key=lambda c: c.footprint, reverse=True)
        out = []
        for c in stuck:
            if excess <= 0:
                break
            out.append(c)
            excess -= c.footprint
        return out
