"""What the proxy needs to know about a table to journal writes to it: its partition key and column types.

A journal entry's key must be the same for every write to one Cassandra
partition (per-key order, and the wait before a conditional statement), and a
simple QUERY carries no metadata; so the proxy reads ``system_schema.columns``
once per table and caches it here.  Sans-I/O: building the query and reading
its rows are separate from running it.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

__all__ = ["SchemaCache", "TableSchema", "columns_query", "table_schema_from_rows"]


class TableSchema(msgspec.Struct, frozen=True):
    keyspace: str
    table: str
    partition_key: tuple[tuple[str, str], ...]  # (column, CQL type) in partition-key order
    columns: dict[str, str]  # every column -> CQL type

    @property
    def is_counter(self) -> bool:
        """Counter tables are written synchronously: increments are not idempotent."""
        return any(t == "counter" for t in self.columns.values())


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def columns_query(keyspace: str, table: str) -> str:
    return (
        "SELECT column_name, kind, position, type FROM system_schema.columns "
        f"WHERE keyspace_name = {_literal(keyspace)} AND table_name = {_literal(table)}"
    )


def table_schema_from_rows(keyspace: str, table: str, rows: list[tuple[str, str, int, str]]) -> TableSchema | None:
    """Rows of :func:`columns_query` -> the schema; None when there are none (no such table)."""
    if not rows:
        return None
    pk = sorted((position, name, type_) for name, kind, position, type_ in rows if kind == "partition_key")
    return TableSchema(
        keyspace=keyspace,
        table=table,
        partition_key=tuple((name, type_) for _, name, type_ in pk),
        columns={name: type_ for name, _, _, type_ in rows},
    )


_MISSING = object()


class SchemaCache:
    """(keyspace, table) -> TableSchema, or None for a table known not to exist.  Bounded LRU.

    Invalidated wholesale on any schema change the proxy sees (DDL it forwarded, a
    SCHEMA_CHANGE event): schema changes are rare and a re-read costs one query.
    """

    def __init__(self, size: int = 2048) -> None:
        self.size = size
        self._cache: OrderedDict[tuple[str, str], TableSchema | None] = OrderedDict()

    def lookup(self, keyspace: str, table: str) -> tuple[bool, TableSchema | None]:
        """(known, schema): known is False when the table was never read."""
        value = self._cache.get((keyspace, table), _MISSING)
        if value is _MISSING:
            return False, None
        self._cache.move_to_end((keyspace, table))
        return True, value  # type: ignore[return-value]

    def put(self, keyspace: str, table: str, schema: TableSchema | None) -> None:
        self._cache[(keyspace, table)] = schema
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)

    def invalidate(self) -> None:
        self._cache.clear()
