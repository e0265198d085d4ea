"""The sans-I/O memcached codec: request parsing, response encoding, backend side.

Expected bytes marked "1.6.18" were captured from a real memcached 1.6.18.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sidecar.protocols.memcache.client_codec import (
    BackendProtocolError,
    ResponseKind,
    ResponseParser,
    encode_command,
    encode_decr,
    encode_delete,
    encode_gat,
    encode_get,
    encode_incr,
    encode_meta_get,
    encode_meta_set,
    encode_store,
    encode_touch,
    passthrough,
    response_kind,
    strip_quiet,
)
from sidecar.protocols.memcache.codec import (
    DELETED,
    END,
    EXISTS,
    MN,
    NOT_FOUND,
    NOT_STORED,
    OK,
    STORED,
    TOUCHED,
    RequestParser,
    encode_client_error,
    encode_meta,
    encode_meta_debug,
    encode_meta_response,
    encode_number,
    encode_server_error,
    encode_stats,
    encode_value,
    encode_values,
    encode_version,
    meta_return_flags,
    quiet_suppresses,
)
from sidecar.protocols.memcache.commands import (
    NEED_DATA,
    ClientError,
    CommandError,
    Delete,
    ErrorResponse,
    FlushAll,
    IncrDecr,
    MetaArithmetic,
    MetaDebug,
    MetaDebugInfo,
    MetaDelete,
    MetaGet,
    MetaNoop,
    MetaResponse,
    MetaSet,
    Number,
    ProtocolError,
    Quit,
    Retrieve,
    ServerError,
    Stats,
    StatsReport,
    Status,
    Store,
    Touch,
    ValueItem,
    Values,
    Verbosity,
    Version,
    VersionInfo,
)

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def drain(parser: RequestParser | ResponseParser) -> list:
    events = []
    while (event := parser.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def parse_chunks(chunks: Iterable[bytes], **limits: int) -> tuple[list, RequestParser]:
    """Feed chunk by chunk, draining events after each feed like a server would."""
    parser = RequestParser(**limits)
    events: list = []
    for chunk in chunks:
        parser.feed(chunk)
        events += drain(parser)
    return events, parser


def parse(data: bytes, **limits: int) -> list:
    return parse_chunks([data], **limits)[0]


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({0, len(data), *cuts})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def parse_responses(kinds: Iterable[ResponseKind], chunks: Iterable[bytes]) -> list:
    parser = ResponseParser()
    for kind in kinds:
        parser.expect(kind)
    events: list = []
    for chunk in chunks:
        parser.feed(chunk)
        events += drain(parser)
    assert parser.pending == 0
    return events


# --------------------------------------------------------------------------- round trips

ALL_COMMANDS = [
    Retrieve("get", [b"a"]),
    Retrieve("get", [b"a", b"b", b"c"]),
    Retrieve("gets", [b"k"]),
    Retrieve("gat", [b"k1", b"k2"], 30),
    Retrieve("gats", [b"k"], -1),
    Store("set", b"k", b"v\r\nx", 42, 100),
    Store("add", b"k", b"", 0, 0, None, True),
    Store("replace", b"k", b"v", 2**32 - 1, -5),
    Store("append", b"k", b"tail"),
    Store("prepend", b"k", b"head", noreply=True),
    Store("cas", b"k", b"v", 1, 2, 2**64 - 1),
    Store("cas", b"k", b"v", 1, 2, 7, True),
    Delete(b"k"),
    Delete(b"k", True),
    IncrDecr("incr", b"n", 2**64 - 1),
    IncrDecr("decr", b"n", 3, True),
    Touch(b"k", 60),
    Touch(b"k", 0, True),
    Stats(),
    Stats([b"items"]),
    Stats([b"cachedump", b"1", b"10"]),
    Version(),
    Verbosity(1),
    Verbosity(2, True),
    FlushAll(),
    FlushAll(0, True),
    FlushAll(30),
    FlushAll(-1, True),
    Quit(),
    MetaGet(b"k", {"v": b"", "k": b"", "O": b"123", "T": b"30", "q": b""}),
    MetaGet(b"\x00binary key\xff", {"b": b"", "v": b"", "N": b"30", "R": b"5"}),
    MetaSet(b"k", {"T": b"0", "F": b"7", "M": b"E", "c": b""}, b"value\r\n"),
    MetaSet(b"k", {}, b""),
    MetaSet(b"\x01\x02", {"b": b"", "C": b"99", "I": b""}, b"v"),
    MetaDelete(b"k", {"q": b"", "C": b"5", "I": b"", "T": b"30"}),
    MetaArithmetic(b"n", {"M": b"D", "D": b"5", "N": b"0", "J": b"10", "v": b"", "t": b""}),
    MetaArithmetic(b"n", {}),
    MetaDebug(b"k"),
    MetaDebug(b"\xff\x00", True),
    MetaNoop(),
]


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=repr)
def test_every_command_round_trips(command) -> None:
    wire = encode_command(command)
    assert parse(wire) == [command]
    # Byte by byte too: exercises every partial-line and partial-value path.
    assert parse_chunks([wire[i : i + 1] for i in range(len(wire))])[0] == [command]


def test_convenience_encoders_match_memcached_syntax() -> None:
    assert encode_get([b"a", b"b"]) == b"get a b\r\n"
    assert encode_get([b"a"], cas=True) == b"gets a\r\n"
    assert encode_gat(30, [b"k1", b"k2"], cas=True) == b"gats 30 k1 k2\r\n"
    assert encode_store("set", b"k", b"abc", flags=5, exptime=10) == b"set k 5 10 3\r\nabc\r\n"
    assert encode_store("cas", b"k", b"a", cas=9, noreply=True) == b"cas k 0 0 1 9 noreply\r\na\r\n"
    assert encode_delete(b"k", noreply=True) == b"delete k noreply\r\n"
    assert encode_incr(b"k", 5) == b"incr k 5\r\n"
    assert encode_decr(b"k", 5, noreply=True) == b"decr k 5 noreply\r\n"
    assert encode_touch(b"k", 10) == b"touch k 10\r\n"
    assert encode_meta_get(b"k", {"v": b"", "O": 12, "T": "30"}) == b"mg k v O12 T30\r\n"
    assert encode_meta_set(b"k", b"hi", {"T": 0}) == b"ms k 2 T0\r\nhi\r\n"
    with pytest.raises(ValueError):
        encode_store("cas", b"k", b"v")


# --------------------------------------------------------------------------- specific cases


def test_key_length_limit() -> None:
    ok, too_long = b"k" * 250, b"k" * 251
    assert parse(b"get " + ok + b"\r\n") == [Retrieve("get", [ok])]
    [error] = parse(b"get " + too_long + b"\r\n")
    assert error.response == b"CLIENT_ERROR bad command line format\r\n"
    assert not error.fatal
    # memcached does not swallow the data of a refused set: it is read as a command.
    events = parse(b"set " + too_long + b" 0 0 5\r\nhello\r\nmn\r\n")
    assert [e.response for e in events[:2]] == [b"CLIENT_ERROR bad command line format\r\n", b"ERROR\r\n"]
    assert events[2] == MetaNoop()
    assert parse(b"mg " + too_long + b" v\r\n") == [ClientError("bad command line format")]
    # The limit is configurable.
    assert parse(b"get abcd\r\n", max_key_length=3) == [ClientError("bad command line format")]


def test_control_characters_in_keys_are_refused() -> None:
    assert parse(b"get a\x01b\r\n") == [ClientError("bad command line format")]
    assert parse(b"delete a\tb noreply\r\n") == [ClientError("bad command line format", noreply=True)]
    # Non-ASCII bytes are fine, as in memcached.
    assert parse("get ключ\r\n".encode()) == [Retrieve("get", ["ключ".encode()])]


def test_bad_data_chunk_is_fatal() -> None:
    events, parser = parse_chunks([b"set k 0 0 5\r\nhelloXX\r\n", b"get k\r\n"])
    assert events == [ClientError("bad data chunk", fatal=True)]
    assert events[0].response == b"CLIENT_ERROR bad data chunk\r\n"
    assert parser.broken
    parser.feed(b"get k\r\n")
    assert parser.next_event() is NEED_DATA
    # With noreply memcached would not even answer.
    [error] = parse(b"set k 0 0 1 noreply\r\nxyz\r\n")
    assert error.fatal and error.response == b""
    # ms always answers errors.
    assert parse(b"ms k 1 q\r\nxyz\r\n") == [ClientError("bad data chunk", fatal=True)]


@pytest.mark.parametrize("noreply", [False, True])
def test_too_large_value_is_swallowed(noreply: bool) -> None:
    suffix = b" noreply" if noreply else b""
    data = b"set k 0 0 100" + suffix + b"\r\n" + b"\r\n" * 50 + b"\r\nget k\r\n"
    expected = [ServerError("object too large for cache", noreply=noreply), Retrieve("get", [b"k"])]
    for chunks in ([data], [data[:20], data[20:60], data[60:]], [data[i : i + 7] for i in range(0, len(data), 7)]):
        events, parser = parse_chunks(chunks, max_item_size=99)
        assert events == expected
        assert parser.idle and not parser.broken
    assert expected[0].response == (b"" if noreply else b"SERVER_ERROR object too large for cache\r\n")
    # Exactly max_item_size is fine.
    assert parse(b"set k 0 0 3\r\nabc\r\n", max_item_size=3) == [Store("set", b"k", b"abc")]


def test_meta_set_errors_swallow_the_data_block() -> None:
    assert parse(b"ms k 3 x\r\nabc\r\nmn\r\n") == [ClientError("invalid flag"), MetaNoop()]
    assert parse(b"ms k 3 T0 MX\r\nabc\r\nmn\r\n") == [ClientError("invalid mode for ms M token"), MetaNoop()]
    assert parse(b"ms k 5 q\r\nhello\r\nmn\r\n", max_item_size=4) == [
        ServerError("object too large for cache"),
        MetaNoop(),
    ]
    # Without a usable length there is nothing to swallow (1.6.18: then ERROR for "abc").
    assert parse(b"ms k x\r\nabc\r\n") == [ClientError("bad command line format"), CommandError("unknown command")]
    assert parse(b"ms k\r\n") == [ClientError("bad command line format")]


def test_multi_key_and_touch_retrievals() -> None:
    assert parse(b"get a b c\r\n") == [Retrieve("get", [b"a", b"b", b"c"])]
    assert parse(b"gets  a   b \r\n") == [Retrieve("gets", [b"a", b"b"])]
    assert parse(b"gat 30 k1 k2\r\n") == [Retrieve("gat", [b"k1", b"k2"], 30)]
    assert parse(b"gats -1 k\r\n") == [Retrieve("gats", [b"k"], -1)]
    assert parse(b"gat 30\r\n") == [Retrieve("gat", [], 30)]  # 1.6.18 answers END
    assert parse(b"gat x k\r\n") == [ClientError("invalid exptime argument")]
    assert parse(b"get\r\n")[0].response == b"ERROR\r\n"
    assert parse(b"get a " + b"b" * 251 + b"\r\n") == [ClientError("bad command line format")]


def test_meta_base64_key() -> None:
    key = b"\x00\x01bin key"
    wire = base64.b64encode(key)
    [event] = parse(b"mg " + wire + b" b v k\r\n")
    assert event == MetaGet(key, {"b": b"", "v": b"", "k": b""})
    assert event.base64 and event.wire_key == wire
    assert encode_command(event) == b"mg " + wire + b" b v k\r\n"
    assert parse(b"mg !!!! b\r\n") == [ClientError("error decoding key")]
    assert parse(b"mg YQ b v\r\n") == [ClientError("error decoding key")]
    assert parse(b"md YQ b\r\n") == [ClientError("invalid or duplicate flag")]
    assert parse(b"me " + wire + b" b\r\n") == [MetaDebug(key, True)]


def test_mn_keeps_pipeline_order() -> None:
    data = b"mg a q v\r\nmg b q v\r\nms c 1 q\r\nx\r\nmn\r\nmd d q\r\nmn\r\n"
    events = parse(data)
    assert [type(e) for e in events] == [MetaGet, MetaGet, MetaSet, MetaNoop, MetaDelete, MetaNoop]
    assert all(e.quiet for e in events if not isinstance(e, MetaNoop))
    assert parse(b"mn extra tokens\r\n") == [MetaNoop()]


def test_noreply_parsing() -> None:
    assert parse(b"set k 1 2 1 noreply\r\nx\r\n") == [Store("set", b"k", b"x", 1, 2, None, True)]
    # A trailing token that is not "noreply" is ignored, as memcached does.
    assert parse(b"set k 1 2 1 foo\r\nx\r\n") == [Store("set", b"k", b"x", 1, 2, None, False)]
    assert parse(b"incr k 1 noreply\r\n") == [IncrDecr("incr", b"k", 1, True)]
    assert parse(b"touch k 1 noreply\r\n") == [Touch(b"k", 1, True)]
    assert parse(b"delete k noreply\r\n") == [Delete(b"k", True)]
    assert parse(b"delete k 0 noreply\r\n") == [Delete(b"k", True)]
    assert parse(b"delete k 0\r\n") == [Delete(b"k", False)]
    [error] = parse(b"delete k 5\r\n")
    assert error.response == b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
    [error] = parse(b"delete k 5 noreply\r\n")
    assert error.noreply and error.response == b""
    # Errors of noreply text commands are silent in memcached (1.6.18).
    [error] = parse(b"set k abc 0 5 noreply\r\n")
    assert error == ClientError("bad command line format", noreply=True) and error.response == b""


def test_flush_all_and_verbosity() -> None:
    assert parse(b"flush_all 0 noreply\r\n") == [FlushAll(0, True)]
    assert parse(b"flush_all noreply\r\n") == [FlushAll(0, True)]
    assert parse(b"flush_all\r\n") == [FlushAll(0, False)]
    assert parse(b"flush_all 10\r\n") == [FlushAll(10, False)]
    assert parse(b"flush_all -1\r\n") == [FlushAll(-1, False)]
    assert parse(b"flush_all x\r\n") == [ClientError("invalid exptime argument")]
    assert parse(b"flush_all 1 2 3\r\n")[0].response == b"ERROR\r\n"
    assert parse(b"verbosity 1\r\n") == [Verbosity(1, False)]
    assert parse(b"verbosity 1 noreply\r\n") == [Verbosity(1, True)]
    assert parse(b"verbosity x\r\n") == [ClientError("bad command line format")]
    assert parse(b"verbosity\r\n")[0].response == b"ERROR\r\n"


@pytest.mark.parametrize(
    "line",
    [b"incr k abc", b"incr k -1", b"incr k 18446744073709551616", b"decr k 1.5", b"incr k 1_0"],
)
def test_incr_with_bad_delta(line: bytes) -> None:
    [error] = parse(line + b"\r\n")
    assert error.response == b"CLIENT_ERROR invalid numeric delta argument\r\n"


def test_numbers_are_range_checked() -> None:
    assert parse(b"set k 4294967295 -1 1\r\nx\r\n") == [Store("set", b"k", b"x", 2**32 - 1, -1)]
    for line in (b"set k 4294967296 0 1", b"set k -1 0 1", b"set k 0 2147483648 1", b"set k 0 0 -1"):
        assert parse(line + b"\r\n") == [ClientError("bad command line format")], line
    assert parse(b"cas k 0 0 1 18446744073709551616\r\n") == [ClientError("bad command line format")]
    assert parse(b"touch k x\r\n") == [ClientError("invalid exptime argument")]
    # Leading zeros are fine, like strtoul.
    assert parse(b"incr k " + b"0" * 40 + b"7\r\n") == [IncrDecr("incr", b"k", 7)]


def test_unknown_commands_and_arity() -> None:
    for line in (b"bogus", b"GET a", b"", b"   ", b"set k 0 0", b"cas k 0 0 1", b"mx k", b"mg", b"touch k", b"gat"):
        [event] = parse(line + b"\r\n")
        assert type(event) is CommandError and event.response == b"ERROR\r\n", line
    assert parse(b"me\r\n") == [ClientError("bad command line format")]
    events, parser = parse_chunks([b"GET / HTTP/1.1\r\nHost: x\r\n"])
    assert len(events) == 1 and events[0].fatal and events[0].response == b"" and parser.broken


def test_bare_newlines_and_partial_lines() -> None:
    assert parse(b"get a\nmn\n") == [Retrieve("get", [b"a"]), MetaNoop()]
    events, parser = parse_chunks([b"get a", b"\r", b"\n", b"set k 0 0 1\r\n", b"x", b"\r"])
    assert events == [Retrieve("get", [b"a"])]
    assert not parser.idle
    parser.feed(b"\n")
    assert drain(parser) == [Store("set", b"k", b"x")]
    assert parser.idle


def test_line_too_long_is_fatal() -> None:
    events, parser = parse_chunks([b"set " + b"k" * 9000], max_line_length=8192)
    assert events == [ClientError("line too long", fatal=True)]
    assert parser.broken
    # Same verdict when the whole line arrives at once.
    assert parse(b"stats " + b"x" * 9000 + b"\r\n") == [ClientError("line too long", fatal=True)]
    # Multi-key gets may be longer, like in memcached.
    keys = [b"key%05d" % i for i in range(2000)]
    assert parse(encode_get(keys)) == [Retrieve("get", keys)]
    events = parse(encode_get(keys), max_multiget_line_length=10_000)
    assert events == [ClientError("line too long", fatal=True)]


def test_meta_flag_errors_match_memcached() -> None:
    assert parse(b"mg k v v\r\n") == [ClientError("duplicate flag")]
    assert parse(b"mg k x\r\n") == [ClientError("invalid flag")]
    assert parse(b"mg k E5\r\n") == [ClientError("invalid flag")]  # E is newer than 1.6.18
    assert parse(b"mg k Tabc\r\n") == [ClientError("bad token in command line format")]
    assert parse(b"mg k F-1\r\n") == [ClientError("bad command line format")]
    assert parse(b"mg k T Cx F-1\r\n") == [ClientError("bad token in command line format")]  # 1.6.18
    assert parse(b"mg k F-1 Tx\r\n") == [ClientError("bad token in command line format")]
    assert parse(b"mg k D5\r\n") == [MetaGet(b"k", {"D": b"5"})]  # every known flag is accepted
    assert parse(b"md k x\r\n") == [ClientError("invalid or duplicate flag")]
    assert parse(b"ma n Dx\r\n") == [ClientError("invalid or duplicate flag")]
    assert parse(b"ma n MX\r\n") == [ClientError("invalid mode for ma M token")]
    assert parse(b"ma n MDD\r\n") == [ClientError("invalid or duplicate flag")]
    assert parse(b"mg k O" + b"1" * 31 + b"\r\n") == [MetaGet(b"k", {"O": b"1" * 31})]
    assert parse(b"mg k O" + b"1" * 32 + b"\r\n") == [ClientError("opaque token too long")]
    seventeen = b"mg k s t f c h l u q v k I P L O1 T5 N5 R5"
    assert len(parse(seventeen + b"\r\n")[0].flags) == 17
    assert parse(seventeen + b" D5\r\n") == [ClientError("options flags are too long")]
    assert parse(b"md k a b c d e f g h i j k l m n o p q r\r\n") == [ClientError("options flags too long")]


def test_more_meta_limits() -> None:
    seventeen = b"ms k 1 s t f c h l u q v k I P L O1 T5 N5 R5"
    # Refused before the length is read, so not swallowed (1.6.18 then answers ERROR to "x").
    events = parse(seventeen + b"\r\nx\r\n")
    assert [e.response for e in events] == [b"CLIENT_ERROR options flags too long\r\n", b"ERROR\r\n"]
    assert len(parse(b"ms k 1 s t f c h l u q v k I P L O1 T5 N5\r\nx\r\n")[0].flags) == 16
    assert parse(b"ms k 1 O" + b"1" * 32 + b"\r\nx\r\nmn\r\n") == [ClientError("opaque token too long"), MetaNoop()]
    assert parse(b"ms k -1 T0\r\n") == [ClientError("bad command line format")]


def test_large_values_in_small_chunks() -> None:
    value = bytes(range(256)) * 400  # 100 KiB, with plenty of \r\n inside
    wire = encode_store("set", b"big", value) + encode_meta_set(b"big", value)
    chunks = [wire[i : i + 1000] for i in range(0, len(wire), 1000)]
    assert parse_chunks(chunks)[0] == [Store("set", b"big", value), MetaSet(b"big", {}, value)]
    values_wire = encode_values([ValueItem(b"big", 0, value)])
    meta_wire = encode_meta(b"VA", b"", value)
    answer = values_wire + meta_wire
    chunks = [answer[i : i + 1000] for i in range(0, len(answer), 1000)]
    assert parse_responses([ResponseKind.VALUES, ResponseKind.META], chunks) == [
        Values([ValueItem(b"big", 0, value)], values_wire),
        MetaResponse(b"VA", {}, value, meta_wire),
    ]


def test_meta_helpers() -> None:
    ms = parse(b"ms k 1 F7 T30 ME C9 q O1\r\nx\r\n")[0]
    assert (ms.client_flags, ms.ttl, ms.store_command, ms.compare_cas, ms.quiet, ms.opaque) == (
        7,
        30,
        "add",
        9,
        True,
        b"1",
    )
    assert parse(b"ms k 1 C9\r\nx\r\n")[0].store_command == "cas"
    ma = parse(b"ma n M- D5 J3 N60\r\n")[0]
    assert (ma.incr, ma.delta, ma.initial, ma.vivify_ttl) == (False, 5, 3, 60)
    assert (MetaArithmetic(b"n").incr, MetaArithmetic(b"n").delta) == (True, 1)
    assert strip_quiet(ms).flags == {"F": b"7", "T": b"30", "M": b"E", "C": b"9", "O": b"1"}


# --------------------------------------------------------------------------- server responses


def test_text_response_encoders() -> None:
    assert encode_value(b"k", 5, b"abc") == b"VALUE k 5 3\r\nabc\r\n"
    assert encode_value(b"k", 5, b"abc", 7) == b"VALUE k 5 3 7\r\nabc\r\n"
    items = [ValueItem(b"a", 0, b"1", 3), ValueItem(b"b", 2, b"", 4)]
    assert encode_values(items) == b"VALUE a 0 1\r\n1\r\nVALUE b 2 0\r\n\r\nEND\r\n"
    assert encode_values(items, with_cas=True) == b"VALUE a 0 1 3\r\n1\r\nVALUE b 2 0 4\r\n\r\nEND\r\n"
    assert encode_values([]) == END
    assert encode_number(18446744073709551615) == b"18446744073709551615\r\n"
    assert encode_version("1.6.18") == b"VERSION 1.6.18\r\n"
    assert encode_stats({"pid": 1, "uptime": 2}) == b"STAT pid 1\r\nSTAT uptime 2\r\nEND\r\n"
    assert encode_client_error("bad") == b"CLIENT_ERROR bad\r\n"
    assert encode_server_error("oom") == b"SERVER_ERROR oom\r\n"


def meta_request(line: bytes):
    [event] = parse(line + (b"\r\nx\r\n" if line.startswith(b"ms") else b"\r\n"))
    return event


def test_meta_responses_match_memcached() -> None:
    mg = meta_request(b"mg hit O0 k v s t f c h l u q")
    hit = encode_meta_response(
        mg, b"VA", value=b"abc", cas=7, client_flags=5, ttl=-1, size=3, last_access=11, fetched=True
    )
    assert hit == b"VA 3 O0 khit s3 t-1 f5 c7 h1 l11\r\nabc\r\n"  # 1.6.18
    assert encode_meta_response(mg, b"EN") == b""  # quiet miss
    miss = meta_request(b"mg nokey O123 k")
    assert encode_meta_response(miss, b"EN") == b"EN O123 knokey\r\n"  # 1.6.18
    ms = meta_request(b"ms k 1 T0 F5 k c O1")
    assert encode_meta_response(ms, b"HD", cas=9) == b"HD kk c9 O1\r\n"  # 1.6.18
    md = meta_request(b"md k k O5")
    assert encode_meta_response(md, b"NF") == b"NF kk O5\r\n"  # 1.6.18
    ma = meta_request(b"ma n MI D3 v t c k O1")
    assert encode_meta_response(ma, b"VA", value=b"11", ttl=-1, cas=15) == b"VA 2 t-1 c15 kn O1\r\n11\r\n"
    wire = base64.b64encode(b"\x00\x01bin key")
    ms64 = meta_request(b"ms " + wire + b" 1 b k c")
    assert encode_meta_response(ms64, b"HD", cas=18) == b"HD k" + wire + b" b c18\r\n"  # 1.6.18
    mg64 = meta_request(b"mg " + wire + b" b v k")
    assert encode_meta_response(mg64, b"VA", value=b"hi") == b"VA 2 k" + wire + b" b\r\nhi\r\n"  # 1.6.18
    info = {"exp": -1, "la": 0, "cas": 18, "fetch": "yes", "cls": 1, "size": 70}
    assert encode_meta_debug(b"\x00\x01bin key", info, base64=True) == (
        b"ME " + wire + b" exp=-1 la=0 cas=18 fetch=yes cls=1 size=70\r\n"
    )  # 1.6.18
    won = meta_request(b"mg k N30 c")
    assert meta_return_flags(won, b"HD", cas=3, won=True, stale=True) == b" c3 X W"
    assert encode_meta(b"MN") == MN
    with pytest.raises(ValueError):
        encode_meta(b"VA")


@pytest.mark.parametrize(
    ("command", "code", "hidden"),
    [
        ("mg", b"EN", True),
        ("mg", b"HD", False),
        ("mg", b"VA", False),
        ("ms", b"HD", True),
        ("ms", b"NS", False),
        ("ms", b"EX", False),
        ("md", b"HD", True),
        ("md", b"NF", False),  # 1.6.18 still answers NF to a quiet md
        ("ma", b"HD", True),
        ("ma", b"VA", True),
        ("ma", b"NF", False),
        ("mn", b"MN", False),
    ],
)
def test_quiet_semantics(command: str, code: bytes, hidden: bool) -> None:
    assert quiet_suppresses(command, code) is hidden


def test_quiet_ma_answers_when_it_created_the_item() -> None:
    ma = meta_request(b"ma new N0 J10 v q")
    assert encode_meta_response(ma, b"VA", value=b"10", vivified=True) == b"VA 2\r\n10\r\n"  # 1.6.18
    assert encode_meta_response(ma, b"VA", value=b"11") == b""


# --------------------------------------------------------------------------- backend responses


def test_every_response_kind_round_trips() -> None:
    items = [ValueItem(b"a", 1, b"x\r\ny", 10), ValueItem(b"b", 2**32 - 1, b"", 11)]
    mg = meta_request(b"mg k v k O9 c f t s")
    cases = [
        (ResponseKind.VALUES, encode_values(items, with_cas=True), Values(items)),
        (ResponseKind.VALUES, encode_values([ValueItem(b"a", 0, b"1")]), Values([ValueItem(b"a", 0, b"1")])),
        (ResponseKind.VALUES, END, Values([])),
        (ResponseKind.STORE, STORED, Status(b"STORED")),
        (ResponseKind.STORE, NOT_STORED, Status(b"NOT_STORED")),
        (ResponseKind.STORE, EXISTS, Status(b"EXISTS")),
        (ResponseKind.STORE, NOT_FOUND, Status(b"NOT_FOUND")),
        (ResponseKind.DELETE, DELETED, Status(b"DELETED")),
        (ResponseKind.TOUCH, TOUCHED, Status(b"TOUCHED")),
        (ResponseKind.OK, OK, Status(b"OK")),
        (ResponseKind.ARITH, encode_number(2**64 - 1), Number(2**64 - 1)),
        (ResponseKind.ARITH, b"9 \r\n", Number(9)),
        (ResponseKind.ARITH, NOT_FOUND, Status(b"NOT_FOUND")),
        (ResponseKind.VERSION, encode_version("1.6.18"), VersionInfo(b"1.6.18")),
        (
            ResponseKind.STATS,
            encode_stats([("pid", 1), ("version", "1 2")]),
            StatsReport([(b"pid", b"1"), (b"version", b"1 2")]),
        ),
        (ResponseKind.STATS, b"RESET\r\n", Status(b"RESET")),
        (
            ResponseKind.META,
            encode_meta_response(mg, b"VA", value=b"v\r\n", cas=5, client_flags=3, ttl=-1, size=3),
            MetaResponse(b"VA", {"k": b"k", "O": b"9", "c": b"5", "f": b"3", "t": b"-1", "s": b"3"}, b"v\r\n"),
        ),
        (ResponseKind.META, encode_meta_response(mg, b"EN"), MetaResponse(b"EN", {"k": b"k", "O": b"9"})),
        (ResponseKind.META, b"HD\r\n", MetaResponse(b"HD")),
        (ResponseKind.META, b"NS\r\n", MetaResponse(b"NS")),
        (ResponseKind.META, b"EX c0\r\n", MetaResponse(b"EX", {"c": b"0"})),
        (ResponseKind.META, b"NF\r\n", MetaResponse(b"NF")),
        (ResponseKind.META, MN, MetaResponse(b"MN")),
        (
            ResponseKind.META,
            encode_meta_debug(b"k", {"exp": -1, "la": 0}),
            MetaDebugInfo(b"k", {b"exp": b"-1", b"la": b"0"}),
        ),
        (ResponseKind.STORE, b"ERROR\r\n", ErrorResponse(b"ERROR")),
        (ResponseKind.META, encode_client_error("bad"), ErrorResponse(b"CLIENT_ERROR", b"bad")),
        (ResponseKind.VALUES, encode_server_error("oom"), ErrorResponse(b"SERVER_ERROR", b"oom")),
    ]
    for kind, wire, expected in cases:
        expected.raw = wire
        assert parse_responses([kind], [wire]) == [expected], wire
        assert parse_responses([kind], [wire[i : i + 1] for i in range(len(wire))]) == [expected], wire
    # All of them pipelined on one connection.
    blob = b"".join(wire for _, wire, _ in cases)
    assert parse_responses([kind for kind, _, _ in cases], [blob]) == [expected for _, _, expected in cases]


def test_meta_response_helpers() -> None:
    wire = base64.b64encode(b"\x00bin")
    [event] = parse_responses([ResponseKind.META], [b"VA 1 k" + wire + b" b c7 f3 t-1 s1 O5 W X Z\r\nx\r\n"])
    assert (event.key, event.cas, event.client_flags, event.ttl, event.size, event.opaque) == (
        b"\x00bin",
        7,
        3,
        -1,
        1,
        b"5",
    )
    assert event.won and event.stale and event.win_sent


def test_error_in_the_middle_of_values_keeps_the_raw_bytes() -> None:
    wire = encode_value(b"a", 0, b"1") + b"SERVER_ERROR out of memory writing get response\r\n"
    [event] = parse_responses([ResponseKind.VALUES], [wire])
    assert event == ErrorResponse(b"SERVER_ERROR", b"out of memory writing get response", wire)


def test_response_parser_rejects_desync() -> None:
    parser = ResponseParser()
    parser.feed(b"STORED\r\n")
    with pytest.raises(BackendProtocolError):
        parser.next_event()
    for kind, wire in [
        (ResponseKind.STORE, b"DELETED\r\n"),
        (ResponseKind.VALUES, b"STORED\r\n"),
        (ResponseKind.VALUES, b"VALUE k 0 1\r\nxyz\r\n"),
        (ResponseKind.META, b"STORED\r\n"),
        (ResponseKind.ARITH, b"-1\r\n"),
        (ResponseKind.VALUES, b"VALUE k x 1\r\nx\r\nEND\r\n"),
        (ResponseKind.VALUES, b"VALUE k 0 1 x\r\nx\r\nEND\r\n"),
        (ResponseKind.VALUES, b"VALUE k 0\r\n"),
        (ResponseKind.VALUES, b"VALUE k 0 99999999999\r\n"),
        (ResponseKind.META, b"VA\r\n"),
        (ResponseKind.META, b"ME\r\n"),
        (ResponseKind.META, b"HDX\r\n"),
        (ResponseKind.VERSION, b"OK\r\n"),
        (ResponseKind.STATS, b"STORED\r\n"),
        (ResponseKind.STATS, b"STAT a 1\r\nRESET\r\n"),
        (ResponseKind.OK, b"x" * 70_000),
    ]:
        parser = ResponseParser()
        parser.expect(kind)
        parser.feed(wire)
        with pytest.raises(BackendProtocolError):
            parser.next_event()


def test_response_kind_and_forwarding() -> None:
    assert response_kind(Retrieve("get", [b"a"])) is ResponseKind.VALUES
    assert response_kind(Store("set", b"k", b"v")) is ResponseKind.STORE
    assert response_kind(Store("set", b"k", b"v", noreply=True)) is None
    assert response_kind(Quit()) is None
    assert response_kind(MetaNoop()) is ResponseKind.META
    quiet = MetaGet(b"k", {"v": b"", "q": b""})
    with pytest.raises(ValueError):
        response_kind(quiet)
    forwarded = strip_quiet(quiet)
    assert encode_command(forwarded) == b"mg k v\r\n"
    assert response_kind(forwarded) is ResponseKind.META


def test_passthrough_of_encoded_requests() -> None:
    assert passthrough(b"mg k v O1 t\r\n") == (b"mg k v O1 t\r\n", ResponseKind.META)
    assert passthrough(b"set k 0 0 1\r\nx\r\n")[1] is ResponseKind.STORE
    assert passthrough(b"set k 0 0 1 noreply\r\nx\r\n")[1] is None
    assert passthrough(b"get " + b" ".join(b"k%d" % i for i in range(3000)) + b"\r\n")[1] is ResponseKind.VALUES
    for bad in (b"get k", b"get k\r\nget j\r\n", b"bogus\r\n", b"set k 0 0 5\r\nab\r\n", b"mg k v q\r\n"):
        with pytest.raises(ValueError):
            passthrough(bad)
    parser = ResponseParser()
    parser.expect(None)  # a noreply request: nothing to wait for
    assert parser.pending == 0


def test_relay_round_trip_through_both_parsers() -> None:
    """A client's mg goes to the backend as-is and the backend's bytes come back as-is."""
    [request] = parse(b"mg k v O7 k t f\r\n")
    backend_wire = encode_command(request)
    assert backend_wire == b"mg k v O7 k t f\r\n"
    answer = encode_meta_response(request, b"VA", value=b"data", ttl=30, client_flags=1)
    [event] = parse_responses([response_kind(request)], [answer])
    assert event.raw == answer == b"VA 4 O7 kk t30 f1\r\ndata\r\n"


# --------------------------------------------------------------------------- properties

_KEY_ALPHABET = bytes(b for b in range(0x21, 0x100) if b != 0x7F)
_KEY_TABLE = bytes(_KEY_ALPHABET[i % len(_KEY_ALPHABET)] for i in range(256))


def tokens(min_size: int = 1, max_size: int = 250) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=min_size, max_size=max_size).map(lambda b: b.translate(_KEY_TABLE))


keys = tokens()
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
values = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b"x", b"END\r\n", b"\x00"]), max_size=30).map(b"".join),
)

_FLAG_TOKENS = {
    **{flag: st.just(b"") for flag in "kstcfvhulqIb"},
    "P": tokens(0, 10),
    "L": tokens(0, 10),
    "O": tokens(0, 31),
    "T": i32.map(b"%d".__mod__),
    "N": i32.map(b"%d".__mod__),
    "R": i32.map(b"%d".__mod__),
    "F": u32.map(b"%d".__mod__),
    "C": u64.map(b"%d".__mod__),
    "J": u64.map(b"%d".__mod__),
    "D": u64.map(b"%d".__mod__),
}
_MODES = {"ms": [b"S", b"E", b"A", b"P", b"R"], "ma": [b"I", b"+", b"D", b"-"]}


@st.composite
def meta_commands(draw: st.DrawFn, cls: type) -> object:
    names = list(_FLAG_TOKENS) + (["M"] if cls.COMMAND in _MODES else [])
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=16))
    flags = {}
    for name in chosen:
        strategy = st.sampled_from(_MODES[cls.COMMAND]) if name == "M" else _FLAG_TOKENS[name]
        flags[name] = draw(strategy)
    key = draw(st.binary(min_size=1, max_size=186) if "b" in flags else keys)
    if cls is MetaSet:
        return MetaSet(key, flags, draw(values))
    return cls(key, flags)


commands = st.one_of(
    st.builds(Retrieve, st.sampled_from(["get", "gets"]), st.lists(keys, min_size=1, max_size=5)),
    st.builds(Retrieve, st.sampled_from(["gat", "gats"]), st.lists(keys, min_size=1, max_size=5), i32),
    st.builds(
        Store,
        st.sampled_from(["set", "add", "replace", "append", "prepend"]),
        keys,
        values,
        u32,
        i32,
        st.none(),
        st.booleans(),
    ),
    st.builds(Store, st.just("cas"), keys, values, u32, i32, u64, st.booleans()),
    st.builds(Delete, keys, st.booleans()),
    st.builds(IncrDecr, st.sampled_from(["incr", "decr"]), keys, u64, st.booleans()),
    st.builds(Touch, keys, i32, st.booleans()),
    st.builds(Stats, st.lists(tokens(1, 20), max_size=3)),
    st.builds(Version),
    st.builds(Verbosity, u32, st.booleans()),
    st.builds(FlushAll, i32, st.booleans()),
    st.builds(Quit),
    meta_commands(MetaGet),
    meta_commands(MetaSet),
    meta_commands(MetaDelete),
    meta_commands(MetaArithmetic),
    st.builds(MetaDebug, keys, st.just(False)),
    st.builds(MetaDebug, st.binary(min_size=1, max_size=186), st.just(True)),
    st.builds(MetaNoop),
)


@PROPERTY
@given(cmds=st.lists(commands, max_size=12), data=st.data())
def test_valid_commands_parse_identically_under_any_split(cmds: list, data: st.DataObject) -> None:
    blob = b"".join(encode_command(cmd) for cmd in cmds)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=20))
    events, parser = parse_chunks(split(blob, cuts))
    assert events == cmds
    assert parser.idle and not parser.broken


_GARBAGE_PREFIXES = [
    b"",
    b"get ",
    b"gat ",
    b"set k 0 0 ",
    b"cas k 0 0 1 ",
    b"incr k ",
    b"delete k ",
    b"flush_all ",
    b"verbosity ",
    b"mg k ",
    b"ms k ",
    b"ms k 3 ",
    b"md k ",
    b"ma k ",
    b"me ",
    b"mn",
]
garbage = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.one_of(
            st.sampled_from([*_GARBAGE_PREFIXES, b"\r\n", b"\n", b" ", b"noreply", b"b", b"q"]), st.binary(max_size=8)
        ),
        max_size=30,
    ).map(b"".join),
)


@PROPERTY
@given(blob=garbage, data=st.data())
def test_arbitrary_bytes_never_raise_and_do_not_depend_on_splits(blob: bytes, data: st.DataObject) -> None:
    limits = {"max_item_size": 16, "max_key_length": 12, "max_line_length": 48, "max_multiget_line_length": 96}
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=20))
    events, parser = parse_chunks(split(blob, cuts), **limits)
    assert events == parse(blob, **limits)
    fatal = [e for e in events if isinstance(e, ProtocolError) and e.fatal]
    assert parser.broken == bool(fatal)
    if fatal:
        assert fatal == events[-1:]  # nothing after a fatal error


@PROPERTY
@given(line=garbage.map(lambda b: b.replace(b"\n", b"")), cmd=commands)
def test_parser_resynchronises_after_a_non_fatal_error(line: bytes, cmd: object) -> None:
    parser = RequestParser()
    parser.feed(line + b"\r\n")
    events = drain(parser)
    assume(parser.idle and not parser.broken)  # not waiting for (or swallowing) a data block
    assert all(type(e) in (CommandError, ClientError, ServerError) or not isinstance(e, ProtocolError) for e in events)
    parser.feed(encode_command(cmd))
    assert drain(parser) == [cmd]


value_items = st.builds(ValueItem, keys, u32, values, st.none())
cas_items = st.builds(ValueItem, keys, u32, values, u64)
meta_flag_tokens = st.dictionaries(st.sampled_from("kOcftsbWXZ"), tokens(0, 10), max_size=6).map(
    lambda flags: {f: (t if f in "kO" else b"") for f, t in flags.items()}
)


@st.composite
def responses(draw: st.DrawFn) -> tuple[ResponseKind, bytes, object]:
    """(kind, wire bytes, expected event without raw)."""
    choice = draw(st.integers(0, 6))
    if choice == 0:
        items = draw(st.lists(value_items, max_size=4))
        return ResponseKind.VALUES, encode_values(items), Values(items)
    if choice == 1:
        items = draw(st.lists(cas_items, max_size=4))
        return ResponseKind.VALUES, encode_values(items, with_cas=True), Values(items)
    if choice == 2:
        kind, code = draw(
            st.sampled_from(
                [
                    (ResponseKind.STORE, b"STORED"),
                    (ResponseKind.STORE, b"EXISTS"),
                    (ResponseKind.DELETE, b"DELETED"),
                    (ResponseKind.TOUCH, b"TOUCHED"),
                    (ResponseKind.OK, b"OK"),
                    (ResponseKind.ARITH, b"NOT_FOUND"),
                ]
            )
        )
        return kind, code + b"\r\n", Status(code)
    if choice == 3:
        number = draw(u64)
        return ResponseKind.ARITH, encode_number(number), Number(number)
    if choice == 4:
        flags = draw(meta_flag_tokens)
        value = draw(values)
        wire = b"".join(
            (b"VA %d" % len(value), *(b" " + f.encode() + t for f, t in flags.items()), b"\r\n", value, b"\r\n")
        )
        return ResponseKind.META, wire, MetaResponse(b"VA", flags, value)
    if choice == 5:
        code = draw(st.sampled_from([b"HD", b"EN", b"NF", b"NS", b"EX", b"MN"]))
        flags = draw(meta_flag_tokens)
        wire = code + b"".join(b" " + f.encode() + t for f, t in flags.items()) + b"\r\n"
        return ResponseKind.META, wire, MetaResponse(code, flags)
    kind = draw(st.sampled_from(list(ResponseKind)))
    error = draw(st.sampled_from([(b"ERROR", b""), (b"CLIENT_ERROR", b"bad data chunk"), (b"SERVER_ERROR", b"oom")]))
    wire = b" ".join(part for part in error if part) + b"\r\n"
    return kind, wire, ErrorResponse(*error)


@PROPERTY
@given(answers=st.lists(responses(), max_size=10), data=st.data())
def test_pipelined_responses_parse_identically_under_any_split(answers: list, data: st.DataObject) -> None:
    blob = b"".join(wire for _, wire, _ in answers)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=20))
    for _, wire, expected in answers:
        expected.raw = wire
    events = parse_responses([kind for kind, _, _ in answers], split(blob, cuts))
    assert events == [expected for _, _, expected in answers]


# --------------------------------------------------------------------------- byte budget hooks (issue 18)


def test_a_refused_data_block_is_discarded_unbuffered_and_the_connection_goes_on() -> None:
    parser = RequestParser(max_item_size=10**8)
    parser.feed(b"set big 0 1 100000 noreply\r\n" + b"x" * 5000)
    assert parser.next_event() is NEED_DATA
    assert parser.pending_length == 100_000 and parser.partial_line_length == 0
    refused = parser.refuse_pending()
    assert isinstance(refused, ServerError) and refused.noreply and not refused.fatal
    assert refused.message == "out of memory storing object"
    parser.feed(b"y" * 95_000)  # the rest of the block: dropped as it comes
    assert parser.next_event() is NEED_DATA and parser.pending_length == 0
    parser.feed(b"\r\nget k\r\n")
    assert parser.next_event() == Retrieve("get", [b"k"])
    with pytest.raises(RuntimeError):
        parser.refuse_pending()


def test_partial_line_length_counts_a_line_still_arriving() -> None:
    parser = RequestParser()
    parser.feed(b"get " + b"k " * 40_000)
    assert parser.next_event() is NEED_DATA
    assert parser.partial_line_length == 80_004 and parser.max_partial_line == 1024 * 1024
