"""The CQL front's request handling: what happens to each frame an app sends.

:class:`CqlProxy` routes each request frame; the work is done by one part per concern:

- :mod:`.handshake`: OPTIONS, STARTUP (compression) and the SASL exchange;
  credentials are checked by opening an upstream connection with them.
- :mod:`.forwarding`: SELECTs and everything the sidecar does not interpret go to
  Cassandra as raw frames over pooled upstream connections (:mod:`.upstream`).
- :mod:`.writes`: INSERT / UPDATE / DELETE / BATCH are journaled and answered from
  the journal; LWT and counter writes go to Cassandra synchronously.
- :mod:`.catalog`: ``system.local`` / ``system.peers(_v2)`` answered from a cached
  copy, table schemas, DDL / TRUNCATE (synchronous, logged, schema agreement),
  schema-change events.

The hot paths (forwarding a SELECT, journaling a prepared write) are decided
synchronously in :meth:`CqlProxy.handle` from a peek at the frame body; only
work that must wait spawns a task.
"""

from __future__ import annotations

from sidecar.config import CassandraTarget, Config, Listener
from sidecar.ingress import Ingress
from sidecar.tls import ClientTls
from sidecar.units import parse_hostport

from .catalog import Catalog
from .forwarding import Forwarder
from .frames import Frame, Opcode
from .handshake import Handshake
from .messages import (
    Batch,
    Error,
    Execute,
    Prepare,
    PreparedResult,
    Query,
    Ready,
    Register,
    SetKeyspaceResult,
    decode_response,
)
from .prepared import PreparedCache, PreparedInfo
from .routing import ClassifyCache, Route, route_of
from .session import READY_STATE, Client
from .statements import Statement
from .system_tables import LocalNode, host_id_for
from .types import CqlProtocolError
from .upstream import Upstream, UpstreamRejected, UpstreamUnavailable
from .writes import NO_KEYSPACE, Writes

__all__ = ["NO_KEYSPACE", "CqlProxy"]


class CqlProxy:
    """Everything a CQL listener shares between its app connections."""

    def __init__(self, listener: Listener, ingress: Ingress, config: Config) -> None:
        if listener.namespace is None:
            raise ValueError("a cql listener needs a namespace")
        self.listener = listener
        self.namespace = listener.namespace
        ns = config.namespaces[self.namespace]
        cassandra = [t for t in ns.targets if isinstance(t, CassandraTarget)]
        upstream = listener.upstream or (cassandra[0].contact_points if cassandra else [])
        tls = listener.upstream_tls or (cassandra[0].tls if cassandra else None)
        self.upstream = Upstream([parse_hostport(a) for a in upstream],
                                 tls=ClientTls.from_settings(f"listeners.{listener.bind}.upstream_tls", tls))
        self.host_id = host_id_for(listener.bind)
        self.prepared = PreparedCache()
        self.classify = ClassifyCache()
        self.clients: set[Client] = set()
        self.handshake = Handshake(self.upstream)
        self.forwarder = Forwarder(self.upstream)
        self.catalog = Catalog(self.upstream, self.forwarder, self.prepared, self.clients)
        self.schemas = self.catalog.schemas
        self.upstream.on_event = self.catalog.on_upstream_event
        self.writes = Writes(
            self.namespace, ingress,
            wait_targets=[t.name for t in cassandra] or [t.name for t in ns.targets],
            conditional_wait=max((float(t.timeout) for t in cassandra), default=5.0),
            forwarder=self.forwarder, catalog=self.catalog, prepared=self.prepared, classify=self.classify,
        )

    def local_node(self, address: str, port: int) -> LocalNode:
        return LocalNode(address, port, self.listener.data_center, self.listener.rack, self.host_id)

    # --- dispatch ----------------------------------------------------------------

    def handle(self, client: Client, frame: Frame) -> None:
        """One request frame from an app (synchronous: slow paths spawn a task)."""
        op = frame.opcode
        if client.state != READY_STATE:
            self.handshake.handle(client, frame)
        elif op == Opcode.EXECUTE:
            self._on_execute(client, frame)
        elif op == Opcode.QUERY:
            self._on_query(client, frame)
        elif op == Opcode.BATCH:
            request = client.decode(frame)
            if request is not None:
                assert isinstance(request.message, Batch)
                client.spawn(frame.stream, self.writes.on_batch, client, frame, request.message)
        elif op == Opcode.PREPARE:
            request = client.decode(frame)
            if request is not None:
                assert isinstance(request.message, Prepare)
                client.spawn(frame.stream, self._on_prepare, client, frame, request.message)
        elif op == Opcode.OPTIONS:
            if client.decode(frame) is not None:
                client.respond(frame.stream, self.handshake.supported())
        elif op == Opcode.REGISTER:
            request = client.decode(frame)
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
            client.decode(frame)  # answers the ProtocolError (unknown opcode, wrong direction)

    # --- QUERY / EXECUTE ------------------------------------------------------------

    def _on_query(self, client: Client, frame: Frame) -> None:
        request = client.decode(frame)
        if request is None:
            return
        message = request.message
        assert isinstance(message, Query)
        st = self.classify(message.query)
        route = route_of(st, client.keyspace)
        if route is Route.FORWARD:
            self.forwarder.forward(client, frame)
        elif route is Route.LOCAL:
            self.catalog.system_query(client, frame, message.query, st.table or "")
        else:
            client.spawn(frame.stream, self._query_slow, client, frame, message, st, route)

    async def _query_slow(self, client: Client, frame: Frame, message: Query, st: Statement, route: Route) -> None:
        if route is Route.USE:
            await self._use(client, frame.stream, st.keyspace or "")
        elif route in (Route.DDL, Route.TRUNCATE):
            await self.catalog.logged(client, frame, route, message.query, st)
        else:
            plan = await self.writes.plan_query(client, message, st, route)
            await self.writes.apply(client, frame, plan, None)

    def _on_execute(self, client: Client, frame: Frame) -> None:
        request = client.decode(frame)
        if request is None:
            return
        message = request.message
        assert isinstance(message, Execute)
        info = self.prepared.get(message.query_id)
        if info is None:
            client.respond(frame.stream, Error.unprepared(message.query_id))
            return
        route = info.route
        if route is Route.FORWARD:
            self.forwarder.forward(client, frame, info)
        elif route in (Route.DDL, Route.TRUNCATE):
            client.spawn(frame.stream, self.catalog.logged, client, frame, route, info.query, info.statement)
        elif not self.writes.journal_now(client, frame, message, info):
            client.spawn(frame.stream, self.writes.execute_write, client, frame, message, info)

    # --- PREPARE ---------------------------------------------------------------------

    async def _on_prepare(self, client: Client, frame: Frame, message: Prepare) -> None:
        resp = await self.forwarder.roundtrip(self.forwarder.pool(client), frame)
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
                schema = await self.catalog.schema(client, info.table_keyspace, info.table)
                if schema is not None and schema.is_counter:
                    info.route = Route.SYNC
        self.prepared.put(info)

    # --- USE -------------------------------------------------------------------------

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
