"""The `http` target: an upstream application that applies each entry itself.

Each entry is one request to `url` (its `{namespace}` and `{key}` filled in, the key
percent-encoded so it can never add a path segment or a query), the payload as body
with its content type, and the headers an application needs to apply it safely:
`Idempotency-Key` (the entry id: the same on every redelivery and replay), the
journal sequence, write time, origin region, op and key. With `batch = "json"` or
`"ndjson"` one request carries up to `max_batch` entries as objects (value in
base64) and the application dedupes by each object's `id`.

The answer decides: 2xx applied; 408, 425, 500 and other 5xx transient (retried with
backoff, dead-lettered after `max_attempts`); 429, 502, 503, 504 and connection
errors mean the application is away or shedding load (the breaker holds the target,
nothing is ever dead-lettered for it); any other status is permanent and goes to the
DLQ with the status and the first bytes of the answer. `Retry-After` is honoured:
no retry and no probe comes sooner.

Per-key order: a run's entries go one after another, each only once the one before it
was answered 2xx; runs of different keys go concurrently (`concurrency`). A batch
holds whole runs in order, so it never reorders a key either.
"""

from __future__ import annotations

import base64
import email.utils
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import msgspec
import trio

from sidecar.config import HttpTarget as HttpSettings
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome, addressed_to
from sidecar.envelope import Entry, Op
from sidecar.secrets import read_token_file

# Statuses that say the application is away or shedding load rather than refusing this entry.
AWAY = frozenset({429, 502, 503, 504})
RETRY = frozenset({408, 425})
BODY_PREVIEW = 200  # bytes of a refusal's body kept in the dead letter
MAX_RETRY_AFTER = 600.0  # a Retry-After further out than this is taken as this
APPLIES = frozenset({Op.PUT, Op.DELETE, Op.TOUCH})


class _Item(msgspec.Struct, omit_defaults=True):
    """One entry in a batched request body."""

    id: str
    seq: int
    namespace: str
    key: str
    op: str
    write_time: int
    origin: str = ""
    item: str = ""
    content_type: str = ""
    expires_at: int = 0
    value: str | None = None  # base64


_json = msgspec.json.Encoder()


def escape(text: str) -> str:
    """Percent-encode everything but unreserved characters; "." and ".." become %2E so they stay data."""
    quoted = quote(text, safe="")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


def retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); 0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return min(MAX_RETRY_AFTER, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0.0
    return min(MAX_RETRY_AFTER, max(0.0, when - (time.time() if now is None else now)))


def classify(status: int, body: bytes, after: float) -> ApplyError | None:
    """None for 2xx; otherwise the error the drain acts on."""
    if 200 <= status < 300:
        return None
    preview = body[:BODY_PREVIEW].decode("utf-8", "replace")
    message = f"application answered {status}: {preview}"
    if status in AWAY:
        return ApplyError(ErrorClass.UNAVAILABLE, message, after)
    if status in RETRY or status >= 500:
        return ApplyError(ErrorClass.TRANSIENT, message, after)
    return ApplyError(ErrorClass.PERMANENT, message)


def entry_headers(entry: Entry) -> dict[str, str]:
    """What an application needs to apply an entry once, in order; every value header-safe."""
    headers = {
        "idempotency-key": entry.id,
        "walcar-sequence": str(entry.seq),
        "walcar-write-time": str(entry.write_time),
        "walcar-op": entry.op.value,
        "walcar-namespace": entry.ns,
        "walcar-key": escape(entry.key),
    }
    if entry.origin:
        headers["walcar-origin"] = escape(entry.origin)
    if entry.item:
        headers["walcar-item"] = escape(entry.item)
    if entry.expires_at:
        headers["walcar-expires-at"] = str(entry.expires_at)
    return headers


class HttpTarget:
    def __init__(self, settings: HttpSettings, namespace: str) -> None:
        self.settings = settings
        self.name = settings.name
        self.namespace = namespace
        self.client: httpx.AsyncClient | None = None
        self._not_before = 0.0  # trio time before which the application asked not to be called
        parts = urlsplit(settings.url)
        self.health_url = settings.health_url or f"{parts.scheme}://{parts.netloc}/"

    async def start(self) -> None:
        settings = self.settings
        headers = dict(settings.headers)
        if settings.token_file:  # read here, kept in the client only: never in a log line or an error
            token = await trio.to_thread.run_sync(read_token_file, settings.token_file)
            if settings.token_header.lower() == "authorization":
                headers["authorization"] = f"Bearer {token}"
            else:
                headers[settings.token_header] = token
        verify: ssl.SSLContext | bool = True
        if settings.ca_file:
            verify = ssl.create_default_context(cafile=settings.ca_file)
        self.client = httpx.AsyncClient(
            timeout=float(settings.timeout), headers=headers, verify=verify, follow_redirects=False,
            limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency),
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def wants(self, entry: Entry) -> bool:
        # CQL statements are Cassandra's. (A MULTI is expanded by the drain, which asks about each entry inside.)
        return addressed_to(entry, self.name) and entry.op in APPLIES

    def url_for(self, key: str) -> str:
        return self.settings.url.replace("{namespace}", escape(self.namespace)).replace("{key}", escape(key))

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        outcomes = [RunOutcome(0) for _ in runs]
        work: list[Any]
        send: Callable[[list[list[Entry]], Any, list[RunOutcome]], Awaitable[None]]
        if self.settings.batch == "none":
            work, send = list(range(len(runs))), self._send_run
        else:
            work, send = self._batches(runs), self._send_batch
        pending = iter(work)

        async def worker() -> None:
            for item in pending:  # workers share one iterator: each item is taken once
                await send(runs, item, outcomes)

        async with trio.open_nursery() as nursery:
            for _ in range(min(self.settings.concurrency, len(work))):
                nursery.start_soon(worker)
        return outcomes

    # --- one request per entry ----------------------------------------------------------

    async def _send_run(self, runs: list[list[Entry]], index: int, outcomes: list[RunOutcome]) -> None:
        for entry in runs[index]:
            error = await self._request(self.url_for(entry.key), self._method(entry.op),
                                        entry.value or b"", {**entry_headers(entry), "content-type":
                                                             entry.content_type or "application/octet-stream"})
            if error is not None:
                outcomes[index].error = error
                return
            outcomes[index].applied += 1

    def _method(self, op: Op) -> str:
        if op is Op.DELETE and self.settings.delete_method:
            return self.settings.delete_method
        return self.settings.method

    # --- batches ----------------------------------------------------------------------------

    def _batches(self, runs: list[list[Entry]]) -> list[list[tuple[int, int]]]:
        """Whole runs packed into batches of at most max_batch entries: (run index, entries of it).

        A run longer than a batch sends its first max_batch entries; the rest stay in the lane
        for the next round (an outcome short of the run without an error)."""
        size = self.settings.max_batch
        batches: list[list[tuple[int, int]]] = []
        current: list[tuple[int, int]] = []
        filled = 0
        for index, run in enumerate(runs):
            take = min(len(run), size)
            if current and filled + take > size:
                batches.append(current)
                current, filled = [], 0
            current.append((index, take))
            filled += take
        if current:
            batches.append(current)
        return batches

    async def _send_batch(self, runs: list[list[Entry]], batch: list[tuple[int, int]],
                          outcomes: list[RunOutcome]) -> None:
        items = [self._item(entry) for index, take in batch for entry in runs[index][:take]]
        if self.settings.batch == "json":
            body, content_type = _json.encode(items), "application/json"
        else:
            body, content_type = b"".join(_json.encode(item) + b"\n" for item in items), "application/x-ndjson"
        first = runs[batch[0][0]][0]
        # The namespace's URL with no single key: {key} is empty for a batch.
        error = await self._request(self.url_for(""), self.settings.method, body,
                                    {"content-type": content_type, "walcar-namespace": first.ns,
                                     "walcar-batch-size": str(len(items))})
        for index, take in batch:
            if error is None:
                outcomes[index].applied = take
            else:
                outcomes[index].error = error

    def _item(self, entry: Entry) -> _Item:
        return _Item(id=entry.id, seq=entry.seq, namespace=entry.ns, key=entry.key, op=entry.op.value,
                     write_time=entry.write_time, origin=entry.origin, item=entry.item,
                     content_type=entry.content_type, expires_at=entry.expires_at,
                     value=base64.b64encode(entry.value).decode() if entry.value is not None else None)

    # --- the wire ------------------------------------------------------------------------------

    async def _request(self, url: str, method: str, body: bytes, headers: dict[str, str]) -> ApplyError | None:
        assert self.client is not None, "start() first"
        try:
            response = await self.client.request(method, url, content=body, headers=headers)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            return ApplyError(ErrorClass.UNAVAILABLE, f"application {self._where()}: {type(exc).__name__}: {exc}")
        after = retry_after(response.headers.get("retry-after"))
        error = classify(response.status_code, response.content, after)
        if error is not None and after:
            self._not_before = max(self._not_before, trio.current_time() + after)
        return error

    def _where(self) -> str:
        """The application's address for messages: scheme, host and port (no path, which may hold a key)."""
        parts = urlsplit(self.settings.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"

    async def health(self) -> None:
        """Answers at all (or 2xx from `health_url`), and not inside a Retry-After it gave."""
        assert self.client is not None
        wait = self._not_before - trio.current_time()
        if wait > 0:
            raise ApplyError(ErrorClass.UNAVAILABLE, f"application asked to retry after {wait:.1f}s more")
        try:
            response = await self.client.get(self.health_url)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise ApplyError(ErrorClass.UNAVAILABLE, f"application {self._where()}: {type(exc).__name__}") from None
        if (self.settings.health_url and not 200 <= response.status_code < 300) or response.status_code in AWAY:
            raise ApplyError(ErrorClass.UNAVAILABLE, f"application health {response.status_code}")
