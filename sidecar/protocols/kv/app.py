"""The key-value API as an ASGI application (served by hypercorn on trio).

Routes:
    POST   /v1/log/{namespace}            WriteToLog (one entry, or a list of them: one answer each)
    POST   /v1/log/{namespace}/batch      entries replicated from another region (the region token; off without one)
    GET    /healthz                       the API answers (what a remote region's drain probes)
    PUT    /v1/kv/{namespace}/{id}        PutItems
    DELETE /v1/kv/{namespace}/{id}        DeleteItems (listed item keys, or the whole record)
    POST   /v1/kv/{namespace}/mutate      MutateItems (puts and deletes over several ids, atomically)
    GET    /v1/kv/{namespace}/{id}        GetItems, read through the namespace's primary target (?items=a,b)
    GET    /openapi.json

Every write answers {durable, visible, message, sequence, duplicate}: 200 when the
journal acked it, 503 + Retry-After when it is false or unknown. Bad input is 400
naming the field, a body over the limit 413, an unknown namespace 404.

A listener with a `token_file` wants `Authorization: Bearer <token>` on every route
but /healthz, /openapi.json and /batch (which takes the region token instead).
Client strings that travel as NATS headers (idempotency tokens) or HTTP headers
downstream (content types) are checked here: printable, bounded, no CR/LF.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec
import trio

from sidecar.envelope import Entry, Op, WriteTimeError, new_id, now_us, partition_of, valid_id
from sidecar.http import JSON, Receive, Scope, Send, respond, serve_lifespan
from sidecar.ingress import Ack, Durable, Ingress, Refused, TooLarge, UnknownNamespace
from sidecar.logs import get_logger
from sidecar.protocols.cql.routing import unreplicable_reason
from sidecar.protocols.kv import models
from sidecar.protocols.kv.body import ENTRY_BYTES, BodyRoom, HttpError, decode, read_body
from sidecar.protocols.kv.openapi import openapi_document
from sidecar.reads import ApplyError, NoReadableTarget, Readers, read_items
from sidecar.secrets import bearer_matches, browser_refusal
from sidecar.tcp import ByteBudget

log = get_logger("kv")


MSGPACK = b"application/msgpack"
_MSGPACK_TYPES = (b"application/msgpack", b"application/x-msgpack", b"application/vnd.msgpack")
MAX_TOKEN_BYTES = 128  # an idempotency token; entry ids add ":<index>" to it
MAX_CONTENT_TYPE = 255
_CONTENT_TYPE_RE = re.compile(r"[\x20-\x7e]{0," + str(MAX_CONTENT_TYPE) + "}")  # printable: no CR, LF, control
MAX_BODY = 64 * 1024 * 1024  # the listener's `max_body` default
# The listener's `max_json_body` default. msgspec parses a JSON body, base64 values and all, in one
# C call that holds the GIL (~1.8 ms a MB): past this a JSON body would hold the loop for more than
# a few ms. msgpack bodies go up to max_body.
MAX_JSON_BODY = 2 * 1024 * 1024
MAX_ITEMS = 10_000  # the listener's `max_items` default: entries one request may make
# A request builds its entries in slices of this many, with a checkpoint between them, so a
# large legal request never holds the event loop for more than a few milliseconds at a time.
_SLICE = 64


def _value_of(value: bytes | None, text: str | None, where: str) -> bytes:
    if (value is None) == (text is None):
        raise HttpError(400, "give exactly one of `value` (bytes) and `text` (UTF-8 string)", where)
    return value if value is not None else text.encode()  # type: ignore[union-attr]


def _mutation_entries(request: models.MutateItems) -> int:
    """Entries a mutation request makes: one per item, or one for a whole record."""
    return sum(max(1, len(m.items or m.item_keys or ())) for m in request.mutations)


def _placed(error: HttpError, where: str) -> HttpError:
    """`error` naming its field within a batch entry (`[3].payload`)."""
    if where:
        error.field = f"{where}{error.field}"
    return error


def _entry_error(exc: Exception, namespace: str, where: str, key_field: str = "key", item_field: str = "item",
                 expires_field: str = "") -> HttpError:
    """What `Ingress.entry` refused, as the API answers it; `where` names the value's field, `key_field` and
    `item_field` the key's and the item key's."""
    if isinstance(exc, UnknownNamespace):
        return HttpError(404, f"unknown namespace {namespace!r}")
    if isinstance(exc, TooLarge):
        return HttpError(413, str(exc), where)
    if isinstance(exc, Refused):  # a key (or expiry) no target of the namespace can store
        fields = {"key": key_field, "item": item_field, "expires_at": expires_field}
        return HttpError(400, str(exc), fields.get(exc.part, where))
    return HttpError(400, str(exc), "lifecycle.write_time")


def _status(ack: Ack) -> int:
    """A write's HTTP status: 200 durable, 409 an idempotency token reused, 503 otherwise."""
    return 200 if ack.ok else 409 if ack.conflict else 503


class KvApp:
    def __init__(self, ingress: Ingress, readers: Readers | None = None, max_body: int = MAX_BODY,
                 region_token: str | None = None, token: str | None = None, max_items: int = MAX_ITEMS,
                 body_budget: ByteBudget | None = None, body_wait: float = 2.0,
                 max_json_body: int = MAX_JSON_BODY) -> None:
        self.ingress = ingress
        self.readers = readers or Readers(ingress.config)
        self.max_body = max_body
        self.max_json_body = min(max_json_body, max_body)
        self.max_items = max_items
        self.body_budget = body_budget  # the listener's partial_budget: large bodies held at once
        self.body_wait = body_wait
        self.region_token = region_token
        self.token = token
        self._openapi = msgspec.json.encode(openapi_document())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        wants_msgpack = False
        room = BodyRoom(self.body_budget, self.body_wait)  # held until the answer is sent
        try:
            try:
                headers = dict(scope.get("headers") or [])
                content_type = headers.get(b"content-type", JSON).split(b";")[0].strip().lower()
                accept = headers.get(b"accept", b"")
                wants_msgpack = content_type in _MSGPACK_TYPES or any(t in accept for t in _MSGPACK_TYPES)
                status, body = await self._route(scope, receive, content_type in _MSGPACK_TYPES, headers, room)
            except HttpError as exc:
                status, body = exc.status, models.ErrorResponse(error=exc.error, field=exc.field)
            except Exception as exc:  # a bug: answer 500 and say so in the log, never drop the connection
                log.error("kv_handler_failed", exc_info=True, path=scope.get("path"), error=str(exc))
                status, body = 500, models.ErrorResponse(error=f"internal error: {type(exc).__name__}")
            await self._respond(send, status, body, wants_msgpack)
        finally:
            room.release()

    async def _respond(self, send: Send, status: int, body: object, as_msgpack: bool) -> None:
        if isinstance(body, bytes):
            payload, content_type = body, JSON
        elif as_msgpack:
            payload, content_type = msgspec.msgpack.encode(body), MSGPACK
        else:
            payload, content_type = msgspec.json.encode(body), JSON
        await respond(send, status, payload, content_type, [(b"retry-after", b"1")] if status == 503 else None)

    async def _client_body(self, receive: Receive, headers: dict[bytes, bytes], room: BodyRoom,
                           msgpack: bool) -> bytes | bytearray:
        if msgpack:
            return await read_body(receive, headers, self.max_body, room)
        try:
            return await read_body(receive, headers, self.max_json_body, room)
        except HttpError as exc:
            if exc.status != 413:
                raise
            raise HttpError(413, f"JSON request body over the listener's max_json_body of {self.max_json_body} "
                                 f"bytes: send it as application/msgpack (up to max_body, {self.max_body} "
                                 "bytes), or raise max_json_body") from None

    async def _decoded(self, body: bytes | bytearray, kind: Any, msgpack: bool, room: BodyRoom,
                       entries: Callable[[Any], int], field: str | None = None) -> Any:
        """The decoded request, with room held for it until the answer is sent: its body twice (the body
        and the values decoded from it) and ENTRY_BYTES per entry it makes (known once decoded).
        Without room now, the decoded objects are let go while it waits (thousands per request) and
        the body decoded again after. With `field`, more entries than max_items are refused first
        (413 naming it)."""
        request = decode(body, kind, msgpack)
        count = entries(request)
        if field is not None:
            self._count(count, field)
        size = 2 * len(body) + count * ENTRY_BYTES
        if room.try_hold(size):
            return request
        del request
        await room.hold(size)  # 503 when no room comes within partial_wait
        return decode(body, kind, msgpack)

    async def _route(self, scope: Scope, receive: Receive, msgpack: bool,
                     headers: dict[bytes, bytes], room: BodyRoom) -> tuple[int, object]:
        method = scope["method"]
        raw = scope.get("raw_path") or scope["path"].encode()
        parts = [unquote(p.decode("latin-1")) for p in raw.split(b"?")[0].split(b"/")[1:]]
        if parts == ["openapi.json"] and method == "GET":
            return 200, self._openapi
        if parts == ["healthz"] and method == "GET":
            return 200, b'{"status":"alive"}'
        batch = len(parts) == 4 and parts[:2] == ["v1", "log"] and parts[3] == "batch"
        refusal = browser_refusal(headers, (self.region_token if batch else self.token) is not None)
        if refusal is not None:
            raise HttpError(403, refusal)
        if method in ("POST", "PUT", "DELETE") and headers.get(b"content-length", b"0") != b"0" and (
                headers.get(b"content-type", b"").split(b";")[0].strip().lower() not in (JSON, *_MSGPACK_TYPES)):
            # A browser can send text/plain or a form without asking first; it cannot send these.
            raise HttpError(415, "bodies are application/json or application/msgpack")
        if batch:
            self._allow(method, "POST")
            self._authorize_region(headers)
            body = await read_body(receive, headers, self.max_body, room)
            return await self._replicated(parts[2], body, msgpack, room)
        if self.token is not None and not bearer_matches(headers.get(b"authorization"), self.token):
            raise HttpError(401, "this listener needs Authorization: Bearer <token> (its token_file)")
        if len(parts) == 3 and parts[:2] == ["v1", "log"]:
            self._allow(method, "POST")
            return await self._write_to_log(parts[2], await self._client_body(receive, headers, room, msgpack),
                                            msgpack, room)
        if len(parts) == 4 and parts[:2] == ["v1", "kv"]:
            namespace, record = parts[2], parts[3]
            if record == "mutate" and method == "POST":
                return await self._mutate(namespace, await self._client_body(receive, headers, room, msgpack),
                                          msgpack, room)
            self._allow(method, "GET", "PUT", "DELETE")
            if method == "GET":
                return await self._get(namespace, record, scope.get("query_string", b""))
            body = await self._client_body(receive, headers, room, msgpack)
            if method == "PUT":
                return await self._put(namespace, record, body, msgpack, room)
            return await self._delete(namespace, record, body, msgpack, room)
        raise HttpError(404, f"no route for {method} {scope['path']}")

    async def _get(self, namespace: str, record: str, query: bytes) -> tuple[int, object]:
        self._namespace(namespace)
        params = parse_qs(query.decode("latin-1"))
        items = [i for value in params.get("items", []) for i in value.split(",") if i] or None
        try:
            found = await read_items(self.ingress, self.readers, namespace, record, items)
        except NoReadableTarget as exc:
            raise HttpError(404, str(exc)) from None
        except ApplyError as exc:
            raise HttpError(503, f"primary target unavailable: {exc.message}") from None
        if not found:
            raise HttpError(404, f"no items for id {record!r}")
        out = [models.ItemOut(key=key, value=value, expires_at=expires) for key, value, expires in sorted(found)]
        return 200, models.GetItemsResponse(id=record, items=out)

    def _authorize_region(self, headers: dict[bytes, bytes]) -> None:
        if self.region_token is None:
            raise HttpError(403, "cross-region writes are off here: this sidecar has no sidecar.region_token_file")
        if not bearer_matches(headers.get(b"authorization"), self.region_token):
            raise HttpError(401, "cross-region batches need a valid bearer token (sidecar.region_token_file)")

    async def _replicated(self, namespace: str, body: bytes | bytearray, msgpack: bool,
                          room: BodyRoom) -> tuple[int, object]:
        """Each entry is checked as the front door would; a refused one is answered `refused` (the
        sender dead-letters it), the others are journaled as they are in one group commit."""
        batch: models.ReplicationBatch = await self._decoded(body, models.ReplicationBatch, msgpack, room,
                                                              lambda b: len(b.entries))
        ns = self._namespace(namespace)
        out: list[models.ReplicatedResult | None] = [None] * len(batch.entries)
        admitted: list[tuple[int, Entry]] = []
        for index, entry in enumerate(batch.entries):
            reason = self._refusal(namespace, ns, entry)
            if reason is not None:
                out[index] = models.ReplicatedResult(durable=Durable.FALSE, message=f"refused: {reason}", refused=True)
                continue
            # Partition counts are per region: place the entry by this region's count.
            entry.partition = partition_of(entry.key, ns.partitions)
            admitted.append((index, entry))
        if len(admitted) < len(batch.entries):
            log.warning("replicated_entries_refused", namespace=namespace, refused=len(batch.entries) - len(admitted),
                        first=next(r.message for r in out if r is not None))
        results = await self.ingress.write_replicated([entry for _, entry in admitted])
        for (index, _), r in zip(admitted, results, strict=True):
            out[index] = models.ReplicatedResult(durable=r.durable, message=r.message, sequence=r.sequence,
                                                 duplicate=r.duplicate)
        answers = [r for r in out if r is not None]
        status = 200 if all(r.durable is Durable.TRUE or r.refused for r in answers) else 503
        return status, models.ReplicationResponse(results=answers)

    def _refusal(self, namespace: str, ns: Any, entry: Entry) -> str | None:
        if entry.ns != namespace:
            return f"entry for namespace {entry.ns!r} sent to {namespace!r}"
        if not _CONTENT_TYPE_RE.fullmatch(entry.content_type):
            return f"content_type must be at most {MAX_CONTENT_TYPE} printable characters"
        unknown = [name for name in entry.targets if ns.target(name) is None]
        if unknown:
            return f"no target(s) {', '.join(unknown)[:200]} in namespace {namespace!r}"
        try:
            self.ingress.check_replicated(entry, ns)
        except (Refused, TooLarge) as exc:
            return str(exc)
        if entry.cql is not None:
            for statement in entry.cql.statements:
                reason = unreplicable_reason(statement.query, statement.keyspace or None)
                if reason is not None:
                    return reason
        return None

    @staticmethod
    def _token(token: str | None, field: str = "idempotency_token") -> str | None:
        """An idempotency token becomes the entries' Nats-Msg-Id: printable, no spaces, bounded."""
        if token is not None and (len(token) > MAX_TOKEN_BYTES or not valid_id(token)):
            raise HttpError(400, f"must be 1-{MAX_TOKEN_BYTES} printable ASCII characters without spaces", field)
        return token

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise HttpError(405, f"method {method} not allowed here (use {', '.join(allowed)})")

    def _entry(self, namespace: str, op: Op, key: str, where: str = "", key_field: str = "key",
               item_field: str = "item", expires_field: str = "", **kwargs: Any) -> Entry:
        """`where` names the value's field, `key_field` and `item_field` the key's and the item key's."""
        try:
            return self.ingress.entry(namespace, op, key, **kwargs)
        except (UnknownNamespace, Refused, WriteTimeError) as exc:
            raise _entry_error(exc, namespace, where, key_field, item_field, expires_field) from None

    @staticmethod
    def _answer(ack: Ack) -> tuple[int, models.WriteResponse]:
        response = models.WriteResponse(
            durable=ack.durable,
            visible=ack.visible,
            message=ack.message,
            sequence=ack.sequence,
            duplicate=ack.duplicate,
        )
        return _status(ack), response

    def _lifecycle(self, namespace: str, lifecycle: models.Lifecycle | None) -> dict[str, Any]:
        if lifecycle is None:
            return {}
        # The stream keeps entries for replay_window: a delivery later than that would find its
        # entry gone, so it is refused rather than acked and silently dropped.
        window_ms = int(self._namespace(namespace).replay_window * 1000)
        if lifecycle.delay_ms > window_ms:
            raise HttpError(400, f"delay_ms of {lifecycle.delay_ms} is beyond the namespace's replay_window "
                                 f"({window_ms} ms): the entry would expire before its delivery",
                            "lifecycle.delay_ms")
        return {"delay_ms": lifecycle.delay_ms, "write_time": lifecycle.write_time}

    def _count(self, count: int, field: str) -> None:
        if count > self.max_items:
            raise HttpError(413, f"{count} entries in one request, over the listener's max_items of "
                                 f"{self.max_items}", field)

    async def _write_to_log(self, namespace: str, body: bytes | bytearray, msgpack: bool,
                            room: BodyRoom) -> tuple[int, object]:
        request = await self._decoded(body, models.WriteToLog | list[models.WriteToLog], msgpack, room,
                                      lambda r: len(r) if isinstance(r, list) else 1, "")
        if isinstance(request, list):
            return await self._write_log_batch(namespace, request)
        entry = self._log_entry(namespace, self._writable(namespace), request)
        return self._answer(await self.ingress.write(entry, packable=request.idempotency_token is None))

    def _log_entry(self, namespace: str, ns: Any, request: models.WriteToLog, where: str = "") -> Entry:
        """The entry of one WriteToLog to the writable namespace `ns`; `where` prefixes the field an
        HttpError names (built only then). A batch makes thousands: the entry is made here, not
        through `_entry`'s keyword passing."""
        try:
            if (request.payload is None) == (request.text is None):
                raise HttpError(400, "give exactly one of `payload` (bytes) and `text` (UTF-8 string)", "payload")
            payload = request.payload if request.payload is not None else request.text.encode()  # type: ignore[union-attr]
            targets = request.target or ()
            if targets and (unknown := [t for t in targets if ns.target(t) is None]):
                raise HttpError(400, f"namespace {namespace!r} has no target(s) {', '.join(unknown)}", "target")
            if request.content_type and not _CONTENT_TYPE_RE.fullmatch(request.content_type):
                raise HttpError(400, f"must be at most {MAX_CONTENT_TYPE} printable characters", "content_type")
            token = request.idempotency_token
            entry_id = self._token(token) if token is not None else None
            if request.lifecycle is None:  # most entries: no `**` (a dict built per call, ~0.2 µs an entry)
                return self.ingress.entry(namespace, Op.PUT, request.key, value=payload, entry_id=entry_id,
                                          targets=targets, content_type=request.content_type)
            return self.ingress.entry(namespace, Op.PUT, request.key, value=payload, entry_id=entry_id,
                                      targets=targets, content_type=request.content_type,
                                      **self._lifecycle(namespace, request.lifecycle))
        # Raised from inside the except blocks, whose names go with them: an exception kept in a local of
        # this frame (which its traceback holds) would be a cycle keeping the entry's payload until a GC.
        except HttpError as exc:
            raise _placed(exc, where) from None
        except (UnknownNamespace, Refused, WriteTimeError) as exc:
            raise _placed(_entry_error(exc, namespace, "payload"), where) from None

    async def _write_log_batch(self, namespace: str, requests: list[models.WriteToLog]) -> tuple[int, object]:
        """Independent writes in one request and one group commit (not atomic: /mutate is). Each entry
        is checked as a single write is and answered on its own; a refused one is not journaled and
        does not stop the others."""
        ns = self._writable(namespace)
        if not requests:
            raise HttpError(400, "a batch needs at least one entry")
        results: list[models.LogResult | None] = [None] * len(requests)
        entries: list[Entry] = []
        places: list[int] = []
        for index, request in enumerate(requests):
            if index and not index % _SLICE:
                await trio.lowlevel.checkpoint()
            try:
                entries.append(self._log_entry(namespace, ns, request, f"[{index}]."))
            except HttpError as exc:
                results[index] = models.LogResult(durable=Durable.FALSE, status=exc.status, message=exc.error,
                                                  field=exc.field)
                continue
            places.append(index)
        packable = [requests[index].idempotency_token is None for index in places]
        acks = await self.ingress.write_many(entries, packable=packable) if entries else []
        shared: dict[int, models.LogResult] = {}  # the entries of a pack share their Ack, and so their result
        for n, (index, ack) in enumerate(zip(places, acks, strict=True)):
            if n and not n % (4 * _SLICE):
                await trio.lowlevel.checkpoint()
            result = shared.get(id(ack))
            if result is None:
                result = shared[id(ack)] = models.LogResult(
                    durable=ack.durable, visible=ack.visible, message=ack.message, sequence=ack.sequence,
                    duplicate=ack.duplicate, status=_status(ack))
            results[index] = result
        answers = [r for r in results if r is not None]
        # Worth a retry (journal trouble) outranks a refusal: the client must look at every result anyway.
        statuses = [r.status for r in answers if r.status != 200]
        status = 503 if 503 in statuses else statuses[0] if statuses else 200
        return status, models.LogBatchResponse(results=answers)

    def _namespace(self, namespace: str) -> Any:
        try:
            return self.ingress.namespace(namespace)
        except UnknownNamespace:
            raise HttpError(404, f"unknown namespace {namespace!r}") from None

    def _writable(self, namespace: str) -> Any:
        """The namespace of a write: the KV API journals or refuses, it never writes around the journal."""
        ns = self._namespace(namespace)
        if ns.mode == "off":
            raise HttpError(409, f"namespace {namespace!r} has its WAL switched off (mode = \"off\"): "
                                 "write to its target directly, or switch it back on")
        return ns

    async def _put_entries(
        self, namespace: str, record: str, items: list[models.Item], lifecycle: dict[str, Any], where: str
    ) -> list[Entry]:
        if not items:
            raise HttpError(400, "a put needs at least one item", f"{where}items")
        entries = []
        for index, item in enumerate(items):
            if index and not index % _SLICE:
                await trio.lowlevel.checkpoint()
            path = f"{where}items[{index}]"
            value = _value_of(item.value, item.text, path)
            # The expiry counts from the write time (the client's, or now): passed in, so the
            # front door's checks see it.
            expires_at = (lifecycle.get("write_time") or now_us()) // 1_000_000 + item.ttl_s if item.ttl_s else 0
            entries.append(self._entry(namespace, Op.PUT, record, path, key_field=f"{where}id",
                                       item_field=f"{path}.key", expires_field=f"{path}.ttl_s",
                                       item=item.key, value=value, expires_at=expires_at, **lifecycle))
        return entries

    async def _delete_entries(
        self, namespace: str, record: str, item_keys: list[str] | None, lifecycle: dict[str, Any], where: str
    ) -> list[Entry]:
        if item_keys is None:
            return [self._entry(namespace, Op.DELETE, record, key_field=f"{where}id", **lifecycle)]
        if not item_keys:
            raise HttpError(400, "item_keys is empty: omit it to delete the whole record", f"{where}item_keys")
        entries = []
        for index, key in enumerate(item_keys):
            if index and not index % _SLICE:
                await trio.lowlevel.checkpoint()
            entries.append(self._entry(namespace, Op.DELETE, record, key_field=f"{where}id",
                                       item_field=f"{where}item_keys[{index}]", item=key, **lifecycle))
        return entries

    async def _journal(self, entries: list[Entry], token: str | None) -> tuple[int, object]:
        """Ids derive from the idempotency token, so a retried request maps to the same entries."""
        base_id = self._token(token) or new_id()
        for index, entry in enumerate(entries):
            if index and not index % (4 * _SLICE):
                await trio.lowlevel.checkpoint()
            entry.id = f"{base_id}:{index}"
        return self._answer(await self.ingress.write_mutation(entries, base_id))

    async def _put(self, namespace: str, record: str, body: bytes | bytearray, msgpack: bool,
                   room: BodyRoom) -> tuple[int, object]:
        request: models.PutItems = await self._decoded(body, models.PutItems, msgpack, room, lambda r: len(r.items),
                                                       "items")
        self._writable(namespace)
        entries = await self._put_entries(namespace, record, request.items,
                                          self._lifecycle(namespace, request.lifecycle), "")
        return await self._journal(entries, request.idempotency_token)

    async def _delete(self, namespace: str, record: str, body: bytes | bytearray, msgpack: bool,
                      room: BodyRoom) -> tuple[int, object]:
        request = await self._decoded(body, models.DeleteItems, msgpack, room, lambda r: len(r.item_keys or ()),
                                      "item_keys") if body.strip() else models.DeleteItems()
        self._writable(namespace)
        entries = await self._delete_entries(namespace, record, request.item_keys,
                                             self._lifecycle(namespace, request.lifecycle), "")
        return await self._journal(entries, request.idempotency_token)

    async def _mutate(self, namespace: str, body: bytes | bytearray, msgpack: bool,
                      room: BodyRoom) -> tuple[int, object]:
        request: models.MutateItems = await self._decoded(body, models.MutateItems, msgpack, room, _mutation_entries,
                                                          "mutations")
        self._writable(namespace)
        if not request.mutations:
            raise HttpError(400, "mutations is empty", "mutations")
        lifecycle = self._lifecycle(namespace, request.lifecycle)
        entries: list[Entry] = []
        sliced = 0  # entries built since the last checkpoint: 10,000 one-entry mutations are one loop too
        for index, mutation in enumerate(request.mutations):
            if len(entries) - sliced >= _SLICE:
                sliced = len(entries)
                await trio.lowlevel.checkpoint()
            where = f"mutations[{index}]."
            if mutation.op == "put":
                if mutation.item_keys is not None:
                    raise HttpError(400, "a put takes `items`, not `item_keys`", f"{where}item_keys")
                entries += await self._put_entries(namespace, mutation.id, mutation.items or [], lifecycle, where)
            else:
                if mutation.items is not None:
                    raise HttpError(400, "a delete takes `item_keys`, not `items`", f"{where}items")
                entries += await self._delete_entries(namespace, mutation.id, mutation.item_keys, lifecycle, where)
        return await self._journal(entries, request.idempotency_token)
