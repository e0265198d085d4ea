"""The Cassandra target: KV items in Netflix's KV shape, and journaled CQL re-executed as sent.

Every write carries the entry's `write_time` as its Cassandra write timestamp, so
applying an entry twice, or late, or out of order, ends in the same state
(last-write-wins): that is what makes drains after an outage and point-in-time
replays safe. KV statements bind the timestamp (`USING TIMESTAMP ?`); journaled CQL
is re-executed unchanged, with the timestamp sent as the request's default
timestamp (the driver asks its timestamp generator, which hands out the entry's).

KV items live in `<keyspace>.<table>` (table: the namespace name unless set):
`PRIMARY KEY (id, key)`, `value blob`; a record-level value (memcached set,
WriteToLog) is the item with key "". A touch changes only expiry, which this table
cannot do without the value: it is a no-op here (documented).

cassandra-driver is callback-based on its own threads: a round starts every run's
first statement, chains the next one of a run from the callback, and crosses back
to trio once, when the last run finished.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cassandra import (
    AlreadyExists,
    AuthenticationFailed,
    ConsistencyLevel,
    CoordinationFailure,
    InvalidRequest,
    OperationTimedOut,
    Unauthorized,
    Unavailable,
)
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, Session
from cassandra.connection import ConnectionException
from cassandra.policies import (
    DCAwareRoundRobinPolicy,
    ExponentialReconnectionPolicy,
    RoundRobinPolicy,
    TokenAwarePolicy,
)
from cassandra.protocol import (
    ConfigurationException,
    IsBootstrappingErrorMessage,
    OverloadedErrorMessage,
    SyntaxException,
)
from cassandra.query import UNSET_VALUE, BatchStatement, BatchType, BoundStatement, PreparedStatement

from sidecar.config import CassandraTarget as CassandraSettings
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome, addressed_to
from sidecar.envelope import CqlMutation, Entry, Op
from sidecar.logs import get_logger
from sidecar.tls import ClientTls
from sidecar.units import parse_hostport

log = get_logger("drain.cassandra")

IN_FLIGHT = 512  # statements one apply call keeps running at once


def classify(exc: BaseException) -> ErrorClass:
    if isinstance(exc, NoHostAvailable | ConnectionException | ConnectionError):
        return ErrorClass.UNAVAILABLE
    if isinstance(exc, InvalidRequest | SyntaxException | ConfigurationException | Unauthorized | AlreadyExists
                  | AuthenticationFailed):
        return ErrorClass.PERMANENT
    if isinstance(exc, Unavailable | OperationTimedOut | CoordinationFailure | OverloadedErrorMessage
                  | IsBootstrappingErrorMessage | TimeoutError):
        return ErrorClass.TRANSIENT
    return ErrorClass.TRANSIENT


def table_name(settings: CassandraSettings, namespace: str) -> str:
    return (settings.table or namespace).replace("-", "_")


class _Timestamps:
    """The driver's timestamp generator, handing out the write time of the entry being sent."""

    def __init__(self) -> None:
        self._local = threading.local()

    def set(self, micros: int) -> None:
        self._local.next = micros

    def __call__(self) -> int:
        return getattr(self._local, "next", None) or time.time_ns() // 1000


class CassandraTarget:
    def __init__(self, settings: CassandraSettings, namespace: str) -> None:
        self.settings = settings
        self.name = settings.name
        self.keyspace = settings.keyspace
        self.table = table_name(settings, namespace)
        self.consistency = ConsistencyLevel.name_to_value[settings.consistency]
        self.timestamps = _Timestamps()
        self.cluster: Cluster | None = None
        self.session: Session | None = None
        self._sessions: dict[str, Session] = {}
        self._prepared: dict[tuple[str, str], PreparedStatement] = {}
        self._kv: dict[str, PreparedStatement] = {}
        self._connect_lock = trio.Lock()
        self.tls = ClientTls.from_settings(f"{settings.name}.tls", settings.tls)  # a bad file fails the start

    # --- connection --------------------------------------------------------------

    def _make_cluster(self) -> Cluster:
        points = [parse_hostport(p) for p in self.settings.contact_points]
        auth = None
        if self.settings.username:
            password = Path(self.settings.password_file).read_text().strip() if self.settings.password_file else ""
            auth = PlainTextAuthProvider(self.settings.username, password)
        child = DCAwareRoundRobinPolicy(self.settings.local_dc) if self.settings.local_dc else RoundRobinPolicy()
        return Cluster(
            [host for host, _ in points],
            port=points[0][1],
            auth_provider=auth,
            protocol_version=4,
            execution_profiles={EXEC_PROFILE_DEFAULT: ExecutionProfile(
                load_balancing_policy=TokenAwarePolicy(child), request_timeout=self.settings.timeout)},
            timestamp_generator=self.timestamps,
            connect_timeout=self.settings.timeout,
            control_connection_timeout=self.settings.timeout,
            # The driver's default backs off to 10 minutes: far too slow to notice a database that came back.
            reconnection_policy=ExponentialReconnectionPolicy(0.5, 5.0),
            ssl_context=self.tls.context() if self.tls is not None else None,
        )

    def _connect_sync(self) -> None:
        cluster = self._make_cluster()
        try:
            session = cluster.connect()
            if self.settings.create_schema:
                self._create_schema(session)
        except Exception:
            cluster.shutdown()
            raise
        self.cluster, self.session = cluster, session

    def _kv_statements(self) -> dict[str, PreparedStatement]:
        """Blocking, once: the KV table's statements. A namespace used only for CQL never needs them,
        so their table may not exist (create_schema = false) without harm to anything else."""
        if not self._kv:
            assert self.session is not None
            kv = {
                "put": f"INSERT INTO {self.keyspace}.{self.table} (id, key, value) VALUES (?, ?, ?) "
                       "USING TIMESTAMP ? AND TTL ?",
                "delete_item": f"DELETE FROM {self.keyspace}.{self.table} USING TIMESTAMP ? WHERE id = ? AND key = ?",
                "delete_record": f"DELETE FROM {self.keyspace}.{self.table} USING TIMESTAMP ? WHERE id = ?",
                "get": f"SELECT key, value, TTL(value) AS ttl FROM {self.keyspace}.{self.table} WHERE id = ?",
            }
            self._kv = {name: self.session.prepare(query) for name, query in kv.items()}
        return self._kv

    def _create_schema(self, session: Session) -> None:
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {self.keyspace} WITH replication = "
            f"{{'class': 'SimpleStrategy', 'replication_factor': {self.settings.replication_factor}}}"
        )
        session.execute(
            f"CREATE TABLE IF NOT EXISTS {self.keyspace}.{self.table} "
            "(id text, key text, value blob, PRIMARY KEY (id, key))"
        )

    async def _ensure_connected(self) -> Session:
        if self.session is not None:
            return self.session
        async with self._connect_lock:
            if self.session is None:
                try:
                    await trio.to_thread.run_sync(self._connect_sync)
                except Exception as exc:
                    raise ApplyError(classify(exc), f"cannot connect to Cassandra: {exc}") from None
                log.info("cassandra_connected", target=self.name, keyspace=self.keyspace, table=self.table)
        assert self.session is not None
        return self.session

    async def start(self) -> None:
        try:
            await self._ensure_connected()
        except ApplyError as exc:  # the drain keeps probing; writes are parked in the journal meanwhile
            log.warning("cassandra_unavailable_at_start", target=self.name, error=exc.message)

    async def close(self) -> None:
        cluster, self.cluster, self.session = self.cluster, None, None
        if cluster is not None:
            await trio.to_thread.run_sync(cluster.shutdown)

    async def health(self) -> None:
        session = await self._ensure_connected()
        if self.tls is not None and self.cluster is not None:
            # the driver dials new connections with the cluster's context: rotated files reach them
            self.cluster.ssl_context = self.tls.context()
        try:
            await trio.to_thread.run_sync(lambda: session.execute("SELECT release_version FROM system.local"))
        except Exception as exc:
            raise ApplyError(classify(exc), f"Cassandra health check failed: {exc}") from None

    def wants(self, entry: Entry) -> bool:
        return addressed_to(entry, self.name)

    # --- statements ----------------------------------------------------------------

    def _session_for(self, keyspace: str) -> Session:
        """Journaled CQL may be unqualified: it runs in a session bound to its keyspace."""
        if not keyspace:
            assert self.session is not None
            return self.session
        session = self._sessions.get(keyspace)
        if session is None:
            assert self.cluster is not None
            session = self._sessions[keyspace] = self.cluster.connect(keyspace)
        return session

    def _prepare(self, keyspace: str, query: str) -> tuple[Session, PreparedStatement]:
        """Blocking on a miss: `_prepare_round` warms the cache in a worker thread first."""
        session = self._session_for(keyspace)
        statement = self._prepared.get((keyspace, query))
        if statement is None:
            statement = self._prepared[(keyspace, query)] = session.prepare(query)
        return session, statement

    def _prepare_round(self, runs: list[list[Entry]]) -> dict[tuple[int, int], ApplyError]:
        """In a worker thread: prepare every statement the round needs; failures per entry."""
        failures: dict[tuple[int, int], ApplyError] = {}
        for index, run in enumerate(runs):
            for position, entry in enumerate(run):
                if entry.op in (Op.PUT, Op.DELETE) and not self._kv:
                    try:
                        self._kv_statements()
                    except Exception as exc:
                        message = f"KV table: {type(exc).__name__}: {exc}"
                        failures[(index, position)] = ApplyError(classify(exc), message)
                    continue
                if entry.op is not Op.CQL or entry.cql is None:
                    continue
                for statement in entry.cql.statements:
                    if (statement.keyspace, statement.query) in self._prepared:
                        continue
                    try:
                        self._prepare(statement.keyspace, statement.query)
                    except Exception as exc:
                        failures[(index, position)] = ApplyError(classify(exc), f"{type(exc).__name__}: {exc}")
        return failures

    def _cql_request(self, mutation: CqlMutation) -> tuple[Session, Any]:
        bound = []
        session = None
        for statement in mutation.statements:
            session, prepared = self._prepare(statement.keyspace, statement.query)
            values: list[Any] = list(statement.values)
            for position in statement.unset:
                values[position] = UNSET_VALUE
            stmt = BoundStatement(prepared, consistency_level=mutation.consistency)
            stmt.values = values
            bound.append(stmt)
        assert session is not None
        if mutation.batch_type < 0 and len(bound) == 1:
            return session, bound[0]
        batch = BatchStatement(
            batch_type=BatchType.UNLOGGED if mutation.batch_type == 1 else BatchType.LOGGED,
            consistency_level=mutation.consistency,
        )
        for stmt in bound:
            batch.add(stmt)
        return session, batch

    def _request(self, entry: Entry, now: float) -> tuple[Session, Any, Any] | None:
        """(session, statement, parameters) for an entry, or None when it is a no-op here."""
        session = self.session
        assert session is not None
        if entry.op is Op.PUT:
            if entry.expires_at and entry.expires_at <= now:
                return session, self._kv["delete_item"], (entry.write_time, entry.key, entry.item)
            ttl = int(entry.expires_at - now) if entry.expires_at else 0
            return session, self._kv["put"], (entry.key, entry.item, entry.value or b"", entry.write_time, ttl)
        if entry.op is Op.DELETE:
            if entry.item:
                return session, self._kv["delete_item"], (entry.write_time, entry.key, entry.item)
            return session, self._kv["delete_record"], (entry.write_time, entry.key)
        if entry.op is Op.CQL and entry.cql is not None:
            cql_session, statement = self._cql_request(entry.cql)
            return cql_session, statement, None
        return None  # touch: expiry only, nothing to do in this table

    # --- apply -----------------------------------------------------------------------

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        """Every entry of every run in flight at once (at most IN_FLIGHT statements).

        Order inside a run does not matter here: each write carries its entry's write time,
        so Cassandra keeps the last one whatever order they land in. A run counts as applied
        up to its first failure; entries after it that did land are applied again on the
        retry, which changes nothing (same values, same timestamps)."""
        try:
            await self._ensure_connected()
        except ApplyError as exc:
            return [RunOutcome(0, exc) for _ in runs]
        if not runs:
            return []
        failures: dict[tuple[int, int], ApplyError] = {}
        if any(entry.op is Op.CQL or (entry.op in (Op.PUT, Op.DELETE) and not self._kv)
               for run in runs for entry in run):
            failures = await trio.to_thread.run_sync(self._prepare_round, runs)
        now = time.time()
        pending: deque[tuple[int, int, int, Any]] = deque()
        for index, run in enumerate(runs):
            for position, entry in enumerate(run):
                if (index, position) in failures:
                    continue
                try:
                    request = self._request(entry, now)
                except Exception as exc:  # building it failed: the statement itself is the problem
                    failures[(index, position)] = ApplyError(classify(exc), f"{type(exc).__name__}: {exc}")
                    continue
                if request is not None:  # None: nothing to do here (a touch)
                    pending.append((index, position, entry.write_time, request))
        await self._send_all(pending, failures)
        outcomes = []
        for index, run in enumerate(runs):
            first = next(((p, failures[(index, p)]) for p in range(len(run)) if (index, p) in failures), None)
            outcomes.append(RunOutcome(len(run)) if first is None else RunOutcome(first[0], first[1]))
        return outcomes

    async def _send_all(self, pending: deque[tuple[int, int, int, Any]],
                        failures: dict[tuple[int, int], ApplyError]) -> None:
        """Keep up to IN_FLIGHT statements running on the driver's threads; one crossing back at the end."""
        if not pending:
            return
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        lock = threading.Lock()
        state = {"running": 0}

        def start_next() -> None:
            while True:
                with lock:
                    if not pending:
                        if state["running"] == 0:
                            try:
                                token.run_sync_soon(done.set)
                            except trio.RunFinishedError:
                                pass
                        return
                    if state["running"] >= IN_FLIGHT:
                        return
                    index, position, write_time, (session, statement, parameters) = pending.popleft()
                    state["running"] += 1
                self.timestamps.set(write_time)  # journaled CQL goes with its entry's write time
                try:
                    future = session.execute_async(statement, parameters)
                except Exception as exc:
                    landed(exc, index, position)
                    continue
                future.add_callbacks(landed_ok, landed, callback_args=(index, position),
                                     errback_args=(index, position))

        def landed_ok(_: object, index: int, position: int) -> None:
            with lock:
                state["running"] -= 1
            start_next()

        def landed(exc: BaseException, index: int, position: int) -> None:
            failures[(index, position)] = ApplyError(classify(exc), f"{type(exc).__name__}: {exc}")
            with lock:
                state["running"] -= 1
            start_next()

        start_next()
        await done.wait()

    # --- reads (GET /v1/kv through the primary target) -----------------------------

    async def get_items(self, record: str, items: list[str] | None = None) -> list[tuple[str, bytes, int]]:
        """(item key, value, expires_at) of a record, read at the target's consistency."""
        session = await self._ensure_connected()
        try:
            statements = await trio.to_thread.run_sync(self._kv_statements)
        except Exception as exc:
            raise ApplyError(classify(exc), f"KV table: {exc}") from None
        statement = statements["get"].bind((record,))
        statement.consistency_level = self.consistency
        rows = await _to_trio(session.execute_async(statement))
        now = int(time.time())
        wanted = set(items) if items else None
        return [(row.key, row.value, now + row.ttl if row.ttl else 0) for row in rows
                if wanted is None or row.key in wanted]


async def _to_trio(future: Any) -> Any:
    """Await a driver ResponseFuture from trio (one crossing back)."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    box: dict[str, Any] = {}

    def settle(key: str) -> Callable[[Any], None]:
        def callback(value: Any) -> None:
            box[key] = value
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        return callback

    future.add_callbacks(settle("rows"), settle("error"))
    await done.wait()
    if "error" in box:
        raise ApplyError(classify(box["error"]), f"{type(box['error']).__name__}: {box['error']}")
    return box["rows"]
