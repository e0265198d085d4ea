"""Passing app requests to Cassandra over the pooled upstream connections, and waiting for answers.

A forwarded request goes out as the raw frame the app sent, and Cassandra's
response is relayed back unchanged under the app's stream id.  An EXECUTE of a
statement Cassandra forgot (it restarted) is prepared again and retried once.
"""

from __future__ import annotations

from typing import Final

import trio

from .frames import Frame, Opcode
from .messages import Error, ErrorCode, Prepare, decode_response
from .prepared import PreparedInfo
from .session import Client
from .types import CqlProtocolError
from .upstream import Upstream, UpstreamConnection, UpstreamPool, UpstreamUnavailable

__all__ = ["ROUNDTRIP_TIMEOUT", "Forwarder"]

ROUNDTRIP_TIMEOUT: Final = 120.0  # bound for synchronous pass-through (DDL on a busy cluster is slow)


class Forwarder:
    """Raw request/response relaying between app connections and the upstream pools."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def pool(self, client: Client) -> UpstreamPool:
        """The client's pool (its credentials and keyspace), opened again if it was evicted."""
        pool = client.pool
        if pool is None or pool.evicted:
            pool = client.pool = self.upstream.pool(client.token, client.keyspace)
        return pool

    def forward(self, client: Client, frame: Frame, info: PreparedInfo | None = None) -> None:
        """Pass a request to Cassandra as is; its response goes back under the app's stream id."""
        conn = self.pool(client).pick()
        if conn is None or not self._send(client, conn, frame, info):
            client.spawn(frame.stream, self.forward_async, client, frame, info)

    async def forward_async(self, client: Client, frame: Frame, info: PreparedInfo | None = None) -> None:
        conn = await self.pool(client).acquire()
        if not self._send(client, conn, frame, info):
            raise UpstreamUnavailable("no free stream on the connection to Cassandra")

    def _send(self, client: Client, conn: UpstreamConnection, frame: Frame, info: PreparedInfo | None) -> bool:
        stream = frame.stream

        def on_response(resp: Frame | None) -> None:
            client.inflight -= 1
            if resp is None:
                client.respond(stream, Error.server_error("walcar: the connection to Cassandra was lost "
                                                          "before it answered"))
            elif info is not None and resp.opcode == Opcode.ERROR and _is_unprepared(resp):
                client.spawn(stream, self._reprepare_and_retry, client, frame, info)
            else:
                client.relay(stream, resp)

        client.inflight += 1
        if conn.send(frame.opcode, frame.flags, frame.body, on_response):
            return True
        client.inflight -= 1
        return False

    async def roundtrip(self, pool: UpstreamPool, frame: Frame) -> Frame:
        """Send a raw request and wait for its raw response."""
        conn = await pool.acquire()
        done = trio.Event()
        box: list[Frame | None] = []

        def on_response(resp: Frame | None) -> None:
            box.append(resp)
            done.set()

        if not conn.send(frame.opcode, frame.flags, frame.body, on_response):
            raise UpstreamUnavailable("no free stream on the connection to Cassandra")
        with trio.move_on_after(ROUNDTRIP_TIMEOUT):
            await done.wait()
        if not box or box[0] is None:
            raise UpstreamUnavailable("the connection to Cassandra was lost before it answered")
        return box[0]

    async def _reprepare_and_retry(self, client: Client, frame: Frame, info: PreparedInfo) -> None:
        """Cassandra forgot a statement the sidecar knows (it restarted): prepare it again, then retry once."""
        pool = self.upstream.pool(client.token, info.keyspace)
        conn = await pool.acquire()
        reply = (await conn.request(Prepare(info.query), self.upstream.request_timeout)).message
        if isinstance(reply, Error):
            client.respond(frame.stream, reply)
            return
        if not self._send(client, conn, frame, None):
            raise UpstreamUnavailable("no free stream on the connection to Cassandra")


def _is_unprepared(frame: Frame) -> bool:
    try:
        message = decode_response(frame).message
    except CqlProtocolError:
        return False
    return isinstance(message, Error) and message.code == ErrorCode.UNPREPARED
