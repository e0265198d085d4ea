"""Pooled native-protocol connections from the sidecar to Cassandra.

Many app connections share few upstream connections: every forwarded request
gets a free stream id on an upstream connection, and the response is routed
back to the app's connection under the app's own stream id (frames are relayed
as raw bodies, never re-encoded, so paging state, warnings and tracing ids pass
through untouched).

Pools are keyed by (credentials, keyspace).  Credentials: each app's own
(the SASL token it sent the sidecar) -- so Cassandra keeps authorizing every
read and pass-through statement as that app, and the sidecar never widens what
an app may see.  Keyspace: protocol v4 has no per-request keyspace, so a
connection's keyspace (``USE``) is connection state; apps on different
keyspaces use different pools.  Prepared ids are per Cassandra node, not per
connection, so an EXECUTE may use any pool.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from sidecar.logs import get_logger
from sidecar.tls import ClientTls, explain

from .frames import Frame
from .messages import (
    Authenticate,
    AuthResponse,
    AuthSuccess,
    Error,
    ErrorCode,
    Options,
    Query,
    QueryParameters,
    Ready,
    Register,
    ResultMessage,
    SetKeyspaceResult,
    Startup,
    Supported,
)
from .types import Consistency, quote_identifier
from .upstream_connection import (
    UpstreamConnection,
    UpstreamRejected,
    UpstreamUnavailable,
    credential_key,
    plain_username,
)

__all__ = [
    "Upstream",
    "UpstreamConnection",
    "UpstreamPool",
    "UpstreamRejected",
    "UpstreamUnavailable",
    "credential_key",
    "plain_username",
]

log = get_logger("cql.upstream")

GROW_AT: Final = 64  # in-flight requests on the least busy connection before the pool opens another
RETRY_AFTER: Final = 1.0  # after a failed connect, fail fast for this long instead of dialing again
AUTH_GRACE: Final = 900.0  # credentials verified this recently are accepted while Cassandra is unreachable
MAX_POOLS: Final = 64
CQL_VERSION: Final = "3.0.0"  # any 3.x Cassandra accepts; the app's own STARTUP never reaches Cassandra

_UNKNOWN: Final[Any] = object()


class UpstreamPool:
    """Connections sharing one (credentials, keyspace); opened on demand, grown under load."""

    def __init__(self, upstream: Upstream, token: bytes | None, keyspace: str | None, max_size: int) -> None:
        self.upstream = upstream
        self.token = token
        self.keyspace = keyspace
        self.max_size = max_size
        self.conns: list[UpstreamConnection] = []
        self.verified = False  # a connection with these credentials and keyspace once succeeded
        self.evicted = False  # dropped by the Upstream: holders must look the pool up again
        self.last_used = trio.current_time()
        self._opening = 0
        self._open_done: trio.Event | None = None
        self._failure: Exception | None = None
        self._failed_at = -math.inf

    @property
    def inflight(self) -> int:
        return sum(c.inflight for c in self.conns)

    def pick(self) -> UpstreamConnection | None:
        """The least busy live connection, or None; starts growing the pool when it is busy."""
        best: UpstreamConnection | None = None
        dead = False
        for conn in self.conns:
            if conn.closed:
                dead = True
            elif conn.free and (best is None or conn.inflight < best.inflight):
                best = conn
        if dead:
            self.conns = [c for c in self.conns if not c.closed]
        if best is not None:
            self.last_used = trio.current_time()
            if best.inflight >= GROW_AT and len(self.conns) + self._opening < self.max_size:
                self._opening += 1  # counted now, so one burst starts one connection, not one per request
                self.upstream.spawn(self._grow)
        return best

    async def acquire(self) -> UpstreamConnection:
        """A live connection, opening one if needed; raises UpstreamUnavailable / UpstreamRejected."""
        while True:
            conn = self.pick()
            if conn is not None:
                return conn
            if self._open_done is not None:
                await self._open_done.wait()
                if self._failure is not None and not self.live():
                    raise self._failure
                continue
            if self._failure is not None and trio.current_time() - self._failed_at < RETRY_AFTER:
                raise self._failure
            self._open_done = trio.Event()
            try:
                await self._open_one()
            finally:
                done, self._open_done = self._open_done, None
                done.set()

    def live(self) -> bool:
        return any(not c.closed for c in self.conns)

    async def _open_one(self, counted: bool = False) -> None:
        if not counted:
            self._opening += 1
        try:
            conn = await self.upstream.open_connection(self.token, self.keyspace)
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            self._failure = exc
            self._failed_at = trio.current_time()
            raise
        finally:
            self._opening -= 1
        self._failure = None
        self.verified = True
        self.conns.append(conn)

    async def _grow(self) -> None:
        try:
            await self._open_one(counted=True)
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            log.warning("upstream_pool_grow_failed", error=str(exc))

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns = []


class Upstream:
    """The Cassandra cluster behind a CQL listener: pools, the auth probe, and schema events.

    ``run`` owns the tasks of every upstream connection; start it before use.
    """

    def __init__(
        self,
        contact_points: list[tuple[str, int]],
        *,
        pool_size: int = 2,
        connect_timeout: float = 5.0,
        request_timeout: float = 12.0,
        tls: ClientTls | None = None,
    ) -> None:
        if not contact_points:
            raise ValueError("a CQL listener needs at least one upstream contact point")
        self.contact_points = contact_points
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.tls = tls  # asked at each dial: rotated files reach new connections
        self.on_event: Callable[[Frame], None] = lambda frame: None
        self.supported: dict[str, list[str]] = {}
        self._authenticator: Any = _UNKNOWN  # None: no auth; str: the authenticator class
        self._probe_lock = trio.Lock()
        self._pools: dict[tuple[bytes | None, str | None], UpstreamPool] = {}
        self._verified: dict[bytes | None, float] = {}
        self._event_token: bytes | None = None
        self._events_started = False
        self._nursery: trio.Nursery | None = None

    # --- lifecycle ------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._probe_quietly)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for pool in self._pools.values():
                pool.close()

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    # --- connections -----------------------------------------------------------

    async def _dial(self) -> tuple[trio.abc.Stream, str]:
        errors = []
        for host, port in self.contact_points:
            try:
                with trio.fail_after(self.connect_timeout):
                    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
                    if self.tls is not None:
                        stream = await self._start_tls(stream, host)
                    return stream, f"{host}:{port}"
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                reason = explain(exc, "the cassandra target's tls") if self.tls is not None else str(exc)
                errors.append(f"{host}:{port}: {reason or 'connect timed out'}")
        raise UpstreamUnavailable("cannot reach Cassandra (" + "; ".join(errors) + ")")

    async def _start_tls(self, stream: trio.abc.Stream, host: str) -> trio.abc.Stream:
        assert self.tls is not None
        ssl_stream = trio.SSLStream(stream, self.tls.context(), server_hostname=host)
        try:
            await ssl_stream.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return ssl_stream

    async def open_connection(self, token: bytes | None, keyspace: str | None) -> UpstreamConnection:
        """A handshaken connection (STARTUP, SASL with the app's token, USE keyspace)."""
        if self._nursery is None:
            raise UpstreamUnavailable("the CQL listener is shutting down")
        stream, address = await self._dial()
        conn = UpstreamConnection(stream, address, self.on_event)
        self._nursery.start_soon(conn.run)
        try:
            await self._handshake(conn, token, keyspace)
        except BaseException:
            conn.close()
            raise
        log.debug("upstream_connected", address=address, keyspace=keyspace or "", user=plain_username(token))
        return conn

    async def _handshake(self, conn: UpstreamConnection, token: bytes | None, keyspace: str | None) -> None:
        timeout = self.request_timeout
        reply = (await conn.request(Startup({"CQL_VERSION": CQL_VERSION}), timeout)).message
        if isinstance(reply, Authenticate):
            if token is None:
                raise UpstreamRejected(Error(ErrorCode.BAD_CREDENTIALS, "Cassandra requires authentication"))
            reply = (await conn.request(AuthResponse(token), timeout)).message
            if not isinstance(reply, AuthSuccess):
                if isinstance(reply, Error):
                    raise UpstreamRejected(reply)
                raise UpstreamRejected(Error(ErrorCode.BAD_CREDENTIALS,
                                             "walcar supports single-step SASL (PLAIN) authentication only"))
            self._verified[credential_key(token)] = trio.current_time()
        elif isinstance(reply, Error):
            raise UpstreamRejected(reply)
        elif not isinstance(reply, Ready):
            raise UpstreamUnavailable(f"unexpected answer to STARTUP: {type(reply).__name__}")
        if keyspace is not None:
            use = Query(f"USE {quote_identifier(keyspace)}", QueryParameters(Consistency.ONE))
            reply = (await conn.request(use, timeout)).message
            if isinstance(reply, Error):
                raise UpstreamRejected(reply)
            if not isinstance(reply, SetKeyspaceResult):
                raise UpstreamUnavailable(f"unexpected answer to USE: {type(reply).__name__}")

    def pool(self, token: bytes | None, keyspace: str | None) -> UpstreamPool:
        key = (credential_key(token), keyspace)
        pool = self._pools.get(key)
        if pool is None:
            if len(self._pools) >= MAX_POOLS:
                self._evict()
            pool = self._pools[key] = UpstreamPool(self, token, keyspace, self.pool_size)
        return pool

    def discard(self, pool: UpstreamPool) -> None:
        """Forget a pool that never worked (bad credentials, unknown keyspace), so failures do not pile up."""
        if not pool.verified and not pool.conns:
            self._pools = {k: p for k, p in self._pools.items() if p is not pool}

    def _evict(self) -> None:
        idle = [p for p in self._pools.values() if p.inflight == 0]
        if not idle:
            return
        victim = min(idle, key=lambda p: p.last_used)
        victim.evicted = True
        victim.close()
        self._pools = {k: p for k, p in self._pools.items() if p is not victim}

    # --- auth ------------------------------------------------------------------

    async def _probe_quietly(self) -> None:
        try:
            await self.authenticator()
        except UpstreamUnavailable as exc:
            log.warning("upstream_probe_failed", error=str(exc))

    @property
    def authenticator_known(self) -> bool:
        return self._authenticator is not _UNKNOWN

    @property
    def cached_authenticator(self) -> str | None:
        """The probed authenticator; only meaningful when ``authenticator_known``."""
        return None if self._authenticator is _UNKNOWN else self._authenticator

    async def authenticator(self) -> str | None:
        """The upstream's authenticator class (None: no auth), learnt once by a bare STARTUP."""
        if self._authenticator is not _UNKNOWN:
            return self._authenticator
        async with self._probe_lock:
            if self._authenticator is not _UNKNOWN:
                return self._authenticator
            stream, address = await self._dial()
            conn = UpstreamConnection(stream, address, lambda frame: None)
            if self._nursery is None:
                raise UpstreamUnavailable("the CQL listener is shutting down")
            self._nursery.start_soon(conn.run)
            try:
                supported = (await conn.request(Options(), self.request_timeout)).message
                if isinstance(supported, Supported):
                    self.supported = supported.options
                reply = (await conn.request(Startup({"CQL_VERSION": CQL_VERSION}), self.request_timeout)).message
            finally:
                conn.close()
            if isinstance(reply, Authenticate):
                self._authenticator = reply.authenticator
            elif isinstance(reply, Ready):
                self._authenticator = None
            else:
                raise UpstreamUnavailable(f"unexpected answer to STARTUP: {reply}")
            log.info("upstream_probed", address=address, authenticator=self._authenticator or "none",
                     cql_versions=",".join(self.supported.get("CQL_VERSION", [])))
            return self._authenticator

    async def verify(self, token: bytes) -> None:
        """Check credentials against Cassandra (a pool connection opened with them).

        While Cassandra is unreachable, credentials verified within AUTH_GRACE are
        accepted, so apps can reconnect to the sidecar during an outage.
        """
        pool = self.pool(token, None)
        if pool.pick() is not None:
            return
        try:
            await pool.acquire()
        except UpstreamRejected:
            self.discard(pool)
            raise
        except UpstreamUnavailable:
            verified_at = self._verified.get(credential_key(token))
            if verified_at is not None and trio.current_time() - verified_at < AUTH_GRACE:
                log.warning("cql_auth_from_cache", user=plain_username(token))
                return
            raise

    # --- the sidecar's own queries -----------------------------------------------

    async def query(self, token: bytes | None, cql: str, timeout: float | None = None) -> ResultMessage:
        """Run a query of the sidecar's own (system tables, schema) with the app's credentials."""
        conn = await self.pool(token, None).acquire()
        reply = (await conn.request(Query(cql, QueryParameters(Consistency.ONE)),
                                    timeout or self.request_timeout)).message
        if isinstance(reply, Error):
            raise UpstreamRejected(reply)
        return reply  # type: ignore[return-value]

    # --- schema events -------------------------------------------------------------

    def subscribe_events(self, token: bytes | None) -> None:
        """Keep one upstream connection REGISTERed for SCHEMA_CHANGE (with the latest app's credentials)."""
        self._event_token = token
        if not self._events_started and self._nursery is not None:
            self._events_started = True
            self._nursery.start_soon(self._event_loop)

    async def _event_loop(self) -> None:
        backoff = 0.5
        while True:
            try:
                conn = await self.open_connection(self._event_token, None)
                try:
                    reply = (await conn.request(Register(["SCHEMA_CHANGE"]), self.request_timeout)).message
                    if isinstance(reply, Error):
                        raise UpstreamRejected(reply)
                    log.info("upstream_events_registered", address=conn.address)
                    backoff = 0.5
                    await conn.closed_event.wait()
                finally:
                    conn.close()
            except (UpstreamUnavailable, UpstreamRejected) as exc:
                log.warning("upstream_events_unavailable", error=str(exc), retry_in=backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
