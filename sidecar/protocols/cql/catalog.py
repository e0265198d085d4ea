"""What the sidecar knows about the upstream's schema and system tables, and keeps current.

- ``system.local`` / ``system.peers(_v2)`` are answered from a cached copy of the
  upstream's rows (:mod:`.system_tables`), so the driver sees one host.
- Table schemas (partition key, counter tables) are read from ``system_schema``
  and cached (:mod:`.schema`); a write to a table Cassandra does not know is refused.
- DDL and TRUNCATE go to Cassandra synchronously and are logged; after DDL the
  sidecar waits for the upstream's nodes to agree on the schema.
- A schema change (answered DDL, or Cassandra's SCHEMA_CHANGE event) forgets
  cached schemas and prepared metadata, and reaches every app that REGISTERed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import trio

from sidecar.logs import get_logger

from .forwarding import Forwarder
from .frames import Frame, Opcode
from .messages import Error, RowsResult, SchemaChangeEvent, SchemaChangeResult, decode_response
from .mutations import MutationError
from .prepared import PreparedCache
from .routing import Route
from .schema import SchemaCache, TableSchema, columns_query, table_schema_from_rows
from .session import Client, upstream_error
from .statements import Statement
from .system_tables import SystemInfo, answer, rewrite
from .types import CqlProtocolError
from .upstream import Upstream, UpstreamRejected, UpstreamUnavailable, plain_username
from .values import decode_value

__all__ = ["Catalog"]

log = get_logger("cql")

SYSTEM_TTL: Final = 30.0  # seconds a cached copy of the upstream's system.local is served before a refresh
SCHEMA_TIMEOUT: Final = 2.0  # a write waits at most this long for a table's schema (then keys by table)
AGREEMENT_TIMEOUT: Final = 10.0  # after DDL: wait for the upstream's nodes to agree on the schema


class Catalog:
    """Schema and system-table state shared by a listener's app connections."""

    def __init__(self, upstream: Upstream, forwarder: Forwarder, prepared: PreparedCache,
                 clients: set[Client]) -> None:
        self.upstream = upstream
        self.forwarder = forwarder
        self.prepared = prepared
        self.clients = clients
        self.schemas = SchemaCache()
        self.system: SystemInfo | None = None
        self._system_lock = trio.Lock()
        self._system_refreshing = False

    # --- table schemas -------------------------------------------------------------------

    async def schemas_of(
        self, client: Client, tables: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], TableSchema | None]:
        return {(ks, table): await self.schema(client, ks, table) for ks, table in tables}

    async def schema(self, client: Client, keyspace: str, table: str) -> TableSchema | None:
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
        schema = table_schema_from_rows(keyspace, table, rows)
        if schema is None:
            raise MutationError(f"unconfigured table {table}")
        self.schemas.put(keyspace, table, schema)
        return schema

    # --- DDL, TRUNCATE -------------------------------------------------------------------

    async def logged(self, client: Client, frame: Frame, route: Route, query: str, st: Statement) -> None:
        started = trio.current_time()
        resp = await self.forwarder.roundtrip(self.forwarder.pool(client), frame)
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
            self.schema_changed(resp)
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
                versions: set[object] = set()
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

    def system_query(self, client: Client, frame: Frame, query: str, table: str) -> None:
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
        resp = await self.forwarder.roundtrip(self.forwarder.pool(client), frame)
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

    # --- schema changes ------------------------------------------------------------------

    def schema_changed(self, frame: Frame) -> None:
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

    def on_upstream_event(self, frame: Frame) -> None:
        """A SCHEMA_CHANGE from Cassandra: forget cached schemas, tell every app that REGISTERed."""
        self.schema_changed(frame)
        for client in list(self.clients):
            if client.registered:
                client.relay(-1, frame)
