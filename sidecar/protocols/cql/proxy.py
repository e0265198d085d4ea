"""The CQL front's request handling: what happens to each frame an app sends.

- OPTIONS, STARTUP (compression), REGISTER, and the SASL exchange are answered
  here; credentials are checked by opening an upstream connection with them.
- ``system.local`` / ``system.peers(_v2)`` are answered from a cached copy of the
  upstream's rows (:mod:`.system_tables`), so the driver sees one host.
- SELECTs and everything the sidecar does not interpret are forwarded as raw
  frames over pooled upstream connections (:mod:`.upstream`).
- INSERT / UPDATE / DELETE / BATCH are journaled (:mod:`.mutations`) and answered
  RESULT Void with the ``walcar-durable`` / ``walcar-visible`` custom payload,
  or Unavailable / Overloaded when the journal did not take them.
- LWT and counter writes go to Cassandra synchronously, after this sidecar's
  earlier journaled writes to the same partition are applied; TRUNCATE and DDL
  go synchronously and are logged.

The hot paths (forwarding a SELECT, journaling a prepared write) are decided
synchronously in :meth:`CqlProxy.handle` from a peek at the frame body; only
work that must wait spawns a task.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any, Final

import msgspec
import trio

from sidecar.config import CassandraTarget, Config, Listener
from sidecar.envelope import BatchRef, CqlMutation, CqlStatement, Entry, Op, WriteTimeError, new_id, now_us
from sidecar.ingress import Ack, Ingress, Refused
from sidecar.logs import get_logger
from sidecar.tls import ClientTls
from sidecar.units import parse_hostport

from .frames import (
    COMPRESSIONS,
    FLAG_CUSTOM_PAYLOAD,
    Compression,
    Frame,
    Opcode,
    get_compression,
)
from .messages import (
    Authenticate,
    AuthResponse,
    AuthSuccess,
    Batch,
    BatchStatement,
    BatchType,
    Error,
    ErrorCode,
    Execute,
    Prepare,
    PreparedResult,
    Query,
    Ready,
    Register,
    RowsResult,
    SchemaChangeEvent,
    SchemaChangeResult,
    SetKeyspaceResult,
    Startup,
    Supported,
    VoidResult,
    decode_request,
    decode_response,
    encode_response,
)
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
from .schema import SchemaCache, TableSchema, columns_query, table_schema_from_rows
from .session import AUTH_STATE, READY_STATE, STARTUP_STATE, Client, upstream_error
from .statements import Statement, StatementKind
from .system_tables import LocalNode, SystemInfo, answer, host_id_for, rewrite
from .types import CqlProtocolError
from .upstream import Upstream, UpstreamPool, UpstreamRejected, UpstreamUnavailable, plain_username
from .values import decode_value

__all__ = ["CqlProxy"]

log = get_logger("cql")

SYSTEM_TTL: Final = 30.0  # seconds a cached copy of the upstream's system.local is served before a refresh
SCHEMA_TIMEOUT: Final = 2.0  # a write waits at most this long for a table's schema (then keys by table)
AGREEMENT_TIMEOUT: Final = 10.0  # after DDL: wait for the upstream's nodes to agree on the schema
ROUNDTRIP_TIMEOUT: Final = 120.0  # bound for synchronous pass-through (DDL on a busy cluster is slow)
NO_KEYSPACE: Final = "No keyspace has been specified. USE a keyspace, or explicitly specify keyspace.tablename"


def _durable_void_body(visible: bool) -> bytes:
    """RESULT Void with walcar-durable: true and the visible flag as custom payload (encoded once)."""
    payload = {"walcar-durable": b"true", "walcar-visible": b"true" if visible else b"false"}
    return encode_response(VoidResult(), 0, custom_payload=payload)[9:]


_DURABLE_VOID: Final = {visible: _durable_void_body(visible) for visible in (False, True)}


def _flags_payload(ack: Ack) -> dict[str, bytes | None]:
    return {"walcar-durable": str(ack.durable).encode(), "walcar-visible": b"true" if ack.visible else b"false"}


class _Plan(msgspec.Struct):
    """A write resolved and keyed: journal it, or send it to Cassandra synchronously."""

    items: list[tuple[str, Bound]]
    batch_type: int
    consistency: int
    serial_consistency: int
    timestamp: int | None
    sync: bool


class CqlProxy:
    """Everything a CQL listener shares between its app connections."""

    def __init__(self, listener: Listener, ingress: Ingress, config: Config) -> None:
        if listener.namespace is None:
            raise ValueError("a cql listener needs a namespace")
        self.listener = listener
        self.namespace = listener.namespace
        self.ingress = ingress
        ns = config.namespaces[self.namespace]
        cassandra = [t for t in ns.targets if isinstance(t, CassandraTarget)]
        upstream = listener.upstream or (cassandra[0].contact_points if cassandra else [])
        tls = listener.upstream_tls or (cassandra[0].tls if cassandra else None)
        self.upstream = Upstream([parse_hostport(a) for a in upstream],
                                 tls=ClientTls.from_settings(f"listeners.{listener.bind}.upstream_tls", tls))
        self.upstream.on_event = self._on_upstream_event
        # A conditional statement waits for earlier journaled writes to reach these targets.
        self.wait_targets = [t.name for t in cassandra] or [t.name for t in ns.targets]
        self.conditional_wait = max((float(t.timeout) for t in cassandra), default=5.0)
        self.host_id = host_id_for(listener.bind)
        self.prepared = PreparedCache()
        self.schemas = SchemaCache()
        self.classify = ClassifyCache()
        self.system: SystemInfo | None = None
        self._system_lock = trio.Lock()
        self._system_refreshing = False
        self.clients: set[Client] = set()
        self._id_prefix = new_id()[:12] + "-"
        self._ids = itertools.count(1)

    def local_node(self, address: str, port: int) -> LocalNode:
        return LocalNode(address, port, self.listener.data_center, self.listener.rack, self.host_id)

    # --- dispatch ----------------------------------------------------------------

    def handle(self, client: Client, frame: Frame) -> None:
        """One request frame from an app (synchronous: slow paths spawn a task)."""
        op = frame.opcode
        if client.state != READY_STATE:
            self._handshake(client, frame)
        elif op == Opcode.EXECUTE:
            self._on_execute(client, frame)
        elif op == Opcode.QUERY:
            self._on_query(client, frame)
        elif op == Opcode.BATCH:
            request = self._decode(client, frame)
            if request is not None:
                client.spawn(frame.stream, self._on_batch, client, frame, request.message)
        elif op == Opcode.PREPARE:
            request = self._decode(client, frame)
            if request is not None:
                client.spawn(frame.stream, self._on_prepare, client, frame, request.message)
        elif op == Opcode.OPTIONS:
            if self._decode(client, frame) is not None:
                client.respond(frame.stream, self._supported())
        elif op == Opcode.REGISTER:
            request = self._decode(client, frame)
            if request is not None:
                assert isinstance(request.message, Register)
                if "SCHEMA_CHANGE" in request.message.events:
                    client.registered = True
                    self.upstream.subscribe_events(client.token)
                client.respond(frame.stream, Ready())
        elif op in (Opcode.STARTUP, Opcode.AUTH_RESPONSE):
            client.respond(frame.stream, Error.protocol_error(
                f"Unexpected message {Opcode(op).name}, the connection is already initialized"))
        else:
            self._decode(client, frame)  # answers the ProtocolError (unknown opcode, wrong direction)

    def _decode(self, client: Client, frame: Frame) -> Any:
        try:
            return decode_request(frame)
        except CqlProtocolError as exc:
            client.respond(frame.stream, Error(exc.code, exc.message))
            return None

    def _supported(self) -> Supported:
        cql_versions = self.upstream.supported.get("CQL_VERSION") or ["3.4.7"]
        return Supported({"CQL_VERSION": cql_versions, "COMPRESSION": list(COMPRESSIONS),
                          "PROTOCOL_VERSIONS": ["4/v4"]})

    # --- handshake ------------------------------------------------------------------

    def _handshake(self, client: Client, frame: Frame) -> None:
        op = frame.opcode
        if op == Opcode.OPTIONS:
            if self._decode(client, frame) is not None:
                client.respond(frame.stream, self._supported())
            return
        if op == Opcode.STARTUP and client.state == STARTUP_STATE:
            request = self._decode(client, frame)
            if request is None:
                return
            startup: Startup = request.message
            name = startup.compression
            compression = get_compression(name)
            if name and compression is None:
                client.respond(frame.stream, Error.protocol_error(f"Unknown compression algorithm: {name}"))
                return
            if self.upstream.authenticator_known:
                self._started(client, frame.stream, compression, self.upstream.cached_authenticator)
            else:
                client.spawn(frame.stream, self._startup, client, frame.stream, compression)
            return
        if op == Opcode.AUTH_RESPONSE and client.state == AUTH_STATE:
            request = self._decode(client, frame)
            if request is not None:
                client.spawn(frame.stream, self._authenticate, client, frame.stream, request.message)
            return
        expecting = "STARTUP or OPTIONS" if client.state == STARTUP_STATE else "SASL_RESPONSE"
        try:
            name = Opcode(op).name
        except ValueError:
            name = f"opcode {op}"
        client.respond(frame.stream, Error.protocol_error(f"Unexpected message {name}, expecting {expecting}"))

    async def _startup(self, client: Client, stream: int, compression: Compression | None) -> None:
        try:
            authenticator = await self.upstream.authenticator()
        except UpstreamUnavailable as exc:
            client.respond(stream, Error.server_error(f"walcar: {exc}"))
            return
        self._started(client, stream, compression, authenticator)

    def _started(self, client: Client, stream: int, compression: Compression | None,
                 authenticator: str | None) -> None:
        client.decoder.compression = compression
        # The STARTUP answer goes out uncompressed; everything after it is compressed.
        if authenticator is None:
            client.ready()
            client.pool = self.upstream.pool(None, None)
            client.respond(stream, Ready(), compress=False)
        else:
            client.state = AUTH_STATE
            client.respond(stream, Authenticate(authenticator), compress=False)
        client.compression = compression

    async def _authenticate(self, client: Client, stream: int, message: AuthResponse) -> None:
        token = message.token or b""
        user = plain_username(token)
        try:
            await self.upstream.verify(token)
        except UpstreamRejected as exc:
            log.warning("cql_auth_failed", user=user, peer=client.peer, error=exc.error.message)
            client.respond(stream, exc.error)
            return
        except UpstreamUnavailable as exc:
            client.respond(stream, Error(ErrorCode.BAD_CREDENTIALS,
                                         f"Unable to perform authentication: walcar: {exc}"))
            return
        client.token = token
        client.ready()
        client.pool = self.upstream.pool(token, None)
        client.respond(stream, AuthSuccess(None))

    # --- forwarding ------------------------------------------------------------------

    def _pool(self, client: Client) -> UpstreamPool:
        pool = client.pool
        if pool is None or pool.evicted:
            pool = client.pool = self.upstream.pool(client.token, client.keyspace)
        return pool

    def _forward(self, client: Client, frame: Frame, info: PreparedInfo | None = None) -> None:
        """Pass a request to Cassandra as is; its response goes back under the app's stream id."""
        conn = self._pool(client).pick()
        if conn is None or not self._send(client, conn, frame, info):
            client.spawn(frame.stream, self._forward_async, client, frame, info)

    async def _forward_async(self, client: Client, frame: Frame, info: PreparedInfo | None = None) -> None:
        conn = await self._pool(client).acquire()
        if not self._send(client, conn, frame, info):
            raise UpstreamUnavailable("no free stream on the connection to Cassandra")

    def _send(self, client: Client, conn: Any, frame: Frame, info: PreparedInfo | None) -> bool:
        stream = frame.stream

        def on_response(resp: Frame | None) -> None:
            client.inflight -= 1
            if resp is None:
                client.respond(stream, Error.server_error("walcar: the connection to Cassandra was lost "
                                                          "before it answered"))
            elif info is not None and resp.opcode == Opcode.ERROR and _is_unprepared(resp):
                client.spawn(stream, self._reprepare_and_retry, client, frame, info)
            else:
                client.relay(stream, resp)

        client.inflight += 1
        if conn.send(frame.opcode, frame.flags, frame.body, on_response):
            return True
        client.inflight -= 1
        return False

    async def _roundtrip(self, pool: UpstreamPool, frame: Frame) -> Frame:
        """Send a raw request and wait for its raw response."""
        conn = await pool.acquire()
        done = trio.Event()
        box: list[Frame | None] = []

        def on_response(resp: Frame | None) -> None:
            box.append(resp)
            done.set()

        if not conn.send(frame.opcode, frame.flags, frame.body, on_response):
            raise UpstreamUnavailable("no free stream on the connection to Cassandra")
        with trio.move_on_after(ROUNDTRIP_TIMEOUT):
            await done.wait()
        if not box or box[0] is None:
            raise UpstreamUnavailable("the connection to Cassandra was lost before it answered")
        return box[0]

    async def _reprepare_and_retry(self, client: Client, frame: Frame, info: PreparedInfo) -> None:
        """Cassandra forgot a statement the sidecar knows (it restarted): prepare it again, then retry once."""
        pool = self.upstream.pool(client.token, info.keyspace)
        conn = await pool.acquire()
        reply = (await conn.request(Prepare(info.query), self.upstream.request_timeout)).message
        if isinstance(reply, Error):
            client.respond(frame.stream, reply)
            return
        if not self._send(client, conn, frame, None):
            raise UpstreamUnavailable("no free stream on the connection to Cassandra")

    # --- QUERY / EXECUTE ------------------------------------------------------------

    def _on_query(self, client: Client, frame: Frame) -> None:
        # Every request is decoded in full before it goes anywhere: a malformed frame forwarded raw
        # could make Cassandra close an upstream connection other apps share.
        request = self._decode(client, frame)
        if request is None:
            return
        message: Query = request.message
        st = self.classify(message.query)
        route = route_of(st, client.keyspace)
        if route is Route.FORWARD:
            self._forward(client, frame)
        elif route is Route.LOCAL:
            self._system_query(client, frame, message.query, st.table or "")
        else:
            client.spawn(frame.stream, self._query_slow, client, frame, message, st, route)

    async def _query_slow(self, client: Client, frame: Frame, message: Query, st: Statement, route: Route) -> None:
        if route is Route.USE:
            await self._use(client, frame.stream, st.keyspace or "")
        elif route in (Route.DDL, Route.TRUNCATE):
            await self._logged(client, frame, route, message.query, st)
        else:
            plan = await self._plan_query(client, message, st, route)
            await self._apply(client, frame, plan, None)

    def _on_execute(self, client: Client, frame: Frame) -> None:
        request = self._decode(client, frame)
        if request is None:
            return
        message: Execute = request.message
        info = self.prepared.get(message.query_id)
        if info is None:
            client.respond(frame.stream, Error.unprepared(message.query_id))
            return
        route = info.route
        if route is Route.FORWARD:
            self._forward(client, frame, info)
        elif route in (Route.DDL, Route.TRUNCATE):
            client.spawn(frame.stream, self._logged, client, frame, route, info.query, info.statement)
        elif not self._journal_now(client, frame, message, info):
            client.spawn(frame.stream, self._execute_write, client, frame, message, info)

    def _lean_write(self, message: Execute, info: PreparedInfo) -> tuple[str, CqlStatement] | None:
        """(journal key, statement) of the common case — one prepared write whose partition key is
        bound — without a task or a schema lookup; None for anything else."""
        values = message.params.values or []
        if not (info.route is Route.JOURNAL and info.pk_indexes and message.params.names is None
                and len(values) == len(info.columns) and info.table is not None and info.columns):
            return None
        keyspace = info.columns[0].keyspace
        parts = [values[i] for i in info.pk_indexes]
        if not all(type(p) is bytes for p in parts):
            return None
        statement = to_cql_statement(Bound(info.query, info.statement, keyspace, info.table, values, info.types))
        return journal_key(keyspace, info.table, parts), statement

    async def _direct(self, keys: list[str]) -> bool:
        """`mode = "off"`, and every key clear of this sidecar's un-applied journaled writes (waited for
        up to the conditional wait: Ingress.direct)."""
        if not self.wait_targets or not self.ingress.wal_off(self.namespace):
            return False
        for target in self.wait_targets:
            if not await self.ingress.direct(self.namespace, target, keys, self.conditional_wait):
                return False
        return True

    def _journal_now(self, client: Client, frame: Frame, message: Execute, info: PreparedInfo) -> bool:
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
        if self.ingress.write_then(entries[0], "cql", journaled):
            return True
        client.inflight -= 1
        return False

    async def _execute_write(self, client: Client, frame: Frame, message: Execute, info: PreparedInfo) -> None:
        params = message.params
        lean = self._lean_write(message, info)
        if lean is not None:
            if await self._direct([lean[0]]):
                await self._forward_async(client, frame, info)
                return
            await self._write_entries(client, frame.stream, [(lean[0], [lean[1]])], -1, params.consistency,
                                      params.serial_consistency or 0, params.timestamp)
            return
        bound = self._bind_prepared(client, info, params.values or [], params.names)
        schema = None
        if not bound.pk_indexes:
            schema = await self._schema(client, bound.keyspace, bound.table)
        plan = _Plan([(partition_key(bound, schema), bound)], -1, params.consistency,
                     params.serial_consistency or 0, params.timestamp, info.route is Route.SYNC)
        await self._apply(client, frame, plan, info)

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

    async def _on_batch(self, client: Client, frame: Frame, message: Batch) -> None:
        if not message.statements:
            await self._forward_async(client, frame)  # nothing to journal; Cassandra's answer it is
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
                await self._forward_async(client, frame)
                return
            sync = sync or route is Route.SYNC
            bounds.append(bound)
        # Table schemas are needed for children whose partition key or types the metadata does not give.
        schemas = await self._schemas(client, {(b.keyspace, b.table) for b in bounds if not b.pk_indexes})
        keyed: list[tuple[str, Bound]] = []
        for bound in bounds:
            schema = schemas.get((bound.keyspace, bound.table))
            if schema is not None and schema.is_counter:
                sync = True
            if not bound.types:
                bound.types = marker_types(bound.statement, schemas, bound.keyspace)
            keyed.append((partition_key(bound, schema), bound))
        plan = _Plan(keyed, message.batch_type, message.consistency, message.serial_consistency or 0,
                     message.timestamp, sync)
        await self._apply(client, frame, plan, None)

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

    async def _plan_query(self, client: Client, message: Query, st: Statement, route: Route) -> _Plan:
        params = message.params
        values = positional_values(params.values or [], params.names, marker_names(st))
        children = st.statements or [st]
        tables = set()
        for child in children:
            keyspace = child.keyspace or client.keyspace
            if keyspace is None or child.table is None:
                raise MutationError(NO_KEYSPACE)
            tables.add((keyspace, child.table))
        schemas = await self._schemas(client, tables)
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
        return _Plan(items, -1, params.consistency, params.serial_consistency or 0, params.timestamp, sync)

    async def _schemas(
        self, client: Client, tables: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], TableSchema | None]:
        return {(ks, table): await self._schema(client, ks, table) for ks, table in tables}

    async def _schema(self, client: Client, keyspace: str, table: str) -> TableSchema | None:
        """The table's schema (cached); None when Cassandra cannot tell us right now.

        A table Cassandra says does not exist is refused (as Cassandra would), so a
        typo is not journaled and dead-lettered later.
        """
        known, schema = self.schemas.lookup(keyspace, table)
        if known:
            return schema
        result: Any = None
        with trio.move_on_after(SCHEMA_TIMEOUT):
            try:
                result = await self.upstream.query(client.token, columns_query(keyspace, table), SCHEMA_TIMEOUT)
            except (UpstreamUnavailable, UpstreamRejected) as exc:
                log.debug("cql_schema_unavailable", keyspace=keyspace, table=table, error=str(exc))
        if not isinstance(result, RowsResult) or result.metadata.columns is None:
            return None
        specs = result.metadata.columns
        rows = [tuple(decode_value(spec.type, cell) for spec, cell in zip(specs, row, strict=True))
                for row in result.rows]
        schema = table_schema_from_rows(keyspace, table, rows)  # type: ignore[arg-type]
        if schema is None:
            raise MutationError(f"unconfigured table {table}")
        self.schemas.put(keyspace, table, schema)
        return schema

    # --- journal / synchronous ----------------------------------------------------------

    async def _apply(self, client: Client, frame: Frame, plan: _Plan, info: PreparedInfo | None) -> None:
        if await self._direct([key for key, _ in plan.items]):
            # The WAL is switched off and no key has journaled writes still on their way: Cassandra answers.
            await self._forward_async(client, frame, info)
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
        await self._forward_async(client, frame, info)

    async def _journal(self, client: Client, stream: int, plan: _Plan) -> None:
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
        write_time = timestamp if timestamp is not None else now_us()
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
            ack = await self.ingress.write(entries[0], "cql")
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

    # --- PREPARE ---------------------------------------------------------------------

    async def _on_prepare(self, client: Client, frame: Frame, message: Prepare) -> None:
        resp = await self._roundtrip(self._pool(client), frame)
        if resp.opcode == Opcode.RESULT:
            try:
                result = decode_response(resp).message
            except CqlProtocolError:
                result = None
            if isinstance(result, PreparedResult):
                await self._remember(client, message.query, result)
        client.relay(frame.stream, resp)

    async def _remember(self, client: Client, query: str, result: PreparedResult) -> None:
        st = self.classify(query)
        route = route_of(st, client.keyspace)
        if route in (Route.LOCAL, Route.USE):
            route = Route.FORWARD  # a prepared system-table query or USE is Cassandra's to answer
        info = PreparedInfo(result.query_id, query, client.keyspace, st, route,
                            result.metadata.columns, result.metadata.pk_indexes)
        if route is Route.JOURNAL:
            if "counter" in info.types:
                info.route = Route.SYNC
            elif info.table_keyspace and info.table:
                schema = await self._schema(client, info.table_keyspace, info.table)
                if schema is not None and schema.is_counter:
                    info.route = Route.SYNC
        self.prepared.put(info)

    # --- USE, DDL, TRUNCATE ------------------------------------------------------------

    async def _use(self, client: Client, stream: int, keyspace: str) -> None:
        pool = self.upstream.pool(client.token, keyspace)
        try:
            await pool.acquire()
        except UpstreamRejected:
            self.upstream.discard(pool)
            raise
        except UpstreamUnavailable:
            if not pool.verified:  # a keyspace this sidecar has used before is accepted during an outage
                raise
        client.keyspace = keyspace
        client.pool = pool
        client.respond(stream, SetKeyspaceResult(keyspace))

    async def _logged(self, client: Client, frame: Frame, route: Route, query: str, st: Statement) -> None:
        started = trio.current_time()
        resp = await self._roundtrip(self._pool(client), frame)
        outcome = "ok"
        if resp.opcode == Opcode.ERROR:
            try:
                err = decode_response(resp).message
                outcome = err.message if isinstance(err, Error) else "error"
            except CqlProtocolError:
                outcome = "error"
        log.info(
            "cql_ddl" if route is Route.DDL else "cql_truncate",
            keyspace=st.keyspace or client.keyspace or "",
            table=st.table or "",
            object=st.object_type or "",
            user=plain_username(client.token),
            peer=client.peer,
            outcome=outcome,
            ms=round((trio.current_time() - started) * 1000, 1),
            statement=query[:300],
        )
        if route is Route.DDL and resp.opcode == Opcode.RESULT:
            self._schema_changed(resp)
            await self._await_schema_agreement(client)
        client.relay(frame.stream, resp)

    async def _await_schema_agreement(self, client: Client) -> None:
        """After DDL, wait (bounded) until the upstream's nodes report one schema version."""
        with trio.move_on_after(AGREEMENT_TIMEOUT):
            while True:
                try:
                    local = await self.upstream.query(
                        client.token, "SELECT schema_version FROM system.local WHERE key='local'")
                    peers = await self.upstream.query(client.token, "SELECT schema_version FROM system.peers")
                except (UpstreamUnavailable, UpstreamRejected):
                    return
                versions = set()
                for result in (local, peers):
                    if isinstance(result, RowsResult):
                        versions.update(row[0] for row in result.rows if row and row[0] is not None)
                if len(versions) <= 1:
                    break
                await trio.sleep(0.2)
        try:
            await self._refresh_system(client.token)
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            log.warning("cql_system_refresh_failed", error=str(exc))

    # --- system tables -------------------------------------------------------------------

    def _system_query(self, client: Client, frame: Frame, query: str, table: str) -> None:
        info = self.system
        if info is not None:
            result = answer(query, table, info, client.node)
            if result is not None:
                client.respond(frame.stream, result)
                if trio.current_time() - info.fetched_at > SYSTEM_TTL and not self._system_refreshing:
                    self._system_refreshing = True
                    self.upstream.spawn(self._refresh_quietly, client.token)
                return
        client.spawn(frame.stream, self._system_slow, client, frame, query, table)

    async def _system_slow(self, client: Client, frame: Frame, query: str, table: str) -> None:
        info = self.system
        if info is None:
            try:
                info = await self._refresh_system(client.token)
            except (UpstreamUnavailable, UpstreamRejected) as exc:
                client.respond(frame.stream, upstream_error(exc))
                return
        result = answer(query, table, info, client.node)
        if result is not None:
            client.respond(frame.stream, result)
            return
        # Not a plain projection: ask Cassandra, then make its answer describe the sidecar.
        resp = await self._roundtrip(self._pool(client), frame)
        decoded = decode_response(resp)
        if isinstance(decoded.message, RowsResult):
            body_msg = rewrite(decoded.message, table, info, client.node)
            client.respond(frame.stream, body_msg, custom_payload=decoded.custom_payload)
        else:
            client.relay(frame.stream, resp)

    async def _refresh_quietly(self, token: bytes | None) -> None:
        try:
            await self._refresh_system(token)
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            log.warning("cql_system_refresh_failed", error=str(exc))
        finally:
            self._system_refreshing = False

    async def _refresh_system(self, token: bytes | None) -> SystemInfo:
        """Read the upstream's system.local row and the peers tables' metadata."""
        asked = trio.current_time()
        async with self._system_lock:
            if self.system is not None and self.system.fetched_at >= asked:
                return self.system  # someone refreshed while we waited
            local = await self.upstream.query(token, "SELECT * FROM system.local WHERE key='local'")
            peers = await self.upstream.query(token, "SELECT * FROM system.peers LIMIT 1")
            peers_v2_columns = None
            peers_v2_error = ""
            try:
                peers_v2 = await self.upstream.query(token, "SELECT * FROM system.peers_v2 LIMIT 1")
                if isinstance(peers_v2, RowsResult):
                    peers_v2_columns = peers_v2.metadata.columns
            except UpstreamRejected as exc:
                peers_v2_error = exc.error.message
            if not isinstance(local, RowsResult) or not local.rows or local.metadata.columns is None:
                raise UpstreamUnavailable("Cassandra returned no system.local row")
            if not isinstance(peers, RowsResult) or peers.metadata.columns is None:
                raise UpstreamUnavailable("Cassandra returned no system.peers metadata")
            self.system = SystemInfo(local.metadata.columns, local.rows[0], peers.metadata.columns,
                                     peers_v2_columns, peers_v2_error, trio.current_time())
            return self.system

    # --- events ----------------------------------------------------------------------------

    def _schema_changed(self, frame: Frame) -> None:
        """Forget what a schema change may have made stale: table schemas, prepared metadata, schema_version.

        A journaled EXECUTE never reaches Cassandra, so Cassandra cannot tell the driver its prepared
        statement is stale; dropping the sidecar's copy makes the next EXECUTE answer UNPREPARED, and
        the driver re-prepares against the new schema.
        """
        self.schemas.invalidate()
        if self.system is not None:
            self.system.fetched_at = 0.0  # refresh the schema_version on the next system.local read
        try:
            change = decode_response(frame).message
        except CqlProtocolError:
            self.prepared.clear()
            return
        if isinstance(change, SchemaChangeResult | SchemaChangeEvent):
            table = change.name if change.target == "TABLE" else None
            if change.target in ("KEYSPACE", "TABLE"):
                self.prepared.forget(change.keyspace, table)
            elif change.change_type != "CREATED":  # types, functions: rare; start afresh
                self.prepared.clear()

    def _on_upstream_event(self, frame: Frame) -> None:
        """A SCHEMA_CHANGE from Cassandra: forget cached schemas, tell every app that REGISTERed."""
        self._schema_changed(frame)
        for client in list(self.clients):
            if client.registered:
                client.relay(-1, frame)


def _is_unprepared(frame: Frame) -> bool:
    try:
        message = decode_response(frame).message
    except CqlProtocolError:
        return False
    return isinstance(message, Error) and message.code == ErrorCode.UNPREPARED

