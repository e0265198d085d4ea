"""Apply a batch of journal entries through a target adapter, the way the drain would, minus the DLQ.

One run per key (that key's entries in journal order), every key at once; what failed
is tried again until each entry landed or failed for good:

- transient    the key retries with the namespace's backoff, up to its max_attempts
- unavailable  the target is down: wait and retry, however long, with a message in the
               progress; nothing is ever skipped
- permanent    reported through `on_failure` (listed in the job's summary) and passed
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any

import trio

from sidecar.config import RetryPolicy
from sidecar.drain.settling import backoff
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome
from sidecar.envelope import Entry
from sidecar.logs import get_logger
from sidecar.replay.progress import ReplayProgress

log = get_logger("replay")

UNAVAILABLE_MAX_WAIT = 5.0

OnFailure = Callable[[int, Entry, str, str], None]  # (seq, entry, error class, message)


class StoppedWaiting(Exception):
    """The job was asked to stop while its target was down: the batch is left unfinished (not checkpointed)."""


class Applier:
    def __init__(self, target: Any, retry: RetryPolicy, progress: ReplayProgress, on_failure: OnFailure,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.target = target
        self.retry = retry
        self.progress = progress
        self.on_failure = on_failure
        self.stopping = stopping
        self._resume_state = "applying"  # what the progress said before the target went away

    async def apply(self, work: list[tuple[int, Entry]]) -> None:
        """Apply (seq, entry) pairs given in journal order; returns when each one landed or failed."""
        progress = self.progress
        retry = self.retry
        lanes: OrderedDict[str, deque[int]] = OrderedDict()
        for index, (_, entry) in enumerate(work):
            lanes.setdefault(entry.key, deque()).append(index)
        attempts: Counter[int] = Counter()
        unavailable_rounds = 0
        while lanes:
            keys = list(lanes)
            runs = [[work[i][1] for i in lanes[key]] for key in keys]
            outcomes = await self._apply_runs(runs)
            delay = 0.0
            unavailable: ApplyError | None = None
            for key, outcome in zip(keys, outcomes, strict=True):
                lane = lanes[key]
                for _ in range(outcome.applied):
                    lane.popleft()
                progress.applied += outcome.applied
                error = outcome.error
                if error is not None and lane:
                    index = lane[0]
                    seq, entry = work[index]
                    if error.error_class is ErrorClass.UNAVAILABLE:
                        unavailable = error
                    elif error.error_class is ErrorClass.PERMANENT:
                        self.on_failure(seq, entry, "permanent", error.message)
                        lane.popleft()
                    else:
                        attempts[index] += 1
                        progress.retries += 1
                        if attempts[index] >= retry.max_attempts:
                            self.on_failure(seq, entry, "exhausted",
                                            f"{error.message} (gave up after {attempts[index]} attempts)")
                            lane.popleft()
                        else:
                            delay = max(delay, error.retry_after, backoff(attempts[index], retry.initial_delay,
                                                                          retry.max_delay, retry.multiplier))
                if not lane:
                    del lanes[key]
            if unavailable is not None:
                if self.stopping():
                    raise StoppedWaiting(unavailable.message)
                unavailable_rounds += 1
                await self._wait_unavailable(unavailable, unavailable_rounds)
                continue
            if progress.state == "waiting":
                log.info("replay_target_back", job=progress.id, target=progress.target)
                progress.state, progress.message = self._resume_state, ""
            if delay:
                await trio.sleep(delay)

    async def _wait_unavailable(self, error: ApplyError, rounds: int) -> None:
        progress = self.progress
        retry = self.retry
        if progress.state != "waiting":
            log.warning("replay_target_unavailable", job=progress.id, target=progress.target, error=error.message)
            self._resume_state = progress.state
        progress.state = "waiting"
        progress.message = f"target unavailable, retrying (nothing is skipped): {error.message}"
        await trio.sleep(min(UNAVAILABLE_MAX_WAIT, backoff(rounds, retry.initial_delay, retry.max_delay,
                                                           retry.multiplier)))

    async def _apply_runs(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        try:
            return await self.target.apply(runs)
        except ApplyError as exc:
            return [RunOutcome(0, exc) for _ in runs]
        except Exception as exc:  # an adapter bug must not end the job without its checkpoint: retried
            log.error("replay_apply_crashed", exc_info=True, job=self.progress.id, error=str(exc))
            error = ApplyError(ErrorClass.TRANSIENT, f"{type(exc).__name__}: {exc}")
            return [RunOutcome(0, error) for _ in runs]
