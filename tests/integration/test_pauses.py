"""Pauses live in a NATS KV bucket: one sidecar's pause reaches every other by its watch, not by polling."""

from __future__ import annotations

import uuid

import trio

from sidecar.drain.pauses import Pauses
from sidecar.log.service import open_journal
from tests.support.services import Services
from tests.support.sidecar import build_config, sidecar_document
from tests.support.waiting import until


async def test_a_pause_set_by_one_sidecar_reaches_another_and_so_does_the_resume(services: Services) -> None:
    namespace = f"p{uuid.uuid4().hex[:8]}"
    config = build_config(sidecar_document(services.nats_url, {namespace: {}}))
    async with open_journal(config) as operator_side, open_journal(config) as drain_side:
        operator = Pauses(operator_side.writer.conn)
        follower = Pauses(drain_side.writer.conn)
        await operator.open()
        await follower.open()
        assert not follower.is_paused(namespace, "db")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.watch)
            await trio.sleep(0.5)  # the watch has read the bucket's current keys
            await operator.set(namespace, "db", True)
            await until(lambda: follower.is_paused(namespace, "db"), 5, "the pause to reach the other sidecar")
            resumed = trio.Event()

            async def wait_resumed() -> None:
                await follower.wait_resumed(namespace, "db")
                resumed.set()

            nursery.start_soon(wait_resumed)
            await operator.set(namespace, "db", False)
            with trio.fail_after(5):
                await resumed.wait()  # a drainer waiting on the pause is woken by the resume
            assert not follower.is_paused(namespace, "db")
            nursery.cancel_scope.cancel()
