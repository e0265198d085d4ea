"""Dead-letter operations: list, show, replay (re-journal to the live stream), purge.

A replayed dead letter is journaled again addressed to the one target that failed
it (the others applied it long ago; re-applying an old value to them would move
their keys backwards), under a fresh message id so the duplicate window does not
swallow it, and leaves the DLQ once the journal acked it. Dead letters marked
superseded (later writes of the key were applied past them) are skipped unless
asked for: replaying one would overwrite a newer value on a last-write-wins-less
target such as memcached.
"""

from __future__ import annotations

import base64
import fnmatch
from typing import Any

import msgspec

from sidecar.envelope import decode_message, encode, subject_for
from sidecar.log.connection import JetStreamApiError, NatsConnection
from sidecar.log.streams import dlq_stream_name
from sidecar.log.writer import JournalWriter, Message

NO_MESSAGE = 10037


class DeadLetter(msgspec.Struct, kw_only=True):
    seq: int
    subject: str
    time: str
    target: str
    key: str
    error_class: str
    error: str
    attempts: int
    original_seq: int
    superseded: bool
    headers: dict[str, str]
    entry: dict[str, Any] | None = None  # the whole original entry (show)


class DlqFilter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    target: str | None = None
    seq_from: int = 0
    seq_to: int = 0  # 0: no upper bound
    seqs: list[int] | None = None  # explicit sequences (the CLI pages through a selection)
    key: str | None = None  # glob on the entry key
    include_superseded: bool = False  # replay only


def _headers(raw: str | None) -> dict[str, str]:
    if not raw:
        return {}
    lines = base64.b64decode(raw).decode(errors="replace").split("\r\n")[1:]
    out = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip()] = value.strip()
    return out


class DeadLetters:
    def __init__(self, conn: NatsConnection, writer: JournalWriter) -> None:
        self.conn = conn
        self.writer = writer

    async def _get(self, namespace: str, seq: int, subject: str) -> dict[str, Any] | None:
        try:
            reply = await self.conn.js_api(f"STREAM.MSG.GET.{dlq_stream_name(namespace)}",
                                           {"seq": seq, "next_by_subj": subject})
        except JetStreamApiError as exc:
            if exc.err_code == NO_MESSAGE or exc.code == 404:
                return None
            raise
        return reply["message"]

    @staticmethod
    def _letter(message: dict[str, Any], with_entry: bool) -> DeadLetter:
        headers = _headers(message.get("hdrs"))
        letter = DeadLetter(
            seq=int(message["seq"]), subject=message["subject"], time=message.get("time", ""),
            target=headers.get("Walcar-Target", ""), key=headers.get("Walcar-Key", ""),
            error_class=headers.get("Walcar-Error-Class", ""), error=headers.get("Walcar-Error", ""),
            attempts=int(headers.get("Walcar-Attempts", "0") or 0),
            original_seq=int(headers.get("Walcar-Original-Seq", "0") or 0),
            superseded=headers.get("Walcar-Superseded") == "true", headers=headers,
        )
        if with_entry:
            data = base64.b64decode(message.get("data") or "")
            try:
                entries = decode_message(data)  # a pack only when a sidecar that cannot read packs letters one
                letter.entry = msgspec.to_builtins(entries[0] if len(entries) == 1 else {"pack": entries})
            except msgspec.DecodeError:
                letter.entry = {"undecodable": base64.b64encode(data).decode()}
        return letter

    async def list(self, namespace: str, flt: DlqFilter, limit: int = 100,
                   with_entry: bool = False) -> list[DeadLetter]:
        subject = f"waldlq.{namespace}.{flt.target}.>" if flt.target else f"waldlq.{namespace}.>"
        out: list[DeadLetter] = []
        if flt.seqs is not None:
            for seq in flt.seqs:
                message = await self._get(namespace, seq, subject)
                if message is not None and int(message["seq"]) == seq:
                    out.append(self._letter(message, with_entry))
            return [letter for letter in out if self._matches(letter, flt)]
        seq = max(1, flt.seq_from)
        while len(out) < limit:
            message = await self._get(namespace, seq, subject)
            if message is None or (flt.seq_to and int(message["seq"]) > flt.seq_to):
                break
            letter = self._letter(message, with_entry)
            if self._matches(letter, flt):
                out.append(letter)
            seq = letter.seq + 1
        return out

    @staticmethod
    def _matches(letter: DeadLetter, flt: DlqFilter) -> bool:
        return flt.key is None or fnmatch.fnmatchcase(letter.key, flt.key)

    async def show(self, namespace: str, seq: int) -> DeadLetter | None:
        message = await self._get(namespace, seq, f"waldlq.{namespace}.>")
        if message is None or int(message["seq"]) != seq:
            return None
        return self._letter(message, with_entry=True)

    async def delete(self, namespace: str, seq: int) -> None:
        await self.conn.js_api(f"STREAM.MSG.DELETE.{dlq_stream_name(namespace)}", {"seq": seq, "no_erase": True})

    async def replay(self, namespace: str, flt: DlqFilter, limit: int = 1000) -> dict[str, Any]:
        replayed, skipped, failed = [], [], []
        for letter in await self.list(namespace, flt, limit=limit):
            if letter.superseded and not flt.include_superseded:
                skipped.append({"seq": letter.seq, "reason": "superseded by later writes of the key"})
                continue
            message = await self._get(namespace, letter.seq, letter.subject)
            if message is None:
                continue
            # A letter holds one entry, or a whole pack when a sidecar that cannot read packs dead-lettered it
            # as undecodable (operations.md, *Journal messages*): each entry is journaled again, in order.
            entries = decode_message(base64.b64decode(message.get("data") or ""))
            messages = []
            for index, entry in enumerate(entries):
                entry.targets = [letter.target]
                suffix = f".{index}" if len(entries) > 1 else ""
                messages.append(Message(subject_for(namespace, entry.partition), encode(entry),
                                        {"Nats-Msg-Id": f"{entry.id}.dlq-replay.{letter.seq}{suffix}"}))
            results = await self.writer.publish_many(messages)
            if not all(result.ok for result in results):
                failed.append({"seq": letter.seq, "error": next(r.message for r in results if not r.ok)})
                continue
            await self.delete(namespace, letter.seq)
            replayed.append({"seq": letter.seq, "journal_sequence": results[-1].sequence})
        return {"replayed": replayed, "skipped": skipped, "failed": failed}

    async def purge(self, namespace: str, flt: DlqFilter, limit: int = 1000) -> dict[str, Any]:
        purged = []
        for letter in await self.list(namespace, flt, limit=limit):
            await self.delete(namespace, letter.seq)
            purged.append(letter.seq)
        return {"purged": purged}
