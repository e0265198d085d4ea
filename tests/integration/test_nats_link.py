"""The sidecar's trio NATS link against a real nats-server: messages, a restart, timers, refusals."""

from __future__ import annotations

import time

import pytest
import trio

from sidecar.log.link import NatsLink
from sidecar.log.wire import encode_publish
from tests.support.procs import NatsProcess
from tests.support.waiting import until


async def test_a_subscription_outlives_a_server_restart(private_nats: NatsProcess) -> None:
    link = NatsLink(private_nats.url, name="test-link")
    sender = NatsLink(private_nats.url, name="test-sender")  # a link does not hear its own messages (echo off)
    received: list[tuple[bytes, bytes]] = []
    events: list[str] = []
    link.on_lost.append(lambda reason: events.append("lost"))
    link.on_connected.append(lambda: events.append("connected"))
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await nursery.start(sender.run)
        await until(lambda: link.connected and sender.connected, 5, "the links to connect")
        link.subscribe("probe.*", lambda subject, reply, payload, headers: received.append((subject, payload)))
        await trio.sleep(0.2)  # the SUB reaches the server before the message does
        sender.send(encode_publish("probe.a", b"", None, b"one"))
        await until(lambda: len(received) == 1, 5, "the first message")

        await trio.to_thread.run_sync(private_nats.kill)
        await until(lambda: not link.connected, 15, "the link to notice the server is gone")
        assert link.send(b"PING\r\n") is False  # nothing is queued for a connection that is not there
        await trio.to_thread.run_sync(private_nats.start)
        await until(lambda: link.connected and sender.connected, 15, "the links to reconnect by themselves")
        await trio.sleep(0.2)
        sender.send(encode_publish("probe.b", b"", None, b"two"))
        await until(lambda: len(received) == 2, 5, "a message after the restart (the subscription renewed)")
        nursery.cancel_scope.cancel()
    assert received == [(b"probe.a", b"one"), (b"probe.b", b"two")]
    assert events == ["connected", "lost", "connected"]


async def test_replies_reach_the_handler_with_their_status(private_nats: NatsProcess) -> None:
    """A request to a subject nobody serves is answered by the server with an inline 503."""
    link = NatsLink(private_nats.url)
    replies: list[bytes | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await until(lambda: link.connected, 5, "the link to connect")
        link.subscribe("_INBOX.t.*", lambda subject, reply, payload, headers: replies.append(headers))
        link.send(encode_publish("nobody.listens", b"_INBOX.t.1", None, b"?"))
        await until(lambda: replies, 5, "the no-responders reply")
        nursery.cancel_scope.cancel()
    assert replies[0] is not None and replies[0].startswith(b"NATS/1.0 503")


async def test_a_handler_can_gather_what_one_read_brought_and_pass_it_on_as_one_batch(
        private_nats: NatsProcess) -> None:
    """The drain's pull consumers hand deliveries to their partition in batches this way: every
    message arrives exactly once and in order, and a burst arrives in far fewer batches than messages."""
    link = NatsLink(private_nats.url, name="test-link")
    sender = NatsLink(private_nats.url, name="test-sender")
    gathered: list[bytes] = []
    batches: list[list[bytes]] = []

    def hand_over() -> None:
        batches.append(gathered.copy())
        gathered.clear()

    def on_message(subject: bytes, reply: bytes, payload: bytes, headers: bytes | None) -> None:
        if not gathered:
            link.after_read(hand_over)
        gathered.append(payload)

    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await nursery.start(sender.run)
        await until(lambda: link.connected and sender.connected, 5, "the links to connect")
        link.subscribe("burst", on_message)
        await trio.sleep(0.2)
        sender.send(b"".join(encode_publish("burst", b"", None, b"%d" % i) for i in range(2000)))
        await until(lambda: sum(len(b) for b in batches) == 2000, 5, "the whole burst")
        nursery.cancel_scope.cancel()
    assert [payload for batch in batches for payload in batch] == [b"%d" % i for i in range(2000)]
    assert all(batches) and len(batches) < 200
    assert gathered == []


async def test_timers_fire_in_order_and_cancelled_ones_do_not(private_nats: NatsProcess) -> None:
    link = NatsLink(private_nats.url)
    fired: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        began = time.monotonic()
        link.call_later(0.3, lambda: fired.append("late"))
        link.call_later(0.1, lambda: fired.append("early"))
        link.call_later(0.2, lambda: fired.append("cancelled")).cancel()
        await until(lambda: len(fired) == 2, 5, "the timers")
        assert time.monotonic() - began >= 0.3
        nursery.cancel_scope.cancel()
    assert fired == ["early", "late"]


async def test_bad_credentials_are_reported_not_retried_silently(services, tmp_path) -> None:
    secured = NatsProcess(tmp_path / "secured", extra_args=["--user", "walcar", "--pass", "right"])
    secured.start()
    try:
        host_port = secured.url.split("://", 1)[1]
        wrong = NatsLink(f"nats://walcar:wrong@{host_port}")
        right = NatsLink(f"nats://walcar:right@{host_port}")
        async with trio.open_nursery() as nursery:
            await nursery.start(wrong.run)
            await nursery.start(right.run)
            await until(lambda: right.connected and "Authorization Violation" in wrong.last_error, 10,
                        "one link in, the other refused")
            assert not wrong.connected
            nursery.cancel_scope.cancel()
    finally:
        secured.stop()


@pytest.mark.parametrize("url", ["ws://127.0.0.1:1", "nats://127.0.0.1:1,http://x"])
def test_unsupported_urls_are_refused_up_front(url: str) -> None:
    with pytest.raises(ValueError, match="scheme"):
        NatsLink(url)
