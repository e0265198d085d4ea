"""What the drain needs of NATS, and nothing more: the drain is handed these, not the journal's writer.

The trio link (sidecar.log.link.NatsLink) carries the hot path: pull requests and their
deliveries, acks and +WPI, applied notices. JetStream API calls (consumers, stream
lookups) go over the journal's connection (sidecar.log.connection.NatsConnection), which
also owns the link. Both are described structurally, so the NATS wire format stays in
sidecar/log/ and a unit test can hand the drain something smaller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from sidecar.log.link import MessageHandler, Timer


class DrainLink(Protocol):
    connected: bool
    max_payload: int  # the server's limit for one message
    on_lost: list[Callable[[str], None]]
    on_connected: list[Callable[[], None]]

    def publish(self, subject: str, payload: bytes, reply: str = "") -> bool: ...

    def publish_to_each(self, subjects: list[bytes], payload: bytes) -> bool: ...

    def subscribe(self, subject: str, handler: MessageHandler) -> int: ...

    def unsubscribe(self, sid: int) -> None: ...

    def after_read(self, fn: Callable[[], None]) -> None: ...

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer: ...


class JetStreamApi(Protocol):
    async def js_api(self, subject: str, body: dict[str, Any] | None = None,
                     timeout: float = 5.0) -> dict[str, Any]: ...


class DrainNats(JetStreamApi, Protocol):
    @property
    def link(self) -> DrainLink | None:
        """None until the journal opened it (open_journal does)."""
