"""The http and kafka targets' pure pieces: key escaping, Retry-After, status classes, headers, config checks."""

from __future__ import annotations

import email.utils

import pytest

from sidecar import config as config_mod
from sidecar.drain.targets.base import ErrorClass
from sidecar.drain.targets.http import HttpTarget, classify, entry_headers, escape, retry_after
from sidecar.envelope import Entry, Op


@pytest.mark.parametrize("key", ["../../etc", "..", ".", "a/b", "a?b=c", "a#b", "%2e", "x y", "é", "a\r\nb"])
def test_a_key_is_one_opaque_path_segment(key: str) -> None:
    escaped = escape(key)
    assert all(c not in escaped for c in "/?#\r\n ") and escaped not in (".", "..")


def test_url_placeholders() -> None:
    settings = config_mod.HttpTarget(name="app", url="http://h:1/v1/{namespace}/items/{key}?k={key}")
    target = HttpTarget(settings, "ns")
    assert target.url_for("a/b?c") == "http://h:1/v1/ns/items/a%2Fb%3Fc?k=a%2Fb%3Fc"


def test_retry_after_seconds_and_dates() -> None:
    assert retry_after("7") == 7.0
    assert retry_after(None) == retry_after("soon") == 0.0
    assert retry_after("99999") == 600.0
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after(date, now=1_000_000) == pytest.approx(30, abs=1)


@pytest.mark.parametrize(("status", "expected"), [
    (200, None), (204, None), (408, ErrorClass.TRANSIENT), (425, ErrorClass.TRANSIENT),
    (500, ErrorClass.TRANSIENT), (507, ErrorClass.TRANSIENT), (429, ErrorClass.UNAVAILABLE),
    (502, ErrorClass.UNAVAILABLE), (503, ErrorClass.UNAVAILABLE), (504, ErrorClass.UNAVAILABLE),
    (400, ErrorClass.PERMANENT), (401, ErrorClass.PERMANENT), (404, ErrorClass.PERMANENT),
    (422, ErrorClass.PERMANENT), (301, ErrorClass.PERMANENT),
])
def test_status_classes(status: int, expected: ErrorClass | None) -> None:
    error = classify(status, b"x" * 1000, 3.0)
    assert (error.error_class if error else None) is expected
    if error is not None:
        assert str(status) in error.message and len(error.message) < 300


def test_headers_are_header_safe() -> None:
    entry = Entry(id="abc", ns="ns", op=Op.PUT, key="a\r\nInjected: 1", partition=0, write_time=5, origin="eu",
                  seq=42)
    headers = entry_headers(entry)
    assert headers["idempotency-key"] == "abc" and headers["walcar-sequence"] == "42"
    assert all("\r" not in v and "\n" not in v for v in headers.values())


def test_config_refuses_unsafe_headers_and_placeholders() -> None:
    bad = {"type": "http", "name": "app", "url": "http://{key}.example/{nope}",
           "headers": {"Transfer-Encoding": "chunked", "X-Ok": "a\nb", "Walcar-Op": "x"}, "token_header": "Host"}
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.validate({"namespaces": {"a": {"targets": [bad]}}})
    text = str(caught.value)
    for part in ("not the host", "unknown placeholder", "'Transfer-Encoding'", "'Walcar-Op'", "line break",
                 "token_header"):
        assert part in text


def test_kafka_config_keeps_order_settings_and_secrets_out_of_properties() -> None:
    bad = {"type": "kafka", "name": "q", "bootstrap_servers": ["nohost"], "topic": "a b",
           "properties": {"acks": "1", "ssl.key.password": "x", "security.protocol": "ssl"}}
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.validate({"namespaces": {"a": {"targets": [bad]}}})
    text = str(caught.value)
    for part in ("bootstrap_servers[0]", "topic names", "['acks'] are set by walcar", "ssl.key.password"):
        assert part in text
    good = {**bad, "bootstrap_servers": ["127.0.0.1:9092"], "topic": "wal.{namespace}", "properties": {}}
    target = config_mod.validate({"namespaces": {"a": {"targets": [good]}}}).namespaces["a"].targets[0]
    assert target.describe() == "kafka 127.0.0.1:9092 topic wal.{namespace}"


def test_kafka_records_deletes_as_tombstones_or_a_header() -> None:
    from sidecar.drain.targets.kafka import record

    put = Entry(id="i1", ns="ns", op=Op.PUT, key="k", partition=0, write_time=7, origin="eu", value=b"v", seq=3)
    value, headers = record(put, "tombstone")
    assert value == b"v" and headers["walcar-id"] == b"i1" and headers["walcar-seq"] == b"3"
    assert headers["walcar-op"] == b"put" and headers["walcar-write-time"] == b"7"
    delete = Entry(id="i2", ns="ns", op=Op.DELETE, key="k", partition=0, write_time=8)
    assert record(delete, "tombstone")[0] is None
    assert record(delete, "header") == (b"", record(delete, "header")[1])
    item_delete = Entry(id="i3", ns="ns", op=Op.DELETE, key="k", item="a", partition=0, write_time=9)
    value, headers = record(item_delete, "tombstone")
    assert value == b"" and headers["walcar-item"] == b"a"  # a tombstone would drop the whole key


class _Report:
    """What librdkafka hands the delivery callback: the record, whose key survives a failure."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def key(self) -> bytes:
        return self._key


def test_kafka_places_failures_reported_by_key() -> None:
    """One callback for a call's records learns a failed record's key: a key whose every record failed
    is placed exactly; one with a record that may have landed stops its run at the key's first record
    (early, never late), and a permanent error is then retried, not dead-lettered."""
    from confluent_kafka import KafkaError

    from sidecar.drain.targets.kafka import _Round

    def entries(*keys: str) -> list[Entry]:
        return [Entry(id=f"{k}{i}", ns="n", op=Op.PUT, key=k, partition=0, write_time=1) for i, k in enumerate(keys)]

    runs = [entries("a", "b", "c"), entries("d", "b")]
    state = _Round()
    for key in ("c", "b", "b"):  # every record of b failed: exact
        state.delivered(KafkaError(KafkaError._MSG_TIMED_OUT), _Report(key.encode()))
    assert state.place(runs, [3, 2]) == set()
    assert sorted(state.failures) == [(0, 1), (0, 2), (1, 1)]
    assert state.failures[(0, 2)].error_class is ErrorClass.UNAVAILABLE

    runs = [entries("a", "x", "b", "x")]
    state = _Round()
    state.delivered(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), _Report(b"x"))  # the first x or the second?
    state.delivered(None, _Report(b"x"))
    assert state.place(runs, [4]) == {b"x"}  # its records get a callback each next time
    assert list(state.failures) == [(0, 1)]  # x's first record: b and the rest are produced again
    assert state.failures[(0, 1)].error_class is ErrorClass.TRANSIENT
    assert "MSG_SIZE_TOO_LARGE" in state.failures[(0, 1)].message

    runs = [entries("x", "big", "x")]  # the run stopped at big (too large to send): its second x never went
    state = _Round()
    state.delivered(KafkaError(KafkaError.INVALID_RECORD), _Report(b"x"))
    assert state.place(runs, [1]) == set()
    assert state.failures[(0, 0)].error_class is ErrorClass.PERMANENT
