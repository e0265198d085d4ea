"""How a partition worker settles what it cannot apply: retries with backoff, dead letters, strict mode's
blocked keys, and entries nearing the journal's max age (a mixin of PartitionWorker, sidecar/drain/partition.py)."""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import trio

from sidecar.drain import expiry
from sidecar.drain.consumer import PartitionConsumer
from sidecar.drain.dlq import dead_letter, dlq_headers
from sidecar.drain.held import Held
from sidecar.drain.targets.base import ApplyError, ErrorClass
from sidecar.logs import get_logger

if TYPE_CHECKING:
    from sidecar.drain.service import TargetDrainer

log = get_logger("drain")


def backoff(attempts: int, initial: float, maximum: float, multiplier: float) -> float:
    """Exponential with equal jitter: half fixed, half random, capped."""
    delay = min(maximum, initial * multiplier ** max(0, attempts - 1))
    return delay / 2 + random.uniform(0, delay / 2)


class Settling:
    """The worker's state these methods share (set by PartitionWorker.__init__)."""

    drainer: TargetDrainer
    partition: int
    consumer: PartitionConsumer
    lanes: dict[str, list[Held]]
    ready: set[str]
    parked: dict[str, float]
    blocked: dict[str, set[str]]
    inflight: set[str]
    held: dict
    rescue: bool
    next_seq: int
    _work: trio.Event

    def _release(self, held: Held) -> None:
        raise NotImplementedError

    def _settled(self, held: Held, dead: bool) -> tuple[bytes, int] | None:
        raise NotImplementedError

    def _settle(self, keys: list[str]) -> None:
        raise NotImplementedError

    def _refill(self) -> None:
        raise NotImplementedError

    # --- failures ---------------------------------------------------------------------

    async def _failed(self, key: str, held: Held, error: ApplyError) -> None:
        drainer = self.drainer
        retry = drainer.retry
        now = time.time()
        held.first_failure = held.first_failure or now
        held.last_failure = now
        held.last_error = error.message
        if error.error_class is ErrorClass.UNAVAILABLE:
            self.parked[key] = trio.current_time() + max(retry.initial_delay, error.retry_after)
            return
        held.attempts += 1
        if error.error_class is ErrorClass.TRANSIENT and held.attempts < retry.max_attempts:
            drainer.stats.retries += 1
            delay = max(error.retry_after, backoff(held.attempts, retry.initial_delay, retry.max_delay,
                                                   retry.multiplier))
            self.parked[key] = trio.current_time() + delay
            log.debug("apply_retry", target=drainer.name, key=held.entry.key, seq=held.seq, attempts=held.attempts,
                      delay=f"{delay:.2f}s", error=error.message)
            return
        error_class = "permanent" if error.error_class is ErrorClass.PERMANENT else "exhausted"
        await self._dead_letter(key, held, error, error_class)

    def _dead_letter_soon(self, held: Held, error: ApplyError) -> None:
        """An entry that never reached a lane (undecodable): dead-letter it straight away."""
        self.drainer.spawn(lambda: self._dead_letter(held.entry.key, held, error, "permanent", in_lane=False))

    async def _dead_letter(self, key: str, held: Held, error: ApplyError, error_class: str,
                           in_lane: bool = True) -> None:
        """`key` is the entry's lane: its own key, or its partition's one lane for an ordered target."""
        drainer = self.drainer
        lane = self.lanes.get(key)
        entry_key = held.entry.key
        superseded = bool(lane and any(later.entry.key == entry_key for later in lane[1:]))
        now = time.time()
        if drainer.dlq_enabled:
            headers = dlq_headers(
                target=drainer.name, error=error, error_class=error_class, attempts=held.attempts, seq=held.seq,
                subject=f"wal.{drainer.namespace}.{self.partition}", key=entry_key,
                first_failure=held.first_failure or now, last_failure=held.last_failure or now,
                superseded=superseded, index=held.pos[1] if isinstance(held.pos, tuple) else -1,
            )
            result = await dead_letter(drainer.writer, drainer.namespace, entry_key, held.data, headers)
            if not result.ok:  # keep it in the journal and try again later
                log.warning("dead_letter_failed", target=drainer.name, seq=held.seq, error=result.message)
                if in_lane:
                    self.parked[key] = trio.current_time() + drainer.retry.initial_delay
                return
        log.warning("dead_lettered" if drainer.dlq_enabled else "dropped_without_dlq", namespace=drainer.namespace,
                    target=drainer.name, key=entry_key, seq=held.seq, error_class=error_class, error=error.message,
                    attempts=held.attempts)
        drainer.stats.dead_lettered += 1
        # Settled without being applied: a negative sequence in the applied notice, so the ingress stops
        # waiting for it and drops it from the read-your-writes overlay (sidecar/applied.py).
        if (settled := self._settled(held, True)) is not None:
            self.consumer.signal([settled[0]])
            drainer.applied([settled[1]])
        if not in_lane:
            return
        assert lane is not None
        del lane[0]
        self._release(held)
        if drainer.strict and drainer.dlq_enabled:  # the lane waits until these keys have no dead letters
            self.blocked.setdefault(key, set()).add(entry_key)
        elif lane and key not in self.inflight:  # else once its round (or expiry check) is done: `_settle`
            self.ready.add(key)
        if not lane:
            self.lanes.pop(key, None)
        self._refill()

    async def _blocked_loop(self) -> None:
        """Strict mode: a lane resumes once the dead letters of every key it waits on were replayed or purged,
        or once strict mode (or the DLQ) was switched off."""
        while True:
            await trio.sleep(2.0)
            drainer = self.drainer
            for key, letters_of in list(self.blocked.items()):
                if key in self.inflight:  # blocked by a round still in flight: look again next time
                    continue
                if drainer.strict and drainer.dlq_enabled:
                    for letter_key in list(letters_of):
                        if not await drainer.has_dead_letters(letter_key):
                            letters_of.discard(letter_key)
                    if letters_of:
                        continue
                if self.blocked.pop(key, None) is not None and self.lanes.get(key):
                    self.ready.add(key)
                    self._work.set()

    async def _expiry_loop(self) -> None:
        """Dead-letter held entries nearing the journal's max age (oldest first, a key's in order); while
        nothing is fetched, look whether the next unfetched entry is near it, and fetch it if so."""
        drainer = self.drainer
        window = drainer.ns.replay_window
        limit = expiry.EXPIRE_FRACTION * window
        while True:
            await trio.sleep(expiry.check_interval(window))
            now = time.time()
            for key in [k for k, lane in self.lanes.items() if now - lane[0].stored_at >= limit]:
                while key not in self.inflight and (lane := self.lanes.get(key)) and \
                        now - lane[0].stored_at >= limit:
                    held = lane[0]
                    message = expiry.expiry_message(now - held.stored_at, window, held.last_error)
                    # Out of the apply loop's reach while its dead letter is written.
                    self.ready.discard(key)
                    self.inflight.add(key)
                    try:
                        await self._dead_letter(key, held, ApplyError(ErrorClass.PERMANENT, message),
                                                expiry.ERROR_CLASS)
                    finally:
                        self._settle([key])
                    if self.lanes.get(key) is lane and lane and lane[0] is held:
                        break  # the DLQ write failed: the key is parked, try on the next check
            if drainer.fetching() or (self.held and not self.rescue):
                self.rescue = False  # what is held is older than anything unfetched: it goes first
                continue
            consumer = self.consumer
            stored = await expiry.first_stored_time(drainer.service.nats, consumer.stream,
                                                    consumer.subject, self.next_seq)
            self.rescue = bool(stored) and time.time() - stored >= limit
            if self.rescue:
                self._refill()

