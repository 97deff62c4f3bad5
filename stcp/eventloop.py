"""The event loop `stcp` commands run on: uvloop when it is installed (the `uvloop` extra:
pip install 'stcp[uvloop]'), asyncio's own otherwise.

uvloop runs the same protocol code with less CPU per wake-up (the socket datapath only uses
add_reader, add_writer and call_at, which both loops provide). STCP_LOOP=asyncio picks
asyncio's loop even when uvloop is installed (to compare the two); STCP_LOOP=uvloop insists
on uvloop and says how to install it when it is missing.
"""
from __future__ import annotations

import asyncio
import importlib
import os
from typing import Any, Callable, Coroutine, Optional, TypeVar

from .errors import STCPError

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]
CHOICES = ("auto", "asyncio", "uvloop")


def loop_factory(choice: Optional[str] = None) -> Optional[LoopFactory]:
    """The factory for the loop to run on (None: asyncio's default), by `choice` or else
    $STCP_LOOP (auto, asyncio or uvloop; auto when unset)."""
    choice = (choice or os.environ.get("STCP_LOOP") or "auto").lower()
    if choice not in CHOICES:
        raise STCPError(f"STCP_LOOP={choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise STCPError("STCP_LOOP=uvloop but uvloop is not installed: "
                             "pip install 'stcp[uvloop]' (or unset STCP_LOOP)") from None
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def loop_name(factory: Optional[LoopFactory]) -> str:
    return "asyncio" if factory is None else factory.__module__.split(".")[0]


def run(main: Coroutine[Any, Any, T], choice: Optional[str] = None) -> T:
    """asyncio.run(main) on the loop loop_factory picks."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
