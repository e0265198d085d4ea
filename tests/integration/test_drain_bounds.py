"""The drain's bounds against the real services: memory by bytes, whatever the backlog and its values."""

from __future__ import annotations

import collections
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from cassandra.query import BatchStatement as DriverBatch
from cassandra.query import BatchType

from sidecar.config import DrainSettings, stream_name
from sidecar.envelope import Entry, Op, now_us, partition_of
from sidecar.log.service import open_journal
from sidecar.log.streams import dlq_stream_name
from sidecar.memory_budget import worst_case
from tests.integration.test_drain import DRAIN, FAST_RETRY, cassandra_target, memcached_target, memcached_values
from tests.support.cassandra import driver_cluster
from tests.support.procs import MemcachedProcess, NatsProcess, free_port
from tests.support.services import Services
from tests.support.sidecar import (
    SidecarProcess,
    base_url,
    build_config,
    kv_listener,
    running_sidecar,
    sidecar_document,
)
from tests.support.streams import js_api, read_stream
from tests.support.waiting import converge, until

MIB = 1024 * 1024
SMALL_MAX_PAYLOAD = 192 * 1024


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process as the kernel counts it (VmHWM: its peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def journal_values(document: dict, namespace: str, keys: list[str], total: int, size: int) -> dict[str, bytes]:
    """`total` values of `size` bytes over `keys`, journaled (acked) straight into the stream (values
    over the chunk threshold through the chunk store); returns each key's last value."""
    config = build_config(document)
    ns = config.namespaces[namespace]
    last: dict[str, bytes] = {}
    async with open_journal(config) as journal:
        for start in range(0, total, 16):
            entries = []
            for i in range(start, min(total, start + 16)):
                key = keys[i % len(keys)]
                value = (b"%s=%d;" % (key.encode(), i)).ljust(size, b"v")
                entries.append(Entry(id=f"{namespace}-{i}", ns=namespace, op=Op.PUT, key=key,
                                     partition=partition_of(key, ns.partitions), value=value, write_time=now_us()))
                last[key] = value
            if size > ns.chunk_threshold:
                results = [await journal.append(entry) for entry in entries]
            else:
                results = await journal.writer.publish_many([journal.message_for(e) for e in entries])
            assert all(r.ok for r in results), results
    return last


async def drained_peak(drainer: SidecarProcess, namespace: str, target: tuple[str, int], keys: list[str],
                       last: dict[str, bytes]) -> float:
    """Resume the paused target "up", wait until it holds every key's last value; the drainer's peak RSS."""
    async with httpx.AsyncClient(base_url=drainer.admin) as admin:
        response = await admin.post(f"/v1/drain/{namespace}/up/resume", json={})
        assert response.status_code == 200, response.text
    await converge(lambda: {k for k, v in memcached_values(target, keys).items() if v.encode() != last[k]}
                   | (set(keys) - set(memcached_values(target, keys))), 120, "the resumed target's values")
    return rss_mib(drainer.proc.pid, "VmHWM")  # type: ignore[union-attr]


async def test_drainer_memory_is_bounded_by_bytes_with_a_paused_and_a_down_target(
        services: Services, private_memcached: MemcachedProcess, tmp_path: Path, unique: str) -> None:
    """300 MB of 200 KB values wait for a paused target and a down one; then the paused one drains
    them all. The drainer's peak RSS stays within its baseline + max_held_bytes + a constant, where
    fetching partitions x max_inflight entries would have held the whole backlog (600 MB+)."""
    budget_mib = DrainSettings().max_held_bytes / MIB  # the default, sized for the chart's pod limit
    up = ("127.0.0.1", private_memcached.port)
    down = ("127.0.0.1", free_port())  # nothing listens there
    namespaces = {unique: {"partitions": 8, "retry": FAST_RETRY,
                           "targets": [memcached_target("up", up), memcached_target("down", down)]}}
    document = sidecar_document(services.nats_url, namespaces, log_level="warning",
                                drain=DRAIN)
    drainer = SidecarProcess(document, tmp_path / "drainer", role="drain").start()
    try:
        pid = drainer.proc.pid  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=drainer.admin) as admin:
            response = await admin.post(f"/v1/drain/{unique}/up/pause", json={})
            assert response.status_code == 200, response.text
            await trio.sleep(1.0)  # the drain's tasks settle into their steady state before the baseline
            baseline = rss_mib(pid)
            keys = [f"{unique}-k{i}" for i in range(60)]
            last = await journal_values(document, unique, keys, 1500, 200 * 1024)

            async def states() -> dict[str, tuple[str, int]]:
                rows = (await admin.get("/v1/drain")).json()["targets"]
                return {row["target"]: (row["state"], row["backlog"]) for row in rows}

            # Both targets see the whole backlog, and the down one has opened its breaker.
            deadline = trio.current_time() + 30
            while (seen := await states()) != {"up": ("paused", 1500), "down": ("breaker-open", 1500)}:
                assert trio.current_time() < deadline, seen
                await trio.sleep(0.5)
            await trio.sleep(3.0)  # room for any fetching the drainer would still do
            # Besides the budget: the apply path's copies of what is in flight (encoded commands), the
            # link's read buffer, the allocator. Without the budget this run peaks at 900+ MiB.
            bound = baseline + budget_mib + 64
            held_peak = rss_mib(pid, "VmHWM")
            assert held_peak < bound, f"peak RSS {held_peak:.0f} MiB while paused/down (baseline {baseline:.0f})"

            peak = await drained_peak(drainer, unique, up, keys, last)
            assert peak < bound, f"peak RSS {peak:.0f} MiB draining (baseline {baseline:.0f})"
            print(f"baseline {baseline:.0f} MiB, peak paused/down {held_peak:.0f} MiB, peak draining {peak:.0f} MiB")
    finally:
        drainer.stop()



async def test_drainer_memory_is_bounded_with_chunked_values(services: Services, private_memcached: MemcachedProcess,
                                                             tmp_path: Path, unique: str) -> None:
    """270 MB of 900 KB values (over the chunk threshold: markers on the stream, values in the chunk
    store) drained after a pause: a held marker counts its value's size, and a round reads no more
    chunked values than the budget, so the peak stays as bounded as with inline values."""
    up = ("127.0.0.1", private_memcached.port)
    namespaces = {unique: {"partitions": 4, "retry": FAST_RETRY, "targets": [memcached_target("up", up)]}}
    document = sidecar_document(services.nats_url, namespaces, log_level="warning", drain=DRAIN)
    drainer = SidecarProcess(document, tmp_path / "drainer", role="drain").start()
    try:
        async with httpx.AsyncClient(base_url=drainer.admin) as admin:
            assert (await admin.post(f"/v1/drain/{unique}/up/pause", json={})).status_code == 200
        await trio.sleep(1.0)
        baseline = rss_mib(drainer.proc.pid)  # type: ignore[union-attr]
        keys = [f"{unique}-k{i}" for i in range(40)]
        last = await journal_values(document, unique, keys, 300, 900 * 1024)
        peak = await drained_peak(drainer, unique, up, keys, last)
        budget_mib = DrainSettings().max_held_bytes / MIB
        assert peak < baseline + budget_mib + 64, f"peak RSS {peak:.0f} MiB draining (baseline {baseline:.0f})"
        print(f"chunked: baseline {baseline:.0f} MiB, peak draining {peak:.0f} MiB")
    finally:
        drainer.stop()


async def test_many_partitions_stay_within_the_counted_worst_case(services: Services, tmp_path: Path,
                                                                  unique: str) -> None:
    """64 partitions, 4 x 700 KB values each, a memcached target that accepts connections and never
    answers. Each partition holds at least one largest message twice, whatever its share of
    max_held_bytes (32 MiB: 0.4 MiB each), so the drainer grows by far more than the setting; what
    `walcar config check` counts for the drain (partitions x the floor) is what it stays within."""
    silent = socket.socket()  # the kernel completes connections into its backlog; nobody reads them
    silent.bind(("127.0.0.1", 0))
    silent.listen(256)
    partitions = 64
    target = {**memcached_target("silent", silent.getsockname()), "timeout": "300s", "pool_size": 64}
    namespaces = {unique: {"partitions": partitions, "chunk_threshold": "1MiB", "targets": [target]}}
    document = sidecar_document(services.nats_url, namespaces, log_level="warning", drain=DRAIN, memory_limit="0")
    drain_rows = {what: size for what, size in worst_case(build_config(document), "drain")
                  if what.startswith("sidecar.drain.")}
    bound_mib = sum(drain_rows.values()) / MIB
    keys_of: dict[int, list[str]] = {}
    for i in range(100_000):  # 4 keys in every partition
        key = f"{unique}-k{i}"
        if len(keys_of.setdefault(partition_of(key, partitions), [])) < 4:
            keys_of[partition_of(key, partitions)].append(key)
        if sum(map(len, keys_of.values())) == 4 * partitions:
            break
    keys = [key for group in keys_of.values() for key in group]
    drainer = SidecarProcess(document, tmp_path / "drainer", role="drain").start()
    try:
        pid = drainer.proc.pid  # type: ignore[union-attr]
        await until(lambda: drainer.target_status("silent")["owned_here"] == partitions, 60, "every partition owned")
        baseline = rss_mib(pid)
        await journal_values(document, unique, keys, len(keys), 700 * 1024)

        async def holding() -> int:
            """Partitions whose consumer has delivered something the drainer has not acked."""
            listed = await js_api(services.nats_url, f"CONSUMER.LIST.{stream_name(unique)}")
            return sum(1 for info in listed["consumers"] if info["num_ack_pending"] > 0)

        deadline = trio.current_time() + 60
        while (held := await holding()) < partitions:  # every partition fetched what its budget lets it
            assert trio.current_time() < deadline, f"{held} of {partitions} partitions hold entries"
            await trio.sleep(0.5)
        peak = rss_mib(pid, "VmHWM")
        print(f"64 partitions: baseline {baseline:.0f} MiB, peak {peak:.0f} MiB, counted {bound_mib:.0f} MiB "
              f"(max_held_bytes {DrainSettings().max_held_bytes / MIB:.0f} MiB)")
        # Without the floor in the count the drain was budgeted 48 MiB, and it grows by ~95 MiB here.
        assert peak - baseline < bound_mib, (peak, baseline, drain_rows)
        assert peak - baseline > DrainSettings().max_held_bytes * 3 / 2 / MIB, "the floor was not reached"
    finally:
        drainer.stop()
        silent.close()


@pytest.fixture
def small_payload_nats(tmp_path: Path, services: Services) -> Iterator[NatsProcess]:
    """A nats-server of the test's own whose max_payload is 192 KiB: values under the chunk threshold
    (256 KiB) are then over what one message may carry."""
    conf = tmp_path / "nats.conf"
    conf.write_text(f"max_payload: {SMALL_MAX_PAYLOAD}\n")
    server = NatsProcess(tmp_path / "nats", extra_args=["-c", str(conf)])
    server.start()
    yield server
    server.stop()


async def test_writes_over_max_payload_go_to_the_chunk_store_and_never_break_the_connection(
        small_payload_nats: NatsProcess, unique: str) -> None:
    """Single writes, atomic mutations and replicated batches with values over the server's
    max_payload (but under the chunk threshold) are stored through the chunk store; a small writer
    running meanwhile sees every one of its writes durable. Sent as they were, each would have made
    nats-server close walcar's connection, and every write in flight would have become `unknown`."""
    token = Path(tempfile.mkdtemp()) / "region.token"  # the cross-region endpoint is off without one
    token.write_text("region-token\n")
    config = build_config(sidecar_document(small_payload_nats.url, {unique: {"partitions": 4}}, [kv_listener()],
                                           region_token_file=str(token)))
    big = "b" * (200 * 1024)
    async with running_sidecar(config) as sidecar:
        writer = sidecar.ingress.journal.writer
        assert writer.max_payload == SMALL_MAX_PAYLOAD
        small_acks: list[str] = []
        done = trio.Event()

        async def small_writer() -> None:
            async with httpx.AsyncClient(base_url=base_url(config)) as client:
                i = 0
                while not done.is_set():
                    body = (await client.post(f"/v1/log/{unique}", json={"key": f"s{i % 50}", "text": str(i)})).json()
                    small_acks.append(body["durable"])
                    i += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(small_writer)
            async with httpx.AsyncClient(base_url=base_url(config), timeout=30) as client:
                for round_ in range(3):
                    single = await client.post(f"/v1/log/{unique}", json={"key": f"one{round_}", "text": big})
                    assert single.json()["durable"] == "true", single.json()
                    items = [{"key": f"i{n}", "text": big} for n in range(2)]
                    mutation = await client.put(f"/v1/kv/{unique}/rec{round_}", json={"items": items})
                    assert mutation.json()["durable"] == "true", mutation.json()
                    entries = [Entry(id=f"{unique}-r{round_}-{n}", ns=unique, op=Op.PUT, key=f"rep{n}",
                                     partition=0, value=big.encode(), write_time=now_us(), origin="elsewhere")
                               for n in range(2)]
                    replicated = await client.post(f"/v1/log/{unique}/batch", content=msgspec.msgpack.encode(
                        {"entries": entries}), headers={"content-type": "application/msgpack",
                                                       "authorization": "Bearer region-token"})
                    assert replicated.status_code == 200, replicated.content[:300]
                    results = msgspec.msgpack.decode(replicated.content)["results"]
                    assert all(r["durable"] == "true" for r in results), results
            # A message no path would send, offered to the writer itself: refused, not sent.
            refused = await writer.publish(f"wal.{unique}.0", b"x" * SMALL_MAX_PAYLOAD, {"Nats-Msg-Id": "over"})
            assert refused.durable == "false" and "max_payload" in refused.message, refused
            done.set()
        assert small_acks and set(small_acks) == {"true"}, collections.Counter(small_acks)
        assert writer.stats.unknown == 0
        assert sidecar.state.conn is not None and sidecar.state.conn.link is not None
        assert sidecar.state.conn.link.connected

    stored = await read_stream(small_payload_nats.url, stream_name(unique))
    chunked = [m.entry() for m in stored if m.entry().chunk is not None]
    assert len(chunked) == 3 * 4  # per round: the single write, the mutation (one MULTI marker), 2 replicated


async def test_a_batch_with_some_stored_ids_is_no_duplicate(services: Services, unique: str) -> None:
    """PUT token T with items [a], then T with [a, b]: b is new, so the answer is 409 and not durable
    (JetStream's 10201 only says *some* id is stored). A batch whose every id is stored is a retry."""
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 4}}, [kv_listener()]))
    async with running_sidecar(config), httpx.AsyncClient(base_url=base_url(config)) as client:
        first = await client.put(f"/v1/kv/{unique}/r1", json={"items": [{"key": "a", "text": "1"}],
                                                              "idempotency_token": "T"})
        assert first.status_code == 200 and first.json()["durable"] == "true", first.json()
        partial = await client.put(f"/v1/kv/{unique}/r1", json={"items": [{"key": "a", "text": "1"},
                                                                          {"key": "b", "text": "2"}],
                                                                "idempotency_token": "T"})
        assert partial.status_code == 409, partial.json()
        assert partial.json()["durable"] == "false" and not partial.json()["duplicate"], partial.json()
        assert "T:0" in partial.json()["message"], partial.json()

        both = {"items": [{"key": "a", "text": "1"}, {"key": "b", "text": "2"}], "idempotency_token": "U"}
        stored = await client.put(f"/v1/kv/{unique}/r1", json=both)
        assert stored.json()["durable"] == "true" and not stored.json()["duplicate"], stored.json()
        retried = await client.put(f"/v1/kv/{unique}/r1", json=both)
        assert retried.status_code == 200, retried.json()
        assert retried.json()["durable"] == "true" and retried.json()["duplicate"], retried.json()

    journaled = [(m.entry().id, m.entry().item) for m in await read_stream(services.nats_url, stream_name(unique))]
    assert journaled == [("T:0", "a"), ("U:0", "a"), ("U:1", "b")]  # nothing of the 409, no probe


async def test_nothing_acked_expires_unseen(services: Services, private_memcached: MemcachedProcess,
                                            tmp_path: Path, unique: str) -> None:
    """replay_window 20s, the memcached target stopped, 200 writes acked, walcar restarted 35 s later:
    every write is in the target or in the DLQ (reason `expiring before applied`), none vanished;
    meanwhile the status said `at-risk` and the metric showed it."""
    target = ("127.0.0.1", private_memcached.port)
    namespaces = {unique: {"partitions": 4, "replay_window": "20s", "duplicate_window": "5s", "retry": FAST_RETRY,
                           "targets": [memcached_target("cache", target)]}}
    walcar = SidecarProcess(sidecar_document(services.nats_url, namespaces, [kv_listener()], drain=DRAIN),
                            tmp_path / "walcar").start()
    keys = [f"{unique}-k{i}" for i in range(200)]
    try:
        private_memcached.stop()
        bind = walcar.document["listeners"][0]["bind"]
        async with httpx.AsyncClient(base_url=f"http://{bind}") as client:
            for key in keys:
                body = (await client.post(f"/v1/log/{unique}", json={"key": key, "text": f"v-{key}"})).json()
                assert body["durable"] == "true", body
        acked_at = trio.current_time()
        states: set[str] = set()
        at_risk_metric = False
        async with httpx.AsyncClient(base_url=walcar.admin) as admin:
            while trio.current_time() - acked_at < 35:
                states.add(walcar.target_status("cache")["state"])
                metrics = (await admin.get("/metrics")).text
                at_risk_metric |= f'walcar_drain_at_risk{{namespace="{unique}",target="cache"}} 1.0' in metrics
                await trio.sleep(0.5)
        assert "at-risk" in states, states
        assert at_risk_metric
        walcar.stop()
        private_memcached.start()
        walcar.start()

        async def accounted() -> set[str]:
            dead = await read_stream(services.nats_url, dlq_stream_name(unique))
            expiring = {m.headers["Walcar-Key"] for m in dead if "expiring before applied" in m.headers["Walcar-Error"]}
            return set(keys) - expiring - set(memcached_values(target, keys))

        deadline = trio.current_time() + 30
        while missing := await accounted():
            assert trio.current_time() < deadline, f"{len(missing)} of 200 acked writes vanished: {sorted(missing)[:5]}"
            await trio.sleep(0.5)
        assert "expiring before applied" in walcar.log()
    finally:
        walcar.stop()


async def test_a_cql_batch_over_max_payload_is_stored_and_applied(services: Services, cassandra_session,
                                                                  keyspace: str, unique: str) -> None:
    """A CQL BATCH over 2 partitions with 1.5 MB each (one message would be over NATS's 1 MiB
    max_payload) is acked durable through the chunk store, and lands in Cassandra; the connection to
    NATS is never lost."""
    cassandra_session.execute(f"CREATE TABLE {keyspace}.blobs (k int PRIMARY KEY, v blob)")
    listener = {"protocol": "cql", "bind": f"127.0.0.1:{free_port()}", "namespace": unique}
    config = build_config(sidecar_document(
        services.nats_url, {unique: {"partitions": 4, "targets": [
            cassandra_target("db", services.cassandra[1], keyspace)]}}, [listener], drain=DRAIN))
    values = {1: b"a" * 1_500_000, 2: b"b" * 1_500_000}
    async with running_sidecar(config) as sidecar:
        def batch() -> str:
            cluster = driver_cluster(int(listener["bind"].rsplit(":", 1)[1]))
            try:
                session = cluster.connect(keyspace)
                insert = session.prepare("INSERT INTO blobs (k, v) VALUES (?, ?)")
                statement = DriverBatch(batch_type=BatchType.LOGGED)
                for k, v in values.items():
                    statement.add(insert, (k, v))
                future = session.execute_async(statement)
                future.result()
                return future.custom_payload["walcar-durable"].decode()
            finally:
                cluster.shutdown()

        assert await trio.to_thread.run_sync(batch) == "true"
        assert sidecar.ingress.journal.writer.stats.unknown == 0
        assert sidecar.state.conn.link.connected

        def missing() -> list[int]:
            rows = cassandra_session.execute(f"SELECT k, v FROM {keyspace}.blobs")
            found = {row.k: row.v for row in rows}
            return [k for k, v in values.items() if found.get(k) != v]

        await converge(missing, 60, "the batch's rows in Cassandra")


async def test_a_reused_token_never_overwrites_a_stored_chunked_value(services: Services, unique: str) -> None:
    """A chunked value stored under token T; T again with another value answers 409 (not stored) and
    leaves the stored marker's object intact (it used to be overwritten, and the drain then found it
    corrupt); T again with the first value is a duplicate."""
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 4}}, [kv_listener()]))
    first, second = "x" * (300 * 1024), "y" * (300 * 1024)
    async with running_sidecar(config) as sidecar, httpx.AsyncClient(base_url=base_url(config)) as client:
        for text, status, durable, duplicate in ((first, 200, "true", False), (second, 409, "false", False),
                                                 (first, 200, "true", True)):
            response = await client.post(f"/v1/log/{unique}", json={"key": "k", "text": text,
                                                                     "idempotency_token": "T"})
            body = response.json()
            assert response.status_code == status and body["durable"] == durable, body
            assert body["duplicate"] is duplicate, body
        [marker] = [m.entry() for m in await read_stream(services.nats_url, stream_name(unique))]
        assert marker.chunk is not None
        assert await sidecar.ingress.journal.chunks.get(unique, marker.chunk) == first.encode()  # digest checked
