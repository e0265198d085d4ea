"""The journal link's NATS codec (wire.py) and its URL handling (link.py), without a server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.log import wire
from sidecar.log.link import creds_signer
from sidecar.log.pool import Server, parse_servers
from sidecar.log.wire import ClientParser, ServerMessage, WireError

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
subject = st.lists(token, min_size=1, max_size=4).map(".".join)


@st.composite
def server_messages(draw: st.DrawFn) -> ServerMessage:
    headers = draw(st.none() | st.builds(lambda status, extra: b"NATS/1.0" + status + b"\r\n" + extra + b"\r\n",
                                         st.sampled_from([b"", b" 503", b" 408 Request Timeout"]),
                                         st.sampled_from([b"", b"Nats-Msg-Id: x\r\n"])))
    return ServerMessage(draw(subject).encode(), draw(st.integers(0, 2**31)),
                         draw(st.none() | subject.map(str.encode)) or b"", headers, draw(st.binary(max_size=300)))


def server_bytes(event: object) -> bytes:
    """What nats-server sends for an event."""
    if isinstance(event, ServerMessage):
        reply = b" " + event.reply if event.reply else b""
        if event.headers is None:
            return b"MSG %s %d%s %d\r\n%s\r\n" % (event.subject, event.sid, reply, len(event.payload), event.payload)
        total = len(event.headers) + len(event.payload)
        return b"HMSG %s %d%s %d %d\r\n%s%s\r\n" % (event.subject, event.sid, reply, len(event.headers), total,
                                                  event.headers, event.payload)
    if isinstance(event, wire.Ping):
        return b"PING\r\n"
    if isinstance(event, wire.Pong):
        return b"PONG\r\n"
    if isinstance(event, wire.Ok):
        return b"+OK\r\n"
    if isinstance(event, wire.ServerError):
        return b"-ERR '%s'\r\n" % event.message.encode()
    assert isinstance(event, wire.Info)
    return b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\n"


control = [wire.Ping(), wire.Pong(), wire.Ok(), wire.ServerError("Authorization Violation"),
           wire.Info({"server_id": "x", "max_payload": 1048576})]
events = st.lists(server_messages() | st.sampled_from(control), max_size=20)


def parse_all(parser: ClientParser, data: bytes, cuts: list[int]) -> list[object]:
    out: list[object] = []
    start = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        parser.feed(data[start:cut])
        start = cut
        while (event := parser.next_event()) is not None:
            out.append(event)
    return out


@given(events, st.lists(st.integers(0, 20_000), max_size=12))
def test_every_event_survives_any_split_of_the_stream(sent: list[object], cuts: list[int]) -> None:
    data = b"".join(server_bytes(e) for e in sent)
    assert parse_all(ClientParser(), data, cuts) == sent


@settings(max_examples=300)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
def test_garbage_is_a_wire_error_never_anything_else(data: bytes, cuts: list[int]) -> None:
    try:
        parse_all(ClientParser(), data, cuts)
    except WireError:
        pass


@pytest.mark.parametrize("line", [
    b"MSG a 1 nope\r\n", b"MSG a\r\n", b"HMSG a 1 10 5\r\n", b"MSG a -1 0\r\n\r\n", b"WAT\r\n", b"INFO [1]\r\n",
    b"INFO {nope\r\n", b"MSG a 1 2\r\nabX\r\n",
])
def test_malformed_lines_are_refused(line: bytes) -> None:
    parser = ClientParser()
    parser.feed(line + b"junk after")
    with pytest.raises(WireError):
        parser.next_event()


def test_a_line_longer_than_the_protocol_allows_is_refused_before_its_end() -> None:
    parser = ClientParser()
    parser.feed(b"MSG " + b"a" * 5000)
    with pytest.raises(WireError, match="longer than 4096"):
        parser.next_event()


def test_payload_sizes_are_bounded() -> None:
    parser = ClientParser(max_payload=1024)
    parser.feed(b"MSG a 1 2048\r\n")
    with pytest.raises(WireError, match="out of range"):
        parser.next_event()


def test_a_body_not_followed_by_crlf_is_refused_and_an_incomplete_one_waits() -> None:
    parser = ClientParser()
    parser.feed(b"MSG a 1 3\r\nab")
    assert parser.next_event() is None
    parser.feed(b"cXY")
    with pytest.raises(WireError, match="CRLF"):
        parser.next_event()


def test_publish_commands_are_what_the_server_expects() -> None:
    assert wire.encode_publish("wal.ns.3", b"_INBOX.x.1", {"Nats-Msg-Id": "e1"}, b"hello") == (
        b"HPUB wal.ns.3 _INBOX.x.1 29 34\r\nNATS/1.0\r\nNats-Msg-Id: e1\r\n\r\nhello\r\n")
    assert wire.encode_publish("a.b", b"", None, b"xy") == b"PUB a.b 2\r\nxy\r\n"
    two = wire.encode_publish("a", b"r", {"Nats-Batch-Id": "b", "Nats-Batch-Sequence": "1"}, b"")
    header = b"NATS/1.0\r\nNats-Batch-Id: b\r\nNats-Batch-Sequence: 1\r\n\r\n"
    assert two == b"HPUB a r %d %d\r\n%s\r\n" % (len(header), len(header), header)
    assert wire.encode_same_to_each([b"$JS.ACK.a.1", b"$JS.ACK.a.2"], b"+ACK") == (
        b"PUB $JS.ACK.a.1 4\r\n+ACK\r\nPUB $JS.ACK.a.2 4\r\n+ACK\r\n")
    assert wire.encode_connect({"verbose": False, "name": "w"}) == b'CONNECT {"verbose":false,"name":"w"}\r\n'


def test_status_of_reads_the_inline_status() -> None:
    assert wire.status_of(b"NATS/1.0 503\r\n\r\n") == b"503"
    assert wire.status_of(b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n") == b""
    assert wire.status_of(None) == b""


def test_server_urls_take_the_forms_nats_py_takes() -> None:
    assert parse_servers("nats://127.0.0.1:14222") == [Server("127.0.0.1", 14222, False)]
    assert parse_servers("nats://alice:s%40cret@h1:1, tls://token123@h2,h3") == [
        Server("h1", 1, False, user="alice", password="s@cret"),
        Server("h2", 4222, True, token="token123"),
        Server("h3", 4222, False),
    ]
    with pytest.raises(ValueError, match="scheme"):
        parse_servers("ws://h:1")


def test_a_file_that_is_not_nats_credentials_is_refused(tmp_path) -> None:
    path = tmp_path / "x.creds"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="not a NATS credentials file"):
        creds_signer(str(path))
