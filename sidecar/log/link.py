"""The sidecar's hot-path NATS connection, in trio: publish, subscribe, nothing else.

Why a second connection next to nats-py's: every write the sidecar acks, and every
entry the drain applies, crosses it (the publish and its PubAck; the pull, the
delivery and its ack). Through nats-py each burst meant hops between the trio thread
and the asyncio thread, and the GIL handed back and forth on each; measured on the
journal benchmark this link is ~1.8x the writes/s and a third of the ack latency at
low load. The JetStream API, KV and the object store stay on nats-py.

The link speaks the protocol through wire.py, answers the server's PINGs, sends its
own (a silent server is a dead one after two intervals), reconnects forever with a
short pause (subscriptions are renewed), tells its users of each loss and each
reconnection, and runs small timers for them (`call_later`) on the trio loop.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import os
import re
import secrets
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from sidecar.log.pool import Server, ServerPool, backoff
from sidecar.log.wire import (
    PING,
    PONG,
    ClientParser,
    Info,
    Ping,
    Pong,
    ServerError,
    ServerMessage,
    WireError,
    encode_connect,
    encode_publish,
    encode_same_to_each,
    encode_sub,
    encode_unsub,
    status_of,
)
from sidecar.logs import get_logger
from sidecar.tls import ClientTls, explain

if TYPE_CHECKING:
    from sidecar.log.options import NatsOptions

log = get_logger("nats")

CONNECT_TIMEOUT: Final = 2.0
MAX_PENDING: Final = 32 * 1024 * 1024  # bytes queued for the socket; beyond it the link refuses more
PING_INTERVAL: Final = 5.0
MAX_OUTSTANDING_PINGS: Final = 2
RECEIVE_SIZE: Final = 256 * 1024
DEFAULT_MAX_PAYLOAD: Final = 1024 * 1024  # nats-server's default, until the server's INFO says

MessageHandler = Callable[[bytes, bytes, bytes, bytes | None], None]  # (subject, reply, payload, header block)


class LinkRefused(Exception):
    """The server answered the handshake with -ERR (bad credentials, for one)."""


class LinkLost(Exception):
    pass


_CREDS_BLOCK = re.compile(r"-{3,}[^\n]*-{3,}\s*\n(.+?)\s*\n\s*-{3,}[^\n]*-{3,}", re.DOTALL)


def creds_signer(path: str) -> Callable[[str], dict[str, str]]:
    """CONNECT fields for a `.creds` file: the user JWT and the nonce signed with its nkey seed.

    Signing needs the `nkeys` package, as it does for nats-py."""
    blocks = _CREDS_BLOCK.findall(Path(path).read_text())
    if len(blocks) < 2:
        raise ValueError(f"{path}: not a NATS credentials file (expected a user JWT and an nkey seed)")
    jwt, seed = blocks[0].strip(), blocks[1].strip()
    try:
        import nkeys
    except ImportError:
        raise ValueError("sidecar.nats_creds needs the `nkeys` package: pip install 'walcar[nkeys]'") from None
    keys = nkeys.from_seed(seed.encode())

    def sign(nonce: str) -> dict[str, str]:
        signature = base64.urlsafe_b64encode(keys.sign(nonce.encode())).rstrip(b"=").decode()
        return {"jwt": jwt, "sig": signature}

    return sign


def new_inbox() -> str:
    return f"_INBOX.{secrets.token_hex(11)}"


def reply_status(headers: bytes | None) -> bytes:
    """The status a server reply carries in its header block (b"404", b"408", ...), or b"": for
    users of the link that read pull replies, without the wire codec."""
    return status_of(headers)


class Timer:
    __slots__ = ("done", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = False  # fired or cancelled: it will not run (again)

    def cancel(self) -> None:
        self.done = True


class NatsLink:
    """One trio connection to NATS; handlers run on the trio loop as messages are read."""

    def __init__(self, url: str, *, creds: str | None = None, name: str = "walcar", tls: ClientTls | None = None,
                 user: str | None = None, password: str | None = None, token: str | None = None,
                 max_pending: int = MAX_PENDING) -> None:
        self.pool = ServerPool(url)
        self.current: Server | None = None  # the server connected to
        self.max_pending = max_pending
        self.name = name
        self.tls = tls
        self._auth = (user, password, token)  # from the config's files; override what a URL carries
        self.connected = False
        self.last_error = ""
        # The server's limit for one message (INFO max_payload): a PUB over it makes the server close
        # the connection, and with it every write in flight, so every publish path checks it first.
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.on_lost: list[Callable[[str], None]] = []  # what was in flight on the lost connection is gone
        self.on_connected: list[Callable[[], None]] = []  # after a (re)connect, subscriptions renewed
        self._sign = creds_signer(creds) if creds else None
        self._subscriptions: dict[int, tuple[str, MessageHandler]] = {}
        self._sids = itertools.count(1)
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._wake = trio.Event()
        self._pings_outstanding = 0
        self._fd: int | None = None  # plain TCP: bytes can go out at once, without waiting for the write loop
        self._writing = False  # the write loop is inside send_all: anything else must queue behind it
        # While a read's messages are handled, what they send (acks, pull requests of many partitions) is
        # gathered and written once at the end: a write to a local server costs far more than its bytes.
        self._corked = False
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_ids = itertools.count()
        self._timers_changed = trio.Event()
        self._after_read: list[Callable[[], None]] = []

    @classmethod
    def from_options(cls, options: NatsOptions, name: str = "walcar") -> NatsLink:
        return cls(options.url, creds=options.creds, name=name, tls=options.tls, user=options.user,
                   password=options.password, token=options.token, max_pending=options.max_pending)

    @property
    def congested(self) -> bool:
        """More than `max_pending` bytes wait for the socket: the server (or the network) is not keeping
        up. Writers refuse new writes (durable=false) instead of queueing without bound."""
        return self._out_bytes >= self.max_pending

    def send(self, data: bytes) -> bool:
        """Write bytes now if the socket takes them, else queue them; False while disconnected or
        congested (nothing is queued then).

        Writing at once (not only from the write loop's next turn) lets the server start on
        the first burst of a scheduling round while trio is still running the rest of it."""
        if not self.connected or self._out_bytes >= self.max_pending:
            return False
        if self._fd is not None and not self._out and not self._writing and not self._corked:
            data = self._write_now(self._fd, data)
            if not data:
                return True
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._corked and not self._wake.is_set():
            self._wake.set()
        return True

    @staticmethod
    def _write_now(fd: int, data: bytes) -> bytes:
        """What the socket did not take of `data` at once."""
        try:
            sent = os.write(fd, data)
        except OSError:  # full (EAGAIN) or broken: the write loop will wait, or report the loss
            sent = 0
        return data[sent:] if sent < len(data) else b""

    def _uncork(self) -> None:
        """Write what the read's handlers sent, in one write if the socket takes it (else the loop does)."""
        self._corked = False
        if not self._out:
            return
        if self._fd is not None and not self._writing:
            rest = self._write_now(self._fd, b"".join(self._out))
            self._out.clear()
            self._out_bytes = len(rest)
            if not rest:
                return
            self._out.append(rest)
        if not self._wake.is_set():
            self._wake.set()

    def publish(self, subject: str, payload: bytes, reply: str = "") -> bool:
        """A core NATS publish, fire and forget (False: disconnected or congested, nothing sent)."""
        return self.send(encode_publish(subject, reply.encode(), None, payload))

    def publish_to_each(self, subjects: list[bytes], payload: bytes) -> bool:
        """`payload` to each subject in one write: many acks ("+ACK" to their reply subjects) at once."""
        return not subjects or self.send(encode_same_to_each(subjects, payload))

    def after_read(self, fn: Callable[[], None]) -> None:
        """Run `fn` once, when every message of the current read has been handled: a handler can
        gather what one read brought and pass it on as one batch."""
        self._after_read.append(fn)

    def subscribe(self, subject: str, handler: MessageHandler) -> int:
        sid = next(self._sids)
        self._subscriptions[sid] = (subject, handler)
        self.send(encode_sub(subject, sid))  # when disconnected, the next handshake subscribes
        return sid

    def unsubscribe(self, sid: int) -> None:
        if self._subscriptions.pop(sid, None) is not None:
            self.send(encode_unsub(sid))

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run `fn` on the trio loop after `delay` seconds (unless cancelled); while `run` runs."""
        timer = Timer(fn)
        deadline = trio.current_time() + delay
        heapq.heappush(self._timers, (deadline, next(self._timer_ids), timer))
        if self._timers[0][2] is timer:
            self._timers_changed.set()
        return timer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, and reconnect forever; `started` after the first attempt, whatever its outcome."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timer_loop)
            await self._connect_loop(task_status)

    async def _timer_loop(self) -> None:
        timers = self._timers
        while True:
            now = trio.current_time()
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)[2]
                if not timer.done:
                    timer.done = True
                    try:
                        timer.fn()
                    except Exception:  # one user's bug must not take the connection down
                        log.error("link_timer_failed", exc_info=True)
            self._timers_changed = trio.Event()
            with trio.move_on_at(timers[0][0] if timers else float("inf")):
                await self._timers_changed.wait()

    async def _connect_loop(self, task_status: trio.TaskStatus[None]) -> None:
        failures = 0  # attempts since the last connection: a full round over the pool waits, with jitter
        started = False
        while True:
            server = self.pool.pick()
            try:
                stream, parser = await self._open(server)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError, WireError,
                    LinkRefused, LinkLost) as exc:
                error = explain(exc, "sidecar.nats_tls")
                if error != self.last_error:
                    log.warning("nats_link_connect_failed", host=server.host, port=server.port, error=error)
                self.last_error = error
                failures += 1
                if not started:
                    task_status.started()
                    started = True
                if failures % len(self.pool) == 0:  # else: the next server at once
                    await trio.sleep(backoff(failures // len(self.pool)))
                continue
            failures = 0
            if not started:
                task_status.started()
                started = True
            log.info("nats_link_connected", host=server.host, port=server.port, discovered=server.discovered)
            self.last_error = ""
            self.current = server
            reason = await self._serve(stream, parser)
            self.current = None
            self.last_error = reason
            log.warning("nats_link_lost", host=server.host, port=server.port, error=reason)

    async def _open(self, server: Server) -> tuple[trio.abc.Stream, ClientParser]:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream: trio.abc.Stream = await trio.open_tcp_stream(server.host, server.port)
            try:
                parser = ClientParser()
                tls = self.tls
                if tls is not None and tls.handshake_first:
                    stream = await self._start_tls(stream, server)
                info = await self._next(stream, parser, Info)
                assert isinstance(info, Info)
                self.max_payload = int(info.fields.get("max_payload") or DEFAULT_MAX_PAYLOAD)
                self._discover(info.fields, server)
                fields = info.fields
                wanted = server.tls or tls is not None
                if not isinstance(stream, trio.SSLStream) and (wanted or fields.get("tls_required")):
                    # fail closed: TLS was asked for, never fall back to plain text
                    if not (fields.get("tls_required") or fields.get("tls_available")):
                        raise LinkRefused("the server does not offer TLS, and TLS is configured")
                    stream = await self._start_tls(stream, server)
                options = self._connect_options(server, info.fields)
                await stream.send_all(encode_connect(options) + PING)
                await self._next(stream, parser, Pong)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return stream, parser

    async def _start_tls(self, stream: trio.abc.Stream, server: Server) -> trio.SSLStream[trio.abc.Stream]:
        # asked at each connect: a rotated CA or client certificate is read here
        context = self.tls.context() if self.tls is not None else ssl.create_default_context()
        name = (self.tls.server_name if self.tls is not None else None) or server.tls_name or server.host
        ssl_stream = trio.SSLStream(stream, context, server_hostname=name)
        await ssl_stream.do_handshake()
        return ssl_stream

    def _connect_options(self, server: Server, info: dict[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {
            "verbose": False, "pedantic": False, "tls_required": server.tls or self.tls is not None, "name": self.name,
            "lang": "python3-walcar", "version": "1", "protocol": 1, "headers": True, "no_responders": True,
            "echo": False,
        }
        user, password, token = self._auth
        if user is None and token is None:
            user, password, token = server.user, server.password, server.token
        if user is not None:
            options.update(user=user, **{"pass": password or ""})
        if token is not None:
            options["auth_token"] = token
        if self._sign is not None:
            options.update(self._sign(str(info.get("nonce", ""))))
        return options

    async def _next(self, stream: trio.abc.Stream, parser: ClientParser, wanted: type) -> object:
        """Read until an event of type `wanted`; -ERR during the handshake is a refusal."""
        while True:
            event = parser.next_event()
            if event is None:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    raise LinkLost("server closed the connection during the handshake")
                parser.feed(data)
                continue
            if isinstance(event, wanted):
                return event
            if isinstance(event, ServerError):
                raise LinkRefused(event.message)
            if isinstance(event, Ping):
                await stream.send_all(PONG)

    async def _serve(self, stream: trio.abc.Stream, parser: ClientParser) -> str:
        """Until the connection breaks; returns why. What was queued but not written is dropped."""
        self._out.clear()
        self._out_bytes = 0
        self._pings_outstanding = 0
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None
        self.connected = True
        # Subscriptions made while away (or before a reconnect) are renewed before anything else is sent.
        self.send(b"".join(encode_sub(subject, sid) for sid, (subject, _) in self._subscriptions.items()))
        for hook in list(self.on_connected):
            hook()
        reason = "connection closed"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop, stream)
                nursery.start_soon(self._ping_loop)
                await self._read_loop(stream, parser)
        except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, WireError,
                 LinkLost) as group:
            reason = "; ".join(f"{type(e).__name__}: {e}" for e in group.exceptions)
        finally:
            self.connected = False
            self._fd = None
            self._out.clear()
            self._out_bytes = 0
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
        for lost in list(self.on_lost):
            lost(reason)
        return reason

    def _discover(self, info: dict[str, Any], server: Server) -> None:
        added = self.pool.discover(list(info.get("connect_urls") or []), server)
        if added:
            log.info("nats_link_discovered", servers=",".join(f"{s.host}:{s.port}" for s in added))

    def _on_info(self, info: dict[str, Any]) -> None:
        """An INFO while connected: the cluster changed, or this server is going away."""
        current = self.current
        if current is None:
            return
        self._discover(info, current)
        if info.get("ldm"):
            # Lame-duck mode: the server takes no new clients and will close this connection at some
            # point in its lame-duck period. Move now, to a server that stays, rather than then.
            self.pool.lame_duck(current)
            log.warning("nats_link_lame_duck", host=current.host, port=current.port)
            raise LinkLost(f"{current.host}:{current.port} entered lame-duck mode: moving to another server")

    async def _write_loop(self, stream: trio.abc.Stream) -> None:
        while True:
            if not self._out:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            data = b"".join(self._out)
            self._out.clear()
            self._out_bytes = 0
            self._writing = True
            try:
                await stream.send_all(data)
            finally:
                self._writing = False

    async def _ping_loop(self) -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            if self._pings_outstanding >= MAX_OUTSTANDING_PINGS:
                raise LinkLost(f"no PONG from the server in {PING_INTERVAL * MAX_OUTSTANDING_PINGS:g}s")
            self._pings_outstanding += 1
            self.send(PING)

    async def _read_loop(self, stream: trio.abc.Stream, parser: ClientParser) -> None:
        subscriptions = self._subscriptions
        while True:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise LinkLost("server closed the connection")
            parser.feed(data)
            self._corked = True
            try:
                while (event := parser.next_event()) is not None:
                    if type(event) is ServerMessage:
                        subscription = subscriptions.get(event.sid)
                        if subscription is not None:  # else unsubscribed, and the server had not heard yet
                            subscription[1](event.subject, event.reply, event.payload, event.headers)
                    elif type(event) is Ping:
                        self.send(PONG)
                    elif type(event) is Pong:
                        self._pings_outstanding = 0
                    elif type(event) is ServerError:
                        log.warning("nats_link_server_error", error=event.message)
                    elif type(event) is Info:
                        self._on_info(event.fields)
            finally:  # what was handled before a bad frame is still passed on
                try:
                    while self._after_read:
                        hooks, self._after_read = self._after_read, []
                        for hook in hooks:
                            hook()
                finally:
                    self._uncork()
