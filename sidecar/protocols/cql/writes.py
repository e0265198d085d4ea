"""Writes from apps: journaled and answered from the journal, or sent to Cassandra synchronously.

- INSERT / UPDATE / DELETE / BATCH are journaled (:mod:`.mutations`), one entry
  per partition, and answered RESULT Void with the ``walcar-durable`` /
  ``walcar-visible`` custom payload, or Unavailable / Overloaded when the
  journal did not take them.
- LWT and counter writes go to Cassandra synchronously, after this sidecar's
  earlier journaled writes to the same partition are applied.
- With the WAL switched off (``mode = "off"``) a write whose partitions have no
  journaled writes on their way goes straight to Cassandra.

The hot path -- one prepared write whose partition key is bound -- is journaled
straight from the connection's reader (:meth:`Writes.journal_now`) without a task.
"""

from __future__ import annotations

import itertools
from typing import Any, Final

import msgspec

from sidecar.envelope import BatchRef, CqlMutation, CqlStatement, Entry, Op, WriteTimeError, new_id
from sidecar.ingress import Ack, Ingress, Refused
from sidecar.logs import get_logger

from .catalog import Catalog
from .forwarding import Forwarder
from .frames import FLAG_CUSTOM_PAYLOAD, Frame, Opcode
from .messages import Batch, BatchStatement, BatchType, Error, Execute, Query, VoidResult, encode_response
from .mutations import (
    Bound,
    MutationError,
    group_by_key,
    journal_key,
    marker_names,
    marker_types,
    partition_key,
    positional_values,
    to_cql_statement,
)
from .prepared import PreparedCache, PreparedInfo
from .routing import ClassifyCache, Route, route_of
from .session import Client
from .statements import Statement, StatementKind

__all__ = ["NO_KEYSPACE", "Writes"]

log = get_logger("cql")

NO_KEYSPACE: Final = "No keyspace has been specified. USE a keyspace, or explicitly specify keyspace.tablename"


def _durable_void_body(visible: bool) -> bytes:
    """RESULT Void with walcar-durable: true and the visible flag as custom payload (encoded once)."""
    payload = {"walcar-durable": b"true", "walcar-visible": b"true" if visible else b"false"}
    return encode_response(VoidResult(), 0, custom_payload=payload)[9:]


_DURABLE_VOID: Final = {visible: _durable_void_body(visible) for visible in (False, True)}


def _flags_payload(ack: Ack) -> dict[str, bytes | None]:
    return {"walcar-durable": str(ack.durable).encode(), "walcar-visible": b"true" if ack.visible else b"false"}


class WritePlan(msgspec.Struct):
    """A write resolved and keyed: journal it, or send it to Cassandra synchronously."""

    items: list[tuple[str, Bound]]
    batch_type: int
    consistency: int
    serial_consistency: int
    timestamp: int | None
    sync: bool


class Writes:
    """Journals a listener's writes to its namespace, or applies them synchronously."""

    def __init__(self, namespace: str, ingress: Ingress, wait_targets: list[str], conditional_wait: float,
                 forwarder: Forwarder, catalog: Catalog, prepared: PreparedCache, classify: ClassifyCache) -> None:
        self.namespace = namespace
        self.ingress = ingress
        # A conditional statement waits for earlier journaled writes to reach these targets.
        self.wait_targets = wait_targets
        self.conditional_wait = conditional_wait
        self.forwarder = forwarder
        self.catalog = catalog
        self.prepared = prepared
        self.classify = classify
        self._id_prefix = new_id()[:12] + "-"
        self._ids = itertools.count(1)

    # --- EXECUTE -------------------------------------------------------------------------

    def _lean_write(self, message: Execute, info: PreparedInfo) -> tuple[str, CqlStatement] | None:
        """(journal key, statement) of the common case — one prepared write whose partition key is
        bound — without a task or a schema lookup; None for anything else."""
        values = message.params.values or []
        if not (info.route is Route.JOURNAL and info.pk_indexes and message.params.names is None
                and len(values) == len(info.columns) and info.table is not None and info.columns):
            return None
        keyspace = info.columns[0].keyspace
        parts = [p for p in (values[i] for i in info.pk_indexes) if type(p) is bytes]
        if len(parts) != len(info.pk_indexes):  # a key part unset or null: no partition to name
            return None
        statement = to_cql_statement(Bound(info.query, info.statement, keyspace, info.table, values, info.types))
        return journal_key(keyspace, info.table, parts), statement

    async def direct(self, keys: list[str]) -> bool:
        """`mode = "off"`, and every key clear of this sidecar's un-applied journaled writes (waited for
        up to the conditional wait: Ingress.direct)."""
        if not self.wait_targets or not self.ingress.wal_off(self.namespace):
            return False
        for target in self.wait_targets:
            if not await self.ingress.direct(self.namespace, target, keys, self.conditional_wait):
                return False
        return True

    def journal_now(self, client: Client, frame: Frame, message: Execute, info: PreparedInfo) -> bool:
        """Journal a lean write straight from the reader, answered when the journal answers;
        False when it needs the task path (not lean, a `sync` or `off` namespace, the journal full)."""
        lean = self._lean_write(message, info)
        if lean is None or self.ingress.wal_off(self.namespace):
            return False
        params = message.params
        try:
            entries = self._entries([(lean[0], [lean[1]])], -1, params.consistency,
                                    params.serial_consistency or 0, params.timestamp)
        except WriteTimeError as exc:
            client.respond(frame.stream, Error.invalid(f"walcar: {exc}"))
            return True
        stream, consistency = frame.stream, params.consistency

        def journaled(ack: Ack) -> None:
            client.inflight -= 1
            self._answer_write(client, stream, consistency, ack)

        client.inflight += 1
        if self.ingress.write_then(entries[0], "cql", journaled, packable=True):
            return True
        client.inflight -= 1
        return False

    async def execute_write(self, client: Client, frame: Frame, message: Execute, info: PreparedInfo) -> None:
        params = message.params
        lean = self._lean_write(message, info)
        if lean is not None:
            if await self.direct([lean[0]]):
                await self.forwarder.forward_async(client, frame, info)
                return
            await self._write_entries(client, frame.stream, [(lean[0], [lean[1]])], -1, params.consistency,
                                      params.serial_consistency or 0, params.timestamp)
            return
        bound = self._bind_prepared(client, info, params.values or [], params.names)
        schema = None
        if not bound.pk_indexes:
            schema = await self.catalog.schema(client, bound.keyspace, bound.table)
        plan = WritePlan([(partition_key(bound, schema), bound)], -1, params.consistency,
                     params.serial_consistency or 0, params.timestamp, info.route is Route.SYNC)
        await self.apply(client, frame, plan, info)

    def _bind_prepared(self, client: Client, info: PreparedInfo, values: list[Any], names: list[str] | None) -> Bound:
        if names is not None:
            values = positional_values(values, names, list(info.names))
        elif len(values) != len(info.columns):
            raise MutationError(f"There were {len(info.columns)} markers(?) in CQL but {len(values)} bound variables")
        keyspace = info.table_keyspace or client.keyspace
        if keyspace is None or info.table is None:
            raise MutationError(NO_KEYSPACE)
        pk = info.pk_indexes if info.pk_indexes else None
        return Bound(info.query, info.statement, keyspace, info.table, values, list(info.types), pk)

    # --- BATCH ----------------------------------------------------------------------

    async def on_batch(self, client: Client, frame: Frame, message: Batch) -> None:
        if not message.statements:
            await self.forwarder.forward_async(client, frame)  # nothing to journal; Cassandra's answer it is
            return
        bounds: list[Bound] = []
        sync = message.batch_type == BatchType.COUNTER
        for child in message.statements:
            if child.query_id is not None and self.prepared.get(child.query_id) is None:
                client.respond(frame.stream, Error.unprepared(child.query_id))
                return
            route, bound = self._batch_child(client, child)
            if bound is None:
                # Not a plain write (Cassandra refuses those in a batch): let Cassandra answer.
                await self.forwarder.forward_async(client, frame)
                return
            sync = sync or route is Route.SYNC
            bounds.append(bound)
        # Table schemas are needed for children whose partition key or types the metadata does not give.
        schemas = await self.catalog.schemas_of(client, {(b.keyspace, b.table) for b in bounds if not b.pk_indexes})
        keyed: list[tuple[str, Bound]] = []
        for bound in bounds:
            schema = schemas.get((bound.keyspace, bound.table))
            if schema is not None and schema.is_counter:
                sync = True
            if not bound.types:
                bound.types = marker_types(bound.statement, schemas, bound.keyspace)
            keyed.append((partition_key(bound, schema), bound))
        plan = WritePlan(keyed, message.batch_type, message.consistency, message.serial_consistency or 0,
                     message.timestamp, sync)
        await self.apply(client, frame, plan, None)

    def _batch_child(self, client: Client, child: BatchStatement) -> tuple[Route, Bound | None]:
        """A BATCH child resolved to a write (None when it is not one the sidecar can journal)."""
        if child.query_id is not None:
            info = self.prepared.get(child.query_id)
            assert info is not None
            if info.route not in (Route.JOURNAL, Route.SYNC):
                return info.route, None
            return info.route, self._bind_prepared(client, info, child.values, None)
        st = self.classify(child.query or "")
        route = route_of(st, client.keyspace)
        if st.kind == StatementKind.BATCH or route not in (Route.JOURNAL, Route.SYNC):
            return route, None
        keyspace = st.keyspace or client.keyspace
        if keyspace is None or st.table is None:
            raise MutationError(NO_KEYSPACE)
        if len(child.values) != st.bind_count:
            raise MutationError(f"There were {st.bind_count} markers(?) in CQL but {len(child.values)} bound variables")
        return route, Bound(child.query or "", st, keyspace, st.table, list(child.values), [])

    # --- planning a simple statement -------------------------------------------------

    async def plan_query(self, client: Client, message: Query, st: Statement, route: Route) -> WritePlan:
        params = message.params
        values = positional_values(params.values or [], params.names, marker_names(st))
        children = st.statements or [st]
        tables = set()
        for child in children:
            keyspace = child.keyspace or client.keyspace
            if keyspace is None or child.table is None:
                raise MutationError(NO_KEYSPACE)
            tables.add((keyspace, child.table))
        schemas = await self.catalog.schemas_of(client, tables)
        sync = route is Route.SYNC or any(s is not None and s.is_counter for s in schemas.values())
        types = marker_types(st, schemas, client.keyspace)
        keys = []
        for child in children:
            keyspace = child.keyspace or client.keyspace or ""
            child_bound = Bound(message.query, child, keyspace, child.table or "", values, types)
            keys.append(partition_key(child_bound, schemas.get((keyspace, child.table or ""))))
        first = children[0]
        bound = Bound(message.query, st, first.keyspace or client.keyspace or "", first.table or "", values, types)
        # Synchronously only the keys matter (the frame goes to Cassandra as sent); journaled, a text BATCH
        # is one statement keyed by its first partition (see docs/cql.md).
        items = [(key, bound) for key in dict.fromkeys(keys)] if sync else [(keys[0], bound)]
        return WritePlan(items, -1, params.consistency, params.serial_consistency or 0, params.timestamp, sync)

    # --- journal / synchronous ----------------------------------------------------------

    async def apply(self, client: Client, frame: Frame, plan: WritePlan, info: PreparedInfo | None) -> None:
        if await self.direct([key for key, _ in plan.items]):
            # The WAL is switched off and no key has journaled writes still on their way: Cassandra answers.
            await self.forwarder.forward_async(client, frame, info)
            return
        if plan.sync:
            await self._synchronous(client, frame, [key for key, _ in plan.items], info)
        else:
            await self._journal(client, frame.stream, plan)

    async def _synchronous(self, client: Client, frame: Frame, keys: list[str], info: PreparedInfo | None) -> None:
        """LWT / counters: wait for this sidecar's journaled writes to those partitions, then ask Cassandra."""
        applied = self.ingress.applied
        for key in keys:
            for target in self.wait_targets:
                if not applied.has_unapplied(self.namespace, target, key):
                    continue
                if not await applied.wait_key_applied(self.namespace, target, key, self.conditional_wait):
                    client.respond(frame.stream, Error.overloaded(
                        f"walcar busy: earlier journaled writes to partition {key} are not yet applied to "
                        f"{target} after {self.conditional_wait:.0f}s; retry later"))
                    return
        await self.forwarder.forward_async(client, frame, info)

    async def _journal(self, client: Client, stream: int, plan: WritePlan) -> None:
        groups = group_by_key([(key, to_cql_statement(bound)) for key, bound in plan.items])
        await self._write_entries(client, stream, groups, plan.batch_type, plan.consistency,
                                  plan.serial_consistency, plan.timestamp)

    def _entry_id(self) -> str:
        """Unique ids without a syscall per write: a random per-process prefix and a counter."""
        return f"{self._id_prefix}{next(self._ids):x}"

    def _entries(
        self,
        groups: list[tuple[str, list[CqlStatement]]],
        batch_type: int,
        consistency: int,
        serial_consistency: int,
        timestamp: int | None,
    ) -> list[Entry]:
        """One entry per partition; raises WriteTimeError for a client timestamp outside the drift."""
        write_time = timestamp if timestamp is not None else self.ingress.clock()
        return [
            self.ingress.entry(
                self.namespace, Op.CQL, key, write_time=write_time, entry_id=self._entry_id(),
                cql=CqlMutation(statements, batch_type, consistency, serial_consistency),
            )
            for key, statements in groups
        ]

    async def _write_entries(
        self,
        client: Client,
        stream: int,
        groups: list[tuple[str, list[CqlStatement]]],
        batch_type: int,
        consistency: int,
        serial_consistency: int,
        timestamp: int | None,
    ) -> None:
        """Journal one entry per partition (all or none) and answer Void with the flags, or an error."""
        try:
            entries = self._entries(groups, batch_type, consistency, serial_consistency, timestamp)
        except (WriteTimeError, Refused) as exc:  # Cassandra's answer to a write it cannot take
            client.respond(stream, Error.invalid(f"walcar: {exc}"))
            return
        if len(entries) == 1:
            ack = await self.ingress.write(entries[0], "cql", packable=True)
        else:
            # One BATCH over several partitions: one entry per partition, stored all or none.
            mutation_id = self._entry_id()
            for index, entry in enumerate(entries):
                entry.id = f"{mutation_id}:{index}"
                entry.batch = BatchRef(mutation_id, index, len(entries))
            ack = await self.ingress.write_mutation(entries, mutation_id, "cql")
        self._answer_write(client, stream, consistency, ack)

    def _answer_write(self, client: Client, stream: int, consistency: int, ack: Ack) -> None:
        """RESULT Void with the durable/visible flags, or the error a driver retries on."""
        if ack.ok:
            client.send_frame(stream, FLAG_CUSTOM_PAYLOAD, Opcode.RESULT, _DURABLE_VOID[ack.visible])
            return
        message = f"walcar journal did not take the write (durable={ack.durable}): {ack.message}"
        if "overloaded" in ack.message.lower():
            error = Error.overloaded(message)
        else:
            error = Error.unavailable(consistency, 1, 0, message)
        log.warning("cql_write_not_journaled", durable=str(ack.durable), error=ack.message, peer=client.peer)
        client.respond(stream, error, custom_payload=_flags_payload(ack))
