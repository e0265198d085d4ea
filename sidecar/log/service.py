"""Open the journal for a config: NATS thread, connection, streams, writer, chunk store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from sidecar.config import Config
from sidecar.log.bridge import AsyncioBridge
from sidecar.log.chunks import ChunkStore
from sidecar.log.connection import NatsConnection
from sidecar.log.journal import Journal
from sidecar.log.link import NatsLink
from sidecar.log.options import NatsOptions
from sidecar.log.streams import provision_namespace
from sidecar.log.writer import JournalWriter
from sidecar.logs import get_logger

log = get_logger("journal")


async def provision_all(conn: NatsConnection, config: Config) -> None:
    for name, ns in config.namespaces.items():
        await provision_namespace(conn, name, ns)


@asynccontextmanager
async def open_connection(config: Config, name: str = "walcar", connect_retry: float = 0.0
                          ) -> AsyncIterator[NatsConnection]:
    """Just the nats-py connection (and its thread): for tools that manage, not journal (`walcar ns`)."""
    bridge = AsyncioBridge().start()
    conn = NatsConnection(bridge, config.sidecar.nats_url, config.sidecar.nats_creds, name=name)
    try:
        await conn.connect(retry_for=connect_retry)
        yield conn
    finally:
        await conn.close()
        bridge.close()


@asynccontextmanager
async def open_journal(
    config: Config, connect_retry: float = 0.0, name: str = "walcar", provision: bool = True,
) -> AsyncIterator[Journal]:
    """`provision=False` for tools that only read (replay, verify): streams are used as they are,
    never created or changed by a config that may differ from the running sidecars'."""
    options = NatsOptions.from_settings(config.sidecar)  # a bad TLS or secret file stops here, named
    bridge = AsyncioBridge().start()
    conn = NatsConnection(bridge, options.url, name=name, options=options)
    try:
        await conn.connect(retry_for=connect_retry)
        if provision:
            await provision_all(conn, config)

            async def reprovision() -> None:
                try:
                    await provision_all(conn, config)
                except Exception as exc:  # keep running: writes answer false until the stream is back
                    log.error("reprovision_failed", error=str(exc))

            conn.on_reconnect(reprovision)
        writer = JournalWriter(conn, config.sidecar.journal)
        conn.link = NatsLink.from_options(options, name=f"{name}-link")
        async with trio.open_nursery() as nursery:
            conn.attach(nursery)
            await nursery.start(conn.link.run)
            await writer.start(nursery)
            journal = Journal(config, writer, ChunkStore(conn))
            try:
                yield journal
            finally:
                writer.close()
                with trio.move_on_after(config.sidecar.journal.publish_timeout + 1):
                    await writer.drain()
                nursery.cancel_scope.cancel()
    finally:
        await conn.close()
        bridge.close()
