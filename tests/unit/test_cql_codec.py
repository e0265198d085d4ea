"""CQL native protocol v4 codec: round trips, interop with cassandra-driver, fuzzing, classifier."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import struct
import uuid
from typing import Any

import pytest
from cassandra import cqltypes as ct
from cassandra.connection import lz4_compress, lz4_decompress
from cassandra.policies import WriteType
from cassandra.protocol import (
    AuthResponseMessage,
    BatchMessage,
    ExecuteMessage,
    OptionsMessage,
    PrepareMessage,
    ProtocolHandler,
    QueryMessage,
    RegisterMessage,
    StartupMessage,
)
from cassandra.query import UNSET_VALUE
from cassandra.query import BatchType as DriverBatchType
from cassandra.util import Duration as DriverDuration
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.protocols.cql import types as T
from sidecar.protocols.cql import wire as W
from sidecar.protocols.cql.classifier import classify
from sidecar.protocols.cql.frames import (
    COMPRESSIONS,
    MAX_FRAME_LENGTH,
    Frame,
    FrameDecoder,
    FrameFlag,
    LZ4Compression,
    Opcode,
    UnsupportedVersion,
    encode_frame,
    get_compression,
)
from sidecar.protocols.cql.messages import (
    AlreadyExistsInfo,
    AuthChallenge,
    Authenticate,
    AuthResponse,
    AuthSuccess,
    Batch,
    BatchStatement,
    BatchType,
    ColumnSpec,
    Error,
    ErrorCode,
    Execute,
    FunctionFailureInfo,
    Options,
    Prepare,
    PreparedMetadata,
    PreparedResult,
    Query,
    QueryParameters,
    ReadFailureInfo,
    ReadTimeoutInfo,
    Ready,
    Register,
    Request,
    Response,
    RowsMetadata,
    RowsResult,
    SchemaChangeEvent,
    SchemaChangeResult,
    SetKeyspaceResult,
    Startup,
    StatusChangeEvent,
    Supported,
    TopologyChangeEvent,
    UnpreparedInfo,
    VoidResult,
    WriteFailureInfo,
    WriteTimeoutInfo,
    decode_request,
    decode_request_body,
    decode_response,
    decode_response_body,
    encode_request,
    encode_response,
)
from sidecar.protocols.cql.statements import StatementKind, TermKind
from sidecar.protocols.cql.system_tables import parse_projection
from sidecar.protocols.cql.types import UNSET, CqlProtocolError, DataType
from sidecar.protocols.cql.values import decode_value, encode_value
from sidecar.protocols.cql.wire import Reader

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LZ4 = LZ4Compression()
PAYLOAD = {"walcar-durable": b"true", "walcar-visible": b"false"}


def frames_of(data: bytes, **kwargs: Any) -> list[Frame]:
    decoder = FrameDecoder(**kwargs)
    events = list(decoder.feed(data))
    assert decoder.buffered == 0
    assert all(isinstance(e, Frame) for e in events)
    return events  # type: ignore[return-value]


def one_frame(data: bytes, **kwargs: Any) -> Frame:
    (frame,) = frames_of(data, **kwargs)
    return frame


def driver_request_bytes(msg: Any, stream: int = 1, compressor: Any = None) -> bytes:
    return ProtocolHandler.encode_message(msg, stream, 4, compressor, False)


def driver_decode(data: bytes, decompressor: Any = None) -> Any:
    version, flags, stream, opcode, length = struct.unpack_from(">BBhBi", data)
    assert length == len(data) - 9
    return ProtocolHandler.decode_message(version & 0x7F, {}, stream, flags, opcode, data[9:], decompressor, None)


# --------------------------------------------------------------------------- request round trips

ALL_PARAMS = QueryParameters(
    consistency=T.Consistency.LOCAL_QUORUM,
    values=[b"\x00\x00\x00\x01", None, UNSET, b""],
    skip_metadata=True,
    page_size=5000,
    paging_state=b"\x01\x02state",
    serial_consistency=T.Consistency.LOCAL_SERIAL,
    timestamp=1_700_000_000_000_000,
)


def _requests() -> list[Any]:
    return [
        Startup({"CQL_VERSION": "3.0.0", "COMPRESSION": "lz4", "DRIVER_NAME": "x"}),
        AuthResponse(b"\x00cassandra\x00cassandra"),
        AuthResponse(None),
        Options(),
        Query("SELECT * FROM ks.t WHERE id = ?", QueryParameters(consistency=1)),
        Query("SELECT * FROM ks.t", ALL_PARAMS),
        Query("UPDATE t SET v = :v WHERE k = :k", QueryParameters(1, values=[b"v", b"k"], names=["v", "k"])),
        Query("INSERT INTO t (k) VALUES ('é☃')", QueryParameters(0, values=[])),
        Prepare("INSERT INTO ks.t (k, v) VALUES (?, ?)"),
        Execute(b"\xde\xad\xbe\xef" * 4, ALL_PARAMS),
        Execute(b"id", QueryParameters(T.Consistency.ONE, values=[b"a"])),
        Batch(
            BatchType.UNLOGGED,
            [
                BatchStatement(query="INSERT INTO t (k) VALUES (?)", values=[b"k1"]),
                BatchStatement(query_id=b"\x01\x02", values=[None, UNSET, b"x"]),
                BatchStatement(query="DELETE FROM t WHERE k = 1"),
            ],
            T.Consistency.QUORUM,
            serial_consistency=T.Consistency.SERIAL,
            timestamp=42,
        ),
        Batch(BatchType.COUNTER, [], T.Consistency.ONE),
        Register(["TOPOLOGY_CHANGE", "STATUS_CHANGE", "SCHEMA_CHANGE"]),
    ]


@pytest.mark.parametrize("message", _requests(), ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("compressed", [False, True])
def test_request_round_trip(message: Any, compressed: bool) -> None:
    compression = LZ4 if compressed else None
    data = encode_request(message, 17, compression=compression)
    frame = one_frame(data, compression=compression)
    assert (frame.version, frame.stream, frame.opcode) == (0x04, 17, message.opcode)
    request = decode_request(frame)
    assert request == Request(17, message)
    assert request.encode(compression) == data


def test_request_envelope_tracing_and_payload_round_trip() -> None:
    query = Query("SELECT 1", QueryParameters(1))
    data = encode_request(query, 3, tracing=True, custom_payload={"k": b"v", "n": None})
    request = decode_request(one_frame(data))
    assert request == Request(3, query, tracing=True, custom_payload={"k": b"v", "n": None})
    rewritten = Request(99, request.message, request.tracing, request.custom_payload).encode()
    assert decode_request(one_frame(rewritten)).stream == 99


# --------------------------------------------------------------------------- response round trips

UDT = DataType.udt("ks", "address", [("street", T.TEXT), ("zip", T.INT), ("tags", DataType.set_of(T.TEXT))])
COLUMNS = [
    ColumnSpec("ks", "t", "id", T.UUID),
    ColumnSpec("ks", "t", "m", DataType.map_of(T.TEXT, DataType.list_of(T.INT))),
    ColumnSpec("ks", "t", "addr", UDT),
    ColumnSpec("ks", "t", "tup", DataType.tuple_of(T.INT, T.TEXT)),
    ColumnSpec("ks", "t", "d", T.DURATION),
    ColumnSpec("ks", "t", "c", DataType.custom_type("org.example.Thing")),
]


def _responses() -> list[Any]:
    return [
        Error(ErrorCode.SERVER_ERROR, "boom"),
        Error(ErrorCode.PROTOCOL_ERROR, "bad"),
        Error(ErrorCode.BAD_CREDENTIALS, "Provided username and/or password are incorrect"),
        Error.unavailable(T.Consistency.QUORUM, 2, 1),
        Error.overloaded(),
        Error(ErrorCode.IS_BOOTSTRAPPING, "bootstrapping"),
        Error(ErrorCode.TRUNCATE_ERROR, "truncate"),
        Error(ErrorCode.WRITE_TIMEOUT, "wt", WriteTimeoutInfo(1, 0, 1, "SIMPLE")),
        Error(ErrorCode.READ_TIMEOUT, "rt", ReadTimeoutInfo(4, 1, 2, True)),
        Error(ErrorCode.READ_FAILURE, "rf", ReadFailureInfo(4, 1, 2, 1, False)),
        Error(ErrorCode.FUNCTION_FAILURE, "ff", FunctionFailureInfo("ks", "f", ["int", "text"])),
        Error(ErrorCode.WRITE_FAILURE, "wf", WriteFailureInfo(6, 1, 2, 1, "BATCH")),
        Error(ErrorCode.SYNTAX_ERROR, "line 1:0 no viable alternative"),
        Error(ErrorCode.UNAUTHORIZED, "nope"),
        Error.invalid("Keyspace 'x' does not exist"),
        Error(ErrorCode.CONFIG_ERROR, "config"),
        Error(ErrorCode.ALREADY_EXISTS, "exists", AlreadyExistsInfo("ks", "")),
        Error.unprepared(b"\x01\x02\x03"),
        Ready(),
        Authenticate("org.apache.cassandra.auth.PasswordAuthenticator"),
        Supported({"CQL_VERSION": ["3.4.5"], "COMPRESSION": ["lz4", "snappy"], "PROTOCOL_VERSIONS": ["4/v4"]}),
        VoidResult(),
        RowsResult(RowsMetadata(COLUMNS), [[b"\x00" * 16, None, b"", b"x", b"\x00\x00\x00", b"raw"]]),
        RowsResult(
            RowsMetadata([ColumnSpec("a", "t1", "x", T.INT), ColumnSpec("b", "t2", "y", T.TEXT)], b"page"),
            [[b"\x00\x00\x00\x01", b"one"], [None, None]],
        ),
        RowsResult(RowsMetadata(None, b"more", column_count=2), [[b"1", b"2"]]),
        RowsResult(RowsMetadata([]), []),
        SetKeyspaceResult("MyKs"),
        PreparedResult(
            b"\xca\xfe" * 8,
            PreparedMetadata([ColumnSpec("ks", "t", "k", T.TEXT), ColumnSpec("ks", "t", "v", T.BIGINT)], [0]),
            RowsMetadata(None, column_count=0),
        ),
        PreparedResult(b"id", PreparedMetadata([], []), RowsMetadata(COLUMNS[:2])),
        SchemaChangeResult("CREATED", "KEYSPACE", "ks"),
        SchemaChangeResult("UPDATED", "TABLE", "ks", "t"),
        SchemaChangeResult("DROPPED", "FUNCTION", "ks", "f", ["int", "frozen<list<text>>"]),
        TopologyChangeEvent("NEW_NODE", "10.0.0.1", 9042),
        StatusChangeEvent("DOWN", "::1", 9042),
        SchemaChangeEvent("CREATED", "TYPE", "ks", "address"),
        SchemaChangeEvent("DROPPED", "AGGREGATE", "ks", "agg", []),
        AuthChallenge(b"challenge"),
        AuthChallenge(None),
        AuthSuccess(b""),
    ]


@pytest.mark.parametrize("message", _responses(), ids=lambda m: type(m).__name__)
def test_response_round_trip(message: Any) -> None:
    stream = -1 if message.opcode == Opcode.EVENT else 5
    for extras in ({}, {"tracing_id": uuid.uuid4(), "warnings": ["w1", "w2"], "custom_payload": PAYLOAD}):
        for compression in (None, LZ4):
            data = encode_response(message, stream, compression=compression, **extras)
            frame = one_frame(data, compression=compression)
            assert frame.version == 0x84 and frame.opcode == message.opcode
            response = decode_response(frame)
            assert response == Response(stream, message, **extras)
            assert response.encode(compression) == data


def test_void_result_fast_path_bytes() -> None:
    assert encode_response(VoidResult(), 7) == b"\x84\x00\x00\x07\x08\x00\x00\x00\x04\x00\x00\x00\x01"


def test_encoders_reject_unrepresentable_structs() -> None:
    with pytest.raises(ValueError):
        encode_response(Error(ErrorCode.UNAVAILABLE, "missing detail"))
    with pytest.raises(ValueError):
        encode_response(Error(ErrorCode.INVALID, "x", UnpreparedInfo(b"")))
    with pytest.raises(ValueError):
        encode_response(RowsResult(RowsMetadata([ColumnSpec("k", "t", "a", T.INT)]), [[b"1", b"2"]]))
    with pytest.raises(ValueError):
        encode_request(Batch(0, [BatchStatement()], 1))
    with pytest.raises(ValueError):
        encode_request(Query("x", QueryParameters(1, values=[b"a"], names=["a", "b"])))
    with pytest.raises(ValueError):
        encode_request(Query("x", QueryParameters(70000)))
    with pytest.raises(TypeError):
        encode_request(Ready())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- driver -> our decoders


def test_decode_driver_query_messages() -> None:
    msg = QueryMessage("SELECT * FROM ks.t", 6, serial_consistency_level=9, fetch_size=100,
                       paging_state=b"ps", timestamp=1234)
    req = decode_request(one_frame(driver_request_bytes(msg, stream=12)))
    assert req.stream == 12 and not req.tracing and req.custom_payload is None
    assert req.message == Query(
        "SELECT * FROM ks.t",
        QueryParameters(6, page_size=100, paging_state=b"ps", serial_consistency=9, timestamp=1234),
    )
    plain = QueryMessage("USE \"Ks\"", 1)
    plain.tracing = True
    plain.custom_payload = PAYLOAD
    req = decode_request(one_frame(driver_request_bytes(plain, stream=0)))
    assert req.message == Query('USE "Ks"', QueryParameters(1))
    assert req.tracing and req.custom_payload == PAYLOAD


def test_decode_driver_execute_batch_prepare_and_control_messages() -> None:
    execute = ExecuteMessage(b"\x01" * 16, [b"a", None, UNSET_VALUE], 4, skip_meta=True, fetch_size=50)
    assert decode_request(one_frame(driver_request_bytes(execute))).message == Execute(
        b"\x01" * 16, QueryParameters(4, values=[b"a", None, UNSET], page_size=50)  # the driver never sends 0x02
    )
    batch = BatchMessage(
        DriverBatchType.COUNTER,
        [(False, "UPDATE c SET n = n + 1 WHERE k = ?", [b"k"]), (True, b"\x09\x08", [None])],
        1,
        serial_consistency_level=9,
        timestamp=77,
    )
    assert decode_request(one_frame(driver_request_bytes(batch))).message == Batch(
        BatchType.COUNTER,
        [
            BatchStatement(query="UPDATE c SET n = n + 1 WHERE k = ?", values=[b"k"]),
            BatchStatement(query_id=b"\x09\x08", values=[None]),
        ],
        1,
        serial_consistency=9,
        timestamp=77,
    )
    prepare = decode_request(one_frame(driver_request_bytes(PrepareMessage("SELECT ? FROM t"))))
    assert prepare.message == Prepare("SELECT ? FROM t")
    startup = decode_request(one_frame(driver_request_bytes(StartupMessage("3.0.0", {"COMPRESSION": "lz4"}))))
    assert startup.message.cql_version == "3.0.0" and startup.message.compression == "lz4"
    assert decode_request(one_frame(driver_request_bytes(OptionsMessage()))).message == Options()
    register = decode_request(one_frame(driver_request_bytes(RegisterMessage(["SCHEMA_CHANGE"]))))
    assert register.message == Register(["SCHEMA_CHANGE"])
    auth = decode_request(one_frame(driver_request_bytes(AuthResponseMessage(b"\x00u\x00p"))))
    assert auth.message == AuthResponse(b"\x00u\x00p")


def test_decode_driver_lz4_compressed_request() -> None:
    msg = QueryMessage("SELECT * FROM t WHERE k = 'x'" * 20, 1)
    data = driver_request_bytes(msg, stream=3, compressor=lz4_compress)
    assert data[1] & FrameFlag.COMPRESSION
    frame = one_frame(data, compression=get_compression("LZ4"))
    assert not frame.flags & FrameFlag.COMPRESSION
    assert decode_request(frame).message.query == msg.query


# --------------------------------------------------------------------------- our encoders -> driver


def test_driver_reads_void_with_custom_payload() -> None:
    msg = driver_decode(encode_response(VoidResult(), 9, custom_payload=PAYLOAD))
    assert msg.kind == 1 and msg.stream_id == 9
    assert msg.custom_payload == PAYLOAD


def test_driver_reads_warnings_and_tracing() -> None:
    trace = uuid.uuid4()
    msg = driver_decode(encode_response(SetKeyspaceResult("ks"), 1, tracing_id=trace, warnings=["careful"],
                                        custom_payload={"a": b"b"}))
    assert msg.trace_id == trace and msg.warnings == ["careful"] and msg.custom_payload == {"a": b"b"}
    assert msg.new_keyspace == "ks"


def test_driver_reads_rows_of_many_types() -> None:
    values: list[tuple[str, DataType, Any]] = [
        ("i", T.INT, -7),
        ("b", T.BIGINT, 2**40),
        ("t", T.TEXT, "héllo"),
        ("a", T.ASCII, "plain"),
        ("u", T.UUID, uuid.UUID("12345678-1234-5678-1234-567812345678")),
        ("tu", T.TIMEUUID, uuid.uuid1()),
        ("bo", T.BOOLEAN, True),
        ("do", T.DOUBLE, 1.5),
        ("fl", T.FLOAT, 0.25),
        ("de", T.DECIMAL, decimal.Decimal("-123.4500")),
        ("vi", T.VARINT, -(2**70)),
        ("bl", T.BLOB, b"\x00\xff"),
        ("ts", T.TIMESTAMP, dt.datetime(2024, 2, 29, 12, 30, 1, 123000, tzinfo=dt.UTC)),
        ("da", T.DATE, dt.date(1969, 7, 20)),
        ("ti", T.TIME, 45_296_000_000_001),
        ("in", T.INET, "2001:db8::1"),
        ("sm", T.SMALLINT, -300),
        ("ty", T.TINYINT, 7),
        ("du", T.DURATION, DriverDuration(1, 2, 3_000_000_000)),
        ("li", DataType.list_of(T.INT), [3, 1, 2]),
        ("se", DataType.set_of(T.TEXT), {"x", "y"}),
        ("ma", DataType.map_of(T.TEXT, T.BIGINT), {"k": 1, "j": -2}),
        ("tp", DataType.tuple_of(T.INT, T.TEXT, T.BOOLEAN), (1, "a", None)),
        ("ud", UDT, ("Main", 12345, {"home"})),
        ("nu", T.INT, None),
    ]
    columns = [ColumnSpec("ks", "tbl", name, dtype) for name, dtype, _ in values]
    row = [encode_value(dtype, value) for _, dtype, value in values]
    msg = driver_decode(encode_response(RowsResult(RowsMetadata(columns, b"next"), [row, row]), 4))
    assert msg.paging_state == b"next"
    assert [c[2] for c in msg.column_metadata] == [name for name, _, _ in values]
    assert len(msg.parsed_rows) == 2
    got = dict(zip([name for name, _, _ in values], msg.parsed_rows[0], strict=True))
    assert got["i"] == -7 and got["b"] == 2**40 and got["t"] == "héllo" and got["a"] == "plain"
    assert got["u"] == values[4][2] and got["tu"] == values[5][2]
    assert got["bo"] is True and got["do"] == 1.5 and got["fl"] == 0.25
    assert got["de"] == decimal.Decimal("-123.4500") and got["vi"] == -(2**70) and got["bl"] == b"\x00\xff"
    assert got["ts"] == dt.datetime(2024, 2, 29, 12, 30, 1, 123000)  # the driver returns naive UTC
    assert got["da"].date() == dt.date(1969, 7, 20)
    assert got["ti"].nanosecond_time == 45_296_000_000_001
    assert got["in"] == "2001:db8::1" and got["sm"] == -300 and got["ty"] == 7
    assert (got["du"].months, got["du"].days, got["du"].nanoseconds) == (1, 2, 3_000_000_000)
    assert got["li"] == [3, 1, 2] and set(got["se"]) == {"x", "y"} and dict(got["ma"]) == {"k": 1, "j": -2}
    assert tuple(got["tp"]) == (1, "a", None)
    assert (got["ud"].street, got["ud"].zip, set(got["ud"].tags)) == ("Main", 12345, {"home"})
    assert got["nu"] is None


def test_driver_reads_prepared_result() -> None:
    bind = [ColumnSpec("ks", "t", "k", T.TEXT), ColumnSpec("ks", "t", "c", T.INT), ColumnSpec("ks", "t", "v", T.BLOB)]
    result_cols = [ColumnSpec("ks", "t", "v", T.BLOB)]
    prepared = PreparedResult(b"\x11" * 16, PreparedMetadata(bind, [0]), RowsMetadata(result_cols))
    msg = driver_decode(encode_response(prepared, 2))
    assert msg.kind == 4 and msg.query_id == b"\x11" * 16 and msg.pk_indexes == [0]
    assert [(m.keyspace_name, m.table_name, m.name) for m in msg.bind_metadata] == [
        ("ks", "t", "k"), ("ks", "t", "c"), ("ks", "t", "v")
    ]
    assert [c[2] for c in msg.column_metadata] == ["v"]
    no_result = PreparedResult(b"id", PreparedMetadata(bind[:1], []), RowsMetadata(None))
    assert driver_decode(encode_response(no_result, 2)).pk_indexes == []


@pytest.mark.parametrize(
    ("error", "driver_class", "info"),
    [
        (Error.unavailable(T.Consistency.QUORUM, 3, 1), "UnavailableErrorMessage",
         {"consistency": 4, "required_replicas": 3, "alive_replicas": 1}),
        (Error.overloaded("busy"), "OverloadedErrorMessage", None),
        (Error.protocol_error("nope"), "ProtocolException", None),
        (Error.unprepared(b"\xab\xcd"), "PreparedQueryNotFound", b"\xab\xcd"),
        (Error.server_error("oops"), "ServerError", None),
        (Error.invalid("bad"), "InvalidRequestException", None),
        (Error(ErrorCode.BAD_CREDENTIALS, "creds"), "BadCredentials", None),
        (Error(ErrorCode.WRITE_TIMEOUT, "wt", WriteTimeoutInfo(1, 0, 1, "BATCH_LOG")), "WriteTimeoutErrorMessage",
         {"consistency": 1, "received_responses": 0, "required_responses": 1, "write_type": WriteType.BATCH_LOG}),
        (Error(ErrorCode.READ_TIMEOUT, "rt", ReadTimeoutInfo(4, 1, 2, True)), "ReadTimeoutErrorMessage",
         {"consistency": 4, "received_responses": 1, "required_responses": 2, "data_retrieved": True}),
        (Error(ErrorCode.READ_FAILURE, "rf", ReadFailureInfo(4, 1, 2, 1, False)), "ReadFailureMessage",
         {"consistency": 4, "received_responses": 1, "required_responses": 2, "failures": 1,
          "error_code_map": None, "data_retrieved": False}),
        (Error(ErrorCode.WRITE_FAILURE, "wf", WriteFailureInfo(1, 0, 1, 1, "SIMPLE")), "WriteFailureMessage",
         {"consistency": 1, "received_responses": 0, "required_responses": 1, "failures": 1,
          "error_code_map": None, "write_type": WriteType.SIMPLE}),
        (Error(ErrorCode.FUNCTION_FAILURE, "ff", FunctionFailureInfo("ks", "fn", ["int"])), "FunctionFailureMessage",
         {"keyspace": "ks", "function": "fn", "arg_types": ["int"]}),
        (Error(ErrorCode.ALREADY_EXISTS, "ae", AlreadyExistsInfo("ks", "t")), "AlreadyExistsException",
         {"keyspace": "ks", "table": "t"}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_driver_reads_error_bodies(error: Error, driver_class: str, info: Any) -> None:
    msg = driver_decode(encode_response(error, 3))
    assert type(msg).__name__ == driver_class
    assert msg.code == error.code and msg.message == error.message
    if info is not None:
        assert msg.info == info


def test_driver_reads_control_responses_and_events() -> None:
    supported = driver_decode(encode_response(Supported({"CQL_VERSION": ["3.4.5"], "COMPRESSION": ["lz4"]}), 0))
    assert supported.cql_versions == ["3.4.5"] and supported.options["COMPRESSION"] == ["lz4"]
    assert type(driver_decode(encode_response(Ready(), 0))).__name__ == "ReadyMessage"
    auth = driver_decode(encode_response(Authenticate("org.apache.cassandra.auth.PasswordAuthenticator"), 0))
    assert auth.authenticator == "org.apache.cassandra.auth.PasswordAuthenticator"
    assert driver_decode(encode_response(AuthChallenge(b"c"), 0)).challenge == b"c"
    assert driver_decode(encode_response(AuthSuccess(b"ok"), 0)).token == "ok"  # the driver reads it as text
    change = driver_decode(encode_response(SchemaChangeResult("CREATED", "TABLE", "ks", "t"), 0))
    assert change.schema_change_event == {"target_type": "TABLE", "change_type": "CREATED", "keyspace": "ks",
                                          "table": "t"}
    topo = driver_decode(encode_response(TopologyChangeEvent("NEW_NODE", "10.1.2.3", 9042), -1))
    assert topo.event_args == {"change_type": "NEW_NODE", "address": ("10.1.2.3", 9042)}
    status = driver_decode(encode_response(StatusChangeEvent("UP", "::1", 9043), -1))
    assert status.event_args == {"change_type": "UP", "address": ("::1", 9043)}
    schema = driver_decode(encode_response(SchemaChangeEvent("DROPPED", "KEYSPACE", "ks"), -1))
    assert schema.event_args == {"target_type": "KEYSPACE", "change_type": "DROPPED", "keyspace": "ks"}


# --------------------------------------------------------------------------- compression


def test_lz4_frames_interoperate_with_driver() -> None:
    rows = RowsResult(RowsMetadata([ColumnSpec("ks", "t", "v", T.TEXT)]), [[b"abc" * 50]] * 20)
    data = encode_response(rows, 6, compression=LZ4, custom_payload=PAYLOAD)
    assert data[1] & FrameFlag.COMPRESSION
    msg = driver_decode(data, decompressor=lz4_decompress)
    assert msg.parsed_rows == [("abc" * 50,)] * 20 and msg.custom_payload == PAYLOAD
    body = b"some body " * 30
    assert lz4_decompress(LZ4.compress(body)) == body
    assert LZ4.decompress(lz4_compress(body)) == body
    assert "lz4" in COMPRESSIONS and get_compression(None) is None and get_compression("zstd") is None


def test_empty_bodies_are_never_compressed() -> None:
    data = encode_response(Ready(), 1, compression=LZ4)
    assert data == b"\x84\x00\x00\x01\x02\x00\x00\x00\x00"


def test_lz4_rejects_lies_and_garbage() -> None:
    good = LZ4.compress(b"hello world")
    for bad in (b"", b"\x00\x00", b"\x00\x00\x00\x05" + b"\xff" * 3, good[:4] + b"\x00" + good[5:],
                struct.pack(">I", 100) + good[4:], struct.pack(">I", MAX_FRAME_LENGTH + 1) + good[4:]):
        with pytest.raises(CqlProtocolError):
            LZ4.decompress(bad)


def test_compressed_frame_errors_are_per_frame() -> None:
    bad = Frame(0x04, FrameFlag.COMPRESSION, 4, Opcode.QUERY, b"\x00\x00\x00\x09garbage")
    good = encode_request(Options(), 5)
    decoder = FrameDecoder(compression=LZ4)
    events = decoder.feed(encode_frame(bad) + good)
    with pytest.raises(CqlProtocolError) as info:
        next(events)
    assert info.value.stream == 4 and not info.value.fatal
    assert [f.stream for f in decoder] == [5]
    with pytest.raises(CqlProtocolError, match="no compression was negotiated"):
        list(FrameDecoder().feed(encode_frame(bad)))


# --------------------------------------------------------------------------- framing


def test_frame_decoder_handles_split_and_coalesced_input() -> None:
    stream_of = [encode_request(Query(f"SELECT {i}", QueryParameters(1)), i) for i in range(5)]
    blob = b"".join(stream_of)
    decoder = FrameDecoder()
    got: list[int] = []
    for i in range(len(blob)):  # one byte at a time
        got += [f.stream for f in decoder.feed(blob[i : i + 1])]
    assert got == [0, 1, 2, 3, 4] and decoder.buffered == 0
    assert [f.stream for f in frames_of(blob)] == [0, 1, 2, 3, 4]


def test_frame_decoder_rejects_oversized_and_negative_lengths() -> None:
    for length in (MAX_FRAME_LENGTH + 1, -1):
        decoder = FrameDecoder()
        with pytest.raises(CqlProtocolError) as info:
            list(decoder.feed(struct.pack(">BBhBi", 4, 0, 33, 7, length)))
        assert info.value.fatal and info.value.stream == 33 and info.value.code == ErrorCode.PROTOCOL_ERROR
        with pytest.raises(CqlProtocolError):
            list(decoder.feed(b"more"))
    small = FrameDecoder(max_frame_length=10)
    with pytest.raises(CqlProtocolError):
        list(small.feed(encode_request(Query("SELECT * FROM a_long_table", QueryParameters(1)))))


@pytest.mark.parametrize(("version", "reply_version"), [(5, 4), (0x41, 4), (0x42, 4), (3, 4), (0x16, 4)])
def test_unsupported_version_event_and_reply(version: int, reply_version: int) -> None:
    decoder = FrameDecoder()
    header = struct.pack(">BBhBi", version, 0, 123, Opcode.OPTIONS, 0)
    (event,) = list(decoder.feed(header))
    assert isinstance(event, UnsupportedVersion)
    assert (event.version, event.stream, event.reply_version) == (version, 123, reply_version)
    assert event.message == (
        f"Invalid or unsupported protocol version ({version}); supported versions are (4/v4)"
    )
    assert list(decoder.feed(encode_request(Options()))) == []  # the connection is done
    reply = driver_decode(event.reply())
    assert type(reply).__name__ == "ProtocolException" and reply.stream_id == 123
    assert "unsupported protocol version" in reply.message  # what the python driver greps to downgrade
    assert decode_response(one_frame(event.reply())).message == Error.protocol_error(event.message)


def test_unsupported_version_text_follows_supported_set_and_old_versions_get_old_headers() -> None:
    (event,) = list(FrameDecoder(supported_versions=(3, 4)).feed(b"\x05\x00\x00\x01\x05\x00\x00\x00\x00"))
    assert event.message.endswith("supported versions are (3/v3, 4/v4)")
    (old,) = list(FrameDecoder().feed(b"\x02\x00\x07"))  # v2: 1-byte stream id, 8-byte header
    assert (old.version, old.stream, old.reply_version) == (2, 7, 2)
    reply = old.reply()
    assert reply[:4] == b"\x82\x00\x07\x00" and struct.unpack_from(">i", reply, 4)[0] == len(reply) - 8
    assert list(FrameDecoder().feed(b"\x05\x00")) == []  # wait for the stream id


def test_direction_and_opcode_errors_carry_stream() -> None:
    response_frame = one_frame(encode_response(Ready(), 8))
    with pytest.raises(CqlProtocolError, match="direction") as info:
        decode_request(response_frame)
    assert info.value.stream == 8
    with pytest.raises(CqlProtocolError, match="direction"):
        decode_response(one_frame(encode_request(Options(), 1)))
    with pytest.raises(CqlProtocolError, match="Unknown opcode 4"):
        decode_request(Frame(0x04, 0, 2, 0x04, b""))
    with pytest.raises(CqlProtocolError, match="direction"):
        decode_request(Frame(0x04, 0, 2, Opcode.RESULT, b""))


def test_batch_names_flag_is_refused() -> None:
    body = bytearray(encode_request(Batch(0, [BatchStatement(query="x")], 1))[9:])
    body[-1] |= 0x40
    with pytest.raises(CqlProtocolError, match="Names for values"):
        decode_request_body(Opcode.BATCH, bytes(body))


# --------------------------------------------------------------------------- value codec (the driver's)

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
DECIMALS = st.decimals(allow_nan=False, allow_infinity=False).filter(
    lambda d: -(2**31) < d.as_tuple().exponent < 2**31  # type: ignore[operator]
)
TIMESTAMPS = st.datetimes(timezones=st.just(dt.UTC)).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
DURATIONS = st.builds(DriverDuration, INT32, INT32, INT64)

# Each DataType with the driver class it must map to (looked up independently, by its Java name) and values.
DRIVER_TYPES: list[tuple[DataType, Any, st.SearchStrategy[Any]]] = [
    (T.ASCII, ct.AsciiType, st.text(st.characters(max_codepoint=127))),
    (T.BIGINT, ct.LongType, INT64),
    (T.BLOB, ct.BytesType, st.binary()),
    (T.BOOLEAN, ct.BooleanType, st.booleans()),
    (T.COUNTER, ct.CounterColumnType, INT64),
    (T.DECIMAL, ct.DecimalType, DECIMALS),
    (T.DOUBLE, ct.DoubleType, st.floats(allow_nan=False)),
    (T.FLOAT, ct.FloatType, st.floats(width=32, allow_nan=False)),
    (T.INT, ct.Int32Type, INT32),
    (T.TIMESTAMP, ct.DateType, TIMESTAMPS),
    (T.UUID, ct.UUIDType, st.uuids()),
    (T.TEXT, ct.UTF8Type, st.text()),
    (T.VARINT, ct.IntegerType, st.integers()),
    (T.TIMEUUID, ct.TimeUUIDType, st.uuids(version=1)),
    (T.INET, ct.InetAddressType, st.ip_addresses().map(str)),
    (T.DATE, ct.SimpleDateType, st.dates()),
    (T.TIME, ct.TimeType, st.integers(0, 86_399_999_999_999)),
    (T.SMALLINT, ct.ShortType, st.integers(-(2**15), 2**15 - 1)),
    (T.TINYINT, ct.ByteType, st.integers(-128, 127)),
    (T.DURATION, ct.DurationType, DURATIONS),
    (DataType(T.TypeId.DURATION), ct.DurationType, DURATIONS),
    (DataType.list_of(T.INT), ct.lookup_casstype("ListType(Int32Type)"), st.lists(INT32)),
    (DataType.set_of(T.TEXT), ct.lookup_casstype("SetType(UTF8Type)"), st.sets(st.text())),
    (DataType.map_of(T.TEXT, T.BIGINT), ct.lookup_casstype("MapType(UTF8Type, LongType)"),
     st.dictionaries(st.text(), INT64)),
    (DataType.map_of(T.INT, DataType.list_of(T.TEXT)), ct.lookup_casstype("MapType(Int32Type, ListType(UTF8Type))"),
     st.dictionaries(INT32, st.lists(st.text()))),
    (DataType.tuple_of(T.INT, T.TEXT, T.UUID), ct.lookup_casstype("TupleType(Int32Type, UTF8Type, UUIDType)"),
     st.tuples(st.none() | INT32, st.none() | st.text(), st.none() | st.uuids())),
    (UDT, ct.UserType.make_udt_class("ks", "address", ["street", "zip", "tags"],
                                     [ct.UTF8Type, ct.Int32Type, ct.lookup_casstype("SetType(UTF8Type)")]),
     st.tuples(st.none() | st.text(), st.none() | INT32, st.none() | st.sets(st.text()))),
]


@pytest.mark.parametrize(("dtype", "driver_type", "strategy"), DRIVER_TYPES,
                         ids=lambda v: str(v) if isinstance(v, DataType) else "")
def test_values_are_the_drivers(dtype: DataType, driver_type: Any, strategy: Any) -> None:
    """Every wire type maps to the driver's codec: the same bytes out, the same values back, stable round trips."""
    @FAST
    @given(strategy)
    def check(value: Any) -> None:
        ours = encode_value(dtype, value)
        assert isinstance(ours, bytes) and ours == driver_type.serialize(value, 4)
        decoded = decode_value(dtype, ours)
        assert decoded == driver_type.deserialize(ours, 4)
        assert decode_value(dtype, memoryview(ours)) == decoded
        if dtype != T.TIMESTAMP:  # the driver decodes timestamps through float seconds (can be 1µs off)
            assert decode_value(dtype, encode_value(dtype, decoded)) == decoded

    check()


def test_value_codec_edges() -> None:
    assert decode_value(T.INT, b"") is None  # legacy "empty" value
    assert decode_value(T.TEXT, b"") == ""
    assert decode_value(T.INT, None) is None and encode_value(T.INT, None) is None
    assert encode_value(T.TIMESTAMP, dt.datetime(1970, 1, 1, 0, 0, 1)) == struct.pack(">q", 1000)
    assert encode_value(T.DATE, "1970-01-02") == struct.pack(">I", 2**31 + 1)
    assert encode_value(T.TIME, dt.time(0, 0, 1, 5)) == struct.pack(">q", 1_000_005_000)
    assert encode_value(T.VARINT, 128) == b"\x00\x80" and encode_value(T.VARINT, -129) == b"\xff\x7f"
    # Unknown custom types stay raw bytes (and register nothing in the driver's global type registry).
    assert decode_value(DataType.custom_type("x.Y"), b"\x01") == b"\x01"
    assert "x.Y" not in ct._casstypes
    big = decimal.Decimal(10**1000 + 1).scaleb(-3, decimal.Context(prec=decimal.MAX_PREC))  # exact, not float
    assert decode_value(T.DECIMAL, encode_value(T.DECIMAL, big)) == big
    for dtype, bad in [(T.INT, 2**31), (T.INT, "1"), (T.TEXT, b"x"), (T.ASCII, "é"), (T.DECIMAL, "NaN"),
                       (T.FLOAT, 1e300), (T.BOOLEAN, "no"), (UDT, {"nope": 1}), (T.INET, "nope"),
                       (DataType.list_of(T.INT), "ab")]:
        with pytest.raises(ValueError):
            encode_value(dtype, bad)
    for dtype, raw in [(T.INT, b"\x00"), (T.ASCII, b"\xff"), (T.TEXT, b"\xc3"), (T.INET, b"\x01\x02"),
                       (DataType.list_of(T.INT), b"\x00\x00\x00\x02\x00"), (T.DURATION, b"\xff\x00")]:
        with pytest.raises(CqlProtocolError):
            decode_value(dtype, raw)


# --------------------------------------------------------------------------- data types

NATIVE_TYPES = [t for tid, t in T.NATIVES.items() if tid not in (0x0A, 0x15)] + [T.DURATION]


def _data_types() -> st.SearchStrategy[DataType]:
    names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), min_size=1, max_size=8)

    def extend(inner: st.SearchStrategy[DataType]) -> st.SearchStrategy[DataType]:
        return st.one_of(
            inner.map(DataType.list_of),
            inner.map(DataType.set_of),
            st.builds(DataType.map_of, inner, inner),
            st.lists(inner, min_size=1, max_size=3).map(lambda ts: DataType.tuple_of(*ts)),
            st.builds(DataType.udt, names, names,
                      st.lists(st.tuples(names, inner), max_size=3, unique_by=lambda p: p[0])),
        )

    leaves = st.sampled_from(NATIVE_TYPES) | names.map(lambda n: DataType.custom_type("org.x." + n))
    return st.recursive(leaves, extend, max_leaves=6)


@FAST
@given(_data_types())
def test_data_type_option_and_name_round_trip(dtype: DataType) -> None:
    out = bytearray()
    W.write_option(out, dtype)
    reader = Reader(bytes(out))
    assert reader.read_option() == dtype and reader.remaining() == 0
    found: list[DataType] = []

    def collect(t: DataType) -> None:
        if t.type_id == T.TypeId.UDT:
            found.append(t)
        for p in t.params:
            collect(p)

    collect(dtype)
    udts = {t.name or "": t for t in found}
    if len(udts) == len(set(found)):  # the CQL spelling names user types only by name
        assert DataType.from_cql_name(dtype.cql_name(), udts) == dtype


def test_cql_names() -> None:
    nested = DataType.map_of(T.TEXT, DataType.list_of(T.INT))
    assert nested.cql_name() == "map<text, frozen<list<int>>>"
    assert DataType.from_cql_name("map<text, frozen<list<int>>>") == nested
    assert DataType.from_cql_name(" MAP < VARCHAR , list<INT> > ") == nested
    assert DataType.from_cql_name("duration") == T.DURATION and T.DURATION.cql_name() == "duration"
    assert DataType.from_cql_name("frozen<tuple<int, text>>") == DataType.tuple_of(T.INT, T.TEXT)
    assert DataType.from_cql_name("'org.x.Y'") == DataType.custom_type("org.x.Y")
    udt = DataType.udt("ks", "Addr", [("a", T.INT)])
    assert DataType.from_cql_name('list<frozen<"Addr">>', {"Addr": udt}) == DataType.list_of(udt)
    assert DataType.list_of(udt).cql_name() == 'list<frozen<"Addr">>'
    for bad in ("map<int>", "list<int", "nosuchtype", "list<int>>", ""):
        with pytest.raises(ValueError):
            DataType.from_cql_name(bad)


def test_reader_primitives() -> None:
    out = bytearray()
    W.write_string_multimap(out, {"k": ["a", "b"]})
    W.write_bytes_map(out, {"x": None, "y": b"1"})
    W.write_inet(out, ("192.168.0.1", 9042))
    W.write_inet(out, ("fe80::1", 1))
    W.write_uuid(out, uuid.UUID(int=5))
    W.write_option_list(out, [T.INT, DataType.list_of(T.TEXT)])
    W.write_value(out, UNSET)
    W.write_long(out, -5)
    W.write_consistency(out, T.Consistency.EACH_QUORUM)
    r = Reader(out)
    assert r.read_string_multimap() == {"k": ["a", "b"]}
    assert r.read_bytes_map() == {"x": None, "y": b"1"}
    assert r.read_inet() == ("192.168.0.1", 9042) and r.read_inet() == ("fe80::1", 1)
    assert r.read_uuid() == uuid.UUID(int=5)
    assert r.read_option_list() == [T.INT, DataType.list_of(T.TEXT)]
    assert r.read_value() is UNSET and r.read_long() == -5 and r.read_consistency() == T.Consistency.EACH_QUORUM
    assert r.remaining() == 0
    with pytest.raises(CqlProtocolError):
        Reader(b"\xff\xff\xff\xfd").read_value()
    with pytest.raises(CqlProtocolError):
        Reader(b"\x00\x20" * 100).read_option()  # nesting bound, not RecursionError


# --------------------------------------------------------------------------- fuzzing

REQUEST_OPCODES = [Opcode.STARTUP, Opcode.AUTH_RESPONSE, Opcode.OPTIONS, Opcode.QUERY, Opcode.PREPARE,
                   Opcode.EXECUTE, Opcode.BATCH, Opcode.REGISTER]
RESPONSE_OPCODES = [Opcode.ERROR, Opcode.READY, Opcode.AUTHENTICATE, Opcode.SUPPORTED, Opcode.RESULT,
                    Opcode.EVENT, Opcode.AUTH_CHALLENGE, Opcode.AUTH_SUCCESS]


@FUZZ
@given(st.binary(max_size=200), st.integers(1, 16))
def test_fuzz_frame_decoder(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder(compression=LZ4)
    with contextlib.suppress(CqlProtocolError):
        for i in range(0, len(data), chunk):
            for event in decoder.feed(data[i : i + chunk]):
                if isinstance(event, Frame):
                    with contextlib.suppress(CqlProtocolError):
                        decode_request(event)


@FUZZ
@given(st.sampled_from(REQUEST_OPCODES + RESPONSE_OPCODES + [4, 0x11, 0xFF]), st.binary(max_size=120),
       st.integers(0, 0x1F))
def test_fuzz_message_decoders(opcode: int, body: bytes, flags: int) -> None:
    for version, decode in ((0x04, decode_request), (0x84, decode_response)):
        try:
            decode(Frame(version, flags, 1, opcode, body))
        except CqlProtocolError as exc:
            assert exc.stream == 1


def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), min_size=1, max_size=4).map(
        lambda muts: bytes(_apply(base, muts))
    )


def _apply(base: bytes, muts: list[tuple[int, int]]) -> bytearray:
    out = bytearray(base)
    for pos, val in muts:
        out[pos] = val
    return out


REQUEST_BODIES = [(m.opcode, encode_request(m)[9:]) for m in _requests()]
RESPONSE_BODIES = [(m.opcode, encode_response(m)[9:]) for m in _responses() if encode_response(m)[9:]]


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_bodies(data: st.DataObject) -> None:
    opcode, body = data.draw(st.sampled_from([b for b in REQUEST_BODIES if b[1]]))
    with contextlib.suppress(CqlProtocolError):
        decode_request_body(opcode, data.draw(_mutations(body)))
    opcode, body = data.draw(st.sampled_from(RESPONSE_BODIES))
    with contextlib.suppress(CqlProtocolError):
        decode_response_body(opcode, data.draw(_mutations(body)))


@FUZZ
@given(_data_types(), st.binary(max_size=64))
def test_fuzz_value_decoder(dtype: DataType, raw: bytes) -> None:
    with contextlib.suppress(CqlProtocolError):
        decode_value(dtype, raw)


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_options_and_lz4(raw: bytes) -> None:
    for action in (lambda: Reader(raw).read_option(), lambda: LZ4.decompress(raw)):
        with contextlib.suppress(CqlProtocolError):
            action()


@FUZZ
@given(st.text(st.characters(max_codepoint=0x7F), max_size=40) | st.sampled_from(
    ["map<text, frozen<list<int>>>", "tuple<int, text>", "'org.x.Y'", 'frozen<"Addr">', "list<int>>"]))
def test_fuzz_type_names(text: str) -> None:
    """The CQL type-name parser (system_schema's spelling) fails only with ValueError, and never too deep."""
    with contextlib.suppress(ValueError):
        DataType.from_cql_name(text)
    with contextlib.suppress(ValueError):
        DataType.from_cql_name("list<" * 200 + "int" + ">" * 200)


@FUZZ
@given(st.text(max_size=60).map(lambda s: "SELECT " + s + " FROM system.local") | st.text(max_size=60))
def test_fuzz_system_table_projections(query: str) -> None:
    projection = parse_projection(query)
    assert projection is None or all(isinstance(c, str) and isinstance(a, str) for c, a in projection)


@pytest.mark.parametrize("message", _requests() + _responses(), ids=lambda m: type(m).__name__)
def test_truncated_frames_are_incomplete(message: Any) -> None:
    if message.opcode in REQUEST_OPCODES:
        data = encode_request(message, 2, custom_payload=PAYLOAD)
    else:
        data = encode_response(message, 2, warnings=["w"])
    for cut in range(len(data)):
        decoder = FrameDecoder()
        assert list(decoder.feed(data[:cut])) == []
        assert decoder.buffered == cut
        (frame,) = list(decoder.feed(data[cut:]))
        assert frame.body == data[9:]


def test_truncated_bodies_are_protocol_errors() -> None:
    for opcode, body in REQUEST_BODIES:
        for cut in range(len(body)):
            with contextlib.suppress(CqlProtocolError):
                decode_request_body(opcode, body[:cut])
    for opcode, body in RESPONSE_BODIES:
        for cut in range(len(body)):
            with pytest.raises(CqlProtocolError):
                decode_response_body(opcode, body[:cut])


# --------------------------------------------------------------------------- statement classifier

S = StatementKind
CLASSIFY_TABLE: list[tuple[str, dict[str, Any]]] = [
    ("SELECT * FROM system.local WHERE key='local'",
     {"kind": S.SELECT, "keyspace": "system", "table": "local", "is_system": True, "cols": {"key": "local"}}),
    ("select peer, data_center, rpc_address from system.peers",
     {"kind": S.SELECT, "keyspace": "system", "table": "peers", "is_system": True}),
    ("SELECT * FROM system.peers_v2;", {"kind": S.SELECT, "table": "peers_v2", "is_system": True}),
    ("SELECT keyspace_name FROM system_schema.keyspaces", {"kind": S.SELECT, "keyspace": "system_schema",
                                                           "is_system": True}),
    ("SELECT * FROM systemic.t", {"kind": S.SELECT, "is_system": False}),
    ("SELECT JSON a, writetime(b), CAST(c AS text) FROM Ks.Tbl WHERE id = ? AND ck > 5 LIMIT 10",
     {"kind": S.SELECT, "keyspace": "ks", "table": "tbl", "json": True, "binds": 1, "cols": {"id": 0}}),
    ('SELECT "Col" FROM "MyKs"."MyTable" WHERE "Id" IN (1, 2) ORDER BY ck DESC',
     {"kind": S.SELECT, "keyspace": "MyKs", "table": "MyTable", "in": {"Id": [1, 2]}}),
    ("SELECT count(*) FROM t WHERE token(id) > ? PER PARTITION LIMIT 1 ALLOW FILTERING",
     {"kind": S.SELECT, "keyspace": None, "table": "t", "cols": {}, "binds": 1}),
    ("INSERT INTO ks.users (id, name) VALUES (?, ?)",
     {"kind": S.INSERT, "keyspace": "ks", "table": "users", "cols": {"id": 0, "name": 1}, "binds": 2}),
    ("insert into KS.Users (ID, \"Name\") values (5, 'O''Brien') -- trailing comment",
     {"kind": S.INSERT, "keyspace": "ks", "table": "users", "cols": {"id": 5, "Name": "O'Brien"}}),
    ("INSERT INTO t (k, v) VALUES (:k, :v) IF NOT EXISTS",
     {"kind": S.INSERT, "conditional": True, "cols": {"k": ":k", "v": ":v"}}),
    ("INSERT INTO t (k, v) VALUES (1, 2) USING TTL 60 AND TIMESTAMP 1700000000000000;",
     {"kind": S.INSERT, "timestamp": 1700000000000000, "ttl": 60, "conditional": False}),
    ("INSERT INTO t (k, v) VALUES (?, ?) USING TIMESTAMP ?",
     {"kind": S.INSERT, "timestamp": "?2", "ttl": None, "binds": 3}),
    ("INSERT INTO t (k, u, b, f, n, x) VALUES (-3, 123e4567-e89b-12d3-a456-426614174000, 0xcafe, 1.5, null, now())",
     {"kind": S.INSERT, "cols": {"k": -3, "u": uuid.UUID("123e4567-e89b-12d3-a456-426614174000"),
                                 "b": b"\xca\xfe", "f": 1.5, "n": None, "x": TermKind.EXPRESSION}}),
    ("INSERT INTO t (k, m, s, d) VALUES (1, {'a': true, 'b': :v}, {1, 2}, 1h30m)",
     {"kind": S.INSERT, "binds": 1,
      "cols": {"k": 1, "m": TermKind.EXPRESSION, "s": TermKind.EXPRESSION, "d": TermKind.EXPRESSION}}),
    ("INSERT INTO t (k, body) VALUES (1, $$it's -- not a comment$$)",
     {"kind": S.INSERT, "cols": {"k": 1, "body": "it's -- not a comment"}}),
    ("INSERT INTO ks.t JSON '{\"id\": 7, \"\\\"Name\\\"\": \"x\"}' DEFAULT UNSET",
     {"kind": S.INSERT, "json": True, "cols": {"id": 7, "Name": "x"}}),
    ("INSERT INTO ks.t JSON ? IF NOT EXISTS", {"kind": S.INSERT, "json": True, "conditional": True, "binds": 1}),
    ("UPDATE ks.t SET v = ?, w = 'x' WHERE k = ? AND ck = 3",
     {"kind": S.UPDATE, "cols": {"k": 1, "ck": 3}, "assign": {"v": 0, "w": "x"}, "counter": False}),
    ("UPDATE ks.t USING TTL 10 SET v = 1 WHERE k = 'a' IF v = 0",
     {"kind": S.UPDATE, "ttl": 10, "conditional": True, "cols": {"k": "a"}}),
    ("UPDATE t SET v = 1 WHERE k = 1 IF EXISTS", {"kind": S.UPDATE, "conditional": True}),
    ("UPDATE ks.page_views SET views = views + 1 WHERE url = ?",
     {"kind": S.UPDATE, "counter": True, "cols": {"url": 0}, "assign": {}}),
    ("UPDATE ks.c SET n = n - ?, m += 2 WHERE k = :k", {"kind": S.UPDATE, "counter": True, "cols": {"k": ":k"}}),
    ("UPDATE t SET l = l + [1], s = {'a'} + s WHERE k = 1",
     {"kind": S.UPDATE, "counter": False, "assign": {}}),
    ("UPDATE t SET m['x'] = 1, u.f = 2 WHERE k IN ?", {"kind": S.UPDATE, "in": {"k": "?0"}}),
    ("DELETE FROM ks.t WHERE k = 1", {"kind": S.DELETE, "keyspace": "ks", "cols": {"k": 1}}),
    ("DELETE v, m['a'] FROM t USING TIMESTAMP 5 WHERE k = ? IF EXISTS",
     {"kind": S.DELETE, "timestamp": 5, "conditional": True, "cols": {"k": 0}}),
    ("/* leading */ DELETE FROM \"T\" WHERE \"K\" = 'v' // trailing",
     {"kind": S.DELETE, "table": "T", "cols": {"K": "v"}}),
    ("BEGIN BATCH INSERT INTO ks.t (k, v) VALUES (?, ?); UPDATE ks.t SET v = ? WHERE k = ?; APPLY BATCH",
     {"kind": S.BATCH, "batch_type": "LOGGED", "keyspace": "ks", "table": "t", "binds": 4, "children": 2}),
    ("BEGIN UNLOGGED BATCH USING TIMESTAMP 42\n INSERT INTO a (k) VALUES (1)\n DELETE FROM b WHERE k = 2\n"
     "APPLY BATCH;", {"kind": S.BATCH, "batch_type": "UNLOGGED", "timestamp": 42, "table": None, "children": 2}),
    ("begin counter batch update c set n = n + 1 where k = 1; apply batch",
     {"kind": S.BATCH, "batch_type": "COUNTER", "counter": True, "children": 1}),
    ("BEGIN BATCH INSERT INTO t (k) VALUES (1) IF NOT EXISTS APPLY BATCH",
     {"kind": S.BATCH, "conditional": True}),
    ("BEGIN BATCH SELECT * FROM t APPLY BATCH", {"kind": S.BATCH, "error": True}),
    ("TRUNCATE ks.t", {"kind": S.TRUNCATE, "keyspace": "ks", "table": "t"}),
    ("TRUNCATE TABLE \"Events\"", {"kind": S.TRUNCATE, "table": "Events"}),
    ("USE \"MyKs\"", {"kind": S.USE, "keyspace": "MyKs"}),
    ("use system", {"kind": S.USE, "keyspace": "system", "is_system": True}),
    ("CREATE KEYSPACE IF NOT EXISTS ks WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
     {"kind": S.DDL, "object": "KEYSPACE", "keyspace": "ks", "conditional": True}),
    ("CREATE TABLE ks.t (k int PRIMARY KEY, v map<text, frozen<list<int>>>)",
     {"kind": S.DDL, "object": "TABLE", "keyspace": "ks", "table": "t"}),
    ("ALTER TABLE t ADD c int", {"kind": S.DDL, "object": "TABLE", "table": "t"}),
    ("DROP TABLE IF EXISTS ks.t;", {"kind": S.DDL, "object": "TABLE", "conditional": True, "table": "t"}),
    ("CREATE INDEX IF NOT EXISTS idx ON ks.t (v)", {"kind": S.DDL, "object": "INDEX", "table": "t"}),
    ("CREATE MATERIALIZED VIEW ks.mv AS SELECT * FROM ks.t WHERE v IS NOT NULL PRIMARY KEY (v, k)",
     {"kind": S.DDL, "object": "MATERIALIZED VIEW", "table": "mv"}),
    ("CREATE OR REPLACE FUNCTION ks.f (a int) RETURNS NULL ON NULL INPUT RETURNS int LANGUAGE java AS $$ return a; $$",
     {"kind": S.DDL, "object": "FUNCTION", "keyspace": "ks"}),
    ("DROP INDEX ks.idx", {"kind": S.DDL, "object": "INDEX", "keyspace": "ks", "table": None}),
    ("GRANT SELECT ON KEYSPACE ks TO alice", {"kind": S.DDL}),
    ("LIST ROLES", {"kind": S.OTHER, "error": False}),
    ("SELECT * FROM t WHERE k = 1; DROP TABLE t", {"kind": S.SELECT, "error": True}),
    ("INSERT INTO t (k) VALUES ('unterminated)", {"kind": S.OTHER, "error": True}),
    ("SELECT * FROM t /* unterminated", {"kind": S.OTHER, "error": True}),
    ("INSERT INTO t (a, b) VALUES (1)", {"kind": S.INSERT, "error": True}),
    ("   ;  ", {"kind": S.OTHER, "error": True}),
]


def _term_matches(term: Any, expected: Any) -> bool:
    if isinstance(expected, TermKind):
        return term.kind == expected
    if isinstance(expected, str) and expected.startswith(":"):
        return term.kind == TermKind.BIND and term.bind_name == expected[1:]
    if isinstance(expected, str) and expected.startswith("?"):
        return term.bind_index == int(expected[1:])
    if isinstance(expected, int) and not isinstance(expected, bool) and term.kind == TermKind.BIND:
        return term.bind_index == expected
    return term.is_literal and term.value == expected


@pytest.mark.parametrize(("cql", "expected"), CLASSIFY_TABLE, ids=[c[:40] for c, _ in CLASSIFY_TABLE])
def test_classify(cql: str, expected: dict[str, Any]) -> None:
    s = classify(cql)
    simple = {"kind": "kind", "keyspace": "keyspace", "table": "table", "conditional": "conditional",
              "is_system": "is_system", "json": "json", "binds": "bind_count", "counter": "counter_update",
              "batch_type": "batch_type", "object": "object_type"}
    for key, attr in simple.items():
        if key in expected:
            assert getattr(s, attr) == expected[key], (key, s)
    if "error" in expected:
        assert (s.error is not None) == expected["error"], s
    else:
        assert s.error is None, s
    for key in ("timestamp", "ttl"):
        if key in expected:
            term = getattr(s, key)
            assert (term is None) if expected[key] is None else _term_matches(term, expected[key]), (key, s)
    for key, attr in (("cols", "columns"), ("assign", "assignments")):
        if key in expected:
            got = getattr(s, attr)
            assert set(got) == set(expected[key]), (key, got)
            for col, want in expected[key].items():
                assert _term_matches(got[col], want), (col, got[col])
    for col, want in expected.get("in", {}).items():
        term = s.columns[col]
        assert term.kind == TermKind.IN
        if isinstance(want, str):
            assert _term_matches(term, want)
        else:
            assert [t.value for t in term.items] == want
    if "children" in expected:
        assert len(s.statements) == expected["children"]


def test_classify_batch_children_keep_global_bind_positions() -> None:
    s = classify("BEGIN BATCH INSERT INTO t (k, v) VALUES (?, ?) UPDATE t SET v = ? WHERE k = ? APPLY BATCH")
    insert, update = s.statements
    assert (insert.kind, update.kind) == (S.INSERT, S.UPDATE)
    assert insert.columns["k"].bind_index == 0 and update.columns["k"].bind_index == 3
    assert update.assignments["v"].bind_index == 2 and s.bind_count == 4


@FAST
@given(st.text(max_size=80))
def test_classify_never_raises(text: str) -> None:
    assert classify(text).kind in set(StatementKind)
