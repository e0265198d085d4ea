"""The drain: every (namespace, target) drained by its own consumers, partitions shared via leases.

Each target gets a TargetDrainer (its adapter, concurrency limit, circuit breaker,
stats); each partition of it a PartitionWorker while this process holds its lease.
The assignment loop heartbeats, renews leases (a lost one aborts its worker at
once), takes a fair share of the free partitions (units / live drainers) and hands
back any excess, so drain-only deployments scale out and a dead drainer's
partitions move within a lease TTL.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
import trio

from sidecar.applied import applied_subject
from sidecar.config import Config, DrainSettings, Namespace, RetryPolicy, Target, parse_start, stream_name
from sidecar.drain.backpressure import AdaptiveLimit, BreakerState, CircuitBreaker
from sidecar.drain.chunkgc import ChunkCollector
from sidecar.drain.consumer import ConsumerGone, PartitionConsumer
from sidecar.drain.dlq import key_token
from sidecar.drain.lease import Leases, group_name, lease_key
from sidecar.drain.nats import DrainNats
from sidecar.drain.partition import PartitionWorker
from sidecar.drain.pauses import Pauses
from sidecar.drain.pump import ApplyPump
from sidecar.drain.recent import RecentBudget
from sidecar.drain.targets import build_target
from sidecar.drain.targets.base import ApplyError, addressed_to
from sidecar.envelope import Entry, Op
from sidecar.log.journal import Journal
from sidecar.log.link import DEFAULT_MAX_PAYLOAD
from sidecar.log.streams import dlq_stream_name
from sidecar.logs import get_logger
from sidecar.memory_budget import MESSAGE_ENVELOPE, recent_share, worker_floor

log = get_logger("drain")


class DrainStats:
    __slots__ = ("applied", "dead_lettered", "last_error", "latency", "retries")

    def __init__(self) -> None:
        self.applied = 0
        self.retries = 0
        self.dead_lettered = 0
        self.last_error = ""
        self.latency = 0.0  # EWMA of a target call, seconds

    def observe_latency(self, seconds: float) -> None:
        self.latency = seconds if self.latency == 0 else self.latency * 0.9 + seconds * 0.1


class TargetDrainer:
    def __init__(self, service: DrainService, namespace: str, ns: Namespace, target: Target) -> None:
        self.service = service
        self.namespace = namespace
        self.ns = ns
        self.name = target.name
        self.config = target
        self.target = build_target(target, namespace, service.config)
        self.pump = ApplyPump(self.target)
        self.settings: DrainSettings = service.config.sidecar.drain
        self.retry: RetryPolicy = ns.retry
        self.strict = ns.strict
        self.dlq_enabled = ns.dlq
        self.limiter = AdaptiveLimit(**getattr(self.target, "limits", {}))  # a target may bound it its own way
        # Rounds one partition may have in flight at once; a target opts in to more than one (targets/base.py).
        self.overlapping_rounds = max(1, int(getattr(self.target, "overlapping_rounds", 1)))
        # A target that keeps the order of a run across keys takes each partition in stream order (targets/base.py).
        self.ordered = bool(getattr(self.target, "ordered", False))
        self.breaker = CircuitBreaker()
        self.stats = DrainStats()
        self.writer = service.journal.writer
        self.chunks = service.journal.chunks
        self.scope = trio.CancelScope()  # its probe and pump tasks: cancelled when the target is removed
        self.gone = False  # its consumers or stream are gone (logged once, until a partition is back)
        self.recreating: dict[int, int] = {}  # partitions whose consumer is between delete and create (consumer.py)

    def consumer_gone(self, partition: int, reason: str) -> None:
        """A partition's consumer or stream is gone: logged once per episode, not per partition and retry."""
        if not self.gone:
            self.gone = True
            log.warning("drain_stream_or_consumer_gone", namespace=self.namespace, target=self.name,
                        stream=stream_name(self.namespace), partition=partition, reason=reason,
                        retry="the partition is taken over again every lease tick until the stream is back")

    def consumer_back(self) -> None:
        if self.gone:
            self.gone = False
            log.info("drain_stream_back", namespace=self.namespace, target=self.name)

    def follow(self, ns: Namespace) -> None:
        """The namespace changed live (retry, strict, dlq, partitions stay): read it from now on."""
        self.ns = ns
        self.retry = ns.retry
        self.strict = ns.strict
        self.dlq_enabled = ns.dlq

    @property
    def state(self) -> str:
        if self.service.pauses.is_paused(self.namespace, self.name):
            return "paused"
        if self.breaker.state is not BreakerState.CLOSED:
            return "breaker-open" if self.breaker.state is BreakerState.OPEN else "breaker-half-open"
        return "draining"

    def fetching(self) -> bool:
        """Whether partitions may fetch more: not while paused, nor while the breaker is open."""
        return not self.service.pauses.is_paused(self.namespace, self.name) and \
            self.breaker.state is not BreakerState.OPEN

    def largest_message(self) -> int:
        """A bound on one journal message as the server counts it for a pull's max_bytes."""
        link = self.service.nats.link
        return (link.max_payload if link is not None else DEFAULT_MAX_PAYLOAD) + MESSAGE_ENVELOPE

    @property
    def byte_budget(self) -> int:
        """One partition worker's share of what `max_held_bytes` leaves for held entries (the rest is the
        remembered keys'): split over every partition of every target, so the sum stays within it, but
        never under `worker_floor` (memory_budget.worst_case counts partitions x targets x that floor)."""
        held = self.settings.max_held_bytes - recent_share(self.settings.max_held_bytes)
        share = held // max(1, self.service.total_partitions)
        return max(share, worker_floor(self.largest_message() - MESSAGE_ENVELOPE))

    def wants(self, entry: Entry) -> bool:
        if entry.op is Op.MULTI:  # expanded in its round, where the target is asked about each entry inside
            return addressed_to(entry, self.name)
        return self.target.wants(entry)

    def applied(self, sequences: list[int]) -> None:
        if sequences:
            self.service.notify_applied(self.namespace, self.name, sequences)

    async def chunk_applied(self, entry: Entry) -> None:
        assert entry.chunk is not None
        needed = {d.name for d in self.service.drainers_of(self.namespace) if d.wants(entry)}
        try:
            await self.service.chunkgc.applied(self.namespace, entry.chunk.object, self.name, needed)
        except Exception as exc:  # the object outlives its use until the bucket's max age; not worth failing for
            log.warning("chunk_gc_failed", namespace=self.namespace, object=entry.chunk.object, error=str(exc))

    async def wait_not_paused(self) -> None:
        await self.service.pauses.wait_resumed(self.namespace, self.name)

    async def has_dead_letters(self, key: str) -> bool:
        subject = f"waldlq.{self.namespace}.{self.name}.{key_token(key)}"
        info = await self.service.nats.js_api(
            f"STREAM.INFO.{dlq_stream_name(self.namespace)}", {"subjects_filter": subject}
        )
        return bool((info.get("state") or {}).get("subjects"))

    def spawn(self, factory: Callable[[], Awaitable[None]]) -> None:
        self.service.spawn(factory)

    def worker(self, partition: int) -> PartitionWorker:
        """A worker for the partition, on a consumer of its own (taken over from the ack floor when it runs)."""
        return PartitionWorker(self, partition, self.consumer(partition))

    def consumer(self, partition: int) -> PartitionConsumer:
        return PartitionConsumer(
            self.service.nats,
            stream_name(self.namespace),
            self.name,
            f"wal.{self.namespace}.{partition}",
            partition,
            ack_wait=self.settings.ack_wait,
            max_ack_pending=self.settings.max_inflight * 2,
            first_start=parse_start(self.config.start) if self.config.start != "oldest" else None,
            recreating=self.recreating,
        )

    async def probe_loop(self) -> None:
        """While the breaker is open: probe the target's health, backing off, until it answers."""
        attempt = 0
        while True:
            if self.breaker.state is not BreakerState.OPEN:
                attempt = 0
                await trio.sleep(0.2)
                continue
            await trio.sleep(self.breaker.next_probe_delay(attempt))
            try:
                await self.target.health()
            except ApplyError as exc:
                attempt += 1
                self.stats.last_error = exc.message
                continue
            except Exception as exc:  # an unexpected probe failure counts as still down
                attempt += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                continue
            log.info("breaker_probe_succeeded", namespace=self.namespace, target=self.name)
            self.breaker.probe_succeeded()


@dataclass
class _Lease:
    key: str
    revision: int
    drainer: TargetDrainer
    partition: int
    worker: PartitionWorker
    renewed_at: float
    done: trio.Event


class DrainService:
    def __init__(self, config: Config, journal: Journal, owner: str | None = None,
                 pauses: Pauses | None = None) -> None:
        self.config = config
        self.journal = journal
        self.owner = owner or uuid.uuid4().hex[:12]
        settings = config.sidecar.drain
        # The lease, pause and chunk buckets are nats-py KV on the journal's connection; everything else the
        # drain does on NATS goes through `nats`, the part of that connection it needs (drain/nats.py).
        conn = journal.writer.conn
        self.nats: DrainNats = conn
        self.leases = Leases(conn, self.owner, settings.lease_ttl)
        self.chunkgc = ChunkCollector(conn, journal.chunks,
                                      max((ns.replay_window for ns in config.namespaces.values()), default=3600.0))
        self._own_pauses = pauses is None
        self.pauses = pauses or Pauses(conn)
        self.drainers = [
            TargetDrainer(self, name, ns, target)
            for name, ns in config.namespaces.items()
            for target in ns.targets
        ]
        # Every partition of every target: the denominator of each worker's byte budget.
        self.total_partitions = sum(d.ns.partitions for d in self.drainers)
        # What every partition's remembered keys take together (drain/recent.py): a total, not per partition.
        self.recent_budget = RecentBudget(recent_share(settings.max_held_bytes))
        self.held: dict[str, _Lease] = {}
        self._nursery: trio.Nursery | None = None
        self._stopping = False

    def drainers_of(self, namespace: str) -> list[TargetDrainer]:
        return [d for d in self.drainers if d.namespace == namespace]

    def drainer(self, namespace: str, target: str) -> TargetDrainer | None:
        return next((d for d in self.drainers if d.namespace == namespace and d.name == target), None)

    def spawn(self, factory: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(factory)

    def notify_applied(self, namespace: str, target: str, sequences: list[int]) -> None:
        """Fire and forget over the link: a notice lost while NATS is away only costs a `sync`
        write its `visible: true` (it answers false when the budget runs out)."""
        link = self.nats.link
        if link is not None:
            link.publish(applied_subject(namespace, target), msgspec.msgpack.encode(sequences))

    async def run(self, *, task_status: trio.TaskStatus[DrainService] = trio.TASK_STATUS_IGNORED) -> None:
        await self.leases.open()
        await self.chunkgc.open()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.leases.follow)
            if self._own_pauses:
                await self.pauses.open()
                nursery.start_soon(self.pauses.watch)
            for drainer in self.drainers:
                await self._start_drainer(nursery, drainer)
            log.info("drain_started", owner=self.owner, targets=",".join(f"{d.namespace}/{d.name}"
                                                                       for d in self.drainers))
            task_status.started(self)
            try:
                await self._assignment_loop(nursery)
            finally:
                nursery.cancel_scope.cancel()

    async def _start_drainer(self, nursery: trio.Nursery, drainer: TargetDrainer) -> None:
        await drainer.target.start()

        async def tasks() -> None:
            with drainer.scope:
                async with trio.open_nursery() as inner:
                    inner.start_soon(drainer.probe_loop)
                    inner.start_soon(drainer.pump.run)

        nursery.start_soon(tasks)

    async def reconcile(self, namespace: str, ns: Namespace | None) -> None:
        """The control plane changed a namespace: drainers for new targets start (from the target's
        `start`), removed targets stop and their consumers go, changed targets restart with their
        new settings, and the others read the namespace's new retry/strict/dlq settings."""
        assert self._nursery is not None, "run() first"
        wanted = {t.name: t for t in (ns.targets if ns is not None else [])}
        for drainer in self.drainers_of(namespace):
            target = wanted.get(drainer.name)
            if target is not None and target == drainer.config:
                drainer.follow(ns)  # type: ignore[arg-type]
                del wanted[drainer.name]
                continue
            await self._remove_drainer(drainer, delete_consumers=target is None)
        for target in wanted.values():
            assert ns is not None
            drainer = TargetDrainer(self, namespace, ns, target)
            await self._start_drainer(self._nursery, drainer)
            self.drainers.append(drainer)
            log.info("target_added", namespace=namespace, target=target.name, start=target.start)

    async def _remove_drainer(self, drainer: TargetDrainer, delete_consumers: bool) -> None:
        self.drainers.remove(drainer)
        mine = [lease for lease in self.held.values() if lease.drainer is drainer]
        if not delete_consumers:  # restarting with new settings: let in-flight rounds finish and ack
            for lease in mine:
                lease.worker.stop()
            with trio.move_on_after(self.config.sidecar.drain.ack_wait):
                for lease in mine:
                    await lease.done.wait()
        await self._hand_back(mine)
        drainer.scope.cancel()
        await self._leave([drainer])
        await drainer.target.close()
        if delete_consumers:
            for partition in range(drainer.ns.partitions):
                consumer = drainer.consumer(partition)
                try:
                    await self.nats.js_api(f"CONSUMER.DELETE.{consumer.stream}.{consumer.name}")
                except Exception:  # gone already (another sidecar deleted it), or the stream is gone
                    pass
        log.info("target_removed" if delete_consumers else "target_restarting", namespace=drainer.namespace,
                 target=drainer.name)

    async def _assignment_loop(self, nursery: trio.Nursery) -> None:
        interval = max(0.5, self.config.sidecar.drain.lease_ttl / 3)
        while not self._stopping:
            try:
                await self._tick(nursery)
            except Exception as exc:  # NATS away or similar: keep what we hold until the TTL says otherwise
                log.warning("drain_assignment_failed", error=f"{type(exc).__name__}: {exc}")
                self._abort_stale()
            await trio.sleep(interval)

    async def _tick(self, nursery: trio.Nursery) -> None:
        groups = [group_name(d.namespace, d.name) for d in self.drainers]
        await self.leases.heartbeat(groups)
        for key, lease in list(self.held.items()):
            if lease.done.is_set():
                self.held.pop(key, None)
                await self.leases.release(key, lease.revision)
                continue
            revision = await self.leases.renew(key, lease.revision)
            if revision is None:
                log.warning("lease_lost", key=key)
                lease.worker.abort()
                self.held.pop(key, None)
                continue
            lease.revision, lease.renewed_at = revision, time.monotonic()
        view = self.leases.view
        with trio.move_on_after(self.config.sidecar.drain.lease_ttl):
            await view.ready.wait()
        if not view.ready.is_set():
            raise RuntimeError("the lease bucket's watch has not delivered it yet")
        for drainer in list(self.drainers):  # the control plane may add or remove drainers meanwhile
            if self._stopping:
                break
            if drainer not in self.drainers:
                continue
            drainers = view.drainers(group_name(drainer.namespace, drainer.name), self.owner)
            share = math.ceil(drainer.ns.partitions / drainers)
            await self._balance(nursery, drainer, share)

    async def _balance(self, nursery: trio.Nursery, drainer: TargetDrainer, share: int) -> None:
        """Take free partitions of this target up to the fair share; hand back any beyond it."""
        mine = [lease for lease in self.held.values() if lease.drainer is drainer]
        taken = self.leases.view.taken() | self.held.keys()  # the watch may not show a fresh lease yet
        free = [p for p in range(drainer.ns.partitions)
                if lease_key(drainer.namespace, drainer.name, p) not in taken]
        random.shuffle(free)
        for partition in free:
            if len(mine) >= share or self._stopping:
                break
            key = lease_key(drainer.namespace, drainer.name, partition)
            revision = await self.leases.acquire(key)
            if revision is None:
                continue
            worker = drainer.worker(partition)
            lease = _Lease(key, revision, drainer, partition, worker, time.monotonic(), trio.Event())
            self.held[key] = lease
            mine.append(lease)
            nursery.start_soon(self._supervise, lease)
        while len(mine) > share:
            lease = mine.pop()
            log.info("partition_handed_back", key=lease.key, share=share)
            lease.worker.stop()
            await lease.done.wait()
            self.held.pop(lease.key, None)
            await self.leases.release(lease.key, lease.revision)

    def _abort_stale(self) -> None:
        """Leases not renewed for a TTL may belong to someone else by now: stop applying them."""
        ttl = self.config.sidecar.drain.lease_ttl
        for key, lease in list(self.held.items()):
            if time.monotonic() - lease.renewed_at > ttl * 0.9:
                log.warning("lease_expired_unrenewed", key=key)
                lease.worker.abort()
                self.held.pop(key, None)

    async def _supervise(self, lease: _Lease) -> None:
        try:
            await lease.worker.run()
            while lease.worker.restart and not self._stopping:
                log.info("partition_restarted", key=lease.key,
                         reason="deliveries lost with the NATS connection: again from the ack floor, in order")
                lease.worker = lease.drainer.worker(lease.partition)
                await lease.worker.run()
        except ConsumerGone as exc:
            lease.drainer.consumer_gone(lease.partition, str(exc))
        except Exception as exc:  # the partition is released and retried on a later tick
            log.error("partition_worker_failed", exc_info=True, key=lease.key, error=f"{type(exc).__name__}: {exc}")
        finally:
            lease.done.set()

    async def _hand_back(self, leases: list[_Lease]) -> None:
        """Abort whatever of these partitions still runs and release their leases."""
        for lease in leases:
            lease.worker.abort()
            self.held.pop(lease.key, None)
            try:
                await self.leases.release(lease.key, lease.revision)
            except Exception as exc:  # NATS gone: the lease expires by itself
                log.warning("lease_release_failed", key=lease.key, error=str(exc))

    async def _leave(self, drainers: list[TargetDrainer]) -> None:
        try:
            await self.leases.leave([group_name(d.namespace, d.name) for d in drainers])
        except Exception as exc:  # NATS gone: the heartbeat key expires by itself
            log.warning("drain_leave_failed", error=str(exc))

    async def stop(self, deadline: float) -> None:
        """Finish in-flight rounds, ack them, and hand every partition back at once."""
        self._stopping = True
        for lease in self.held.values():
            lease.worker.stop()
        with trio.move_on_after(deadline):
            for lease in list(self.held.values()):
                await lease.done.wait()
        await self._hand_back(list(self.held.values()))
        await self._leave(self.drainers)
        for drainer in self.drainers:
            await drainer.target.close()
        log.info("drain_stopped", owner=self.owner)
