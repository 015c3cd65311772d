"""What every protocol hub needs to carry a ``core/`` machine's effects out over time.

* ``Background``: work no connection waits for (a timer's effects, another node's message, a
  lease lost at renewal) runs as a task of its own; the hub stops them all at shutdown, and a
  failure is logged with its traceback (a bug: clients' faults never get this far).
* ``DeadlineTimer``: one event-loop timer standing for the machine's ``next_deadline()``
  (``core/effects.py``): armed after every batch of effects, it calls ``on_timer(now)`` when due.
  A timer that would fire early is left alone: ``on_timer`` finds nothing due then, and the timer
  is armed again for what is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any


class Background:
    """Tasks of one hub that no connection waits for."""

    __slots__ = ("_log", "_tasks")

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._tasks: set[asyncio.Future[Any]] = set()

    def run(self, work: Awaitable[Any] | None) -> None:
        """Run ``work`` (if any) on its own."""
        if work is None:
            return
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("background work failed", exc_info=task.exception())

    async def settle(self, grace: float) -> None:
        """Let the running work finish, for at most ``grace`` seconds."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    async def stop(self) -> None:
        """Cancel what still runs and wait until it has stopped."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


class DeadlineTimer:
    """One loop timer at ``next_deadline()``; when due, ``fire(now)`` runs (its result, if a
    coroutine, in ``background``)."""

    __slots__ = ("_at", "_background", "_fire", "_handle", "_next_deadline")

    def __init__(
        self,
        next_deadline: Callable[[], float | None],
        fire: Callable[[float], Awaitable[Any] | None],
        background: Background,
    ) -> None:
        self._next_deadline = next_deadline
        self._fire = fire
        self._background = background
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def arm(self) -> None:
        deadline = self._next_deadline()
        if deadline is None:
            return
        if self._handle is not None:
            if self._at <= deadline:
                return  # due soon enough: it arms itself again when it fires
            self._handle.cancel()
        self._at = deadline
        self._handle = asyncio.get_running_loop().call_at(deadline, self._due)

    def _due(self) -> None:
        self._handle = None
        self._background.run(self._fire(self.now()))
        self.arm()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
