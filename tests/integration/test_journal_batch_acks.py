"""What a JetStream fast-ingest batch (ADR-50, `allow_batched`) acknowledges, against the real server.

The journal writer could use fast-ingest batches for its group commits (one acknowledgement
per group instead of one PubAck per write) only if every write still learned what its PubAck
tells it today: stored or not, its stream sequence, and whether it was a duplicate of an
earlier write with the same `Nats-Msg-Id`. These tests pin down what the server (>= 2.14)
actually answers, so the decision in docs/benchmarks.md ("Journal acknowledgements") can be
checked against the installed nats-server:

- a flow ack names a *batch* sequence only (`{"type":"ack","seq":n,"msgs":k}`): in `gap: fail`
  mode "messages 1..n are stored", but no stream sequence of any of them;
- the final PubAck names the last stored stream sequence and the batch's message count;
- a `Nats-Msg-Id` seen before is still stored once, but inside the batch it is skipped without a
  word: the flow ack covers it like a stored message, and nothing says "duplicate" or names the
  sequence the earlier copy has;
- a message that fails a check in `gap: fail` mode ends the batch: the error comes as a
  `BatchFlowErr`, and the messages sent after it are dropped, the final PubAck's count saying
  how many were taken.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from sidecar.log.link import NatsLink, new_inbox
from sidecar.log.wire import encode_publish
from tests.support.services import Services
from tests.support.streams import js_api, read_stream
from tests.support.waiting import until

APPEND, COMMIT = 1, 2  # ADR-50's fast-ingest operations in the reply subject (0 starts a batch)


class FastBatch:
    """A fast-ingest batch in `gap: fail` mode over a link, every reply kept in arrival order."""

    def __init__(self, link: NatsLink, flow: int = 1) -> None:
        self.link = link
        self.prefix = new_inbox()
        self.batch_id = self.prefix.rsplit(".", 1)[-1]
        self.flow = flow
        self.sequence = 0
        self.replies: list[dict[str, Any]] = []
        link.subscribe(f"{self.prefix}.>", lambda subject, reply, data, headers: self.replies.append(json.loads(data)))

    def send(self, subject: str, payload: bytes, headers: dict[str, str] | None = None, commit: bool = False) -> None:
        self.sequence += 1
        operation = COMMIT if commit else (0 if self.sequence == 1 else APPEND)
        reply = f"{self.prefix}.{self.flow}.fail.{self.sequence}.{operation}.$FI"
        self.link.send(encode_publish(subject, reply.encode(), headers, payload))

    def final_ack(self) -> dict[str, Any] | None:
        return next((r for r in self.replies if "type" not in r), None)


async def _stream(services: Services, name: str, subjects: list[str]) -> None:
    created = await js_api(services.nats_url, f"STREAM.CREATE.{name}", {
        "name": name, "subjects": subjects, "storage": "file", "allow_batched": True,
        "duplicate_window": 120_000_000_000,
    })
    assert "error" not in created, created


async def _with_link(services: Services, body: Any) -> None:
    link = NatsLink(services.nats_url, name="test-fast-batch")
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await until(lambda: link.connected, 5, "the link to connect")
        try:
            await body(link)
        finally:
            nursery.cancel_scope.cancel()


async def test_flow_acks_name_batch_sequences_not_stream_sequences(services: Services, unique: str) -> None:
    stream, subject = f"FAST_{unique.upper()}", f"fast.{unique}.a"
    await _stream(services, stream, [f"fast.{unique}.>"])
    async def body(link: NatsLink) -> None:
        link.send(encode_publish(subject, b"", None, b"someone else's"))  # stream and batch sequences differ
        batch = FastBatch(link, flow=1)
        await trio.sleep(0.2)  # the SUB reaches the server first
        for n in range(1, 4):
            batch.send(subject, b"m%d" % n)
        batch.send(subject, b"m4", commit=True)
        await until(lambda: batch.final_ack() is not None, 5, "the final PubAck")
        flow = [r for r in batch.replies if r.get("type") == "ack"]
        # The first message is answered with the flow settings (seq 0), then one ack per message.
        assert flow[0] == {"type": "ack", "seq": 0, "msgs": 1}
        assert [r["seq"] for r in flow[1:]] == [1, 2, 3]
        assert all(set(r) == {"type", "seq", "msgs"} for r in flow)  # no stream, no stream sequence
        final = batch.final_ack()
        assert final == {"stream": stream, "seq": 5, "batch": batch.batch_id, "count": 4}

    await _with_link(services, body)
    stored = await read_stream(services.nats_url, stream)
    assert [m.data for m in stored] == [b"someone else's", b"m1", b"m2", b"m3", b"m4"]


async def test_a_duplicate_msg_id_in_a_batch_is_skipped_without_saying_so(services: Services, unique: str) -> None:
    stream, subject = f"FAST_{unique.upper()}", f"fast.{unique}.a"
    await _stream(services, stream, [f"fast.{unique}.>"])

    async def body(link: NatsLink) -> None:
        link.send(encode_publish(subject, b"", {"Nats-Msg-Id": "retried"}, b"first try"))
        batch = FastBatch(link, flow=1)
        await trio.sleep(0.2)
        batch.send(subject, b"new", {"Nats-Msg-Id": "new-1"})
        batch.send(subject, b"retry", {"Nats-Msg-Id": "retried"})  # an idempotent retry of the first write
        batch.send(subject, b"newer", {"Nats-Msg-Id": "new-2"}, commit=True)
        await until(lambda: batch.final_ack() is not None, 5, "the final PubAck")
        flow = [r for r in batch.replies if r.get("type") == "ack"]
        # Message 2 (the duplicate) is acknowledged like message 1: nothing says it was not stored.
        assert [r["seq"] for r in flow] == [0, 1, 2]
        assert not any(r.get("type") in ("err", "gap") for r in batch.replies)
        final = batch.final_ack()
        assert final is not None and "duplicate" not in final
        assert (final["seq"], final["count"]) == (3, 3)  # stream seq 3 for batch message 3: one was skipped

    await _with_link(services, body)
    stored = await read_stream(services.nats_url, stream)
    assert [m.data for m in stored] == [b"first try", b"new", b"newer"]  # de-duplication still holds


async def test_a_failing_message_ends_a_gap_fail_batch(services: Services, unique: str) -> None:
    stream, subject = f"FAST_{unique.upper()}", f"fast.{unique}.a"
    await _stream(services, stream, [f"fast.{unique}.>"])

    async def body(link: NatsLink) -> None:
        batch = FastBatch(link, flow=1)
        await trio.sleep(0.2)
        batch.send(subject, b"m1")
        batch.send(subject, b"m2", {"Nats-Expected-Last-Subject-Sequence": "99"})  # fails its check
        batch.send(subject, b"m3")
        batch.send(subject, b"m4", commit=True)
        await until(lambda: batch.final_ack() is not None, 5, "the final PubAck")
        errors = [r for r in batch.replies if r.get("type") == "err"]
        assert [e["seq"] for e in errors] == [2]
        assert errors[0]["error"]["err_code"] == 10071  # wrong last sequence
        final = batch.final_ack()
        assert final is not None and (final["seq"], final["count"]) == (1, 1)  # only m1 was taken

    await _with_link(services, body)
    stored = await read_stream(services.nats_url, stream)
    assert [m.data for m in stored] == [b"m1"]  # m3 and m4, sent after the failure, are dropped
