"""The drain's bounds against the real services: memory by bytes, whatever the backlog and its values."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from sidecar.config import DrainSettings
from sidecar.envelope import Entry, Op, now_us, partition_of
from sidecar.log.service import open_journal
from tests.integration.test_drain import DRAIN, FAST_RETRY, memcached_target, memcached_values
from tests.support.procs import MemcachedProcess, free_port
from tests.support.services import Services
from tests.support.sidecar import SidecarProcess, build_config, sidecar_document
from tests.support.waiting import converge

MIB = 1024 * 1024


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process as the kernel counts it (VmHWM: its peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def journal_values(document: dict, namespace: str, keys: list[str], total: int, size: int) -> dict[str, bytes]:
    """`total` values of `size` bytes over `keys`, journaled (acked) straight into the stream;
    returns each key's last value."""
    config = build_config(document)
    partitions = config.namespaces[namespace].partitions
    last: dict[str, bytes] = {}
    async with open_journal(config) as journal:
        for start in range(0, total, 16):
            messages = []
            for i in range(start, min(total, start + 16)):
                key = keys[i % len(keys)]
                value = (b"%s=%d;" % (key.encode(), i)).ljust(size, b"v")
                entry = Entry(id=f"{namespace}-{i}", ns=namespace, op=Op.PUT, key=key,
                              partition=partition_of(key, partitions), value=value, write_time=now_us())
                messages.append(journal.message_for(entry))
                last[key] = value
            results = await journal.writer.publish_many(messages)
            assert all(r.ok for r in results), results
    return last


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
            response = await admin.post(f"/v1/drain/{unique}/up/pause")
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
            bound = baseline + budget_mib + 48
            held_peak = rss_mib(pid, "VmHWM")
            assert held_peak < bound, f"peak RSS {held_peak:.0f} MiB while paused/down (baseline {baseline:.0f})"

            response = await admin.post(f"/v1/drain/{unique}/up/resume")
            assert response.status_code == 200, response.text
            await converge(lambda: {k for k, v in memcached_values(up, keys).items() if v.encode() != last[k]}
                           | (set(keys) - set(memcached_values(up, keys))), 120, "the resumed target's values")
            drained_peak = rss_mib(pid, "VmHWM")
            assert drained_peak < bound, f"peak RSS {drained_peak:.0f} MiB draining (baseline {baseline:.0f})"
            print(f"baseline {baseline:.0f} MiB, peak paused/down {held_peak:.0f} MiB, "
                  f"peak draining {drained_peak:.0f} MiB")
    finally:
        drainer.stop()

