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

What is decided here (the head and its limits, every refusal, slots, deadlines, who serves a
request) is decided by ``core/intake.py``, without I/O; this module carries it out on the
transport: writes, closes, hand-overs, the sweep's task, the hooks it awaits, and the log lines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from polysignal.core.auth import Identity
from polysignal.core.edge import ORIGIN_REFUSED
from polysignal.core.errors import BackendUnavailable
from polysignal.core.intake import (
    INTERNAL,
    MALFORMED,
    TOO_MANY,
    UNAVAILABLE,
    Door,
    Exit,
    Head,
    KeptAlive,
    OriginRefused,
    Refusal,
    RequestIntake,
    Way,
    peer_address,
)
from polysignal.logs import CLIENT_KEY, Throttle, more
from polysignal.protocols.websocket import (
    HandshakeError,
    choose_subprotocol,
    http_error,
    switching_protocols,
)
from polysignal.server.auth import split_token_path
from polysignal.server.driver import Driver, Handshake

if TYPE_CHECKING:
    from polysignal.server.connection import Connection
    from polysignal.server.node import Node

log = logging.getLogger("polysignal.server")

# Bound once: on Python 3.11, reading an Enum member off its class costs five times a global's
# read, and these are read for every request.
_DRIVER, _HTTP_WEBSOCKET = Way.DRIVER, Way.HTTP_WEBSOCKET


class FrontDoor(Door["Intake | Served"]):
    """The protocol factory of a node's listening socket, and what its connections share (the
    decisions are ``core/intake.py``'s ``Door``; this carries them out)."""

    def __init__(self, node: Node) -> None:
        settings = node.settings
        super().__init__(
            max_head=settings.limits.max_header_bytes,
            max_headers=settings.limits.max_headers,
            timeout=settings.server.header_timeout,
            linger=settings.server.linger,
            trusted_proxies=settings.server.trusted_proxies,
            proxy_header=settings.server.proxy_header,
            allowed_origins=settings.server.allowed_origins,
            addresses=node.addresses,
            served_by_http=node.served_by_http,
        )
        self.node = node
        # Makes aiohttp's protocol for one connection; set by the server once aiohttp is up.
        self.http: Callable[[], asyncio.Protocol] | None = None
        self.auth = node.auth
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
        interval = self.sweep_interval
        while True:
            await asyncio.sleep(interval)
            timed_out = sum(intake.expire() for intake in self.late(time.monotonic()))
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
    def prepare(self, request: Handshake, head: Head) -> tuple[Driver, bytes]:
        """Check the upgrade ``request`` (its ``head`` as read) and pick its protocol: (driver,
        the 101 response), or HandshakeError.

        The request's connection already holds its address's slot (``Intake``, ``Served``).
        """
        node = self.node
        try:
            key = self.check_upgrade(head, node.stopping)
        except OriginRefused:
            self.origin_refused(head, request.address)
            raise
        if self.auth.on:
            request.path, request.token = split_token_path(request.path)
        driver = node.route(request)
        if driver is None:
            raise HandshakeError(404, "no protocol is served on this path")
        request.subprotocol = choose_subprotocol(request.offered, driver.handler.subprotocols)
        return driver, switching_protocols(key, request.subprotocol)

    def origin_refused(self, head: Head, address: str) -> None:
        """A WebSocket upgrade from ``address`` was refused for its origin: logged once per
        interval."""
        held = self.throttle.allow("origin")
        if held is not None:
            origin = head.header(b"origin")
            shown = repr(origin[:100]) if origin is not None else "?"
            log.info(
                "refused a WebSocket upgrade from %s: origin %s not in ALLOWED_ORIGINS%s",
                address,
                shown,
                more(held),
            )

    def full(self, address: str) -> None:
        """``address`` was refused a slot (``MAX_CONNECTIONS_PER_IP``): logged once per
        interval."""
        held = self.throttle.allow("limit")  # one key: addresses are unbounded
        if held is not None:
            log.warning(
                "refused %s: %d connections from it%s", address, self.addresses.limit, more(held)
            )

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
        try:
            hook = self.admit(driver, request)
        except HandshakeError as exc:
            intake.refuse(exc)
            return
        if hook is None:
            intake.hand_on()
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
        refusal = await self.run_hook(driver, request, hook)
        if refusal is not None:
            intake.refuse(refusal)
        elif not transport.is_closing():  # closed meanwhile: the intake gave its slot back
            intake.hand_on()
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
    ) -> Refusal | None:
        """Await a protocol's ``accept`` hook: None to go on, else the refusal to answer."""
        try:
            await hook
        except HandshakeError as exc:
            return exc
        except BackendUnavailable:
            return UNAVAILABLE
        except Exception:
            log.exception("%s: accepting a WebSocket failed", driver.protocol)
            return INTERNAL
        return None

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


class Intake(RequestIntake, asyncio.Protocol):
    """One connection while its first request is read (``core/intake.py``'s
    ``RequestIntake``, on its transport); gone once the request is routed."""

    __slots__ = ("transport",)

    door: FrontDoor
    transport: asyncio.Transport
    """Set by ``connection_made``, which asyncio calls first (no ``__init__`` of its own: one
    call less per connection)."""

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = peer_address(transport.get_extra_info("peername"))
        if not self.open(peer, time.monotonic()):
            self._refuse_slot(peer)

    def data_received(self, data: bytes) -> None:
        read = self.feed(data)
        if read is None:
            return
        if isinstance(read, Head):
            self._route(read)
            return
        if read is MALFORMED:
            held = self.door.throttle.allow("malformed")
            if held is not None:
                log.info("refused a malformed HTTP request%s", more(held))
        self.refuse(read)

    def eof_received(self) -> bool | None:
        self.stop()  # the client is done sending: the transport closes (answered or not)
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed()

    # --- outcomes ---
    def refuse(self, refusal: Refusal) -> None:
        """Answer ``refusal``, then linger: what the client still sends is read and dropped
        until it closes (at most ``LINGER`` seconds), so the answer is not lost to a reset."""
        self._leave(refusal, Exit.LINGER)

    def shut(self) -> None:
        """The server stops: answer 503 unless already answered, and close."""
        self._leave(*self.shutdown())

    def expire(self) -> bool:
        """Its time is up; True if its request did not arrive in time (answered 408)."""
        refusal, leave = self.overdue()
        self._leave(refusal, leave)
        return refusal is not None

    def _leave(self, refusal: Refusal | None, leave: Exit) -> None:
        """Read no more; write ``refusal``, if any, and leave the way ``leave`` says."""
        self.stop()
        transport = self.transport
        if transport.is_closing():
            return
        if refusal is not None:
            transport.write(http_error(refusal.status, refusal.message, refusal.headers))
        if leave is Exit.ABORT:
            transport.abort()
        elif leave is Exit.LINGER and transport.can_write_eof():
            transport.write_eof()
            transport.resume_reading()
            self.linger(time.monotonic())
        else:
            transport.close()

    def _refuse_slot(self, address: str) -> None:
        self.door.full(address)
        self.refuse(TOO_MANY)

    def _route(self, head: Head) -> None:
        """The request's head is in: upgrade it here, or hand it to aiohttp."""
        door = self.door
        address = self.address
        if address is None:  # from a trusted proxy: its client's slot, now that it is named
            address = door.client(self.peer, head.headers)
            if not self.take_slot(address):
                self._refuse_slot(address)
                return
        way = head.way
        if way is _DRIVER:
            assert head.path is not None
            request = Handshake(head.path, head.query, head.headers, address, head.offered)
            try:
                driver, response = door.prepare(request, head)
            except HandshakeError as exc:
                self.refuse(exc)
                return
            door.accept(driver, request, response, self, head.rest)
        elif way is _HTTP_WEBSOCKET and not door.origin_allowed(head):  # socket.io's
            door.origin_refused(head, address)
            self.refuse(OriginRefused(403, ORIGIN_REFUSED))
        else:
            self._hand_over()

    def _hand_over(self) -> None:
        """aiohttp serves this connection from now on, starting with what was read so far."""
        transport = self.transport
        assert self.door.http is not None and self.address is not None
        served = Served(self.door, self.door.http(), self.address, self.peer)
        raw = self.hand_on()
        transport.set_protocol(served)
        served.connection_made(transport)
        served.data_received(raw)


class Served(KeptAlive, asyncio.Protocol):
    """A connection aiohttp serves: its bytes go to aiohttp's protocol; ``core/intake.py``'s
    ``KeptAlive`` keeps the address's slot until the connection closes, and the clock of each
    later request's head (``request_clock`` in ``server/app.py`` says when one is in)."""

    __slots__ = ("handler", "transport")

    door: FrontDoor

    def __init__(
        self, door: FrontDoor, handler: asyncio.Protocol, address: str, peer: str | None = None
    ) -> None:
        KeptAlive.__init__(self, door, address, peer)
        self.handler = handler
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_request:  # inside one (a WebSocket's frames) this is the only cost
            self.received(time.monotonic())
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed()
        self.handler.connection_lost(exc)  # type: ignore[arg-type]

    def expire(self) -> bool:
        """The next request's headers did not arrive in time: close (aiohttp may be writing,
        so no 408 can be inserted)."""
        self.shut()
        return True

    def shut(self) -> None:
        self.door.pending.pop(self, None)
        if self.transport is not None:
            self.transport.close()


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
    url = request.rel_url
    version = request.version
    head = Head.parsed(
        request.method,
        f"{version.major}.{version.minor}",
        request.raw_headers,
        url.raw_path,
        url.raw_query_string,
    )
    address = door.client(served.peer, head.headers) if served.proxied else served.peer
    handshake = Handshake(url.raw_path, url.raw_query_string, head.headers, address, head.offered)
    if not served.move_slot(address):  # the Connection gives this slot back
        door.full(address)
        return _error_response(TOO_MANY)
    try:
        driver, response = door.prepare(handshake, head)
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


def _error_response(exc: Refusal) -> web.Response:
    return web.Response(status=exc.status, text=exc.message + "\n", headers=dict(exc.headers))


class _Upgraded(web.StreamResponse):
    """What aiohttp's handler of an upgraded connection returns: the connection wrote the 101
    and every frame itself, so aiohttp writes nothing more."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None
