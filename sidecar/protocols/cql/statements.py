"""What the CQL statement classifier (:mod:`.classifier`) says about a statement.

The proxy must decide per statement whether to journal it (a write), forward it
(a read), answer it itself (``system.local``/``system.peers``) or pass it
through synchronously (DDL, LWT, anything it cannot understand).  That needs the
statement kind, its target keyspace/table, whether it is conditional or carries
its own timestamp/TTL, and -- to route or key the journal by partition -- which
literal or bind marker each key column is bound to.  It does not need a full
CQL grammar: the classifier tokenizes properly (comments, quoted identifiers,
``''``-escaped and ``$$`` strings, named and positional bind markers) and then
reads the few clauses it cares about.

:func:`~.classifier.classify` never raises.  Text it cannot make sense of comes back with
``error`` set (and usually kind OTHER); callers should treat that as "do not
handle locally".
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec

__all__ = [
    "Statement",
    "StatementKind",
    "Term",
    "TermKind",
    "is_system_keyspace",
]


class StatementKind(StrEnum):
    SELECT = "SELECT"
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    BATCH = "BATCH"
    TRUNCATE = "TRUNCATE"
    DDL = "DDL"
    USE = "USE"
    OTHER = "OTHER"


class TermKind(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    FLOAT = "float"
    UUID = "uuid"
    BLOB = "blob"
    BOOLEAN = "boolean"
    NULL = "null"
    BIND = "bind"
    IN = "in"  # `col IN (...)`: items, or bind_index/bind_name for `col IN ?`
    EXPRESSION = "expression"  # function call, collection literal, arithmetic, cast...


class Term(msgspec.Struct, frozen=True):
    """What a column is bound to: a literal (``value`` is its Python value) or a bind marker.

    ``bind_index`` counts every marker (``?`` and ``:name``) of the whole query
    text from 0, which is the position of its value in a QUERY's values.
    """

    kind: TermKind
    text: str
    value: Any = None
    bind_index: int | None = None
    bind_name: str | None = None
    items: tuple[Term, ...] = ()

    @property
    def is_bind(self) -> bool:
        return self.kind == TermKind.BIND

    @property
    def is_literal(self) -> bool:
        return self.kind not in (TermKind.BIND, TermKind.IN, TermKind.EXPRESSION)


class Statement(msgspec.Struct):
    """The classification of one CQL statement (see module docstring).

    ``columns``: INSERT column -> value, and the ``col = term`` / ``col IN (...)``
    relations of a WHERE clause (SELECT/UPDATE/DELETE).  ``assignments``: plain
    ``col = term`` of an UPDATE's SET.  ``counter_update``: a ``c = c +/- n`` or
    ``c += n`` assignment with an integer literal or bind marker (syntactically
    a ``list = list + ?`` looks the same, so this is a strong hint, not proof).
    ``statements``: the children of a BATCH.  ``object_type``: what DDL acts on
    (``TABLE``, ``KEYSPACE``, ``INDEX``, ...).
    """

    kind: StatementKind
    keyspace: str | None = None
    table: str | None = None
    conditional: bool = False
    timestamp: Term | None = None
    ttl: Term | None = None
    counter_update: bool = False
    columns: dict[str, Term] = msgspec.field(default_factory=dict)
    assignments: dict[str, Term] = msgspec.field(default_factory=dict)
    bind_count: int = 0
    json: bool = False
    batch_type: str | None = None
    statements: list[Statement] = msgspec.field(default_factory=list)
    object_type: str | None = None
    is_system: bool = False
    error: str | None = None

    @property
    def has_timestamp(self) -> bool:
        return self.timestamp is not None

    @property
    def has_ttl(self) -> bool:
        return self.ttl is not None

    @property
    def is_write(self) -> bool:
        return self.kind in (StatementKind.INSERT, StatementKind.UPDATE, StatementKind.DELETE, StatementKind.BATCH)


def is_system_keyspace(name: str | None) -> bool:
    """``system`` and the ``system_*`` keyspaces (schema, auth, traces, distributed, views...)."""
    return name is not None and (name == "system" or name.startswith("system_"))
