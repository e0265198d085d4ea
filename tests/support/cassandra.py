"""cassandra-driver clusters for tests and benchmarks, set up the driver's current way."""

from __future__ import annotations

from typing import Any

from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import LoadBalancingPolicy, RoundRobinPolicy


def driver_cluster(port: int, host: str = "127.0.0.1", *, username: str = "cassandra", password: str = "cassandra",
                   load_balancing: LoadBalancingPolicy | None = None, protocol_version: int | None = 4,
                   **options: Any) -> Cluster:
    """A Cluster as user `cassandra` by default (protocol v4, or negotiated with None). The load balancing goes
    into the default execution profile: the driver's legacy Cluster arguments are deprecated, and
    contact points without an explicit policy draw a warning."""
    profile = ExecutionProfile(load_balancing_policy=load_balancing or RoundRobinPolicy())
    if protocol_version is not None:
        options["protocol_version"] = protocol_version
    return Cluster([host], port=port, auth_provider=PlainTextAuthProvider(username, password),
                   execution_profiles={EXEC_PROFILE_DEFAULT: profile}, **options)
