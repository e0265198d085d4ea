"""How long one large KV request holds the sidecar's trio loop (issue 18).

A sidecar runs in this process with a trio Instrument timing every task step; curl (another
process, so the client takes no GIL from the loop) sends each request, and the longest
steps while it is served are reported with the task that took them. Every request must
answer 200 (durable). A loop step is time no other request, PubAck or probe is served.

    python bench/kv/stall.py [--value-mib 15] [--items 10000] [--repeat 3] [--only mutate] [--record]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import delete_streams, free_port, machine, median, report, table
from tests.support.services import ensure_up
from tests.support.sidecar import build_config, running_sidecar, sidecar_document


class LongestSteps(trio.abc.Instrument):
    """The longest task steps since `reset`: wall time (what other requests wait), and the loop
    thread's CPU time (the same less the time the OS ran other processes: on a shared box, the
    part that is this code's)."""

    def __init__(self) -> None:
        self.wall: list[tuple[float, str]] = []
        self.cpu: list[float] = []
        self._began: tuple[float, float] | None = None  # None: added in the middle of a step

    def reset(self) -> None:
        self.wall, self.cpu = [], []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._began = (time.perf_counter(), time.thread_time())

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._began is None:
            return
        wall, cpu = time.perf_counter() - self._began[0], time.thread_time() - self._began[1]
        if wall > 0.001:
            self.wall.append((wall, task.name.rsplit(".", 1)[-1]))
            self.cpu.append(cpu)

    def longest(self) -> tuple[float, float, str]:
        wall, name = max(self.wall, default=(0.0, "-"))
        return wall, max(self.cpu, default=0.0), name


JSON_VALUE_MIB = 1.45


def requests(scratch: Path, namespace: str, value_mib: float, items: int) -> dict[str, tuple[str, str, Path, str]]:
    """name -> (method, path, body file, content type)."""
    value = bytes(range(256)) * int(value_mib * 1024 * 1024 / 256)
    bodies = {
        "small write (1 entry, 100 B)": ("POST", f"/v1/log/{namespace}",
                                         json.dumps({"key": "k", "text": "x" * 100}).encode(), "application/json"),
        # JSON bodies stop at the listener's max_json_body (2 MiB): the largest value that fits.
        f"{JSON_VALUE_MIB:g} MiB value, JSON (base64)": ("PUT", f"/v1/kv/{namespace}/big", json.dumps(
            {"items": [{"key": "v", "value": base64.b64encode(value[:int(JSON_VALUE_MIB * 1024 * 1024)]).decode()}]}
        ).encode(), "application/json"),
        f"{value_mib:g} MiB value, msgpack": ("PUT", f"/v1/kv/{namespace}/big", msgspec.msgpack.encode(
            {"items": [{"key": "v", "value": value}]}), "application/msgpack"),
        f"{items:,} items, JSON": ("PUT", f"/v1/kv/{namespace}/many", json.dumps(
            {"items": [{"key": f"i{n}", "text": "x" * 20} for n in range(items)]}).encode(), "application/json"),
        f"batch of {items:,} WriteToLog entries, JSON": ("POST", f"/v1/log/{namespace}", json.dumps(
            [{"key": f"k{n}", "text": "x" * 20} for n in range(items)]).encode(), "application/json"),
        # A mutation per record: the loop over mutations, not one mutation's items.
        f"mutate: {items:,} whole-record deletes, msgpack": ("POST", f"/v1/kv/{namespace}/mutate",
                                                             msgspec.msgpack.encode({"mutations": [
                                                                 {"op": "delete", "id": f"r{n}"} for n in range(items)
                                                             ]}), "application/msgpack"),
        f"mutate: {items:,} one-item puts, JSON": ("POST", f"/v1/kv/{namespace}/mutate", json.dumps(
            {"mutations": [{"op": "put", "id": f"r{n}", "items": [{"key": "i", "text": "x"}]} for n in range(items)]}
        ).encode(), "application/json"),
    }
    out = {}
    for n, (name, (method, path, body, content_type)) in enumerate(bodies.items()):
        file = scratch / f"body{n}"
        file.write_bytes(body)
        out[name] = (method, path, file, content_type)
    return out


async def run(args: argparse.Namespace) -> list[list[str]]:
    services = ensure_up()
    namespace = f"s{uuid.uuid4().hex[:8]}"
    port = free_port()
    config = build_config(sidecar_document(services.nats_url, {namespace: {"partitions": 4, "max_item_size": "16MiB"}},
                                           [{"protocol": "kv", "bind": f"127.0.0.1:{port}", "max_body": "16MiB",
                                             "partial_budget": "32MiB"}], log_level="warning"))
    scratch = Path(tempfile.mkdtemp(prefix="walcar-bench-stall-"))
    cases = requests(scratch, namespace, args.value_mib, args.items)
    instrument = LongestSteps()
    rows = []
    try:
        async with running_sidecar(config, role="ingress"):
            trio.lowlevel.add_instrument(instrument)
            for name, (method, path, file, content_type) in cases.items():
                if (args.no_batch and name.startswith("batch")) or args.only not in name:
                    continue
                worst: list[tuple[float, float, str]] = []
                for _ in range(args.repeat):
                    instrument.reset()
                    done = await trio.run_process(
                        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, "--data-binary",
                         f"@{file}", "-H", f"content-type: {content_type}", f"http://127.0.0.1:{port}{path}"],
                        capture_stdout=True)
                    assert done.stdout == b"200", (name, done.stdout)
                    worst.append(instrument.longest())
                rows.append([name, f"{file.stat().st_size / 1048576:.1f} MiB",
                             f"{median([w[0] for w in worst]) * 1000:.1f} ms",
                             f"{median([w[1] for w in worst]) * 1000:.1f} ms", max(worst)[2]])
                print(rows[-1], flush=True)
            trio.lowlevel.remove_instrument(instrument)
    finally:
        await trio.to_thread.run_sync(delete_streams, services.nats_url, namespace)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--value-mib", type=float, default=15.0)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-batch", action="store_true", help="leave out the WriteToLog batch (a walcar without it)")
    parser.add_argument("--only", default="", help="only the requests whose name holds this text")
    parser.add_argument("--label", default="", help="what this run measures (before/after a change)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = trio.run(run, args)
    command = (f"python bench/kv/stall.py --value-mib {args.value_mib:g} --items {args.items} --repeat {args.repeat}"
               + (" --no-batch" if args.no_batch else "") + (f" --only '{args.only}'" if args.only else ""))
    report(f"KV requests and the event loop{': ' + args.label if args.label else ''}",
           f"`{command}` — {machine()}; load average {load:.1f} at the start; the longest trio task step while "
           f"each request is served, wall and the loop thread's CPU (median of {args.repeat}), from a trio "
           f"Instrument in the sidecar's process; curl sends the body from a file; a namespace without targets, "
           f"`max_item_size` 16MiB.\n\n"
           f"{table(['request', 'body', 'longest step, wall', 'longest step, CPU', 'task'], rows)}\n", args.record)


if __name__ == "__main__":
    main()
