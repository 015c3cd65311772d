"""The composition root of one polysignal node: settings, backend, open connections.

Protocol handlers get their WebSocket through ``Node.websocket``, which applies what every
protocol shares (DESIGN.md §4): the per-address connection limit, the frame size limit, the
WebSocket ping, no compression (so prebuilt frames fit every peer), the bounded output, and the
bookkeeping graceful shutdown needs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

from aiohttp import web

from polysignal.backends.base import Backend
from polysignal.config import Settings
from polysignal.core.errors import CloseCode
from polysignal.core.limits import AddressCounter
from polysignal.server.connection import Connection, WebSocket

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

    def add_ws_route(self, matcher: WsMatcher, handler: WsHandler) -> None:
        self.ws_routes.append((matcher, handler))

    @asynccontextmanager
    async def websocket(
        self,
        request: web.Request,
        protocol: str,
        *,
        subprotocols: Iterable[str] = (),
        max_frame_bytes: int | None = None,
    ) -> AsyncIterator[Connection]:
        """Accept ``request`` as a WebSocket of ``protocol``; refuse with 429/503 when over limits.

        On exit the connection is forgotten and closed if it is still open.
        """
        if self.stopping:
            raise web.HTTPServiceUnavailable(text="shutting down")
        address = client_address(request)
        if not self.addresses.acquire(address):
            log.warning("refused %s: %d connections from it", address, self.addresses.limit)
            raise web.HTTPTooManyRequests(text="too many connections from this address")
        conn: Connection | None = None
        try:
            ws = WebSocket(
                protocols=tuple(subprotocols),
                heartbeat=self.settings.ping_interval or None,
                max_msg_size=max_frame_bytes or self.settings.max_frame_bytes,
                compress=False,
                autoping=True,
            )
            await ws.prepare(request)
            transport = request.transport
            if transport is None:  # the client vanished during the handshake
                raise ConnectionResetError("transport closed during handshake")
            conn = Connection(
                ws,
                transport,
                address=address,
                protocol=protocol,
                max_buffer=self.settings.send_buffer_bytes,
                rate=self.settings.rate_limit,
                burst=self.settings.rate_burst,
            )
            self.connections.add(conn)
            log.debug("%r open", conn)
            yield conn
        finally:
            self.addresses.release(address)
            if conn is not None:
                self.connections.discard(conn)
                if not conn.ws.closed:
                    conn.close(CloseCode.NORMAL)
                log.debug("%r closed", conn)

    async def close_connections(self, grace: float) -> None:
        """Close every open WebSocket with 1001 and wait up to ``grace`` seconds for them."""
        conns = list(self.connections)
        for conn in conns:
            conn.close(CloseCode.GOING_AWAY, "server shutting down", grace=grace)
        if conns:
            await asyncio.wait(
                [asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=grace + 0.5
            )


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"
