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
import sys
import time
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
    http_error,
    scan_upgrade,
    switching_protocols,
)
from polysignal.server.driver import Driver, Handshake

if TYPE_CHECKING:
    from polysignal.server.connection import Connection
    from polysignal.server.node import Node

log = logging.getLogger("polysignal.server")


class FrontDoor:
    """The protocol factory of a node's listening socket, and what its connections share."""

    def __init__(self, node: Node) -> None:
        settings = node.settings
        self.node = node
        # Makes aiohttp's protocol for one connection; set by the server once aiohttp is up.
        self.http: Callable[[], asyncio.Protocol] | None = None
        self.max_head = settings.limits.max_header_bytes
        self.max_headers = settings.limits.max_headers
        self.timeout = settings.server.header_timeout
        self.linger = settings.server.linger
        # Connections whose request is still being read, or which linger after a refusal, with
        # the time by which they must be done.
        self.pending: dict[Intake, float] = {}
        self.throttle = Throttle()
        self._sweep: asyncio.Task[None] | None = None

    def __call__(self) -> Intake:
        return Intake(self)

    def start(self) -> None:
        self._sweep = asyncio.get_running_loop().create_task(self._sweep_timeouts())

    async def stop(self) -> None:
        """Stop the sweep and drop every request still being read."""
        if self._sweep is not None:
            self._sweep.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweep
            self._sweep = None
        for intake in list(self.pending):
            intake.shut()

    async def _sweep_timeouts(self) -> None:
        interval = min(1.0, self.timeout / 4) if self.timeout > 0 else 1.0
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            late = [intake for intake, deadline in self.pending.items() if deadline <= now]
            timed_out = sum(intake.expire() for intake in late)
            if timed_out:
                held = self.throttle.allow("timeout")
                if held is not None:
                    log.info(
                        "closed %d connection(s) whose request did not arrive within %gs%s",
                        timed_out,
                        self.timeout,
                        more(held),
                    )

    # --- the WebSocket upgrade, shared by both ways in ---
    def prepare(
        self,
        request: Handshake,
        method: str,
        http_version: str,
        version: str | None,
        key: str | None,
    ) -> tuple[Driver, bytes]:
        """Check ``request`` (its ``Sec-WebSocket-Version`` and ``-Key`` given) and pick its
        protocol: (driver, the 101 response), or HandshakeError.

        On success the request's address holds one of its connection slots; the caller gives
        it back (``node.addresses.release``) if the upgrade does not complete.
        """
        node = self.node
        if method != "GET":
            raise HandshakeError(405, "a WebSocket upgrade must be a GET", (("Allow", "GET"),))
        key = check_handshake(http_version, version, key)
        if node.stopping:
            raise HandshakeError(503, "shutting down")
        driver = node.route(request)
        if driver is None:
            raise HandshakeError(404, "no protocol is served on this path")
        request.subprotocol = choose_subprotocol(request.offered, driver.handler.subprotocols)
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
        intake: Intake,
        rest: bytes,
    ) -> None:
        """Run the protocol's ``accept`` hook, then upgrade; in a task only if the hook must
        wait (reading stays paused meanwhile)."""
        transport = intake.transport
        assert transport is not None
        try:
            hook = driver.handler.accept(request)
        except HandshakeError as exc:
            self.node.addresses.release(request.address)
            intake.refuse(exc.status, exc.message, exc.headers)
            return
        if hook is None:
            self.upgrade(driver, request, response, transport, rest)
            return
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(
            self._accept_later(hook, driver, request, response, intake, rest)
        )
        self.node.track(task)

    async def _accept_later(
        self,
        hook: Awaitable[None],
        driver: Driver,
        request: Handshake,
        response: bytes,
        intake: Intake,
        rest: bytes,
    ) -> None:
        transport = intake.transport
        assert transport is not None
        refusal = await self.run_hook(driver, request, hook)
        if refusal is not None:
            intake.refuse(refusal.status, refusal.message, refusal.headers)
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

    __slots__ = ("complete", "door", "headers", "lingering", "parser", "raw", "transport", "url")

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.raw = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.lingering = False

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        door = self.door
        if door.timeout > 0:
            door.pending[self] = time.monotonic() + door.timeout

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return  # refused: what follows is ignored until the transport closes
        raw = self.raw = self.raw + data if self.raw else data
        rest = None
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
        except httptools.HttpParserError:
            if not self.complete:
                self._refuse_malformed()
                return
        door = self.door
        if rest is not None:
            head = len(raw) - len(rest)
        elif self.complete:  # the head ends at the first empty line; a body may follow
            end = raw.find(b"\r\n\r\n")
            head = len(raw) if end < 0 else end + 4
        else:
            head = len(raw)
        if head > door.max_head:
            self.refuse(431, f"request line and headers longer than {door.max_head} bytes")
        elif len(self.headers) > door.max_headers:
            self.refuse(431, f"more than {door.max_headers} header lines")
        elif self.complete:
            self._route(rest)

    def eof_received(self) -> bool | None:
        self._drop()  # the client is done sending: the transport closes (answered or not)
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._drop()

    # --- httptools callbacks ---
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True

    # --- outcomes ---
    def _drop(self) -> None:
        self.door.pending.pop(self, None)
        self.parser = None

    def refuse(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer ``status``, then linger: what the client still sends is read and dropped
        until it closes (at most ``LINGER`` seconds), so the answer is not lost to a reset."""
        self._drop()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(http_error(status, message, headers))
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self.lingering = True
        self.door.pending[self] = time.monotonic() + self.door.linger

    def shut(self) -> None:
        """The server stops: answer 503 unless already answered, and close."""
        lingering = self.lingering
        self._drop()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if not lingering:
                transport.write(http_error(503, "shutting down"))
            transport.close()

    def expire(self) -> bool:
        """Its time is up; True if its request did not arrive in time (answered 408)."""
        transport = self.transport
        if self.lingering or not self.raw:
            self._drop()
            if transport is not None:
                transport.abort() if self.lingering else transport.close()
            return False
        self.refuse(408, f"the request did not arrive within {self.door.timeout:g}s")
        return True

    def _refuse_malformed(self) -> None:
        held = self.door.throttle.allow("malformed")
        if held is not None:
            log.info("refused a malformed HTTP request%s", more(held))
        self.refuse(400, "malformed HTTP request")

    def _route(self, rest: bytes | None) -> None:
        """The request's headers are in: upgrade it here, or hand it to aiohttp."""
        parser = self.parser
        transport = self.transport
        assert parser is not None and transport is not None
        method = parser.get_method()
        http_version = parser.get_http_version()
        self._drop()
        websocket, version, key, offered = scan_upgrade(self.headers)
        if not websocket:
            self._hand_over()
            return
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._hand_over()
            return
        path = url.path.decode("latin-1")
        door = self.door
        if door.node.served_by_http(path):
            self._hand_over()
            return
        query = url.query
        request = Handshake(
            path,
            query.decode("latin-1") if query else "",
            self.headers,
            peer_address(transport),
            offered,
        )
        try:
            driver, response = door.prepare(
                request, method.decode("latin-1"), http_version, version, key
            )
        except HandshakeError as exc:
            self.refuse(exc.status, exc.message, exc.headers)
            return
        door.accept(driver, request, response, self, rest or b"")

    def _hand_over(self) -> None:
        """aiohttp serves this connection from now on, starting with what was read so far."""
        transport = self.transport
        assert transport is not None and self.door.http is not None
        handler = self.door.http()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(self.raw)
        self.raw = b""


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The client's IP address, as the transport sees it. Interned: the connections of one
    address share one string (the per-address count holds it while any is open)."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return sys.intern(str(peer[0]))
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
    headers = [(name.lower(), value) for name, value in request.raw_headers]
    _, version, key, offered = scan_upgrade(headers)
    handshake = Handshake(
        request.rel_url.raw_path,
        request.rel_url.raw_query_string,
        headers,
        peer_address(transport),
        offered,
    )
    http_version = f"{request.version.major}.{request.version.minor}"
    try:
        driver, response = door.prepare(handshake, request.method, http_version, version, key)
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
