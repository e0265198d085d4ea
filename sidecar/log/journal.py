"""The journal: entries in, durable answers out.

Decides how an entry goes to JetStream — a plain publish on its partition subject,
a scheduled message for a delayed one, a chunk-store object plus marker for a large
payload, an atomic batch for a multi-entry mutation, or one chunked MULTI marker for
a mutation over the atomic-batch limits — and hands it to the group-commit writer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import msgspec

from sidecar.config import Config, Namespace
from sidecar.envelope import (
    MAX_PACKED_ENTRY_BYTES,
    Entry,
    Op,
    encode,
    encode_many,
    new_id,
    now_us,
    schedule_subject,
    subject_for,
)
from sidecar.log.chunks import ChunkError, ChunkStore
from sidecar.log.writer import (
    DUPLICATE_MESSAGE_IN_BATCH,
    MAX_ATOMIC_MESSAGES,
    Durable,
    JournalWriter,
    Message,
    WriteResult,
)

# One atomic batch must fit comfortably in the server's limits (1000 messages; each
# message under max_payload); beyond these the mutation is stored as one MULTI object.
MAX_ATOMIC_BYTES = 4 * 1024 * 1024
# An entry that is still too big for one message once its value is chunked (a CQL batch
# with many large values, say) goes to the chunk store whole, behind a MULTI marker; so
# does an atomic mutation with such an entry. The bound is also kept this far under the
# server's max_payload (headers): the writer refuses any message over it rather than send it.
MAX_ENTRY_BYTES = 900 * 1024
MAX_PAYLOAD_HEADROOM = 8 * 1024
# Asking JetStream whether a message id is stored, without storing anything: a publish with the
# id and an expected last id that never matches. The server checks the id first (a stored one
# answers `duplicate` with its sequence), then the expectation (10070: nothing stored). The subject
# is one no drain consumer reads, should a server ever store a probe after all.
PROBE_EXPECTED_LAST_ID = "walcar-id-probe-never-matches"
WRONG_LAST_MSG_ID = 10070


class UnknownNamespace(KeyError):
    pass


def _rfc3339(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Journal:
    def __init__(self, config: Config, writer: JournalWriter, chunks: ChunkStore) -> None:
        self.config = config
        self.writer = writer
        self.chunks = chunks

    def namespace(self, name: str) -> Namespace:
        ns = self.config.namespaces.get(name)
        if ns is None:
            raise UnknownNamespace(name)
        return ns

    @property
    def entry_limit(self) -> int:
        """The largest entry message journaled as it is; larger ones go to the chunk store."""
        return min(MAX_ENTRY_BYTES, self.writer.max_payload - MAX_PAYLOAD_HEADROOM)

    def message_for(self, entry: Entry, packable: bool = False) -> Message:
        """The JetStream message of an entry that is already small enough for the stream.

        `packable`: the entry's id was made by walcar for this write alone (never a client's idempotency
        token, nor an id from another region), so no retry relies on it being its message's Nats-Msg-Id;
        the writer may then store it in one message with others of its partition (a pack)."""
        headers = {"Nats-Msg-Id": entry.id}
        subject = subject_for(entry.ns, entry.partition)
        if entry.deliver_at and entry.deliver_at > now_us():
            # The stream holds the entry and publishes it to its partition at deliver_at;
            # nothing waits in the sidecar's memory, and a restart loses nothing.
            headers["Nats-Schedule"] = f"@at {_rfc3339(entry.deliver_at)}"
            headers["Nats-Schedule-Target"] = subject
            subject = schedule_subject(entry.ns, entry.id)
            packable = False
        payload = encode(entry)
        pack_key = entry.key if packable and _packs(entry, payload) else ""
        return Message(subject, payload, headers, pack_key)

    async def _externalize(self, entry: Entry, ns: Namespace) -> Entry:
        """Move a payload above the chunk threshold into the chunk store."""
        if _fits_inline(entry, ns):
            return entry
        ref = await self.chunks.put(entry.ns, entry.id, entry.value or b"")
        return msgspec.structs.replace(entry, value=None, chunk=ref)

    async def append(self, entry: Entry, packable: bool = False) -> WriteResult:
        ns = self.namespace(entry.ns)
        try:
            entry = await self._externalize(entry, ns)
        except ChunkError as exc:
            return WriteResult(Durable.FALSE, message=str(exc))
        message = self.message_for(entry, packable)
        if len(message.payload) > self.entry_limit:
            return await self._append_multi([entry], entry.id)
        return await self.writer.publish(message.subject, message.payload, message.headers, message.pack_key)

    def append_then(self, entry: Entry, done: Callable[[WriteResult], None], packable: bool = False) -> bool:
        """`append` without a task (see `JournalWriter.publish_then`); False, with nothing queued,
        when the entry needs the chunk store or must wait for room: await `append` then."""
        if not _fits_inline(entry, self.namespace(entry.ns)):
            return False
        message = self.message_for(entry, packable)
        if len(message.payload) > self.entry_limit:
            return False
        return self.writer.publish_then(message.subject, message.payload, message.headers, done, message.pack_key)

    async def append_many(self, entries: list[Entry], packable: Sequence[bool] = ()) -> list[WriteResult]:
        """Independent entries in one group commit, journaled in the order given (per-key order holds).

        Used for batches replicated from another region: each entry keeps its id (so a retried
        batch is deduplicated entry by entry) and is stored or refused on its own. An entry too
        large for one message goes through the chunk store on its own, in its place in the order.
        `packable[i]` says entry i may share a message (see `message_for`); none may when it is empty."""
        results: list[WriteResult] = []
        run: list[Message | WriteResult] = []
        limit = self.entry_limit
        for index, entry in enumerate(entries):
            prepared = entry
            ns = self.namespace(entry.ns)
            if not _fits_inline(entry, ns):  # checked here first: most entries fit, and an await costs
                try:
                    prepared = await self._externalize(entry, ns)
                except ChunkError as exc:
                    run.append(WriteResult(Durable.FALSE, message=str(exc)))
                    continue
            message = self.message_for(prepared, bool(packable) and packable[index])
            if len(message.payload) > limit:
                results += await self._publish_run(run)
                run = []
                results.append(await self._append_multi([prepared], prepared.id))
            else:
                run.append(message)
        return results + await self._publish_run(run)

    async def _publish_run(self, run: list[Message | WriteResult]) -> list[WriteResult]:
        results = iter(await self.writer.publish_many([m for m in run if isinstance(m, Message)]))
        return [next(results) if isinstance(m, Message) else m for m in run]

    async def append_atomic(self, entries: list[Entry], mutation_id: str | None = None) -> WriteResult:
        """Journal several entries as one mutation: all of them or none."""
        if not entries:
            raise ValueError("a mutation needs at least one entry")
        if len(entries) == 1:
            return await self.append(entries[0])
        namespace = entries[0].ns
        ns = self.namespace(namespace)
        # Over the count, messages are not built at all (10,000 encodes would hold the loop for nothing).
        small = len(entries) <= MAX_ATOMIC_MESSAGES and all(_fits_inline(e, ns) for e in entries)
        messages = [self.message_for(e) for e in entries] if small else []
        limit = self.entry_limit
        if small and len(messages) <= MAX_ATOMIC_MESSAGES and all(len(m.payload) <= limit for m in messages) \
                and sum(len(m.payload) for m in messages) <= MAX_ATOMIC_BYTES:
            result = await self.writer.publish_atomic(messages)
            if result.code == DUPLICATE_MESSAGE_IN_BATCH:
                return await self._duplicates(namespace, messages)
            return result
        return await self._append_multi(entries, mutation_id or new_id())

    async def _duplicates(self, namespace: str, messages: list[Message]) -> WriteResult:
        """An atomic batch refused for ids already stored: a retry (all of them stored), or a
        different mutation under ids used before (some stored) whose new entries must not be acked."""
        ids = [(m.headers or {})["Nats-Msg-Id"] for m in messages]
        probes = [Message(f"wal.{namespace}.idprobe", b"",
                          {"Nats-Msg-Id": i, "Nats-Expected-Last-Msg-Id": PROBE_EXPECTED_LAST_ID}) for i in ids]
        answers = await self.writer.publish_many(probes)
        stored = [i for i, a in zip(ids, answers, strict=True) if a.ok and a.duplicate]
        missing = [i for i, a in zip(ids, answers, strict=True) if a.code == WRONG_LAST_MSG_ID]
        if len(stored) == len(ids):
            return WriteResult(Durable.TRUE, duplicate=True, count=len(ids), stored_at=[a.sequence for a in answers],
                               message="a retry: every entry of this mutation is stored already")
        if stored and len(stored) + len(missing) == len(ids):
            return WriteResult(Durable.FALSE, conflict=True, message=(
                f"idempotency token reused for a different mutation: {len(stored)} of its {len(ids)} entries "
                f"(ids {', '.join(stored[:5])}{', ...' if len(stored) > 5 else ''}) were stored by an earlier "
                f"write, the other {len(missing)} are not stored; send them under a new token"))
        if not stored and len(missing) == len(ids):
            return WriteResult(Durable.FALSE, message="journal rejected the write: an entry id repeats within the "
                                                      "mutation, or its stored copy just left the duplicate window")
        return WriteResult(Durable.UNKNOWN, message="the journal refused the mutation for ids already stored, and "
                                                    "could not tell which: retry with the same token")

    async def _append_multi(self, entries: list[Entry], mutation_id: str) -> WriteResult:
        """Over the batch limits: the whole mutation as one object, one MULTI marker on the stream."""
        first = entries[0]
        try:
            ref = await self.chunks.put(first.ns, f"multi-{mutation_id}", encode_many(entries))
        except ChunkError as exc:
            return WriteResult(Durable.FALSE, message=str(exc))
        marker = Entry(
            id=mutation_id,
            ns=first.ns,
            op=Op.MULTI,
            key=first.key,
            partition=first.partition,
            chunk=ref,
            write_time=first.write_time,
            origin=first.origin,
            targets=first.targets,
        )
        message = self.message_for(marker)
        return await self.writer.publish(message.subject, message.payload, message.headers)


def _packs(entry: Entry, payload: bytes) -> bool:
    """Small, self-contained entries share messages; a chunk reference or a MULTI marker goes alone (the
    drain reads its payload on its own), and so does a large entry."""
    return entry.chunk is None and entry.op is not Op.MULTI and len(payload) <= MAX_PACKED_ENTRY_BYTES


def _fits_inline(entry: Entry, ns: Namespace) -> bool:
    """The entry's value travels in the envelope itself, not through the chunk store."""
    return entry.value is None or len(entry.value) <= ns.chunk_threshold
