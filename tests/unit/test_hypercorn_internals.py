"""The hypercorn internals sidecar/http.py leans on are there, in the pinned version range (pyproject.toml).

walcar replaces hypercorn's per-connection task group on trio (AnsweredTaskGroup) so that a request
answered before its body was read releases its connection: hypercorn's own kept the app's channel
full and the connection open until shutdown. A release that renames what it replaces fails here.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import hypercorn.trio.tcp_server
from hypercorn.trio.task_group import TaskGroup, _handle

from sidecar.http import AnsweredTaskGroup


def test_the_installed_hypercorn_is_in_the_pinned_range() -> None:
    major, minor = (int(part) for part in version("hypercorn").split(".")[:2])
    assert (0, 18) <= (major, minor) < (0, 19)


def test_every_trio_connection_takes_the_answered_task_group() -> None:
    assert hypercorn.trio.tcp_server.TaskGroup is AnsweredTaskGroup
    assert "TaskGroup()" in inspect.getsource(hypercorn.trio.tcp_server.TCPServer.run)


def test_spawn_app_and_handle_have_the_signatures_it_replaces_and_calls() -> None:
    assert list(inspect.signature(TaskGroup.spawn_app).parameters) == ["self", "app", "config", "scope", "send"]
    assert list(inspect.signature(_handle).parameters) == [
        "app", "config", "scope", "receive", "send", "sync_spawn", "call_soon"]
