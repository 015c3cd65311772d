"""Draining a node before it stops (``DRAIN_SECONDS``; docs/operations/drain.md).

A load balancer or Kubernetes learns that a node is going away from its readiness check, not
from the closing of its connections. So on SIGTERM (or SIGINT) a node with ``DRAIN_SECONDS`` > 0
first drains: ``/readyz`` answers 503 at once, so it is taken out of rotation, while everything
else goes on as before (open connections of every protocol keep exchanging messages, new ones
are still accepted: clients a balancer still sends here meanwhile are served). When the drain
is over, or at a second signal, the node stops as it always does (``server/runner.py``: its
peers are closed with 1001 and reconnect elsewhere). With ``DRAIN_SECONDS`` = 0 the first
signal stops the node at once.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

log = logging.getLogger("polysignal.server")


class Drain:
    """The drain of one node: ``draining`` from the first signal on (the node stops after it,
    so it never turns ready again). ``run`` drains; ``cut`` (a second signal) ends it at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.draining = False
        self._cut = asyncio.Event()

    def cut(self) -> None:
        """End the drain now (a second signal)."""
        self._cut.set()

    async def run(self) -> None:
        """Drain for ``seconds`` or until ``cut()``; at once when ``seconds`` is 0."""
        if self.seconds <= 0:
            return
        self.draining = True
        loop = asyncio.get_running_loop()
        started = loop.time()
        log.info(
            "draining for %gs: /readyz answers 503, connections are still served "
            "(a second SIGTERM ends the drain)",
            self.seconds,
        )
        try:
            async with asyncio.timeout(self.seconds):
                await self._cut.wait()
        except TimeoutError:
            log.info("drain over after %gs", self.seconds)
        else:
            log.info("drain ended early by a second signal after %.1fs", loop.time() - started)


DRAIN_KEY = web.AppKey("drain", Drain)
"""The node's ``Drain`` in its aiohttp app, for ``/readyz`` (set by ``runner.serve``)."""


def draining(app: web.Application) -> bool:
    """True while the node of ``app`` drains (``/readyz`` is then 503)."""
    drain = app.get(DRAIN_KEY)
    return drain is not None and drain.draining
