"""Stream provisioning: each namespace's journal stream, DLQ stream and chunk bucket.

Created from the namespace config at start and after every reconnect (a server that
lost its store must not answer "no responders" forever). Settings that can change
in place (max age, duplicate window, replicas, allowed features) are updated; ones
that cannot, or that would silently break the journal (subjects, storage, retention,
the partition count keys were hashed with), make start fail with both values named.
"""

from __future__ import annotations

from typing import Any

from sidecar.config import Namespace, stream_name
from sidecar.log.connection import JetStreamApiError, NatsConnection
from sidecar.logs import get_logger

log = get_logger("streams")

NANOS = 1_000_000_000
STREAM_NOT_FOUND = 10059
PARTITIONS_KEY = "walcar.partitions"


class StreamConflict(RuntimeError):
    pass


def dlq_stream_name(namespace: str) -> str:
    return f"{stream_name(namespace)}_DLQ"


def dlq_subject(namespace: str, target: str) -> str:
    return f"waldlq.{namespace}.{target}"


def chunk_bucket(namespace: str) -> str:
    return f"walchunks_{namespace}"


def journal_stream_config(name: str, ns: Namespace) -> dict[str, Any]:
    return {
        "name": stream_name(name),
        "description": f"walcar journal of namespace {name}",
        "subjects": [f"wal.{name}.>"],
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "num_replicas": ns.replicas,
        "max_age": int(ns.replay_window * NANOS),
        "duplicate_window": int(ns.duplicate_window * NANOS),
        "allow_atomic": True,
        "allow_msg_schedules": True,
        "allow_direct": True,
        "metadata": {"walcar.namespace": name, PARTITIONS_KEY: str(ns.partitions)},
    }


def dlq_stream_config(name: str, ns: Namespace) -> dict[str, Any]:
    # Dead letters wait for an operator: no max age, they leave only by replay or purge.
    return {
        "name": dlq_stream_name(name),
        "description": f"walcar dead letters of namespace {name}",
        "subjects": [f"waldlq.{name}.>"],
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "num_replicas": ns.replicas,
        "allow_direct": True,
        "metadata": {"walcar.namespace": name},
    }


def chunk_stream_config(name: str, ns: Namespace) -> dict[str, Any]:
    """The object store bucket's backing stream (what nats-py's create_object_store would make)."""
    bucket = chunk_bucket(name)
    return {
        "name": f"OBJ_{bucket}",
        "description": f"walcar chunk store of namespace {name}",
        "subjects": [f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        "retention": "limits",
        "storage": "file",
        "discard": "new",
        "num_replicas": ns.replicas,
        "max_age": int(ns.replay_window * NANOS),
        "allow_rollup_hdrs": True,
        "allow_direct": True,
    }


# Settings that cannot change in place; a difference is a conflict.
_FIXED = ("subjects", "storage", "retention")
# Settings walcar updates in place when the config changes.
_MUTABLE = ("num_replicas", "max_age", "duplicate_window", "allow_atomic", "allow_msg_schedules",
            "allow_direct", "description", "discard", "allow_rollup_hdrs")


def _conflicts(existing: dict[str, Any], desired: dict[str, Any], namespace: str) -> list[str]:
    problems = []
    for key in _FIXED:
        if key in desired and existing.get(key) != desired[key]:
            problems.append(f"{key}: config wants {desired[key]!r}, stream has {existing.get(key)!r}")
    want = desired.get("metadata", {}).get(PARTITIONS_KEY)
    have = (existing.get("metadata") or {}).get(PARTITIONS_KEY)
    if want is not None and have is not None and want != have:
        problems.append(
            f"partitions: namespaces.{namespace}.partitions = {want}, but the stream was created with "
            f"{have} (keys are hashed into partitions; changing it would reorder writes of a key)"
        )
    return problems


async def ensure_stream(conn: NatsConnection, desired: dict[str, Any], namespace: str) -> dict[str, Any]:
    name = desired["name"]
    try:
        info = await conn.js_api(f"STREAM.INFO.{name}")
    except JetStreamApiError as exc:
        if exc.err_code != STREAM_NOT_FOUND:
            raise
        created = await conn.js_api(f"STREAM.CREATE.{name}", desired)
        log.info("stream_created", stream=name, namespace=namespace)
        return created["config"]
    existing = info["config"]
    problems = _conflicts(existing, desired, namespace)
    if problems:
        raise StreamConflict(
            f"stream {name} conflicts with the config of namespace {namespace}: " + "; ".join(problems)
        )
    changed = [k for k in _MUTABLE if k in desired and existing.get(k) != desired[k]]
    metadata = {**(existing.get("metadata") or {}), **desired.get("metadata", {})}
    if not changed and metadata == (existing.get("metadata") or {}):
        return existing
    update = {**existing, **{k: desired[k] for k in changed}, "metadata": metadata}
    try:
        updated = await conn.js_api(f"STREAM.UPDATE.{name}", update)
    except JetStreamApiError as exc:
        wanted = ", ".join(f"{k}={desired[k]!r} (stream has {existing.get(k)!r})" for k in changed)
        raise StreamConflict(f"stream {name}: cannot apply {wanted}: {exc.description}") from None
    log.info("stream_updated", stream=name, namespace=namespace, changed=",".join(changed))
    return updated["config"]


async def provision_namespace(conn: NatsConnection, name: str, ns: Namespace) -> None:
    await ensure_stream(conn, journal_stream_config(name, ns), name)
    if ns.dlq:
        await ensure_stream(conn, dlq_stream_config(name, ns), name)
    await ensure_chunk_bucket(conn, name, ns)


async def ensure_chunk_bucket(conn: NatsConnection, name: str, ns: Namespace) -> None:
    await ensure_stream(conn, chunk_stream_config(name, ns), name)
