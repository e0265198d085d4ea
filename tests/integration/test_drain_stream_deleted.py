"""A namespace's stream deleted under a running drain: the drain waits for it quietly, says why once,
and drains again once the stream is back."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from sidecar.config import stream_name
from tests.integration.test_drain import DRAIN, FAST_RETRY, memcached_target, memcached_values
from tests.integration.test_drain_bounds import journal_values
from tests.support.procs import MemcachedProcess, NatsProcess
from tests.support.sidecar import SidecarProcess, sidecar_document
from tests.support.streams import js_api
from tests.support.waiting import converge, until


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (utime + stime in /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_share(pid: int, seconds: float) -> float:
    """The share of one CPU the process used over a window of wall time."""
    began_cpu, began = cpu_seconds(pid), trio.current_time()
    await trio.sleep(seconds)
    return (cpu_seconds(pid) - began_cpu) / (trio.current_time() - began)


async def test_a_deleted_stream_is_waited_for_without_spinning(private_nats: NatsProcess,
                                                               private_memcached: MemcachedProcess,
                                                               tmp_path: Path, unique: str) -> None:
    """Each pull request to a deleted stream is answered at once with an error; asked again at once,
    the idle drainer spun at 35-87% of a CPU, silently. Now it backs off, logs the reason once, and
    takes its partitions over again (recreating the consumers) when the stream is back."""
    cache = ("127.0.0.1", private_memcached.port)
    namespaces = {unique: {"partitions": 8, "retry": FAST_RETRY, "targets": [memcached_target("cache", cache)]}}
    document = sidecar_document(private_nats.url, namespaces, drain=DRAIN)
    drainer = SidecarProcess(document, tmp_path / "drainer", role="drain").start()
    try:
        pid = drainer.proc.pid  # type: ignore[union-attr]
        await until(lambda: drainer.target_status("cache")["owned_here"] == 8, 30, "every partition owned")
        keys = [f"{unique}-k{i}" for i in range(16)]
        last = await journal_values(document, unique, keys, 32, 100)
        await converge(lambda: {k for k in keys if memcached_values(cache, [k]).get(k, "").encode() != last[k]},
                       30, "the first values applied")

        deleted = await js_api(private_nats.url, f"STREAM.DELETE.{stream_name(unique)}")
        assert deleted.get("success"), deleted
        await until(lambda: "drain_stream_or_consumer_gone" in drainer.log(), 30, "the drain saying why it waits")
        share = await cpu_share(pid, 5.0)
        gone_lines = [line for line in drainer.log().splitlines() if "drain_stream_or_consumer_gone" in line]
        assert share < 0.2, f"the idle drainer used {share:.0%} of a CPU while its stream was gone"
        assert len(gone_lines) == 1, gone_lines  # once per episode, not per partition and retry
        assert stream_name(unique) in gone_lines[0], gone_lines[0]
        print(f"CPU while the stream was gone: {share:.1%} of one core; {gone_lines[0]}")

        # The stream comes back (a sidecar provisions it): the drain recreates its consumers and applies.
        last = await journal_values(document, unique, keys, 32, 120)
        await converge(lambda: {k for k in keys if memcached_values(cache, [k]).get(k, "").encode() != last[k]},
                       60, "the values written after the stream came back")
        assert "drain_stream_back" in drainer.log()
    finally:
        drainer.stop()
