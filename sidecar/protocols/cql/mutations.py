"""Turn CQL writes into journal entries: statements, values in bind order, types and partition keys.

Sans-I/O.  The drain re-executes a journaled :class:`~sidecar.envelope.CqlMutation`
with cassandra-driver: it prepares each statement's ``query`` in its ``keyspace``,
binds the raw ``values`` (exactly the bytes the client sent, positional) and
sets the entry's write time as the timestamp.  So this module keeps the client's
bytes, turns named values into positional ones, and derives the one thing the
journal adds: the entry key, a canonical string per Cassandra partition
(``keyspace.table:<hex of each serialized partition-key component>``), so every
write to one partition keeps its order and a conditional statement can wait for
the writes before it.  When the partition cannot be told (an unprepared
statement whose key is an expression or an ``IN`` list, or a table whose schema
could not be read) the key falls back to ``keyspace.table``.
"""

from __future__ import annotations

import decimal

import msgspec

from sidecar.envelope import CqlStatement

from .schema import TableSchema
from .statements import Statement, Term, TermKind
from .types import UNSET, DataType, Value
from .values import encode_value

__all__ = [
    "Bound",
    "MutationError",
    "group_by_key",
    "journal_key",
    "marker_names",
    "marker_types",
    "partition_key",
    "positional_values",
    "to_cql_statement",
]


class MutationError(ValueError):
    """A write the proxy refuses before journaling it (answered ERROR Invalid, as Cassandra would)."""


class Bound(msgspec.Struct):
    """One write statement with everything resolved: text, keyspace, table, positional values, types."""

    query: str
    statement: Statement
    keyspace: str  # the keyspace the table lives in (qualified name, else the connection's)
    table: str
    values: list[Value]
    types: list[str]
    pk_indexes: list[int] | None = None  # from prepared metadata: where the partition key is bound


def _bind_terms(st: Statement) -> list[tuple[str, Term]]:
    """(name Cassandra gives the marker, term) for every marker the classifier attributes to a column."""
    out: list[tuple[str, Term]] = []
    for col, term in (*st.columns.items(), *st.assignments.items()):
        if term.kind == TermKind.BIND:
            out.append((term.bind_name or col, term))
        elif term.kind == TermKind.IN:
            if term.bind_index is not None:
                out.append((term.bind_name or col, term))
            out.extend((item.bind_name or col, item) for item in term.items if item.kind == TermKind.BIND)
    if st.timestamp is not None and st.timestamp.kind == TermKind.BIND:
        out.append((st.timestamp.bind_name or "[timestamp]", st.timestamp))
    if st.ttl is not None and st.ttl.kind == TermKind.BIND:
        out.append((st.ttl.bind_name or "[ttl]", st.ttl))
    return out


def marker_names(st: Statement) -> list[str | None]:
    """The name of each bind marker of an unprepared statement (None where the classifier cannot tell)."""
    names: list[str | None] = [None] * st.bind_count
    for child in st.statements or [st]:
        for name, term in _bind_terms(child):
            if term.bind_index is not None and term.bind_index < len(names):
                names[term.bind_index] = name
    return names


def marker_types(st: Statement, schemas: dict[tuple[str, str], TableSchema | None], keyspace: str | None) -> list[str]:
    """CQL type of each bind marker, from the table schemas ("" where unknown)."""
    types = [""] * st.bind_count
    for child in st.statements or [st]:
        schema = schemas.get((child.keyspace or keyspace or "", child.table or ""))
        for col, term in (*child.columns.items(), *child.assignments.items()):
            col_type = schema.columns.get(col, "") if schema is not None else ""
            if term.kind == TermKind.BIND and term.bind_index is not None and term.bind_index < len(types):
                types[term.bind_index] = col_type
            elif term.kind == TermKind.IN:
                for item in term.items:
                    if item.kind == TermKind.BIND and item.bind_index is not None and item.bind_index < len(types):
                        types[item.bind_index] = col_type
                if term.bind_index is not None and term.bind_index < len(types) and col_type:
                    types[term.bind_index] = f"list<{col_type}>"
        for limit, type_ in ((child.timestamp, "bigint"), (child.ttl, "int")):
            if limit is not None and limit.kind == TermKind.BIND and limit.bind_index is not None \
                    and limit.bind_index < len(types):
                types[limit.bind_index] = type_
    return types


def positional_values(values: list[Value], names: list[str] | None, markers: list[str | None]) -> list[Value]:
    """Client values in bind-marker order; values bound by name are placed by the markers' names.

    Raises MutationError with Cassandra's wording when the count or a name does not match.
    """
    if names is None:
        if len(values) != len(markers):
            raise MutationError(
                f"There were {len(markers)} markers(?) in CQL but {len(values)} bound variables"
            )
        return values
    by_name = dict(zip(names, values, strict=True))
    out: list[Value] = []
    for marker in markers:
        if marker is None:
            raise MutationError("Cannot bind values by name to a marker the sidecar cannot name; bind by position")
        if marker not in by_name:
            raise MutationError(f"No value bound for marker {marker}")
        out.append(by_name[marker])
    unknown = set(by_name) - {m for m in markers if m is not None}
    if unknown:
        raise MutationError(f"Unknown identifier {sorted(unknown)[0]}")
    return out


def to_cql_statement(bound: Bound) -> CqlStatement:
    """The journaled form: UNSET values become None with their positions listed in ``unset``."""
    if UNSET not in bound.values:
        return CqlStatement(query=bound.query, values=bound.values, types=bound.types,  # type: ignore[arg-type]
                            keyspace=bound.keyspace)
    unset = [i for i, v in enumerate(bound.values) if v is UNSET]
    values: list[bytes | None] = [None if v is UNSET else v for v in bound.values]
    return CqlStatement(query=bound.query, values=values, types=bound.types, keyspace=bound.keyspace, unset=unset)


def journal_key(keyspace: str, table: str, components: list[bytes] | None) -> str:
    """``keyspace.table:<hex>[:<hex>...]``, or ``keyspace.table`` when the partition is unknown."""
    base = f"{keyspace}.{table}"
    if not components:
        return base
    return base + ":" + ":".join(c.hex() for c in components)


def _literal_bytes(term: Term, cql_type: str) -> bytes | None:
    """The serialized form of a literal partition-key value, as a driver would bind it; None if unsure."""
    if not term.is_literal or term.kind == TermKind.NULL:
        return None
    value = term.value
    if term.kind == TermKind.FLOAT and cql_type == "decimal":
        value = decimal.Decimal(term.text)  # exact, as Cassandra reads the literal (a float would not be)
    try:
        data = encode_value(DataType.from_cql_name(cql_type), value)
    except (ValueError, TypeError, OverflowError, decimal.InvalidOperation):
        return None
    return data


def partition_key(bound: Bound, schema: TableSchema | None) -> str:
    """The journal key of one write (see the module docstring for the fallback)."""
    values = bound.values
    if bound.pk_indexes:
        parts = [values[i] if i < len(values) else None for i in bound.pk_indexes]
        if all(isinstance(p, bytes) for p in parts):
            return journal_key(bound.keyspace, bound.table, parts)  # type: ignore[arg-type]
    if schema is None or not schema.partition_key:
        return journal_key(bound.keyspace, bound.table, None)
    components: list[bytes] = []
    for col, cql_type in schema.partition_key:
        term = bound.statement.columns.get(col)
        if term is None:
            return journal_key(bound.keyspace, bound.table, None)
        if term.kind == TermKind.BIND:
            index = term.bind_index
            value = values[index] if index is not None and index < len(values) else None
            data = value if isinstance(value, bytes) else None
        else:
            data = _literal_bytes(term, cql_type)
        if data is None:
            return journal_key(bound.keyspace, bound.table, None)
        components.append(data)
    return journal_key(bound.keyspace, bound.table, components)


def group_by_key(keyed: list[tuple[str, CqlStatement]]) -> list[tuple[str, list[CqlStatement]]]:
    """Statements of one BATCH grouped per partition, in first-seen order (and statement order within)."""
    groups: dict[str, list[CqlStatement]] = {}
    for key, statement in keyed:
        groups.setdefault(key, []).append(statement)
    return list(groups.items())
