"""ReplayJob: re-apply a range of a namespace's journal to a target, through the drain's own adapters.

Entries keep their original write times (Cassandra's write timestamps), so replaying
twice, or over a restore that already holds some of them, changes nothing. The range
is read in stream order, a batch at a time; a batch becomes one run per key (that
key's entries in journal order), all keys of the batch applied concurrently by the
adapter, and the next batch starts when every run of this one landed or failed —
which keeps per-key order and makes "last fully applied sequence" a checkpoint.

Failures: transient errors retry the key with the namespace's backoff, up to its
max_attempts; unavailable targets are waited for, however long, with a message in
the progress (never skipped); permanent errors are counted and listed in the
summary — an operator's job does not write to the DLQ.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from sidecar.config import Config, Namespace, Target
from sidecar.drain.settling import backoff
from sidecar.drain.targets import build_target
from sidecar.drain.targets.base import addressed_to
from sidecar.envelope import Entry, Op
from sidecar.log.journal import Journal
from sidecar.log.payloads import PayloadError, expand_multi, with_payload
from sidecar.logs import get_logger
from sidecar.replay import checkpoint as checkpoints
from sidecar.replay.apply import Applier, StoppedWaiting
from sidecar.replay.filters import Filters, format_time, key_prefix, parse_window
from sidecar.replay.lastvalue import LastWrites, Position
from sidecar.replay.progress import (
    EXAMPLES_PER_REASON,
    MAX_FAILURES_LISTED,
    MAX_PREFIXES,
    Failure,
    RateMeter,
    ReplayProgress,
    ReplaySummary,
)
from sidecar.replay.reader import Journaled, JournalReader, SeqRange
from sidecar.replay.request import (
    ReplayError,
    ReplayRequest,
    check_request,
    describe_target,
    namespace_of,
    target_settings,
)
from sidecar.replay.throttle import Throttle

log = get_logger("replay")

T = TypeVar("T")
CHECKPOINT_EVERY = 1.0  # seconds
PAYLOAD_ATTEMPTS = 5


def _now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ReplayJob:
    """One replay; `progress` is live, `stop()` ends it after the batch in flight, `run()` drives it."""

    def __init__(self, *, journal: Journal, request: ReplayRequest, ns: Namespace, settings: Target, target: Any,
                 filters: Filters, rng: SeqRange, applied_through: int, checkpoint_path: Path | None,
                 reader: JournalReader) -> None:
        self.journal = journal
        self.request = request
        self.ns = ns
        self.settings = settings
        self.target = target
        self.filters = filters
        self.rng = rng
        self.reader = reader
        self.checkpoint_path = checkpoint_path
        self.throttle = Throttle(request.rate)
        self.progress = ReplayProgress(
            id=uuid.uuid4().hex[:12], namespace=request.namespace, target=describe_target(settings),
            dry_run=request.dry_run, last_value_only=request.last_value_only, from_seq=rng.first, to_seq=rng.last,
            position=max(applied_through, rng.first - 1), checkpoint_seq=max(applied_through, rng.first - 1),
            started_at=_now_text(),
        )
        self.applier = Applier(target, ns.retry, self.progress, self._failed, stopping=lambda: self._stop)
        self.error: ReplayError | None = None
        self._stop = False
        self._done = trio.Event()
        self._began = time.monotonic()
        self._ended: float | None = None
        self._meter = RateMeter()
        self._last_checkpoint = 0.0
        self._by_op: Counter[str] = Counter()
        self._by_prefix: Counter[str] = Counter()
        self._excluded_by: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}
        self._skipped_by: Counter[str] = Counter()
        self._failures: list[Failure] = []
        self._times: list[int] = []  # first and last stream time selected
        self._write_times: list[int] = []  # smallest and largest write time selected

    # --- control ------------------------------------------------------------------------

    def stop(self, reason: str = "stop requested") -> None:
        """Finish the batch in flight, write the checkpoint, end."""
        if not self._stop and not self._done.is_set():
            self._stop = True
            self.progress.state = "stopping"
            self.progress.message = reason
            log.info("replay_stopping", job=self.progress.id, reason=reason)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> ReplaySummary:
        await self._done.wait()
        return self.summary()

    # --- running ------------------------------------------------------------------------

    async def run(self) -> ReplaySummary:
        """Never raises for the job's own failures (state "failed", `error` set); cancellation stops it."""
        progress = self.progress
        log.info("replay_started", job=progress.id, namespace=progress.namespace, target=progress.target,
                 from_seq=self.rng.first, to_seq=self.rng.last, resume_after=progress.checkpoint_seq,
                 dry_run=progress.dry_run, last_value_only=progress.last_value_only,
                 exclusions=";".join(self.filters.labels()))
        completed = False
        self._began = time.monotonic()
        try:
            if not self.request.dry_run:
                await self.target.start()
            tracker = await self._scan() if self.request.last_value_only else None
            if not self._stop:
                completed = await self._apply_pass(tracker)
            progress.state = "done" if completed else "stopped"
            if completed:
                progress.message = ""
        except trio.Cancelled:
            progress.state = "stopped"
            progress.message = progress.message or "cancelled"
            raise
        except ReplayError as exc:
            self._fail(exc)
        except Exception as exc:  # NATS gone for good, a target bug: end with the reason, keep the checkpoint
            log.error("replay_failed", exc_info=True, job=progress.id, error=f"{type(exc).__name__}: {exc}")
            self._fail(ReplayError(f"{type(exc).__name__}: {exc}", exit_code=1))
        finally:
            self._ended = time.monotonic()
            with trio.CancelScope(shield=True):
                self._save_checkpoint(complete=completed, force=True)
                if not self.request.dry_run:
                    with trio.move_on_after(10):
                        await self.target.close()
            progress.updated_at = _now_text()
            progress.rate, progress.eta_s = 0.0, None
            self._done.set()
            log.info("replay_finished", job=progress.id, state=progress.state, applied=progress.applied,
                     excluded=progress.excluded, failed=progress.failed, checkpoint_seq=progress.checkpoint_seq)
        return self.summary()

    def _fail(self, exc: ReplayError) -> None:
        self.error = exc
        self.progress.state = "failed"
        self.progress.message = exc.message

    async def _scan(self) -> LastWrites | None:
        """--last-value-only, first pass: the position of every item's last write in the range."""
        progress = self.progress
        progress.state = "scanning"
        tracker = LastWrites()
        self._meter.reset()
        async with self.reader.read(self.rng, self.request.batch) as batches:
            async for batch in batches:
                for item in batch:
                    for index, entry in enumerate(await self._expanded(item, record=False)):
                        if self.filters.reason(item.seq, entry) is None and self.target.wants(entry):
                            tracker.observe((item.seq, index), entry)
                progress.scanned += len(batch)
                self._advance(batch[-1].seq)
                if self._stop:
                    return None
        return tracker

    async def _apply_pass(self, tracker: LastWrites | None) -> bool:
        """Read from the checkpoint to the end of the range and apply; True when the range is done."""
        progress = self.progress
        progress.state = "applying"
        start = max(self.rng.first, progress.checkpoint_seq + 1)
        rng = SeqRange(start, self.rng.last)
        progress.position = start - 1
        self._meter.reset()
        if not rng.empty:
            await self.reader.check_still_held(start, f"seq:{start}")
        batch_size = self.throttle.batch_size(self.request.batch)
        async with self.reader.read(rng, batch_size) as batches:
            async for batch in batches:
                work = await self._select(batch, tracker)
                if work and not self.request.dry_run:
                    wait = self.throttle.delay(len(work), time.monotonic())
                    if wait > 0:
                        await trio.sleep(wait)
                    try:
                        await self.applier.apply(work)
                    except StoppedWaiting:
                        return False  # this batch is not done: the checkpoint stays before it
                last = batch[-1].seq
                self._advance(last)
                if not self.request.dry_run:
                    progress.checkpoint_seq = last
                    self._save_checkpoint()
                if self._stop:
                    return last >= self.rng.last
        if not self.request.dry_run:
            progress.checkpoint_seq = max(progress.checkpoint_seq, self.rng.last)
        progress.position = max(progress.position, self.rng.last)
        return True

    def _advance(self, position: int) -> None:
        progress = self.progress
        progress.position = position
        self._meter.add(position)
        progress.rate = round(self._meter.rate(), 1)
        progress.eta_s = self._meter.eta(self.rng.last - position)
        progress.updated_at = _now_text()

    # --- selecting -------------------------------------------------------------------------

    async def _expanded(self, item: Journaled, record: bool) -> list[Entry]:
        """The entries one stored message stands for (a MULTI marker's, read from the chunk store)."""
        if item.entry is None:
            if record:
                self._failed(item.seq, None, "undecodable", item.error)
            return []
        if item.entry.op is not Op.MULTI:
            return [item.entry]
        try:
            return await self._resolve(expand_multi, item.entry)
        except PayloadError as exc:
            if record:
                self._failed(item.seq, item.entry, "payload", exc.message)
            return []

    async def _select(self, batch: list[Journaled], tracker: LastWrites | None) -> list[tuple[int, Entry]]:
        """Filter, address, collapse (--last-value-only) and load payloads; count everything left out."""
        progress = self.progress
        work: list[tuple[int, Entry]] = []
        for item in batch:
            for index, entry in enumerate(await self._expanded(item, record=True)):
                progress.seen += 1
                reason = self.filters.reason(item.seq, entry)
                if reason is not None:
                    progress.excluded += 1
                    self._excluded_by[reason] += 1
                    examples = self._examples.setdefault(reason, [])
                    if len(examples) < EXAMPLES_PER_REASON:
                        examples.append(f"seq {item.seq} {entry.op.value} {_name(entry)}")
                    continue
                if not self.target.wants(entry):
                    progress.skipped += 1
                    why = ("addressed to other targets" if not addressed_to(entry, self.settings.name)
                           else f"{entry.op.value} entries do not apply to this target")
                    self._skipped_by[why] += 1
                    continue
                position: Position = (item.seq, index)
                if tracker is not None and not tracker.keeps(position, entry):
                    progress.superseded += 1
                    continue
                if entry.chunk is not None and entry.value is None and not self.request.dry_run:
                    try:
                        entry = await self._resolve(with_payload, entry)
                    except PayloadError as exc:
                        self._failed(item.seq, entry, "payload", exc.message)
                        continue
                self._by_op[entry.op.value] += 1
                self._by_prefix[key_prefix(entry.key)] += 1
                self._note_times(item.time_ns, entry.write_time)
                work.append((item.seq, entry))
        return work

    async def _resolve(self, resolve: Callable[[Any, Entry], Awaitable[T]], entry: Entry) -> T:
        """A chunk-store read, retried while the failure may pass."""
        attempt = 0
        while True:
            try:
                return await resolve(self.journal.chunks, entry)
            except PayloadError as exc:
                attempt += 1
                if exc.permanent or attempt >= PAYLOAD_ATTEMPTS:
                    raise
                self.progress.retries += 1
                await trio.sleep(backoff(attempt, 0.2, 5.0, 2.0))

    def _note_times(self, stream_ns: int, write_time_us: int) -> None:
        if not self._times:
            self._times = [stream_ns, stream_ns]
            self._write_times = [write_time_us, write_time_us]
            return
        self._times[1] = stream_ns
        self._write_times[0] = min(self._write_times[0], write_time_us)
        self._write_times[1] = max(self._write_times[1], write_time_us)

    # --- applying --------------------------------------------------------------------------

    def _failed(self, seq: int, entry: Entry | None, error_class: str, message: str) -> None:
        """Counted, logged and listed in the summary: a replay never dead-letters."""
        self.progress.failed += 1
        log.warning("replay_entry_failed", job=self.progress.id, seq=seq, key=entry.key if entry else "",
                    error_class=error_class, error=message)
        if len(self._failures) < MAX_FAILURES_LISTED:
            self._failures.append(Failure(
                seq=seq, key=entry.key if entry else "", item=entry.item if entry else "",
                op=entry.op.value if entry else "", error_class=error_class, error=message,
            ))

    # --- results ---------------------------------------------------------------------------

    def _save_checkpoint(self, complete: bool = False, force: bool = False) -> None:
        if self.checkpoint_path is None or self.request.dry_run:
            return
        now = time.monotonic()
        if not force and now - self._last_checkpoint < CHECKPOINT_EVERY:
            return
        self._last_checkpoint = now
        try:
            checkpoints.save(self.checkpoint_path, checkpoints.Checkpoint(
                request=self.request, target=self.progress.target, from_seq=self.rng.first, to_seq=self.rng.last,
                applied_through=self.progress.checkpoint_seq, complete=complete, updated_at=_now_text(),
            ))
        except OSError as exc:  # the replay itself is fine; only a resume would start earlier
            log.warning("replay_checkpoint_failed", path=str(self.checkpoint_path), error=str(exc))

    def summary(self) -> ReplaySummary:
        prefixes = self._by_prefix.most_common(MAX_PREFIXES)
        by_prefix = dict(prefixes)
        others = sum(self._by_prefix.values()) - sum(by_prefix.values())
        if others:
            by_prefix["(other prefixes)"] = others
        end = self._ended if self._ended is not None else time.monotonic()
        return ReplaySummary(
            progress=msgspec.structs.replace(self.progress),
            elapsed_s=round(end - self._began, 3),
            by_op=dict(self._by_op),
            by_prefix=by_prefix,
            excluded_by=dict(self._excluded_by),
            excluded_examples={k: list(v) for k, v in self._examples.items()},
            skipped_by=dict(self._skipped_by),
            first_time=format_time(self._times[0]) if self._times else "",
            last_time=format_time(self._times[1]) if self._times else "",
            first_write_time=format_time(self._write_times[0] * 1000) if self._write_times else "",
            last_write_time=format_time(self._write_times[1] * 1000) if self._write_times else "",
            failures=list(self._failures),
            failures_not_listed=max(0, self.progress.failed - len(self._failures)),
            checkpoint=str(self.checkpoint_path) if self.checkpoint_path and not self.request.dry_run else "",
        )


def _name(entry: Entry) -> str:
    return f"{entry.key}/{entry.item}" if entry.item else entry.key


# --- starting a job ---------------------------------------------------------------------------


def _check_options(request: ReplayRequest) -> None:
    if request.rate < 0:
        raise ReplayError(f"--rate must be a positive number of entries per second, got {request.rate:g}")


async def prepare_replay(config: Config, journal: Journal, request: ReplayRequest,
                         now_ns: int | None = None) -> ReplayJob:
    """Check the request, resolve its range (the retention check) and build its target; ReplayError if it cannot run.

    With `resume`, the range, exclusions and options come from the checkpoint (`request.checkpoint`);
    only `rate` and `dry_run` may differ from the first run."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    _check_options(request)
    ns = namespace_of(config, request)
    reader = JournalReader(journal.writer.conn, request.namespace, ns)
    # ASYNC240 is waived: expanduser reads $HOME, not the disk; the checkpoint file itself is small and read once
    path = Path(request.checkpoint).expanduser() if request.checkpoint else None  # noqa: ASYNC240
    if request.resume:
        if path is None:
            raise ReplayError("--resume needs the checkpoint to continue from (--checkpoint FILE)")
        saved = checkpoints.load(path)
        if saved.request.namespace != request.namespace:
            raise ReplayError(f"checkpoint {path} is a replay of namespace {saved.request.namespace!r}, "
                              f"not {request.namespace!r}")
        effective = msgspec.structs.replace(saved.request, rate=request.rate or saved.request.rate,
                                            dry_run=request.dry_run, resume=True, checkpoint=str(path))
        rng, applied_through = SeqRange(saved.from_seq, saved.to_seq), saved.applied_through
        filters = check_request(config, msgspec.structs.replace(effective, resume=False), now_ns)
    else:
        filters = check_request(config, request, now_ns)
        rng = await reader.resolve(request.from_, request.to, now_ns)
        applied_through = 0
        effective = msgspec.structs.replace(
            request, from_=f"seq:{rng.first}", to=f"seq:{rng.last}",
            exclude_window=[_absolute_window(text, now_ns) for text in request.exclude_window],
        )
        if path is not None and path.exists() and not request.dry_run:
            log.warning("replay_checkpoint_replaced", path=str(path),
                        hint="an earlier replay's checkpoint is overwritten; use --resume to continue one")
    settings = target_settings(config, effective)
    target = build_target(settings, request.namespace, config)
    return ReplayJob(journal=journal, request=effective, ns=ns, settings=settings, target=target, filters=filters,
                     rng=rng, applied_through=applied_through, checkpoint_path=path, reader=reader)


def _absolute_window(text: str, now_ns: int) -> str:
    start, end = parse_window(text, now_ns)
    return f"{format_time(start)}..{format_time(end)}"


async def start_replay(config: Config, journal: Journal, request: ReplayRequest, nursery: trio.Nursery) -> ReplayJob:
    """The admin endpoint's entry: prepare (errors raised here, before anything runs), then run in `nursery`.

    The job never raises out of `run` for its own failures, so it cannot take the sidecar down;
    read `job.progress` (live) and `job.summary()`; `job.stop()` ends it cleanly."""
    job = await prepare_replay(config, journal, request)
    nursery.start_soon(job.run)
    return job
