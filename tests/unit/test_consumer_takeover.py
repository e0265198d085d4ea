"""`PartitionConsumer.take_over` recreates its consumer at the ack floor: a create that fails after the
delete must not lose that floor (the next attempt would start from the stream's first entry and apply
everything in it again). The JetStream API is a stand-in here: this is about which sequence is asked for."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from sidecar.drain.consumer import CONSUMER_NOT_FOUND, PartitionConsumer
from sidecar.log.connection import JetStreamApiError


class Link:
    def __init__(self) -> None:
        self.on_lost: list[Any] = []
        self.on_connected: list[Any] = []

    def subscribe(self, subject: str, handler: Any) -> int:
        return 1


class Api:
    """CONSUMER.INFO/DELETE/CREATE as the server answers them, with a create that fails when told."""

    def __init__(self, floor: int) -> None:
        self.link = Link()
        self.exists = True
        self.floor = floor
        self.fail_create = 0
        self.created: list[dict[str, Any]] = []
        self.on_delete: Any = lambda: None

    async def js_api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if subject.startswith("CONSUMER.INFO."):
            if not self.exists:
                raise JetStreamApiError(subject, {"code": 404, "err_code": CONSUMER_NOT_FOUND})
            return {"ack_floor": {"stream_seq": self.floor}}
        if subject.startswith("CONSUMER.DELETE."):
            self.exists = False
            self.on_delete()
            return {"success": True}
        assert subject.startswith("CONSUMER.CREATE.") and body is not None
        if self.fail_create:
            self.fail_create -= 1
            raise JetStreamApiError(subject, {"code": 503, "err_code": 10008, "description": "no leader"})
        self.exists = True
        self.created.append(body["config"])
        return {}


def consumer(api: Api, recreating: dict[int, int]) -> PartitionConsumer:
    return PartitionConsumer(api, "WAL_ns", "t", "wal.ns.3", 3, ack_wait=30, max_ack_pending=100,  # type: ignore[arg-type]
                             recreating=recreating)


async def test_a_create_that_fails_after_the_delete_keeps_the_ack_floor_for_the_next_attempt() -> None:
    api, recreating = Api(floor=41), {}
    api.fail_create = 1
    with pytest.raises(JetStreamApiError):
        await consumer(api, recreating).take_over(lambda _: None, lambda _: (0, 0))
    assert not api.exists and recreating == {3: 42}
    start = await consumer(api, recreating).take_over(lambda _: None, lambda _: (0, 0))
    assert start == 42 and api.created[-1]["opt_start_seq"] == 42
    assert recreating == {}


async def test_a_cancel_between_the_delete_and_the_create_does_not_stop_the_create() -> None:
    """An owner aborted (its lease lost) in the middle of taking over: the consumer is there afterwards, at
    the floor, for whoever takes the partition next."""
    api, recreating = Api(floor=9), {}
    with trio.CancelScope() as scope:
        api.on_delete = scope.cancel
        await consumer(api, recreating).take_over(lambda _: None, lambda _: (0, 0))
    assert api.exists and api.created[-1]["opt_start_seq"] == 10 and recreating == {}
