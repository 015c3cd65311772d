"""The front door: every TCP connection starts here, on the event loop's own transport.

It reads the opening HTTP request with httptools (llhttp, the parser uvicorn uses), within
limits (``MAX_HEADER_BYTES`` for the request line and headers together, ``MAX_HEADERS`` header
lines, ``HEADER_TIMEOUT`` seconds for all of it to arrive), and then:

* a WebSocket upgrade for a protocol on the driver (topics, relay, Signal-Fire; the routes of
  README "HTTP and WebSocket routes") is answered here: the handshake is checked (RFC 6455 §4.2:
  version 13, a 16-byte key; a subprotocol the protocol speaks is echoed, ``Signal-Fire@3``
  included, though ``@`` is not an RFC token), the per-address limit and a stopping node are
  refused with 429 and 503, and the 101 is written from prebuilt bytes. The transport then
  belongs to a lean ``Connection``; what the client sent after the request is its first frames.
* any other request (``POST /app``, ``/demo``, ``/socket.io/`` polling and WebSocket,
  ``/readyz``, static files) is handed to aiohttp on the same transport: its request handler
  takes the transport over (``set_protocol``, ``connection_made``) and gets every byte read so
  far, so keep-alive, bodies and pipelining work as if aiohttp had accepted the connection.

A connection aiohttp has kept alive may still ask for a WebSocket later: aiohttp's route hands
that request back (``upgrade_from_http``), and the same ``Connection`` serves it, fed through
aiohttp's protocol instead of the transport.

Nothing here holds a task or a timer per connection: one sweep per node closes requests whose
headers have not arrived within ``HEADER_TIMEOUT`` (408).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING

import httptools
from aiohttp import web

from polysignal.core.errors import BackendUnavailable
from polysignal.logs import Throttle, more
from polysignal.protocols.websocket import (
    HandshakeError,
    check_handshake,
    choose_subprotocol,
    offered_subprotocols,
    switching_protocols,
)
from polysignal.server.driver import Driver, Handshake

if TYPE_CHECKING:
    from polysignal.server.connection import Connection
    from polysignal.server.node import Node

log = logging.getLogger("polysignal.server")

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def http_error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete plain-text HTTP/1.1 error response that closes the connection."""
    body = (message + "\n").encode()
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
    head += "Content-Type: text/plain; charset=utf-8\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    for name, value in headers:
        head += f"{name}: {value}\r\n"
    return head.encode("latin-1") + b"\r\n" + body


class FrontDoor:
    """The protocol factory of a node's listening socket, and what its connections share."""

    def __init__(self, node: Node) -> None:
        settings = node.settings
        self.node = node
        # Makes aiohttp's protocol for one connection; set by the server once aiohttp is up.
        self.http: Callable[[], asyncio.Protocol] | None = None
        self.max_head = settings.max_header_bytes
        self.max_headers = settings.max_headers
        self.timeout = settings.header_timeout
        self.pending: dict[Intake, float] = {}  # requests still being read, with their start
        self.throttle = Throttle()
        self._sweep: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> Intake:
        return Intake(self)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.timeout > 0:
            self._sweep = self._loop.create_task(self._sweep_timeouts())

    async def stop(self) -> None:
        """Stop the sweep and drop every request still being read."""
        if self._sweep is not None:
            self._sweep.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweep
            self._sweep = None
        for intake in list(self.pending):
            intake.refuse(503, "shutting down")

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def _sweep_timeouts(self) -> None:
        interval = min(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(interval)
            expired = self.now() - self.timeout
            late = [intake for intake, started in self.pending.items() if started <= expired]
            for intake in late:
                intake.expire()
            if late:
                held = self.throttle.allow("timeout")
                if held is not None:
                    log.info(
                        "closed %d connection(s) whose request did not arrive within %gs%s",
                        len(late),
                        self.timeout,
                        more(held),
                    )

    # --- the WebSocket upgrade, shared by both ways in ---
    def prepare(self, request: Handshake, method: str, http_version: str) -> tuple[Driver, bytes]:
        """Check ``request`` and pick its protocol: (driver, the 101 response) or HandshakeError.

        On success the request's address holds one of its connection slots; the caller gives
        it back (``node.addresses.release``) if the upgrade does not complete.
        """
        node = self.node
        if method != "GET":
            raise HandshakeError(405, "a WebSocket upgrade must be a GET", (("Allow", "GET"),))
        key = check_handshake(
            http_version,
            request.header("sec-websocket-version"),
            request.header("sec-websocket-key"),
        )
        if node.stopping:
            raise HandshakeError(503, "shutting down")
        driver = node.route(request)
        if driver is None:
            raise HandshakeError(404, "no protocol is served on this path")
        offered = offered_subprotocols(request.header_values("sec-websocket-protocol"))
        request.subprotocol = choose_subprotocol(offered, driver.handler.subprotocols)
        if not node.addresses.acquire(request.address):
            held = self.throttle.allow(("limit", request.address))
            if held is not None:
                log.warning(
                    "refused %s: %d connections from it%s",
                    request.address,
                    node.addresses.limit,
                    more(held),
                )
            raise HandshakeError(429, "too many connections from this address")
        return driver, switching_protocols(key, request.subprotocol)

    def accept(
        self,
        driver: Driver,
        request: Handshake,
        response: bytes,
        transport: asyncio.Transport,
        rest: bytes,
    ) -> None:
        """Run the protocol's ``accept`` hook, then upgrade; eagerly, in a task only if the hook
        suspends (reading stays paused meanwhile)."""
        try:
            hook = driver.handler.accept(request)
        except HandshakeError as exc:
            self.node.addresses.release(request.address)
            _refuse(transport, exc)
            return
        if hook is None:
            self.upgrade(driver, request, response, transport, rest)
            return
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(
            self._accept_later(hook, driver, request, response, transport, rest)
        )
        self.node.track(task)

    async def _accept_later(
        self,
        hook: Awaitable[None],
        driver: Driver,
        request: Handshake,
        response: bytes,
        transport: asyncio.Transport,
        rest: bytes,
    ) -> None:
        refusal = await self.run_hook(driver, request, hook)
        if refusal is not None:
            _refuse(transport, refusal)
        elif transport.is_closing():
            self.node.addresses.release(request.address)
        else:
            transport.resume_reading()
            self.upgrade(driver, request, response, transport, rest)

    async def run_hook(
        self, driver: Driver, request: Handshake, hook: Awaitable[None]
    ) -> HandshakeError | None:
        """Await a protocol's ``accept`` hook: None to go on, else the refusal to answer (the
        address's slot is then given back)."""
        try:
            await hook
        except HandshakeError as exc:
            refusal = exc
        except BackendUnavailable:
            refusal = HandshakeError(503, "the service is unavailable; try again")
        except asyncio.CancelledError:
            self.node.addresses.release(request.address)
            raise
        except Exception:
            log.exception("%s: accepting a WebSocket failed", driver.protocol)
            refusal = HandshakeError(500, "internal error")
        else:
            return None
        self.node.addresses.release(request.address)
        return refusal

    def upgrade(
        self,
        driver: Driver,
        request: Handshake,
        response: bytes,
        transport: asyncio.Transport,
        rest: bytes = b"",
    ) -> Connection:
        """Answer 101 and make ``transport`` a WebSocket of ``driver``'s protocol."""
        transport.write(response)
        conn = driver.connect(transport, request)
        transport.set_protocol(conn)
        if rest and not conn.lost:
            conn.data_received(rest)
        return conn


class Intake(asyncio.Protocol):
    """One connection while its first request is read; gone once the request is routed."""

    __slots__ = ("complete", "door", "header_bytes", "headers", "parser", "raw", "transport", "url")

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.raw = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.door.pending[self] = self.door.now()

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return  # refused: what follows is ignored until the transport closes
        self.raw = self.raw + data if self.raw else data
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._route(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError:
            if not self.complete:
                self._refuse_malformed()
                return
        if len(self.headers) > self.door.max_headers:
            self.refuse(431, f"more than {self.door.max_headers} header lines")
        elif self.complete:
            self._route(None)
        elif len(self.raw) > self.door.max_head:
            self.refuse(431, f"request line and headers longer than {self.door.max_head} bytes")

    def eof_received(self) -> bool | None:
        self._drop()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._drop()

    # --- httptools callbacks ---
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True

    # --- outcomes ---
    def _drop(self) -> None:
        self.door.pending.pop(self, None)
        self.parser = None

    def refuse(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer ``status`` and close."""
        self._drop()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(http_error(status, message, headers))
            transport.close()

    def expire(self) -> None:
        """The request did not arrive in time."""
        if self.raw:
            self.refuse(408, f"the request did not arrive within {self.door.timeout:g}s")
        else:
            self._drop()
            if self.transport is not None:
                self.transport.close()

    def _refuse_malformed(self) -> None:
        held = self.door.throttle.allow("malformed")
        if held is not None:
            log.info("refused a malformed HTTP request%s", more(held))
        self.refuse(400, "malformed HTTP request")

    def _route(self, rest: bytes | None) -> None:
        """The request's headers are in: upgrade it here, or hand it to aiohttp."""
        parser = self.parser
        assert parser is not None and self.transport is not None
        method = parser.get_method().decode("latin-1")
        http_version = parser.get_http_version()
        self._drop()
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in self.headers]
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._hand_over()
            return
        path = url.path.decode("latin-1") if url.path else "/"
        if not _is_websocket(headers) or self.door.node.served_by_http(path):
            self._hand_over()
            return
        request = Handshake(
            path=path,
            query=url.query.decode("latin-1") if url.query else "",
            headers=headers,
            address=peer_address(self.transport),
        )
        door = self.door
        try:
            driver, response = door.prepare(request, method, http_version)
        except HandshakeError as exc:
            self.refuse(exc.status, exc.message, exc.headers)
            return
        door.accept(driver, request, response, self.transport, rest or b"")

    def _hand_over(self) -> None:
        """aiohttp serves this connection from now on, starting with what was read so far."""
        transport = self.transport
        assert transport is not None and self.door.http is not None
        handler = self.door.http()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(self.raw)
        self.raw = b""


def _refuse(transport: asyncio.Transport, exc: HandshakeError) -> None:
    if not transport.is_closing():
        transport.write(http_error(exc.status, exc.message, exc.headers))
        transport.close()


def _is_websocket(headers: list[tuple[str, str]]) -> bool:
    upgrade = connection = False
    for name, value in headers:
        if name == "upgrade":
            upgrade = upgrade or "websocket" in value.lower()
        elif name == "connection":
            connection = connection or any(
                token.strip().lower() == "upgrade" for token in value.split(",")
            )
    return upgrade and connection


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The client's IP address, as the transport sees it."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


# --- a WebSocket asked for on a connection aiohttp already serves -----------------------------


class _Feed:
    """aiohttp's payload-parser interface, feeding the bytes of a connection it read on to the
    WebSocket ``Connection`` that serves it now."""

    __slots__ = ("conn", "done")

    def __init__(self, conn: Connection, done: asyncio.Future[None]) -> None:
        self.conn = conn
        self.done = done

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.conn.data_received(data)
        return False, b""

    def feed_eof(self) -> None:
        self.conn.connection_lost(None)
        if not self.done.done():
            self.done.set_result(None)


async def upgrade_from_http(door: FrontDoor, request: web.Request) -> web.StreamResponse:
    """A WebSocket upgrade that reached aiohttp on a connection it kept alive: serve it with the
    same ``Connection``, fed by aiohttp's protocol (``set_parser``, as aiohttp's own WebSocket
    is), until it closes."""
    transport = request.transport
    assert transport is not None
    handshake = Handshake(
        path=request.rel_url.raw_path,
        query=request.rel_url.raw_query_string,
        headers=[(k.lower(), v) for k, v in request.headers.items()],
        address=peer_address(transport),
    )
    version = f"{request.version.major}.{request.version.minor}"
    try:
        driver, response = door.prepare(handshake, request.method, version)
        hook = driver.handler.accept(handshake)
    except HandshakeError as exc:
        return _error_response(exc)
    if hook is not None:
        refusal = await door.run_hook(driver, handshake, hook)
        if refusal is not None:
            return _error_response(refusal)
    transport.write(response)
    conn = driver.connect(transport, handshake)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # The bytes aiohttp read after the request, then all later ones, go to the connection.
    request.protocol.set_parser(_Feed(conn, done))  # type: ignore[arg-type]
    await done
    return _Upgraded()


def _error_response(exc: HandshakeError) -> web.Response:
    return web.Response(status=exc.status, text=exc.message + "\n", headers=dict(exc.headers))


class _Upgraded(web.StreamResponse):
    """What aiohttp's handler of an upgraded connection returns: the connection wrote the 101
    and every frame itself, so aiohttp writes nothing more."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None
