"""The drain core's own rate, A/B: two source trees drain the same kind of backlog in turn, same run.

    python bench/drain/core.py --trees BASE_DIR,NEW_DIR [--target null|kafka|memcached] [--entries 40000]
                               [--keys 10000] [--pack 1] [--rounds 3]

For comparing drain-core changes (sidecar/drain): each round prefills `--entries` 200-byte writes
over `--keys` keys into a fresh 16-partition namespace and runs the drain of one tree in a
child process (DrainService in-process, so the child's CPU is the drain's alone), alternating the
trees so both ride the box's drift alike. `--target null` applies nothing (every run lands at
once: the drain's per-entry ceiling); `kafka` produces to a fresh topic on the project's Kafka,
`memcached` sets into the project's memcached.
A tree is a checkout (e.g. `git worktree add /tmp/base main`); the rate is the backlog's fall, as
in bench/drain/run.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import trio
import trio.lowlevel

HERE = Path(__file__).resolve()


class NullTarget:
    """Applies nothing: the drain's own cost per entry, with a checkpoint per call like a real target."""

    name = "t"
    limits = {"initial": 4096, "minimum": 4096, "maximum": 4096}  # noqa: RUF012 - read only

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def wants(self, entry: object) -> bool:
        return True

    async def apply(self, runs: list[list[object]]) -> list[object]:
        from sidecar.drain.targets.base import RunOutcome

        await trio.lowlevel.checkpoint()
        return [RunOutcome(len(run)) for run in runs]

    async def health(self) -> None: ...


async def drain_rate(config: object, namespace: str, entries: int, messages: int = 0) -> float:
    """Entries/s; `messages`: what the backlog (which counts messages) was when entries were packed."""
    from bench.drain.run import backlog, rate_of
    from sidecar.drain.service import DrainService
    from sidecar.log.service import open_journal

    async with open_journal(config) as journal, open_journal(config) as watcher:  # type: ignore[arg-type]
        service = DrainService(config, journal)  # type: ignore[arg-type]
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            samples = [(time.monotonic(), messages or entries)]  # the whole backlog left at the start
            while samples[-1][1]:
                await trio.sleep(0.25)
                samples.append((time.monotonic(), await backlog(watcher, namespace)))
            await service.stop(5)
            nursery.cancel_scope.cancel()
    return rate_of(samples, entries, messages)


def child(target: str, entries: int, keys: int, pack: int) -> None:
    """One drain of the tree this process imports (its cwd): prints `rate <entries/s>`."""
    sys.path.insert(0, os.getcwd())
    from bench.common import delete_streams, sidecar_document
    from bench.drain.run import PARTITIONS, prefill
    from sidecar import config as config_mod
    from sidecar.drain import service as service_mod
    from tests.support.services import ensure_up

    services = ensure_up()
    namespace = f"b{uuid.uuid4().hex[:8]}"
    topic = None
    if target == "kafka":
        from bench.targets.run import create_topic, kafka_target

        topic = create_topic(services.kafka)
        settings = kafka_target(services.kafka, topic)
    elif target == "memcached":
        from bench.drain.run import target_settings

        settings = target_settings("memcached", services, "")
    else:
        settings = {"name": "t", "type": "memcached", "servers": ["127.0.0.1:1"]}  # never built
        service_mod.build_target = lambda *_: NullTarget()  # type: ignore[assignment]
    document = sidecar_document(services.nats_url, {namespace: {"partitions": PARTITIONS, "targets": [settings]}},
                                log_level="warning", journal={"max_inflight_entries": 50_000})
    config = config_mod.validate(document)
    messages = trio.run(prefill, config, namespace, entries, keys, pack)
    try:
        rate = trio.run(drain_rate, config, namespace, entries, messages)
    finally:
        delete_streams(services.nats_url, namespace)
        if topic is not None:
            from bench.targets.run import delete_topic

            delete_topic(services.kafka, topic)
    print(f"rate {rate:.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default="", help="two source trees, comma-separated: base,new")
    parser.add_argument("--target", default="null", choices=["null", "kafka", "memcached"])
    parser.add_argument("--entries", type=int, default=40_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pack", type=int, default=1, help="about this many entries per journal message")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.target, args.entries, args.keys, args.pack)
        return
    trees = [str(Path(tree).resolve()) for tree in args.trees.split(",")]
    rates: dict[str, list[float]] = {tree: [] for tree in trees}
    for round_ in range(1, args.rounds + 1):
        for tree in trees:
            load = Path("/proc/loadavg").read_text().split()[0]
            command = [sys.executable, str(HERE), "--child", "--target", args.target, "--entries", str(args.entries),
                       "--keys", str(args.keys), "--pack", str(args.pack)]
            out = subprocess.run(command, cwd=tree, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": tree}, check=True).stdout
            rate = float(out.rsplit("rate ", 1)[1])
            rates[tree].append(rate)
            print(f"round {round_} {tree} load {load}: {rate:,.0f} entries/s", flush=True)
    base, new = (sorted(rates[tree])[len(rates[tree]) // 2] for tree in trees)
    print(f"median: {base:,.0f} -> {new:,.0f} entries/s ({new / base:.2f}x)")


if __name__ == "__main__":
    main()
