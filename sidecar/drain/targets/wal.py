"""The `wal` target: drain into another region's walcar, which journals and applies locally.

Entries travel in batches (msgpack, gzip above `compress_above`) over keep-alive
HTTP to the remote KV API's batch endpoint, keeping their id (so the remote journal
deduplicates a retried batch entry by entry), their write time and their origin.

Loops are prevented here: a region forwards only entries that entered walcar in
this region, unless the namespace is a relay. Target names are per region, so an
entry travels without them and the remote applies it to all of its own targets. A remote 503, timeout or refused
connection is the remote being away (backoff, breaker, backlog grows, other
targets unaffected); a remote 4xx is permanent (dead-lettered with the remote's
message — a wrong token lands there as "401"), and so is an entry the remote
refused after its own front-door checks (answered `refused`, entry by entry).
"""

from __future__ import annotations

import gzip
import ssl

import httpx
import msgspec

from sidecar.config import Config, Namespace
from sidecar.config import WalTarget as WalSettings
from sidecar.drain.targets.base import ApplyError, ErrorClass, RunOutcome, addressed_to
from sidecar.envelope import Entry
from sidecar.secrets import read_token_file
from sidecar.tls import ClientTls

_encoder = msgspec.msgpack.Encoder()


class _Result(msgspec.Struct):
    durable: str
    message: str = ""
    refused: bool = False  # the remote will never journal it (its checks said no): permanent


class _Response(msgspec.Struct):
    results: list[_Result]


_decoder = msgspec.msgpack.Decoder(_Response)


class WalTarget:
    def __init__(self, settings: WalSettings, namespace: str, config: Config) -> None:
        self.settings = settings
        self.name = settings.name
        self.namespace = namespace
        ns: Namespace = config.namespaces[namespace]
        self.region = config.sidecar.region
        self.relay = ns.relay
        self.url = f"{settings.url.rstrip('/')}/v1/log/{namespace}/batch"
        self.health_url = f"{settings.url.rstrip('/')}/healthz"
        self.token = read_token_file(settings.token_file) if settings.token_file else None
        self.client: httpx.AsyncClient | None = None
        self.tls = ClientTls.from_settings(f"{settings.name}.tls", settings.tls)  # a bad file fails the start
        self._context: ssl.SSLContext | None = None

    async def start(self) -> None:
        headers = {"content-type": "application/msgpack", "accept": "application/msgpack"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        self._context = self.tls.context() if self.tls is not None else None
        self.client = httpx.AsyncClient(timeout=self.settings.timeout, headers=headers,
                                        verify=self._context if self._context is not None else True,
                                        limits=httpx.Limits(max_keepalive_connections=8, max_connections=16))

    async def _current_client(self) -> httpx.AsyncClient:
        """The client, made anew when the CA or client certificate files changed (kept connections
        were verified with the old ones)."""
        if self.tls is not None and self.tls.context() is not self._context:
            await self.close()
        if self.client is None:
            await self.start()
        assert self.client is not None
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def wants(self, entry: Entry) -> bool:
        return addressed_to(entry, self.name) and (entry.origin == self.region or self.relay)

    async def apply(self, runs: list[list[Entry]]) -> list[RunOutcome]:
        flat = [(index, entry) for index, run in enumerate(runs) for entry in run]
        applied = [0] * len(runs)
        errors: dict[int, ApplyError] = {}
        size = max(1, self.settings.batch_size)
        for start in range(0, len(flat), size):
            chunk = flat[start : start + size]
            try:
                results = await self._send([entry for _, entry in chunk])
            except ApplyError as exc:
                results = [exc] * len(chunk)
            for (index, _), result in zip(chunk, results, strict=True):
                if index in errors:
                    continue  # a run stops at its first failure
                if isinstance(result, ApplyError):
                    errors[index] = result
                else:
                    applied[index] += 1
        return [RunOutcome(applied[i], errors.get(i)) for i in range(len(runs))]

    async def _send(self, entries: list[Entry]) -> list[ApplyError | None]:
        client = await self._current_client()
        # Target names are this region's: the remote applies the entry to all of its own targets; the
        # sequence is this journal's, never the remote's.
        body = _encoder.encode({"entries": [msgspec.structs.replace(e, targets=[], seq=0) for e in entries]})
        headers = {}
        if len(body) > self.settings.compress_above:
            body = gzip.compress(body, compresslevel=1)
            headers["content-encoding"] = "gzip"
        try:
            response = await client.post(self.url, content=body, headers=headers)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise ApplyError(ErrorClass.UNAVAILABLE,
                             f"remote {self.settings.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code in (200, 503) and response.headers.get("content-type", "").endswith("msgpack"):
            try:
                parsed = _decoder.decode(response.content)
            except msgspec.DecodeError as exc:
                raise ApplyError(ErrorClass.TRANSIENT, f"remote answered unreadably: {exc}") from None
            return [None if r.durable == "true" else
                    ApplyError(ErrorClass.PERMANENT, f"remote {r.message}") if r.refused else
                    ApplyError(ErrorClass.TRANSIENT, f"remote journal: durable={r.durable} {r.message}")
                    for r in parsed.results]
        detail = _error_text(response)
        if response.status_code == 503 or response.status_code >= 500:
            raise ApplyError(ErrorClass.UNAVAILABLE, f"remote {response.status_code}: {detail}")
        raise ApplyError(ErrorClass.PERMANENT, f"remote refused with {response.status_code}: {detail}")

    async def health(self) -> None:
        client = await self._current_client()
        try:
            response = await client.get(self.health_url)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise ApplyError(ErrorClass.UNAVAILABLE, f"remote {self.settings.url}: {exc}") from None
        if response.status_code != 200:
            raise ApplyError(ErrorClass.UNAVAILABLE, f"remote health {response.status_code}")


def _error_text(response: httpx.Response) -> str:
    try:
        if response.headers.get("content-type", "").endswith("msgpack"):
            return str(msgspec.msgpack.decode(response.content).get("error", ""))
        return str(response.json().get("error", response.text[:200]))
    except (ValueError, msgspec.DecodeError, AttributeError):
        return response.text[:200]
