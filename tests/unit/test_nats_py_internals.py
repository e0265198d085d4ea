"""The nats-py internals walcar still leans on are there, in the pinned version range (pyproject.toml).

Each one has a reason it is not public API yet (issue 25): when a nats-py release moves one, this
fails here instead of at a customer's start-up (connection.py), in the middle of a replay (fastpath,
replay/reader.py), or — worse — by silently taking the slow path.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

from nats.aio.client import Client
from nats.aio.subscription import Subscription

from sidecar.log import fastpath


def _release() -> tuple[int, int]:
    major, minor = version("nats-py").split(".")[:2]
    return int(major), int(minor)


def test_the_installed_nats_py_is_in_the_pinned_range() -> None:
    assert (2, 16) <= _release() < (2, 17)


def test_the_replay_fast_path_finds_process_msg_with_the_signature_it_replaces() -> None:
    client = Client()
    assert fastpath.supported(client)
    parameters = list(inspect.signature(Client._process_msg).parameters)
    assert parameters == ["self", "sid", "subject", "reply", "data", "headers"]
    assert inspect.iscoroutinefunction(Client._process_msg)  # fastpath's dispatch replaces it with a coroutine


def test_a_subscription_carries_the_sid_the_fast_path_routes_by() -> None:
    assert "self._id = " in inspect.getsource(Subscription.__init__)


def test_the_connection_checks_read_the_server_info_and_wrap_the_connect_command() -> None:
    client = Client()
    assert isinstance(client._server_info, dict)  # JetStream enabled?, TLS required? (connection.py)
    assert callable(Client._connect_command)  # refused before CONNECT when TLS is configured but not offered
    assert isinstance(Client.ssl_context, property)
