"""The composition root of one polysignal node: settings, backend, routes, open connections.

What every WebSocket protocol shares (docs/performance.md): the routes the front door picks a
protocol's driver from, the per-address connection count, one write batch, one ping sweep for
every connection, the tasks handlers left running, and the bookkeeping graceful shutdown needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress

from polysignal.backends.base import Backend
from polysignal.config import Settings
from polysignal.core.errors import CloseCode
from polysignal.core.limits import AddressCounter
from polysignal.protocols.websocket import PING_FRAME
from polysignal.server.auth import Authenticator
from polysignal.server.connection import Connection, WriteBatch
from polysignal.server.driver import Driver, Handshake

log = logging.getLogger("polysignal.server")

Matcher = Callable[[Handshake], bool]


class Node:
    """Everything the protocol handlers of one node share."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.node_id = settings.server.node_id
        self.started = time.time()  # for ``/stats`` and ``/metrics``
        self.connections: set[Connection] = set()
        self.addresses = AddressCounter(settings.limits.max_connections_per_ip)
        self.batch = WriteBatch()
        # WebSocket routes, tried in order; ``fallback`` takes the rest (topics; see
        # docs/architecture.md, "Routing on one port").
        self.routes: list[tuple[Matcher, Driver]] = []
        self.fallback: Driver | None = None
        # Path prefixes whose requests, WebSocket or not, stay with aiohttp (socket.io).
        self.http_prefixes: tuple[str, ...] = ()
        # Run at shutdown after connections are closed and before the backend closes.
        self.shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        # Who clients are, for the protocols ``AUTH`` names (server/auth.py).
        self.auth = Authenticator(settings.auth)
        self.shutdown_hooks.append(self.auth.close)
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._ping_sweep: asyncio.Task[None] | None = None
        self._empty: asyncio.Event | None = None

    # --- routes ---
    def add_route(self, matcher: Matcher, driver: Driver) -> None:
        self.routes.append((matcher, driver))

    def route(self, request: Handshake) -> Driver | None:
        """The driver of the protocol ``request`` asks for (None: no protocol takes it)."""
        for matches, driver in self.routes:
            if matches(request):
                return driver
        return self.fallback

    def drivers(self) -> list[Driver]:
        """Every protocol's driver, the fallback's last."""
        drivers = [driver for _, driver in self.routes]
        if self.fallback is not None:
            drivers.append(self.fallback)
        return drivers

    def served_by_http(self, path: str) -> bool:
        """True when requests on ``path`` stay with the aiohttp application."""
        return path.startswith(self.http_prefixes)

    # --- connections ---
    def opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        if self._ping_sweep is None:
            self._start_ping_sweep()

    def forgot(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.addresses.release(conn.address)
        if not self.connections and self._empty is not None:
            self._empty.set()

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a handler's task until it ends; shutdown waits for it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- liveness ---
    def _start_ping_sweep(self) -> None:
        if self.settings.limits.ping_interval > 0 and not self.stopping:
            self._ping_sweep = asyncio.get_running_loop().create_task(self._sweep_pings())

    async def _sweep_pings(self) -> None:
        """Every ``PING_INTERVAL``: close peers silent since the last sweep, ping the others."""
        interval = self.settings.limits.ping_interval
        while True:
            await asyncio.sleep(interval)
            for conn in list(self.connections):
                if conn.closing:
                    continue
                if not conn.alive:
                    log.debug("%r did not answer a ping within %gs", conn, interval)
                    conn.close(CloseCode.GOING_AWAY, "ping timeout", grace=1.0)
                    continue
                conn.alive = False
                conn.driver.control_out += 1  # not a data message (``/metrics``)
                conn.send_frame(PING_FRAME)

    # --- shutdown ---
    async def close_connections(self, grace: float) -> None:
        """Close every open WebSocket with 1001 and wait up to ``grace`` seconds for them and
        for the handlers' work on them (releasing their ids, say) to end."""
        if self._ping_sweep is not None:
            self._ping_sweep.cancel()
            with suppress(asyncio.CancelledError):
                await self._ping_sweep
            self._ping_sweep = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + 0.5
        self._empty = asyncio.Event()
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down", grace=grace)
        if self.connections:
            with suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._empty.wait()
        for conn in list(self.connections):  # did not answer in time
            conn.abort()
        while self._tasks and loop.time() < deadline:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - loop.time()))
