"""The KV listener's pure bits: the over-the-cap answer."""

from __future__ import annotations

import h11

from sidecar.protocols.kv.server import TOO_MANY


def test_the_answer_over_the_cap_is_one_complete_http_response() -> None:
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/", headers=[(b"host", b"x")]))
    connection.receive_data(TOO_MANY)
    response = connection.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 503
    assert (b"retry-after", b"1") in response.headers and (b"connection", b"close") in response.headers
    body = connection.next_event()
    assert isinstance(body, h11.Data) and b"max_connections" in body.data
    assert isinstance(connection.next_event(), h11.EndOfMessage)
