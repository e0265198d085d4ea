"""The KV listener's pure bits: which response bytes wait for their body, the over-the-cap answer."""

from __future__ import annotations

import h11

from sidecar.protocols.kv.server import TOO_MANY, _is_final_head


def head(status: int) -> bytes:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
    connection.next_event()
    return connection.send(h11.Response(status_code=status, headers=[(b"content-length", b"2")]))  # type: ignore[return-value]


def test_a_final_head_waits_for_its_body_an_informational_one_does_not() -> None:
    assert _is_final_head(head(200)) and _is_final_head(head(503))
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n")
    connection.next_event()
    informational = connection.send(h11.InformationalResponse(status_code=100, headers=[]))
    assert informational is not None and not _is_final_head(informational)  # the client waits for it
    assert not _is_final_head(b"ok") and not _is_final_head(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n")


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
