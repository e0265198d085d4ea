"""Drainer memory benchmark: peak RSS through a backlog of large values, target down and then draining.

    python bench/drain_memory/run.py [--backlog-mb 2048] [--value-kb 200] [--down-seconds 15] [--record]

The journal is prefilled with `--backlog-mb` of `--value-kb` values (over 1,000 keys), then a
drain-only `walcar run --role drain` with the default `sidecar.drain.max_held_bytes` starts
against a memcached of the benchmark's own that is not running yet: for `--down-seconds` the
target is down (the drainer fetches until its byte budget is full, its breaker opens, it stops
fetching); then memcached starts and the whole backlog drains. The drainer's peak RSS (VmHWM,
from /proc) is read at the end of each phase; the chart's default pod limit is the bar.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trio

from bench.common import delete_streams, machine, report, sidecar_document, start_walcar, table
from bench.drain.run import backlog, peak_rss_mib
from sidecar import config as config_mod
from sidecar.envelope import Entry, Op, now_us, partition_of
from sidecar.log.service import open_journal
from tests.support.procs import MemcachedProcess
from tests.support.services import ensure_up

PARTITIONS = 16
CHART_LIMIT_MIB = 256  # helm/walcar values: resources.limits.memory
NOTE = ("While the target is down the breaker opens at the first failed round and the partitions then fetch "
        "nothing, so the drainer stays near its starting size however long the outage; while draining, each "
        "partition holds at most its share of `max_held_bytes` (1/16 of 64 MiB here), the rest of the peak being "
        "the apply path's copies (encoded memcached commands) and the allocator.")


async def prefill(config: config_mod.Config, namespace: str, entries: int, value: bytes) -> None:
    async with open_journal(config) as journal:
        for start in range(0, entries, 16):
            messages = []
            for i in range(start, min(entries, start + 16)):
                key = f"{namespace}-{i % 1000}"
                entry = Entry(id=f"{namespace}-{i}", ns=namespace, op=Op.PUT, key=key,
                              partition=partition_of(key, PARTITIONS), value=value, write_time=now_us())
                messages.append(journal.message_for(entry))
            results = await journal.writer.publish_many(messages)
            assert all(r.ok for r in results), results[0]


async def watch(config: config_mod.Config, namespace: str, pid: int, down_seconds: float,
                start_target: object) -> tuple[float, float, float]:
    """(peak RSS MiB while the target is down, peak RSS MiB at the end of the drain, drain seconds)."""
    async with open_journal(config) as journal:
        await trio.sleep(down_seconds)
        down_peak = peak_rss_mib(pid)
        await trio.to_thread.run_sync(start_target)  # type: ignore[arg-type]
        began = time.monotonic()
        while await backlog(journal, namespace):
            await trio.sleep(0.5)
        return down_peak, peak_rss_mib(pid), time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog-mb", type=int, default=2048)
    parser.add_argument("--value-kb", type=int, default=200)
    parser.add_argument("--down-seconds", type=float, default=15.0)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    services = ensure_up()
    value = b"v" * (args.value_kb * 1024)
    entries = max(1, args.backlog_mb * 1024 // args.value_kb)
    namespace = f"b{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        memcached = MemcachedProcess(Path(tmp) / "memcached")  # its own: 2 GB would flush the shared one
        document = sidecar_document(
            services.nats_url,
            {namespace: {"partitions": PARTITIONS, "targets": [
                {"name": "t", "type": "memcached", "servers": [f"127.0.0.1:{memcached.port}"]}]}},
            log_level="warning",
        )
        config = config_mod.validate(document)
        trio.run(prefill, config, namespace, entries, value)
        walcar = start_walcar(Path(tmp) / "walcar", document, role="drain")
        try:
            baseline = peak_rss_mib(walcar.proc.pid)  # type: ignore[union-attr]
            down_peak, drain_peak, seconds = trio.run(watch, config, namespace, walcar.proc.pid,  # type: ignore[union-attr]
                                                      args.down_seconds, memcached.start)
        finally:
            walcar.stop()
            memcached.stop()
            delete_streams(services.nats_url, namespace)
    backlog_mb = entries * len(value) / 1024 / 1024
    headers = ["backlog", "max_held_bytes", "drainer RSS at start", f"peak RSS, target down {args.down_seconds:g}s",
               "peak RSS, whole backlog drained", "drain rate", "chart limit"]
    rows = [[f"{backlog_mb:,.0f} MiB ({entries:,} x {args.value_kb} KiB)",
             f"{config.sidecar.drain.max_held_bytes / 1024 / 1024:.0f} MiB",
             f"{baseline:.0f} MiB", f"{down_peak:.0f} MiB", f"{drain_peak:.0f} MiB",
             f"{backlog_mb / max(seconds, 0.001):,.0f} MiB/s ({entries / max(seconds, 0.001):,.0f}/s)",
             f"{CHART_LIMIT_MIB} MiB"]]
    command = (f"python bench/drain_memory/run.py --backlog-mb {args.backlog_mb} --value-kb {args.value_kb} "
               f"--down-seconds {args.down_seconds:g}")
    report("Drain memory", f"`{command}` — {machine()}; {PARTITIONS} partitions, one drain-only sidecar with the "
                           f"default byte budget, a memcached of its own (down, then started).\n\n"
                           f"{table(headers, rows)}\n\n{NOTE}\n", args.record)


if __name__ == "__main__":
    main()
