"""What every front (KV API, memcached, CQL) does with a mutation: make the entry, journal it, answer.

Protocols differ in how they ask and how they answer; the entry they build, the
checks it passes (namespace, size, write-time drift) and the durable/visible answer
they get back are the same, so they live here once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
import trio

from sidecar.applied import AppliedTracker
from sidecar.config import CassandraTarget, Config, MemcachedTarget, Namespace
from sidecar.counters import WriteCounters
from sidecar.envelope import (
    MAX_ID_BYTES,
    REGION_RE,
    CqlMutation,
    Entry,
    Op,
    new_id,
    now_us,
    partition_of,
    resolve_write_time,
    valid_id,
)
from sidecar.log.journal import Journal, UnknownNamespace  # UnknownNamespace: fronts catch it from here
from sidecar.log.writer import Durable, WriteResult
from sidecar.log.writer import JournalStats as JournalStats  # re-exported: fronts see the journal only through here
from sidecar.memcache_keys import item_size, key_problem, target_key
from sidecar.overlay import NamespaceOverlay, Overlays
from sidecar.reused_token import check_duplicate, check_duplicates
from sidecar.tcp import ConnectionGate


class Ack(msgspec.Struct, omit_defaults=True, gc=False):
    """The answer to a journaled mutation, as every front reports it (`gc=False`: no cycle through it,
    and a batch holds one per entry)."""

    durable: Durable
    visible: bool = False
    sequence: int = 0
    duplicate: bool = False
    message: str = ""
    conflict: bool = False  # ids used before by a different mutation: nothing stored (HTTP 409)

    @property
    def ok(self) -> bool:
        return self.durable is Durable.TRUE


class Refused(ValueError):
    """A write the front door refuses before journaling: it could never land on a target.
    `part` names what is wrong ("value", "key" or "item") for fronts that report a field."""

    def __init__(self, message: str, part: str = "value") -> None:
        super().__init__(message)
        self.part = part


class TooLarge(Refused):
    """The value (or the item it makes) is over a size limit: memcached `object too large`, KV 413."""


class BadKey(Refused):
    """A key (or KV item key) a target cannot store: memcached CLIENT_ERROR, KV 400, CQL Invalid."""


# The ops a target applies with the entry's key and item (CQL entries carry their own statements).
_KEYED_OPS: Final = frozenset({Op.PUT, Op.DELETE, Op.TOUCH})
# Primary targets a front reads (memcached get, KV GET): only their namespaces keep an overlay.
_READABLE: Final = (MemcachedTarget, CassandraTarget)
# Cassandra's own limits: a partition key (and a clustering key) is at most 65535 bytes; an
# empty text partition key is refused ("Key may not be empty").
CASSANDRA_MAX_KEY: Final = 65535
INT32_MAX: Final = 2**31 - 1  # memcached parses an expiry as a signed 32-bit unix time
# Independent entries journaled together (write_many) go this many at a time: a few ms of loop time.
WRITE_GROUP: Final = 256


class Ingress:
    def __init__(self, config: Config, journal: Journal, applied: AppliedTracker | None = None) -> None:
        self.config = config
        self.journal = journal
        self.region = config.sidecar.region
        # Fed by the drain's applied notices (wired by the sidecar at start).
        self.applied = applied or AppliedTracker(int(config.sidecar.unapplied_budget))
        # Read your own writes: what this sidecar acked and the primary target has not applied.
        self.overlays = Overlays()
        self.applied.on_applied = self.overlays.applied
        self.counters = WriteCounters()
        # Each memcached/CQL listener's connection cap and counts, by bind (for metrics).
        self.connection_gates: dict[str, ConnectionGate] = {}
        self._limits: dict[str, _Limits] = {}
        self._last_stamp = 0

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
        now = self.clock()
        entry = Entry(
            id=entry_id or new_id(),
            ns=namespace,
            op=op,
            key=key,
            partition=partition_of(key, ns.partitions),
            item=item,
            value=value,
            flags=flags,
            expires_at=expires_at,
            write_time=now if write_time is None else resolve_write_time(write_time, ns.write_time_drift, now),
            deliver_at=now + delay_ms * 1000 if delay_ms > 0 else 0,
            origin=self.region,
            targets=list(targets) if targets else [],
            content_type=content_type,
            cql=cql,
        )
        self.check_entry(entry, ns)
        return entry

    def clock(self) -> int:
        """The sidecar's write time: µs since the epoch, never the same twice, so a key written twice within
        a microsecond still gets its later write the later time (Cassandra breaks a timestamp tie by the
        value, not the order). Every front stamps its writes with it."""
        now = now_us()
        if now <= self._last_stamp:
            now = self._last_stamp + 1
        self._last_stamp = now
        return now

    def check_entry(self, entry: Entry, ns: Namespace) -> None:
        """The front door's checks on a built entry, in one place: every front and the cross-region
        entry point pass through here before anything is journaled. Raises Refused (TooLarge,
        BadKey) for a write that must not be acked: one that no target of the namespace it is
        addressed to could ever store."""
        limits = self._limits.get(entry.ns)
        if limits is None or limits.ns is not ns:  # a config change replaces the namespace object
            limits = self._limits[entry.ns] = _Limits(ns)
        value = entry.value
        if value is not None and len(value) > limits.item_limit:
            raise TooLarge(f"value of {len(value)} bytes is over the namespace's max_item_size of {limits.item_limit}")
        if not limits.checks or entry.op not in _KEYED_OPS:
            return
        for target, check in limits.checks:
            if not entry.targets or target.name in entry.targets:
                check(entry, target)

    def wal_off(self, namespace: str) -> bool:
        return self.namespace(namespace).mode == "off"

    async def direct(self, namespace: str, target: str, keys: Sequence[str], wait: float) -> bool:
        """True when these keys' writes may go straight to `target` instead of the journal: the
        namespace's WAL is switched off (`mode = "off"`) and none of the keys has entries this sidecar
        journaled that the target has not applied yet — waiting for them up to `wait`. That per-key
        fence keeps a key in order across a switch: its journaled writes land first, then it goes
        direct. False (journal it, in order) when the wait runs out."""
        if not self.wal_off(namespace):
            return False
        applied = self.applied
        for key in keys:
            if applied.has_unapplied(namespace, target, key) and \
                    not await applied.wait_key_applied(namespace, target, key, wait):
                return False
        return True

    def check_replicated(self, entry: Entry, ns: Namespace) -> None:
        """An entry from another region passes what the front door checks, plus what only such an
        entry can get wrong; raises Refused (or TooLarge) naming the problem."""
        if not valid_id(entry.id):
            raise Refused(f"entry id must be 1-{MAX_ID_BYTES} printable ASCII characters without spaces")
        if not REGION_RE.fullmatch(entry.origin):
            raise Refused("origin must be a region name (letters, digits, '.', '_', '-')")
        if entry.origin == self.region:
            raise Refused(f"the entry started in this region ({self.region}): a replication loop")
        if entry.op is Op.MULTI or entry.chunk is not None:
            raise Refused("chunked entries are expanded by the sending region, never sent as references")
        if entry.op is Op.CQL and not any(isinstance(t, CassandraTarget) for t in ns.targets):
            raise Refused("cql entries are accepted only by a namespace with a cassandra target")
        now = now_us()
        # Old write times are normal (a backlog replicated late); a future one would beat every later write.
        if entry.write_time > now + ns.write_time_drift * 1e6:
            raise Refused(f"write_time is {(entry.write_time - now) / 1e6:.0f}s in the future; "
                          f"the namespace allows {float(ns.write_time_drift):.0f}s of drift")
        if entry.deliver_at > now + ns.replay_window * 1e6:
            raise Refused("deliver_at is beyond the namespace's replay_window")
        self.check_entry(entry, ns)

    async def write(self, entry: Entry, protocol: str = "kv", packable: bool = False) -> Ack:
        """`packable`: the entry's id was made by walcar for this write (see `Journal.message_for`)."""
        began = trio.current_time()
        packable = packable and self._packs(entry.ns)
        result = await check_duplicate(self.journal, [entry], entry.id, await self.journal.append(entry, packable))
        self.counters.record(entry.ns, protocol, entry.op.value, result.durable.value, trio.current_time() - began)
        return await self._answer([entry], result)

    def write_then(self, entry: Entry, protocol: str, done: Callable[[Ack], None], packable: bool = False) -> bool:
        """`write` without a task, for fronts answering pipelined requests: `done(ack)` is called on
        the trio loop once the journal answers. False, with nothing written, when the write needs
        a task (a `sync` namespace waits for visibility, a large value goes to the chunk store,
        or the journal is full): await `write` then."""
        if self.namespace(entry.ns).mode == "sync":
            return False
        began = trio.current_time()

        def journaled(result: WriteResult) -> None:
            self.counters.record(entry.ns, protocol, entry.op.value, result.durable.value,
                                 trio.current_time() - began)
            done(self._ack([entry], result))

        return self.journal.append_then(entry, journaled, packable)

    async def write_mutation(self, entries: list[Entry], mutation_id: str | None = None, protocol: str = "kv") -> Ack:
        """Several entries as one all-or-nothing mutation."""
        began = trio.current_time()
        result = await self.journal.append_atomic(entries, mutation_id)
        stored_id = entries[0].id if len(entries) == 1 else mutation_id
        if stored_id is not None:
            result = await check_duplicate(self.journal, entries, stored_id, result)
        op = entries[0].op.value if len({e.op for e in entries}) == 1 else "mutate"
        self.counters.record(entries[0].ns, protocol, op, result.durable.value, trio.current_time() - began)
        return await self._answer(entries, result)

    async def write_many(self, entries: list[Entry], protocol: str = "kv", packable: Sequence[bool] = ()) -> list[Ack]:
        """Independent entries of one namespace in one group commit, each answered on its own (not
        atomic: an entry the journal refuses does not stop the others). In a `sync` namespace they
        share one visibility budget. `packable[i]`: entry i's id was made by walcar."""
        acks: list[Ack] = []
        namespace = entries[0].ns
        packs = self._packs(namespace)
        for start in range(0, len(entries), WRITE_GROUP):
            # A group at a time, each after the one before (per-key order): one long list would hold
            # the loop for tens of ms building, sending and answering its messages in one step.
            group = entries[start:start + WRITE_GROUP]
            began = trio.current_time()
            results = await self.journal.append_many(group, packable[start:start + WRITE_GROUP] if packs else ())
            # A retry, or a client token reused for another write (a 409): each duplicate is read back.
            await check_duplicates(self.journal, group, results)
            elapsed = trio.current_time() - began
            counts: Counter[tuple[Op, Durable]] = Counter()
            stored: list[Entry] = []
            sequences: list[int] = []
            # A pack's entries share one result; outside `sync` (whose acks get their own `visible` below)
            # they share one answer too. By the result's identity: `results` holds every result alive.
            answers: dict[int, tuple[Ack, bool]] = {}
            for entry, result in zip(group, results, strict=True):
                counts[entry.op, result.durable] += 1
                answer = answers.get(id(result)) if packs else None
                if answer is None:
                    answer = answers[id(result)] = (self._ack([entry], result, note=False), _stored(result))
                acks.append(answer[0])
                if answer[1]:
                    stored.append(entry)
                    sequences.append(result.sequence)
            for (op, durable), count in counts.items():
                self.counters.record(namespace, protocol, op.value, durable.value, elapsed, count)
            self._note(stored, sequences)
        ns = self.namespace(entries[0].ns)
        primary = ns.primary_target()
        if ns.mode == "sync" and primary is not None:
            deadline = trio.current_time() + ns.visibility_budget
            for entry, ack in zip(entries, acks, strict=True):
                if ack.ok and ack.sequence and not entry.deliver_at:
                    ack.visible = await self._visible(entry.ns, primary.name, [ack.sequence],
                                                      deadline - trio.current_time())
        return acks

    def _packs(self, namespace: str) -> bool:
        """Whether entries may share messages: not in a `sync` namespace, whose writes wait for their
        sequence's applied notice, which for a pack waits for every entry in it."""
        return self.namespace(namespace).mode != "sync"

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
        if len(entries) <= WRITE_GROUP or not _stored(result):
            ack = self._ack(entries, result)
        else:  # a long mutation is noted a slice at a time (a checkpoint between), as it was built
            ack = self._ack([], result, note=False)
            sequences = _sequences(entries, result)
            for start in range(0, len(entries), WRITE_GROUP):
                await trio.lowlevel.checkpoint()
                self._note(entries[start:start + WRITE_GROUP], sequences[start:start + WRITE_GROUP])
        if not result.ok or not result.sequence:
            return ack
        namespace = entries[0].ns
        ns = self.namespace(namespace)
        primary = ns.primary_target()
        if ns.mode == "sync" and primary is not None and not entries[0].deliver_at:
            ack.visible = await self._visible(namespace, primary.name, _sequences(entries, result),
                                              ns.visibility_budget)
        return ack

    def _ack(self, entries: list[Entry], result: WriteResult, note: bool = True) -> Ack:
        """The answer before any wait for visibility; a stored write is noted for `sync` reads."""
        ack = Ack(durable=result.durable, sequence=result.sequence, duplicate=result.duplicate,
                  message=result.message, conflict=result.conflict)
        if note and _stored(result):
            self._note(entries, _sequences(entries, result))
        return ack

    def _note(self, entries: list[Entry], sequences: list[int]) -> None:
        """Stored entries, tracked until applied and put in the read-your-writes overlay."""
        if not entries:
            return
        namespace = entries[0].ns
        ns = self.namespace(namespace)
        all_targets = [t.name for t in ns.targets]
        for entry, sequence in zip(entries, sequences, strict=True):
            self.applied.journaled(namespace, entry.key, sequence, entry.targets or all_targets)
        if ns.read_your_writes:
            self._overlay(namespace, ns, entries, sequences)

    def overlay(self, namespace: str) -> NamespaceOverlay | None:
        """The namespace's read-your-writes overlay, or None when it has none (switched off, or a
        primary target no front reads: wal, http, kafka). Read at use: settings change live."""
        ns = self.namespace(namespace)
        primary = ns.primary_target()
        if not ns.read_your_writes or not isinstance(primary, _READABLE):
            if namespace in self.overlays.namespaces:
                self.overlays.drop(namespace)
            return None
        return self.overlays.of(namespace, primary.name)

    def _overlay(self, namespace: str, ns: Namespace, entries: list[Entry], sequences: list[int]) -> None:
        """Acked entries into the overlay, in sequence order (an atomic batch's come in order)."""
        primary = ns.primary_target()
        if not isinstance(primary, _READABLE):
            return
        name = primary.name
        overlay = self.overlays.of(namespace, name)
        budget = int(ns.overlay_budget)
        applied = self.applied
        for entry, sequence in zip(entries, sequences, strict=True):
            op = entry.op
            if op not in _KEYED_OPS or entry.deliver_at or (entry.targets and name not in entry.targets):
                continue  # a delayed entry is not visible before it is delivered
            if applied.is_applied(namespace, name, sequence):
                continue  # the drain was faster than our ack
            if op is Op.TOUCH:
                overlay.touch(entry.key, entry.item, sequence, entry.expires_at)
            else:
                overlay.put(entry.key, entry.item, sequence, entry.value if op is Op.PUT else None,
                            entry.flags, entry.expires_at, budget)

    async def _visible(self, namespace: str, target: str, sequences: list[int], budget: float) -> bool:
        """Wait up to the budget for the drain to report every sequence applied by `target`."""
        deadline = trio.current_time() + budget
        for sequence in sequences:
            remaining = deadline - trio.current_time()
            if remaining <= 0 or not await self.applied.wait_applied(namespace, target, sequence, remaining):
                return False
        return True


class _Limits:
    """What `check_entry` asks of a namespace, worked out once per namespace object, not per entry."""

    __slots__ = ("checks", "item_limit", "ns")

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.item_limit = ns.item_limit()
        self.checks: list[tuple[Any, Callable[[Entry, Any], None]]] = [
            (t, _check_memcached) if isinstance(t, MemcachedTarget) else (t, _check_cassandra)
            for t in ns.targets if isinstance(t, _READABLE)]


def _check_memcached(entry: Entry, target: MemcachedTarget) -> None:
    """memcached's key rules and item size, on the key the memcached target will use."""
    try:
        raw = target_key(entry.key, entry.item)
    except ValueError:  # a `b64:` key that is not base64
        raise BadKey("key starts with `b64:` but the rest is not base64", "key") from None
    problem = key_problem(raw)
    if problem is not None:
        part = "item" if entry.item and key_problem(target_key(entry.key)) is None else "key"
        raise BadKey(f"memcached key for target {target.name!r} {problem}", part)
    if entry.expires_at > INT32_MAX:
        raise Refused(f"expiry {entry.expires_at} is past what memcached can store (2038-01-19)", "expires_at")
    if entry.value is not None and entry.op is Op.PUT:
        size = item_size(raw, len(entry.value), entry.flags)
        if size > target.max_item_size:
            raise TooLarge(f"item of {size} bytes (value, key and memcached's overhead) is over target "
                           f"{target.name!r}'s max_item_size of {int(target.max_item_size)}")


def _check_cassandra(entry: Entry, target: CassandraTarget) -> None:
    key = entry.key.encode()
    if not key:
        raise BadKey(f"target {target.name!r} (cassandra) cannot store an empty key", "key")
    if len(key) > CASSANDRA_MAX_KEY:
        raise BadKey(f"key of {len(key)} bytes is over Cassandra's {CASSANDRA_MAX_KEY}", "key")
    if len(entry.item.encode()) > CASSANDRA_MAX_KEY:
        raise BadKey(f"item key is over Cassandra's {CASSANDRA_MAX_KEY} bytes", "item")


def _stored(result: WriteResult) -> bool:
    """Stored by this write (not a duplicate of an earlier one): its entries are new to track."""
    return result.ok and bool(result.sequence) and not result.duplicate


def _sequences(entries: list[Entry], result: WriteResult) -> list[int]:
    """Each entry's stream sequence: an atomic batch stores its entries at consecutive sequences,
    a MULTI marker (one message for all of them) at one."""
    if result.count == len(entries):
        first = result.sequence - len(entries) + 1
        return [first + offset for offset in range(len(entries))]
    return [result.sequence] * len(entries)
