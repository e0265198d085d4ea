"""nats-server's CPU per message delivered through a pull consumer, by ack policy (issue 21's design probe).

    python bench/drain/ack_policies.py [--messages 100000] [--rounds 2]

The drain pulls every journal message through a pull consumer with `AckExplicit` and acks each one.
An ordered target could use `AckAll` (one ack a pull covers every message before it); `AckNone`
bounds what any ack policy can save. A stream of 100-byte messages over 1,000 subjects is read
to its end by one consumer per policy, in batches of 256, policies alternating by round; the
figure is nats-server's CPU (from /proc) over the read, per message. The client is nats-py (its
own cost is not counted). Needs `scripts/services up nats`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from bench.common import cpu_seconds, machine, median, pids_listening
from tests.support.services import ensure_up

POLICIES = {"explicit": AckPolicy.EXPLICIT, "all": AckPolicy.ALL, "none": AckPolicy.NONE}
BATCH = 256


async def fill(js: nats.js.JetStreamContext, nc: nats.NATS, stream: str, count: int) -> None:
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
    body = b"x" * 100
    for n in range(count):
        await nc.publish(f"{stream}.k{n % 1000}", body)  # core publishes: the stream stores them, no PubAck each
        if n % 5000 == 4999:
            await nc.flush()
    await nc.flush()
    while (await js.stream_info(stream)).state.messages < count:
        await asyncio.sleep(0.1)


async def read_all(js: nats.js.JetStreamContext, nc: nats.NATS, stream: str, policy: str, count: int,
                   server: list[int]) -> float:
    """nats-server µs of CPU per message while one consumer reads `count` messages under `policy`."""
    durable = f"probe-{policy}-{uuid.uuid4().hex[:6]}"
    await js.add_consumer(stream, ConsumerConfig(durable_name=durable, ack_policy=POLICIES[policy],
                                                 max_ack_pending=-1 if policy == "none" else 20_000))
    sub = await js.pull_subscribe_bind(durable, stream=stream)
    before = cpu_seconds(server)
    got = 0
    while got < count:
        messages = await sub.fetch(BATCH, timeout=5)
        got += len(messages)
        if policy == "explicit":
            for message in messages:
                await nc.publish(message.reply, b"+ACK")
        elif policy == "all":
            await nc.publish(messages[-1].reply, b"+ACK")
    await nc.flush()
    await asyncio.sleep(0.3)  # the last acks handled
    spent = cpu_seconds(server) - before
    await sub.unsubscribe()
    await js.delete_consumer(stream, durable)
    return spent / count * 1e6


async def main_async(args: argparse.Namespace) -> None:
    services = ensure_up()
    server = pids_listening(int(services.nats_url.rsplit(":", 1)[1]))
    nc = await nats.connect(services.nats_url)
    js = nc.jetstream()
    stream = f"PROBE{uuid.uuid4().hex[:8]}"
    samples: dict[str, list[float]] = {policy: [] for policy in POLICIES}
    try:
        await fill(js, nc, stream, args.messages)
        for round_ in range(args.rounds):
            order = list(POLICIES) if round_ % 2 == 0 else list(reversed(POLICIES))
            for policy in order:
                samples[policy].append(await read_all(js, nc, stream, policy, args.messages, server))
                print(f"round {round_ + 1} {policy:8s} nats-server {samples[policy][-1]:.2f} µs/message", flush=True)
    finally:
        await js.delete_stream(stream)
        await nc.close()
    print(f"{machine()}; {args.messages} messages, batches of {BATCH}, {args.rounds} rounds")
    for policy, values in samples.items():
        print(f"median {policy:8s} nats-server {median(values):.2f} µs/message")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
