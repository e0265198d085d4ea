"""The CQL statement classifier: :func:`classify` reads a statement into a :class:`~.statements.Statement`.

It tokenizes (:mod:`.lexer`) and then reads only the clauses the proxy needs:
kind, target keyspace/table, conditions, USING TIMESTAMP/TTL, and which literal
or bind marker each key column is bound to.  It never raises: text it cannot
make sense of comes back with ``error`` set (and usually kind OTHER).
"""

from __future__ import annotations

import json
import uuid
from typing import Final

from .lexer import (
    CLOSING,
    TOK_BIND,
    TOK_BLOB,
    TOK_IDENT,
    TOK_NUMBER,
    TOK_OP,
    TOK_QIDENT,
    TOK_STRING,
    TOK_UUID,
    ParseError,
    Token,
    tokenize,
)
from .statements import Statement, StatementKind, Term, TermKind, is_system_keyspace

__all__ = ["classify"]

_DDL_OBJECTS: Final = {
    "keyspace": "KEYSPACE",
    "schema": "KEYSPACE",
    "table": "TABLE",
    "columnfamily": "TABLE",
    "index": "INDEX",
    "type": "TYPE",
    "function": "FUNCTION",
    "aggregate": "AGGREGATE",
    "trigger": "TRIGGER",
    "role": "ROLE",
    "user": "USER",
}
_DML_STARTS: Final = frozenset({"insert", "update", "delete"})


class _Parser:
    def __init__(self, src: str, toks: list[Token]) -> None:
        self.src = src
        self.toks = toks

    # ---- token helpers

    def kw(self, i: int, hi: int, *words: str) -> bool:
        if i >= hi:
            return False
        t = self.toks[i]
        return t.kind == TOK_IDENT and t.val in words

    def op(self, i: int, hi: int, val: str) -> bool:
        if i >= hi:
            return False
        t = self.toks[i]
        return t.kind == TOK_OP and t.val == val

    def find_kw(self, lo: int, hi: int, *words: str) -> int:
        """First top-level (depth of ``lo``) keyword of ``words`` in [lo, hi), else hi."""
        if lo >= hi:
            return hi
        depth = self.toks[lo].depth
        for i in range(lo, hi):
            t = self.toks[i]
            if t.depth == depth and t.kind == TOK_IDENT and t.val in words:
                return i
        return hi

    def closing(self, i: int, hi: int) -> int:
        """Index of the bracket closing the one at ``i``."""
        depth = self.toks[i].depth
        for j in range(i + 1, hi):
            t = self.toks[j]
            if t.depth == depth and t.kind == TOK_OP and t.val in CLOSING:
                return j
        raise ParseError("unclosed bracket")

    def split(self, lo: int, hi: int, sep: str, *, keyword: bool = False) -> list[tuple[int, int]]:
        """Split [lo, hi) at top-level ``sep`` (an operator, or a keyword)."""
        if lo >= hi:
            return []
        depth = self.toks[lo].depth
        parts = []
        start = lo
        for i in range(lo, hi):
            t = self.toks[i]
            if t.depth == depth and t.val == sep and t.kind == (TOK_IDENT if keyword else TOK_OP):
                parts.append((start, i))
                start = i + 1
        parts.append((start, hi))
        return parts

    def name(self, i: int, hi: int) -> str:
        if i >= hi or self.toks[i].kind not in (TOK_IDENT, TOK_QIDENT):
            raise ParseError(f"expected an identifier at {self.where(i)}")
        return self.toks[i].val

    def qname(self, i: int, hi: int) -> tuple[str | None, str, int]:
        first = self.name(i, hi)
        if self.op(i + 1, hi, "."):
            return first, self.name(i + 2, hi), i + 3
        return None, first, i + 1

    def where(self, i: int) -> str:
        return f"offset {self.toks[i].start}" if i < len(self.toks) else "end of statement"

    def text(self, lo: int, hi: int) -> str:
        return self.src[self.toks[lo].start : self.toks[hi - 1].end] if lo < hi else ""

    def binds(self, lo: int, hi: int) -> int:
        return sum(1 for i in range(lo, hi) if self.toks[i].kind == TOK_BIND)

    # ---- terms

    def term(self, lo: int, hi: int) -> Term:
        text = self.text(lo, hi)
        if hi - lo == 1:
            return _single_term(self.toks[lo], text)
        if hi - lo == 2 and self.op(lo, hi, "-"):
            t = self.toks[lo + 1]
            if t.kind == TOK_NUMBER or (t.kind == TOK_IDENT and t.val == "infinity"):
                inner = _single_term(t, text)
                return Term(inner.kind, text, -inner.value)
        return Term(TermKind.EXPRESSION, text)

    def in_term(self, lo: int, hi: int) -> Term:
        text = self.text(lo, hi)
        if hi - lo == 1 and self.toks[lo].kind == TOK_BIND:
            t = self.toks[lo]
            return Term(TermKind.IN, text, bind_index=t.bind, bind_name=t.val or None)
        if self.op(lo, hi, "(") and self.closing(lo, hi) == hi - 1:
            items = tuple(self.term(a, b) for a, b in self.split(lo + 1, hi - 1, ",") if a < b)
            return Term(TermKind.IN, text, items=items)
        return Term(TermKind.EXPRESSION, text)

    # ---- clauses

    def relations(self, lo: int, hi: int) -> dict[str, Term]:
        """``col = term`` and ``col IN ...`` relations of a WHERE clause; others are skipped."""
        cols: dict[str, Term] = {}
        for a, b in self.split(lo, hi, "and", keyword=True):
            if b - a < 3 or self.toks[a].kind not in (TOK_IDENT, TOK_QIDENT):
                continue
            col = self.toks[a].val
            if self.op(a + 1, b, "="):
                cols[col] = self.term(a + 2, b)
            elif self.kw(a + 1, b, "in"):
                cols[col] = self.in_term(a + 2, b)
        return cols

    def using(self, lo: int, hi: int, st: Statement) -> None:
        for a, b in self.split(lo, hi, "and", keyword=True):
            if self.kw(a, b, "timestamp"):
                st.timestamp = self.term(a + 1, b)
            elif self.kw(a, b, "ttl"):
                st.ttl = self.term(a + 1, b)
            else:
                raise ParseError(f"expected TTL or TIMESTAMP at {self.where(a)}")

    def target(self, i: int, hi: int, st: Statement) -> int:
        st.keyspace, st.table, i = self.qname(i, hi)
        return i

    # ---- statements

    def statement(self, lo: int, hi: int) -> Statement:
        t = self.toks[lo]
        word = t.val if t.kind == TOK_IDENT else ""
        if word == "select":
            st = self.select(lo, hi)
        elif word == "insert":
            st = self.insert(lo, hi)
        elif word == "update":
            st = self.update(lo, hi)
        elif word == "delete":
            st = self.delete(lo, hi)
        elif word == "begin":
            st = self.batch(lo, hi)
        elif word == "truncate":
            st = Statement(StatementKind.TRUNCATE)
            i = lo + 1 + (1 if self.kw(lo + 1, hi, "table", "columnfamily") else 0)
            self.target(i, hi, st)
        elif word == "use":
            st = Statement(StatementKind.USE, keyspace=self.name(lo + 1, hi))
        elif word in ("create", "alter", "drop"):
            st = self.ddl(lo, hi)
        elif word in ("grant", "revoke"):
            st = Statement(StatementKind.DDL, object_type="PERMISSION")
        else:
            st = Statement(StatementKind.OTHER)
        st.bind_count = self.binds(lo, hi)
        if st.kind != StatementKind.BATCH:
            st.is_system = is_system_keyspace(st.keyspace)
        return st

    def select(self, lo: int, hi: int) -> Statement:
        st = Statement(StatementKind.SELECT)
        st.json = self.kw(lo + 1, hi, "json")
        frm = self.find_kw(lo + 1, hi, "from")
        if frm == hi:
            raise ParseError("SELECT without FROM")
        i = self.target(frm + 1, hi, st)
        if self.kw(i, hi, "where"):
            end = hi
            for j in range(i + 1, hi):
                t = self.toks[j]
                if t.depth == 0 and t.kind == TOK_IDENT and (
                    t.val in ("limit", "allow")
                    or (t.val in ("group", "order") and self.kw(j + 1, hi, "by"))
                    or (t.val == "per" and self.kw(j + 1, hi, "partition"))
                ):
                    end = j
                    break
            st.columns = self.relations(i + 1, end)
        return st

    def insert(self, lo: int, hi: int) -> Statement:
        st = Statement(StatementKind.INSERT)
        if not self.kw(lo + 1, hi, "into"):
            raise ParseError("INSERT without INTO")
        i = self.target(lo + 2, hi, st)
        if self.kw(i, hi, "json"):
            st.json = True
            end = self.find_kw(i + 1, hi, "default", "if", "using")
            value = self.term(i + 1, end)
            if value.kind == TermKind.STRING:
                st.columns = _json_columns(value.value)
            i = end
            if self.kw(i, hi, "default"):
                i += 2
        else:
            if not self.op(i, hi, "("):
                raise ParseError(f"expected a column list at {self.where(i)}")
            close = self.closing(i, hi)
            names = [self.name(a, b) for a, b in self.split(i + 1, close, ",") if b - a == 1]
            i = close + 1
            if not self.kw(i, hi, "values") or not self.op(i + 1, hi, "("):
                raise ParseError(f"expected VALUES at {self.where(i)}")
            close = self.closing(i + 1, hi)
            terms = [self.term(a, b) for a, b in self.split(i + 2, close, ",")]
            if len(names) != len(terms):
                raise ParseError(f"INSERT names {len(names)} columns but gives {len(terms)} values")
            st.columns = dict(zip(names, terms, strict=True))
            i = close + 1
        self.insert_tail(i, hi, st)
        return st

    def insert_tail(self, i: int, hi: int, st: Statement) -> None:
        while i < hi:
            if self.kw(i, hi, "if") and self.kw(i + 1, hi, "not") and self.kw(i + 2, hi, "exists"):
                st.conditional = True
                i += 3
            elif self.kw(i, hi, "using"):
                end = self.find_kw(i + 1, hi, "if")
                self.using(i + 1, end, st)
                i = end
            else:
                raise ParseError(f"unexpected {self.toks[i].val!r} at {self.where(i)}")

    def update(self, lo: int, hi: int) -> Statement:
        st = Statement(StatementKind.UPDATE)
        i = self.target(lo + 1, hi, st)
        set_at = self.find_kw(i, hi, "set")
        if set_at == hi:
            raise ParseError("UPDATE without SET")
        if self.kw(i, hi, "using"):
            self.using(i + 1, set_at, st)
        where_at = self.find_kw(set_at, hi, "where")
        for a, b in self.split(set_at + 1, where_at, ","):
            self.assignment(a, b, st)
        self.where_and_if(where_at, hi, st)
        return st

    def assignment(self, a: int, b: int, st: Statement) -> None:
        if b - a < 3 or self.toks[a].kind not in (TOK_IDENT, TOK_QIDENT):
            return  # element/field assignments (`m[k] = v`, `u.f = v`) are not recorded
        col = self.toks[a].val
        if self.op(a + 1, b, "+=") or self.op(a + 1, b, "-="):
            if _is_increment(self.term(a + 2, b)):
                st.counter_update = True
            return
        if not self.op(a + 1, b, "="):
            return
        rhs = self.term(a + 2, b)
        if rhs.kind != TermKind.EXPRESSION:
            st.assignments[col] = rhs
            return
        # `c = c + 1` / `c = c - ?`: counter (or collection) arithmetic on itself
        t = self.toks[a + 2]
        if (
            t.kind in (TOK_IDENT, TOK_QIDENT)
            and t.val == col
            and (self.op(a + 3, b, "+") or self.op(a + 3, b, "-"))
            and _is_increment(self.term(a + 4, b))
        ):
            st.counter_update = True
        elif not (t.kind in (TOK_IDENT, TOK_QIDENT) and t.val == col) and not self.op(b - 2, b, "+"):
            st.assignments[col] = rhs

    def where_and_if(self, where_at: int, hi: int, st: Statement) -> None:
        if where_at >= hi:
            raise ParseError(f"{st.kind} without WHERE")
        if_at = self.find_kw(where_at, hi, "if")
        st.columns = self.relations(where_at + 1, if_at)
        st.conditional = if_at < hi

    def delete(self, lo: int, hi: int) -> Statement:
        st = Statement(StatementKind.DELETE)
        frm = self.find_kw(lo + 1, hi, "from")
        if frm == hi:
            raise ParseError("DELETE without FROM")
        i = self.target(frm + 1, hi, st)
        where_at = self.find_kw(i, hi, "where")
        if self.kw(i, hi, "using"):
            self.using(i + 1, where_at, st)
        self.where_and_if(where_at, hi, st)
        return st

    def batch(self, lo: int, hi: int) -> Statement:
        st = Statement(StatementKind.BATCH, batch_type="LOGGED")
        i = lo + 1
        if self.kw(i, hi, "unlogged", "counter"):
            st.batch_type = self.toks[i].val.upper()
            i += 1
        if not self.kw(i, hi, "batch"):
            raise ParseError("BEGIN without BATCH")
        i += 1
        apply_at = self.find_kw(i, hi, "apply")
        if apply_at == hi or not self.kw(apply_at + 1, hi, "batch"):
            raise ParseError("BATCH without APPLY BATCH")
        if self.kw(i, hi, "using"):
            end = i + 1
            while end < apply_at and not self.kw(end, apply_at, *_DML_STARTS):
                end += 1
            self.using(i + 1, end, st)
            i = end
        start = i
        for j in range(i, apply_at + 1):
            t = self.toks[j]
            boundary = j == apply_at or (t.depth == 0 and t.kind == TOK_OP and t.val == ";")
            starts_next = j > start and t.depth == 0 and t.kind == TOK_IDENT and t.val in _DML_STARTS
            if boundary or starts_next:
                if j > start:
                    st.statements.append(self.child(start, j))
                start = j + 1 if boundary else j
        if apply_at + 2 < hi:
            raise ParseError(f"unexpected input after APPLY BATCH at {self.where(apply_at + 2)}")
        targets = {(c.keyspace, c.table) for c in st.statements}
        if len(targets) == 1:
            st.keyspace, st.table = targets.pop()
        st.conditional = any(c.conditional for c in st.statements)
        st.counter_update = st.batch_type == "COUNTER" or any(c.counter_update for c in st.statements)
        st.is_system = any(c.is_system for c in st.statements)
        return st

    def child(self, lo: int, hi: int) -> Statement:
        if not self.kw(lo, hi, *_DML_STARTS):
            raise ParseError(f"only INSERT/UPDATE/DELETE are allowed in a BATCH, at {self.where(lo)}")
        return self.statement(lo, hi)

    def ddl(self, lo: int, hi: int) -> Statement:
        st = Statement(StatementKind.DDL)
        verb = self.toks[lo].val
        i = lo + 1
        if self.kw(i, hi, "or") and self.kw(i + 1, hi, "replace"):
            i += 2
        if self.kw(i, hi, "custom"):
            i += 1
        if self.kw(i, hi, "materialized") and self.kw(i + 1, hi, "view"):
            st.object_type = "MATERIALIZED VIEW"
            i += 2
        elif self.kw(i, hi, *_DDL_OBJECTS):
            st.object_type = _DDL_OBJECTS[self.toks[i].val]
            i += 1
        else:
            return st  # some other DDL form: kind is enough
        if self.kw(i, hi, "if"):
            st.conditional = True
            i += 3 if self.kw(i + 1, hi, "not") else 2
        obj = st.object_type
        if obj == "KEYSPACE":
            st.keyspace = self.name(i, hi)
        elif obj in ("TABLE", "MATERIALIZED VIEW"):
            self.target(i, hi, st)
        elif obj in ("INDEX", "TRIGGER"):
            on = self.find_kw(i, hi, "on")
            if on < hi:
                self.target(on + 1, hi, st)
            elif verb == "drop" and i < hi:
                st.keyspace = self.qname(i, hi)[0]  # DROP INDEX ks.idx: the base table is unknown
        elif obj in ("TYPE", "FUNCTION", "AGGREGATE"):
            st.keyspace = self.qname(i, hi)[0]
        return st


def _is_increment(term: Term) -> bool:
    return term.kind in (TermKind.INTEGER, TermKind.BIND)


def _single_term(t: Token, text: str) -> Term:
    kind = t.kind
    if kind == TOK_STRING:
        return Term(TermKind.STRING, text, t.val)
    if kind == TOK_NUMBER:
        if any(c in t.val for c in ".eE"):
            return Term(TermKind.FLOAT, text, float(t.val))
        return Term(TermKind.INTEGER, text, int(t.val))
    if kind == TOK_UUID:
        return Term(TermKind.UUID, text, uuid.UUID(t.val))
    if kind == TOK_BLOB:
        digits = t.val[2:]
        if len(digits) % 2 == 0:
            return Term(TermKind.BLOB, text, bytes.fromhex(digits))
    elif kind == TOK_BIND:
        return Term(TermKind.BIND, text, bind_index=t.bind, bind_name=t.val or None)
    elif kind == TOK_IDENT:
        if t.val in ("true", "false"):
            return Term(TermKind.BOOLEAN, text, t.val == "true")
        if t.val == "null":
            return Term(TermKind.NULL, text)
        if t.val == "nan":
            return Term(TermKind.FLOAT, text, float("nan"))
        if t.val == "infinity":
            return Term(TermKind.FLOAT, text, float("inf"))
    return Term(TermKind.EXPRESSION, text)


def _json_columns(doc: str) -> dict[str, Term]:
    """Columns of ``INSERT ... JSON '{...}'``: keys fold case unless written as ``"\\"Name\\""``."""
    try:
        obj = json.loads(doc)
    except ValueError:
        return {}
    if not isinstance(obj, dict):
        return {}
    cols: dict[str, Term] = {}
    for key, value in obj.items():
        col = key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key.lower()
        text = json.dumps(value)
        if isinstance(value, bool):
            cols[col] = Term(TermKind.BOOLEAN, text, value)
        elif isinstance(value, int):
            cols[col] = Term(TermKind.INTEGER, text, value)
        elif isinstance(value, float):
            cols[col] = Term(TermKind.FLOAT, text, value)
        elif isinstance(value, str):
            cols[col] = Term(TermKind.STRING, text, value)
        elif value is None:
            cols[col] = Term(TermKind.NULL, text)
        else:
            cols[col] = Term(TermKind.EXPRESSION, text, value)
    return cols


def classify(cql: str) -> Statement:
    """Classify one CQL statement (a trailing ``;`` is fine).  Never raises; see ``Statement.error``."""
    try:
        toks = tokenize(cql)
    except ParseError as exc:
        return Statement(StatementKind.OTHER, error=str(exc))
    hi = len(toks)
    if toks and not (toks[0].kind == TOK_IDENT and toks[0].val == "begin"):  # batches contain `;`
        hi = next((i for i, t in enumerate(toks) if t.kind == TOK_OP and t.val == ";" and t.depth == 0), hi)
    while hi and toks[hi - 1].kind == TOK_OP and toks[hi - 1].val == ";":
        hi -= 1
    if hi == 0:
        return Statement(StatementKind.OTHER, error="empty statement")
    parser = _Parser(cql, toks)
    trailing = [t for t in toks[hi:] if not (t.kind == TOK_OP and t.val == ";")]
    try:
        st = parser.statement(0, hi)
    except (ParseError, ValueError, IndexError) as exc:
        kind = _leading_kind(toks[0])
        return Statement(kind, bind_count=parser.binds(0, hi), error=str(exc) or type(exc).__name__)
    if trailing:
        st.error = f"more than one statement (extra input at offset {trailing[0].start})"
    return st


def _leading_kind(t: Token) -> StatementKind:
    """Best-effort kind for text that failed to parse, from its first keyword."""
    if t.kind != TOK_IDENT:
        return StatementKind.OTHER
    return {
        "select": StatementKind.SELECT,
        "insert": StatementKind.INSERT,
        "update": StatementKind.UPDATE,
        "delete": StatementKind.DELETE,
        "begin": StatementKind.BATCH,
        "truncate": StatementKind.TRUNCATE,
        "use": StatementKind.USE,
        "create": StatementKind.DDL,
        "alter": StatementKind.DDL,
        "drop": StatementKind.DDL,
    }.get(t.val, StatementKind.OTHER)
