"""The admin HTTP endpoint (Envoy-style).

    GET  /healthz                          the process is alive
    GET  /readyz                           200 only when the journal is connected and every listener bound
    GET  /metrics                          Prometheus text
    GET  /v1/drain                         status per namespace/target
    POST /v1/drain/{ns}/{target}/pause     stop applying (kept across restarts); .../resume
    GET  /v1/dlq/{ns}?target=&after=&limit=   dead letters, paged by sequence
    GET  /v1/dlq/{ns}/{seq}                one dead letter, whole, with its error headers
    POST /v1/dlq/{ns}/replay|purge         by target, sequence range or list, key glob
    GET  /v1/config                        the effective config, secrets redacted
    GET  /v1/namespaces                    each namespace in force: source (file or bucket), revision, mode, targets
    POST /v1/shutdown                      graceful shutdown (what `walcar drain --wait` calls)
    POST /v1/replay                        start a point-in-time replay in this sidecar (progress: /v1/drain)
    POST /v1/replay/{id}/stop              stop it cleanly

Who may call what (docs/security.md):
- /healthz, /readyz, /metrics carry no values: open, and the only routes of the
  `sidecar.metrics` port (the one kubelet probes and Prometheus scrape).
- GET /v1/drain carries counts and states, no values: open on the admin port.
- Every mutation (POST), GET /v1/config and GET /v1/dlq/... need `Authorization:
  Bearer <token>` when `admin_token_file` is set; without a token the admin port is
  loopback-only (config validation) and a request must name a loopback Host.
- Mutations take `Content-Type: application/json` only, and any request carrying an
  `Origin` header (a browser) is refused: a web page cannot forge an admin call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import msgspec

from sidecar import config as config_mod
from sidecar.admin import metrics
from sidecar.admin.dlq import DlqFilter
from sidecar.http import Receive, Scope, Send, respond, serve_lifespan
from sidecar.secrets import bearer_matches, browser_refusal

if TYPE_CHECKING:
    from sidecar.admin.view import SidecarView


PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


class AdminError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminApp:
    def __init__(self, sidecar: SidecarView, token: str | None = None, metrics_only: bool = False) -> None:
        self.sidecar = sidecar
        self.token = token
        self.metrics_only = metrics_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            status, body, content_type = await self._route(scope, receive)
        except AdminError as exc:
            status, body, content_type = exc.status, msgspec.json.encode({"error": exc.message}), b"application/json"
        except Exception as exc:  # a bug: say so, keep serving
            status, body, content_type = 500, msgspec.json.encode({"error": f"{type(exc).__name__}: {exc}"}), \
                b"application/json"
        await respond(send, status, body, content_type)

    @staticmethod
    def _json(status: int, body: object) -> tuple[int, bytes, bytes]:
        return status, msgspec.json.encode(body), b"application/json"

    def _authorize(self, scope: Scope, mutation: bool = True) -> None:
        """A mutation, or a read that reveals values or config: an operator's tool with the token."""
        headers = dict(scope.get("headers") or [])
        refusal = browser_refusal(headers, bool(self.token))
        if refusal is not None:
            raise AdminError(403, refusal)
        if self.token and not bearer_matches(headers.get(b"authorization"), self.token):
            raise AdminError(401, "this call needs Authorization: Bearer <admin token> (sidecar.admin_token_file)")
        if mutation:
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if content_type != b"application/json":
                raise AdminError(415, "admin mutations take Content-Type: application/json")

    async def _body(self, receive: Receive) -> bytes:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, bytes, bytes]:
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        sidecar = self.sidecar
        if path == "/metrics" and method == "GET":
            if sidecar.poller is not None:
                await sidecar.poller.current()  # a scrape is demand: it keeps the drain status fresh
            return 200, metrics.render(sidecar, sidecar.poller), PROMETHEUS_TEXT
        if self.metrics_only and path not in OPEN_PATHS:
            raise AdminError(404, "this port serves only /metrics, /healthz and /readyz")
        if path == "/healthz" and method == "GET":
            return self._json(200, {"status": "alive"})
        if path == "/readyz" and method == "GET":
            reasons = sidecar.state.not_ready_reasons()
            return self._json(503, {"status": "not ready", "reasons": reasons}) if reasons \
                else self._json(200, {"status": "ready"})
        if path == "/v1/namespaces" and method == "GET":
            self._authorize(scope, mutation=False)
            return self._json(200, self._namespaces())
        if path == "/v1/config" and method == "GET":
            self._authorize(scope, mutation=False)
            return self._json(200, config_mod.to_builtins(sidecar.config))
        if path == "/v1/shutdown" and method == "POST":
            self._authorize(scope)
            sidecar.request_shutdown("admin /v1/shutdown")
            return self._json(202, {"status": "shutting down",
                                    "deadline_s": float(sidecar.config.sidecar.shutdown_deadline)})
        parts = path.strip("/").split("/")
        if parts[:2] == ["v1", "replay"]:
            return await self._replay(scope, receive, method, parts[2:])
        if parts[:2] == ["v1", "drain"]:
            return await self._drain(scope, method, parts[2:])
        if parts[:2] == ["v1", "dlq"] and len(parts) >= 3:
            return await self._dlq(scope, receive, method, parts[2], parts[3:], query)
        raise AdminError(404, f"no route for {method} {path}")

    def _namespaces(self) -> dict[str, object]:
        live = self.sidecar.live
        summary = live.summary() if live is not None else {"namespaces": [], "stale_since": None, "apply_errors": 0}
        for row in summary["namespaces"]:
            ns = self.sidecar.config.namespaces.get(row["namespace"])
            if ns is not None:
                row["mode"] = ns.mode
                row["targets"] = [t.name for t in ns.targets]
        return summary

    async def _drain(self, scope: Scope, method: str, rest: list[str]) -> tuple[int, bytes, bytes]:
        sidecar = self.sidecar
        if not rest and method == "GET":
            rows = await sidecar.poller.current() if sidecar.poller is not None else []
            config = sidecar.live.summary() if sidecar.live is not None else None
            return self._json(200, {"targets": rows, "replays": sidecar.replay_progress(), "config": config})
        if len(rest) == 3 and rest[2] in ("pause", "resume"):
            if method != "POST":
                raise AdminError(405, "pause and resume are POST")
            self._authorize(scope)
            namespace, target, action = rest
            ns = sidecar.config.namespaces.get(namespace)
            if ns is None or ns.target(target) is None:
                raise AdminError(404, f"no target {target!r} in namespace {namespace!r}")
            if sidecar.pauses is None:
                raise AdminError(503, "the journal is not open yet")
            await sidecar.pauses.set(namespace, target, action == "pause")
            return self._json(200, {"namespace": namespace, "target": target, "paused": action == "pause"})
        raise AdminError(404, f"no route for {method} /v1/drain/{'/'.join(rest)}")

    async def _replay(self, scope: Scope, receive: Receive, method: str, rest: list[str]) -> tuple[int, bytes, bytes]:
        if method != "POST":
            raise AdminError(405, "replay calls are POST (progress is in GET /v1/drain)")
        self._authorize(scope)
        from sidecar.replay.request import ReplayError, ReplayRequest, decode_request, refuse_local_only

        if len(rest) == 2 and rest[1] == "stop":
            if not self.sidecar.stop_replay(rest[0]):
                raise AdminError(404, f"no replay job {rest[0]!r}")
            return self._json(200, {"id": rest[0], "stopping": True})
        if rest:
            raise AdminError(404, f"no route for POST /v1/replay/{'/'.join(rest)}")
        try:
            request = decode_request(await self._body(receive), ReplayRequest)
            refuse_local_only(request)
            job = await self.sidecar.start_replay(request)
        except ReplayError as exc:
            raise AdminError(400 if exc.exit_code == 2 else 503, exc.message) from None
        return self._json(202, job.progress)

    async def _dlq(self, scope: Scope, receive: Receive, method: str, namespace: str, rest: list[str],
                   query: dict[str, list[str]]) -> tuple[int, bytes, bytes]:
        sidecar = self.sidecar
        # Dead letters carry the journaled values: listing them is as sensitive as changing them.
        self._authorize(scope, mutation=method != "GET")
        if namespace not in sidecar.config.namespaces:
            raise AdminError(404, f"unknown namespace {namespace!r}")
        letters = sidecar.dead_letters
        if letters is None:
            raise AdminError(503, "the journal is not open yet")
        if not rest and method == "GET":
            flt = DlqFilter(target=_query_value(query, "target"), seq_from=int(_query_value(query, "after") or 0) + 1,
                            key=_query_value(query, "key"))
            limit = min(1000, int(_query_value(query, "limit") or 100))
            page = await letters.list(namespace, flt, limit=limit)
            next_after = page[-1].seq if len(page) == limit else None
            return self._json(200, {"dead_letters": page, "next_after": next_after})
        if len(rest) == 1 and rest[0].isdigit() and method == "GET":
            letter = await letters.show(namespace, int(rest[0]))
            if letter is None:
                raise AdminError(404, f"no dead letter {rest[0]} in namespace {namespace!r}")
            return self._json(200, letter)
        if len(rest) == 1 and rest[0] in ("replay", "purge"):
            if method != "POST":
                raise AdminError(405, f"{rest[0]} is POST")
            body = await self._body(receive)
            try:
                flt = msgspec.json.decode(body or b"{}", type=DlqFilter)
            except msgspec.DecodeError as exc:
                raise AdminError(400, f"bad filter: {exc}") from None
            if rest[0] == "replay":
                return self._json(200, await letters.replay(namespace, flt))
            return self._json(200, await letters.purge(namespace, flt))
        raise AdminError(404, f"no route for {method} /v1/dlq/{namespace}/{'/'.join(rest)}")


def _query_value(query: dict[str, list[str]], name: str) -> str | None:
    """The first value of a query parameter, or None when the request has none."""
    values = query.get(name)
    return values[0] if values else None
