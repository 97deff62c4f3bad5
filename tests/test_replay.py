"""stcp/replay.py on its own: ReceivedPackets, the replay filter and the ranges an ACK reports.

A record's packet number is 48 bits (docs/PROTOCOL.md: seq = epoch << 48 | pn). Only the
newest MAX_RANGES ranges are remembered; everything below the oldest one counts as seen
(a replayed or very late record is discarded, never processed twice). Boundary tables put
packet numbers and range counts at 0, 1, limit-1, limit, limit+1 and 2^48-1; a model (a
plain set and a floor) checks random arrival orders.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from stcp.replay import MAX_RANGES, ReceivedPackets
from stcp.wire import MAX_ACK_RANGES, PN_MASK

MAX_PN = PN_MASK                               # 2^48 - 1


def received(*pns: int) -> ReceivedPackets:
    r = ReceivedPackets()
    for pn in pns:
        assert not r.is_duplicate(pn)
        r.add(pn)
    return r


def check_shape(r: ReceivedPackets) -> None:
    """Ranges ascending, disjoint, not touching (touching ones are merged), above the floor."""
    assert len(r.ranges) <= MAX_RANGES
    for lo, hi in r.ranges:
        assert r.floor <= lo <= hi
    for (_, hi), (lo, _) in zip(r.ranges, r.ranges[1:], strict=False):
        assert hi + 1 < lo, r.ranges


def test_empty():
    r = ReceivedPackets()
    assert r.largest == -1 and r.ranges == [] and r.floor == 0
    assert not r.is_duplicate(0) and not r.is_duplicate(MAX_PN)
    assert r.ack_ranges(MAX_ACK_RANGES) == ()


@pytest.mark.parametrize("pn", [0, 1, MAX_RANGES - 1, MAX_RANGES, MAX_RANGES + 1, 1 << 32, MAX_PN - 1, MAX_PN])
def test_one_packet_number(pn):
    r = received(pn)
    assert r.is_duplicate(pn) and r.largest == pn
    assert r.ack_ranges(MAX_ACK_RANGES) == ((pn, pn),)
    if pn > 0:
        assert not r.is_duplicate(pn - 1)
    if pn < MAX_PN:
        assert not r.is_duplicate(pn + 1)


def test_in_order_packets_make_one_range():
    r = received(*range(1, 1001))
    assert r.ranges == [[1, 1000]] and r.largest == 1000
    assert all(r.is_duplicate(pn) for pn in (1, 500, 1000))
    assert not r.is_duplicate(0) and not r.is_duplicate(1001)


@pytest.mark.parametrize("first,last", [(1, 1), (1, 2), (0, MAX_PN), (MAX_PN, MAX_PN)])
def test_add_consecutive_edges(first, last):
    r = ReceivedPackets()
    r.add_consecutive(first, last)
    assert r.ranges == [[first, last]] and r.largest == last
    assert r.is_duplicate(first) and r.is_duplicate(last)


def test_add_consecutive_extends_the_newest_range_or_starts_one():
    r = received(1, 2, 3)
    r.add_consecutive(4, 10)
    assert r.ranges == [[1, 10]]
    r.add_consecutive(12, 12)
    assert r.ranges == [[1, 10], [12, 12]]
    check_shape(r)


# ---------------------------------------------------------------------------------------
# gaps and how they close
def test_a_gap_is_not_a_duplicate():
    r = received(1, 2, 5, 6)
    assert r.ranges == [[1, 2], [5, 6]]
    assert [pn for pn in range(0, 8) if r.is_duplicate(pn)] == [1, 2, 5, 6]


@pytest.mark.parametrize("pn,ranges", [
    (3, [[1, 3], [6, 7]]),                 # joins the left range
    (5, [[1, 2], [5, 7]]),                 # joins the right range
    (4, [[1, 2], [4, 4], [6, 7]]),         # alone in the gap
    (0, [[0, 2], [6, 7]]),                 # below everything, touching
    (8, [[1, 2], [6, 8]]),                 # the in-order fast path
    (9, [[1, 2], [6, 7], [9, 9]]),         # above everything, a new range
])
def test_filling_gaps(pn, ranges):
    r = received(1, 2, 6, 7)
    r.add(pn)
    assert r.ranges == ranges
    check_shape(r)


def test_the_last_packet_of_a_gap_joins_both_sides():
    r = received(1, 2, 4, 5)
    r.add(3)
    assert r.ranges == [[1, 5]]


# ---------------------------------------------------------------------------------------
# the remembered window
def spaced(n: int) -> ReceivedPackets:
    """n ranges of one packet each: 0, 2, 4, ..."""
    return received(*range(0, 2 * n, 2))


@pytest.mark.parametrize("n", [0, 1, MAX_RANGES - 1, MAX_RANGES, MAX_RANGES + 1, 2 * MAX_RANGES])
def test_the_oldest_ranges_are_forgotten_beyond_max_ranges(n):
    r = spaced(n)
    kept = min(n, MAX_RANGES)
    dropped = n - kept
    assert len(r.ranges) == kept
    assert r.floor == (2 * (dropped - 1) + 1 if dropped else 0)     # just above the last one dropped
    # below the floor: seen, even the packet numbers that never arrived
    assert all(r.is_duplicate(pn) for pn in range(r.floor))
    # from it up: exactly what arrived
    assert [pn for pn in range(r.floor, 2 * n + 2) if r.is_duplicate(pn)] == list(range(2 * dropped, 2 * n, 2))
    check_shape(r)


@pytest.mark.parametrize("gap", [0, 1, MAX_RANGES // 2, MAX_RANGES - 2, MAX_RANGES - 1])
def test_a_new_range_when_full_forgets_the_oldest(gap):
    r = received(*range(0, 4 * MAX_RANGES, 4))          # 0, 4, 8, ...: MAX_RANGES ranges, gaps of 3
    assert len(r.ranges) == MAX_RANGES and r.floor == 0
    pn = 4 * gap + 2                                    # inside a gap, touching neither side (the last: above)
    r.add(pn)
    assert len(r.ranges) == MAX_RANGES and r.floor == 1
    assert r.is_duplicate(pn) and not r.is_duplicate(pn + 1) and r.is_duplicate(0)
    check_shape(r)


def test_a_new_range_below_the_oldest_when_full_is_forgotten_at_once():
    r = received(*range(4, 4 * MAX_RANGES + 4, 4))      # 4, 8, ...: full
    r.add(1)
    assert len(r.ranges) == MAX_RANGES and r.ranges[0] == [4, 4]
    assert r.floor == 2 and r.is_duplicate(1) and not r.is_duplicate(2)


def test_joining_ranges_when_full_forgets_nothing():
    r = spaced(MAX_RANGES)
    r.add(1)                                            # joins [0] and [2]
    assert len(r.ranges) == MAX_RANGES - 1 and r.floor == 0
    check_shape(r)


def test_add_consecutive_past_max_ranges_moves_the_floor():
    r = spaced(MAX_RANGES)
    r.add_consecutive(2 * MAX_RANGES + 5, 2 * MAX_RANGES + 9)
    assert len(r.ranges) == MAX_RANGES and r.floor == 1
    assert r.is_duplicate(2 * MAX_RANGES + 9) and not r.is_duplicate(2 * MAX_RANGES + 10)


def test_a_far_jump_does_not_forget_the_recent_past():
    r = received(*range(100))
    r.add(MAX_PN)
    assert r.ranges == [[0, 99], [MAX_PN, MAX_PN]] and r.floor == 0
    assert not r.is_duplicate(100) and not r.is_duplicate(MAX_PN - 1)


# ---------------------------------------------------------------------------------------
# the ranges an ACK reports
@pytest.mark.parametrize("limit", [0, 1, 9, 10, 11, MAX_ACK_RANGES])
def test_ack_ranges_newest_first_up_to_limit(limit):
    r = spaced(10)
    want = tuple((pn, pn) for pn in range(18, -1, -2))[:limit]
    assert r.ack_ranges(limit) == want


def test_ack_ranges_at_max_ranges():
    r = spaced(MAX_RANGES + 3)
    got = r.ack_ranges(MAX_ACK_RANGES)
    assert len(got) == min(MAX_ACK_RANGES, MAX_RANGES)
    assert got[0] == (r.largest, r.largest)
    assert all(a[0] > b[1] for a, b in zip(got, got[1:], strict=False))


# ---------------------------------------------------------------------------------------
# against a model: a set of what arrived and the floor
@settings(max_examples=50, deadline=None, derandomize=True)
@given(extra=st.lists(st.integers(0, 2 * MAX_RANGES + 100), max_size=300),
       high=st.lists(st.integers(MAX_PN - 50, MAX_PN), max_size=20), rnd=st.randoms(use_true_random=False))
def test_random_arrivals_match_a_model(extra, high, rnd):
    """Every even number up to past MAX_RANGES ranges (so the floor moves), odd ones that join
    them, and some near 2^48-1, in a random order, repeats included."""
    pns = list(range(0, 2 * (MAX_RANGES + 40), 2)) + extra + high
    rnd.shuffle(pns)
    r = ReceivedPackets()
    seen: set = set()
    top = -1
    for pn in pns:
        dup = r.is_duplicate(pn)
        assert dup == (pn in seen or pn < r.floor), (pn, r.floor)
        if not dup:
            floor_before = r.floor
            r.add(pn)
            seen.add(pn)
            top = max(top, pn)
            assert r.floor >= floor_before
        assert r.largest == top
        assert len(r.ranges) <= MAX_RANGES
    check_shape(r)
    covered = {pn for lo, hi in r.ranges for pn in range(lo, hi + 1)}
    assert covered == {pn for pn in seen if pn >= r.floor}
