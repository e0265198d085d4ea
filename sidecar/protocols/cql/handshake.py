"""An app connection's handshake: OPTIONS, STARTUP (compression) and the SASL exchange.

Credentials are never checked by the sidecar itself: an AUTH_RESPONSE is
verified by opening an upstream connection with it, so Cassandra's
authenticator (and its answer) is the one the app gets.
"""

from __future__ import annotations

from sidecar.logs import get_logger

from .frames import COMPRESSIONS, Compression, Frame, Opcode, get_compression
from .messages import Authenticate, AuthResponse, AuthSuccess, Error, ErrorCode, Ready, Startup, Supported
from .session import AUTH_STATE, STARTUP_STATE, Client
from .upstream import Upstream, UpstreamRejected, UpstreamUnavailable, plain_username

__all__ = ["Handshake"]

log = get_logger("cql")


class Handshake:
    """Answers the frames of a connection that is not READY yet."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def supported(self) -> Supported:
        cql_versions = self.upstream.supported.get("CQL_VERSION") or ["3.4.7"]
        return Supported({"CQL_VERSION": cql_versions, "COMPRESSION": list(COMPRESSIONS),
                          "PROTOCOL_VERSIONS": ["4/v4"]})

    def handle(self, client: Client, frame: Frame) -> None:
        op = frame.opcode
        if op == Opcode.OPTIONS:
            if client.decode(frame) is not None:
                client.respond(frame.stream, self.supported())
            return
        if op == Opcode.STARTUP and client.state == STARTUP_STATE:
            request = client.decode(frame)
            if request is None:
                return
            startup = request.message
            assert isinstance(startup, Startup)
            name = startup.compression
            compression = get_compression(name)
            if name and compression is None:
                client.respond(frame.stream, Error.protocol_error(f"Unknown compression algorithm: {name}"))
                return
            if self.upstream.authenticator_known:
                self._started(client, frame.stream, compression, self.upstream.cached_authenticator)
            else:
                client.spawn(frame.stream, self._startup, client, frame.stream, compression)
            return
        if op == Opcode.AUTH_RESPONSE and client.state == AUTH_STATE:
            request = client.decode(frame)
            if request is not None:
                client.spawn(frame.stream, self._authenticate, client, frame.stream, request.message)
            return
        expecting = "STARTUP or OPTIONS" if client.state == STARTUP_STATE else "SASL_RESPONSE"
        try:
            name = Opcode(op).name
        except ValueError:
            name = f"opcode {op}"
        client.respond(frame.stream, Error.protocol_error(f"Unexpected message {name}, expecting {expecting}"))

    async def _startup(self, client: Client, stream: int, compression: Compression | None) -> None:
        try:
            authenticator = await self.upstream.authenticator()
        except UpstreamUnavailable as exc:
            client.respond(stream, Error.server_error(f"walcar: {exc}"))
            return
        self._started(client, stream, compression, authenticator)

    def _started(self, client: Client, stream: int, compression: Compression | None,
                 authenticator: str | None) -> None:
        client.decoder.compression = compression
        # The STARTUP answer goes out uncompressed; everything after it is compressed.
        if authenticator is None:
            client.ready()
            client.pool = self.upstream.pool(None, None)
            client.respond(stream, Ready(), compress=False)
        else:
            client.state = AUTH_STATE
            client.respond(stream, Authenticate(authenticator), compress=False)
        client.compression = compression

    async def _authenticate(self, client: Client, stream: int, message: AuthResponse) -> None:
        token = message.token or b""
        user = plain_username(token)
        try:
            await self.upstream.verify(token)
        except UpstreamRejected as exc:
            log.warning("cql_auth_failed", user=user, peer=client.peer, error=exc.error.message)
            client.respond(stream, exc.error)
            return
        except UpstreamUnavailable as exc:
            client.respond(stream, Error(ErrorCode.BAD_CREDENTIALS,
                                         f"Unable to perform authentication: walcar: {exc}"))
            return
        client.token = token
        client.ready()
        client.pool = self.upstream.pool(token, None)
        client.respond(stream, AuthSuccess(None))
