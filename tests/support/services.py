"""The shared real services (scripts/services): started once per test session if not up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "services"
CACHE = Path(os.environ.get("WALCAR_CACHE", Path.home() / ".cache" / "walcar"))
BIN = CACHE / "bin"
NATS_SERVER = BIN / "nats-server"
HELM = BIN / "helm"


@dataclass(frozen=True)
class Services:
    nats_url: str
    memcached: tuple[str, int]
    cassandra: tuple[str, int]
    kafka: str = "127.0.0.1:19092"  # bootstrap server
    cassandra_user: str = "cassandra"
    cassandra_password: str = "cassandra"


def _port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def ensure_up() -> Services:
    """Start nats, memcached, cassandra and kafka unless they already answer; fail loudly otherwise."""
    status = subprocess.run([sys.executable, str(SCRIPT), "status", "--json"], capture_output=True, text=True)
    rows = {row["service"]: row["state"] for row in json.loads(status.stdout or "[]")}
    wanted = [name for name in ("nats", "memcached", "cassandra", "kafka", "helm")
              if rows.get(name) not in ("up", "installed")]
    if wanted:
        proc = subprocess.run([sys.executable, str(SCRIPT), "up", *wanted], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/services up {' '.join(wanted)} failed:\n{proc.stdout}\n{proc.stderr}")
    return Services(
        nats_url=f"nats://127.0.0.1:{_port('WALCAR_NATS_PORT', 14222)}",
        memcached=("127.0.0.1", _port("WALCAR_MEMCACHED_PORT", 21211)),
        cassandra=("127.0.0.1", _port("WALCAR_CASSANDRA_PORT", 19042)),
        kafka=f"127.0.0.1:{_port('WALCAR_KAFKA_PORT', 19092)}",
    )
