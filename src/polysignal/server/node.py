"""The composition root of one polysignal node: settings, backend, open connections.

Protocol handlers get their WebSocket through ``Node.websocket``, which applies what every
protocol shares (DESIGN.md §4): the per-address connection limit, the frame size limit, the
WebSocket ping, no compression (so prebuilt frames fit every peer), the bounded output, and the
bookkeeping graceful shutdown needs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress

from aiohttp import web

from polysignal.backends.base import Backend
from polysignal.config import Settings
from polysignal.core.errors import CloseCode
from polysignal.core.limits import AddressCounter
from polysignal.server.connection import PING_FRAME, Connection, WebSocket

log = logging.getLogger("polysignal.server")

WsHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
WsMatcher = Callable[[web.Request], bool]


class Node:
    """Everything the protocol handlers of one node share."""

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self.node_id = settings.node_id
        self.connections: set[Connection] = set()
        self.addresses = AddressCounter(settings.max_connections_per_ip)
        # WebSocket routes, tried in order; the topics protocol is the fallback (DESIGN.md §1).
        self.ws_routes: list[tuple[WsMatcher, WsHandler]] = []
        # Run at shutdown after connections are closed and before the backend closes.
        self.shutdown_hooks: list[Callable[[], Awaitable[None]]] = []
        self.stopping = False
        self._ping_sweep: asyncio.Task[None] | None = None

    def start_ping_sweep(self) -> None:
        """Start the node's ping sweep (once, on the first connection) unless it is off."""
        if self._ping_sweep is None and self.settings.ping_interval > 0 and not self.stopping:
            self._ping_sweep = asyncio.get_running_loop().create_task(self._sweep_pings())

    async def _sweep_pings(self) -> None:
        """Every ``PING_INTERVAL``: close peers silent since the last sweep, ping the others."""
        interval = self.settings.ping_interval
        while True:
            await asyncio.sleep(interval)
            for conn in list(self.connections):
                ws = conn.ws
                if ws.closed or conn.closing:
                    continue
                if not ws.alive:
                    log.debug("%r did not answer a ping within %gs", conn, interval)
                    conn.close(CloseCode.GOING_AWAY, "ping timeout", grace=1.0)
                    continue
                ws.alive = False
                conn.send_frame(PING_FRAME)

    def add_ws_route(self, matcher: WsMatcher, handler: WsHandler) -> None:
        self.ws_routes.append((matcher, handler))

    def websocket(
        self,
        request: web.Request,
        protocol: str,
        *,
        subprotocols: Iterable[str] = (),
        max_frame_bytes: int | None = None,
    ) -> Accept:
        """Accept ``request`` as a WebSocket of ``protocol``; refuse with 429/503 when over limits.

        Use as ``async with node.websocket(request, "topics") as conn:``. On exit the connection
        is forgotten and closed if it is still open.
        """
        return Accept(self, request, protocol, tuple(subprotocols), max_frame_bytes)

    async def close_connections(self, grace: float) -> None:
        """Close every open WebSocket with 1001 and wait up to ``grace`` seconds for them."""
        if self._ping_sweep is not None:
            self._ping_sweep.cancel()
            with suppress(asyncio.CancelledError):
                await self._ping_sweep
            self._ping_sweep = None
        conns = list(self.connections)
        for conn in conns:
            conn.close(CloseCode.GOING_AWAY, "server shutting down", grace=grace)
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=grace + 0.5
            )


class Accept:
    """The ``async with`` of ``Node.websocket``: a plain object, not a generator, because one lives
    as long as its connection (measured: it keeps idle connections smaller)."""

    __slots__ = (
        "_address",
        "_conn",
        "_max_frame_bytes",
        "_node",
        "_protocol",
        "_request",
        "_subprotocols",
    )

    def __init__(
        self,
        node: Node,
        request: web.Request,
        protocol: str,
        subprotocols: tuple[str, ...],
        max_frame_bytes: int | None,
    ) -> None:
        self._node = node
        self._request = request
        self._protocol = protocol
        self._subprotocols = subprotocols
        self._max_frame_bytes = max_frame_bytes
        self._address = ""
        self._conn: Connection | None = None

    async def __aenter__(self) -> Connection:
        node, request = self._node, self._request
        if node.stopping:
            raise web.HTTPServiceUnavailable(text="shutting down")
        address = client_address(request)
        if not node.addresses.acquire(address):
            log.warning("refused %s: %d connections from it", address, node.addresses.limit)
            raise web.HTTPTooManyRequests(text="too many connections from this address")
        self._address = address
        settings = node.settings
        try:
            ws = WebSocket(
                protocols=self._subprotocols,
                max_msg_size=self._max_frame_bytes or settings.max_frame_bytes,
                compress=False,
                autoping=False,  # WebSocket.receive answers pings and notes liveness
            )
            await ws.prepare(request)
            transport = request.transport
            if transport is None:  # the client vanished during the handshake
                raise ConnectionResetError("transport closed during handshake")
        except BaseException:
            node.addresses.release(address)
            raise
        conn = self._conn = Connection(
            ws,
            transport,
            address=address,
            protocol=self._protocol,
            max_buffer=settings.send_buffer_bytes,
            rate=settings.rate_limit,
            burst=settings.rate_burst,
        )
        node.connections.add(conn)
        node.start_ping_sweep()
        log.debug("%r open", conn)
        return conn

    async def __aexit__(self, *exc_info: object) -> None:
        self._node.addresses.release(self._address)
        conn = self._conn
        if conn is not None:
            self._node.connections.discard(conn)
            if not conn.ws.closed:
                conn.close(CloseCode.NORMAL)
            log.debug("%r closed", conn)


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"
