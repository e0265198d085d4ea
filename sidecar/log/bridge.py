"""nats-py is asyncio-only; the sidecar is trio. This runs one asyncio loop on a thread.

Crossing the thread boundary costs a few microseconds each way, so the hot path
(the journal writer) crosses once per batch; `run` here is for control-plane calls
(stream provisioning, consumer info, DLQ operations) where one crossing per call is fine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class BridgeClosed(RuntimeError):
    pass


class AsyncioBridge:
    def __init__(self, name: str = "walcar-nats") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = threading.Event()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        try:
            self.loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    def start(self) -> AsyncioBridge:
        self._thread.start()
        self._started.wait()
        return self

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a plain function on the asyncio thread (fire and forget)."""
        if self._closed:
            raise BridgeClosed("the NATS thread is closed")
        self.loop.call_soon_threadsafe(fn, *args)

    def spawn(self, factory: Callable[[], Awaitable[Any]]) -> None:
        """Start `factory()` as a task on the asyncio loop (fire and forget, referenced until done)."""
        self.call_soon(self._spawn, factory)

    def _spawn(self, factory: Callable[[], Awaitable[Any]]) -> None:
        task: asyncio.Task[Any] = self.loop.create_task(factory())  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, factory: Callable[[], Awaitable[T]], timeout: float | None = None) -> T:
        """Await `factory()` on the asyncio loop from trio; cancelling the trio side cancels it."""
        if self._closed:
            raise BridgeClosed("the NATS thread is closed")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        async def wrapped() -> T:
            if timeout is None:
                return await factory()
            return await asyncio.wait_for(factory(), timeout)

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(wrapped(), self.loop)

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

