"""CPU work on large buffers moved off the trio loop, so one big request does not stall the others."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

# Above this, a digest (or a decompression) is computed in a worker thread: hashlib and zlib release
# the GIL on large buffers, so the trio loop goes on serving (SHA-256 of 15 MiB is tens of ms). The
# data is not copied; two threads at a time bound the CPU it takes from the loop's own work.
OFF_LOOP_BYTES = 1024 * 1024
T = TypeVar("T")
_workers: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("walcar_off_loop")


async def off_loop(work: Callable[[], T]) -> T:
    """`work()` in a worker thread (two at a time): for C code that releases the GIL on large
    buffers (hashlib, zlib), so the trio loop is not held while it runs."""
    try:
        limiter = _workers.get()
    except LookupError:
        limiter = trio.CapacityLimiter(2)
        _workers.set(limiter)
    return await trio.to_thread.run_sync(work, limiter=limiter)
