"""One partition of one target: fetch in order, apply per key in order, across keys at once.

Entries wait in per-key lanes. Each round takes, for every key that is ready, the
run of entries at the head of its lane and hands all those runs to the target in
one call; for a target that allows it (`overlapping_rounds`), rounds overlap (a new
one starts for the keys that became ready while earlier ones wait on the target), but
a key is in one round at a time. A target that keeps order across keys itself (`ordered`:
a producer to one log) gets one lane for the whole partition instead: each round, one run of
every key, in stream order. What a run applied is acked (one crossing for the round) and
announced as applied; where it stopped, the error's class decides:

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

import time
from typing import TYPE_CHECKING

import msgspec
import trio

from sidecar.drain.consumer import CONSUMER_NOT_FOUND, IN_PROGRESS, ConsumerGone, Delivered, PartitionConsumer
from sidecar.drain.held import (
    ENTRY_OVERHEAD,
    PULL_COST_PER_BYTE,
    Held,
    Pack,
    Position,
    chunk_bytes,
    held_cost,
    is_special,
)
from sidecar.drain.recent import RecentlyApplied
from sidecar.drain.settling import Settling
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome
from sidecar.envelope import MAX_PACK_ENTRIES, Entry, Op, decode, decode_pieces, is_pack
from sidecar.log.connection import JetStreamApiError
from sidecar.log.payloads import PayloadError, expand_multi, with_payload
from sidecar.log.streams import STREAM_NOT_FOUND
from sidecar.logs import get_logger

if TYPE_CHECKING:
    from sidecar.drain.service import TargetDrainer

log = get_logger("drain")
# JetStream API errors of a take-over that mean the stream (or the consumer) is not there.
GONE_ERRORS = frozenset({STREAM_NOT_FOUND, CONSUMER_NOT_FOUND})


class PartitionWorker(Settling):
    def __init__(self, drainer: TargetDrainer, partition: int, consumer: PartitionConsumer) -> None:
        self.drainer = drainer
        self.partition = partition
        self.consumer = consumer
        settings = drainer.settings
        self.max_inflight = settings.max_inflight
        self.fetch_batch = settings.fetch_batch
        # A target that keeps the order of what it is given across keys (a producer to one log) is handed
        # the partition in stream order: one lane for every key, its rounds as long as what is held.
        self.ordered_lane = f"partition-{partition}" if drainer.ordered else ""
        self.max_run = max(settings.max_run, settings.max_inflight) if drainer.ordered else settings.max_run
        self.ack_wait = settings.ack_wait
        # A key's held entries in stream order. Lists, not deques: most lanes hold one entry, a list of
        # one is a tenth of a deque's allocation, and runs leave the front in slices.
        self.lanes: dict[str, list[Held]] = {}
        self.ready: set[str] = set()
        self.parked: dict[str, float] = {}  # key -> trio time it may retry
        self.blocked: dict[str, set[str]] = {}  # strict mode: lanes behind dead letters -> the keys they are of
        self.held: dict[Position, Held] = {}
        self.packs: dict[int, Pack] = {}  # sequence -> a delivered pack some of whose entries are held
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
        self.restart = False  # it ended for deliveries lost with the connection: run anew from the ack floor

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
        self.restart = False
        self._stopping = True
        self._work.set()

    def abort(self) -> None:
        """The lease is lost: stop at once; another owner replays from the ack floor."""
        self.restart = False
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    # --- deliveries ---------------------------------------------------------------

    def _refill(self) -> None:
        """Room was made: let the consumer ask for more (it asks only when no request is out)."""
        if not self._stopping:
            self.consumer.poke()

    def _allowance(self, one_large: bool = False) -> tuple[int, int]:
        """(messages, max_bytes) for the next pull request, or (0, 0): in bites, not one entry at a time.

        The server counts a message's payload, subject and headers against max_bytes, and a message may be
        a pack of entries, each at least MIN_ENTRY_BYTES: so what a request brings costs at most
        PULL_COST_PER_BYTE x max_bytes (its bytes, their decoded copies, ENTRY_OVERHEAD per entry however
        packed), plus ENTRY_OVERHEAD per message. A message larger than that allows is asked for alone
        (`one_large`), when there is room for the largest message there can be, held twice."""
        if self._stopping or not (self.drainer.fetching() or self.rescue):
            return 0, 0
        messages = min(self.fetch_batch, self.max_inflight - len(self.held))
        if messages <= 0 or (self.held and messages < min(self.fetch_batch, self.max_inflight) // 4):
            return 0, 0
        room = self.byte_budget - self.held_bytes
        if one_large:
            largest = self.drainer.largest_message()
            return (1, largest) if room >= 2 * largest + MAX_PACK_ENTRIES * ENTRY_OVERHEAD else (0, 0)
        messages = min(messages, room // (2 * ENTRY_OVERHEAD))
        max_bytes = (room - messages * ENTRY_OVERHEAD) // PULL_COST_PER_BYTE
        if messages <= 0 or max_bytes <= 0:
            return 0, 0
        return messages, max_bytes

    def _release(self, held: Held) -> None:
        del self.held[held.pos]
        self.held_bytes -= held.cost
        if is_special(held.entry):
            self.special -= 1

    def _take(self, delivered: list[Delivered]) -> None:
        """Deliveries pushed by the consumer (on the trio thread, once per burst)."""
        skip: list[bytes] = []
        self.next_seq = max(self.next_seq, delivered[-1].seq + 1)
        for item in delivered:
            if is_pack(item.data):
                self._take_pack(item, skip)
                continue
            if item.seq in self.held:
                continue  # a redelivery of something this worker still holds
            try:
                entry = decode(item.data)
            except msgspec.DecodeError as exc:
                self._undecodable(item, exc)
                continue
            entry.seq = item.seq  # for targets that pass the journal sequence on (never re-journaled)
            if not self.drainer.wants(entry) or self.recent.last(entry.key) >= item.seq:
                skip.append(item.reply)
                continue
            self._hold(Held(item.seq, item.reply, item.data, entry, held_cost(item.data, entry),
                            item.stored_ns / 1e9, pos=item.seq))
        self.consumer.signal(skip)
        if skip:
            self._refill()
        if self.ready:
            self._work.set()

    def _take_pack(self, item: Delivered, skip: list[bytes]) -> None:
        """A message of several entries (each of another key): each is held and applied on its own, charged
        and dead-lettered as its own bytes; the message is acked once all are settled (`Pack`)."""
        seq = item.seq
        if seq in self.packs:
            return  # redelivered while partly held: what this worker no longer holds, it settled already
        try:
            pieces = decode_pieces(item.data)
        except msgspec.DecodeError as exc:
            self._undecodable(item, exc)
            return
        pack = Pack(item.reply)
        stored_at = item.stored_ns / 1e9
        wants, recent = self.drainer.wants, self.recent
        for index, (raw, entry) in enumerate(pieces):
            entry.seq = seq
            if not wants(entry) or recent.last(entry.key) >= seq:
                continue
            pack.remaining += 1
            self._hold(Held(seq, pack.reply, raw, entry, held_cost(raw, entry), stored_at, pos=(seq, index),
                            pack=pack))
        if pack.remaining:
            self.packs[seq] = pack
        else:
            skip.append(item.reply)

    def _hold(self, held: Held) -> None:
        entry = held.entry
        self.held[held.pos] = held
        self.held_bytes += held.cost
        if is_special(entry):
            self.special += 1
        key = self.ordered_lane or entry.key
        lane = self.lanes.get(key)
        if lane is None:
            self.lanes[key] = [held]
        else:
            lane.append(held)
        if key not in self.parked and key not in self.blocked and key not in self.inflight:
            self.ready.add(key)  # an in-flight key is made ready again when its round ends

    def _undecodable(self, item: Delivered, exc: Exception) -> None:
        log.error("undecodable_entry", namespace=self.drainer.namespace, seq=item.seq, error=str(exc))
        entry = Entry(id=f"undecodable-{item.seq}", ns=self.drainer.namespace, op=Op.PUT,
                      key=f"undecodable-{item.seq}", partition=self.partition, write_time=0)
        held = Held(item.seq, item.reply, item.data, entry, pos=item.seq)
        self._dead_letter_soon(held, ApplyError(ErrorClass.PERMANENT, f"undecodable entry: {exc}"))

    def _settled(self, held: Held, dead: bool) -> tuple[bytes, int] | None:
        """An entry is applied or dead-lettered: (reply to ack, sequence to announce) once its message
        is settled, None while other entries of its pack are held."""
        pack = held.pack
        if pack is None:
            return held.reply, -held.seq if dead else held.seq
        announce = pack.settle(held.seq, dead)
        if not announce:
            return None
        del self.packs[held.seq]
        return pack.reply, announce

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
        applied: list[int] = []  # sequences whose messages are settled (negative: with a dead letter)
        count = 0  # entries applied
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
                count += done
                for held in landed:
                    del held_by_seq[held.pos]
                    self.held_bytes -= held.cost
                    if held.pack is None:
                        acks.append(held.reply)
                        applied.append(held.seq)
                    elif (settled := self._settled(held, False)) is not None:
                        acks.append(settled[0])
                        applied.append(settled[1])
                    if special and is_special(held.entry):
                        self.special -= 1
                        if held.entry.chunk is not None:
                            chunked.append(held)
                any_success = True
                if self.ordered_lane:  # by each entry's own key: an entry can come back after later ones of
                    for held in landed:  # other keys landed (a lost delivery), and must be applied then
                        self.recent.remember(held.entry.key, held.seq, now)
                else:
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
        drainer.stats.applied += count
        if last_error:
            drainer.stats.last_error = last_error
        self._refill()
        return all_failed

    async def _apply_runs(self, runs: list[list[Held]]) -> list[RunOutcome]:
        """Resolve chunked payloads and MULTI markers, then one target call for the rest."""
        outcomes: list[RunOutcome | None] = [None] * len(runs)
        plain: list[tuple[int, list[Entry]]] = []
        stopped: dict[int, ApplyError] = {}  # runs cut short where a payload could not be read
        if not self.special:  # every entry inline, no MULTI marker: the runs go as they are
            plain.extend((index, [held.entry for held in run]) for index, run in enumerate(runs))
            runs = []
        for index, run in enumerate(runs):
            if run[0].entry.op is Op.MULTI:
                outcomes[index] = await self._apply_multi(run[0].entry)
                continue
            entries: list[Entry] = []
            for held in run:  # most entries carry their value inline: no coroutine per entry for them
                try:
                    entries.append(held.entry if held.entry.chunk is None else await self._with_payload(held.entry))
                except ApplyError as exc:  # the run stops at this entry (an ordered run holds other keys before it)
                    stopped[index] = exc.with_traceback(None)  # no traceback: a cycle holding payloads
                    break
            if entries:
                plain.append((index, entries))
            else:
                outcomes[index] = RunOutcome(0, stopped[index])
        if plain:
            began = time.monotonic()
            results = await self.drainer.pump.apply([entries for _, entries in plain])
            self.drainer.stats.observe_latency(time.monotonic() - began)
            for (index, entries), result in zip(plain, results, strict=True):
                if index in stopped and result.error is None and result.applied == len(entries):
                    result = RunOutcome(len(entries), stopped[index])
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
            if self.consumer.deliveries_lost and not self._stopping:
                self.stop()  # what it holds is older than what was lost: applied and acked first, if it can be
                self.restart = True
                await trio.sleep(self.ack_wait / 3)  # paused, or the breaker open: restart without waiting
                while self.restart and self.rounds:  # noqa: ASYNC110 - a target call in flight would land after the replay
                    await trio.sleep(0.25)
                if self.restart and self.cancel_scope is not None:
                    self.cancel_scope.cancel()
                return
            self._refill()

    async def _keepalive_loop(self) -> None:
        """+WPI for everything held, so parked keys and an open breaker never cause redeliveries."""
        interval = max(1.0, self.ack_wait / 3)
        while True:
            await trio.sleep(interval)
            self.consumer.signal(list({held.reply: None for held in self.held.values()}), IN_PROGRESS)
            self.recent.expire(trio.current_time())

