"""The `kafka` target: every entry produced to a topic other systems consume.

A record per entry: key = the entry's key (so Kafka's key partitioning keeps a key in
one partition, in order), value = the payload, headers `walcar-id` (dedupe by it),
`walcar-write-time`, `walcar-op`, `walcar-origin`, `walcar-seq` (and `walcar-item`,
`walcar-content-type`, `walcar-expires-at` when set). A record delete is a tombstone
(null value) or, with `deletes = "header"`, an empty value whose `walcar-op` says
delete; an item delete always takes the header form (a tombstone would drop the
whole key from a compacted topic).

The producer is confluent-kafka (librdkafka): idempotent, `acks=all`, murmur2 key
partitioning (what Java clients use). It is chosen over aiokafka by measurement
(docs/benchmarks.md: ~2.6x the throughput on the same broker) and because its
callback threads bridge to trio the way cassandra-driver's do, where aiokafka would
need an asyncio loop of its own. librdkafka retries what is retriable inside
`timeout`; a delivery that still fails is reported per entry:

- permanent (dead-lettered): record too large (checked before sending, against max_message_size
  and the topic's max.message.bytes), authorization, unknown topic, invalid record
- transient, the topic's limit read again: a batch the broker refuses as too large
- unavailable (breaker; never dead-lettered): timed out, transport, all brokers down
- transient (retried, counted): anything else

A run's entries are produced together: the idempotent producer keeps them in order
in their partition. With `ordering = "partition"` (the default) a run is a whole journal
partition's entries in stream order, of many keys (`ordered`, base.py); with "key", one
key's. When one fails, those after it may already be in the topic and are produced again on
the retry: a key's last record is always its last entry, and a
consumer that must see each entry once dedupes by `walcar-id` (at-least-once).

Everything runs on the trio thread: produce() only queues, and an apply call polls the
producer (poll(0), never blocking) every millisecond until its last delivery is in, so
the delivery callbacks run here too. A poll thread would make every report batch wait
for the GIL behind the drain (the switch interval is 5 ms): measured, it drained at a
sixth of the rate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import trio

from sidecar.config import KafkaTarget as KafkaSettings
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome, addressed_to
from sidecar.envelope import Entry, Op
from sidecar.logs import get_logger

try:
    from confluent_kafka import KafkaError, KafkaException, Producer
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("the kafka target needs confluent-kafka: pip install 'walcar[kafka]'") from exc

log = get_logger("drain.kafka")

APPLIES = frozenset({Op.PUT, Op.DELETE, Op.TOUCH})
PERMANENT = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION,
    KafkaError.INVALID_RECORD, KafkaError.TOPIC_EXCEPTION,
    KafkaError.POLICY_VIOLATION, KafkaError._INVALID_ARG,
})
UNAVAILABLE = frozenset({
    KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
    KafkaError._RESOLVE, KafkaError.NETWORK_EXCEPTION, KafkaError.LEADER_NOT_AVAILABLE,
})


def classify(error: KafkaError) -> ErrorClass:
    if error.code() in PERMANENT:
        return ErrorClass.PERMANENT
    if error.code() in UNAVAILABLE:
        return ErrorClass.UNAVAILABLE
    return ErrorClass.TRANSIENT


def _apply_error(error: KafkaError) -> ApplyError:
    return ApplyError(classify(error), f"kafka: {error.name()}: {error.str()}")


# The broker refuses a record *batch* as too large: the records batched with a large one fail with it,
# though each fits alone. A delivery report of it is retried (transient), after reading the topic's
# max.message.bytes again (a record over it is then dead-lettered before it is sent, alone).
BATCH_TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
RECORD_OVERHEAD = 256  # bytes of a record's framing and its batch's header, with room to spare


def framing(size: int) -> int:
    """What a record or batch of `size` bytes may grow by on the way: framing, and lz4/zstd on bytes that do
    not compress (~1/255 more, with room)."""
    return RECORD_OVERHEAD + size // 128


def _delivery_error(error: KafkaError) -> ApplyError:
    if error.code() in BATCH_TOO_LARGE:
        return ApplyError(ErrorClass.TRANSIENT, f"kafka: {error.name()}: {error.str()} (its batch was; retried)")
    return _apply_error(error)


_OPS = {op: op.value.encode() for op in Op}


def record(entry: Entry, deletes: str) -> tuple[bytes | None, dict[str, bytes]]:
    """(value, headers) of an entry's record; a None value is a tombstone."""
    headers = {"walcar-id": entry.id.encode(), "walcar-write-time": b"%d" % entry.write_time,
               "walcar-op": _OPS[entry.op], "walcar-origin": entry.origin.encode(), "walcar-seq": b"%d" % entry.seq}
    if entry.item:
        headers["walcar-item"] = entry.item.encode("utf-8", "surrogateescape")
    if entry.content_type:
        headers["walcar-content-type"] = entry.content_type.encode()
    if entry.expires_at:
        headers["walcar-expires-at"] = b"%d" % entry.expires_at
    op = entry.op
    if op is Op.PUT:
        return entry.value or b"", headers
    if op is Op.DELETE:
        return (None if deletes == "tombstone" and not entry.item else b""), headers
    return b"", headers  # a touch: its expiry is in the headers


class _Round:
    """One apply call's deliveries, counted down by the delivery callbacks.

    Its records share one callback (`delivered`), which learns a failed record's key, not its place: a
    closure per record, alive until its report, made the cyclic GC walk them all (~3 us a record,
    docs/benchmarks.md). `place` puts each failure back on its key's records; where that is ambiguous,
    the key's records get a callback each in the next calls (`callback`) until one places it."""

    __slots__ = ("failures", "pending", "reports", "too_large")

    def __init__(self) -> None:
        self.pending = 0
        self.failures: dict[tuple[int, int], ApplyError] = {}  # (run, position) -> why it did not land
        self.reports: list[tuple[bytes, KafkaError]] = []  # failed deliveries by key (the shared callback)
        self.too_large = False  # the broker refused a batch as too large: read the topic's limit again

    def delivered(self, error: KafkaError | None, message: Any) -> None:
        self.pending -= 1
        if error is not None:
            self.reports.append((message.key() or b"", error))
            self.too_large = self.too_large or error.code() in BATCH_TOO_LARGE

    def callback(self, index: int, position: int) -> Callable[[KafkaError | None, object], None]:
        def delivered(error: KafkaError | None, _message: object) -> None:
            if error is not None:
                self.failures[(index, position)] = _delivery_error(error)
                self.too_large = self.too_large or error.code() in BATCH_TOO_LARGE
            self.pending -= 1

        return delivered

    def place(self, runs: list[list[Entry]], sent: list[int]) -> set[bytes]:
        """Failures reported by key, placed on their records (`sent[i]`: how many of run i were produced);
        returns the keys that could not be placed exactly.

        A key whose every record in this call failed is exact. Otherwise each run holding the key stops
        at the key's first record there: early, never late (a retry produces again records that had
        landed, as after any failure), and a permanent error is retried instead of dead-lettering a
        record that may have landed."""
        failed = Counter(key for key, _ in self.reports)
        first_error = {key: error for key, error in reversed(self.reports)}
        places: dict[bytes, list[tuple[int, int]]] = {}
        for index, run in enumerate(runs):
            for position, entry in enumerate(run[:sent[index]]):
                key = entry.key.encode("utf-8", "surrogateescape")
                if key in failed and (index, position) not in self.failures:  # (failed when produced)
                    places.setdefault(key, []).append((index, position))
        ambiguous: set[bytes] = set()
        for key, where in places.items():
            error = _delivery_error(first_error[key])
            if len(where) != failed[key]:
                ambiguous.add(key)
                if error.error_class is ErrorClass.PERMANENT:
                    error = ApplyError(ErrorClass.TRANSIENT, f"{error.message} (retried to tell which record)")
                first_in_run: dict[int, tuple[int, int]] = {}
                for place in where:
                    first_in_run.setdefault(place[0], place)
                where = list(first_in_run.values())
            for place in where:
                self.failures.setdefault(place, error)
        return ambiguous


class KafkaTarget:
    # Keys in flight, fixed: the producer batches them itself and its latency is the linger and the broker's ack,
    # not a sign of overload (its queue, max_buffer, is the backpressure). The drain's default limit, which
    # shrinks as latency rises, held a round at a time in flight: a third of the rate (docs/benchmarks.md).
    limits: ClassVar[dict[str, int]] = {"initial": 4096, "minimum": 4096, "maximum": 4096}
    # A round waits on the linger and the broker's acks, not on this process: meanwhile a partition starts
    # rounds for its other ready keys (docs/benchmarks.md, Targets: 3.6k-14k -> 17k-21k entries/s drained).
    overlapping_rounds: ClassVar[int] = 4

    def __init__(self, settings: KafkaSettings, namespace: str) -> None:
        self.settings = settings
        self.name = settings.name
        self.topic = settings.topic.replace("{namespace}", namespace)
        self.producer: Any = None
        # The idempotent producer keeps what it is given in order within a Kafka partition, and a key stays in
        # one: a run may then be a whole journal partition's entries in stream order (`ordering`, base.py).
        self.ordered = settings.ordering == "partition"
        self._fatal = False
        self._exact_keys: set[bytes] = set()  # keys whose records get a callback each (a failure was ambiguous)
        self.topic_limit = 0  # the topic's max.message.bytes, read at start (0: not known)
        self._reading_limit = False  # a refused batch sent one call to read it again

    def _config(self) -> dict[str, Any]:
        settings = self.settings
        config: dict[str, Any] = {
            **settings.properties,
            "bootstrap.servers": ",".join(settings.bootstrap_servers),
            "client.id": f"walcar-{settings.name}",
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",  # the Java clients' key partitioning
            "linger.ms": float(settings.linger) * 1000,
            "compression.type": settings.compression,
            "message.timeout.ms": int(float(settings.timeout) * 1000),
            # A topic the cluster does not have fails as such (permanent) within half the timeout, instead of
            # timing out like a broker that is away (librdkafka's default waits 30 s, past the timeout).
            "topic.metadata.propagation.max.ms": max(1000, int(float(settings.timeout) * 500)),
            "message.max.bytes": int(settings.max_message_size) + 64 * 1024,  # room for the record's overhead
            "queue.buffering.max.kbytes": max(1, int(settings.max_buffer) // 1024),
        }
        if settings.password_file:  # read here, handed to librdkafka only: never logged
            config["sasl.password"] = Path(settings.password_file).read_text().strip()
        return config

    async def start(self) -> None:
        config = self._config()
        if self.settings.create_topic:
            try:
                await trio.to_thread.run_sync(self._create_topic, config)
            except KafkaException as exc:  # the drain keeps probing; entries are parked in the journal meanwhile
                log.warning("kafka_topic_not_created", target=self.name, topic=self.topic, error=str(exc))
        self.topic_limit = await self._topic_limit(config) or self.topic_limit
        self.producer = self._producer(config)

    def _producer(self, config: dict[str, Any]) -> Any:
        if self.topic_limit:  # no batch over what the topic takes
            config["message.max.bytes"] = max(1000, min(config["message.max.bytes"], self.topic_limit))
            config["batch.size"] = max(1, min(int(config.get("batch.size", 1_000_000)),
                                              config["message.max.bytes"] - framing(self.topic_limit)))
        return Producer({**config, "error_cb": self._client_error})

    async def _topic_limit(self, config: dict[str, Any]) -> int:
        """The topic's max.message.bytes, 0 when it cannot be read (broker away, DescribeConfigs denied)."""
        try:
            return await trio.to_thread.run_sync(self._read_topic_limit, config)
        except Exception as exc:  # a timeout is not a KafkaException
            log.warning("kafka_topic_limit_unknown", target=self.name, topic=self.topic, error=str(exc))
            return 0

    async def _renew(self) -> None:
        """A new producer in place of the old one (fatal, or the topic's limit changed). Calls under way keep
        polling the old one until their reports are in; this one polls it too, on the trio thread (where
        their callbacks must run), until it is empty or `timeout` passed."""
        old, self.producer = self.producer, self._producer(self._config())
        deadline = trio.current_time() + float(self.settings.timeout)
        while old is not None and len(old) and trio.current_time() < deadline:
            old.poll(0)
            await trio.sleep(0.005)

    async def _limit_changed(self) -> bool:
        """After a refused batch: read the topic's limit again; whether it changed (then renew)."""
        if self._reading_limit:
            return False
        self._reading_limit = True
        try:
            limit = await self._topic_limit(self._config())
        finally:
            self._reading_limit = False
        if not limit or limit == self.topic_limit:
            return False
        log.info("kafka_topic_limit_changed", target=self.name, topic=self.topic, was=self.topic_limit, now=limit)
        self.topic_limit = limit
        return True

    @staticmethod
    def _admin(config: dict[str, Any]) -> AdminClient:
        return AdminClient({k: v for k, v in config.items()
                            if k in ("bootstrap.servers", "client.id", "sasl.password") or
                            k.startswith(("security.", "sasl.", "ssl."))})

    def _read_topic_limit(self, config: dict[str, Any]) -> int:
        """The topic's max.message.bytes (the largest record batch it takes), 0 if it does not say."""
        resource = ConfigResource(ResourceType.TOPIC, self.topic)
        admin = self._admin(config)  # held until the result is in: its end cancels the request
        future = admin.describe_configs([resource])[resource]
        entry = future.result(timeout=min(5.0, float(self.settings.timeout))).get("max.message.bytes")
        return int(entry.value) if entry is not None and entry.value else 0

    def _create_topic(self, config: dict[str, Any]) -> None:
        admin = self._admin(config)
        future = admin.create_topics([NewTopic(self.topic, self.settings.partitions,
                                               self.settings.replication_factor)])[self.topic]
        try:
            future.result(timeout=float(self.settings.timeout))
            log.info("kafka_topic_created", target=self.name, topic=self.topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise

    def _client_error(self, error: KafkaError) -> None:
        """librdkafka's own errors (brokers down, ...): the deliveries say what matters, except a fatal one,
        after which the idempotent producer refuses everything: the next round starts a new one."""
        if error.fatal():
            log.error("kafka_fatal", target=self.name, error=error.str())
            self._fatal = True

    async def close(self) -> None:
        producer, self.producer = self.producer, None
        if producer is None:
            return
        await trio.to_thread.run_sync(lambda: producer.flush(float(self.settings.timeout)))

    def wants(self, entry: Entry) -> bool:
        # CQL statements are Cassandra's. (A MULTI is expanded by the drain, which asks about each entry inside.)
        return addressed_to(entry, self.name) and entry.op in APPLIES

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        assert self.producer is not None, "start() first"
        if self._fatal:
            self._fatal = False
            await self._renew()
        state = _Round()
        exact_keys = self._exact_keys
        exactly: set[bytes] = set()  # keys of exact_keys this call gives a callback per record
        shared = state.delivered  # one bound method for every record of the call
        # A record whose value, key, item and content type (at 4 bytes a character) come to no more than this fits
        # both limits, with the other headers (ids, times: under 1 KiB); a larger one is measured (`_oversize`).
        topic_limit = self.topic_limit or 1 << 62
        large = min(int(self.settings.max_message_size), topic_limit - framing(topic_limit) - 1024)
        deletes = self.settings.deletes
        producer, topic = self.producer, self.topic
        sent = [len(run) for run in runs]  # records produced of each run: it stops at one too large
        for index, run in enumerate(runs):
            for position, entry in enumerate(run):
                value, headers = record(entry, deletes)
                key = entry.key.encode("utf-8", "surrogateescape")
                size = len(value or b"") + len(key) + 4 * (len(entry.item) + len(entry.content_type))
                if size > large and (reason := self._oversize(value, key, headers)):
                    state.failures[(index, position)] = ApplyError(ErrorClass.PERMANENT, reason)
                    sent[index] = position
                    break  # the run stops here; its later entries wait for the next round
                if exact_keys and key in exact_keys:
                    exactly.add(key)
                    callback = state.callback(index, position)
                else:
                    callback = shared
                state.pending += 1
                while True:
                    try:
                        producer.produce(topic, value, key, on_delivery=callback, headers=headers)
                        break
                    except BufferError:  # the queue is at max_buffer: let deliveries drain it
                        producer.poll(0)
                        await trio.sleep(0.005)
                    except KafkaException as exc:
                        state.failures[(index, position)] = _apply_error(exc.args[0])
                        state.pending -= 1
                        break
        while state.pending:
            producer.poll(0)  # runs the delivery callbacks that are due, here
            if state.pending:
                await trio.sleep(0.001)
        exact_keys -= exactly
        if state.reports:
            exact_keys |= state.place(runs, sent)
            if len(exact_keys) > 100_000:  # failures on ever new keys: keep the set bounded (all shared again)
                exact_keys.clear()
        if state.too_large and await self._limit_changed():
            await self._renew()
        outcomes = []
        for index, run in enumerate(runs):
            failed = [p for p in range(len(run)) if (index, p) in state.failures] if state.failures else None
            outcomes.append(RunOutcome(failed[0], state.failures[(index, failed[0])]) if failed
                            else RunOutcome(len(run)))
        return outcomes

    def _oversize(self, value: bytes | None, key: bytes, headers: dict[str, bytes]) -> str:
        """Why a record is too large to send ("" if it is not): over max_message_size, or, framed, over the
        topic's max.message.bytes (measured uncompressed: one that compression would bring under it is
        refused too). Sent, it would fail the whole batch it went in."""
        value = value or b""
        limit = int(self.settings.max_message_size)
        if len(value) > limit:
            return f"kafka: record of {len(value)} bytes is over max_message_size {limit}"
        size = len(value) + len(key) + sum(len(name) + len(data) for name, data in headers.items())
        size += framing(size)
        if self.topic_limit and size > self.topic_limit:
            return f"kafka: record of {size} bytes is over the topic's max.message.bytes {self.topic_limit}"
        return ""

    async def health(self) -> None:
        """The cluster answers and knows the topic."""
        assert self.producer is not None
        timeout = min(5.0, float(self.settings.timeout))
        try:
            metadata = await trio.to_thread.run_sync(lambda: self.producer.list_topics(self.topic, timeout))
        except KafkaException as exc:
            raise ApplyError(ErrorClass.UNAVAILABLE, f"kafka: {exc.args[0].str()}") from None
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None:
            error = topic.error if topic is not None else None
            raise ApplyError(ErrorClass.UNAVAILABLE, f"kafka: topic {self.topic}: {error.str() if error else 'absent'}")
