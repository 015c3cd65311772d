"""python-socketio and python-engineio, adapted for the rooms protocol in this one module.

The rooms protocol (docs/protocols/rooms.md, "Security and limits") needs what the libraries do
not offer publicly:

* engine.io sessions counted per client address from the handshake on (before any socket.io
  CONNECT or token), refused past ``MAX_CONNECTIONS_PER_IP`` with 429;
* engine.io's send queue bounded in bytes (a client that does not read is cut off, as every
  protocol's: docs/architecture.md, "Slow consumers");
* anything a client sends that the libraries cannot decode (an undecodable engine.io packet, a
  malformed socket.io packet, JSON nested deeper than ``MAX_DEPTH``) closing only its
  connection, with one log line per interval and no traceback;
* long-polling POSTs answered at once and without a server error whatever their body (too
  large: 413; not UTF-8, malformed, not decodable, for a closed session: 400);
* a graceful stop closing every WebSocket with 1001, and the client's address.

Each private API this takes is used here and nowhere else, and each has a test in
tests/server/test_socketio_compat.py that fails when the library changes it (pyproject.toml
bounds the versions those tests passed on):

python-socketio (``socketio.AsyncServer``):

* ``_engineio_server_class()``: the engine.io server class the constructor instantiates (as
  ``eio``, with the engine.io options); overridden to use ``GuardedEngineServer``.
* ``_send_packet(eio_sid, pkt)`` and ``_send_eio_packet(eio_sid, eio_pkt)``: every packet to a
  client goes through one of them (``AsyncManager.emit`` uses the second); overridden to cut
  off a client whose queue holds too many bytes.
* ``_handle_eio_message(eio_sid, data)``: decodes and dispatches one socket.io packet, raising
  ValueError/KeyError/IndexError/TypeError on a malformed one, and RecursionError on JSON
  nested past the interpreter's recursion limit; overridden to refuse both, and JSON nested
  deeper than ``MAX_DEPTH`` before its parser recurses.
* ``_binary_packet``: a dict eio_sid -> the binary packet awaiting its attachments; its entry is
  dropped when a malformed packet closes the connection.
* ``eio``: the engine.io server; ``eio.sockets``: dict eio_sid -> ``engineio.AsyncSocket``.

python-engineio (``engineio.AsyncServer``, ``engineio.AsyncSocket``):

* ``AsyncServer._handle_connect(environ, transport, jsonp_index)``: the handshake of a new
  session, returning engine.io's response dict (``status``, ``headers``, ``response``) or a
  response; ``_trigger_event(event, *args, run_async=...)``: runs the ``connect`` (its answer
  other than None/True refuses the session) and ``disconnect`` handlers, ``disconnect`` once
  per session as it closes, whatever closes it (the client, its transport, a ping timeout).
* ``AsyncServer.handle_request(request)``: every HTTP request of the path; its POST branch is
  replaced (``GuardedEngineServer._handle_post``), using ``_async["translate_request"]``,
  ``_make_response(response_dict, environ)`` (adds CORS headers), ``_cors_allowed_origins``,
  ``cors_allowed_origins``, ``max_http_buffer_size``, ``_ok()`` and the socket's
  ``receive(pkt)``, ``connected``, ``upgraded``, ``closing``, ``closed``.
* ``AsyncServer._log_error_once(message, key)``: logs what a client got wrong (a bad session
  id, transport or version) as an ERROR; here a DEBUG line.
* ``AsyncServer.create_queue()``: makes each socket's send queue (``AsyncSocket.queue``), an
  ``asyncio.Queue`` of packets that ``AsyncSocket.send`` puts and ``poll()`` takes (every
  queued packet at once); replaced by ``SendQueue``, which counts bytes in the ``_put`` and
  ``_get`` hooks ``asyncio.Queue`` leaves to subclasses.
* ``AsyncSocket.close(wait=..., abort=...)``, ``ping_interval``, ``ping_timeout``: a
  long-polling session that stops polling is closed once a ping goes unanswered for
  ``ping_timeout`` (engine.io's service task).
* ``AsyncServer._async["websocket"]``: the class the aiohttp async mode serves WebSockets with,
  ``engineio.async_drivers.aiohttp.WebSocket``; replaced per server by ``GuardedWebSocket``.
* that class: constructed as ``WebSocket(handler, server)``; ``__call__(environ)`` serves the
  connection and sets ``_sock`` (aiohttp's ``WebSocketResponse``) and ``environ`` (replaced by
  ``GuardedWebSocket.__call__``, which does the same without permessage-deflate); ``handler`` is
  the bound ``AsyncSocket._websocket_handler`` (so ``handler.__self__`` is the socket);
  ``server`` is the engine.io server; ``wait()`` returns the next message's data; ``send(msg)``
  writes one packet the socket's writer took from its queue.
* ``environ["aiohttp.request"]``: the aiohttp request, put there by the aiohttp async mode's
  ``translate_request``.

aiohttp: ``request.protocol.force_close()`` (``answer_and_close``) ends a connection whose
request body broke off, once answered; aiohttp would go on reading it after the answer (its
lingering close) and log the decoding error as a server error.
* ``engineio.packet.Packet(encoded_packet=...)``, its ``packet_type``, ``binary``, ``data``,
  ``encode()`` and ``engineio.packet.packet_names``: decoding one engine.io packet to check it,
  and measuring one.

Public API (``AsyncServer(...)`` options, ``on``, ``emit`` with a list of socket ids as ``to``,
``attach``, ``shutdown``) is used by ``server/rooms.py`` directly. Rooms use socket.io's
in-memory manager: nothing crosses nodes through socket.io (no message queue, no pickle); events
for sockets on other nodes travel on polysignal's own bus.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
from collections import deque
from typing import Any

import engineio
import engineio.packet
import socketio
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from engineio.async_drivers.aiohttp import WebSocket as EngineIoWebSocket

from polysignal.core.edge import ORIGIN_REFUSED
from polysignal.core.errors import ClientError, CloseCode, FrameTooLarge, MalformedFrame
from polysignal.core.limits import AddressCounter
from polysignal.logs import Throttle, more
from polysignal.protocols import rooms as proto

log = logging.getLogger("polysignal.rooms")

MALFORMED = (ValueError, KeyError, IndexError, TypeError, RecursionError)
"""What ``_handle_eio_message`` raises for a malformed socket.io packet."""

UNDECODABLE = (ValueError, IndexError, binascii.Error, RecursionError)
"""What ``engineio.packet.Packet(encoded_packet=...)`` raises for a packet it cannot decode."""

POLLING_TYPES = frozenset({engineio.packet.CLOSE, engineio.packet.PONG, engineio.packet.MESSAGE})
"""The engine.io packets a long-polling client may POST (the server pings, the client pongs)."""

TOO_MANY_SESSIONS = "too many connections from this address"
MALFORMED_SOCKETIO = "malformed socket.io packet"
MALFORMED_ENGINEIO = "malformed engine.io packet"

REFUSE_GRACE = 2.0
"""Seconds a refused WebSocket client has to answer the close before its connection is cut."""

_ADDRESS = "polysignal.address"
"""``environ`` key: the address whose session slot a handshake holds until its session starts."""

_SESSION = "polysignal.session"
"""``environ`` key: the id of the session a handshake started."""


# --- what a client sent ------------------------------------------------------------------------


def decode_packet(data: str | bytes) -> Any:
    """One engine.io packet as a client sent it: the decoded ``engineio.packet.Packet``, or
    MalformedFrame (``proto.check_packet`` first: a known type, JSON nested at most
    ``MAX_DEPTH`` levels, so the decoder never recurses deeply)."""
    proto.check_packet(data)
    try:
        return engineio.packet.Packet(encoded_packet=data)
    except UNDECODABLE:
        raise MalformedFrame(MALFORMED_ENGINEIO) from None


def decode_polling(body: bytes, max_bytes: int) -> list[Any]:
    """The engine.io packets of a long-polling POST body; FrameTooLarge past ``max_bytes``,
    MalformedFrame for anything else a client may not send (``proto.polling_packets``,
    ``decode_packet``, and packets other than close, pong and message)."""
    packets = []
    for text in proto.polling_packets(body, max_bytes):
        packet = decode_packet(text)
        if packet.packet_type not in POLLING_TYPES:
            name = engineio.packet.packet_names[packet.packet_type]
            raise MalformedFrame(f"unexpected engine.io {name} packet")
        packets.append(packet)
    return packets


class BrokenBody(MalformedFrame):
    """A request body that cannot be read: its content or transfer encoding does not decode."""

    def __init__(self) -> None:
        super().__init__("the request body cannot be decoded")


BODY_ERRORS = (web.RequestPayloadError, HttpProcessingError)
"""What reading a request's body raises when the client sent one that does not decode (aiohttp
wraps a content encoding that does not decode in RequestPayloadError)."""


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The body of ``request``, read only while within ``limit`` bytes (FrameTooLarge past it,
    from its ``Content-Length`` before anything is read when it has one; BrokenBody if it does
    not decode)."""
    length = request.content_length
    if length is not None and length > limit:
        raise FrameTooLarge(f"payload is too large: {length} bytes, the limit is {limit}")
    body = bytearray()
    try:
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise FrameTooLarge(
                    f"payload is too large: over {limit} bytes, the limit is {limit}"
                )
    except BODY_ERRORS:
        raise BrokenBody from None
    return bytes(body)


async def answer_and_close(request: web.BaseRequest, response: web.Response) -> web.Response:
    """Send ``response``, then close the connection: for a request whose body broke off, which
    aiohttp would otherwise go on reading after the answer, and log as a server error."""
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


def packet_size(packet: Any) -> int:
    """Bytes of an engine.io packet as it is written (its encoding is cached for the writer; a
    binary one is not encoded here, so long-polling still encodes it as base64)."""
    if packet.binary:
        return len(packet.data)
    return len(packet.encode())


def refusal(status: int, message: str) -> dict[str, Any]:
    """An engine.io response dict refusing a request with ``status``: the message as a JSON
    string, as engine.io's own 400s carry it."""
    reasons = {400: "BAD REQUEST", 413: "PAYLOAD TOO LARGE", 429: "TOO MANY REQUESTS"}
    return {
        "status": f"{status} {reasons.get(status, 'ERROR')}",
        "headers": [("Content-Type", "text/plain")],
        "response": json.dumps(message).encode(),
    }


# --- engine.io ---------------------------------------------------------------------------------


class SendQueue(asyncio.Queue[Any]):
    """engine.io's send queue of one session, counting in ``waiting`` the bytes of the packets
    it holds and of those its WebSocket writer took but has not written yet (engine.io's writer
    takes every queued packet at once, then writes them one by one)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0
        self.socket: Any = None  # the engine.io socket, once a WebSocket serves it
        self._taken: deque[int] = deque()

    def _put(self, item: Any) -> None:
        if item is not None:
            self.waiting += packet_size(item)
        super()._put(item)

    def _get(self) -> Any:
        item = super()._get()
        if item is not None:
            size = packet_size(item)
            if self.socket is not None and self.socket.upgraded:
                self._taken.append(size)  # its writer took it: counted until written
            else:
                self.waiting -= size  # taken by a long-polling response
        return item

    def written(self) -> None:
        """The WebSocket writer wrote the oldest packet it took."""
        if self._taken:
            self.waiting -= self._taken.popleft()


class GuardedEngineServer(engineio.AsyncServer):  # type: ignore[misc]
    """python-engineio's server with the guards of this module: sessions counted per address,
    send queues counted in bytes, long-polling POSTs checked before engine.io sees them, and
    refused requests answered with an HTTP error, never a server error."""

    _async: dict[str, Any]  # the async mode's drivers (engine.io's)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.sessions = AddressCounter(0)  # BoundedServer sets the hub's
        self.throttle = Throttle()
        self.polysignal_websockets = OpenWebSockets()
        self._address_of: dict[str, str] = {}  # eio_sid -> the address whose slot it holds
        # Every WebSocket of this server is a GuardedWebSocket, known to ``polysignal_websockets``.
        self._async = {**self._async, "websocket": GuardedWebSocket}

    def create_queue(self, *args: Any, **kwargs: Any) -> SendQueue:
        return SendQueue()

    def _log_error_once(self, message: str, message_key: str) -> None:
        # What a client got wrong is answered (400), not a server error.
        log.debug("engine.io refused a request: %s", message)

    def address_of(self, eio_sid: str) -> str:
        return self._address_of.get(eio_sid, "unknown")

    # --- sessions per address ---
    async def _handle_connect(
        self, environ: dict[str, Any], transport: str, jsonp_index: int | None = None
    ) -> Any:
        # Under ``--workers N`` a long-polling session's requests would reach any worker
        # (``server/workers.py`` sets ``polling_refused``): refused at the handshake, as
        # engine.io's own errors, so the client learns to use the websocket transport.
        polling_refused = getattr(self, "polling_refused", None)
        if transport == "polling" and polling_refused is not None:
            return {
                "status": "400 BAD REQUEST",
                "headers": [("Content-Type", "application/json")],
                "response": json.dumps(
                    {"code": 3, "message": polling_refused}, separators=(",", ":")
                ).encode(),
            }
        address = remote_address(environ)
        if not self.sessions.acquire(address):
            held = self.throttle.allow("sessions")
            if held is not None:
                log.warning(
                    "refused an engine.io session from %s: %d sessions from it%s",
                    address,
                    self.sessions.limit,
                    more(held),
                )
            return refusal(429, TOO_MANY_SESSIONS)
        environ[_ADDRESS] = address
        try:
            return await super()._handle_connect(environ, transport, jsonp_index)
        except BaseException:
            # The handshake failed after its session started (a WebSocket upgrade aiohttp
            # refused, say): close it now rather than at its ping timeout.
            socket = self.sockets.get(environ.get(_SESSION))
            if socket is not None and not (socket.closing or socket.closed):
                await socket.close(wait=False, abort=True)
            raise
        finally:
            if environ.pop(_ADDRESS, None) is not None:  # no session started with the slot
                self.sessions.release(address)

    async def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "connect":  # the session exists: it holds the slot until it closes
            sid, environ = args[0], args[1]
            environ[_SESSION] = sid
            address = environ.pop(_ADDRESS, None)
            answer = await super()._trigger_event(event, *args, **kwargs)
            if address is not None:
                if answer is None or answer is True:
                    self._address_of[sid] = address
                else:  # refused: engine.io drops the session without a disconnect
                    self.sessions.release(address)
            return answer
        if event == "disconnect":
            address = self._address_of.pop(args[0], None)
            if address is not None:
                self.sessions.release(address)
        return await super()._trigger_event(event, *args, **kwargs)

    # --- refusing what a client sent ---
    async def refuse(self, socket: Any, reason: str) -> None:
        """Close engine.io session ``socket`` for what its client sent: at once, without waiting
        for its queue (its client may not read it); a WebSocket closes with 1003 and
        ``reason``, a long-polling POST is answered 400 with it (``_handle_post``)."""
        held = self.throttle.allow("refused")
        if held is not None:
            log.info(
                "refused a socket.io client of %s: %s; its connection is closed%s",
                self.address_of(socket.sid),
                reason,
                more(held),
            )
        socket.polysignal_refused = reason
        websocket = self.polysignal_websockets.of(socket)
        await socket.close(wait=False, abort=True)  # its disconnect handlers run here
        if websocket is not None:
            await websocket.close_with(CloseCode.UNSUPPORTED_DATA, reason, REFUSE_GRACE)

    # --- long-polling POSTs, refused origins ---
    async def handle_request(self, *args: Any, **kwargs: Any) -> Any:
        request = args[0] if args else None
        if isinstance(request, web.BaseRequest):
            if request.method == "POST":
                return await self._handle_post(request)
            if self._refused_upgrade(request):
                return web.Response(status=403, text=ORIGIN_REFUSED + "\n")
        return await super().handle_request(*args, **kwargs)

    def _refused_upgrade(self, request: web.BaseRequest) -> bool:
        """A WebSocket upgrade from an origin ``ALLOWED_ORIGINS`` refuses: 403, as every
        protocol's (engine.io would answer 400). It reaches aiohttp on a connection kept alive;
        the front door refuses the others before aiohttp sees them."""
        origin = request.headers.get(hdrs.ORIGIN)
        allowed = self.cors_allowed_origins
        if not origin or not callable(allowed) or allowed(origin):
            return False
        if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
            return False  # long-polling: engine.io refuses it (400) and sends no CORS header
        held = self.throttle.allow("origin")
        if held is not None:
            log.info(
                "refused a WebSocket upgrade from %s: origin %r not in ALLOWED_ORIGINS%s",
                request.remote,
                origin[:100],
                more(held),
            )
        return True

    async def _handle_post(self, request: web.BaseRequest) -> Any:
        """A long-polling POST, answered at once: 200 once its packets are handled; 413 past
        ``max_http_buffer_size`` (its body is not read); 400 for a body that is not UTF-8, for
        packets a client may not send, for a session that is not open or not on long-polling.
        A refused body closes its session, as a refused WebSocket message does."""
        environ = self._async["translate_request"](request)
        origin = environ.get("HTTP_ORIGIN")
        if origin and self.cors_allowed_origins != []:  # as engine.io checks every request
            allowed = self._cors_allowed_origins(environ)
            if allowed is not None and origin not in allowed:
                return await self._make_response(refusal(400, "Not an accepted origin"), environ)
        sid = request.query.get("sid")
        socket = self.sockets.get(sid) if sid is not None else None
        if socket is None or socket.closing or socket.closed:
            return await self._make_response(refusal(400, "Invalid session"), environ)
        if not socket.connected or socket.upgraded:
            return await self._make_response(refusal(400, "Unexpected HTTP request"), environ)
        try:
            body = await read_body(request, self.max_http_buffer_size)
            packets = decode_polling(body, self.max_http_buffer_size)
        except ClientError as exc:
            await self.refuse(socket, exc.message)
            status = 413 if isinstance(exc, FrameTooLarge) else 400
            response = await self._make_response(refusal(status, exc.message), environ)
            if isinstance(exc, BrokenBody):
                return await answer_and_close(request, response)
            return response
        for packet in packets:
            if socket.closing or socket.closed:
                break
            await socket.receive(packet)
        refused = getattr(socket, "polysignal_refused", None)
        if refused is not None:
            return await self._make_response(refusal(400, refused), environ)
        return await self._make_response(self._ok(), environ)


# --- socket.io ---------------------------------------------------------------------------------


class BoundedServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server on its in-memory manager, on a ``GuardedEngineServer``: engine.io
    sessions counted in ``sessions``, a client with more than ``max_queued_bytes`` waiting cut
    off, and a packet it cannot use closing its connection, as socket.io does, without logging
    a server error."""

    def __init__(
        self, *, max_queued_bytes: int, sessions: AddressCounter | None = None, **options: Any
    ) -> None:
        super().__init__(client_manager=None, **options)
        self.max_queued_bytes = max_queued_bytes
        engine: GuardedEngineServer = self.eio
        if sessions is not None:
            engine.sessions = sessions
        self.websockets = engine.polysignal_websockets

    def _engineio_server_class(self) -> type[GuardedEngineServer]:
        return GuardedEngineServer

    async def _send_packet(self, eio_sid: str, pkt: Any) -> None:
        await super()._send_packet(eio_sid, pkt)
        await self._check_backlog(eio_sid)

    async def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
        await super()._send_eio_packet(eio_sid, eio_pkt)
        await self._check_backlog(eio_sid)

    async def _check_backlog(self, eio_sid: str) -> None:
        """Cut the client off once more than ``max_queued_bytes`` wait for it."""
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or socket.closing or socket.closed:
            return
        queue = socket.queue
        if not isinstance(queue, SendQueue) or queue.waiting <= self.max_queued_bytes:
            return
        held = self.eio.throttle.allow("not reading")
        if held is not None:
            log.warning(
                "socket.io client %s of %s is not reading: %d bytes waiting, closing%s",
                eio_sid,
                self.eio.address_of(eio_sid),
                queue.waiting,
                more(held),
            )
        self.websockets.cut(socket)
        await socket.close(wait=False, abort=True)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or socket.closing or socket.closed:
            return  # refused or gone: what its client still sends is dropped
        try:
            if isinstance(data, str) and proto.nests_deeper(data):
                raise MalformedFrame(proto.TOO_DEEP)
            await super()._handle_eio_message(eio_sid, data)
        except ClientError as exc:
            reason = exc.message
        except MALFORMED:
            reason = MALFORMED_SOCKETIO
        else:
            return
        self._binary_packet.pop(eio_sid, None)
        await self.eio.refuse(socket, reason)

    async def close_polling_sockets(self) -> None:
        """Close the sessions still on long-polling; they get a CLOSE packet on their next poll
        (WebSockets are closed by ``GuardedWebSocket.close_with``)."""
        for socket in list(self.eio.sockets.values()):
            if not socket.upgraded:
                await socket.close(wait=False)


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

    @staticmethod
    def of(socket: Any) -> GuardedWebSocket | None:
        """The WebSocket serving engine.io socket ``socket``, if one does."""
        ws = getattr(socket, "polysignal_websocket", None)
        return ws if isinstance(ws, GuardedWebSocket) else None

    def cut(self, socket: Any) -> None:
        """Abort the TCP connection of engine.io socket ``socket`` (its writer may be stuck)."""
        ws = self.of(socket)
        if ws is not None:
            ws.abort()


class GuardedWebSocket(EngineIoWebSocket):  # type: ignore[misc]
    """engine.io's aiohttp WebSocket, closing with 1003 on a message that is not an engine.io
    packet (engine.io would let the decode error escape into aiohttp as a server error),
    telling its socket's ``SendQueue`` what it wrote, and known to its server while open so a
    graceful stop can close it with 1001."""

    async def __call__(self, environ: dict[str, Any]) -> Any:
        registry: OpenWebSockets = self.server.polysignal_websockets
        socket = getattr(self.handler, "__self__", None)
        queue = getattr(socket, "queue", None)
        if isinstance(queue, SendQueue):
            queue.socket = socket
        if socket is not None:
            socket.polysignal_websocket = self
        registry.add(self)
        try:
            # engine.io's own ``__call__``, but without permessage-deflate, which aiohttp would
            # grant every client that offers it (socket.io-client in Node and every browser do):
            # its zlib state is about 90 KiB per socket, for signaling messages of a few hundred
            # bytes (docs/performance.md, rooms). Node's socket.io has it off by default too.
            request = environ["aiohttp.request"]
            self._sock = web.WebSocketResponse(
                max_msg_size=self.server.max_http_buffer_size, compress=False
            )
            await self._sock.prepare(request)
            self.environ = environ
            await self.handler(self)
            return self._sock
        finally:
            registry.discard(self)
            if socket is not None and getattr(socket, "polysignal_websocket", None) is self:
                socket.polysignal_websocket = None

    async def send(self, message: Any) -> None:
        await super().send(message)
        queue = getattr(getattr(self.handler, "__self__", None), "queue", None)
        if isinstance(queue, SendQueue):
            queue.written()

    async def close_with(self, code: int, reason: str, grace: float) -> None:
        """Close with ``code`` and ``reason``; cut the connection if the client does not answer
        within ``grace`` seconds."""
        sock = self._sock
        if sock is None or sock.closed:
            self.abort()
            return
        try:
            async with asyncio.timeout(grace):
                await sock.close(code=code, message=reason.encode()[:123])
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            self.abort()

    async def close_going_away(self, grace: float) -> None:
        """Close with 1001; cut the connection if the client does not answer within ``grace``."""
        await self.close_with(CloseCode.GOING_AWAY, "server shutting down", grace)

    def abort(self) -> None:
        request = request_of(getattr(self, "environ", None))
        transport = request.transport if request is not None else None
        if transport is not None and not transport.is_closing():
            transport.abort()

    async def wait(self) -> Any:
        data = await super().wait()
        try:
            decode_packet(data)
        except ClientError as exc:
            held = self.server.throttle.allow("refused")
            if held is not None:
                log.info(
                    "refused a socket.io client of %s: %s; its connection is closed%s",
                    remote_address(getattr(self, "environ", None) or {}),
                    exc.message,
                    more(held),
                )
            await self.close_with(CloseCode.UNSUPPORTED_DATA, exc.message, REFUSE_GRACE)
            raise OSError(exc.message) from None
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
