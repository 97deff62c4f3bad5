"""`stcp connect --progress`: bytes each way, rate and elapsed time on stderr, as pv and
`ncat -v` users expect from a long transfer. Off by default: stderr stays quiet."""
from __future__ import annotations

import asyncio
import sys
import time
from typing import Optional, TextIO

INTERVAL = 1.0          # seconds between updates


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Counts what a transfer moves and reports it every INTERVAL seconds: on a terminal one
    line rewritten in place, elsewhere (a log file, journald) one line per update; a last line
    with the averages when it stops."""

    def __init__(self, out: TextIO = sys.stderr, interval: float = INTERVAL):
        self.out = out
        self.interval = interval
        self.sent = 0
        self.received = 0
        self.tty = out.isatty()
        self._start = time.monotonic()
        self._last = (self._start, 0)
        self._task: Optional["asyncio.Task[None]"] = None

    def start(self) -> None:
        self._start = time.monotonic()
        self._last = (self._start, 0)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now, total = time.monotonic(), self.sent + self.received
            then, before = self._last
            self._last = (now, total)
            self._show(now, (total - before) / max(now - then, 1e-9), final=False)

    def stop(self) -> None:
        """The last line: totals and the average rate over the whole transfer (once)."""
        if self._task is None:
            return                     # never started (the handshake failed): nothing to report
        self._task.cancel()
        self._task = None
        now = time.monotonic()
        self._show(now, (self.sent + self.received) / max(now - self._start, 1e-9), final=True)

    def _show(self, now: float, rate: float, final: bool) -> None:
        line = (f"stcp: {human_bytes(self.sent)} sent, {human_bytes(self.received)} received, "
                f"{human_bytes(rate)}/s{' average' if final else ''}, {clock(now - self._start)}")
        if self.tty:
            self.out.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()
