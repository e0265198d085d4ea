"""`walcar verify`: does a target hold the journal's last value of every key written in a range?

Finds the "entropy" between a primary and its cache or index: keys changed behind
the journal's back, or writes that never landed. Two passes over the range, so
memory is one position per item plus the values of the records being checked:

1. find each item's last write (`LastWrites`), pick the records to check (all of
   them, or `--sample N` at random);
2. read those records' last writes back (payloads from the chunk store) and fold
   them into the state the target should hold: present with a value, or absent
   (deleted, or expired);
3. read the target through its adapter (`get_items`: memcached at `cache_key`,
   Cassandra's KV table rows) and report `missing`, `different` and `unexpected`
   (present but should be deleted). For Cassandra, the cell's WRITETIME says which
   side is newer: a target write newer than the journal's was made behind its back.

`--repair` re-applies those items' last writes through the adapter with their
original write times; an item still wrong after that (Cassandra keeps a newer cell
or tombstone over an older write time) is applied once more with a fresh write
time, and says so. Entries written after the range (`--to`) and entries the drain
has not applied yet show up as differences: verify a settled range.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from sidecar.config import CassandraTarget, Config, Namespace, Target, WalTarget
from sidecar.drain.targets import build_target
from sidecar.drain.targets.base import ApplyError
from sidecar.envelope import Entry, Op, now_us
from sidecar.log.journal import Journal
from sidecar.log.payloads import PayloadError, expand_multi, with_payload
from sidecar.logs import get_logger
from sidecar.replay.apply import Applier
from sidecar.replay.filters import Filters, format_time
from sidecar.replay.lastvalue import ItemKey, LastWrites
from sidecar.replay.progress import RateMeter, ReplayProgress
from sidecar.replay.reader import Journaled, JournalReader, SeqRange
from sidecar.replay.request import (
    ReplayError,
    VerifyRequest,
    check_request,
    describe_target,
    namespace_of,
    target_settings,
)

log = get_logger("replay.verify")

READ_CONCURRENCY = 32
PREVIEW = 60


class Difference(msgspec.Struct, kw_only=True, omit_defaults=True):
    key: str
    item: str = ""
    problem: str  # missing | different | unexpected (present, but the journal deleted it)
    expected: str = ""
    actual: str = ""
    seq: int = 0  # the journal entry the expected state comes from
    write_time: str = ""  # that entry's write time
    target_write_time: str = ""  # Cassandra: WRITETIME of the cell found
    note: str = ""
    repaired: bool = False


class VerifyReport(msgspec.Struct, kw_only=True):
    namespace: str
    target: str
    from_seq: int
    to_seq: int
    state: str = "done"  # done | failed
    message: str = ""
    records_in_range: int = 0
    records_checked: int = 0
    items_checked: int = 0
    sampled: bool = False
    differences: list[Difference] = []
    repaired: int = 0
    unrepaired: int = 0
    not_checked: dict[str, int] = {}
    elapsed_s: float = 0.0


@dataclass(slots=True)
class Expected:
    present: bool
    entry: Entry  # the write to re-apply for a repair
    seq: int


def _preview(value: bytes | None) -> str:
    if value is None:
        return ""
    text = value[:PREVIEW].decode("utf-8", "backslashreplace")
    return text + ("…" if len(value) > PREVIEW else "")


class VerifyJob:
    def __init__(self, *, journal: Journal, request: VerifyRequest, ns: Namespace, settings: Target, target: Any,
                 filters: Filters, rng: SeqRange, reader: JournalReader) -> None:
        self.journal = journal
        self.request = request
        self.ns = ns
        self.settings = settings
        self.target = target
        self.filters = filters
        self.rng = rng
        self.reader = reader
        self.progress = ReplayProgress(id=f"verify-{time.monotonic_ns() % 10**9}", namespace=request.namespace,
                                       target=describe_target(settings), from_seq=rng.first, to_seq=rng.last,
                                       position=rng.first - 1)
        self.applier = Applier(target, ns.retry, self.progress, self._repair_failed)
        self.records_clear_items = isinstance(settings, CassandraTarget)  # a record delete removes its items
        self._meter = RateMeter()
        self._not_checked: dict[str, int] = {}
        self._repair_errors: dict[ItemKey, str] = {}

    async def run(self) -> VerifyReport:
        began = time.monotonic()
        report = VerifyReport(namespace=self.request.namespace, target=self.progress.target,
                              from_seq=self.rng.first, to_seq=self.rng.last)
        await self.target.start()
        try:
            tracker = await self._scan()
            records = tracker.records()
            report.records_in_range = len(records)
            if self.request.sample and self.request.sample < len(records):
                records = random.sample(records, self.request.sample)
                report.sampled = True
            chosen = set(records)
            expected = await self._expected(tracker, chosen)
            report.records_checked = len(chosen)
            report.items_checked = len(expected)
            self.progress.state = "checking"
            differences = await self._compare(chosen, expected)
            if self.request.repair and differences:
                await self._repair(differences, expected, chosen)
            report.differences = sorted(differences.values(), key=lambda d: (d.key, d.item))
            report.repaired = sum(1 for d in report.differences if d.repaired)
            report.unrepaired = len(report.differences) - report.repaired
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await self.target.close()
        report.not_checked = dict(self._not_checked)
        report.elapsed_s = round(time.monotonic() - began, 3)
        self.progress.state = "done"
        log.info("verify_finished", namespace=report.namespace, target=report.target, checked=report.items_checked,
                 differences=len(report.differences), repaired=report.repaired)
        return report

    # --- the journal's side ----------------------------------------------------------------

    async def _entries(self, item: Journaled) -> list[Entry]:
        if item.entry is None:
            return []
        if item.entry.op is not Op.MULTI:
            return [item.entry]
        try:
            return await expand_multi(self.journal.chunks, item.entry)
        except PayloadError as exc:
            self._not_check(f"unreadable mutations ({exc.message})")
            return []

    def _not_check(self, reason: str) -> None:
        self._not_checked[reason] = self._not_checked.get(reason, 0) + 1

    async def _scan(self) -> LastWrites:
        self.progress.state = "scanning"
        tracker = LastWrites()
        async with self.reader.read(self.rng, self.request.batch) as batches:
            async for batch in batches:
                for item in batch:
                    for index, entry in enumerate(await self._entries(item)):
                        if self.filters.reason(item.seq, entry) is not None or not self.target.wants(entry):
                            continue
                        if entry.op in (Op.PUT, Op.DELETE, Op.TOUCH):
                            tracker.observe((item.seq, index), entry)
                        else:
                            self._not_check(f"{entry.op.value} entries (not comparable)")
                self.progress.scanned += len(batch)
                self._advance(batch[-1].seq)
        return tracker

    async def _expected(self, tracker: LastWrites, chosen: set[str]) -> dict[ItemKey, Expected]:
        """Fold the chosen records' last writes, in journal order, into the state the target should hold."""
        self.progress.state = "reading"
        self.progress.position = self.rng.first - 1
        self._meter.reset()
        expected: dict[ItemKey, Expected] = {}
        now = time.time()
        async with self.reader.read(self.rng, self.request.batch) as batches:
            async for batch in batches:
                for item in batch:
                    for index, entry in enumerate(await self._entries(item)):
                        if entry.key not in chosen or entry.op not in (Op.PUT, Op.DELETE, Op.TOUCH):
                            continue
                        if self.filters.reason(item.seq, entry) is not None or not self.target.wants(entry):
                            continue
                        if tracker.keeps((item.seq, index), entry):
                            await self._fold(expected, item.seq, entry)
                self._advance(batch[-1].seq)
        for state in expected.values():
            expires = state.entry.expires_at
            if state.present and expires and expires <= now:
                state.present = False  # expired: the target drops it (the adapters delete it on apply)
        return expected

    async def _fold(self, expected: dict[ItemKey, Expected], seq: int, entry: Entry) -> None:
        item = (entry.key, entry.item)
        if entry.op is Op.PUT:
            try:
                entry = await with_payload(self.journal.chunks, entry)
            except PayloadError as exc:
                self._not_check(f"payloads no longer readable ({exc.message})")
                expected.pop(item, None)
                return
            expected[item] = Expected(True, entry, seq)
        elif entry.op is Op.DELETE:
            expected[item] = Expected(False, entry, seq)
            if not entry.item and self.records_clear_items:
                for (key, other), state in expected.items():
                    if key == entry.key and other:
                        state.present = False
                        state.entry = msgspec.structs.replace(entry, item=other)
                        state.seq = seq
        else:  # a touch: a new expiry for the value before it
            current = expected.get(item)
            if current is not None and current.present:
                current.entry = msgspec.structs.replace(current.entry, expires_at=entry.expires_at)

    def _advance(self, position: int) -> None:
        self.progress.position = position
        self._meter.add(position)
        self.progress.rate = round(self._meter.rate(), 1)
        self.progress.eta_s = self._meter.eta(self.rng.last - position)

    # --- the target's side -----------------------------------------------------------------

    async def _read(self, records: set[str], expected: dict[ItemKey, Expected]) -> dict[str, dict[str, bytes]]:
        """What the target holds for each record: every row (Cassandra) or the expected items (memcached)."""
        wanted: dict[str, list[str]] = {record: [] for record in records}
        for key, item in expected:
            if key in wanted:
                wanted[key].append(item)
        found: dict[str, dict[str, bytes]] = {}
        limiter = trio.CapacityLimiter(READ_CONCURRENCY)
        lists_rows = isinstance(self.settings, CassandraTarget)

        errors: list[ApplyError] = []

        async def read(record: str, nursery: trio.Nursery) -> None:
            async with limiter:
                items = None if lists_rows else (wanted[record] or [""])
                try:
                    rows = await self.target.get_items(record, items)
                except ApplyError as exc:  # the target is down: one error is the answer, not one per record
                    errors.append(exc)
                    nursery.cancel_scope.cancel()
                    return
            found[record] = {item: value for item, value, _ in rows}

        async with trio.open_nursery() as nursery:
            for record in records:
                nursery.start_soon(read, record, nursery)
        if errors:
            raise errors[0]
        return found

    async def _compare(self, records: set[str], expected: dict[ItemKey, Expected]) -> dict[ItemKey, Difference]:
        actual = await self._read(records, expected)
        differences: dict[ItemKey, Difference] = {}
        for (key, item), state in expected.items():
            value = actual.get(key, {}).get(item)
            diff = self._difference(key, item, state, value)
            if diff is not None:
                differences[(key, item)] = diff
        cleared = {key for (key, item), state in expected.items() if not item and not state.present}
        for key in cleared if self.records_clear_items else ():
            for item, value in actual.get(key, {}).items():
                if (key, item) not in expected:  # written before the range, and deleted with the record in it
                    record_delete = expected[(key, "")]
                    state = Expected(False, msgspec.structs.replace(record_delete.entry, item=item), record_delete.seq)
                    expected[(key, item)] = state
                    diff = self._difference(key, item, state, value)
                    if diff is not None:
                        differences[(key, item)] = diff
        if differences and isinstance(self.settings, CassandraTarget):
            await self._explain_write_times(differences, expected)
        return differences

    @staticmethod
    def _difference(key: str, item: str, state: Expected, value: bytes | None) -> Difference | None:
        common: dict[str, Any] = {"key": key, "item": item, "seq": state.seq,
                  "write_time": format_time(state.entry.write_time * 1000)}
        if state.present:
            want = state.entry.value or b""
            if value is None:
                return Difference(problem="missing", expected=_preview(want), **common)
            if value != want:
                return Difference(problem="different", expected=_preview(want), actual=_preview(value), **common)
            return None
        if value is not None:
            return Difference(problem="unexpected", actual=_preview(value), **common)
        return None

    async def _explain_write_times(self, differences: dict[ItemKey, Difference],
                                   expected: dict[ItemKey, Expected]) -> None:
        """Cassandra: the WRITETIME of each differing cell tells which side is newer."""
        target = self.target
        session = target.session
        if session is None:
            return
        records = {key for key, _ in differences}

        def read() -> dict[ItemKey, int]:
            query = session.prepare(
                f"SELECT key, WRITETIME(value) AS wt FROM {target.keyspace}.{target.table} WHERE id = ?"
            )
            times: dict[ItemKey, int] = {}
            for record in records:
                for row in session.execute(query, (record,)):
                    if row.wt is not None:
                        times[(record, row.key)] = row.wt
            return times

        times = await trio.to_thread.run_sync(read)
        for item, diff in differences.items():
            found = times.get(item)
            if found is None:
                continue
            journal_time = expected[item].entry.write_time
            diff.target_write_time = format_time(found * 1000)
            if found > journal_time:
                diff.note = "the target's cell is newer than the journal's write: changed behind the journal's back"
            elif found < journal_time:
                diff.note = "the target holds an older write: the journal's write never landed"
            else:
                diff.note = "same write time, different value"

    # --- repair ---------------------------------------------------------------------------

    def _repair_failed(self, seq: int, entry: Entry, error_class: str, message: str) -> None:
        self._repair_errors[(entry.key, entry.item)] = f"{error_class}: {message}"

    async def _repair(self, differences: dict[ItemKey, Difference], expected: dict[ItemKey, Expected],
                      records: set[str]) -> None:
        """Re-apply the last writes with their own write times; what is still wrong, once more with a fresh one."""
        self.progress.state = "repairing"
        pending = dict(differences)
        for fresh in (False, True):
            stamp = now_us()
            work = sorted(((expected[item].seq, expected[item].entry) for item in pending), key=lambda w: w[0])
            if fresh:
                work = [(seq, msgspec.structs.replace(entry, write_time=stamp)) for seq, entry in work]
            await self.applier.apply(work)
            touched = {key for key, _ in pending}
            still = await self._compare(touched & records, {k: v for k, v in expected.items() if k[0] in touched})
            for item, diff in pending.items():
                if item not in still:
                    diff.repaired = True
                    if fresh:
                        diff.note = (diff.note + "; " if diff.note else "") + (
                            "repaired with a new write time (the target kept a newer write over the journal's)")
            pending = {item: diff for item, diff in pending.items() if item in still}
            if not pending or not isinstance(self.settings, CassandraTarget):
                break
        for item, diff in pending.items():
            error = self._repair_errors.get(item)
            if error:
                diff.note = (diff.note + "; " if diff.note else "") + f"repair failed: {error}"


async def prepare_verify(config: Config, journal: Journal, request: VerifyRequest,
                         now_ns: int | None = None) -> VerifyJob:
    """Check the request, resolve the range (retention check) and build the target; ReplayError if it cannot run."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if request.sample < 0:
        raise ReplayError(f"--sample must be a positive number of records, got {request.sample}")
    ns = namespace_of(config, request)
    filters = check_request(config, request, now_ns)
    settings = target_settings(config, request)
    if isinstance(settings, WalTarget):
        raise ReplayError(f"target {settings.name!r} is a remote region's walcar: verify reads memcached or "
                          "Cassandra targets (run verify in that region)")
    not_verifiable = getattr(settings, "not_verifiable", None)  # targets walcar cannot read back say why
    if not_verifiable:
        raise ReplayError(f"verify does not apply to target {settings.name!r}: {not_verifiable}")
    reader = JournalReader(journal.writer.conn, request.namespace, ns)
    rng = await reader.resolve(request.from_, request.to, now_ns)
    target = build_target(settings, request.namespace, config)
    return VerifyJob(journal=journal, request=request, ns=ns, settings=settings, target=target, filters=filters,
                     rng=rng, reader=reader)
