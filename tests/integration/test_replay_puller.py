"""The replay reader's puller against a real nats-server, on nats-py's internal receive path and on its
public API — the fallback it takes when a nats-py release changes that internal."""

from __future__ import annotations

import asyncio

import nats
import pytest
import trio

from sidecar.log import fastpath
from sidecar.replay.reader import Puller
from tests.support.services import Services

MESSAGES = 1500


async def read_everything(url: str, stream: str, subject: str) -> tuple[list[bytes], bool]:
    """Publish MESSAGES to a stream of their own, read them back through a Puller: (data, raw route used)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{subject}.>"])
        for i in range(MESSAGES):
            await js.publish(f"{subject}.{i % 3}", b"m%d" % i)
        await js.add_consumer(stream, durable_name="reader", ack_policy="none", deliver_policy="all")
        puller = await Puller.open(nc, stream, "reader")
        raw = fastpath.supported(nc) and bool(getattr(nc, "_walcar_routes", {}))
        data: list[bytes] = []
        while True:
            messages, status = await puller.next(200, 2.0)
            data += [payload for _, payload in messages]
            if not messages and status:  # 404: nothing left
                break
        await puller.close()
        await js.delete_stream(stream)
        return data, raw
    finally:
        await nc.close()


@pytest.mark.parametrize("route", ["raw", "public api"])
async def test_the_puller_reads_every_message_once_in_order(services: Services, unique: str, route: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if route == "public api":
        monkeypatch.setattr(fastpath, "supported", lambda nc: False)
    stream = f"PULLER_{unique.upper()}"
    data, raw = await trio.to_thread.run_sync(
        lambda: asyncio.run(read_everything(services.nats_url, stream, f"puller.{unique}")))
    assert raw is (route == "raw")
    assert data == [b"m%d" % i for i in range(MESSAGES)]
