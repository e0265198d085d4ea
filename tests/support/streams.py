"""Read a stream back in tests, with nats-py on a throwaway asyncio loop in a worker thread."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import nats
import trio

from sidecar import envelope


@dataclass
class StoredMessage:
    """One stored entry: a message, or one entry of a pack (then `index` is its place in it, `data`
    the entry alone, and the pack's other entries are StoredMessages with the same `seq`)."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes
    time_ns: int
    index: int = -1

    def entry(self) -> envelope.Entry:
        return envelope.decode(self.data)


def _stored(seq: int, subject: str, headers: dict[str, str], data: bytes, time_ns: int) -> list[StoredMessage]:
    if not envelope.is_pack(data):
        return [StoredMessage(seq, subject, headers, data, time_ns)]
    return [StoredMessage(seq, subject, headers, envelope.encode(entry), time_ns, index)
            for index, entry in enumerate(envelope.decode_message(data))]


async def _read_all(nats_url: str, stream: str, subject: str | None) -> list[StoredMessage]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        if info.state.messages == 0:
            return []
        filter_subject = subject or ">"
        sub = await js.pull_subscribe(filter_subject, stream=stream)
        out: list[StoredMessage] = []
        try:
            # The consumer knows how many messages match at creation: fetch exactly those.
            expected = (await sub.consumer_info()).num_pending
            fetched = 0
            while fetched < expected:
                try:
                    batch = await sub.fetch(min(1000, expected - fetched), timeout=5.0)
                except nats.errors.TimeoutError:
                    break
                fetched += len(batch)
                for msg in batch:
                    meta = msg.metadata
                    out += _stored(meta.sequence.stream, msg.subject, dict(msg.headers or {}), msg.data,
                                   int(meta.timestamp.timestamp() * 1e9))
                    await msg.ack()
        finally:
            await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def read_stream(nats_url: str, stream: str, subject: str | None = None) -> list[StoredMessage]:
    return await trio.to_thread.run_sync(lambda: asyncio.run(_read_all(nats_url, stream, subject)))


async def _api(nats_url: str, subject: str, body: dict[str, Any] | None) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request(f"$JS.API.{subject}", json.dumps(body).encode() if body else b"", timeout=5)
        return json.loads(reply.data)
    finally:
        await nc.close()


async def js_api(nats_url: str, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    return await trio.to_thread.run_sync(lambda: asyncio.run(_api(nats_url, subject, body)))


async def stream_state(nats_url: str, stream: str) -> dict[str, Any]:
    return (await js_api(nats_url, f"STREAM.INFO.{stream}"))["state"]


async def _stream_names(nats_url: str) -> set[str]:
    nc = await nats.connect(nats_url)
    try:
        names: set[str] = set()
        while True:
            reply = await nc.request("$JS.API.STREAM.NAMES", json.dumps({"offset": len(names)}).encode(), timeout=10)
            page = json.loads(reply.data)
            names.update(page.get("streams") or [])
            if not page.get("streams") or len(names) >= int(page.get("total", 0)):
                return names
    finally:
        await nc.close()


async def _remove_streams(nats_url: str, names: set[str]) -> None:
    nc = await nats.connect(nats_url)
    try:
        for name in sorted(names):
            await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=10)
    finally:
        await nc.close()


def stream_names(nats_url: str) -> set[str]:
    """Every stream on the server (journals, DLQs, chunk stores, KV buckets); blocking."""
    return asyncio.run(_stream_names(nats_url))


def remove_streams(nats_url: str, names: set[str]) -> None:
    """Blocking; streams already gone are skipped (the server answers an error, not raised)."""
    asyncio.run(_remove_streams(nats_url, names))
