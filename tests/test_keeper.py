"""The keeper (stcp/keeper.py) alone, with stand-in connections: it runs a timer a call
reminded it of, one of a connection added while it waits out its grace period, and ends
once it has kept nothing for the grace period."""
from __future__ import annotations

import threading
import time
from typing import List, Optional

from stcp import keeper as keeper_module
from stcp.keeper import Keeper


class Timed:
    """A connection whose timer is `due`; run_timers records the passes that found it due."""

    def __init__(self, due: Optional[float]):
        self.due = due
        self.ran: List[float] = []
        self.event = threading.Event()

    def run_timers(self, now: float) -> Optional[float]:
        if self.due is not None and self.due <= now:
            self.ran.append(now)
            self.due = None
            self.event.set()
        return self.due


def test_a_reminded_timer_runs_though_the_keeper_slept_until_later():
    k = Keeper()
    conn = Timed(time.monotonic() + 3600)
    k.add(conn, conn.due)
    try:
        time.sleep(0.05)                    # the keeper has looked and sleeps for the hour
        due = conn.due = time.monotonic() + 0.05
        k.remind(due)
        assert conn.event.wait(10), "the reminded timer did not run"
        assert conn.ran == [conn.ran[0]] and conn.ran[0] >= due     # once, and not before it was due
    finally:
        k.forget(conn)


def test_a_connection_added_during_the_grace_period_is_kept_by_the_same_thread(monkeypatch):
    monkeypatch.setattr(keeper_module, "GRACE", 5.0)
    k = Keeper()
    first = Timed(None)
    k.add(first, None)
    thread = k.thread
    assert thread is not None
    k.forget(first)                         # none kept: the thread waits out its grace
    time.sleep(0.05)
    second = Timed(time.monotonic() + 0.05)
    k.add(second, second.due)
    assert k.thread is thread               # no second thread
    assert second.event.wait(10), "the timer of a connection added during the grace did not run"
    k.forget(second)
    monkeypatch.setattr(keeper_module, "GRACE", 0.2)
    thread.join(10)
    assert not thread.is_alive()
    assert k.thread is None


def test_the_keeper_ends_after_the_grace_period_and_the_next_connection_starts_it_again(monkeypatch):
    monkeypatch.setattr(keeper_module, "GRACE", 0.1)
    k = Keeper()
    conn = Timed(None)
    k.add(conn, None)
    thread = k.thread
    assert thread is not None
    k.forget(conn)
    thread.join(10)
    assert not thread.is_alive()
    again = Timed(time.monotonic() + 0.02)
    k.add(again, again.due)
    assert k.thread is not None and k.thread is not thread
    assert again.event.wait(10)
    k.forget(again)
