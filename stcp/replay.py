"""Received packet numbers: duplicate (replay) detection and the ranges an ACK reports.

Ranges are kept ascending as [low, high] pairs. Only the newest MAX_RANGES ranges are
remembered; anything below the oldest remembered range counts as already seen, so a
replayed or very late record is discarded instead of being processed twice.

An ACK leaves out old ranges (the horizon), but never one that no ACK has reported yet:
a receiver that reads a large batch before it sends covers the whole batch with one ACK,
and a range the sender never hears of is a range it retransmits and counts as a loss.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import List, Optional, Tuple

MAX_RANGES = 256


class ReceivedPackets:
    __slots__ = ("ranges", "floor", "reported")

    def __init__(self) -> None:
        self.ranges: List[List[int]] = []
        self.floor = 0   # every pn below this counts as seen
        self.reported = -1   # the largest pn when the last ACK was sent (mark_reported)

    def is_duplicate(self, pn: int) -> bool:
        if pn < self.floor:
            return True
        ranges = self.ranges
        if not ranges or pn > ranges[-1][1]:
            return False
        i = bisect_right(ranges, [pn, float("inf")]) - 1
        return i >= 0 and ranges[i][0] <= pn <= ranges[i][1]

    def add(self, pn: int) -> bool:
        """Record pn, which the caller has checked is not a duplicate; True if it is the largest."""
        ranges = self.ranges
        if ranges:
            last = ranges[-1]
            if pn == last[1] + 1:          # the in-order fast path
                last[1] = pn
                return True
            if pn > last[1]:
                ranges.append([pn, pn])
                self._trim()
                return True
        else:
            ranges.append([pn, pn])
            return True
        i = bisect_right(ranges, [pn, float("inf")])
        joins_left = i > 0 and ranges[i - 1][1] + 1 == pn
        joins_right = i < len(ranges) and ranges[i][0] - 1 == pn
        if joins_left and joins_right:
            ranges[i - 1][1] = ranges[i][1]
            del ranges[i]
        elif joins_left:
            ranges[i - 1][1] = pn
        elif joins_right:
            ranges[i][0] = pn
        else:
            ranges.insert(i, [pn, pn])
            self._trim()
        return False

    def add_consecutive(self, first: int, last: int) -> None:
        """Record new pns first..last (checked by the caller: all above `largest`)."""
        ranges = self.ranges
        if ranges and first == ranges[-1][1] + 1:
            ranges[-1][1] = last
        else:
            ranges.append([first, last])
            self._trim()

    def _trim(self) -> None:
        if len(self.ranges) > MAX_RANGES:
            dropped = self.ranges.pop(0)
            self.floor = dropped[1] + 1

    def ack_ranges(self, limit: int, horizon: Optional[int] = None) -> Tuple[Tuple[int, int], ...]:
        """The newest `limit` ranges, highest first, as an AckFrame wants them, leaving out
        ranges that lie wholly more than `horizon` packet numbers below the largest and
        wholly at or below the largest of the last ACK sent (every range goes out once)."""
        ranges = self.ranges[-limit:] if limit > 0 else []
        if not ranges:
            return ()
        if horizon is None:
            floor = -1
        else:
            floor = ranges[-1][1] - horizon
            if floor > self.reported:
                floor = self.reported + 1
        out = []
        for lo, hi in reversed(ranges):
            if hi < floor:
                break
            out.append((lo, hi))
        return tuple(out)

    def mark_reported(self) -> None:
        """An ACK built from ack_ranges() was sent: what it covered may now pass the horizon."""
        if self.ranges:
            self.reported = self.ranges[-1][1]

    @property
    def largest(self) -> int:
        return self.ranges[-1][1] if self.ranges else -1
