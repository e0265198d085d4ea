"""Where an interrupted replay resumes: the last fully applied sequence and the job's arguments.

Written atomically (temp file + rename) at most once a second while the job runs
and always when it stops, so a Ctrl-C, a SIGTERM or even a SIGKILL leaves a file
`--resume` can continue from; re-applying the few entries after a stale checkpoint
is harmless (write timestamps make Cassandra writes idempotent; memcached ends at
each key's last value because order per key is kept). The arguments are stored with
their bounds and windows already resolved to absolute sequences and times, so a
resumed job covers exactly the range the first run meant.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import msgspec

from sidecar.config import CassandraTarget, MemcachedTarget, dec_hook
from sidecar.replay.request import ReplayError, ReplayRequest

VERSION = 1


class Checkpoint(msgspec.Struct, kw_only=True):
    version: int = VERSION
    request: ReplayRequest
    target: str  # where it writes, for the operator reading the file
    from_seq: int
    to_seq: int
    applied_through: int  # every entry up to this sequence is applied
    complete: bool = False
    updated_at: str = ""


def default_path(request: ReplayRequest) -> Path:
    """~/.cache/walcar/replay/<namespace>.<target>.json; a target given in full is named by its address."""
    given = request.target_config
    if isinstance(given, MemcachedTarget):
        slug = "memcached-" + "-".join(given.servers)
    elif isinstance(given, CassandraTarget):
        slug = f"cassandra-{'-'.join(given.contact_points)}-{given.keyspace}-{given.table or request.namespace}"
    elif given is not None:
        slug = f"wal-{given.name}"
    else:
        slug = request.target or "target"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", slug)
    return Path.home() / ".cache" / "walcar" / "replay" / f"{request.namespace}.{slug}.json"


def load(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReplayError(f"no checkpoint at {path}: nothing to resume (start the replay without --resume)") from None
    except OSError as exc:
        raise ReplayError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    try:
        checkpoint = msgspec.json.decode(data, type=Checkpoint, dec_hook=dec_hook)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ReplayError(f"checkpoint {path} is not a walcar replay checkpoint: {exc}") from None
    if checkpoint.version != VERSION:
        raise ReplayError(f"checkpoint {path} has version {checkpoint.version}; this walcar reads {VERSION}")
    return checkpoint


def save(path: str | Path, checkpoint: Checkpoint) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(checkpoint, enc_hook=str), indent=2))
    os.replace(tmp, path)
