"""A 3-node nats-server cluster (JetStream on) of a test's own, on loopback, to kill and lame-duck nodes."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from tests.support.procs import NatsProcess, free_port, wait_for


def nats_cluster(workdir: Path, size: int = 3) -> list[NatsProcess]:
    """Started; each node routes to the others. `node.url` is one node's client URL."""
    route_ports = [free_port() for _ in range(size)]
    routes = ",".join(f"nats://127.0.0.1:{port}" for port in route_ports)
    nodes = [NatsProcess(workdir / f"n{i}", extra_args=[
        "--name", f"n{i}", "--cluster_name", "walcar-test", "--cluster", f"nats://127.0.0.1:{route_ports[i]}",
        "--routes", routes]) for i in range(size)]
    started: list[NatsProcess] = []
    try:
        for node in nodes:
            node.start(timeout=30)
            started.append(node)
        wait_for(lambda: all(_healthy(node) for node in nodes), 60, what="the cluster's JetStream meta leader")
    except BaseException:
        for node in started:
            node.kill()
        raise
    return nodes


def _healthy(node: NatsProcess) -> bool:
    """/healthz without js-enabled-only: JetStream is current (the meta leader is known)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/healthz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def cluster_url(nodes: list[NatsProcess]) -> str:
    return ",".join(node.url for node in nodes)
