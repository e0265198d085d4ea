"""Read your own writes through the memcached front (sidecar/overlay.py), against real memcached.

An async namespace acks a write once it is journaled; the drain applies it a moment later.
Without the overlay a `set` then `get` on one connection usually missed (187 of 200 in
issue 22); with it the get answers the acked value — and keeps answering while memcached
is down, for the keys this sidecar wrote.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
from pymemcache.client.base import Client as MemcacheClient

from tests.integration.test_drain import DRAIN, memcached_target
from tests.support.procs import MemcachedProcess, NatsProcess, free_port
from tests.support.sidecar import SidecarProcess, kv_listener, sidecar_document
from tests.support.waiting import until

MiB = 1024 * 1024


def start(nats: NatsProcess, memcached: MemcachedProcess, tmp_path: Path, namespace: str,
          **settings: Any) -> tuple[SidecarProcess, MemcacheClient]:
    ns = {"partitions": 4, "targets": [memcached_target("cache", ("127.0.0.1", memcached.port))], **settings}
    listener = {"protocol": "memcached", "bind": f"127.0.0.1:{free_port()}", "namespace": namespace}
    process = SidecarProcess(sidecar_document(nats.url, {namespace: ns}, [listener], drain=DRAIN),
                             tmp_path / "s").start()
    host, port = listener["bind"].split(":")
    return process, MemcacheClient((host, int(port)), default_noreply=False, connect_timeout=5, timeout=10)


def metric(process: SidecarProcess, name: str) -> float:
    with urllib.request.urlopen(f"{process.admin}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return sum(float(value) for value in found)


async def test_set_then_get_on_one_connection_never_misses(
        private_nats: NatsProcess, private_memcached: MemcachedProcess, tmp_path: Path, unique: str) -> None:
    process, client = start(private_nats, private_memcached, tmp_path, unique)
    misses = stale = 0
    try:
        for index in range(10_000):
            key = f"k{index % 100}"
            value = b"%d" % index
            assert client.set(key, value) is True
            got = client.get(key)
            if got is None:
                misses += 1
            elif got != value:
                stale += 1
        assert (misses, stale) == (0, 0)
        # A delete reads as a miss at once, gets answers the value with memcached's own CAS.
        assert client.set("d", b"1") is True and client.delete("d") is True
        assert client.get("d") is None
        assert client.set("c", b"v") is True
        value, cas = client.gets("c")
        assert value == b"v" and int(cas) > 0
        assert client.cas("c", b"w", cas) is True
        # Pipelined in one packet, a noreply set then a get: the get waits for the set's ack.
        host, port = client.server
        with socket.create_connection((host, port), timeout=10) as sock:
            for index in range(200):
                sock.sendall(b"set p 0 0 %d noreply\r\n%d\r\nget p\r\n" % (len(b"%d" % index), index))
                answer = b""
                while not answer.endswith(b"END\r\n"):
                    answer += sock.recv(4096)
                assert answer == b"VALUE p 0 %d\r\n%d\r\nEND\r\n" % (len(b"%d" % index), index)
        await until(lambda: metric(process, "walcar_overlay_bytes") == 0, 20, "the overlay to empty")
    finally:
        client.close()
        process.stop()


async def test_reads_keep_working_while_memcached_is_down(
        private_nats: NatsProcess, private_memcached: MemcachedProcess, tmp_path: Path, unique: str) -> None:
    process, client = start(private_nats, private_memcached, tmp_path, unique)
    last: dict[str, bytes] = {}
    try:
        assert client.set("before", b"old") is True
        private_memcached.stop()
        began = time.monotonic()
        round_ = 0
        while time.monotonic() - began < 30:
            round_ += 1
            for index in range(50):
                key = f"k{index}"
                if index % 10 == 9 and round_ % 3 == 0:
                    assert client.delete(key) is True  # acked durable: the journal is up
                    last.pop(key, None)
                else:
                    value = b"%d-%d" % (round_, index)
                    assert client.set(key, value, expire=0 if index % 2 else 3600) is True
                    last[key] = value
            got = client.get_many([f"k{index}" for index in range(50)])
            assert got == last, f"round {round_}"
            time.sleep(0.2)
        # Meta get answers flags, TTL and size from the overlay; a CAS (unknowable while memcached
        # is down) comes back as 0 after the visibility wait.
        assert client.set("m", b"abc", expire=3600, flags=7) is True
        line = client.raw_command(b"mg m v f t s", b"\r\n")
        assert line.startswith(b"VA 3 f7 t") and b" s3" in line, line
        assert client.gets("m") == (b"abc", b"0")
        overlay = metric(process, "walcar_overlay_bytes")
        assert overlay > 0
        private_memcached.start()
        await until(lambda: metric(process, "walcar_overlay_bytes") == 0, 60, "the drain to catch up")
        direct = MemcacheClient(("127.0.0.1", private_memcached.port))
        assert direct.get_many(list(last)) == last
        assert client.get_many([f"k{index}" for index in range(50)]) == last
        direct.close()
    finally:
        client.close()
        process.stop()


async def test_a_write_flood_at_the_budget_keeps_rss_within_it(
        private_nats: NatsProcess, private_memcached: MemcachedProcess, tmp_path: Path, unique: str) -> None:
    """The same flood first through a namespace without the overlay (journal buffers, the allocator's
    pools: the sidecar's own cost of a flood), then through one with it: the second adds the budget."""
    budget = 16 * MiB
    target = [memcached_target("cache", ("127.0.0.1", private_memcached.port))]
    plain, overlaid = f"{unique}-off", unique
    namespaces = {plain: {"partitions": 4, "targets": target, "read_your_writes": False},
                  overlaid: {"partitions": 4, "targets": target, "overlay_budget": "16MiB"}}
    listeners = [{"protocol": "memcached", "bind": f"127.0.0.1:{free_port()}", "namespace": name}
                 for name in (plain, overlaid)]
    # No drain in this process: its held entries (max_held_bytes) would blur what the overlay costs.
    # With nothing draining, every key written stays unapplied: the tracker of those keys has a byte
    # budget of its own (unapplied_budget, ~390 B a key here), full before the overlay flood starts
    # and large enough to still hold the overlaid namespace's 16k keys (their reads wait for them).
    process = SidecarProcess(sidecar_document(private_nats.url, namespaces, listeners, drain=DRAIN,
                                              unapplied_budget="8MiB"),
                             tmp_path / "s", role="ingress").start()
    clients = [MemcacheClient(("127.0.0.1", int(listener["bind"].split(":")[1])), default_noreply=False,
                              connect_timeout=5, timeout=30) for listener in listeners]
    value = b"x" * 4096

    def flood(client: MemcacheClient, prefix: str) -> float:
        """RSS growth (MiB) of 16k noreply sets of 4 KiB (~64 MiB: four times the budget)."""
        before = process.rss_mib()
        for index in range(16_000):
            client.set(f"{prefix}{index}", value, noreply=True)
        client.version()  # answered after every noreply write before it
        return process.rss_mib() - before

    try:
        flood(clients[0], "warm")  # the journal's buffers, the allocator's pools
        plain_cost = flood(clients[0], "flood")  # the same flood without an overlay: new keys, tracker and all
        first = flood(clients[1], "flood")
        again = flood(clients[1], "flood")  # at its budget already: replaces, evicts, does not grow
        assert metric(process, "walcar_overlay_bytes") <= budget
        assert metric(process, "walcar_overlay_evictions_total") > 0
        # What the overlay namespace cost beyond what the plain one did for the same flood. The
        # allocator's high-water marks make RSS noisy by a few MiB from run to run (18 to 25 MiB
        # measured); the unapplied-keys tracker, full before this flood, no longer adds to it.
        extra = first + again - plain_cost
        assert extra <= budget / MiB + 12, f"{first:.1f} + {again:.1f} MiB (plain {plain_cost:.1f})"
        assert clients[1].get("flood15999") == value
        # An evicted key waits (visibility_budget) for a drain (none here), then reads memcached.
        assert clients[1].get("flood0") is None
        assert metric(process, "walcar_overlay_fallback_reads_total") >= 1
        print(f"overlay flood RSS: plain +{plain_cost:.1f} MiB; overlay +{first:.1f}, then +{again:.1f} MiB")
    finally:
        for client in clients:
            client.close()
        process.stop()


async def test_kv_get_reads_its_own_items_while_the_target_is_down(
        private_nats: NatsProcess, private_memcached: MemcachedProcess, tmp_path: Path, unique: str) -> None:
    ns = {"partitions": 4, "targets": [memcached_target("cache", ("127.0.0.1", private_memcached.port))]}
    document = sidecar_document(private_nats.url, {unique: ns}, [kv_listener()], drain=DRAIN)
    process = SidecarProcess(document, tmp_path / "s").start()
    base = f"http://{document['listeners'][0]['bind']}/v1/kv/{unique}"
    try:
        with httpx.Client(timeout=10) as client:
            def items(record: str, query: str) -> dict[str, str]:
                response = client.get(f"{base}/{record}?items={query}")
                assert response.status_code in (200, 404), response.text
                return {i["key"]: i["value"] for i in response.json()["items"]} if response.status_code == 200 else {}

            put = client.put(f"{base}/r1", json={"items": [{"key": "a", "text": "1"}, {"key": "b", "text": "2"}]})
            assert put.json()["durable"] == "true"
            assert set(items("r1", "a,b")) == {"a", "b"}  # at once, drained or not
            # r1 applied (and left the overlay) before the outage: from then on it is the target's to answer.
            await until(lambda: metric(process, "walcar_overlay_bytes") == 0, 60, "the drain to apply r1")
            private_memcached.stop()
            # One entry per record here: the memcached target collapses a run per record, items and all.
            assert client.put(f"{base}/r2", json={"items": [{"key": "x", "text": "4"}]}).json()["durable"] == "true"
            assert client.request("DELETE", f"{base}/r1", json={"item_keys": ["b"]}).json()["durable"] == "true"
            assert set(items("r2", "x")) == {"x"}
            assert items("r1", "b") == {}  # the delete answers a miss without asking the target
            assert client.get(f"{base}/r3?items=z").status_code == 503  # not ours: the target is down
            assert client.get(f"{base}/r1?items=a,b").status_code == 503  # `a` is the target's to answer
            private_memcached.start()  # empty: only what was journaled during the outage comes back
            await until(lambda: metric(process, "walcar_overlay_bytes") == 0, 60, "the drain to catch up")
            assert set(items("r2", "x")) == {"x"} and items("r1", "a,b") == {}
    finally:
        process.stop()
