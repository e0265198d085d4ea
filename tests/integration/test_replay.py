"""Point-in-time replay and verify against real NATS, Cassandra and memcached, through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import tomli_w
import trio
from pymemcache.client.base import Client as MemcacheClient

from sidecar.config import stream_name
from sidecar.envelope import Entry, Op
from sidecar.ingress import Ingress
from sidecar.replay.filters import format_time
from sidecar.replay.job import start_replay
from sidecar.replay.request import ReplayRequest
from tests.integration.test_drain import cassandra_target, memcached_target
from tests.support.procs import MemcachedProcess
from tests.support.services import Services
from tests.support.sidecar import build_config, running_sidecar, sidecar_document
from tests.support.streams import read_stream, stream_state
from tests.support.waiting import converge

ROOT = Path(__file__).resolve().parents[2]
PASSWORD_FILE = ROOT / "examples" / "cassandra.password"
DRAIN = {"lease_ttl": "2s", "ack_wait": "10s"}
FAST_RETRY = {"initial_delay": "20ms", "max_delay": "500ms", "multiplier": 2.0, "max_attempts": 50}
# `walcar replay|verify`; the same parser and commands `walcar` registers (sidecar/replay/cli.py).
WALCAR = [sys.executable, "-m", "sidecar.cli"]


# --- helpers ----------------------------------------------------------------------------------


def write_config(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "walcar.toml"
    path.write_text(tomli_w.dumps(document))
    return path


async def walcar(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: subprocess.run(
        [*WALCAR, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}))


def cassandra_args(services: Services, keyspace: str, table: str) -> list[str]:
    return ["--to-cassandra", f"127.0.0.1:{services.cassandra[1]}", "--keyspace", keyspace, "--table", table,
            "--username", "cassandra", "--password-file", str(PASSWORD_FILE), "--consistency", "ONE"]


def now_text() -> str:
    return format_time(time.time_ns())


async def write_all(ingress: Ingress, entries: list[Entry], workers: int = 32) -> None:
    """Journal entries through the sidecar's ingress, each acked durable; one key's entries stay in order."""
    lanes: dict[int, list[Entry]] = {}
    for entry in entries:
        lanes.setdefault(hash(entry.key) % workers, []).append(entry)

    async def lane(items: list[Entry]) -> None:
        for entry in items:
            ack = await ingress.write(entry)
            assert ack.ok, ack

    async with trio.open_nursery() as nursery:
        for items in lanes.values():
            nursery.start_soon(lane, items)


def put(ingress: Ingress, ns: str, key: str, value: str, item: str = "") -> Entry:
    return ingress.entry(ns, Op.PUT, key, item=item, value=value.encode())


def table_state(session, keyspace: str, table: str) -> dict[tuple[str, str], tuple[bytes, int]]:
    rows = session.execute(f"SELECT id, key, value, WRITETIME(value) AS wt FROM {keyspace}.{table}")
    return {(row.id, row.key): (row.value, row.wt) for row in rows}


def create_kv_table(session, keyspace: str, table: str) -> None:
    session.execute(f"CREATE TABLE IF NOT EXISTS {keyspace}.{table} (id text, key text, value blob, "
                    "PRIMARY KEY (id, key))")


def memcached_dump(address: tuple[str, int], keys: list[str]) -> dict[str, bytes]:
    client = MemcacheClient(address)
    try:
        found: dict[str, bytes] = {}
        for start in range(0, len(keys), 200):
            found.update(client.get_many(keys[start : start + 200]))
        return found
    finally:
        client.close()


def memcached_items(address: tuple[str, int]) -> int:
    client = MemcacheClient(address)
    try:
        return int(client.stats()[b"curr_items"])
    finally:
        client.close()


def last_values(entries: list[Entry]) -> dict[str, bytes | None]:
    """Each key's value after the entries in order (None: deleted)."""
    state: dict[str, bytes | None] = {}
    for entry in entries:
        state[entry.key] = entry.value if entry.op is Op.PUT else None
    return state


# --- tests ------------------------------------------------------------------------------------


async def test_dry_run_counts_by_op_prefix_and_names_the_exclusions(services: Services, tmp_path: Path,
                                                                   unique: str) -> None:
    document = sidecar_document(services.nats_url, {unique: {"partitions": 4, "targets": [
        memcached_target("cache", services.memcached)]}}, drain=DRAIN)
    config = build_config(document)
    path = write_config(tmp_path, document)
    async with running_sidecar(config, role="ingress") as sidecar:
        ingress = sidecar.ingress
        began = now_text()
        users = [put(ingress, unique, f"user:{i}", f"u{i}") for i in range(300)]
        orders = [put(ingress, unique, f"order-{i}", f"o{i}") for i in range(200)]
        deletes = [ingress.entry(unique, Op.DELETE, f"user:{i}") for i in range(0, 300, 3)]  # 100
        await write_all(ingress, users + orders)
        await write_all(ingress, deletes)
    result = await walcar("replay", "--config", str(path), "--namespace", unique, "--target", "cache",
                          "--from", began, "--dry-run", "--json", "--exclude-key", "order-1*",
                          "--exclude-op", "delete")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    progress = summary["progress"]
    # order-1, order-10..19, order-100..199: 111 keys
    assert summary["excluded_by"] == {"--exclude-key order-1*": 111, "--exclude-op delete": 100}
    assert summary["by_op"] == {"put": 300 + 200 - 111}
    assert summary["by_prefix"] == {"user:": 300, "order-": 89}
    assert (progress["seen"], progress["excluded"], progress["applied"], progress["dry_run"]) == (600, 211, 0, True)
    assert summary["first_time"] >= began and summary["last_time"] >= summary["first_time"]
    assert summary["checkpoint"] == ""
    assert any(example.startswith("seq ") and "delete user:" in example
               for example in summary["excluded_examples"]["--exclude-op delete"])
    # The table a human reads says the same.
    table = await walcar("replay", "--config", str(path), "--namespace", unique, "--target", "cache", "--from",
                         began, "--dry-run", "--exclude-key", "order-1*", "--exclude-op", "delete")
    assert table.returncode == 0, table.stderr
    assert "dry run of a replay" in table.stdout and "would apply" in table.stdout
    assert "111  --exclude-key order-1*" in table.stdout and "put 389" in table.stdout
    assert "replay [" in table.stderr  # the progress, as plain lines when stderr is not a terminal


async def test_cache_warm_up_holds_exactly_the_last_value_of_every_key_in_the_window(
        services: Services, private_memcached: MemcachedProcess, tmp_path: Path, unique: str) -> None:
    document = sidecar_document(services.nats_url, {unique: {"partitions": 8, "targets": [
        memcached_target("cache", services.memcached)]}}, drain=DRAIN)
    config = build_config(document)
    path = write_config(tmp_path, document)
    before = [f"{unique}-old{i}" for i in range(200)]  # written only before the window
    warm = [f"{unique}-hot{i}" for i in range(1000)]
    async with running_sidecar(config, role="ingress") as sidecar:
        ingress = sidecar.ingress
        await write_all(ingress, [put(ingress, unique, key, "old") for key in before + warm])
        await trio.sleep(0.05)
        window_start = now_text()
        in_window: list[Entry] = []
        for round_ in range(5):
            batch = [put(ingress, unique, key, f"{key}@{round_}") for key in warm[round_ * 100:]]
            in_window += batch
            await write_all(ingress, batch)
        deletes = [ingress.entry(unique, Op.DELETE, key) for key in warm[:50]]
        in_window += deletes
        await write_all(ingress, deletes)
        await trio.sleep(0.05)
        window_end = now_text()
        await trio.sleep(0.05)
        await write_all(ingress, [put(ingress, unique, key, "after the window") for key in warm])
    expected = {key: value for key, value in last_values(in_window).items() if value is not None}
    address = ("127.0.0.1", private_memcached.port)
    result = await walcar("replay", "--config", str(path), "--namespace", unique,
                          "--to-memcached", f"127.0.0.1:{private_memcached.port}", "--last-value-only",
                          "--from", window_start, "--to", window_end, "--json",
                          "--checkpoint", str(tmp_path / "warm.json"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["progress"]["applied"] == len(warm)  # one write per key: its last in the window
    assert summary["progress"]["superseded"] == len(in_window) - len(warm)
    held = await trio.to_thread.run_sync(memcached_dump, address, before + warm)
    assert held == expected
    assert await trio.to_thread.run_sync(memcached_items, address) == len(expected)  # and nothing else


async def test_start_replay_runs_the_same_job_for_the_admin_endpoint(services: Services,
                                                                      private_memcached: MemcachedProcess,
                                                                      unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 2, "targets": [
        memcached_target("cache", services.memcached)]}}, drain=DRAIN))
    keys = [f"{unique}-a{i}" for i in range(300)]
    async with running_sidecar(config, role="ingress") as sidecar:
        ingress = sidecar.ingress
        entries = [put(ingress, unique, key, f"v{i}") for i, key in enumerate(keys)]
        await write_all(ingress, entries)
        request = ReplayRequest(namespace=unique, target_config=memcached_target_struct(private_memcached.port),
                                rate=1000)
        async with trio.open_nursery() as nursery:
            job = await start_replay(config, ingress.journal, request, nursery)
            assert job.progress.to_seq == len(keys)
            await trio.sleep(0.1)
            assert job.progress.state == "applying" and 0 < job.progress.applied < len(keys)  # throttled
            summary = await job.wait()
        assert summary.progress.state == "done" and summary.progress.applied == len(keys)
        assert 0.2 < summary.elapsed_s < 5  # 300 entries at 1000/s
    held = await trio.to_thread.run_sync(memcached_dump, ("127.0.0.1", private_memcached.port), keys)
    assert held == {entry.key: entry.value for entry in entries}


def memcached_target_struct(port: int):
    from sidecar.config import MemcachedTarget

    return MemcachedTarget(name="replay", servers=[f"127.0.0.1:{port}"])


async def test_corruption_drill_restore_then_replay_without_the_bad_deploy(services: Services, cassandra_session,
                                                                          keyspace: str, tmp_path: Path,
                                                                          unique: str) -> None:
    """10k rows; snapshot; more good writes; a bad deploy garbles 500 rows; the table is truncated; the snapshot
    is restored into a fresh table; replay since the snapshot, minus the bad window: every row is good again,
    with its original WRITETIME."""
    document = sidecar_document(services.nats_url, {unique: {"partitions": 8, "retry": FAST_RETRY, "targets": [
        cassandra_target("db", services.cassandra[1], keyspace)]}}, drain=DRAIN)
    config = build_config(document)
    path = write_config(tmp_path, document)
    rows = [f"row{i}" for i in range(10_000)]
    async with running_sidecar(config) as sidecar:
        ingress = sidecar.ingress
        await write_all(ingress, [put(ingress, unique, key, f"good-0-{key}") for key in rows])
        await converge(lambda: len(table_state(cassandra_session, keyspace, unique)) != len(rows) or None,
                             90, "the first 10k rows")
        snapshot_time = now_text()
        snapshot = await trio.to_thread.run_sync(table_state, cassandra_session, keyspace, unique)
        await trio.sleep(0.05)
        # The app goes on: updates and new rows after the snapshot.
        await write_all(ingress, [put(ingress, unique, key, f"good-1-{key}") for key in rows[:2000]]
                        + [put(ingress, unique, f"new{i}", f"good-1-new{i}") for i in range(500)])
        await trio.sleep(0.05)
        bad_start = now_text()
        garbled = rows[1750:2250]  # half of them were updated after the snapshot, half were not
        await write_all(ingress, [put(ingress, unique, key, "\x00garbage\x00") for key in garbled])
        bad_end = now_text()
        await trio.sleep(0.05)
        # Good writes after the bad deploy was rolled back, some to rows it garbled.
        await write_all(ingress, [put(ingress, unique, key, f"good-2-{key}") for key in rows[1900:2100]])
        final = await read_stream(services.nats_url, stream_name(unique))
        expected_count = len(rows) + 500
        await converge(lambda: len(table_state(cassandra_session, keyspace, unique)) != expected_count or None,
                             60, "the drain")
    # Data loss: the table is truncated; a snapshot from before the bad window is restored into a fresh table.
    cassandra_session.execute(f"TRUNCATE {keyspace}.{unique}")
    fresh = "restored"
    create_kv_table(cassandra_session, keyspace, fresh)
    insert = cassandra_session.prepare(f"INSERT INTO {keyspace}.{fresh} (id, key, value) VALUES (?, ?, ?) "
                                       "USING TIMESTAMP ?")
    for (record, item), (value, write_time) in snapshot.items():
        cassandra_session.execute_async(insert, (record, item, value, write_time))
    await converge(lambda: len(table_state(cassandra_session, keyspace, fresh)) != len(snapshot) or None,
                         30, "the restore")

    result = await walcar("replay", "--config", str(path), "--namespace", unique, "--from", snapshot_time,
                          "--exclude-window", f"{bad_start}..{bad_end}", *cassandra_args(services, keyspace, fresh),
                          "--checkpoint", str(tmp_path / "drill.json"), timeout=150)
    assert result.returncode == 0, result.stderr
    assert "excluded" in result.stdout and f"--exclude-window {bad_start}..{bad_end}" in result.stdout

    expected: dict[tuple[str, str], tuple[bytes, int]] = {}
    for message in final:  # the journal, minus the bad deploy: each row's last good write
        entry = message.entry()
        if b"garbage" not in entry.value:
            expected[(entry.key, "")] = (entry.value, entry.write_time)
    restored = await trio.to_thread.run_sync(table_state, cassandra_session, keyspace, fresh)
    assert len(restored) == expected_count
    wrong = {key: (restored.get(key), want) for key, want in expected.items() if restored.get(key) != want}
    assert not wrong, f"{len(wrong)} rows differ, e.g. {list(wrong.items())[:3]}"
    assert all(not value.startswith(b"\x00garbage") for value, _ in restored.values())
    # Garbled rows come back as their last good write: from the replay, or from the snapshot, WRITETIME included.
    assert restored[(rows[1800], "")][0] == f"good-1-{rows[1800]}".encode()
    assert restored[(rows[2050], "")][0] == f"good-2-{rows[2050]}".encode()
    assert restored[(rows[2200], "")] == snapshot[(rows[2200], "")]
    assert snapshot[(rows[2200], "")][0] == f"good-0-{rows[2200]}".encode()


def kv_history(ingress: Ingress, ns: str, records: int) -> list[Entry]:
    """Items put, rewritten, deleted one by one and with their whole record, then put again."""
    entries: list[Entry] = []
    names = [f"r{i}" for i in range(records)]
    for round_ in range(3):
        entries += [put(ingress, ns, name, f"{name}.{item}.{round_}", item) for name in names for item in "abc"]
    entries += [ingress.entry(ns, Op.DELETE, name, item="b") for name in names[::2]]
    entries += [ingress.entry(ns, Op.DELETE, name) for name in names[::5]]
    entries += [put(ingress, ns, name, f"{name}.a.again", "a") for name in names[::10]]
    return entries


def expected_table(entries: list[Entry]) -> dict[tuple[str, str], tuple[bytes, int]]:
    """What Cassandra holds after the entries: last write wins per cell, a record delete removes its items."""
    cells: dict[tuple[str, str], tuple[bytes, int]] = {}
    for entry in entries:
        if entry.op is Op.PUT:
            cells[(entry.key, entry.item)] = (entry.value, entry.write_time)
        elif entry.item:
            cells.pop((entry.key, entry.item), None)
        else:
            cells = {cell: value for cell, value in cells.items() if cell[0] != entry.key}
    return cells


async def test_replaying_twice_changes_nothing(services: Services, cassandra_session, keyspace: str,
                                               tmp_path: Path, unique: str) -> None:
    """Including what is not on the stream itself: chunked payloads and a mutation over the atomic-batch limit."""
    document = sidecar_document(services.nats_url, {unique: {"partitions": 4, "chunk_threshold": "1KiB", "targets": [
        cassandra_target("db", services.cassandra[1], keyspace)]}}, drain=DRAIN)
    path = write_config(tmp_path, document)
    async with running_sidecar(build_config(document), role="ingress") as sidecar:
        ingress = sidecar.ingress
        entries = kv_history(ingress, unique, 300)
        await write_all(ingress, entries)
        big = [put(ingress, unique, f"big{i}", f"{i}" * 5000) for i in range(3)]
        await write_all(ingress, big)
        mutation = [put(ingress, unique, f"m{i}", f"part {i}", "x") for i in range(1200)]
        ack = await ingress.write_mutation(mutation)
        assert ack.ok, ack
        entries += big + mutation
    journal = [message.entry() for message in await read_stream(services.nats_url, stream_name(unique))]
    assert sum(entry.op is Op.MULTI for entry in journal) == 1
    assert sum(entry.chunk is not None for entry in journal) == 4  # the 3 big values and the mutation
    args = ["replay", "--config", str(path), "--namespace", unique, *cassandra_args(services, keyspace, "copy"),
            "--checkpoint", str(tmp_path / "twice.json")]
    first = await walcar(*args)
    assert first.returncode == 0, first.stderr
    state = await trio.to_thread.run_sync(table_state, cassandra_session, keyspace, "copy")
    assert state == expected_table(entries)
    second = await walcar(*args, "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["progress"]["applied"] == len(entries)  # a MULTI counts its entries
    assert await trio.to_thread.run_sync(table_state, cassandra_session, keyspace, "copy") == state


async def test_interrupted_replay_resumes_to_the_same_state(services: Services, cassandra_session, keyspace: str,
                                                            tmp_path: Path, unique: str) -> None:
    document = sidecar_document(services.nats_url, {unique: {"partitions": 4, "targets": [
        cassandra_target("db", services.cassandra[1], keyspace)]}}, drain=DRAIN)
    path = write_config(tmp_path, document)
    async with running_sidecar(build_config(document), role="ingress") as sidecar:
        entries = kv_history(sidecar.ingress, unique, 300)
        await write_all(sidecar.ingress, entries)
    whole = await walcar("replay", "--config", str(path), "--namespace", unique,
                         *cassandra_args(services, keyspace, "whole"), "--checkpoint", str(tmp_path / "whole.json"))
    assert whole.returncode == 0, whole.stderr

    checkpoint = tmp_path / "parts.json"
    args = [*WALCAR, "replay", "--config", str(path), "--namespace", unique,
            *cassandra_args(services, keyspace, "parts"), "--rate", "1500", "--batch", "100",
            "--checkpoint", str(checkpoint)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not checkpoint.exists() or json.loads(checkpoint.read_text())["applied_through"] == 0:
        assert time.monotonic() < deadline and proc.poll() is None, "the replay never got going"
        await trio.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C, part-way
    out, err = await trio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == 130, err
    assert ": stopped in" in out
    assert "continue with" in err and "--resume" in err and "Traceback" not in err
    saved = json.loads(checkpoint.read_text())
    assert 0 < saved["applied_through"] < saved["to_seq"] and not saved["complete"]
    partial = await trio.to_thread.run_sync(table_state, cassandra_session, keyspace, "parts")
    assert partial and partial != expected_table(entries)  # stopped part-way

    resumed = await walcar("replay", "--config", str(path), "--resume", "--checkpoint", str(checkpoint), "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["progress"]["from_seq"] == saved["from_seq"]
    assert summary["progress"]["seen"] == len(entries) - saved["applied_through"]  # it continued, not restarted
    assert json.loads(checkpoint.read_text())["complete"] is True
    assert await trio.to_thread.run_sync(table_state, cassandra_session, keyspace, "parts") == \
        await trio.to_thread.run_sync(table_state, cassandra_session, keyspace, "whole")


async def test_from_older_than_retention_is_a_clear_error(services: Services, tmp_path: Path, unique: str) -> None:
    document = sidecar_document(services.nats_url, {unique: {"partitions": 2, "replay_window": "3s",
                                                             "duplicate_window": "1s", "targets": [
        memcached_target("cache", services.memcached)]}}, drain=DRAIN)
    path = write_config(tmp_path, document)
    async with running_sidecar(build_config(document), role="ingress") as sidecar:
        ingress = sidecar.ingress
        before = now_text()
        await write_all(ingress, [put(ingress, unique, f"{unique}-{i}", "v") for i in range(20)])
        deadline = time.monotonic() + 30
        while (await stream_state(services.nats_url, stream_name(unique)))["first_seq"] <= 1:
            assert time.monotonic() < deadline, "the first entries never aged out"
            await trio.sleep(0.5)
        await write_all(ingress, [put(ingress, unique, f"{unique}-late{i}", "v") for i in range(5)])
        state = await stream_state(services.nats_url, stream_name(unique))
    result = await walcar("replay", "--config", str(path), "--namespace", unique, "--target", "cache",
                          "--from", before, "--dry-run")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"--from {before} is before the oldest entry its journal still holds" in result.stderr
    assert f"seq {state['first_seq']}" in result.stderr and "the replay window is 3s" in result.stderr
    by_seq = await walcar("replay", "--config", str(path), "--namespace", unique, "--target", "cache",
                          "--from", "seq:1", "--dry-run")
    assert by_seq.returncode == 2 and "replay window is 3s" in by_seq.stderr


async def test_verify_finds_changes_behind_the_journals_back_and_repair_fixes_them(
        services: Services, cassandra_session, keyspace: str, tmp_path: Path, unique: str) -> None:
    document = sidecar_document(services.nats_url, {unique: {"partitions": 4, "retry": FAST_RETRY, "targets": [
        memcached_target("cache", services.memcached), cassandra_target("db", services.cassandra[1], keyspace)]}},
        drain=DRAIN)
    path = write_config(tmp_path, document)
    keys = [f"{unique}-k{i}" for i in range(400)]
    async with running_sidecar(build_config(document)) as sidecar:
        ingress = sidecar.ingress
        began = now_text()
        await write_all(ingress, [put(ingress, unique, key, f"v1-{key}") for key in keys])
        await write_all(ingress, [ingress.entry(unique, Op.DELETE, key) for key in keys[-50:]])
        live = keys[:-50]
        await converge(lambda: set(live) ^ set(memcached_dump(services.memcached, keys)), 60, "memcached")
        await converge(lambda: len(table_state(cassandra_session, keyspace, unique)) != len(live) or None,
                             60, "cassandra")
    # Behind the journal's back: the cache and the table are changed directly.
    cache = MemcacheClient(services.memcached)
    cache.set(keys[0], b"stale", noreply=False)
    cache.set(keys[1], b"stale", noreply=False)
    cache.delete(keys[2], noreply=False)
    cache.set(keys[-1], b"zombie", noreply=False)  # deleted in the journal
    cache.close()
    table = f"{keyspace}.{unique}"
    cassandra_session.execute(f"UPDATE {table} SET value = 0x6261 WHERE id = %s AND key = ''", (keys[3],))
    cassandra_session.execute(f"DELETE FROM {table} WHERE id = %s", (keys[4],))
    cassandra_session.execute(f"INSERT INTO {table} (id, key, value) VALUES (%s, '', 0x7a)", (keys[-2],))

    expectations = {
        "cache": {(keys[0], "different"), (keys[1], "different"), (keys[2], "missing"), (keys[-1], "unexpected")},
        "db": {(keys[3], "different"), (keys[4], "missing"), (keys[-2], "unexpected")},
    }
    for target, wanted in expectations.items():
        base = ["verify", "--config", str(path), "--namespace", unique, "--target", target, "--from", began, "--json"]
        found = await walcar(*base)
        assert found.returncode == 1, found.stderr
        report = json.loads(found.stdout)
        assert report["items_checked"] == len(keys)
        assert {(d["key"], d["problem"]) for d in report["differences"]} == wanted
        if target == "db":
            changed = next(d for d in report["differences"] if d["key"] == keys[3])
            assert "behind the journal's back" in changed["note"] and changed["target_write_time"]
        repaired = await walcar(*base, "--repair")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert json.loads(repaired.stdout)["repaired"] == len(wanted)
        again = await walcar(*base)
        assert again.returncode == 0 and json.loads(again.stdout)["differences"] == [], again.stdout
    assert memcached_dump(services.memcached, keys[:3]) == {key: f"v1-{key}".encode() for key in keys[:3]}
    rows = table_state(cassandra_session, keyspace, unique)
    assert rows[(keys[3], "")][0] == f"v1-{keys[3]}".encode() and (keys[-2], "") not in rows
    sample = await walcar("verify", "--config", str(path), "--namespace", unique, "--target", "db", "--from", began,
                          "--sample", "25")
    assert sample.returncode == 0 and "records checked    25 (a sample of 400)" in sample.stdout, sample.stdout


async def test_a_target_that_is_down_is_waited_for_never_skipped(services: Services,
                                                                 private_memcached: MemcachedProcess,
                                                                 unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 2, "retry": FAST_RETRY,
                                                                        "targets": [memcached_target(
                                                                            "cache", services.memcached)]}},
                                           drain=DRAIN))
    keys = [f"{unique}-d{i}" for i in range(200)]
    async with running_sidecar(config, role="ingress") as sidecar:
        ingress = sidecar.ingress
        entries = [put(ingress, unique, key, f"v{i}") for i, key in enumerate(keys)]
        await write_all(ingress, entries)
        await trio.to_thread.run_sync(private_memcached.stop)
        request = ReplayRequest(namespace=unique, target_config=memcached_target_struct(private_memcached.port))
        async with trio.open_nursery() as nursery:
            job = await start_replay(config, ingress.journal, request, nursery)
            deadline = time.monotonic() + 20
            while job.progress.state != "waiting":
                assert time.monotonic() < deadline, job.progress
                await trio.sleep(0.05)
            assert "target unavailable" in job.progress.message and job.progress.applied == 0
            await trio.sleep(1.0)
            assert job.progress.state == "waiting" and not job.finished
            await trio.to_thread.run_sync(private_memcached.start)
            summary = await job.wait()
    assert summary.progress.state == "done" and summary.progress.applied == len(keys)
    assert summary.progress.failed == 0 and summary.progress.message == ""
    held = await trio.to_thread.run_sync(memcached_dump, ("127.0.0.1", private_memcached.port), keys)
    assert held == {entry.key: entry.value for entry in entries}
