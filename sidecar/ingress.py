"""What every front (KV API, memcached, CQL) does with a mutation: make the entry, journal it, answer.

Protocols differ in how they ask and how they answer; the entry they build, the
checks it passes (namespace, size, write-time drift) and the durable/visible answer
they get back are the same, so they live here once.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from sidecar.config import Config, Namespace
from sidecar.envelope import CqlMutation, Entry, Op, new_id, now_us, partition_of, resolve_write_time
from sidecar.log.journal import Journal, UnknownNamespace
from sidecar.log.writer import Durable, WriteResult


class Ack(msgspec.Struct, omit_defaults=True):
    """The answer to a journaled mutation, as every front reports it."""

    durable: Durable
    visible: bool = False
    sequence: int = 0
    duplicate: bool = False
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.durable is Durable.TRUE


class TooLarge(ValueError):
    pass


class Ingress:
    def __init__(self, config: Config, journal: Journal) -> None:
        self.config = config
        self.journal = journal
        self.region = config.sidecar.region

    def namespace(self, name: str) -> Namespace:
        ns = self.config.namespaces.get(name)
        if ns is None:
            raise UnknownNamespace(name)
        return ns

    def entry(
        self,
        namespace: str,
        op: Op,
        key: str,
        *,
        item: str = "",
        value: bytes | None = None,
        entry_id: str | None = None,
        write_time: int | None = None,
        delay_ms: int = 0,
        flags: int = 0,
        expires_at: int = 0,
        targets: Sequence[str] = (),
        content_type: str = "",
        cql: CqlMutation | None = None,
    ) -> Entry:
        """Build a checked entry; raises UnknownNamespace, TooLarge or WriteTimeError."""
        ns = self.namespace(namespace)
        if value is not None and len(value) > ns.max_item_size:
            raise TooLarge(f"value of {len(value)} bytes is over the namespace's max_item_size of {ns.max_item_size}")
        now = now_us()
        stamp = resolve_write_time(write_time, ns.write_time_drift, now)
        return Entry(
            id=entry_id or new_id(),
            ns=namespace,
            op=op,
            key=key,
            partition=partition_of(key, ns.partitions),
            item=item,
            value=value,
            flags=flags,
            expires_at=expires_at,
            write_time=stamp,
            deliver_at=now + delay_ms * 1000 if delay_ms > 0 else 0,
            origin=self.region,
            targets=list(targets),
            content_type=content_type,
            cql=cql,
        )

    async def write(self, entry: Entry) -> Ack:
        return self._ack(await self.journal.append(entry))

    async def write_mutation(self, entries: list[Entry], mutation_id: str | None = None) -> Ack:
        """Several entries as one all-or-nothing mutation."""
        return self._ack(await self.journal.append_atomic(entries, mutation_id))

    @staticmethod
    def _ack(result: WriteResult) -> Ack:
        return Ack(
            durable=result.durable,
            sequence=result.sequence,
            duplicate=result.duplicate,
            message=result.message,
        )
