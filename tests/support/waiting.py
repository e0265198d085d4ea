"""Waiting for a condition in tests: polled, with a timeout that says what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable

import trio


async def converge(difference: Callable[[], object], timeout: float, what: str, interval: float = 0.3) -> None:
    """Poll `difference` (in a worker thread: it may block on a client) until it is empty."""
    deadline = time.monotonic() + timeout
    diff: object = None
    while time.monotonic() < deadline:
        diff = await trio.to_thread.run_sync(difference)
        if not diff:
            return
        await trio.sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout:g}s; still: {str(diff)[:500]}")


async def until(predicate: Callable[[], bool], timeout: float, what: str = "the condition") -> None:
    await converge(lambda: not predicate(), timeout, what)
