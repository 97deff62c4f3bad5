"""Waiting for an event by polling it with a deadline, instead of sleeping a fixed time and
hoping it happened. On timeout: an AssertionError naming what was awaited."""
from __future__ import annotations

import asyncio
import inspect
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """pred()'s first true value, polled every interval for up to timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def await_until(pred: Callable[[], T], timeout: float = 5.0, what: str = "condition",
                      interval: float = 0.01) -> T:
    """wait_until for a coroutine: the event loop runs while it polls; pred may be a
    coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
