"""The drain against real targets: outages, faults, poison entries, a killed drainer, fan-out, sync mode."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import httpx
import msgspec
import trio
from pymemcache.client.base import Client as MemcacheClient

from sidecar.admin.dlq import DlqFilter
from sidecar.app import Sidecar
from sidecar.config import stream_name
from sidecar.drain.service import DrainService
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome
from sidecar.envelope import Entry, Op, new_id, now_us, partition_of
from sidecar.ingress import Ack, Ingress
from sidecar.log.service import open_journal
from sidecar.log.streams import dlq_stream_name
from tests.support.httpload import KvConnection
from tests.support.procs import CassandraProcess, MemcachedProcess, NatsProcess
from tests.support.services import Services
from tests.support.sidecar import (
    SidecarProcess,
    base_url,
    build_config,
    kv_listener,
    running_sidecar,
    sidecar_document,
)
from tests.support.streams import read_stream
from tests.support.waiting import converge, until

FAST_RETRY = {"initial_delay": "20ms", "max_delay": "500ms", "multiplier": 2.0, "max_attempts": 50}
DRAIN = {"lease_ttl": "2s", "ack_wait": "10s"}


def memcached_target(name: str, address: tuple[str, int]) -> dict:
    return {"name": name, "type": "memcached", "servers": [f"{address[0]}:{address[1]}"]}


async def put_unchecked(sidecar: Sidecar, namespace: str, record: str, items: list[tuple[str, str]]) -> Ack:
    """Items journaled as one mutation without the front door's checks, as an older sidecar (or another
    region) could have: the way a permanent apply error (an item key over Cassandra's 64 KiB, which the
    KV API now refuses with 400) still reaches the drain."""
    partitions = sidecar.config.namespaces[namespace].partitions
    mutation = new_id()
    entries = [Entry(id=f"{mutation}:{index}", ns=namespace, op=Op.PUT, key=record,
                     partition=partition_of(record, partitions), item=item, value=value.encode(),
                     write_time=now_us(), origin="local") for index, (item, value) in enumerate(items)]
    assert sidecar.ingress is not None
    return await sidecar.ingress.write_mutation(entries, mutation)


def cassandra_target(name: str, port: int, keyspace: str) -> dict:
    password_file = Path(__file__).parents[2] / "examples" / "cassandra.password"
    return {"name": name, "type": "cassandra", "contact_points": [f"127.0.0.1:{port}"], "keyspace": keyspace,
            "username": "cassandra", "password_file": str(password_file), "consistency": "ONE", "timeout": "2s"}


async def write_load(writer: str | Ingress, namespace: str, keys: list[str], total: int,
                     workers: int = 32, first: int = 0) -> dict[str, str]:
    """`total` writes spread over `keys`, each acked durable; returns each key's last value.

    Values are numbered from `first`, so a second load given `first` past the end of the previous one
    leaves every key with a value it never had before.

    Through a sidecar's KV API ("host:port") where that sidecar is another process, else straight into
    the in-process sidecar's ingress: the same entries and acks, without the test's time going to HTTP."""
    last: dict[str, str] = {}
    work = iter(range(first, first + total))

    async def worker() -> None:
        connection = None
        if isinstance(writer, str):
            host, port = writer.rsplit(":", 1)
            connection = await KvConnection.open(host, int(port))

        async def write(key: str, value: str) -> None:
            if connection is None:
                assert isinstance(writer, Ingress)
                ack = await writer.write(writer.entry(namespace, Op.PUT, key, value=value.encode()))
                assert ack.ok, ack
            else:
                _, body = await connection.post(f"/v1/log/{namespace}", {"key": key, "text": value})
                assert body["durable"] == "true", body

        for i in work:
            key = keys[i % len(keys)]
            await write(key, f"{key}={i}")
            # One key's writes are issued in increasing i by whichever worker holds them; keep the highest acked.
            if key not in last or int(last[key].split("=")[1]) < i:
                last[key] = f"{key}={i}"
        if connection is not None:
            await connection.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    return last


def memcached_values(address: tuple[str, int], keys: list[str]) -> dict[str, str]:
    client = MemcacheClient(address)
    try:
        found = {}
        for start in range(0, len(keys), 100):
            batch = client.get_many(keys[start : start + 100])
            found.update({k: v.decode() for k, v in batch.items()})
        return found
    finally:
        client.close()



async def test_memcached_down_then_back_drains_the_backlog(services: Services, private_memcached: MemcachedProcess,
                                                           unique: str) -> None:
    address = ("127.0.0.1", private_memcached.port)
    config = build_config(sidecar_document(
        services.nats_url,
        {unique: {"partitions": 8, "retry": FAST_RETRY, "targets": [memcached_target("cache", address)]}},
        [kv_listener()], drain=DRAIN,
    ))
    keys = [f"{unique}-k{i}" for i in range(500)]
    async with running_sidecar(config) as sidecar:
        await trio.to_thread.run_sync(private_memcached.stop)
        last = await write_load(sidecar.ingress, unique, keys, 20_000)
        drainer = sidecar.drain.drainer(unique, "cache")
        assert drainer.state == "breaker-open"
        await trio.to_thread.run_sync(private_memcached.start)
        await converge(lambda: {k: v for k, v in memcached_values(address, keys).items() if last[k] != v}
                             or set(keys) - set(memcached_values(address, keys)), 90, "memcached")
        assert drainer.stats.dead_lettered == 0


async def test_cassandra_down_then_back_with_original_writetimes(services: Services,
                                                                private_cassandra: CassandraProcess,
                                                                unique: str) -> None:
    keyspace = f"ks_{unique}"
    config = build_config(sidecar_document(
        services.nats_url,
        {unique: {"partitions": 8, "retry": FAST_RETRY,
                  "targets": [cassandra_target("db", private_cassandra.port, keyspace)]}},
        [kv_listener()], drain=DRAIN,
    ))
    keys = [f"k{i}" for i in range(500)]
    async with running_sidecar(config) as sidecar:
        await until(lambda: sidecar.drain.drainer(unique, "db").target.session is not None, 60)
        await trio.to_thread.run_sync(private_cassandra.stop)
        last = await write_load(sidecar.ingress, unique, keys, 20_000)
        await trio.to_thread.run_sync(private_cassandra.start)
        journal = {}
        for message in await read_stream(services.nats_url, stream_name(unique)):
            entry = message.entry()
            journal[entry.key] = (entry.value.decode(), entry.write_time)  # stream order: the last one wins
        assert {k: v for k, (v, _) in journal.items()} == last

        def diff() -> dict:
            rows = cassandra_rows(private_cassandra.port, keyspace, unique)
            return {k: (rows.get(k), expected) for k, expected in journal.items() if rows.get(k) != expected}

        await converge(diff, 120, "cassandra")



def cassandra_rows(port: int, keyspace: str, table: str) -> dict[str, tuple[str, int]]:
    from tests.support.cassandra import driver_cluster

    cluster = driver_cluster(port)
    try:
        session = cluster.connect()
        rows = session.execute(f"SELECT id, value, WRITETIME(value) AS wt FROM {keyspace}.{table}")
        return {row.id: (row.value.decode(), row.wt) for row in rows}
    except Exception:
        return {}
    finally:
        cluster.shutdown()


class FlakyTarget:
    """The real target behind a fault injector: 10% of runs fail transiently before reaching it."""

    def __init__(self, real: object, rate: float) -> None:
        self.real = real
        self.name = real.name  # type: ignore[attr-defined]
        self.rate = rate
        self.injected = 0

    def __getattr__(self, item: str) -> object:
        return getattr(self.real, item)

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        doomed = {i for i in range(len(runs)) if random.random() < self.rate}
        self.injected += len(doomed)
        passed = [run for i, run in enumerate(runs) if i not in doomed]
        results = iter(await self.real.apply(passed) if passed else [])  # type: ignore[attr-defined]
        return [RunOutcome(0, ApplyError(ErrorClass.TRANSIENT, "injected fault")) if i in doomed else next(results)
                for i in range(len(runs))]


async def test_ordering_per_key_under_transient_faults(services: Services, unique: str) -> None:
    config = build_config(sidecar_document(
        services.nats_url,
        {unique: {"partitions": 4, "retry": FAST_RETRY, "targets": [memcached_target("cache", services.memcached)]}},
        drain=DRAIN,
    ))
    keys = [f"{unique}-o{i}" for i in range(100)]
    last: dict[str, str] = {}
    async with open_journal(config) as journal:
        ingress = Ingress(config, journal)
        service = DrainService(config, journal)
        drainer = service.drainer(unique, "cache")
        flaky = FlakyTarget(drainer.target, 0.10)
        drainer.target = drainer.pump.target = flaky
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)

            async def writer(worker: int) -> None:
                for i in range(worker, 20_000, 20):
                    key = keys[i % 100]
                    ack = await ingress.write(ingress.entry(unique, Op.PUT, key, value=f"{i}".encode()))
                    assert ack.ok
                    last[key] = str(i)

            async with trio.open_nursery() as writers:
                for worker in range(20):
                    writers.start_soon(writer, worker)
            # Each key's writes come from one worker (i % 20 fixes i % 100's worker), in increasing order.
            await converge(lambda: {k: v for k, v in memcached_values(services.memcached, keys).items()
                                          if last[k] != v}, 60, "memcached under faults")
            assert flaky.injected > 100 and drainer.stats.retries > 100
            assert drainer.stats.dead_lettered == 0
            await service.stop(5)
            nursery.cancel_scope.cancel()


async def test_permanent_error_goes_to_dlq_and_others_keep_flowing(services: Services, cassandra_session,
                                                                   unique: str) -> None:
    keyspace = f"ks_{unique}"
    config = build_config(sidecar_document(
        services.nats_url,
        {unique: {"partitions": 4, "retry": FAST_RETRY,
                  "targets": [cassandra_target("db", services.cassandra[1], keyspace)]}},
        [kv_listener()], drain=DRAIN,
    ))
    huge_item = "x" * 70_000  # Cassandra refuses clustering keys over 64 KiB: a permanent error
    try:
        async with running_sidecar(config) as sidecar, httpx.AsyncClient(base_url=base_url(config)) as client:
            # Paused while writing, so the poison and the entry after it are queued together when it fails.
            await sidecar.drain.pauses.set(unique, "db", True)
            before = (await client.put(f"/v1/kv/{unique}/good", json={"items": [{"key": "a", "text": "1"}]})).json()
            bad = await put_unchecked(sidecar, unique, "poison", [(huge_item, "p"), ("after", "later")])
            after = (await client.put(f"/v1/kv/{unique}/good", json={"items": [{"key": "b", "text": "2"}]})).json()
            assert before["durable"] == bad.durable.value == after["durable"] == "true"
            await sidecar.drain.pauses.set(unique, "db", False)
            drainer = sidecar.drain.drainer(unique, "db")
            await until(lambda: drainer.stats.dead_lettered == 1, 30)

            async def rows(record: str) -> dict[str, bytes]:
                response = await client.get(f"/v1/kv/{unique}/{record}")
                return {i["key"]: i["value"] for i in response.json()["items"]} if response.status_code == 200 else {}

            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and (len(await rows("good")) < 2 or not await rows("poison")):
                await trio.sleep(0.2)
            assert set(await rows("good")) == {"a", "b"}
            assert set(await rows("poison")) == {"after"}  # the later entry of the same key went past the poison
        letters = await read_stream(services.nats_url, dlq_stream_name(unique))
        assert len(letters) == 1
        letter = letters[0]
        headers = letter.headers
        assert headers["Walcar-Target"] == "db" and headers["Walcar-Error-Class"] == "permanent"
        assert "InvalidRequest" in headers["Walcar-Error"] and headers["Walcar-Attempts"] == "1"
        assert headers["Walcar-Key"] == "poison"
        assert headers["Walcar-Superseded"] == "true"
        assert headers["Walcar-First-Failure"] <= headers["Walcar-Last-Failure"]
        original = letter.entry()  # the DLQ payload is the whole original entry
        assert (original.key, original.item, original.value) == ("poison", huge_item, b"p")
        assert int(headers["Walcar-Original-Seq"]) == bad.sequence - 1
    finally:
        cassandra_session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


def drain_only(nats_url: str, namespaces: dict, workdir: Path) -> SidecarProcess:
    """A `walcar run --role drain` process (no listeners), started and ready."""
    return SidecarProcess(sidecar_document(nats_url, namespaces, drain=DRAIN), workdir, role="drain").start()


def split(drainers: list[SidecarProcess]) -> list[int]:
    """How many of target "cache"'s partitions each drainer holds, in ascending order."""
    return sorted(d.target_status("cache")["owned_here"] for d in drainers)


async def test_killed_drainer_hands_its_partitions_over(services: Services, tmp_path: Path, unique: str) -> None:
    namespaces = {unique: {"partitions": 8, "retry": FAST_RETRY,
                           "targets": [memcached_target("cache", services.memcached)]}}
    ingress_doc = sidecar_document(services.nats_url, namespaces, [kv_listener()], drain=DRAIN)
    ingress = SidecarProcess(ingress_doc, tmp_path / "ingress", role="ingress").start()
    drainers = [drain_only(services.nats_url, namespaces, tmp_path / f"d{i}") for i in range(2)]
    keys = [f"{unique}-s{i}" for i in range(200)]
    try:
        bind = ingress_doc["listeners"][0]["bind"]
        await write_load(bind, unique, keys, 4000)
        drainers[0].proc.send_signal(signal.SIGKILL)  # mid-stream: whatever it held is unacked
        last = await write_load(bind, unique, keys, 4000, first=4000)  # new values for every key
        await converge(lambda: {k: v for k, v in memcached_values(services.memcached, keys).items()
                                      if last[k] != v}, 60, "memcached after a drainer died")
        assert "partition_acquired" in drainers[1].log()
        taken = drainers[1].log().count("partition_acquired")
        assert taken == 8, f"the survivor holds {taken} of 8 partitions"
    finally:
        for process in [ingress, *drainers]:
            process.stop()


async def test_drainers_share_partitions_and_rebalance_as_they_come_and_go(services: Services, tmp_path: Path,
                                                                           unique: str) -> None:
    """Drainers split a target's partitions fairly, a newcomer gets its share handed over, and
    a drainer that stops cleanly gives its partitions to the others at once, not after a TTL."""
    namespaces = {unique: {"partitions": 8, "targets": [memcached_target("cache", services.memcached)]}}
    ingress_doc = sidecar_document(services.nats_url, namespaces, [kv_listener()], drain=DRAIN)
    ingress = SidecarProcess(ingress_doc, tmp_path / "ingress", role="ingress").start()

    drainers = [drain_only(services.nats_url, namespaces, tmp_path / "d0"),
                drain_only(services.nats_url, namespaces, tmp_path / "d1")]
    keys = [f"{unique}-b{i}" for i in range(100)]
    try:
        await until(lambda: split(drainers) == [4, 4], 30, "an even split")
        drainers.append(drain_only(services.nats_url, namespaces, tmp_path / "d2"))
        await until(lambda: split(drainers) == [2, 3, 3], 30, "a newcomer's share handed over")
        leaving = drainers.pop(0)
        assert leaving.stop() == 0
        # Within the TTL (2 s): the leaver's member key and leases are deleted, not left to expire.
        await until(lambda: split(drainers) == [4, 4], 1.9, "the leaver's partitions taken over")
        last = await write_load(ingress_doc["listeners"][0]["bind"], unique, keys, 1000)
        await converge(lambda: {k: v for k, v in memcached_values(services.memcached, keys).items()
                                if last[k] != v}, 30, "memcached after the rebalancing")
    finally:
        for process in [ingress, *drainers]:
            process.stop()


async def test_lease_and_pause_watches_follow_across_a_nats_restart(private_nats: NatsProcess, services: Services,
                                                                    tmp_path: Path, unique: str) -> None:
    """Drainers learn who holds what, who drains and what is paused from KV watches: after
    nats-server restarts, those watches must be back, or drainers would neither share with a
    newcomer nor see a pause."""
    namespaces = {unique: {"partitions": 8, "targets": [memcached_target("cache", services.memcached)]}}

    first = drain_only(private_nats.url, namespaces, tmp_path / "d0")
    second: SidecarProcess | None = None
    try:
        # Ready means serving: the status already has the target's row (it is drained here).
        assert first.target_status("cache")["partitions"] == 8
        await until(lambda: split([first]) == [8], 30, "the first drainer to take every partition")
        await trio.to_thread.run_sync(private_nats.restart)
        second = drain_only(private_nats.url, namespaces, tmp_path / "d1")
        pair = [first, second]
        await until(lambda: split(pair) == [4, 4], 30, "an even split after the restart")
        paused = httpx.post(f"{second.admin}/v1/drain/{unique}/cache/pause", json={})
        assert paused.json()["paused"] is True
        await until(lambda: first.target_status("cache")["state"] == "paused", 10,
                    "the pause to reach the first drainer")
    finally:
        for process in [first, second]:
            if process is not None:
                process.stop()


async def test_fan_out_a_stopped_target_does_not_hold_back_the_other(services: Services,
                                                                     private_memcached: MemcachedProcess,
                                                                     unique: str) -> None:
    down = ("127.0.0.1", private_memcached.port)
    config = build_config(sidecar_document(
        services.nats_url,
        {unique: {"partitions": 4, "retry": FAST_RETRY,
                  "targets": [memcached_target("down", down), memcached_target("up", services.memcached)]}},
        [kv_listener()], drain=DRAIN,
    ))
    keys = [f"{unique}-f{i}" for i in range(200)]
    async with running_sidecar(config) as sidecar:
        await trio.to_thread.run_sync(private_memcached.stop)
        began = time.monotonic()
        last = await write_load(sidecar.ingress, unique, keys, 3000)
        await converge(lambda: {k: v for k, v in memcached_values(services.memcached, keys).items()
                                      if last[k] != v} or set(keys) - set(memcached_values(services.memcached, keys)),
                             20, "the healthy target")
        assert time.monotonic() - began < 15
        await trio.to_thread.run_sync(private_memcached.start)
        await converge(lambda: set(keys) - set(memcached_values(down, keys)), 60, "the recovered target")


async def test_sync_namespace_answers_visible_and_reads_see_it(services: Services, cassandra_session,
                                                               unique: str) -> None:
    keyspace = f"ks_{unique}"
    config = build_config(sidecar_document(
        services.nats_url,
        {unique: {"partitions": 4, "mode": "sync", "visibility_budget": "2s",
                  "targets": [cassandra_target("db", services.cassandra[1], keyspace)]}},
        [kv_listener()], drain=DRAIN,
    ))
    try:
        async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config)) as client:
            for i in range(20):
                put = await client.put(f"/v1/kv/{unique}/user{i}", json={"items": [{"key": "name", "text": f"n{i}"}]})
                assert put.json() == {"durable": "true", "visible": True, "message": "", "sequence": i + 1,
                                      "duplicate": False}
                read = await client.get(f"/v1/kv/{unique}/user{i}")
                assert read.status_code == 200
                assert read.json()["items"] == [{"key": "name", "value": _b64(f"n{i}")}]
    finally:
        cassandra_session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


async def test_16mib_value_chunked_applied_and_chunks_deleted(services: Services, cassandra_session,
                                                              unique: str) -> None:
    keyspace = f"ks_{unique}"
    config = build_config(sidecar_document(
        services.nats_url,
        {unique: {"partitions": 2, "max_item_size": "17MiB",
                  "targets": [cassandra_target("db", services.cassandra[1], keyspace)]}},
        [{**kv_listener(), "max_body": "17MiB", "partial_budget": "34MiB"}], drain=DRAIN,  # one 16 MiB body
    ))
    payload = bytes(random.getrandbits(8) for _ in range(1024)) * (16 * 1024)
    try:
        async with running_sidecar(config) as sidecar, \
                httpx.AsyncClient(base_url=base_url(config), timeout=60) as client:
            response = await client.post(f"/v1/log/{unique}", content=msgspec.msgpack.encode(
                {"key": "big", "payload": payload}), headers={"content-type": "application/msgpack"})
            assert msgspec.msgpack.decode(response.content)["durable"] == "true"
            entry = (await read_stream(services.nats_url, stream_name(unique)))[0].entry()
            assert entry.chunk is not None and entry.value is None
            drainer = sidecar.drain.drainer(unique, "db")
            await until(lambda: drainer.stats.applied == 1 or drainer.stats.dead_lettered, 60)
            assert drainer.stats.applied == 1, drainer.stats.last_error
            chunks = sidecar.ingress.journal.chunks
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and await chunks.exists(unique, entry.chunk.object):
                await trio.sleep(0.2)
            assert not await chunks.exists(unique, entry.chunk.object), "the chunks outlived the apply"
        row = cassandra_session.execute(f"SELECT value, WRITETIME(value) AS wt FROM {keyspace}.{unique} "
                                        "WHERE id = 'big' AND key = ''").one()
        assert row.value == payload and row.wt == entry.write_time
    finally:
        cassandra_session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


async def test_entries_for_other_targets_are_skipped(services: Services, cassandra_session, unique: str) -> None:
    """WriteToLog with `target` reaches only the named target; the other acks it without applying."""
    config = build_config(sidecar_document(
        services.nats_url,
        {unique: {"partitions": 2, "targets": [memcached_target("a", services.memcached),
                                               cassandra_target("b", services.cassandra[1], f"ks_{unique}")]}},
        [kv_listener()], drain=DRAIN,
    ))
    try:
        async with running_sidecar(config) as sidecar, httpx.AsyncClient(base_url=base_url(config)) as client:
            response = await client.post(f"/v1/log/{unique}", json={"key": f"{unique}-only-a", "text": "v",
                                                                    "target": ["a"]})
            assert response.json()["durable"] == "true"
            await converge(lambda: {f"{unique}-only-a"} - set(memcached_values(services.memcached,
                                                                                    [f"{unique}-only-a"])), 20, "a")
            b = sidecar.drain.drainer(unique, "b")
            await trio.sleep(1.0)
            assert b.stats.applied == 0
            assert (await client.get(f"/v1/kv/{unique}/{unique}-only-a")).status_code == 200  # primary: a
    finally:
        cassandra_session.execute(f"DROP KEYSPACE IF EXISTS ks_{unique}")


async def test_strict_namespace_holds_a_key_behind_its_dead_letter(services: Services, cassandra_session,
                                                                  unique: str) -> None:
    """strict = true: later writes of a poisoned key wait until its dead letter is purged; other keys flow."""
    keyspace = f"ks_{unique}"
    config = build_config(sidecar_document(
        services.nats_url,
        # Reads here show what Cassandra holds, not this sidecar's own un-applied writes (its overlay).
        {unique: {"partitions": 2, "strict": True, "retry": FAST_RETRY, "read_your_writes": False,
                  "targets": [cassandra_target("db", services.cassandra[1], keyspace)]}},
        [kv_listener()], drain=DRAIN,
    ))
    try:
        async with running_sidecar(config) as sidecar, httpx.AsyncClient(base_url=base_url(config)) as client:
            drainer = sidecar.drain.drainer(unique, "db")
            assert (await put_unchecked(sidecar, unique, "k", [("x" * 70_000, "p")])).ok
            await until(lambda: drainer.stats.dead_lettered == 1, 30)
            later = await client.put(f"/v1/kv/{unique}/k", json={"items": [{"key": "later", "text": "v"}]})
            other = await client.put(f"/v1/kv/{unique}/other", json={"items": [{"key": "a", "text": "v"}]})
            assert later.json()["durable"] == other.json()["durable"] == "true"

            async def items(record: str) -> set[str]:
                response = await client.get(f"/v1/kv/{unique}/{record}")
                return {i["key"] for i in response.json()["items"]} if response.status_code == 200 else set()

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not await items("other"):
                await trio.sleep(0.2)
            assert await items("other") == {"a"}
            await trio.sleep(2.5)  # the strict key stays blocked however long we wait
            assert await items("k") == set()
            letters = await sidecar.dead_letters.list(unique, DlqFilter(target="db"))
            await sidecar.dead_letters.purge(unique, DlqFilter(seqs=[letters[0].seq]))
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not await items("k"):
                await trio.sleep(0.2)
            assert await items("k") == {"later"}
    finally:
        cassandra_session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


class RecordingTarget:
    """The real target, with each run it is handed recorded as the (op, item) of its entries."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.runs: list[list[tuple[Op, str]]] = []

    def __getattr__(self, item: str) -> object:
        return getattr(self.real, item)

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        self.runs.extend([(entry.op, entry.item) for entry in run] for run in runs)
        return await self.real.apply(runs)  # type: ignore[attr-defined]


async def test_memcached_run_of_one_record_applies_each_item(services: Services, unique: str) -> None:
    """A put of item a and a delete of item b of one record, drained in one run: a is set and b deleted
    (each item is a memcached key of its own, and the run collapses per item, not per record)."""
    config = build_config(sidecar_document(
        services.nats_url, {unique: {"partitions": 1, "targets": [memcached_target("cache", services.memcached)]}},
        [kv_listener()], drain=DRAIN,
    ))
    cache = MemcacheClient(services.memcached)
    records = [f"{unique}-rec{attempt}" for attempt in range(5)]
    try:
        async with running_sidecar(config) as sidecar, httpx.AsyncClient(base_url=base_url(config)) as client:
            drainer = sidecar.drain.drainer(unique, "cache")
            recording = RecordingTarget(drainer.target)
            drainer.target = drainer.pump.target = recording  # type: ignore[assignment]
            for attempt, record in enumerate(records):
                cache.set(f"{record}/b", b"old")
                # Paused while writing, so both entries are fetched together and the record's lane holds them as
                # one run; on a loaded box a pull already out may take them one at a time: then again, anew.
                await sidecar.drain.pauses.set(unique, "cache", True)
                response = await client.post(f"/v1/kv/{unique}/mutate", json={"mutations": [
                    {"op": "put", "id": record, "items": [{"key": "a", "text": "new"}]},
                    {"op": "delete", "id": record, "item_keys": ["b"]}]})
                assert response.json()["durable"] == "true", response.text
                recording.runs.clear()
                await sidecar.drain.pauses.set(unique, "cache", False)
                await until(lambda a=attempt: drainer.stats.applied == 2 * (a + 1), 30, "both entries applied")
                assert cache.get(f"{record}/a") == b"new"
                assert cache.get(f"{record}/b") is None
                if [(Op.PUT, "a"), (Op.DELETE, "b")] in recording.runs:
                    break
            else:
                raise AssertionError(f"the two entries never reached the target as one run: {recording.runs}")
    finally:
        cache.delete_many([f"{record}/{item}" for record in records for item in "ab"])
        cache.close()


async def test_memcached_applies_every_entry_of_a_mutation_stored_as_one_marker(
        services: Services, unique: str) -> None:
    """A mutation over the atomic-batch limits (1,001 entries), and a record put with a value over the chunk
    threshold, are stored as one MULTI marker each: the memcached target gets every entry inside. It used
    to be asked about the marker itself, said no, and the drain acked it unapplied: durable writes lost."""
    config = build_config(sidecar_document(
        services.nats_url, {unique: {"partitions": 2, "targets": [memcached_target("cache", services.memcached)]}},
        [kv_listener()], drain=DRAIN,
    ))
    keys = [f"{unique}-m{i}/n" for i in range(1001)] + [f"{unique}-big/a", f"{unique}-big/b"]
    cache = MemcacheClient(services.memcached)
    try:
        async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
            mutations = [{"op": "put", "id": f"{unique}-m{i}", "items": [{"key": "n", "text": f"v{i}"}]}
                         for i in range(1001)]
            response = await client.post(f"/v1/kv/{unique}/mutate", json={"mutations": mutations})
            assert response.status_code == 200 and response.json()["durable"] == "true", response.text
            big = "x" * (300 * 1024)  # over the 256 KiB chunk threshold, under memcached's 1 MiB item
            response = await client.put(f"/v1/kv/{unique}/{unique}-big", json={"items": [
                {"key": "a", "text": big}, {"key": "b", "text": "small"}]})
            assert response.status_code == 200 and response.json()["durable"] == "true", response.text
            await until(lambda: len(cache.get_many(keys)) == len(keys), 60, "every entry in memcached")
            # The mutation's keys share its marker's sequence: writing and reading one of them again works
            # (the ingress's applied-keys index once kept one key per sequence: a 500 here, or a hang).
            response = await client.put(f"/v1/kv/{unique}/{unique}-m5", json={"items": [{"key": "n", "text": "again"}]})
            assert response.status_code == 200 and response.json()["durable"] == "true", response.text
            with trio.fail_after(10):
                response = await client.get(f"/v1/kv/{unique}/{unique}-m7?items=n")
            assert response.status_code == 200, response.text
            await until(lambda: cache.get(f"{unique}-m5/n") == b"again", 30, "the later write applied")
        values = cache.get_many(keys)
        assert values[f"{unique}-m1000/n"] == b"v1000" and values[f"{unique}-big/a"] == big.encode()
    finally:
        cache.delete_many(keys)
        cache.close()
