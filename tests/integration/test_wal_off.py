"""`mode = "off"`: the WAL switched off per namespace, live, under a steady write load.

A writer keeps setting keys to increasing numbers through the sidecar's memcached (or
CQL) front while the control plane switches the namespace async -> off -> async. In
the end every key holds the last number written: nothing lost, nothing reordered (a
journaled older write applied after a direct newer one would show as a smaller
number). While off, writes went straight to the target; the KV API refuses them.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
from cassandra.cluster import Cluster
from pymemcache.client.base import Client as MemcacheClient

from sidecar.config import stream_name
from tests.integration.test_control_plane import apply, namespaces_of
from tests.integration.test_drain import DRAIN, memcached_target
from tests.support.cassandra import driver_cluster
from tests.support.procs import MemcachedProcess, NatsProcess, free_port
from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, kv_listener, sidecar_document
from tests.support.streams import stream_state
from tests.support.waiting import until

KEYS = 40


class Writer(threading.Thread):
    """Sets each key to 1, 2, 3, ... in rounds, until stopped; remembers the last acked number per key."""

    def __init__(self, write: Any) -> None:
        super().__init__(daemon=True)
        self.write = write
        self.last: dict[str, int] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        number = 0
        try:
            while not self.stop.is_set():
                number += 1
                for index in range(KEYS):
                    key = f"k{index}"
                    self.write(key, number)
                    self.last[key] = number
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def switch(process: SidecarProcess, tmp_path: Path, namespace: str, document: dict[str, Any], mode: str) -> None:
    result = apply(process.config_path, tmp_path, {namespace: {**document, "mode": mode}})
    assert result.returncode == 0, result.stderr


async def test_memcached_async_off_async_under_load_loses_and_reorders_nothing(
        private_nats: NatsProcess, private_memcached: MemcachedProcess, tmp_path: Path, unique: str) -> None:
    target = memcached_target("cache", ("127.0.0.1", private_memcached.port))
    namespace = {"partitions": 4, "targets": [target]}
    listener = {"protocol": "memcached", "bind": f"127.0.0.1:{free_port()}", "namespace": unique}
    document = sidecar_document(private_nats.url, {unique: namespace}, [listener, kv_listener()], drain=DRAIN)
    process = SidecarProcess(document, tmp_path / "s").start()
    host, port = listener["bind"].split(":")
    client = MemcacheClient((host, int(port)), default_noreply=False)

    def write(key: str, number: int) -> None:
        assert client.set(key, str(number).encode()) is True

    writer = Writer(write)
    try:
        writer.start()
        await until(lambda: len(writer.last) == KEYS, 10, "the first round")
        switch(process, tmp_path, unique, namespace, "off")
        await until(lambda: namespaces_of(process)[unique]["mode"] == "off", 10, "the switch to off")
        probe = MemcacheClient((host, int(port)), default_noreply=False)  # clients are not shared across threads
        direct_from = _direct_writes(probe)
        time.sleep(2)
        assert _direct_writes(probe) > direct_from  # keys clear of the fence went straight to memcached
        probe.close()
        kv = httpx.post(f"http://{document['listeners'][1]['bind']}/v1/log/{unique}", json={"key": "x", "text": "y"})
        assert kv.status_code == 409 and "switched off" in kv.json()["error"]
        switch(process, tmp_path, unique, namespace, "async")
        await until(lambda: namespaces_of(process)[unique]["mode"] == "async", 10, "the switch back")
        time.sleep(1)
        writer.stop.set()
        writer.join(30)
        assert writer.error is None, writer.error
        direct = MemcacheClient(("127.0.0.1", private_memcached.port))

        def landed() -> dict[str, int]:
            found = direct.get_many(list(writer.last))
            return {k: int(v) for k, v in found.items()}

        await until(lambda: landed() == writer.last, 30, "memcached to hold every key's last number")
    finally:
        writer.stop.set()
        client.close()
        process.stop()


def _direct_writes(client: MemcacheClient) -> int:
    return int(client.stats().get(b"walcar_writes_direct", 0))


async def test_cql_async_off_async_under_load_loses_and_reorders_nothing(
        private_nats: NatsProcess, services: Services, cassandra_session: Any, keyspace: str, tmp_path: Path,
        unique: str) -> None:
    cassandra_session.execute(f"CREATE TABLE {keyspace}.t (k text PRIMARY KEY, n int)")
    host, cport = services.cassandra
    target = {"type": "cassandra", "name": "db", "contact_points": [f"{host}:{cport}"], "keyspace": keyspace,
              "username": "cassandra", "password_file": str(Path(__file__).parents[2] / "examples" /
                                                            "cassandra.password"), "timeout": "2s"}
    namespace = {"partitions": 4, "targets": [target]}
    listener = {"protocol": "cql", "bind": f"127.0.0.1:{free_port()}", "namespace": unique}
    document = sidecar_document(private_nats.url, {unique: namespace}, [listener, kv_listener()], drain=DRAIN)
    process = SidecarProcess(document, tmp_path / "s").start()
    cluster: Cluster = driver_cluster(int(listener["bind"].split(":")[1]))
    session = cluster.connect(keyspace)
    insert = session.prepare("INSERT INTO t (k, n) VALUES (?, ?)")

    def write(key: str, number: int) -> None:
        session.execute(insert, (key, number))

    writer = Writer(write)
    try:
        writer.start()
        await until(lambda: len(writer.last) == KEYS, 20, "the first round")
        switch(process, tmp_path, unique, namespace, "off")
        await until(lambda: namespaces_of(process)[unique]["mode"] == "off", 10, "the switch to off")
        time.sleep(1.5)  # the fenced keys' journaled writes land; from then on every write goes direct
        journaled = (await stream_state(private_nats.url, stream_name(unique)))["messages"]
        rounds = len(writer.last) and max(writer.last.values())
        time.sleep(1.5)
        assert max(writer.last.values()) > rounds  # the writer went on ...
        assert (await stream_state(private_nats.url, stream_name(unique)))["messages"] == journaled  # ... direct
        switch(process, tmp_path, unique, namespace, "async")
        await until(lambda: namespaces_of(process)[unique]["mode"] == "async", 10, "the switch back")
        time.sleep(1)
        writer.stop.set()
        writer.join(30)
        assert writer.error is None, writer.error

        def landed() -> dict[str, int]:
            return {row.k: row.n for row in cassandra_session.execute(f"SELECT k, n FROM {keyspace}.t")}

        await until(lambda: landed() == writer.last, 30, "Cassandra to hold every key's last number")
    finally:
        writer.stop.set()
        cluster.shutdown()
        process.stop()
