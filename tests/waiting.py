"""The one way tests wait: poll a condition until it holds or a deadline passes.

A test never sleeps for a fixed time to let something happen; it states the condition it needs
(a log line printed, a metric exported, a reload recorded) and waits for that, failing with what
it waited for when the deadline passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = 60.0, every_s: float = 0.2) -> T:
    """Call ``condition`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(every_s)


async def async_wait_until(condition: Callable[[], T], what: str, timeout_s: float = 30.0,
                           every_s: float = 0.05) -> T:
    """``wait_until`` inside an event loop (the loop keeps running while it waits)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(every_s)
