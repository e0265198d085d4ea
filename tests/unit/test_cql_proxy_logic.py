"""The CQL proxy's decisions, without a network: journal keys, bind values, write times, system tables, routes.

What an app relies on: every write to one Cassandra partition gets one journal key (per-partition order and
the LWT wait depend on it), the journaled values are the client's bytes in bind order, the write time is the
client's timestamp, a BATCH is split per partition atomically, and a driver discovering the cluster through
system.local / system.peers finds exactly one host -- the sidecar -- owning the whole ring.  The proxy-level
tests drive :class:`CqlProxy` with encoded frames and a journal that only records what it is given.
"""

from __future__ import annotations

import datetime as dt
import decimal
import ipaddress
import struct
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import trio
from cassandra import cqltypes as ct
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config import Config, validate
from sidecar.envelope import CqlStatement, Entry, now_us
from sidecar.ingress import Ingress
from sidecar.log.writer import Durable, WriteResult
from sidecar.protocols.cql.classifier import classify
from sidecar.protocols.cql.frames import FrameDecoder
from sidecar.protocols.cql.messages import (
    Batch,
    BatchStatement,
    BatchType,
    ColumnSpec,
    Error,
    ErrorCode,
    Execute,
    Query,
    QueryParameters,
    RowsMetadata,
    RowsResult,
    VoidResult,
    decode_response,
    encode_request,
)
from sidecar.protocols.cql.mutations import (
    Bound,
    MutationError,
    group_by_key,
    journal_key,
    marker_names,
    marker_types,
    partition_key,
    positional_values,
    to_cql_statement,
)
from sidecar.protocols.cql.prepared import PreparedCache, PreparedInfo
from sidecar.protocols.cql.proxy import NO_KEYSPACE, CqlProxy
from sidecar.protocols.cql.routing import ClassifyCache, Route, route_of
from sidecar.protocols.cql.schema import SchemaCache, TableSchema, columns_query, table_schema_from_rows
from sidecar.protocols.cql.session import READY_STATE, Client
from sidecar.protocols.cql.system_tables import (
    LocalNode,
    SystemInfo,
    answer,
    host_id_for,
    parse_projection,
    rewrite,
)
from sidecar.protocols.cql.types import UNSET, Consistency, DataType
from sidecar.protocols.cql.values import decode_value, encode_value

KS = "shop"
# PRIMARY KEY ((k1, k2), c): a composite partition key, declared k1 then k2.
KV = table_schema_from_rows(KS, "kv", [
    ("v", "regular", -1, "text"),
    ("k2", "partition_key", 1, "text"),
    ("c", "clustering", 0, "int"),
    ("k1", "partition_key", 0, "int"),
])
SCHEMAS: dict[tuple[str, str], TableSchema | None] = {(KS, "kv"): KV}


def int32(n: int) -> bytes:
    return struct.pack(">i", n)


def text_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def key_of(k1: int, k2: str) -> str:
    return journal_key(KS, "kv", [int32(k1), k2.encode()])


def simple_key(query: str, values: list[Any], names: list[str] | None = None, keyspace: str | None = KS) -> str:
    """The journal key of an unprepared write, resolved the way the proxy resolves a QUERY."""
    statement = classify(query)
    positional = positional_values(values, names, marker_names(statement))
    table_ks = statement.keyspace or keyspace or ""
    bound = Bound(query, statement, table_ks, statement.table or "", positional,
                  marker_types(statement, SCHEMAS, keyspace))
    return partition_key(bound, SCHEMAS.get((table_ks, statement.table or "")))


# --------------------------------------------------------------------------- one partition, one key

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
INT32 = st.integers(-(2**31), 2**31 - 1)


@settings(max_examples=150, deadline=None)
@given(k1=INT32, k2=TEXT, c=INT32, v=TEXT, data=st.data())
def test_one_partition_is_one_key_whatever_the_statement_says(k1: int, k2: str, c: int, v: str,
                                                             data: st.DataObject) -> None:
    """INSERT / UPDATE / DELETE, columns in any order, literals or `?` or `:name` markers, bound by position or
    by name in any order, qualified or not: always the key of the partition (k1, k2), components in key order."""
    literals = {"k1": str(k1), "k2": text_literal(k2), "c": str(c), "v": text_literal(v)}
    serialized = {"k1": int32(k1), "k2": k2.encode(), "c": int32(c), "v": v.encode()}
    markers: list[tuple[str, bytes]] = []  # (name a by-name client would use, value), in marker order

    def term(column: str) -> str:
        style = data.draw(st.sampled_from(["literal", "?", ":name"]), label=f"{column} as")
        if style == "literal":
            return literals[column]
        name = column if style == "?" else f"p_{column}"  # Cassandra names a `?` after its column
        markers.append((name, serialized[column]))
        return "?" if style == "?" else f":{name}"

    table = data.draw(st.sampled_from(["kv", "shop.kv", "SHOP.KV", '"shop"."kv"']), label="table")
    kind = data.draw(st.sampled_from(["INSERT", "UPDATE", "DELETE"]), label="kind")
    key_columns = data.draw(st.permutations(["k1", "k2", "c"]), label="WHERE order")
    if kind == "INSERT":
        columns = data.draw(st.permutations(["k1", "k2", "c", "v"]), label="column order")
        terms = [term(col) for col in columns]
        query = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(terms)})"
    elif kind == "UPDATE":
        assignment = term("v")
        where = " AND ".join(f"{col} = {term(col)}" for col in key_columns)
        query = f"UPDATE {table} SET v = {assignment} WHERE {where}"
    else:
        query = f"DELETE FROM {table} WHERE " + " AND ".join(f"{col} = {term(col)}" for col in key_columns)

    if data.draw(st.booleans(), label="bound by name") and markers:
        shuffled = data.draw(st.permutations(markers), label="name order")
        names, values = [n for n, _ in shuffled], [b for _, b in shuffled]
    else:
        names, values = None, [b for _, b in markers]
    assert simple_key(query, list(values), names) == key_of(k1, k2)


@given(k1=INT32, k2=TEXT)
def test_a_prepared_write_keys_like_a_simple_one(k1: int, k2: str) -> None:
    """EXECUTE keys from the prepared metadata's partition-key indexes, no schema needed: same key."""
    query = "INSERT INTO kv (v, k2, c, k1) VALUES (?, ?, ?, ?)"
    values: list[Any] = [b"v", k2.encode(), int32(1), int32(k1)]
    bound = Bound(query, classify(query), KS, "kv", values, ["text", "text", "int", "int"], pk_indexes=[3, 1])
    assert partition_key(bound, None) == key_of(k1, k2)
    literal = f"UPDATE kv SET v = 'x' WHERE c = 9 AND k2 = {text_literal(k2)} AND k1 = {k1}"
    assert simple_key(literal, []) == key_of(k1, k2)


@given(a=st.lists(st.binary(), min_size=1, max_size=3), b=st.lists(st.binary(), min_size=1, max_size=3))
def test_different_partitions_never_share_a_key(a: list[bytes], b: list[bytes]) -> None:
    assert (journal_key(KS, "kv", a) == journal_key(KS, "kv", b)) == (a == b)


def test_key_spelling_and_table_fallback() -> None:
    assert journal_key("shop", "orders", [int32(42)]) == "shop.orders:0000002a"
    assert journal_key("shop", "orders", None) == journal_key("shop", "orders", []) == "shop.orders"
    # The partition cannot be told from the text: the whole table is the key (coarser order, still correct).
    assert simple_key("DELETE FROM kv WHERE k1 IN (1, 2) AND k2 = 'a'", []) == "shop.kv"
    assert simple_key("DELETE FROM kv WHERE k1 = ? AND k2 = token('a')", [int32(1)]) == "shop.kv"
    assert simple_key("UPDATE kv SET v = 'x' WHERE k1 = 1 AND c = 1", []) == "shop.kv"  # k2 missing
    assert simple_key("INSERT INTO kv (k1, k2, c) VALUES (null, 'a', 1)", []) == "shop.kv"
    assert simple_key("INSERT INTO kv (k1, k2, c) VALUES (?, 'a', 1)", [None]) == "shop.kv"  # null bound
    assert simple_key("INSERT INTO kv (k1, k2, c) VALUES (?, 'a', 1)", [UNSET]) == "shop.kv"
    assert simple_key("INSERT INTO kv (k1, k2, c) VALUES ('not an int', 'a', 1)", []) == "shop.kv"
    assert simple_key("INSERT INTO other (k) VALUES (1)", []) == "shop.other"  # schema unknown
    # Prepared metadata with a null in the key: fall back to the schema, then to the table.
    bound = Bound("q", classify("INSERT INTO kv (k1, k2) VALUES (?, ?)"), KS, "kv", [None, b"a"], [], [0, 1])
    assert partition_key(bound, KV) == partition_key(bound, None) == "shop.kv"


def test_literal_keys_are_serialized_as_the_driver_binds_them() -> None:
    """A literal partition key keys the journal like the same value bound by a driver (per-key order holds)."""
    typed = table_schema_from_rows(KS, "typed", [("k", "partition_key", 0, "decimal"),
                                                 ("i", "partition_key", 1, "inet"),
                                                 ("d", "partition_key", 2, "date"),
                                                 ("u", "partition_key", 3, "uuid")])
    SCHEMAS[(KS, "typed")] = typed
    try:
        u = uuid.UUID("12345678-1234-5678-1234-567812345678")
        literal = simple_key(f"INSERT INTO typed (k, i, d, u) VALUES (1.10, '10.0.0.1', '2024-02-29', {u})", [])
        bound = [ct.DecimalType.serialize(decimal.Decimal("1.10"), 4), ct.InetAddressType.serialize("10.0.0.1", 4),
                 ct.SimpleDateType.serialize(dt.date(2024, 2, 29), 4), ct.UUIDType.serialize(u, 4)]
        assert literal == journal_key(KS, "typed", bound)
        assert simple_key("INSERT INTO typed (k, i, d, u) VALUES (?, ?, ?, ?)", bound) == literal
    finally:
        del SCHEMAS[(KS, "typed")]


# --------------------------------------------------------------------------- bind values


def test_named_values_are_reordered_to_bind_positions() -> None:
    query = "UPDATE kv USING TTL :ttl SET v = :v WHERE k1 = :id AND k2 = ? AND c = :c"
    markers = marker_names(classify(query))
    assert markers == ["ttl", "v", "id", "k2", "c"]
    given_values = {"c": b"C", "k2": b"K2", "ttl": b"T", "id": b"ID", "v": b"V"}
    assert positional_values(list(given_values.values()), list(given_values), markers) == [
        b"T", b"V", b"ID", b"K2", b"C"]
    assert positional_values([b"1", b"2"], None, [None, None]) == [b"1", b"2"]  # by position: as sent


@pytest.mark.parametrize(("values", "names", "markers", "message"), [
    ([b"1"], None, ["a", "b"], "There were 2 markers(?) in CQL but 1 bound variables"),
    ([b"1", b"2", b"3"], None, ["a", "b"], "There were 2 markers(?) in CQL but 3 bound variables"),
    ([b"1"], ["a"], ["a", "b"], "No value bound for marker b"),
    ([b"1", b"2", b"3"], ["a", "b", "zz"], ["a", "b"], "Unknown identifier zz"),
    ([b"1"], ["a"], [None], "Cannot bind values by name to a marker the sidecar cannot name; bind by position"),
])
def test_values_that_do_not_fit_the_markers_are_refused(values: list[Any], names: list[str] | None,
                                                        markers: list[str | None], message: str) -> None:
    with pytest.raises(MutationError) as caught:
        positional_values(values, names, markers)
    assert str(caught.value) == message


@given(names=st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=5),
       markers=st.lists(st.sampled_from(["a", "b", "c", None]), max_size=5))
def test_binding_by_name_either_fits_or_is_a_mutation_error(names: list[str], markers: list[str | None]) -> None:
    values = [n.encode() for n in names]
    try:
        out = positional_values(values, names, markers)
    except MutationError:
        return
    assert out == [m.encode() for m in markers if m is not None]


def test_unset_positions_are_recorded_and_sent_as_no_value() -> None:
    bound = Bound("INSERT INTO kv (k1, k2, c, v) VALUES (?, ?, ?, ?)", classify("INSERT INTO kv (k1) VALUES (1)"),
                  KS, "kv", [int32(1), b"a", UNSET, UNSET], ["int", "text", "int", "text"])
    assert to_cql_statement(bound) == CqlStatement(
        query=bound.query, values=[int32(1), b"a", None, None], types=["int", "text", "int", "text"],
        keyspace=KS, unset=[2, 3])
    plain = to_cql_statement(Bound("q", bound.statement, KS, "kv", [None, b"x"], ["int", "text"]))
    assert plain.values == [None, b"x"] and plain.unset == []  # a null is a null, not unset


def test_marker_types_come_from_the_schema() -> None:
    query = "UPDATE kv USING TIMESTAMP ? AND TTL ? SET v = ? WHERE k1 IN ? AND k2 = ? AND c IN (?, ?)"
    assert marker_types(classify(query), SCHEMAS, KS) == ["bigint", "int", "text", "list<int>", "text", "int", "int"]
    assert marker_types(classify("INSERT INTO nope (a, b) VALUES (?, ?)"), SCHEMAS, KS) == ["", ""]
    batch = "BEGIN BATCH INSERT INTO shop.kv (k1, v) VALUES (?, ?); DELETE FROM kv WHERE k2 = ? APPLY BATCH"
    assert marker_types(classify(batch), SCHEMAS, KS) == ["int", "text", "text"]


def test_using_timestamp_stays_in_the_journaled_statement() -> None:
    """Cassandra lets a statement's own USING TIMESTAMP win over the request's: the text keeps it as sent."""
    for query, values in (("INSERT INTO kv (k1, k2, c) VALUES (1, 'a', 1) USING TIMESTAMP 1234", []),
                          ("INSERT INTO kv (k1, k2, c) VALUES (?, ?, 1) USING TIMESTAMP ? AND TTL 60",
                           [int32(1), b"a", struct.pack(">q", 1234)])):
        statement = classify(query)
        assert statement.has_timestamp and route_of(statement, KS) is Route.JOURNAL
        types = marker_types(statement, SCHEMAS, KS)
        journaled = to_cql_statement(Bound(query, statement, KS, "kv", values, types))
        assert journaled.query == query and journaled.values == values
        assert simple_key(query, values) == key_of(1, "a")
    assert marker_types(classify("DELETE FROM kv USING TIMESTAMP ? WHERE k1 = ?"), SCHEMAS, KS) == ["bigint", "int"]


def test_batch_statements_group_per_partition_in_first_seen_order() -> None:
    s = [CqlStatement(query=f"q{i}") for i in range(5)]
    grouped = group_by_key([("b", s[0]), ("a", s[1]), ("b", s[2]), ("c", s[3]), ("a", s[4])])
    assert grouped == [("b", [s[0], s[2]]), ("a", [s[1], s[4]]), ("c", [s[3]])]


# --------------------------------------------------------------------------- the proxy, with a recording journal


class RecordingJournal:
    """Takes every append (one call = one list of entries), as a healthy JetStream would."""

    def __init__(self, durable: Durable = Durable.TRUE) -> None:
        self.calls: list[list[Entry]] = []
        self.durable = durable
        self.sequence = 0

    async def append(self, entry: Entry, packable: bool = False) -> WriteResult:
        return await self.append_atomic([entry])

    async def append_atomic(self, entries: list[Entry], mutation_id: str | None = None) -> WriteResult:
        return self._take(entries)

    def append_then(self, entry: Entry, done: Callable[[WriteResult], None], packable: bool = False) -> bool:
        done(self._take([entry]))  # a real journal answers later, from its connection's reader
        return True

    def _take(self, entries: list[Entry]) -> WriteResult:
        self.calls.append(list(entries))
        self.sequence += len(entries)
        return WriteResult(self.durable, self.sequence, count=len(entries),
                           message="" if self.durable is Durable.TRUE else "nats: timeout")


DC, RACK = "dc-walcar", "rack-9"


def proxy_config() -> Config:
    return validate({
        "sidecar": {"nats_url": "nats://127.0.0.1:1"},
        "listeners": [{"protocol": "cql", "bind": "127.0.0.1:9042", "namespace": "app", "data_center": DC,
                       "rack": RACK}],
        "namespaces": {"app": {"partitions": 8, "write_time_drift": "60s", "targets": [
            {"name": "db", "type": "cassandra", "contact_points": ["127.0.0.1:1"], "keyspace": "unused"}]}},
    })


INSERT = "INSERT INTO kv (k1, k2, c, v) VALUES (?, ?, ?, ?)"
INSERT_ID = b"\x01" * 16
INSERT_COLUMNS = [ColumnSpec(KS, "kv", name, DataType.from_cql_name(type_))
                  for name, type_ in (("k1", "int"), ("k2", "text"), ("c", "int"), ("v", "text"))]


def make_proxy(journal: RecordingJournal) -> CqlProxy:
    config = proxy_config()
    proxy = CqlProxy(config.listeners[0], Ingress(config, journal), config)  # type: ignore[arg-type]
    proxy.schemas.put(KS, "kv", KV)  # read from system_schema.columns once; never asked for here
    proxy.prepared.put(PreparedInfo(INSERT_ID, INSERT, KS, classify(INSERT), Route.JOURNAL, INSERT_COLUMNS,
                                    [0, 1]))
    return proxy


async def send(proxy: CqlProxy, *messages: Any, keyspace: str | None = KS) -> list[Any]:
    """Each message as a frame from one ready connection; the decoded answers, by stream id."""
    out = bytearray()
    async with trio.open_nursery() as nursery:
        client = Client(out.extend, nursery, proxy.local_node("127.0.0.1", 9042))
        client.state, client.keyspace = READY_STATE, keyspace
        for stream, message in enumerate(messages, start=1):
            (frame,) = FrameDecoder().feed(encode_request(message, stream))
            proxy.handle(client, frame)
    answers = sorted((decode_response(f) for f in FrameDecoder().feed(bytes(out))), key=lambda r: r.stream)
    assert [a.stream for a in answers] == list(range(1, len(messages) + 1))
    return answers


def params(values: list[Any] | None = None, **kwargs: Any) -> QueryParameters:
    return QueryParameters(Consistency.LOCAL_QUORUM, values, **kwargs)


async def test_the_clients_default_timestamp_is_the_write_time() -> None:
    journal = RecordingJournal()
    proxy = make_proxy(journal)
    stamp = now_us() - 1_500_000
    (answer_,) = await send(proxy, Query("INSERT INTO kv (k1, k2, c, v) VALUES (7, 'a', 1, 'x')",
                                         params(timestamp=stamp)))
    assert isinstance(answer_.message, VoidResult)
    assert answer_.custom_payload == {"walcar-durable": b"true", "walcar-visible": b"false"}
    ((entry,),) = journal.calls
    assert entry.write_time == stamp and entry.key == key_of(7, "a") and entry.ns == "app"
    assert entry.cql is not None and entry.cql.batch_type == -1
    assert entry.cql.consistency == Consistency.LOCAL_QUORUM


async def test_without_a_client_timestamp_the_write_time_is_the_sidecars_clock() -> None:
    journal = RecordingJournal()
    before = now_us()
    await send(make_proxy(journal), Execute(INSERT_ID, params([int32(1), b"a", int32(2), b"x"])))
    ((entry,),) = journal.calls
    assert before <= entry.write_time <= now_us()


async def test_a_timestamp_beyond_the_allowed_drift_is_refused_not_journaled() -> None:
    journal = RecordingJournal()
    stale = now_us() - 3_600_000_000
    (answer_,) = await send(make_proxy(journal), Query("INSERT INTO kv (k1, k2, c) VALUES (1, 'a', 1)",
                                                       params(timestamp=stale)))
    assert isinstance(answer_.message, Error) and answer_.message.code == ErrorCode.INVALID
    assert "in the past" in answer_.message.message and journal.calls == []


async def test_a_batch_over_three_partitions_is_three_entries_with_one_write_time() -> None:
    journal = RecordingJournal()
    stamp = now_us() - 10_000
    children = [BatchStatement(query_id=INSERT_ID, values=[int32(k), b"a", int32(1), b"v"]) for k in (10, 11, 12)]
    children.insert(1, BatchStatement(query="UPDATE kv SET v = 'again' WHERE k1 = 10 AND k2 = 'a' AND c = 2"))
    (answer_,) = await send(make_proxy(journal), Batch(BatchType.LOGGED, children, Consistency.QUORUM,
                                                       timestamp=stamp))
    assert isinstance(answer_.message, VoidResult)
    (entries,) = journal.calls  # one atomic append: stored all or none
    assert [e.key for e in entries] == [key_of(10, "a"), key_of(11, "a"), key_of(12, "a")]
    assert {e.write_time for e in entries} == {stamp}
    assert len({e.batch.id for e in entries if e.batch}) == 1
    assert [(e.batch.index, e.batch.count) for e in entries if e.batch] == [(0, 3), (1, 3), (2, 3)]
    first = entries[0].cql
    assert first is not None and first.batch_type == BatchType.LOGGED and first.consistency == Consistency.QUORUM
    assert [s.query for s in first.statements] == [INSERT, children[1].query]  # batch order, per partition


async def test_a_batch_to_one_partition_is_one_entry() -> None:
    journal = RecordingJournal()
    children = [BatchStatement(query_id=INSERT_ID, values=[int32(5), b"a", int32(c), b"v"]) for c in (1, 2)]
    await send(make_proxy(journal), Batch(BatchType.UNLOGGED, children, Consistency.ONE))
    ((entry,),) = journal.calls
    assert entry.batch is None and entry.cql is not None and len(entry.cql.statements) == 2


async def test_execute_by_name_journals_values_in_bind_order() -> None:
    journal = RecordingJournal()
    named = params([b"x", int32(3), b"a", int32(1)], names=["v", "c", "k2", "k1"])
    await send(make_proxy(journal), Execute(INSERT_ID, named))
    ((entry,),) = journal.calls
    assert entry.key == key_of(1, "a") and entry.cql is not None
    (statement,) = entry.cql.statements
    assert statement.values == [int32(1), b"a", int32(3), b"x"] and statement.types == ["int", "text", "int", "text"]


async def test_query_by_name_journals_values_in_bind_order() -> None:
    journal = RecordingJournal()
    query = "UPDATE kv SET v = :v WHERE k2 = :two AND k1 = :one AND c = 1"
    await send(make_proxy(journal), Query(query, params([int32(4), b"b", b"x"], names=["one", "two", "v"])))
    ((entry,),) = journal.calls
    assert entry.key == key_of(4, "b") and entry.cql is not None
    assert entry.cql.statements[0].values == [b"x", b"b", int32(4)]
    assert entry.cql.statements[0].types == ["text", "text", "int"]


async def test_execute_with_unset_values_records_their_positions() -> None:
    journal = RecordingJournal()
    await send(make_proxy(journal), Execute(INSERT_ID, params([int32(1), b"a", int32(2), UNSET])))
    ((entry,),) = journal.calls
    assert entry.cql is not None
    (statement,) = entry.cql.statements
    assert statement.values == [int32(1), b"a", int32(2), None] and statement.unset == [3]


async def test_using_timestamp_statements_are_journaled_as_sent() -> None:
    journal = RecordingJournal()
    query = "INSERT INTO kv (k1, k2, c) VALUES (1, 'a', 1) USING TIMESTAMP 1234"
    await send(make_proxy(journal), Query(query, params()))
    ((entry,),) = journal.calls
    assert entry.cql is not None and entry.cql.statements[0].query == query
    assert entry.key == key_of(1, "a") and entry.write_time > 1234  # the entry's time is the ingress time


async def test_writes_that_cannot_be_bound_are_refused_with_cassandras_errors() -> None:
    journal = RecordingJournal()
    answers = await send(
        make_proxy(journal),
        Query("INSERT INTO kv (k1, k2, c) VALUES (?, ?, 1)", params([int32(1)])),
        Execute(INSERT_ID, params([int32(1)])),
        Execute(INSERT_ID, params([int32(1), b"a", int32(1), b"x"], names=["k1", "k2", "c", "nope"])),
        Execute(b"\x09" * 16, params([])),
        Query("INSERT INTO kv (k1, k2, c) VALUES (1, 'a', 1)", params()),
        keyspace=None,
    )
    messages = [a.message for a in answers]
    assert all(isinstance(m, Error) for m in messages)
    assert [(m.code, m.message) for m in messages[:3]] == [
        (ErrorCode.INVALID, "There were 2 markers(?) in CQL but 1 bound variables"),
        (ErrorCode.INVALID, "There were 4 markers(?) in CQL but 1 bound variables"),
        (ErrorCode.INVALID, "No value bound for marker v"),
    ]
    assert messages[3].code == ErrorCode.UNPREPARED and (b"\x09" * 16).hex() in messages[3].message
    assert (messages[4].code, messages[4].message) == (ErrorCode.INVALID, NO_KEYSPACE)
    assert journal.calls == []


async def test_a_write_the_journal_did_not_take_is_an_error_never_void() -> None:
    journal = RecordingJournal(Durable.UNKNOWN)
    (answer_,) = await send(make_proxy(journal), Execute(INSERT_ID, params([int32(1), b"a", int32(1), b"x"])))
    assert isinstance(answer_.message, Error) and answer_.message.code == ErrorCode.UNAVAILABLE
    assert answer_.custom_payload == {"walcar-durable": b"unknown", "walcar-visible": b"false"}


# --------------------------------------------------------------------------- system tables


def spec(table: str, name: str, type_: str) -> ColumnSpec:
    return ColumnSpec("system", table, name, DataType.from_cql_name(type_))


LOCAL = {  # the upstream coordinator's own row (Cassandra 5 column types)
    "key": ("text", "local"), "bootstrapped": ("text", "COMPLETED"),
    "broadcast_address": ("inet", ipaddress.ip_address("10.0.0.5")), "broadcast_port": ("int", 7000),
    "cluster_name": ("text", "Test Cluster"), "cql_version": ("text", "3.4.7"),
    "data_center": ("text", "datacenter1"), "host_id": ("uuid", uuid.UUID(int=5)),
    "listen_address": ("inet", ipaddress.ip_address("10.0.0.5")), "listen_port": ("int", 7000),
    "native_protocol_version": ("text", "5"), "partitioner": ("text", "org.apache.cassandra.dht.Murmur3Partitioner"),
    "rack": ("text", "rack1"), "release_version": ("text", "5.0.9"),
    "rpc_address": ("inet", ipaddress.ip_address("10.0.0.5")), "rpc_port": ("int", 9042),
    "schema_version": ("uuid", uuid.UUID(int=77)), "tokens": ("set<text>", {str(t * 2**58) for t in range(-8, 8)}),
}
PEERS = [spec("peers", n, t) for n, t in (("peer", "inet"), ("data_center", "text"), ("host_id", "uuid"),
                                          ("rpc_address", "inet"), ("tokens", "set<text>"))]
PEERS_V2 = [spec("peers_v2", n, t) for n, t in (("peer", "inet"), ("peer_port", "int"), ("native_address", "inet"),
                                                ("native_port", "int"), ("tokens", "set<text>"))]


def system_info(partitioner: str | None = None, peers_v2: bool = True, **types: str) -> SystemInfo:
    local = {**LOCAL, **({"partitioner": ("text", partitioner)} if partitioner else {})}
    columns = [spec("local", name, types.get(name, type_)) for name, (type_, _) in local.items()]
    row = [encode_value(DataType.from_cql_name(type_), value) for type_, value in local.values()]
    return SystemInfo(columns, row, PEERS, PEERS_V2 if peers_v2 else None,
                      "" if peers_v2 else "unconfigured table peers_v2")


NODE = LocalNode("127.0.0.1", 9142, DC, RACK, host_id_for("127.0.0.1:9142"))


def rows_of(result: Any) -> list[dict[str, Any]]:
    assert isinstance(result, RowsResult), result
    columns = result.metadata.columns
    return [{c.name: decode_value(c.type, cell) for c, cell in zip(columns, row, strict=True)} for row in result.rows]


def test_system_local_describes_the_sidecar_owning_the_whole_ring() -> None:
    (row,) = rows_of(answer("SELECT * FROM system.local WHERE key='local'", "local", system_info(), NODE))
    here = "127.0.0.1"  # inet values decode to the driver's text form
    assert (row["data_center"], row["rack"]) == (DC, RACK)
    assert row["rpc_address"] == row["broadcast_address"] == row["listen_address"] == here
    assert row["rpc_port"] == row["broadcast_port"] == row["listen_port"] == 9142
    assert row["tokens"] == {"0"}  # one token: with no peers, this host owns every token of the ring
    assert row["host_id"] == NODE.host_id and row["native_protocol_version"] == "4"
    # What describes the cluster rather than the node stays Cassandra's.
    for name in ("cluster_name", "release_version", "schema_version", "partitioner", "cql_version", "bootstrapped"):
        assert row[name] == LOCAL[name][1]


def test_byte_ordered_rings_get_a_token_in_their_own_spelling() -> None:
    info = system_info("org.apache.cassandra.dht.ByteOrderedPartitioner")
    (row,) = rows_of(answer("SELECT tokens FROM system.local", "local", info, NODE))
    assert row == {"tokens": {"00"}}


def test_ipv6_listeners_and_host_ids() -> None:
    node = LocalNode("::1", 9042, DC, RACK, host_id_for("[::1]:9042"))
    (row,) = rows_of(answer("SELECT rpc_address, host_id FROM system.local", "local", system_info(), node))
    assert row == {"rpc_address": "::1", "host_id": host_id_for("[::1]:9042")}
    assert host_id_for("127.0.0.1:9042") == host_id_for("127.0.0.1:9042") != host_id_for("127.0.0.1:9043")


def test_projections_and_aliases_are_honoured() -> None:
    result = answer('SELECT rpc_port, data_center AS dc, "rack" FROM system.local WHERE key = \'local\'', "local",
                    system_info(), NODE)
    assert rows_of(result) == [{"rpc_port": 9142, "dc": DC, "rack": RACK}]
    missing = answer("SELECT nope FROM system.local", "local", system_info(), NODE)
    assert missing == Error(ErrorCode.INVALID, "Undefined column name nope in table system.local")


def test_a_column_typed_otherwise_upstream_keeps_its_own_value() -> None:
    info = system_info(rpc_port="text")  # say an older Cassandra spelled it differently
    info.local_row[[c.name for c in info.local_columns].index("rpc_port")] = b"9042"
    (row,) = rows_of(answer("SELECT rpc_port, rack FROM system.local", "local", info, NODE))
    assert row == {"rpc_port": "9042", "rack": RACK}


def test_peers_tables_are_empty_with_the_upstreams_columns() -> None:
    info = system_info()
    peers = answer("SELECT * FROM system.peers", "peers", info, NODE)
    assert isinstance(peers, RowsResult) and peers.rows == [] and peers.metadata.columns == PEERS
    peers_v2 = answer("SELECT peer, native_port FROM system.peers_v2", "peers_v2", info, NODE)
    assert isinstance(peers_v2, RowsResult) and peers_v2.rows == []
    assert [c.name for c in peers_v2.metadata.columns or []] == ["peer", "native_port"]
    old = answer("SELECT * FROM system.peers_v2", "peers_v2", system_info(peers_v2=False), NODE)
    assert old == Error(ErrorCode.INVALID, "unconfigured table peers_v2")  # Cassandra 3 says so too


@pytest.mark.parametrize("query", [
    "SELECT count(*) FROM system.local",
    "SELECT JSON * FROM system.local",
    "SELECT DISTINCT key FROM system.local",
    "SELECT * FROM system.local WHERE key = ?",
    "SELECT writetime(rack) FROM system.local",
])
def test_what_the_sidecar_cannot_answer_itself_is_forwarded(query: str) -> None:
    assert answer(query, "local", system_info(), NODE) is None


def test_forwarded_answers_are_rewritten_to_describe_the_sidecar() -> None:
    info = system_info()
    upstream = RowsResult(RowsMetadata([spec("local", "data_center", "text"), spec("local", "cluster_name", "text"),
                                        spec("local", "tokens", "set<text>")]),
                          [[b"datacenter1", b"Test Cluster", encode_value(DataType.from_cql_name("set<text>"),
                                                                          {"1", "2"})]])
    assert rows_of(rewrite(upstream, "local", info, NODE)) == [
        {"data_center": DC, "cluster_name": "Test Cluster", "tokens": {"0"}}]
    peers = RowsResult(RowsMetadata(PEERS), [[None] * len(PEERS)])
    assert rewrite(peers, "peers", info, NODE).rows == []
    assert rows_of(rewrite(upstream, "local", None, NODE))[0]["tokens"] == {"0"}  # no cache yet: Murmur3


@given(st.text(max_size=80))
def test_any_query_text_gets_a_projection_or_none(query: str) -> None:
    projection = parse_projection(query)
    assert projection is None or isinstance(projection, list)
    result = answer(query, "local", system_info(), NODE)
    assert result is None or isinstance(result, RowsResult | Error)


# --------------------------------------------------------------------------- routes


@pytest.mark.parametrize(("query", "keyspace", "route"), [
    ("SELECT * FROM system.local WHERE key='local'", None, Route.LOCAL),
    ("SELECT peer FROM peers_v2", "system", Route.LOCAL),
    ("SELECT * FROM peers", KS, Route.FORWARD),  # shop.peers is the app's table
    ("SELECT * FROM system.size_estimates", None, Route.FORWARD),
    ("SELECT * FROM kv WHERE k1 = 1", KS, Route.FORWARD),
    ("INSERT INTO kv (k1, k2, c) VALUES (1, 'a', 1)", KS, Route.JOURNAL),
    ("UPDATE kv USING TIMESTAMP 5 SET v = 'x' WHERE k1 = 1 AND k2 = 'a' AND c = 1", KS, Route.JOURNAL),
    ("DELETE FROM shop.kv WHERE k1 = 1 AND k2 = 'a'", None, Route.JOURNAL),
    ("BEGIN BATCH INSERT INTO kv (k1) VALUES (1); APPLY BATCH", KS, Route.JOURNAL),
    ("INSERT INTO kv (k1, k2, c) VALUES (1, 'a', 1) IF NOT EXISTS", KS, Route.SYNC),
    ("UPDATE kv SET v = 'x' WHERE k1 = 1 AND k2 = 'a' AND c = 1 IF v = 'y'", KS, Route.SYNC),
    ("UPDATE hits SET n = n + 1 WHERE k = 1", KS, Route.SYNC),
    ("BEGIN COUNTER BATCH UPDATE hits SET n = n + 1 WHERE k = 1; APPLY BATCH", KS, Route.SYNC),
    ("INSERT INTO system_auth.roles (role) VALUES ('x')", None, Route.FORWARD),
    # after `USE system_auth` an unqualified write is Cassandra's bookkeeping: forwarded as the client
    ("UPDATE roles SET is_superuser = true WHERE role = 'walcar_drain'", "system_auth", Route.FORWARD),
    ("DELETE FROM roles WHERE role = 'cassandra'", "System_Auth", Route.FORWARD),
    ("BEGIN BATCH INSERT INTO roles (role) VALUES ('x'); APPLY BATCH", "system", Route.FORWARD),
    ("INSERT INTO kv (k1 VALUES", KS, Route.FORWARD),  # unparsable: Cassandra answers it
    ("USE shop", None, Route.USE),
    ("TRUNCATE kv", KS, Route.TRUNCATE),
    ("CREATE TABLE t (k int PRIMARY KEY)", KS, Route.DDL),
    ("LIST ROLES", None, Route.FORWARD),
])
def test_routes(query: str, keyspace: str | None, route: Route) -> None:
    assert route_of(classify(query), keyspace) is route


def test_classify_cache_is_a_bounded_lru() -> None:
    cache = ClassifyCache(size=2)
    a = cache("SELECT * FROM a")
    assert cache("SELECT * FROM a") is a
    cache("SELECT * FROM b")
    cache("SELECT * FROM a")  # a is now the most recent
    cache("SELECT * FROM c")  # evicts b
    assert cache("SELECT * FROM a") is a
    assert list(cache._cache) == ["SELECT * FROM c", "SELECT * FROM a"]


# --------------------------------------------------------------------------- schema and prepared caches


def test_table_schema_from_system_schema_rows() -> None:
    assert KV.partition_key == (("k1", "int"), ("k2", "text"))  # by position, not row order
    assert KV.columns == {"v": "text", "k2": "text", "c": "int", "k1": "int"} and not KV.is_counter
    counters = table_schema_from_rows(KS, "hits", [("k", "partition_key", 0, "int"), ("n", "regular", -1, "counter")])
    assert counters is not None and counters.is_counter
    assert table_schema_from_rows(KS, "missing", []) is None
    assert columns_query("it's", "t") == ("SELECT column_name, kind, position, type FROM system_schema.columns "
                                          "WHERE keyspace_name = 'it''s' AND table_name = 't'")


def test_schema_cache_tells_unknown_from_missing_and_evicts_the_oldest() -> None:
    cache = SchemaCache(size=2)
    assert cache.lookup(KS, "kv") == (False, None)
    cache.put(KS, "kv", KV)
    cache.put(KS, "gone", None)
    assert cache.lookup(KS, "gone") == (True, None)  # known not to exist
    assert cache.lookup(KS, "kv") == (True, KV)
    cache.put(KS, "third", None)  # evicts "gone", the least recently used
    assert cache.lookup(KS, "gone") == (False, None) and cache.lookup(KS, "kv") == (True, KV)
    cache.invalidate()
    assert cache.lookup(KS, "kv") == (False, None)


def prepared(query_id: bytes, keyspace: str, table: str, connection_keyspace: str | None = None) -> PreparedInfo:
    query = f"INSERT INTO {keyspace}.{table} (k) VALUES (?)"
    return PreparedInfo(query_id, query, connection_keyspace, classify(query), Route.JOURNAL,
                        [ColumnSpec(keyspace, table, "k", DataType.from_cql_name("int"))], [0])


def test_prepared_info_and_cache() -> None:
    info = prepared(b"1", "a", "t1")
    assert (info.types, info.names, info.table_keyspace, info.table) == (["int"], ["k"], "a", "t1")
    no_markers = PreparedInfo(b"x", "TRUNCATE t", "ks", classify("TRUNCATE t"), Route.TRUNCATE, [], [])
    assert (no_markers.table_keyspace, no_markers.table) == ("ks", "t")  # no metadata: the text, then the USE

    cache = PreparedCache(size=3)
    for item in (info, prepared(b"2", "a", "t2"), prepared(b"3", "b", "t1")):
        cache.put(item)
    assert cache.get(b"1") is info and cache.get(b"nope") is None
    cache.forget("a", "t2")
    assert cache.get(b"2") is None and len(cache) == 2
    cache.forget("a")
    assert cache.get(b"1") is None and cache.get(b"3") is not None
    for n in (b"4", b"5", b"6"):
        cache.put(prepared(n, "c", "t"))
    assert cache.get(b"3") is None and len(cache) == 3  # the oldest went
    cache.clear()
    assert len(cache) == 0


@pytest.mark.parametrize(("query", "keyspace", "reason"), [
    ("INSERT INTO kv (k1, k2, c) VALUES (1, 'a', 1)", KS, None),
    ("UPDATE roles SET is_superuser = true WHERE role = 'walcar_drain'", "system_auth", "system-keyspace"),
    ("INSERT INTO shop.kv (k1) VALUES (1) USING TIMESTAMP 4102444800000000", None, "USING TIMESTAMP"),
    ("UPDATE kv USING TTL 1 AND TIMESTAMP 5 SET v = 'x' WHERE k1 = 1", KS, "USING TIMESTAMP"),
    ("DROP TABLE shop.kv", None, "DDL"),
    ("TRUNCATE shop.kv", None, "TRUNCATE"),
    ("INSERT INTO kv (k1) VALUES (1)", "shop; DROP", "identifier"),
])
def test_what_another_region_may_send(query: str, keyspace: str | None, reason: str | None) -> None:
    from sidecar.protocols.cql.routing import unreplicable_reason

    found = unreplicable_reason(query, keyspace)
    assert (found is None) if reason is None else (found is not None and reason in found), found
