"""The trio link in a real 3-node cluster, as nats.go and nats-py behave: it learns the cluster's servers
from INFO, fails over when a node dies, leaves a node in lame-duck mode before it closes, and never
queues without bound for a server that stopped reading."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.lowlevel

from sidecar.log.link import NatsLink
from sidecar.log.service import open_journal
from sidecar.log.wire import encode_publish
from tests.support.natscluster import cluster_url, nats_cluster
from tests.support.procs import NatsProcess
from tests.support.sidecar import base_url, build_config, kv_listener, running_sidecar, sidecar_document
from tests.support.waiting import until


@pytest.fixture
def cluster(tmp_path: Path, services) -> Iterator[list[NatsProcess]]:
    nodes = nats_cluster(tmp_path / "cluster")
    yield nodes
    for node in nodes:
        node.kill()


def on(node: NatsProcess, link: NatsLink) -> bool:
    return link.connected and link.current is not None and link.current.port == node.port


async def test_given_one_url_of_three_it_learns_the_others_and_survives_that_node_dying(
        cluster: list[NatsProcess]) -> None:
    first, *others = cluster
    link = NatsLink(first.url, name="one-url")
    sender = NatsLink(others[1].url, name="sender")
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await nursery.start(sender.run)
        await until(lambda: on(first, link) and len(link.pool) == 3, 10, "the cluster's servers in the pool")
        assert {s.port for s in link.pool.servers} == {n.port for n in cluster}
        link.subscribe("cluster.test", lambda subject, reply, payload, headers: received.append(payload))

        first.kill()
        await until(lambda: link.connected and link.current is not None and link.current.port != first.port, 15,
                    "the link on another node")
        assert link.current is not None and link.current.discovered
        # the subscription was renewed there: a message published on a third node reaches it
        await until(lambda: sender.connected, 10, "the sender")
        for _ in range(50):
            sender.send(encode_publish("cluster.test", b"", None, b"after-failover"))
            await trio.sleep(0.1)
            if received:
                break
        assert received and received[0] == b"after-failover"
        nursery.cancel_scope.cancel()


async def test_a_node_in_lame_duck_mode_is_left_before_it_closes_the_connection(
        cluster: list[NatsProcess]) -> None:
    link = NatsLink(cluster_url(cluster), name="ldm")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await until(lambda: link.connected and link.current is not None, 10, "a connection")
        assert link.current is not None
        lame = next(node for node in cluster if node.port == link.current.port)
        assert lame.proc is not None
        lame.proc.send_signal(signal.SIGUSR2)  # nats-server: enter lame-duck mode
        # nats-server waits a 10 s grace period before it starts closing clients: the link is gone well before
        await until(lambda: link.connected and link.current is not None and link.current.port != lame.port, 5,
                    "the link to move off the lame-duck node")
        assert lame.running  # it had not gone yet: the link moved on its own
        nursery.cancel_scope.cancel()


async def test_order_of_servers_differs_between_processes(cluster: list[NatsProcess]) -> None:
    """No thundering herd on URL #1: each link (each process) starts at a random server."""
    firsts = set()
    for _ in range(30):
        link = NatsLink(cluster_url(cluster))
        firsts.add(link.pool.pick().port)
    assert len(firsts) > 1


async def test_writes_are_refused_not_queued_without_bound_when_the_server_stops_reading(
        private_nats: NatsProcess) -> None:
    link = NatsLink(private_nats.url, name="bounded", max_pending=1024 * 1024)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await until(lambda: link.connected, 10, "a connection")
        assert private_nats.proc is not None
        private_nats.proc.send_signal(signal.SIGSTOP)  # alive, but reading nothing: the socket fills up
        try:
            chunk = encode_publish("bounded.test", b"", None, b"x" * 64 * 1024)
            refused = False
            for _ in range(4000):  # at most 256 MiB offered
                if not link.send(chunk):
                    refused = True
                    break
                await trio.lowlevel.checkpoint()
            assert refused and link.congested
            assert link._out_bytes < link.max_pending + len(chunk)
        finally:
            private_nats.proc.send_signal(signal.SIGCONT)
        await until(lambda: not link.congested, 10, "the buffer to drain once the server reads again")
        assert link.send(encode_publish("bounded.test", b"", None, b"ok"))
        nursery.cancel_scope.cancel()


async def test_a_sidecar_given_one_url_keeps_journaling_to_r3_streams_when_that_node_dies(
        cluster: list[NatsProcess], unique: str) -> None:
    """Both connections (nats-py and the link) learn the other nodes and move when the one URL's node dies."""
    first = cluster[0]
    config = build_config(sidecar_document(first.url, {unique: {"partitions": 2, "replicas": 3}}, [kv_listener()]))
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=10) as client:

        async def put(i: int) -> str:
            response = await client.put(f"/v1/kv/{unique}/k{i}", json={"items": [{"key": "v", "text": str(i)}]})
            return str(response.json().get("durable")) if response.status_code in (200, 503) else "error"

        assert await put(0) == "true"
        first.kill()
        durable_after = 0
        for i in range(1, 400):  # bounded: at most ~40 s of attempts
            if await put(i) == "true":
                durable_after += 1
                if durable_after >= 20:
                    break
            else:
                await trio.sleep(0.1)
        assert durable_after >= 20, "writes did not become durable again on the surviving nodes"


async def test_both_connections_of_a_sidecar_leave_a_lame_duck_node(cluster: list[NatsProcess], unique: str) -> None:
    config = build_config(sidecar_document(cluster_url(cluster), {unique: {"partitions": 1}}))
    async with open_journal(config, connect_retry=10.0) as journal:
        conn, link = journal.writer.conn, journal.writer.conn.link
        assert link is not None and conn.nc is not None
        nc = conn.nc
        await until(lambda: link.connected and nc.connected_url is not None, 10, "both connections")
        assert nc.connected_url is not None
        lame = next(node for node in cluster if node.port == nc.connected_url.port)
        assert lame.proc is not None
        lame.proc.send_signal(signal.SIGUSR2)

        def moved() -> bool:
            url = nc.connected_url
            return (url is not None and url.port != lame.port and link.connected and link.current is not None
                    and link.current.port != lame.port)

        await until(moved, 8, "nats-py and the link to move off the lame-duck node")
        assert lame.running
        # and nats-py works where it landed: JetStream answers it (an account-level call: the test's R1
        # stream may live on the lame-duck node and be offline until that node is gone)
        info = await conn.js_api("INFO")
        assert "streams" in info, info
