"""The control plane against real NATS and memcached: `walcar ns` writes, running sidecars follow.

Namespaces applied to the bucket reach running sidecars without a restart: a new
namespace serves writes on two sidecars, a target added live drains from its
`start`, a retry policy change takes effect in place, unsafe changes are refused at
apply, an invalid hand-written document changes nothing, and SIGHUP re-reads the file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import tomli_w
from pymemcache.client.base import Client as MemcacheClient
from pymemcache.exceptions import MemcacheServerError

from sidecar import memory_budget
from sidecar.memory_budget import MiB
from tests.integration.test_drain import DRAIN, memcached_target, memcached_values
from tests.support.procs import MemcachedProcess, NatsProcess, free_port
from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, build_config, kv_listener, sidecar_document
from tests.support.waiting import until


def ns_cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar.cli", "ns", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout)


def apply(config: Path, tmp_path: Path, namespaces: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    file = tmp_path / f"ns-{time.monotonic_ns()}.toml"
    file.write_text(tomli_w.dumps({"namespaces": namespaces}))
    return ns_cli(config, "apply", "-f", str(file), *extra)


def write(process: SidecarProcess, namespace: str, key: str, value: str) -> httpx.Response:
    listener = process.document["listeners"][0]["bind"]
    return httpx.post(f"http://{listener}/v1/log/{namespace}", json={"key": key, "text": value}, timeout=10)


def namespaces_of(process: SidecarProcess) -> dict[str, Any]:
    rows = httpx.get(f"{process.admin}/v1/namespaces", timeout=10).json()
    return {row["namespace"]: row for row in rows["namespaces"]}


def sidecar(nats_url: str, tmp_path: Path, name: str, namespaces: dict[str, Any] | None = None) -> SidecarProcess:
    document = sidecar_document(nats_url, namespaces or {}, [kv_listener()], drain=DRAIN)
    return SidecarProcess(document, tmp_path / name).start()


async def test_a_namespace_applied_live_serves_writes_on_two_running_sidecars(
        private_nats: NatsProcess, services: Services, tmp_path: Path, unique: str) -> None:
    pair = [sidecar(private_nats.url, tmp_path, f"s{i}") for i in range(2)]
    try:
        assert write(pair[0], unique, "k", "v").status_code == 404  # not a namespace yet
        namespaces = {unique: {"partitions": 2, "targets": [memcached_target("cache", services.memcached)]}}
        applied_at = time.monotonic()
        result = apply(pair[0].config_path, tmp_path, namespaces)
        assert result.returncode == 0, result.stderr
        assert "applied as revision 1" in result.stdout
        for process in pair:
            await until(lambda p=process: unique in namespaces_of(p), 10, "the sidecar to follow the bucket")
        followed = time.monotonic() - applied_at
        for index, process in enumerate(pair):
            answer = write(process, unique, f"{unique}-k{index}", f"v{index}")
            assert answer.status_code == 200 and answer.json()["durable"] == "true"
            assert namespaces_of(process)[unique] == {"namespace": unique, "source": "bucket", "revision": 1,
                                                      "mode": "async", "targets": ["cache"]}
        await until(lambda: memcached_values(services.memcached, [f"{unique}-k0", f"{unique}-k1"])
                    == {f"{unique}-k0": "v0", f"{unique}-k1": "v1"}, 20, "the new namespace to drain")
        status = subprocess.run([sys.executable, "-m", "sidecar.cli", "status", "--config", str(pair[1].config_path)],
                                capture_output=True, text=True, timeout=60)
        assert f"{unique} (bucket r1)" in status.stdout, status.stdout
        print(f"followed within {followed:.2f}s")
        # ls, get and history show what is there
        listing = ns_cli(pair[0].config_path, "ls")
        assert unique in listing.stdout and "cache" in listing.stdout
        got = ns_cli(pair[0].config_path, "get", unique)
        assert f"[namespaces.{unique}]" in got.stdout and "partitions = 2" in got.stdout
    finally:
        for process in pair:
            process.stop()


async def test_a_target_added_live_drains_from_its_start_and_a_removed_one_stops(
        private_nats: NatsProcess, private_memcached: MemcachedProcess, services: Services, tmp_path: Path,
        unique: str) -> None:
    cache = memcached_target("cache", services.memcached)
    process = sidecar(private_nats.url, tmp_path, "s")
    try:
        assert apply(process.config_path, tmp_path, {unique: {"partitions": 2, "targets": [cache]}}).returncode == 0
        await until(lambda: unique in namespaces_of(process), 10, "the namespace")
        before = [f"{unique}-before{i}" for i in range(20)]
        for key in before:
            assert write(process, unique, key, "old").json()["durable"] == "true"
        warm = {**memcached_target("warm", ("127.0.0.1", private_memcached.port)), "start": "now"}
        time.sleep(1.1)  # "now" has a one-second resolution: the writes above are strictly before it
        added = apply(process.config_path, tmp_path, {unique: {"partitions": 2, "targets": [cache, warm]}})
        assert added.returncode == 0, added.stderr
        await until(lambda: namespaces_of(process)[unique]["targets"] == ["cache", "warm"], 10, "the new target")
        after = [f"{unique}-after{i}" for i in range(20)]
        for key in after:
            assert write(process, unique, key, "new").json()["durable"] == "true"
        address = ("127.0.0.1", private_memcached.port)
        await until(lambda: len(memcached_values(address, after)) == len(after), 20, "the new target to drain")
        assert memcached_values(address, before) == {}  # it started at the apply, not at the oldest entry
        # removed: its consumers go, the other target keeps draining
        removed = apply(process.config_path, tmp_path, {unique: {"partitions": 2, "targets": [cache]}})
        assert removed.returncode == 0, removed.stderr
        await until(lambda: namespaces_of(process)[unique]["targets"] == ["cache"], 10, "the removal")
        consumers = json.loads(subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{private_nats.monitor_port}/jsz?consumers=true"],
            capture_output=True, text=True).stdout)
        names = {c["name"] for a in consumers.get("account_details", []) for s in a.get("stream_detail", [])
                 for c in s.get("consumer_detail", []) or []}
        assert not any(name.startswith("drain-warm-") for name in names), names
        assert write(process, unique, f"{unique}-last", "x").json()["durable"] == "true"
        await until(lambda: memcached_values(services.memcached, [f"{unique}-last"]) == {f"{unique}-last": "x"},
                    20, "the remaining target to drain")
    finally:
        process.stop()


class FullMemcached(MemcachedProcess):
    """A real memcached with 2 MB and -M: once full it answers "out of memory storing object" (a transient
    error: it may pass later) instead of evicting, while `version` still answers (its health is fine)."""

    def command(self) -> list[str]:
        command = super().command()
        at = command.index("-m")
        return [*command[:at], "-m", "2", "-I", "512k", "-M", *command[at + 2:]]

    def fill(self) -> None:
        client = MemcacheClient(("127.0.0.1", self.port), default_noreply=False)
        try:
            for index in range(100_000):
                client.set(f"fill{index}", b"x" * 1000)
        except MemcacheServerError:
            return
        finally:
            client.close()
        raise AssertionError("memcached never filled up")


async def test_a_retry_policy_change_takes_effect_without_a_restart(
        private_nats: NatsProcess, services: Services, tmp_path: Path, unique: str) -> None:
    full = FullMemcached(tmp_path / "full")
    full.start()
    full.fill()
    target = memcached_target("cache", ("127.0.0.1", full.port))
    patient = {"initial_delay": "50ms", "max_delay": "100ms", "multiplier": 1.0, "max_attempts": 100000}
    process = sidecar(private_nats.url, tmp_path, "s")
    try:
        config = process.config_path
        created = apply(config, tmp_path, {unique: {"partitions": 1, "retry": patient, "targets": [target]}})
        assert created.returncode == 0, created.stderr
        await until(lambda: unique in namespaces_of(process), 10, "the namespace")
        assert write(process, unique, "k", "v" * 1000).json()["durable"] == "true"
        await until(lambda: "out of memory" in process.target_status("cache")["last_error"], 20, "retries")
        assert process.target_status("cache")["dlq"] == 0  # retrying, for as long as 100000 attempts take
        impatient = {**patient, "max_attempts": 1}
        changed = apply(config, tmp_path, {unique: {"partitions": 1, "retry": impatient, "targets": [target]}})
        assert changed.returncode == 0, changed.stderr
        await until(lambda: process.target_status("cache")["dlq"] == 1, 30, "the entry to be dead-lettered")
        assert namespaces_of(process)[unique]["revision"] == 2
        assert "event=target_restarting" not in process.log()  # the same drainer, its policy changed in place
    finally:
        process.stop()
        full.stop()


async def test_unsafe_changes_are_refused_at_apply_and_invalid_documents_change_nothing(
        private_nats: NatsProcess, services: Services, tmp_path: Path, unique: str) -> None:
    process = sidecar(private_nats.url, tmp_path, "s")
    try:
        config = process.config_path
        base = {"partitions": 4, "targets": [memcached_target("cache", services.memcached)]}
        assert apply(config, tmp_path, {unique: base}).returncode == 0
        await until(lambda: unique in namespaces_of(process), 10, "the namespace")
        refused = apply(config, tmp_path, {unique: {**base, "partitions": 8}})
        assert refused.returncode == 1 and "partitions: 4 -> 8 cannot change live" in refused.stderr
        invalid = apply(config, tmp_path, {unique: {**base, "mode": "fast"}})
        assert invalid.returncode == 1 and "mode" in invalid.stderr
        dry = apply(config, tmp_path, {unique: {**base, "visibility_budget": "200ms"}}, "--dry-run")
        assert dry.returncode == 0 and '"visibility_budget": "200ms"' in dry.stdout and "dry run" in dry.stdout
        # a hand-written document that does not validate: logged, counted, ignored
        import nats

        async def scribble() -> None:
            nc = await nats.connect(private_nats.url)
            kv = await nc.jetstream().key_value("walcar_namespaces")
            await kv.put(unique, b'{"namespace": {"partitions": "many"}}')
            await nc.close()

        import asyncio

        asyncio.run(scribble())
        await until(lambda: "namespace_document_invalid" in process.log(), 10, "the invalid document to be seen")
        assert write(process, unique, "k", "v").json()["durable"] == "true"  # the data plane goes on
        assert namespaces_of(process)[unique]["revision"] == 1
        metrics = httpx.get(f"{process.admin}/metrics").text
        assert "walcar_config_apply_errors_total 1.0" in metrics
        assert f'walcar_config_revision{{namespace="{unique}"}} 1.0' in metrics
        # history shows both, rollback re-applies revision 1 as a new revision
        history = ns_cli(config, "history", unique)
        assert "revision 1: applied" in history.stdout and "INVALID" in history.stdout
        rollback = ns_cli(config, "rollback", unique, "--to", "1")
        assert rollback.returncode == 0, rollback.stderr
        await until(lambda: namespaces_of(process)[unique]["revision"] == 3, 10, "the rollback")
    finally:
        process.stop()


async def test_rm_waits_for_the_drain_unless_forced(private_nats: NatsProcess, tmp_path: Path, unique: str) -> None:
    process = sidecar(private_nats.url, tmp_path, "s")
    try:
        config = process.config_path
        dead = memcached_target("cache", ("127.0.0.1", free_port()))
        assert apply(config, tmp_path, {unique: {"partitions": 1, "targets": [dead]}}).returncode == 0
        await until(lambda: unique in namespaces_of(process), 10, "the namespace")
        assert write(process, unique, "k", "v").json()["durable"] == "true"
        refused = ns_cli(config, "rm", unique)
        assert refused.returncode == 1 and "not applied yet" in refused.stderr
        forced = ns_cli(config, "rm", unique, "--force")
        assert forced.returncode == 0, forced.stderr
        await until(lambda: unique not in namespaces_of(process), 10, "the namespace to go")
        assert write(process, unique, "k", "v").status_code == 404
    finally:
        process.stop()


async def test_sighup_rereads_the_files_namespaces_and_the_bucket_still_wins(
        private_nats: NatsProcess, services: Services, tmp_path: Path, unique: str) -> None:
    cache = memcached_target("cache", services.memcached)
    namespaces = {unique: {"partitions": 1, "visibility_budget": "50ms", "targets": [cache]}}
    process = sidecar(private_nats.url, tmp_path, "s", namespaces)
    try:
        assert namespaces_of(process)[unique]["source"] == "file"
        process.document["namespaces"][unique]["visibility_budget"] = "70ms"
        process.document["namespaces"][f"{unique}b"] = {"partitions": 1, "targets": [cache]}
        process.config_path.write_text(tomli_w.dumps(process.document))
        assert process.proc is not None
        process.proc.send_signal(signal.SIGHUP)

        def effective() -> dict[str, Any]:
            return httpx.get(f"{process.admin}/v1/config", timeout=10).json()["namespaces"]

        await until(lambda: f"{unique}b" in effective(), 10, "the file's new namespace")
        assert effective()[unique]["visibility_budget"] == "70ms"
        assert write(process, f"{unique}b", "k", "v").json()["durable"] == "true"
    finally:
        process.stop()


async def test_nats_away_leaves_the_last_config_and_says_stale(
        private_nats: NatsProcess, services: Services, tmp_path: Path, unique: str) -> None:
    process = sidecar(private_nats.url, tmp_path, "s")
    try:
        namespaces = {unique: {"partitions": 1, "targets": [memcached_target("cache", services.memcached)]}}
        assert apply(process.config_path, tmp_path, namespaces).returncode == 0
        await until(lambda: unique in namespaces_of(process), 10, "the namespace")
        private_nats.stop()

        def drain_view() -> dict[str, Any]:
            return httpx.get(f"{process.admin}/v1/drain", timeout=15).json()["config"]

        await until(lambda: drain_view()["stale_since"] is not None, 20, "the config to be stale")
        assert [row["namespace"] for row in drain_view()["namespaces"]] == [unique]  # the last applied stays
        private_nats.start()
        await until(lambda: drain_view()["stale_since"] is None, 30, "fresh again")
        await until(lambda: write(process, unique, "k2", "v").status_code == 200, 30, "writes again")
    finally:
        process.stop()


async def test_a_namespace_that_would_not_fit_the_memory_limit_is_not_applied_live(
        private_nats: NatsProcess, tmp_path: Path, unique: str) -> None:
    """A KV listener serves every namespace: each one added live must still fit the pod's memory limit."""
    document = sidecar_document(private_nats.url, {}, [kv_listener()], drain=DRAIN)
    room = sum(size for _, size in memory_budget.worst_case(build_config(document), "all")) + 8 * MiB
    document["sidecar"]["memory_limit"] = str(room)
    process = SidecarProcess(document, tmp_path / "s").start()
    try:
        config = process.config_path
        big = {"partitions": 1, "overlay_budget": "64MiB"}
        assert apply(config, tmp_path, {unique: big}).returncode == 0  # the bucket takes it; sidecars judge
        await until(lambda: "does not fit" in process.log(), 10, "the sidecar to refuse the namespace")
        assert "namespace_apply_failed" in process.log() and "overlay_budget" in process.log()
        assert unique not in namespaces_of(process)
        assert write(process, unique, "k", "v").status_code == 404
        assert "walcar_config_apply_errors_total 1.0" in httpx.get(f"{process.admin}/metrics").text
        # the same namespace with a budget that fits (and one with no overlay at all) is applied
        assert apply(config, tmp_path, {unique: {**big, "overlay_budget": "4MiB"},
                                        f"{unique}b": {"partitions": 1, "read_your_writes": False}}).returncode == 0
        await until(lambda: {unique, f"{unique}b"} <= set(namespaces_of(process)), 10, "both namespaces")
        assert write(process, unique, "k", "v").json()["durable"] == "true"
        assert write(process, f"{unique}b", "k", "v").json()["durable"] == "true"
    finally:
        process.stop()
