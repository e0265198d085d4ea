"""Packs: entries of one partition queued in the same group commit share one JetStream message.

Against the real nats-server: what the writer packs and what it never packs, the order a key keeps,
that a client's idempotency token is still deduplicated, and that the drain applies, dead-letters
and acks a pack's entries one by one, each with its own dead letter.
"""

from __future__ import annotations

import trio

from sidecar.config import stream_name
from sidecar.envelope import Entry, Op, is_pack, new_id, now_us
from sidecar.log.service import open_journal
from sidecar.log.streams import dlq_stream_name
from sidecar.replay.reader import JournalReader
from tests.support.httpapp import RecordingApp, served
from tests.support.services import Services
from tests.support.sidecar import build_config, running_sidecar, sidecar_document
from tests.support.streams import js_api, read_stream, stream_state
from tests.support.waiting import until


def entry(namespace: str, key: str, value: str, partition: int = 0) -> Entry:
    return Entry(id=new_id(), ns=namespace, op=Op.PUT, key=key, partition=partition, value=value.encode(),
                 write_time=now_us())


async def journal_together(journal, entries: list[Entry], packable: bool = True) -> list:
    """Each entry from its own task, all queued in one scheduling round: one group commit."""
    results: list = [None] * len(entries)

    async def one(index: int) -> None:
        results[index] = await journal.append(entries[index], packable)

    async with trio.open_nursery() as nursery:
        for index in range(len(entries)):
            nursery.start_soon(one, index)
    return results


async def test_one_group_commit_of_a_partition_is_one_message_and_a_key_keeps_its_order(
        services: Services, unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 2}}))
    writes = [entry(unique, f"k{i % 10}", f"v{i}", partition=i % 2) for i in range(30)]
    async with open_journal(config) as journal:  # in this order, in one group commit
        results = await journal.writer.publish_many([journal.message_for(w, packable=True) for w in writes])
        stats = journal.writer.stats
        # Counted as the 30 writes they are (metrics, memcached `stats`), and their in-flight room freed.
        assert (stats.acked, stats.inflight_entries, stats.inflight_bytes) == (30, 0, 0)
    assert all(r.ok for r in results), results
    # Partition 0 holds k0, k2, ..., k8 three times each: three packs of five keys, one per round of keys.
    pairs = list(zip(writes, results, strict=True))
    by_partition = [sorted({r.sequence for w, r in pairs if w.partition == p}) for p in (0, 1)]
    assert [len(seqs) for seqs in by_partition] == [3, 3]
    for index, result in enumerate(results):  # a key's later write is in a later message
        earlier = [r.sequence for w, r in pairs[:index] if w.key == writes[index].key]
        assert all(seq < result.sequence for seq in earlier)
    state = await stream_state(services.nats_url, stream_name(unique))
    assert state["messages"] == 6
    stored = await read_stream(services.nats_url, stream_name(unique))
    assert sorted(m.entry().value for m in stored) == sorted(w.value for w in writes)
    per_key: dict[str, list[bytes | None]] = {}
    for message in sorted(stored, key=lambda m: m.seq):
        per_key.setdefault(message.entry().key, []).append(message.entry().value)
    assert per_key == {f"k{k}": [f"v{i}".encode() for i in range(k, 30, 10)] for k in range(10)}
    assert all("Nats-Msg-Id" not in m.headers for m in stored)

    # The replay reader gives every entry of a pack, each with the pack's sequence.
    async with open_journal(config, provision=False) as journal:
        reader = JournalReader(journal.writer.conn, unique, config.namespaces[unique])
        seen = []
        async with reader.read(await reader.resolve(None, None, now_us() * 1000), 100) as batches:
            async for batch in batches:
                seen += [(item.seq, item.entry.key, item.entry.seq) for item in batch if item.entry is not None]
    assert sorted(key for _, key, _ in seen) == sorted(w.key for w in writes)
    assert {seq for seq, _, _ in seen} == set(by_partition[0] + by_partition[1])
    assert all(seq == entry_seq for seq, _, entry_seq in seen)


async def test_entries_that_must_go_alone_keep_their_message_and_their_id(services: Services, unique: str) -> None:
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 1}}))
    tokened = entry(unique, "t", "token")
    tokened.id = f"client-token-{unique}"
    async with open_journal(config) as journal:
        first = await journal_together(journal, [entry(unique, f"a{i}", "x") for i in range(5)] + [tokened],
                                       packable=True)
        # Not packable (a client's token): its own message, deduplicated by its id as before.
        alone = await journal_together(journal, [tokened], packable=False)
        again = await journal_together(journal, [tokened], packable=False)
    assert all(r.ok for r in first)
    assert alone[0].ok and not alone[0].duplicate
    assert again[0].ok and again[0].duplicate and again[0].sequence == alone[0].sequence
    stored = await read_stream(services.nats_url, stream_name(unique))
    single = [m for m in stored if m.index < 0]
    assert [m.headers.get("Nats-Msg-Id") for m in single] == [tokened.id]


async def test_a_go_alone_write_follows_the_pack_before_it(services: Services, unique: str) -> None:
    """A key's earlier write in a pack, its later one alone (a token): stored in that order."""
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 1}}))
    async with open_journal(config) as journal:
        writer = journal.writer
        early = [journal.message_for(entry(unique, f"k{i}", "early"), packable=True) for i in range(3)]
        late = journal.message_for(entry(unique, "k1", "late"), packable=False)
        results = await writer.publish_many([*early, late])
    assert all(r.ok for r in results)
    assert len({r.sequence for r in results[:3]}) == 1 and results[3].sequence > results[0].sequence
    raw = await js_api(services.nats_url, f"STREAM.MSG.GET.{stream_name(unique)}", {"seq": results[0].sequence})
    assert raw["message"]["subject"] == f"wal.{unique}.0"


async def test_the_drain_settles_a_packs_entries_one_by_one(services: Services, unique: str) -> None:
    """One entry of a pack refused for good: it alone is dead-lettered (its own letter, its own id), the
    others are applied, and the message is acked once all are settled."""
    app = RecordingApp(refuse={"poison": 422, "toxic": 422})
    async with served(app) as server:
        target = {"name": "app", "type": "http", "url": f"{server.url}/apply/{{namespace}}/{{key}}"}
        config = build_config(sidecar_document(
            services.nats_url, {unique: {"partitions": 1, "targets": [target],
                                         "retry": {"initial_delay": "20ms", "max_attempts": 3}}},
            drain={"lease_ttl": "2s", "ack_wait": "10s"}))
        async with running_sidecar(config) as sidecar:
            ingress = sidecar.ingress
            keys = ["a", "poison", "b", "toxic", "c"]

            async def write(key: str) -> None:
                ack = await ingress.write(ingress.entry(unique, Op.PUT, key, value=key.encode()), packable=True)
                sequences[key] = ack.sequence

            sequences: dict[str, int] = {}
            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(write, key)
            assert len(set(sequences.values())) == 1  # one message
            drainer = sidecar.drain.drainer(unique, "app")
            await until(lambda: drainer.stats.dead_lettered == 2 and drainer.stats.applied == 3, 30,
                        "the pack's entries settled")
            consumer = f"CONSUMER.INFO.{stream_name(unique)}.drain-app-0"
            info = await js_api(services.nats_url, consumer)
            for _ in range(50):
                if info["num_ack_pending"] == 0:
                    break
                await trio.sleep(0.1)
                info = await js_api(services.nats_url, consumer)
            assert info["num_ack_pending"] == 0 and info["ack_floor"]["stream_seq"] >= sequences["a"]
    assert {key: values for key, values in app.applied.items()} == {"a": [b"a"], "b": [b"b"], "c": [b"c"]}
    letters = await read_stream(services.nats_url, dlq_stream_name(unique))
    assert sorted(letter.entry().key for letter in letters) == ["poison", "toxic"]
    assert all(not is_pack(letter.data) and letter.entry().seq == 0 for letter in letters)
    seq = sequences["a"]
    places = {m.entry().key: m.index for m in await read_stream(services.nats_url, stream_name(unique))}
    for letter in letters:  # each letter names its entry's place in the pack, and has an id of its own
        index = places[letter.entry().key]
        assert letter.headers["Nats-Msg-Id"] == f"dlq.app.{seq}.{index}"
        assert letter.headers["Walcar-Original-Index"] == str(index)


async def test_pack_entries_1_writes_one_entry_a_message(services: Services, unique: str) -> None:
    """What a sidecar rolling out over versions without packs runs with (operations.md)."""
    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 1}},
                                           journal={"pack_entries": 1}))
    writes = [entry(unique, f"k{i}", "v") for i in range(10)]
    async with open_journal(config) as journal:
        results = await journal.writer.publish_many([journal.message_for(w, packable=True) for w in writes])
    assert len({r.sequence for r in results}) == 10
    stored = await read_stream(services.nats_url, stream_name(unique))
    assert len(stored) == 10 and all(m.index < 0 and m.headers["Nats-Msg-Id"] for m in stored)


async def test_dlq_replay_journals_each_entry_of_a_letter_that_holds_a_pack(services: Services, unique: str) -> None:
    """What a sidecar that cannot read packs leaves (it dead-letters a pack as undecodable): replayed
    from a sidecar that can, each entry is journaled again, addressed to the target that failed it."""
    from sidecar.admin.dlq import DeadLetters, DlqFilter
    from sidecar.drain.dlq import dlq_subject
    from sidecar.envelope import encode, pack_payload

    config = build_config(sidecar_document(services.nats_url, {unique: {"partitions": 1}}))
    entries = [entry(unique, f"k{i}", f"v{i}") for i in range(3)]
    async with open_journal(config) as journal:
        letter = await journal.writer.publish(
            dlq_subject(unique, "cache", "undecodable-7"), pack_payload([encode(e) for e in entries]),
            {"Nats-Msg-Id": "dlq.cache.7", "Walcar-Target": "cache", "Walcar-Original-Seq": "7",
             "Walcar-Key": "undecodable-7"})
        assert letter.ok
        letters = DeadLetters(journal.writer.conn, journal.writer)
        [shown] = await letters.list(unique, DlqFilter(), with_entry=True)
        assert [e["key"] for e in shown.entry["pack"]] == ["k0", "k1", "k2"]  # type: ignore[index]
        result = await letters.replay(unique, DlqFilter())
    assert len(result["replayed"]) == 1 and not result["failed"]
    stored = [m.entry() for m in await read_stream(services.nats_url, stream_name(unique))]
    assert [(e.key, e.value, e.targets) for e in stored] == [(f"k{i}", f"v{i}".encode(), ["cache"]) for i in range(3)]
    assert await read_stream(services.nats_url, dlq_stream_name(unique)) == []
