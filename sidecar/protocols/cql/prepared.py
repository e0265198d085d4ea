"""The proxy's prepared-statement cache: what an EXECUTE means without asking Cassandra.

PREPARE is forwarded and Cassandra's answer kept here, keyed by the prepared id
Cassandra chose (an md5 of keyspace + query, stable across restarts), so the id
travels to the client unchanged.  An EXECUTE of an id the cache does not hold is
answered UNPREPARED with that id: the driver re-prepares, which refills the cache
(the sidecar restarted, or the entry was evicted).
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from .messages import ColumnSpec
from .routing import Route
from .statements import Statement

__all__ = ["PreparedCache", "PreparedInfo"]


class PreparedInfo(msgspec.Struct):
    query_id: bytes
    query: str
    keyspace: str | None  # the connection's keyspace when it was prepared
    statement: Statement
    route: Route
    columns: list[ColumnSpec]  # one per bind marker, in order
    pk_indexes: list[int]
    types: list[str] = msgspec.field(default_factory=list)
    names: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        self.types = [c.type.cql_name() for c in self.columns]
        self.names = [c.name for c in self.columns]

    @property
    def table_keyspace(self) -> str | None:
        """The keyspace of the table the statement writes (what its bind metadata says, else the text)."""
        if self.columns:
            return self.columns[0].keyspace
        return self.statement.keyspace or self.keyspace

    @property
    def table(self) -> str | None:
        if self.columns:
            return self.columns[0].table
        return self.statement.table


class PreparedCache:
    """Bounded LRU of :class:`PreparedInfo` by prepared id."""

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self._cache: OrderedDict[bytes, PreparedInfo] = OrderedDict()

    def get(self, query_id: bytes) -> PreparedInfo | None:
        info = self._cache.get(query_id)
        if info is not None:
            self._cache.move_to_end(query_id)
        return info

    def put(self, info: PreparedInfo) -> None:
        self._cache[info.query_id] = info
        self._cache.move_to_end(info.query_id)
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)

    def clear(self) -> None:
        self._cache.clear()

    def forget(self, keyspace: str, table: str | None = None) -> None:
        """Drop statements on a table (or a whole keyspace) whose schema changed."""
        stale = [
            qid for qid, info in self._cache.items()
            if info.table_keyspace == keyspace and (table is None or info.table == table)
        ]
        for qid in stale:
            del self._cache[qid]

    def __len__(self) -> int:
        return len(self._cache)
