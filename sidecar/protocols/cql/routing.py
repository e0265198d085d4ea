"""Where a request goes: answered locally, forwarded, journaled, or sent to Cassandra synchronously.

Sans-I/O: the decision is a pure function of the statement's classification
(:func:`~.statements.classify`) and the connection's keyspace, so it is unit
tested on strings.  The proxy looks at as little of a request as it can: the
``peek_*`` helpers read the query string or prepared id straight out of a frame
body, so a forwarded SELECT is never fully decoded.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from enum import StrEnum
from typing import Final

from .classifier import classify
from .statements import Statement, StatementKind, is_system_keyspace

__all__ = [
    "SYSTEM_TABLES",
    "ClassifyCache",
    "Route",
    "route_of",
]

# Answered by the sidecar itself, so a driver sees exactly one host: the sidecar.
SYSTEM_TABLES: Final = frozenset({"local", "peers", "peers_v2"})


class Route(StrEnum):
    LOCAL = "local"  # system.local / system.peers(_v2): synthesized by the sidecar
    FORWARD = "forward"  # reads, schema tables, anything the sidecar does not interpret
    JOURNAL = "journal"  # INSERT / UPDATE / DELETE / BATCH: journaled, acked after the journal
    SYNC = "sync"  # LWT and counters: results depend on state, so Cassandra answers them
    TRUNCATE = "truncate"  # synchronous and logged
    DDL = "ddl"  # synchronous, logged, followed by a schema-agreement wait
    USE = "use"  # per-connection keyspace


_WRITES: Final = frozenset({StatementKind.INSERT, StatementKind.UPDATE, StatementKind.DELETE, StatementKind.BATCH})


def route_of(st: Statement, keyspace: str | None = None) -> Route:
    """The route of a classified statement on a connection whose keyspace is ``keyspace``.

    A write the classifier could not parse is forwarded as is (Cassandra will
    answer it, or reject it with its own syntax error) rather than journaled on
    a guess.  Writes to system keyspaces are forwarded: they are Cassandra's
    own bookkeeping, not application data.
    """
    kind = st.kind
    # A write whose table names no keyspace lands in the connection's (USE): a system one makes it
    # Cassandra's own bookkeeping, never something the drain should run under its identity.
    on_system = is_system_keyspace(keyspace.lower() if keyspace else None)
    if kind == StatementKind.SELECT:
        if st.table in SYSTEM_TABLES and (st.keyspace or keyspace) == "system" and st.error is None:
            return Route.LOCAL
        return Route.FORWARD
    if kind in _WRITES:
        if st.error is not None or st.is_system or on_system:
            return Route.FORWARD
        if st.conditional or st.counter_update or st.batch_type == "COUNTER":
            return Route.SYNC
        return Route.JOURNAL
    if kind == StatementKind.USE:
        return Route.USE if st.error is None else Route.FORWARD
    if kind == StatementKind.TRUNCATE:
        return Route.TRUNCATE
    if kind == StatementKind.DDL:
        return Route.DDL
    return Route.FORWARD


class ClassifyCache:
    """An LRU of :func:`classify` results: drivers send the same statement texts over and over."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._cache: OrderedDict[str, Statement] = OrderedDict()

    def __call__(self, query: str) -> Statement:
        cache = self._cache
        st = cache.get(query)
        if st is not None:
            cache.move_to_end(query)
            return st
        st = classify(query)
        cache[query] = st
        if len(cache) > self.size:
            cache.popitem(last=False)
        return st


_REPLICABLE: Final = frozenset({StatementKind.INSERT, StatementKind.UPDATE, StatementKind.DELETE})
_KEYSPACE_RE: Final = re.compile(r"[A-Za-z0-9_]{1,48}")  # Cassandra's own limit for keyspace names


def unreplicable_reason(query: str, keyspace: str | None) -> str | None:
    """Why a journaled CQL statement from another region must not be executed here, or None.

    Only what this front itself journals is accepted: a plain INSERT, UPDATE or DELETE on an
    application keyspace. DDL, TRUNCATE, GRANT, conditional and counter writes, system keyspaces
    and text the classifier cannot read never arrive through a journal, so none may be replayed
    with the drain's credentials. A statement's own `USING TIMESTAMP` is refused too: the entry's
    write time (checked against the namespace's drift) is the one Cassandra must use."""
    if keyspace is not None and not _KEYSPACE_RE.fullmatch(keyspace):
        return "keyspace must be a plain CQL identifier"
    st = classify(query)
    if st.kind not in _REPLICABLE:
        return f"{st.kind.value} statements are not journaled by walcar"
    if route_of(st, keyspace) != Route.JOURNAL:
        return "conditional, counter, system-keyspace or unparsable writes are not journaled by walcar"
    if st.has_timestamp:
        return "USING TIMESTAMP is not accepted from another region: the entry's write_time is used"
    return None
