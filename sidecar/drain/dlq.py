"""Dead letters: entries a target rejected for good, with the context an operator needs.

Each goes to the namespace's DLQ stream on `waldlq.<ns>.<target>.<key-hash>` — one
subject per key, so "does this key still have dead letters?" (strict mode) is a
cheap subject lookup — with headers naming the target, the error class and text,
the attempts, the original stream sequence and subject, first and last failure
time, and whether later entries of the key were applied past it (superseded).
The payload is the original entry, unchanged, so a replay re-journals it as is.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sidecar.drain.targets.base import ApplyError
from sidecar.log.writer import JournalWriter, WriteResult

HEADER_PREFIX = "Walcar-"


def key_token(key: str) -> str:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def dlq_subject(namespace: str, target: str, key: str) -> str:
    return f"waldlq.{namespace}.{target}.{key_token(key)}"


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dlq_headers(*, target: str, error: ApplyError, error_class: str, attempts: int, seq: int, subject: str,
                key: str, first_failure: float, last_failure: float, superseded: bool,
                index: int = -1) -> dict[str, str]:
    """`index`: the entry's place in its pack (a message of several entries), -1 for a message of one."""
    position = f"{seq}.{index}" if index >= 0 else str(seq)
    headers = {
        "Nats-Msg-Id": f"dlq.{target}.{position}",  # a drainer that dies after this publish does not duplicate it
        "Walcar-Target": target,
        "Walcar-Error-Class": error_class,
        "Walcar-Error": error.message.replace("\r", " ").replace("\n", " ")[:2000],
        "Walcar-Attempts": str(attempts),
        "Walcar-Original-Seq": str(seq),
        "Walcar-Original-Subject": subject,
        "Walcar-Key": key.replace("\r", " ").replace("\n", " "),
        "Walcar-First-Failure": _time(first_failure),
        "Walcar-Last-Failure": _time(last_failure),
        "Walcar-Superseded": "true" if superseded else "false",
    }
    if index >= 0:
        headers["Walcar-Original-Index"] = str(index)
    return headers


async def dead_letter(writer: JournalWriter, namespace: str, key: str, payload: bytes,
                      headers: dict[str, str]) -> WriteResult:
    """Durable before the original is acked: a failed DLQ write keeps the entry in the journal."""
    target = headers["Walcar-Target"]
    return await writer.publish(dlq_subject(namespace, target, key), payload, headers)
