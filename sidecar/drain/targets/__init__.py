"""Target adapters; adding one touches only its own module and this factory."""

from __future__ import annotations

from typing import Any

from sidecar.config import CassandraTarget as CassandraSettings
from sidecar.config import Config, Target
from sidecar.config import MemcachedTarget as MemcachedSettings


def build_target(settings: Target, namespace: str, config: Config) -> Any:
    if isinstance(settings, MemcachedSettings):
        from sidecar.drain.targets.memcached import MemcachedTarget

        return MemcachedTarget(settings)
    if isinstance(settings, CassandraSettings):
        from sidecar.drain.targets.cassandra import CassandraTarget

        return CassandraTarget(settings, namespace)
    from sidecar.drain.targets.wal import WalTarget

    return WalTarget(settings, namespace, config)
