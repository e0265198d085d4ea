"""Reading a NATS KV bucket from its stream: which keys it holds, and a key's history.

nats-py answers both with a watch (an ordered consumer) whose first values end at a marker, and
that marker now and then comes before a value that is there: 1-2 listings in 300 missed a present
key on an idle server (tests/integration/test_pauses.py). For what a sidecar decides at start (is
a target paused, which namespaces the control plane holds) the stream itself is asked instead: its
subjects, and each one's messages by sequence, through the JetStream API.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from sidecar.log.connection import JetStreamApiError, NatsConnection

NO_MESSAGE = 10037  # STREAM.MSG.GET: no message found


class KvRecord(msgspec.Struct, frozen=True):
    key: str
    revision: int  # the stream sequence
    value: bytes
    operation: str  # "PUT", "DEL" or "PURGE"


def _record(bucket: str, message: dict[str, Any]) -> KvRecord:
    headers = base64.b64decode(message.get("hdrs") or "")
    operation = "PUT"
    for name in ("DEL", "PURGE"):
        if b"KV-Operation: " + name.encode() in headers:
            operation = name
    return KvRecord(key=message["subject"].removeprefix(f"$KV.{bucket}."), revision=int(message["seq"]),
                    value=base64.b64decode(message.get("data") or ""), operation=operation)


async def kv_latest(conn: NatsConnection, bucket: str, pattern: str = ">") -> list[KvRecord]:
    """The current value of every key matching `pattern` (its last operation a put), by key."""
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    info = await conn.js_api(f"STREAM.INFO.{stream}", {"subjects_filter": prefix + pattern})
    records = []
    for subject in (info.get("state") or {}).get("subjects") or {}:
        try:
            reply = await conn.js_api(f"STREAM.MSG.GET.{stream}", {"last_by_subj": subject})
        except JetStreamApiError as exc:
            if exc.err_code == NO_MESSAGE:  # purged from the stream since the listing
                continue
            raise
        record = _record(bucket, reply["message"])
        if record.operation == "PUT":
            records.append(record)
    return sorted(records, key=lambda record: record.key)


async def kv_history(conn: NatsConnection, bucket: str, key: str) -> list[KvRecord]:
    """Every revision of `key` the bucket keeps, oldest first."""
    stream, subject = f"KV_{bucket}", f"$KV.{bucket}.{key}"
    records: list[KvRecord] = []
    seq = 1
    while True:
        try:
            reply = await conn.js_api(f"STREAM.MSG.GET.{stream}", {"seq": seq, "next_by_subj": subject})
        except JetStreamApiError as exc:
            if exc.err_code == NO_MESSAGE:
                return records
            raise
        record = _record(bucket, reply["message"])
        records.append(record)
        seq = record.revision + 1
