"""The keeper: one thread per process that runs the timers of blocking connections between
calls (stcp/blocking.py), so a connection whose application does not call for a while still
sends its keepalives, acks and probes, and one whose peer went silent still ends on time.

It sleeps until the earliest timer of what it keeps; a call that makes a timer sooner tells
it (remind). It holds connections weakly and ends when it has kept none for GRACE seconds
(so a client opening connections one after another starts it once, not once each).
"""
from __future__ import annotations

import threading
import weakref
from time import monotonic
from typing import Optional, Protocol

from .recovery import MAX_ACK_DELAY

GRACE = 0.5         # seconds the thread outlives the last connection, for the next one
# A reminder this little sooner than the keeper's wake-up does not wake it: waking a thread
# costs a context switch or two (tens of microseconds), which a request/response client would
# otherwise pay every few round trips as its timers (the PTO, the ack delay) move back and
# forth by a fraction of a millisecond. Such a timer runs at most this late between calls;
# calls run their own timers on time.
SLACK = 0.002
# While calls come (one reminded it since its last pass) the keeper looks again at least this
# often, so the timer a call sets most often, the ack delay (MAX_ACK_DELAY after a receive),
# never lies before its wake-up and needs no reminder: a busy connection costs the keeper a
# pass every TICK instead of a wake-up every few round trips. Idle, it sleeps until the timer.
TICK = MAX_ACK_DELAY - SLACK


class Kept(Protocol):
    def run_timers(self, now: float) -> Optional[float]:
        """Run what is due (never while a call runs); when to look again, None for not until reminded."""


class Keeper:
    """The one thread that runs the timers of blocking connections between calls. It sleeps
    until the earliest timer of the connections it keeps (a call that makes one sooner wakes
    it), holds them weakly (a forgotten connection is still freed by its __del__), and ends
    when it has kept none for GRACE seconds; the next connection starts it again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._conns: weakref.WeakSet[Kept] = weakref.WeakSet()
        self._wake_at = _AWAKE            # when it sleeps until; _AWAKE while it looks at connections
        self._reminded = _NEVER           # the soonest timer a call reported while it was looking
        self._rescan = False              # a connection came or went while it was looking
        self._active = False              # a call reminded it since its last pass
        self.thread: Optional[threading.Thread] = None

    def add(self, conn: Kept, when: Optional[float]) -> None:
        """Keep conn, whose next timer is `when`: the keeper is woken only if it sleeps past it
        (it reads its connections afresh at every pass)."""
        with self._lock:
            self._conns.add(conn)
            self._rescan = True
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="stcp-keeper", daemon=True)
                self.thread.start()
            elif when is not None and self._wake_at != _AWAKE and when < self._wake_at - SLACK:
                self._wake_at = when
                self._cond.notify()

    def forget(self, conn: Kept) -> None:
        """Keep conn no longer. The keeper is not woken for it, unless it was the last one and
        the keeper sleeps past GRACE (it is to end GRACE after the last connection)."""
        with self._lock:
            self._conns.discard(conn)
            self._rescan = True
            if not self._conns and self._wake_at != _AWAKE and self._wake_at > monotonic() + GRACE:
                self._cond.notify()

    def remind(self, when: float) -> None:
        """A connection's next timer, at the end of a call: wake the keeper if it sleeps past
        it, or, while it is looking, have it sleep no longer than that. The unlocked first
        test keeps the common case (it wakes sooner anyway) free of the lock."""
        self._active = True
        if when < self._wake_at - SLACK or self._wake_at == _AWAKE:
            with self._lock:
                if self._wake_at == _AWAKE:
                    self._reminded = min(self._reminded, when)
                elif when < self._wake_at - SLACK:
                    self._wake_at = when
                    self._cond.notify()

    def _run(self) -> None:
        empty_since: Optional[float] = None
        while True:
            with self._lock:
                conns = list(self._conns)
                if not conns:
                    # none kept: wait GRACE for the next one (looking every TICK, so that a
                    # connection added meanwhile needs no wake-up), then end
                    now = monotonic()
                    if empty_since is None:
                        empty_since = now
                    if now >= empty_since + GRACE:
                        self.thread = None
                        self._wake_at = _AWAKE
                        return
                    self._wake_at, self._rescan = min(now + TICK, empty_since + GRACE), False
                    self._cond.wait(self._wake_at - now)
                    continue
                empty_since = None
                self._wake_at, self._reminded, self._rescan = _AWAKE, _NEVER, False
            now = monotonic()
            wake = _NEVER
            for conn in conns:
                when = conn.run_timers(now)
                if when is not None and when < wake:
                    wake = when
            del conns, conn                 # no strong reference while asleep: __del__ stays possible
            with self._lock:
                if self._rescan:
                    continue
                if self._active:
                    self._active = False
                    wake = min(wake, now + TICK)
                self._wake_at = wake = min(wake, self._reminded)
                self._cond.wait(None if wake == _NEVER else max(0.0, wake - monotonic()))


_AWAKE = float("-inf")
_NEVER = float("inf")

