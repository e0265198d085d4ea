"""One partition of one target: fetch in order, apply per key in order, across keys at once.

Entries wait in per-key lanes. Each round takes, for every key that is ready, the
run of entries at the head of its lane and hands all those runs to the target in
one call; for a target that allows it (`overlapping_rounds`), rounds overlap (a new
one starts for the keys that became ready while earlier ones wait on the target), but
a key is in one round at a time. What a run
applied is acked (one crossing for the round) and announced as applied; where it
stopped, the error's class decides:

- transient:   the key is parked for a backoff (exponential, jittered); other keys
               keep flowing; after `max_attempts` the entry is dead-lettered
- unavailable: the target is down; the breaker stops every round until a probe
               succeeds; no attempts are counted, nothing is dead-lettered
- permanent:   dead-lettered at once; later entries of the key proceed (or, with
               `strict`, wait until the dead letter is replayed or purged)

Held entries are bounded by count (`max_inflight`) and by bytes (the worker's share of
`max_held_bytes`, enforced by the server through each pull request's `max_bytes`), so
memory stays flat however long the backlog in JetStream is and however large its
values; while the target is paused or its breaker open nothing more is fetched.
Entries held past a third of AckWait get `+WPI`.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import msgspec
import trio

from sidecar.drain import expiry
from sidecar.drain.consumer import IN_PROGRESS, ConsumerGone, Delivered, PartitionConsumer
from sidecar.drain.dlq import dead_letter, dlq_headers
from sidecar.drain.held import ENTRY_OVERHEAD, Held, chunk_bytes, held_cost, is_special
from sidecar.drain.recent import RecentlyApplied
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome
from sidecar.envelope import Entry, Op, decode
from sidecar.log.connection import JetStreamApiError
from sidecar.log.payloads import PayloadError, expand_multi, with_payload
from sidecar.logs import get_logger

if TYPE_CHECKING:
    from sidecar.drain.service import TargetDrainer

log = get_logger("drain")
# JetStream API errors of a take-over that mean the stream (or the consumer) is not there.
GONE_ERRORS = frozenset({10059, 10014})  # stream not found, consumer not found


def backoff(attempts: int, initial: float, maximum: float, multiplier: float) -> float:
    """Exponential with equal jitter: half fixed, half random, capped."""
    delay = min(maximum, initial * multiplier ** max(0, attempts - 1))
    return delay / 2 + random.uniform(0, delay / 2)


class PartitionWorker:
    def __init__(self, drainer: TargetDrainer, partition: int, consumer: PartitionConsumer) -> None:
        self.drainer = drainer
        self.partition = partition
        self.consumer = consumer
        settings = drainer.settings
        self.max_inflight = settings.max_inflight
        self.fetch_batch = settings.fetch_batch
        self.max_run = settings.max_run
        self.ack_wait = settings.ack_wait
        # A key's held entries in stream order. Lists, not deques: most lanes hold one entry, a list of
        # one is a tenth of a deque's allocation, and runs leave the front in slices.
        self.lanes: dict[str, list[Held]] = {}
        self.ready: set[str] = set()
        self.parked: dict[str, float] = {}  # key -> trio time it may retry
        self.blocked: set[str] = set()  # strict mode: keys behind a dead letter
        self.held: dict[int, Held] = {}
        self.held_bytes = 0
        # Held entries that are chunked or MULTI markers: while there are none (the usual case), a round
        # takes each lane's head as one slice and hands the entries over as they are, with no per-entry checks.
        self.special = 0
        self.byte_budget = drainer.byte_budget  # this worker's share of sidecar.drain.max_held_bytes
        self.inflight: set[str] = set()  # keys of the rounds being applied
        self.rounds = 0  # rounds in flight
        self.next_seq = 1  # the first stream sequence not delivered yet
        self.rescue = False  # fetch though paused / breaker open: unfetched entries near expiry
        # Slack for the server's redelivery timer; bounded by the whole drain's budget, not per partition.
        self.recent = RecentlyApplied(2 * self.ack_wait, drainer.service.recent_budget)
        self._work = trio.Event()
        self._stopping = False
        self.cancel_scope: trio.CancelScope | None = None
        self.gone_reason = ""  # why its consumer counts as gone (the worker ends; the partition is taken over)

    # --- lifecycle --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        except JetStreamApiError as exc:
            if exc.err_code not in GONE_ERRORS:
                raise
            raise ConsumerGone(exc.description) from None
        finally:
            self.recent.clear()  # the remembered keys' bytes go back to the drain's budget
            await self.consumer.unbind()  # also when it failed: its pull would go on asking
        if self.gone_reason:  # raised here, not in the nursery (which would wrap it in an ExceptionGroup)
            raise ConsumerGone(self.gone_reason)

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self.cancel_scope = scope
            start = self.next_seq = await self.consumer.take_over(self._take, self._allowance)
            log.info("partition_acquired", namespace=self.drainer.namespace, target=self.drainer.name,
                     partition=self.partition, from_seq=start)
            self.drainer.consumer_back()
            task_status.started()
            self._refill()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._fetch_loop)
                nursery.start_soon(self._expiry_loop)
                nursery.start_soon(self._keepalive_loop)
                nursery.start_soon(self._blocked_loop)
                await self._apply_loop()
                nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Graceful: the round in flight finishes and is acked, then the worker exits."""
        self._stopping = True
        self._work.set()

    def abort(self) -> None:
        """The lease is lost: stop at once; another owner replays from the ack floor."""
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    # --- deliveries ---------------------------------------------------------------

    def _refill(self) -> None:
        """Room was made: let the consumer ask for more (it asks only when no request is out)."""
        if not self._stopping:
            self.consumer.poke()

    def _allowance(self) -> tuple[int, int]:
        """(entries, max_bytes) for the next pull request, or (0, 0): in bites, not one entry at a time.

        The server counts a message's payload, subject and headers against max_bytes, so what a
        request brings costs at most 2 x max_bytes + ENTRY_OVERHEAD per entry (see `held_cost`)."""
        if self._stopping or not (self.drainer.fetching() or self.rescue):
            return 0, 0
        entries = min(self.fetch_batch, self.max_inflight - len(self.held))
        if entries <= 0 or (self.held and entries < min(self.fetch_batch, self.max_inflight) // 4):
            return 0, 0
        # Never ask for less than the largest message the server can hold: a request whose
        # max_bytes is under the next message's size would end at once, again and again.
        largest = self.drainer.largest_message()
        room = self.byte_budget - self.held_bytes
        entries = min(entries, (room - 2 * largest) // ENTRY_OVERHEAD)
        if entries <= 0:
            return 0, 0
        return entries, (room - entries * ENTRY_OVERHEAD) // 2

    def _release(self, held: Held) -> None:
        del self.held[held.seq]
        self.held_bytes -= held.cost
        if is_special(held.entry):
            self.special -= 1

    def _take(self, delivered: list[Delivered]) -> None:
        """Deliveries pushed by the consumer (on the trio thread, once per burst)."""
        skip: list[bytes] = []
        self.next_seq = max(self.next_seq, delivered[-1].seq + 1)
        for item in delivered:
            if item.seq in self.held:
                continue  # a redelivery of something this worker still holds
            try:
                entry = decode(item.data)
            except msgspec.DecodeError as exc:
                log.error("undecodable_entry", namespace=self.drainer.namespace, seq=item.seq, error=str(exc))
                entry = Entry(id=f"undecodable-{item.seq}", ns=self.drainer.namespace, op=Op.PUT,
                              key=f"undecodable-{item.seq}", partition=self.partition, write_time=0)
                held = Held(item.seq, item.reply, item.data, entry)
                self._dead_letter_soon(held, ApplyError(ErrorClass.PERMANENT, f"undecodable entry: {exc}"))
                continue
            entry.seq = item.seq  # for targets that pass the journal sequence on (never re-journaled)
            if not self.drainer.wants(entry) or self.recent.last(entry.key) >= item.seq:
                skip.append(item.reply)
                continue
            held = Held(item.seq, item.reply, item.data, entry, held_cost(item.data, entry), item.stored_ns / 1e9)
            self.held[item.seq] = held
            self.held_bytes += held.cost
            if is_special(entry):
                self.special += 1
            lane = self.lanes.get(entry.key)
            if lane is None:
                self.lanes[entry.key] = [held]
            else:
                lane.append(held)
            if entry.key not in self.parked and entry.key not in self.blocked and entry.key not in self.inflight:
                self.ready.add(entry.key)  # an in-flight key is made ready again when its round ends
        self.consumer.signal(skip)
        if skip:
            self._refill()
        if self.ready:
            self._work.set()

    # --- applying -------------------------------------------------------------------

    async def _apply_loop(self) -> None:
        """Start a round as soon as keys are ready, without waiting for the rounds in flight (up to the
        target's `overlapping_rounds`, 1 unless it says; its limit bounds the keys in flight): a target whose
        call waits on its own batching (a producer's linger and acks) keeps the other keys moving meanwhile.
        A round's keys are out of `ready` until its outcomes are handled: a key is in one round at a time.
        While anything chunked is held, one round at a time: each reads up to the byte budget."""
        async with trio.open_nursery() as rounds:
            while True:
                self._unpark_due()
                busy = self.rounds >= (1 if self.special else self.drainer.overlapping_rounds)
                if not self.ready or busy:
                    if self._stopping and not self.ready:
                        return  # the nursery waits for the rounds in flight, which ack what they applied
                    self._work = trio.Event()
                    wake = min(self.parked.values(), default=trio.current_time() + 1.0)
                    with trio.move_on_at(wake):
                        await self._work.wait()
                    continue
                await self.drainer.wait_not_paused()
                await self.drainer.breaker.wait_until_usable()
                granted = await self.drainer.limiter.acquire(len(self.ready))
                # The expiry check may have dead-lettered keys while this waited.
                keys, runs = self._runs_for(list(self.ready)[:granted])
                if not keys:
                    self.drainer.limiter.release(granted, 0.0, False)
                    continue
                self.ready.difference_update(keys)
                self.inflight.update(keys)  # until the round's outcomes are all handled
                self.rounds += 1
                rounds.start_soon(self._limited_round, keys, runs, granted)

    async def _limited_round(self, keys: list[str], runs: list[list[Held]], granted: int) -> None:
        began = trio.current_time()
        failed = True
        try:
            failed = await self._round(keys, runs)
        finally:
            self._settle(keys)
            self.rounds -= 1
            self.drainer.limiter.release(granted, trio.current_time() - began, failed)
            self._work.set()

    def _settle(self, keys: list[str]) -> None:
        """These keys are out of flight: those with entries left (some may have arrived meanwhile, and were
        not made ready then) are ready again, unless parked or blocked. The one place an in-flight key
        becomes ready, so a key is never in two rounds."""
        self.inflight.difference_update(keys)
        self.ready.update(key for key in keys if self.lanes.get(key) and key not in self.parked
                          and key not in self.blocked)
        if self.ready:
            self._work.set()

    def _unpark_due(self) -> None:
        now = trio.current_time()
        for key, when in list(self.parked.items()):
            if when <= now and key not in self.inflight:  # parked by a round still in flight: it ends first
                del self.parked[key]
                if self.lanes.get(key) and key not in self.blocked:
                    self.ready.add(key)

    def _run_for(self, key: str, room: int) -> list[Held]:
        """The run at the head of the key's lane: at least one entry, and no more chunked payload
        than `room` bytes besides (those are read from the chunk store for the round)."""
        lane = self.lanes[key]
        if lane[0].entry.op is Op.MULTI:
            return [lane[0]]
        run: list[Held] = []
        for held in lane:
            if held.entry.op is Op.MULTI or len(run) >= self.max_run:
                break
            room -= chunk_bytes(held.entry)
            if run and room < 0:
                break
            run.append(held)
        return run

    def _runs_for(self, keys: list[str]) -> tuple[list[str], list[list[Held]]]:
        """Runs for as many of `keys` as the byte budget allows chunked payloads for (at least one);
        the other keys stay ready for the next round."""
        if not self.special:  # nothing chunked, no MULTI: every run is its lane's head, whole
            lanes, max_run = self.lanes, self.max_run
            return keys, [lanes[key][:max_run] for key in keys]
        taken: list[str] = []
        runs: list[list[Held]] = []
        room = self.byte_budget
        for key in keys:
            if taken and room <= 0:
                break
            run = self._run_for(key, room)
            room -= sum(chunk_bytes(held.entry) for held in run)
            taken.append(key)
            runs.append(run)
        return taken, runs

    async def _round(self, keys: list[str], runs: list[list[Held]]) -> bool:
        """Apply one run per key; returns whether the round failed entirely."""
        drainer = self.drainer
        outcomes = await self._apply_runs(runs)
        acks: list[bytes] = []
        applied: list[int] = []
        chunked: list[Held] = []
        any_success = False
        unavailable = False
        last_error = ""
        now = trio.current_time()
        held_by_seq = self.held
        special = self.special
        for key, run, outcome in zip(keys, runs, outcomes, strict=True):
            lane = self.lanes[key]
            done = outcome.applied
            del lane[:done]
            if done:
                landed = run if done == len(run) else run[:done]
                for held in landed:
                    del held_by_seq[held.seq]
                    self.held_bytes -= held.cost
                    acks.append(held.reply)
                    applied.append(held.seq)
                    if special and is_special(held.entry):
                        self.special -= 1
                        if held.entry.chunk is not None:
                            chunked.append(held)
                any_success = True
                self.recent.remember(key, landed[-1].seq, now)
            if outcome.error is not None:
                last_error = outcome.error.message
                unavailable = unavailable or outcome.error.error_class is ErrorClass.UNAVAILABLE
                await self._failed(key, run[outcome.applied], outcome.error)
            if not lane:
                self.lanes.pop(key, None)
        self.consumer.signal(acks)
        drainer.applied(applied)
        for held in chunked:
            await drainer.chunk_applied(held.entry)
        all_failed = not any_success and bool(last_error)
        drainer.breaker.record(succeeded=any_success or not last_error, unavailable=unavailable and not any_success,
                               error=last_error)
        drainer.stats.applied += len(applied)
        if last_error:
            drainer.stats.last_error = last_error
        self._refill()
        return all_failed

    async def _apply_runs(self, runs: list[list[Held]]) -> list[RunOutcome]:
        """Resolve chunked payloads and MULTI markers, then one target call for the rest."""
        outcomes: list[RunOutcome | None] = [None] * len(runs)
        plain: list[tuple[int, list[Entry]]] = []
        if not self.special:  # every entry inline, no MULTI marker: the runs go as they are
            plain.extend((index, [held.entry for held in run]) for index, run in enumerate(runs))
            runs = []
        for index, run in enumerate(runs):
            if run[0].entry.op is Op.MULTI:
                outcomes[index] = await self._apply_multi(run[0].entry)
                continue
            try:
                # Most entries carry their value inline: no coroutine per entry for them.
                entries = [held.entry if held.entry.chunk is None else await self._with_payload(held.entry)
                           for held in run]
            except ApplyError as exc:
                outcomes[index] = RunOutcome(0, exc)
                continue
            plain.append((index, entries))
        if plain:
            began = time.monotonic()
            results = await self.drainer.pump.apply([entries for _, entries in plain])
            self.drainer.stats.observe_latency(time.monotonic() - began)
            for (index, _), result in zip(plain, results, strict=True):
                outcomes[index] = result
        return [o if o is not None else RunOutcome(0, ApplyError(ErrorClass.TRANSIENT, "lost")) for o in outcomes]

    async def _with_payload(self, entry: Entry) -> Entry:
        try:
            return await with_payload(self.drainer.chunks, entry)
        except PayloadError as exc:
            raise ApplyError(ErrorClass.PERMANENT if exc.permanent else ErrorClass.TRANSIENT, exc.message) from None

    async def _apply_multi(self, marker: Entry) -> RunOutcome:
        """A mutation over the atomic-batch limits: apply its entries, in order per key."""
        try:
            entries = await expand_multi(self.drainer.chunks, marker)
        except PayloadError as exc:
            error_class = ErrorClass.PERMANENT if exc.permanent else ErrorClass.TRANSIENT
            return RunOutcome(0, ApplyError(error_class, exc.message))
        runs: dict[str, list[Entry]] = {}
        for entry in entries:
            entry.seq = marker.seq  # the pieces of one mutation share its journal sequence
            if self.drainer.wants(entry):
                runs.setdefault(entry.key, []).append(entry)
        keys = list(runs)
        for start in range(0, len(keys), 512):
            batch = [runs[k] for k in keys[start : start + 512]]
            results = await self.drainer.pump.apply(batch)
            for run, result in zip(batch, results, strict=True):
                if result.error is not None:
                    return RunOutcome(0, result.error)
                if result.applied < len(run):
                    return RunOutcome(0, ApplyError(ErrorClass.TRANSIENT, "mutation partly applied"))
        return RunOutcome(1)

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
            log.debug("apply_retry", target=drainer.name, key=key, seq=held.seq, attempts=held.attempts,
                      delay=f"{delay:.2f}s", error=error.message)
            return
        error_class = "permanent" if error.error_class is ErrorClass.PERMANENT else "exhausted"
        await self._dead_letter(key, held, error, error_class)

    def _dead_letter_soon(self, held: Held, error: ApplyError) -> None:
        """An entry that never reached a lane (undecodable): dead-letter it straight away."""
        self.drainer.spawn(lambda: self._dead_letter(held.entry.key, held, error, "permanent", in_lane=False))

    async def _dead_letter(self, key: str, held: Held, error: ApplyError, error_class: str,
                           in_lane: bool = True) -> None:
        drainer = self.drainer
        lane = self.lanes.get(key)
        superseded = bool(lane and len(lane) > 1)
        now = time.time()
        if drainer.dlq_enabled:
            headers = dlq_headers(
                target=drainer.name, error=error, error_class=error_class, attempts=held.attempts, seq=held.seq,
                subject=f"wal.{drainer.namespace}.{self.partition}", key=key,
                first_failure=held.first_failure or now, last_failure=held.last_failure or now,
                superseded=superseded,
            )
            result = await dead_letter(drainer.writer, drainer.namespace, key, held.data, headers)
            if not result.ok:  # keep it in the journal and try again later
                log.warning("dead_letter_failed", target=drainer.name, seq=held.seq, error=result.message)
                if in_lane:
                    self.parked[key] = trio.current_time() + drainer.retry.initial_delay
                return
        log.warning("dead_lettered" if drainer.dlq_enabled else "dropped_without_dlq", namespace=drainer.namespace,
                    target=drainer.name, key=key, seq=held.seq, error_class=error_class, error=error.message,
                    attempts=held.attempts)
        drainer.stats.dead_lettered += 1
        self.consumer.signal([held.reply])
        # Settled without being applied: a negative sequence in the applied notice, so the ingress stops
        # waiting for it and drops it from the read-your-writes overlay (sidecar/applied.py).
        drainer.applied([-held.seq])
        if not in_lane:
            return
        assert lane is not None
        del lane[0]
        self._release(held)
        if drainer.strict and drainer.dlq_enabled:
            self.blocked.add(key)
        elif lane and key not in self.inflight:  # else once its round (or expiry check) is done: `_settle`
            self.ready.add(key)
        if not lane:
            self.lanes.pop(key, None)
        self._refill()

    async def _blocked_loop(self) -> None:
        """Strict mode: a key resumes once its dead letters were replayed or purged."""
        while True:
            await trio.sleep(2.0)
            for key in list(self.blocked):
                if key in self.inflight:  # blocked by a round still in flight: look again next time
                    continue
                if not await self.drainer.has_dead_letters(key):
                    self.blocked.discard(key)
                    if self.lanes.get(key):
                        self.ready.add(key)
                        self._work.set()

    async def _fetch_loop(self) -> None:
        """Resumes fetching after a pause or an open breaker (nothing else would ask again); ends the
        worker when its pulls keep failing (the consumer or stream was deleted): the partition is then
        taken over again, which recreates the consumer once the stream is there."""
        while True:
            await trio.sleep(0.25)
            if self.consumer.gone():
                self.gone_reason = self.consumer.failure or "pulls keep failing"
                if self.cancel_scope is not None:
                    self.cancel_scope.cancel()
                return
            self._refill()

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

    async def _keepalive_loop(self) -> None:
        """+WPI for everything held, so parked keys and an open breaker never cause redeliveries."""
        interval = max(1.0, self.ack_wait / 3)
        while True:
            await trio.sleep(interval)
            self.consumer.signal([held.reply for held in self.held.values()], IN_PROGRESS)
            self.recent.expire(trio.current_time())

