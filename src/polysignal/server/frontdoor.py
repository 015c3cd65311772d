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

Every TCP connection holds one of its address's ``MAX_CONNECTIONS_PER_IP`` slots from the
moment it is accepted until it closes, whatever it carries: a request still being read, a
WebSocket of any protocol, a connection aiohttp serves (socket.io included). One past the limit
is answered 429 at once. The slot goes with the transport: to the ``Connection`` of a WebSocket,
or to ``Served``, the thin protocol that hands aiohttp its bytes and gives the slot back when
the connection closes.

Behind a proxy (``TRUSTED_PROXIES``, ``core/edge.py``) the address is the client's, read from
the request head: a connection from a trusted proxy takes no slot of the proxy's address; once
its head is in, it takes a slot of the client's address (429 past the limit), and the
``Connection``, the log lines and aiohttp's ``request.remote`` (``client_address``) name the
client. A connection aiohttp keeps alive (which a proxy may reuse for several clients) holds the
slot of its first request's client, moved to the client of a WebSocket asked for on it later.

A WebSocket upgrade whose ``Origin`` is not in ``ALLOWED_ORIGINS`` is refused with 403, whatever
its protocol (socket.io's included, which aiohttp serves), before any protocol sees it.

Nothing here holds a task or a timer per connection: one sweep per node closes requests whose
headers have not arrived within ``HEADER_TIMEOUT`` (408), the first request of a connection and
every later one aiohttp reads on a connection it kept alive.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import httptools
from aiohttp import web
from aiohttp.typedefs import Handler

from polysignal.core.auth import Identity
from polysignal.core.edge import ORIGIN_REFUSED, AllowedOrigins, TrustedProxies
from polysignal.core.errors import BackendUnavailable
from polysignal.logs import CLIENT_KEY, Throttle, more
from polysignal.protocols.websocket import (
    HandshakeError,
    check_handshake,
    choose_subprotocol,
    http_error,
    scan_upgrade,
    switching_protocols,
)
from polysignal.server.auth import split_token_path
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
        self.proxies = TrustedProxies(settings.server.trusted_proxies, settings.server.proxy_header)
        self.origins = AllowedOrigins(settings.server.allowed_origins)
        self.auth = node.auth
        # Connections whose request is still being read, or which linger after a refusal, with
        # the time by which they must be done.
        self.pending: dict[Intake | Served, float] = {}
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

        The request's connection already holds its address's slot (``Intake``, ``Served``).
        """
        node = self.node
        if method != "GET":
            raise HandshakeError(405, "a WebSocket upgrade must be a GET", (("Allow", "GET"),))
        key = check_handshake(http_version, version, key)
        self.check_origin(request.header("origin"), request.address)
        if node.stopping:
            raise HandshakeError(503, "shutting down")
        if self.auth.on:
            request.path, request.token = split_token_path(request.path)
        driver = node.route(request)
        if driver is None:
            raise HandshakeError(404, "no protocol is served on this path")
        request.subprotocol = choose_subprotocol(request.offered, driver.handler.subprotocols)
        return driver, switching_protocols(key, request.subprotocol)

    def check_origin(self, origin: str | None, address: str) -> None:
        """Refuse (403) a WebSocket upgrade from a page whose origin is not allowed."""
        if self.origins.allows(origin):
            return
        held = self.throttle.allow("origin")
        if held is not None:
            shown = repr(origin[:100]) if origin is not None else "?"
            log.info(
                "refused a WebSocket upgrade from %s: origin %s not in ALLOWED_ORIGINS%s",
                address,
                shown,
                more(held),
            )
        raise HandshakeError(403, ORIGIN_REFUSED)

    def take_slot(self, address: str) -> bool:
        """Count one more connection of ``address``; False (logged once per interval) past
        ``MAX_CONNECTIONS_PER_IP``."""
        addresses = self.node.addresses
        if addresses.acquire(address):
            return True
        held = self.throttle.allow("limit")  # one key: addresses are unbounded
        if held is not None:
            log.warning(
                "refused %s: %d connections from it%s", address, addresses.limit, more(held)
            )
        return False

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
            hook = self.admit(driver, request)
        except HandshakeError as exc:
            intake.refuse(exc.status, exc.message, exc.headers)
            return
        if hook is None:
            intake.handed = True
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
        elif not transport.is_closing():  # closed meanwhile: the intake gave its slot back
            intake.handed = True
            transport.resume_reading()
            self.upgrade(driver, request, response, transport, rest)

    def admit(self, driver: Driver, request: Handshake) -> Awaitable[None] | None:
        """Authenticate ``request`` when its protocol requires it, then run the protocol's
        ``accept`` hook: None when both are done, an awaitable when either must wait (the
        webhook, a hook of the protocol's); raises HandshakeError to refuse."""
        auth = self.auth
        protocol = driver.protocol
        if not auth.required(protocol):
            return driver.handler.accept(request)
        token, described = auth.describe(
            request.path,
            request.query,
            request.header("origin"),
            request.address,
            request.header("authorization"),
            request.header("cookie"),
            request.token,
        )
        checked = auth.check(protocol, described, token)
        if isinstance(checked, Identity):
            self._bind(driver, request, described, checked)
            return driver.handler.accept(request)
        return self._admit_later(checked, driver, request, described)

    async def _admit_later(
        self,
        checked: Awaitable[Identity],
        driver: Driver,
        request: Handshake,
        described: dict[str, Any],
    ) -> None:
        self._bind(driver, request, described, await checked)
        hook = driver.handler.accept(request)
        if hook is not None:
            await hook

    def _bind(
        self, driver: Driver, request: Handshake, described: dict[str, Any], identity: Identity
    ) -> None:
        """``request`` is ``identity``'s, if the id it asks for is one the identity may use."""
        peer_id = driver.handler.claimed_id(request)
        if peer_id is not None:
            self.auth.check_id(driver.protocol, described, identity, peer_id)
        request.identity = identity

    async def run_hook(
        self, driver: Driver, request: Handshake, hook: Awaitable[None]
    ) -> HandshakeError | None:
        """Await a protocol's ``accept`` hook: None to go on, else the refusal to answer."""
        try:
            await hook
        except HandshakeError as exc:
            refusal = exc
        except BackendUnavailable:
            refusal = HandshakeError(503, "the service is unavailable; try again")
        except Exception:
            log.exception("%s: accepting a WebSocket failed", driver.protocol)
            refusal = HandshakeError(500, "internal error")
        else:
            return None
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

    __slots__ = (
        "address",
        "complete",
        "door",
        "handed",
        "headers",
        "lingering",
        "parser",
        "peer",
        "raw",
        "transport",
        "url",
    )

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.raw = b""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.lingering = False
        self.peer = "unknown"  # the TCP peer (a trusted proxy, or the client itself)
        self.address: str | None = None  # the client's, while it holds its address's slot
        self.handed = False  # the transport (and its slot) went to a Connection or to aiohttp

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        door = self.door
        peer = self.peer = peer_address(transport)
        # A trusted proxy's connection counts against its client, named in the request head.
        if not door.proxies.trusts(peer) and not self._take_slot(peer):
            return
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
        if self.address is not None and not self.handed:
            self.door.node.addresses.release(self.address)
        self.address = None

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

    def _take_slot(self, address: str) -> bool:
        if not self.door.take_slot(address):
            self.refuse(429, "too many connections from this address")
            return False
        self.address = address
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
        door = self.door
        if self.address is None:  # from a trusted proxy: count its client
            name = door.proxies.header_bytes
            values = [value.decode("latin-1") for found, value in self.headers if found == name]
            if not self._take_slot(door.proxies.client(self.peer, values)):
                return
        address = self.address
        assert address is not None
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
        if door.node.served_by_http(path):
            # socket.io's WebSocket: aiohttp serves it, once its origin is allowed here.
            try:
                door.check_origin(_header(self.headers, b"origin"), address)
            except HandshakeError as exc:
                self.refuse(exc.status, exc.message, exc.headers)
                return
            self._hand_over()
            return
        query = url.query
        request = Handshake(
            path, query.decode("latin-1") if query else "", self.headers, address, offered
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
        assert transport is not None and self.door.http is not None and self.address is not None
        served = Served(self.door, self.door.http(), self.address, self.peer)
        self.handed = True
        transport.set_protocol(served)
        served.connection_made(transport)
        served.data_received(self.raw)
        self.raw = b""


class Served(asyncio.Protocol):
    """A connection aiohttp serves: its bytes go to aiohttp's protocol; this keeps the
    address's slot until the connection closes, and the clock of each later request's headers
    (aiohttp has none): from the first byte after a request is done, ``HEADER_TIMEOUT`` for the
    next one's headers to arrive (``request_clock`` in ``server/app.py`` says when they have)."""

    __slots__ = ("address", "door", "handler", "in_request", "peer", "proxied", "transport")

    def __init__(
        self, door: FrontDoor, handler: asyncio.Protocol, address: str, peer: str | None = None
    ) -> None:
        self.door = door
        self.handler = handler
        self.address: str | None = address
        self.peer = peer if peer is not None else address  # the TCP peer
        self.proxied = door.proxies.trusts(self.peer)  # each request names its client
        self.transport: asyncio.Transport | None = None
        self.in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        door = self.door
        if not self.in_request and door.timeout > 0 and self not in door.pending:
            door.pending[self] = time.monotonic() + door.timeout
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.door.pending.pop(self, None)
        if self.address is not None:
            self.door.node.addresses.release(self.address)
            self.address = None
        self.handler.connection_lost(exc)  # type: ignore[arg-type]

    # --- aiohttp's requests ---
    def request_started(self) -> None:
        self.in_request = True
        self.door.pending.pop(self, None)

    def request_done(self) -> None:
        self.in_request = False

    def move_slot(self, address: str) -> bool:
        """Hold a slot of ``address`` instead of the one held: a trusted proxy may send the
        requests of several clients on one connection. False (the slot stays) when
        ``address`` has none left."""
        if self.address is None or address == self.address:
            return True
        if not self.door.take_slot(address):
            return False
        self.door.node.addresses.release(self.address)
        self.address = address
        return True

    def give_slot(self) -> None:
        """A WebSocket took the connection over: its ``Connection`` gives the slot back."""
        self.address = None

    def expire(self) -> bool:
        """The next request's headers did not arrive in time: close (aiohttp may be writing,
        so no 408 can be inserted)."""
        self.shut()
        return True

    def shut(self) -> None:
        self.door.pending.pop(self, None)
        if self.transport is not None:
            self.transport.close()


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for found, value in headers:
        if found == name:
            return value.decode("latin-1")
    return None


@web.middleware
async def client_address(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Make ``request.remote`` the client's address when a trusted proxy forwarded the request
    (``TRUSTED_PROXIES``): the handlers get a clone of the request with that ``remote``."""
    client = client_of(request)
    if client is not None and client != request.remote:
        request[CLIENT_KEY] = client  # for aiohttp's access logger, which sees this request
        request = request.clone(remote=client)
    return await handler(request)


def client_of(request: web.BaseRequest) -> str | None:
    """The client's address of ``request`` through trusted proxies: read from each request,
    since a proxy may send the requests of several clients on one connection it keeps alive.
    (aiohttp's access logger sees the request itself, not ``client_address``'s clone.)"""
    transport = request.transport
    served = transport.get_protocol() if transport is not None else None
    if isinstance(served, Served) and served.proxied:
        proxies = served.door.proxies
        return proxies.client(served.peer, request.headers.getall(proxies.header, []))
    return request.remote


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
    served = transport.get_protocol()
    assert isinstance(served, Served)  # every connection enters through the front door
    headers = [(name.lower(), value) for name, value in request.raw_headers]
    _, version, key, offered = scan_upgrade(headers)
    address = served.peer
    if served.proxied:
        name = door.proxies.header_bytes
        values = [value.decode("latin-1") for found, value in headers if found == name]
        address = door.proxies.client(address, values)
    handshake = Handshake(
        request.rel_url.raw_path, request.rel_url.raw_query_string, headers, address, offered
    )
    http_version = f"{request.version.major}.{request.version.minor}"
    if not served.move_slot(handshake.address):  # the Connection gives this slot back
        return _error_response(HandshakeError(429, "too many connections from this address"))
    try:
        driver, response = door.prepare(handshake, request.method, http_version, version, key)
        hook = door.admit(driver, handshake)
    except HandshakeError as exc:
        return _error_response(exc)
    if hook is not None:
        refusal = await door.run_hook(driver, handshake, hook)
        if refusal is not None:
            return _error_response(refusal)
    served.give_slot()
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
