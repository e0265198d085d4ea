"""The ingress side of applied notices: subscribe and feed the AppliedTracker (one crossing per notice)."""

from __future__ import annotations

import msgspec
import trio

from sidecar.applied import AppliedTracker
from sidecar.log.connection import NatsConnection


async def subscribe_applied(conn: NatsConnection, tracker: AppliedTracker, namespaces: list[str]) -> None:
    nc = conn.nc
    assert nc is not None
    token = trio.lowlevel.current_trio_token()
    decoder = msgspec.msgpack.Decoder(list[int])

    async def on_notice(msg: object) -> None:
        subject: str = msg.subject  # type: ignore[attr-defined]
        _, namespace, target = subject.split(".", 2)
        try:
            sequences = decoder.decode(msg.data)  # type: ignore[attr-defined]
        except msgspec.DecodeError:
            return
        try:
            token.run_sync_soon(tracker.applied, namespace, target, sequences)
        except trio.RunFinishedError:
            pass

    async def subscribe() -> None:
        for namespace in namespaces:
            await nc.subscribe(f"walapplied.{namespace}.*", cb=on_notice)

    await conn.bridge.run(subscribe)
