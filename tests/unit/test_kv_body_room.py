"""A KV request's room in its listener's body budget: requests never keep each other waiting."""

from __future__ import annotations

import trio

from sidecar.protocols.kv.body import BodyRoom, HttpError
from sidecar.tcp import ByteBudget

MiB = 1024 * 1024


async def _request(budget: ByteBudget, size: int, answers: dict[str, str], name: str) -> None:
    room = BodyRoom(budget, wait=2.0)
    try:
        await room.hold(2 * size)  # read_body: the body and its decoded values, from Content-Length
        await trio.sleep(0.01)
        await room.hold(2 * size + 64 * 1024)  # decoded: its entries too
        await trio.sleep(0.05)  # journaled and answered
        answers[name] = "200"
    except HttpError as exc:
        answers[name] = str(exc.status)
    finally:
        room.release()


async def test_two_large_bodies_take_turns_instead_of_both_waiting_out_partial_wait() -> None:
    """Each used to hold its body and wait for room for its decoded copy: both held part of the
    budget, both waited for the rest until partial_wait ran out, both answered 503."""
    budget = ByteBudget(16 * MiB)
    answers: dict[str, str] = {}
    with trio.fail_after(1.5):  # well under partial_wait: nobody waited it out
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_request, budget, 6 * MiB, answers, "a")
            nursery.start_soon(_request, budget, 6 * MiB, answers, "b")
    assert answers == {"a": "200", "b": "200"} and budget.used == 0


async def test_a_request_that_holds_room_and_needs_more_is_refused_at_once() -> None:
    budget = ByteBudget(16 * MiB)
    other = BodyRoom(budget, wait=2.0)
    await other.hold(8 * MiB)
    room = BodyRoom(budget, wait=2.0)
    await room.hold(6 * MiB)
    began = trio.current_time()
    try:
        await room.hold(12 * MiB)
    except HttpError as exc:
        assert exc.status == 503 and trio.current_time() - began < 0.5
    else:
        raise AssertionError("held room and waited for more")
    room.release()
    other.release()
    assert budget.used == 0 and budget.refused == 1
