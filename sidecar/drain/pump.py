"""One target call for many partitions' rounds: group commit for the drain side.

Every partition worker of a target hands its round to the pump and waits; the pump
sends everything that queued up while the previous call was in flight as one call
(a few calls may be in flight at once). A target with blocking clients pays one
thread hop per call rather than one per partition round, and a busy target gets
larger, fewer batches exactly when it is slowest.
"""

from __future__ import annotations

from typing import Any

import trio

from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome
from sidecar.envelope import Entry
from sidecar.logs import get_logger

log = get_logger("drain")


class _Request:
    __slots__ = ("done", "outcomes", "runs")

    def __init__(self, runs: list[list[Entry]]) -> None:
        self.runs = runs
        self.outcomes: list[RunOutcome] | None = None
        self.done = trio.Event()


class ApplyPump:
    def __init__(self, target: Any, max_calls: int = 4, max_runs: int = 4096) -> None:
        self.target = target
        self.max_runs = max_runs
        self._queue: list[_Request] = []
        self._work = trio.Event()
        self._calls = trio.Semaphore(max_calls)

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        request = _Request(runs)
        self._queue.append(request)
        self._work.set()
        await request.done.wait()
        assert request.outcomes is not None
        return request.outcomes

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await self._work.wait()
                self._work = trio.Event()
                while self._queue:
                    await self._calls.acquire()
                    batch: list[_Request] = []
                    size = 0
                    while self._queue and (not batch or size + len(self._queue[0].runs) <= self.max_runs):
                        request = self._queue.pop(0)
                        batch.append(request)
                        size += len(request.runs)
                    nursery.start_soon(self._call, batch)

    async def _call(self, batch: list[_Request]) -> None:
        try:
            runs = [run for request in batch for run in request.runs]
            try:
                outcomes = await self.target.apply(runs)
            except ApplyError as exc:
                outcomes = [RunOutcome(0, exc) for _ in runs]
            except Exception as exc:  # a target bug must not stop the drain: retry as transient
                log.error("target_apply_crashed", exc_info=True, target=self.target.name, error=str(exc))
                error = ApplyError(ErrorClass.TRANSIENT, f"{type(exc).__name__}: {exc}")
                outcomes = [RunOutcome(0, error) for _ in runs]
            start = 0
            for request in batch:
                request.outcomes = outcomes[start : start + len(request.runs)]
                start += len(request.runs)
                request.done.set()
        finally:
            self._calls.release()
