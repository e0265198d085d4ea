"""Target adapters; adding one touches only its own module, its config struct and this factory."""

from __future__ import annotations

from typing import Any

from sidecar.config import CassandraTarget as CassandraSettings
from sidecar.config import Config, Target
from sidecar.config import HttpTarget as HttpSettings
from sidecar.config import KafkaTarget as KafkaSettings
from sidecar.config import MemcachedTarget as MemcachedSettings


def build_target(settings: Target, namespace: str, config: Config) -> Any:
    # Imported on use: a deployment pays only for the clients its targets need (kafka is an extra).
    if isinstance(settings, MemcachedSettings):
        from sidecar.drain.targets.memcached import MemcachedTarget

        return MemcachedTarget(settings)
    if isinstance(settings, CassandraSettings):
        from sidecar.drain.targets.cassandra import CassandraTarget

        return CassandraTarget(settings, namespace)
    if isinstance(settings, HttpSettings):
        from sidecar.drain.targets.http import HttpTarget

        return HttpTarget(settings, namespace)
    if isinstance(settings, KafkaSettings):
        from sidecar.drain.targets.kafka import KafkaTarget  # ImportError names the extra when it is missing

        return KafkaTarget(settings, namespace)
    from sidecar.drain.targets.wal import WalTarget

    return WalTarget(settings, namespace, config)
