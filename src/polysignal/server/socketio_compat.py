"""python-socketio and python-engineio, adapted for the rooms protocol in this one module.

The rooms protocol (docs/protocols/rooms.md) needs four things the libraries do not offer
publicly: a bound on engine.io's send queue (a client that does not read is cut off:
docs/architecture.md, "Slow consumers"), a malformed socket.io or engine.io packet closing only
its connection instead of surfacing as a server error, a graceful stop closing every WebSocket
with 1001, and the client's address. Each private API this takes is used here and nowhere else,
and each has a test in tests/server/test_socketio_compat.py that fails when the library changes
it (pyproject.toml bounds the versions those tests passed on):

python-socketio (``socketio.AsyncServer``):

* ``_send_packet(eio_sid, pkt)`` and ``_send_eio_packet(eio_sid, eio_pkt)``: every packet to a
  client goes through one of them (``AsyncManager.emit`` uses the second); overridden to cut off
  a client whose queue is full instead of queueing more.
* ``_handle_eio_message(eio_sid, data)``: decodes and dispatches one socket.io packet, raising
  ValueError/KeyError/IndexError/TypeError on a malformed one; overridden to close that
  connection instead.
* ``_binary_packet``: a dict eio_sid -> the binary packet awaiting its attachments; its entry is
  dropped when a malformed packet closes the connection.
* ``eio``: the engine.io server; ``eio.sockets``: dict eio_sid -> ``engineio.AsyncSocket``.

python-engineio:

* ``AsyncSocket.queue`` (an ``asyncio.Queue`` of packets waiting to be written), ``.closing``,
  ``.closed``, ``.upgraded`` (True once on WebSocket) and ``.close(wait=..., abort=...)``.
* ``AsyncServer._async["websocket"]``: the class the aiohttp async mode serves WebSockets with,
  ``engineio.async_drivers.aiohttp.WebSocket``; replaced per server by ``GuardedWebSocket``.
* that class: constructed as ``WebSocket(handler, server)``; ``__call__(environ)`` serves the
  connection and sets ``_sock`` (aiohttp's ``WebSocketResponse``) and ``environ``; ``handler`` is
  the bound ``AsyncSocket._websocket_handler`` (so ``handler.__self__`` is the socket);
  ``server`` is the engine.io server; ``wait()`` returns the next message's data.
* ``environ["aiohttp.request"]``: the aiohttp request, put there by the aiohttp async mode's
  ``translate_request``.
* ``engineio.packet.Packet(encoded_packet=...)``, its ``packet_type`` and
  ``engineio.packet.packet_names``: decoding one engine.io packet to check it.

Public API (``AsyncServer(...)`` options, ``on``, ``emit`` with a list of socket ids as ``to``,
``attach``, ``shutdown``, ``eio.disconnect``) is used by ``server/rooms.py`` directly. Rooms use
socket.io's in-memory manager: nothing crosses nodes through socket.io (no message queue, no
pickle); events for sockets on other nodes travel on polysignal's own bus.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
from typing import Any

import engineio.packet
import socketio
from aiohttp import web
from engineio.async_drivers.aiohttp import WebSocket as EngineIoWebSocket

from polysignal.core.errors import CloseCode

log = logging.getLogger("polysignal.rooms")

MALFORMED = (ValueError, KeyError, IndexError, TypeError)
"""What ``_handle_eio_message`` raises for a malformed socket.io packet."""


class OpenWebSockets:
    """The engine.io WebSockets of one server that are still being served."""

    def __init__(self) -> None:
        self.sockets: set[GuardedWebSocket] = set()
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, ws: GuardedWebSocket) -> None:
        self.sockets.add(ws)
        self.idle.clear()

    def discard(self, ws: GuardedWebSocket) -> None:
        self.sockets.discard(ws)
        if not self.sockets:
            self.idle.set()

    def cut(self, socket: Any) -> None:
        """Abort the TCP connection of engine.io socket ``socket`` (its writer may be stuck)."""
        for ws in self.sockets:
            if getattr(ws.handler, "__self__", None) is socket:
                ws.abort()


class BoundedServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server on its in-memory manager, answering a malformed socket.io packet
    as socket.io does (the connection is closed) without logging it as a server error, and
    cutting off a client that does not read (engine.io's own send queue has no bound)."""

    def __init__(self, *, max_queued: int, **options: Any) -> None:
        super().__init__(client_manager=None, **options)
        self.max_queued = max_queued
        self.websockets = OpenWebSockets()
        # Every WebSocket of this server is a GuardedWebSocket, known to ``websockets``.
        self.eio._async = {**self.eio._async, "websocket": GuardedWebSocket}
        self.eio.polysignal_websockets = self.websockets

    async def _send_packet(self, eio_sid: str, pkt: Any) -> None:
        if not await self._overflowing(eio_sid):
            await super()._send_packet(eio_sid, pkt)

    async def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
        if not await self._overflowing(eio_sid):
            await super()._send_eio_packet(eio_sid, eio_pkt)

    async def _overflowing(self, eio_sid: str) -> bool:
        """True (and the client is cut off) when its queue is full; nothing is sent then."""
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or socket.queue.qsize() < self.max_queued:
            return False
        if not (socket.closing or socket.closed):
            log.warning(
                "socket.io client %s is not reading: %d packets waiting, closing",
                eio_sid,
                socket.queue.qsize(),
            )
            self.websockets.cut(socket)
            await socket.close(wait=False, abort=True)
        return True

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        try:
            await super()._handle_eio_message(eio_sid, data)
        except MALFORMED as exc:
            log.debug("malformed socket.io packet from %s: %s; closing", eio_sid, exc)
            self._binary_packet.pop(eio_sid, None)
            await self.eio.disconnect(eio_sid)

    async def close_polling_sockets(self) -> None:
        """Close the sessions still on long-polling; they get a CLOSE packet on their next poll
        (WebSockets are closed by ``GuardedWebSocket.close_going_away``)."""
        for socket in list(self.eio.sockets.values()):
            if not socket.upgraded:
                await socket.close(wait=False)


class GuardedWebSocket(EngineIoWebSocket):  # type: ignore[misc]
    """engine.io's aiohttp WebSocket, closing with 1003 on a frame that is not an engine.io
    packet (engine.io would let the decode error escape into aiohttp as a server error), and
    known to its server while open so a graceful stop can close it with 1001."""

    async def __call__(self, environ: dict[str, Any]) -> Any:
        registry: OpenWebSockets = self.server.polysignal_websockets
        registry.add(self)
        try:
            return await super().__call__(environ)
        finally:
            registry.discard(self)

    async def close_going_away(self, grace: float) -> None:
        """Close with 1001; cut the connection if the client does not answer within ``grace``."""
        sock = self._sock
        if sock is None or sock.closed:
            return
        try:
            async with asyncio.timeout(grace):
                await sock.close(code=CloseCode.GOING_AWAY, message=b"server shutting down")
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        request = request_of(getattr(self, "environ", None))
        transport = request.transport if request is not None else None
        if transport is not None and not transport.is_closing():
            transport.abort()

    async def wait(self) -> Any:
        data = await super().wait()
        try:
            kind = engineio.packet.Packet(encoded_packet=data).packet_type
            if not 0 <= kind < len(engineio.packet.packet_names):
                raise ValueError(f"unknown packet type {kind}")
        except (ValueError, IndexError, binascii.Error) as exc:
            log.debug("malformed engine.io packet: %s; closing", exc)
            await self._sock.close(
                code=CloseCode.UNSUPPORTED_DATA, message=b"malformed engine.io packet"
            )
            raise OSError("malformed engine.io packet") from None
        return data


def request_of(environ: dict[str, Any] | None) -> web.BaseRequest | None:
    """The aiohttp request behind an engine.io ``environ`` (None if there is none)."""
    request = environ.get("aiohttp.request") if environ is not None else None
    return request if isinstance(request, web.BaseRequest) else None


def remote_address(environ: dict[str, Any]) -> str:
    """The client's address, from the aiohttp request behind ``environ``."""
    request = request_of(environ)
    return (request.remote if request is not None else None) or "unknown"


async def close_websockets(server: BoundedServer, grace: float) -> None:
    """Close every WebSocket of ``server`` with 1001, then wait (at most ``grace``) until their
    tasks, which run the disconnect handlers, have ended."""
    open_ws = list(server.websockets.sockets)
    await asyncio.gather(*(ws.close_going_away(grace) for ws in open_ws))
    await server.close_polling_sockets()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.websockets.idle.wait(), grace)
