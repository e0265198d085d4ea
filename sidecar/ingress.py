"""What every front (KV API, memcached, CQL) does with a mutation: make the entry, journal it, answer.

Protocols differ in how they ask and how they answer; the entry they build, the
checks it passes (namespace, size, write-time drift) and the durable/visible answer
they get back are the same, so they live here once.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import trio

from sidecar.admin.metrics import WriteCounters
from sidecar.config import Config, Namespace
from sidecar.drain.applied import AppliedTracker
from sidecar.envelope import CqlMutation, Entry, Op, new_id, now_us, partition_of, resolve_write_time
from sidecar.log.journal import Journal, UnknownNamespace
from sidecar.log.writer import Durable, WriteResult


class Ack(msgspec.Struct, omit_defaults=True):
    """The answer to a journaled mutation, as every front reports it."""

    durable: Durable
    visible: bool = False
    sequence: int = 0
    duplicate: bool = False
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.durable is Durable.TRUE


class TooLarge(ValueError):
    pass


class Ingress:
    def __init__(self, config: Config, journal: Journal, applied: AppliedTracker | None = None) -> None:
        self.config = config
        self.journal = journal
        self.region = config.sidecar.region
        # Fed by the drain's applied notices (wired by the sidecar at start).
        self.applied = applied or AppliedTracker()
        self.counters = WriteCounters()

    def namespace(self, name: str) -> Namespace:
        ns = self.config.namespaces.get(name)
        if ns is None:
            raise UnknownNamespace(name)
        return ns

    def entry(
        self,
        namespace: str,
        op: Op,
        key: str,
        *,
        item: str = "",
        value: bytes | None = None,
        entry_id: str | None = None,
        write_time: int | None = None,
        delay_ms: int = 0,
        flags: int = 0,
        expires_at: int = 0,
        targets: Sequence[str] = (),
        content_type: str = "",
        cql: CqlMutation | None = None,
    ) -> Entry:
        """Build a checked entry; raises UnknownNamespace, TooLarge or WriteTimeError."""
        ns = self.namespace(namespace)
        if value is not None and len(value) > ns.max_item_size:
            raise TooLarge(f"value of {len(value)} bytes is over the namespace's max_item_size of {ns.max_item_size}")
        now = now_us()
        stamp = resolve_write_time(write_time, ns.write_time_drift, now)
        return Entry(
            id=entry_id or new_id(),
            ns=namespace,
            op=op,
            key=key,
            partition=partition_of(key, ns.partitions),
            item=item,
            value=value,
            flags=flags,
            expires_at=expires_at,
            write_time=stamp,
            deliver_at=now + delay_ms * 1000 if delay_ms > 0 else 0,
            origin=self.region,
            targets=list(targets),
            content_type=content_type,
            cql=cql,
        )

    async def write(self, entry: Entry, protocol: str = "kv") -> Ack:
        began = trio.current_time()
        result = await self.journal.append(entry)
        self.counters.record(entry.ns, protocol, entry.op.value, result.durable.value, trio.current_time() - began)
        return await self._answer([entry], result)

    async def write_mutation(self, entries: list[Entry], mutation_id: str | None = None, protocol: str = "kv") -> Ack:
        """Several entries as one all-or-nothing mutation."""
        began = trio.current_time()
        result = await self.journal.append_atomic(entries, mutation_id)
        op = entries[0].op.value if len({e.op for e in entries}) == 1 else "mutate"
        self.counters.record(entries[0].ns, protocol, op, result.durable.value, trio.current_time() - began)
        return await self._answer(entries, result)

    async def write_replicated(self, entries: list[Entry]) -> list[WriteResult]:
        """Entries from another region, journaled as they are, in one group commit."""
        if not entries:
            return []
        began = trio.current_time()
        results = await self.journal.append_many(entries)
        elapsed = trio.current_time() - began
        for entry, result in zip(entries, results, strict=True):
            self.counters.record(entry.ns, "replication", entry.op.value, result.durable.value, elapsed)
        return results

    async def _answer(self, entries: list[Entry], result: WriteResult) -> Ack:
        ack = Ack(durable=result.durable, sequence=result.sequence, duplicate=result.duplicate,
                  message=result.message)
        if not result.ok or not result.sequence:
            return ack
        namespace = entries[0].ns
        ns = self.namespace(namespace)
        all_targets = [t.name for t in ns.targets]
        # An atomic batch stores its entries at consecutive sequences; a MULTI marker is one.
        first = result.sequence - len(entries) + 1 if result.count == len(entries) else result.sequence
        sequences = []
        for offset, entry in enumerate(entries):
            sequence = first + offset if result.count == len(entries) else result.sequence
            sequences.append(sequence)
            if not result.duplicate:
                self.applied.journaled(namespace, entry.key, sequence, entry.targets or all_targets)
        primary = ns.primary_target()
        if ns.mode == "sync" and primary is not None and not entries[0].deliver_at:
            ack.visible = await self._visible(namespace, primary.name, sequences, ns.visibility_budget)
        return ack

    async def _visible(self, namespace: str, target: str, sequences: list[int], budget: float) -> bool:
        """Wait up to the budget for the drain to report every sequence applied by `target`."""
        deadline = trio.current_time() + budget
        for sequence in sequences:
            remaining = deadline - trio.current_time()
            if remaining <= 0 or not await self.applied.wait_applied(namespace, target, sequence, remaining):
                return False
        return True
