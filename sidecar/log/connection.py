"""The sidecar's one NATS connection: connect (retrying), check the server, watch its state."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from nats.aio.client import Client

from sidecar.log.bridge import AsyncioBridge
from sidecar.log.options import CredentialsError, NatsOptions
from sidecar.logs import get_logger
from sidecar.secrets import redact_urls
from sidecar.tls import ClientTls, TlsError, explain

if TYPE_CHECKING:
    from sidecar.log.link import NatsLink

log = get_logger("nats")

MIN_SERVER_VERSION = (2, 12)


class ServerTooOld(RuntimeError):
    pass


class _Client(Client):
    """nats-py's client, asking for the TLS context at each (re)connect: rotated files are read then."""

    walcar_tls: ClientTls | None = None

    @property
    def ssl_context(self) -> ssl.SSLContext:
        if self.walcar_tls is not None:
            return self.walcar_tls.context()
        return super().ssl_context

    def _connect_command(self) -> bytes:
        # nats-py goes on in plain text when the server does not ask for TLS: with TLS configured,
        # fail closed before CONNECT (and its credentials) is sent
        if self.walcar_tls is not None and not self.walcar_tls.handshake_first \
                and not self._server_info.get("tls_required"):
            raise NoTlsOffered("the server does not offer TLS, and sidecar.nats_tls is set")
        return super()._connect_command()


class NoTlsOffered(ssl.SSLError):
    pass


def _closed_on_us(exc: BaseException | None) -> bool:
    return isinstance(exc, ConnectionResetError | BrokenPipeError | ssl.SSLEOFError | ssl.SSLZeroReturnError)


def _refused_for_good(exc: BaseException | None) -> bool:
    """A TLS verification failure or an authorization refusal: retrying at startup cannot help."""
    if isinstance(exc, ssl.SSLError):
        return not isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError)
    return "authorization violation" in str(exc).lower()




class JetStreamApiError(RuntimeError):
    def __init__(self, subject: str, error: dict[str, Any]) -> None:
        self.code = int(error.get("code", 0))
        self.err_code = int(error.get("err_code", 0))
        self.description = str(error.get("description", "unknown error"))
        super().__init__(f"{subject}: {self.description} (code {self.code}, err_code {self.err_code})")


class NatsConnection:
    """Owns the nats-py client; lives on the bridge's asyncio loop, reported to trio."""

    def __init__(self, bridge: AsyncioBridge, url: str, creds: str | None = None, name: str = "walcar",
                 options: NatsOptions | None = None) -> None:
        self.bridge = bridge
        self.options = options or NatsOptions(url, creds)
        self.url = redact_urls(url)  # what logs and errors show: never a password
        self.creds = creds
        self.name = name
        self.nc: Client | None = None
        self.connected = False
        self.server_version = ""
        self.last_error = ""
        self._reconnect_hooks: list[Callable[[], Awaitable[None]]] = []
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._reconnected = trio.Event()
        self._state_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._connect_error: BaseException | None = None
        # The trio connection for the hot paths (journal writes, drain pulls and acks): open_journal sets it.
        self.link: NatsLink | None = None

    def on_reconnect(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` (in trio) after every reconnect, e.g. to re-provision streams."""
        self._reconnect_hooks.append(hook)

    def to_trio(self, fn: Callable[[], None]) -> None:
        """From the NATS thread: run `fn` on the trio thread soon (nothing if trio is gone)."""
        if self._trio_token is None:
            return
        try:
            self._trio_token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    def _set_state(self, connected: bool, error: str = "") -> None:
        self.connected = connected
        if error:
            self.last_error = error
        if connected:
            self._reconnected.set()
            self._reconnected = trio.Event()
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def wait_state_change(self) -> None:
        await self._state_changed.wait()

    async def connect(self, retry_for: float = 0.0) -> None:
        """Connect, retrying for `retry_for` seconds; then check the server version."""
        self._trio_token = trio.lowlevel.current_trio_token()
        deadline = trio.current_time() + retry_for
        delay = 0.1
        while True:
            self._connect_error = None
            try:
                self.nc = await self.bridge.run(self._connect_async)
                break
            except (ServerTooOld, TlsError, CredentialsError):
                raise
            except Exception as exc:  # nats-py raises several unrelated types when unreachable
                cause = self._connect_error if isinstance(exc, TimeoutError) and self._connect_error else exc
                self.last_error = explain(cause, "sidecar.nats_tls")
                if self.options.tls is not None and self.options.tls.files[1] is None and _closed_on_us(cause):
                    # TLS 1.3: a server that wants a client certificate may close the connection right
                    # after the handshake, before its alert can be read: say what that most likely means.
                    self.last_error += (": the server closed the TLS connection after the handshake; it most likely "
                                        "requires a client certificate (set sidecar.nats_tls.cert_file and key_file)")
                elif self.options.tls is not None and _closed_on_us(cause):
                    self.last_error += (": the server closed the TLS connection after the handshake; it most likely "
                                        "refused our client certificate (expired, or signed by a CA it does not "
                                        "trust: check sidecar.nats_tls.cert_file)")
                if _refused_for_good(cause):
                    # a wrong CA, certificate or password: waiting will not mend it
                    raise ConnectionError(f"cannot connect to NATS at {self.url}: {self.last_error}") from None
                if trio.current_time() + delay > deadline:
                    raise ConnectionError(f"cannot connect to NATS at {self.url}: {self.last_error}") from None
                log.warning("nats_connect_retry", url=self.url, error=self.last_error, retry_in=f"{delay:.1f}s")
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self._set_state(True)
        log.info("nats_connected", url=self.url, server_version=self.server_version)

    async def _connect_async(self) -> Client:
        async def disconnected() -> None:
            if not self._closing:
                log.warning("nats_disconnected", url=self.url)
            self.to_trio(lambda: self._set_state(False, "disconnected"))

        async def reconnected() -> None:
            log.info("nats_reconnected", url=self.url)
            self.to_trio(self._after_reconnect)

        async def lame_duck() -> None:
            # nats-py only reports lame-duck mode; like the link, move now rather than when the server
            # closes the connection. Scheduled after this INFO is parsed: the parser is mid-buffer here.
            nc = self.nc
            log.warning("nats_lame_duck", url=self.url)
            if nc is not None:
                self.bridge.spawn(lambda: nc._process_op_err(ConnectionError("server in lame-duck mode")))

        async def error(exc: Exception) -> None:
            self._connect_error = exc  # why a first connect that times out did so
            self.to_trio(lambda: setattr(self, "last_error", explain(exc, "sidecar.nats_tls")))

        options: dict[str, Any] = {
            "servers": [u.strip() for u in self.options.url.split(",")],
            "name": self.name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "connect_timeout": 2,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
            "skip_subject_validation": True,
            # While disconnected, nats-py would buffer publishes and send them on reconnect;
            # the journal refuses writes while disconnected instead, so keep the buffer small.
            "pending_size": 8 * 1024 * 1024,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
            "lame_duck_mode_cb": lame_duck,
        }
        options.update(self._auth_options())
        nc = _Client()
        nc.walcar_tls = self.options.tls
        # nats-py retries a first connect forever when reconnects are unlimited: one bounded round
        # here, and `connect` decides whether to try again (and says why it failed).
        attempt = (options["connect_timeout"] + options["reconnect_time_wait"]) * len(options["servers"]) + 1
        try:
            await asyncio.wait_for(nc.connect(**options), attempt)
        except BaseException:
            try:
                await nc.close()
            except Exception:  # half-open: nothing more to release
                pass
            raise
        version = nc.connected_server_version
        self.server_version = f"{version.major}.{version.minor}.{version.patch}"
        if (version.major, version.minor) < MIN_SERVER_VERSION:
            await nc.close()
            raise ServerTooOld(
                f"nats-server {self.server_version} at {self.url} is too old: walcar needs >= "
                f"{MIN_SERVER_VERSION[0]}.{MIN_SERVER_VERSION[1]} (atomic batch publish, message schedules)"
            )
        if not nc._server_info.get("jetstream"):
            await nc.close()
            raise ServerTooOld(f"nats-server at {self.url} has JetStream disabled: start it with -js")
        return nc

    def _auth_options(self) -> dict[str, Any]:
        """Credentials and TLS as nats-py takes them; the files were read by NatsOptions."""
        opts = self.options
        extra: dict[str, Any] = {}
        if opts.creds:
            extra["user_credentials"] = opts.creds
        if opts.user is not None:
            extra.update(user=opts.user, password=opts.password or "")
        if opts.token is not None:
            extra["token"] = opts.token
        if opts.tls is not None:
            extra["tls"] = opts.tls.context()
            extra["tls_handshake_first"] = opts.tls.handshake_first
            if opts.tls.server_name:
                extra["tls_hostname"] = opts.tls.server_name
        return extra

    def _after_reconnect(self) -> None:
        self._set_state(True)
        for hook in self._reconnect_hooks:
            self._spawn_hook(hook)

    def _spawn_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(hook)

    def attach(self, nursery: trio.Nursery) -> None:
        """Reconnect hooks run in this nursery."""
        self._nursery = nursery

    async def key_value(self, bucket: str, ttl: float = 0.0, history: int = 1, replicas: int = 1) -> Any:
        """A nats-py KeyValue bucket (for use on the NATS thread), created if missing.

        Several sidecars may race to create it: whoever loses binds to the winner's."""
        nc = self._require()

        async def open_bucket() -> Any:
            from nats.js.api import KeyValueConfig

            js = nc.jetstream()
            try:
                return await js.key_value(bucket)
            except Exception:  # not there yet (nats-py raises several types)
                try:
                    return await js.create_key_value(KeyValueConfig(bucket=bucket, ttl=ttl or None, history=history,
                                                                    replicas=replicas))
                except Exception:
                    return await js.key_value(bucket)

        return await self.bridge.run(open_bucket)

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 5.0) -> bytes:
        nc = self._require()

        async def call() -> bytes:
            msg = await nc.request(subject, payload, timeout=timeout)
            return msg.data

        return await self.bridge.run(call)

    async def js_api(self, subject: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
        """A JetStream API call ($JS.API.<subject>), raising JetStreamApiError on an error reply."""
        payload = json.dumps(body).encode() if body is not None else b""
        data = await self.request(f"$JS.API.{subject}", payload, timeout)
        reply: dict[str, Any] = json.loads(data) if data else {}
        if "error" in reply:
            raise JetStreamApiError(subject, reply["error"])
        return reply

    def _require(self) -> Client:
        if self.nc is None:
            raise ConnectionError("not connected to NATS")
        return self.nc

    async def close(self) -> None:
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        self._closing = True

        async def close_it() -> None:
            # drain() would flush subscriptions; close() is enough once the writer has settled.
            await nc.close()

        try:
            await self.bridge.run(close_it, timeout=5)
        except Exception as exc:  # closing a broken connection can fail in many ways; nothing to do
            log.warning("nats_close_failed", error=str(exc))
        self._set_state(False)
