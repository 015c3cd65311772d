"""The front door's decisions about a connection before any protocol has it, with no I/O: bytes
and the time go in, what to answer and who serves the connection come out. The front door
(``server/frontdoor.py``) carries them out on the transport.

* ``Door``: what the connections of one listening socket share. The limits of a request head
  (``MAX_HEADER_BYTES`` for the request line and headers together, ``MAX_HEADERS`` header lines,
  ``HEADER_TIMEOUT`` seconds for them to arrive), ``LINGER``, the trusted proxies and allowed
  origins (``core/edge.py``), the paths aiohttp keeps, the checks of a WebSocket upgrade, and
  the deadline of every connection whose request head is still awaited or which lingers after a
  refusal: ``late(now)`` says which have passed theirs.
* ``RequestIntake``: one connection while its first request head is read, with httptools (the
  bindings of llhttp, a parser without I/O). ``feed`` it bytes: None while more are needed, the
  ``Refusal`` to answer (431, 400), or the ``Head`` once it is in. It says which address's
  connection slot the connection takes and when, lingers after a refusal, and says what its
  deadline means once passed (``overdue``).
* ``Head``: a request head, however it was read (here, or by aiohttp on a connection it keeps
  alive), and who serves it (``Way``): a protocol on the driver, aiohttp, or aiohttp once its
  ``Origin`` is allowed (socket.io's WebSocket).
* ``KeptAlive``: a connection aiohttp serves: the slot it holds (moved to the client of a later
  request a trusted proxy sends on it) and the clock of each later request's head.

The messages of the refusals are the bodies clients see (docs/security.md lists the limits).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Generic, TypeVar

import httptools

from polysignal.core.edge import ORIGIN_REFUSED, AllowedOrigins, TrustedProxies
from polysignal.core.limits import AddressCounter
from polysignal.protocols.websocket import HandshakeError, check_handshake, scan_upgrade

Refusal = HandshakeError
"""An HTTP error answer that refuses a request before any protocol sees it: its status, its
plain-text message (the body, less its final newline) and any extra headers. A refused WebSocket
handshake is one."""

MALFORMED = Refusal(400, "malformed HTTP request")
TOO_MANY = Refusal(429, "too many connections from this address")
SHUTTING_DOWN = Refusal(503, "shutting down")
UNAVAILABLE = Refusal(503, "the service is unavailable; try again")
"""A protocol's ``accept`` hook could not reach the backend."""
INTERNAL = Refusal(500, "internal error")
"""A protocol's ``accept`` hook failed unexpectedly."""


class OriginRefused(HandshakeError):
    """A WebSocket upgrade refused (403) for its ``Origin`` (``ALLOWED_ORIGINS``)."""


Headers = list[tuple[bytes, bytes]]
"""Every header of a request in order: the name in lower case, the value as sent."""

Key = TypeVar("Key", bound=Hashable)


class Way(Enum):
    """Who serves a request whose head is in."""

    HTTP = auto()
    """aiohttp: anything but a WebSocket upgrade (or one whose URL does not parse, which aiohttp
    answers)."""
    HTTP_WEBSOCKET = auto()
    """aiohttp, once the ``Origin`` is allowed: a WebSocket on a path aiohttp keeps
    (socket.io's)."""
    DRIVER = auto()
    """A protocol on the driver: the front door answers the upgrade itself."""


# Bound once: on Python 3.11, reading an Enum member off its class costs five times a global's
# read, and these are read for every request.
_HTTP, _HTTP_WEBSOCKET, _DRIVER = Way.HTTP, Way.HTTP_WEBSOCKET, Way.DRIVER


class Exit(Enum):
    """How a connection leaves the front door once refused or out of time."""

    LINGER = auto()
    """Read (and drop) what the client still sends until it closes, for ``LINGER`` seconds at
    most, so that the answer is not lost to a reset (``RequestIntake.linger``)."""
    CLOSE = auto()
    """Closed once what was written is sent."""
    ABORT = auto()
    """Reset at once."""


@dataclass(slots=True)  # not frozen: one is made per request, and freezing would double its cost
class Head:
    """A request's line and headers, read whole, with what a WebSocket upgrade needs of them."""

    method: str
    http_version: str
    """``1.1``, ``1.0``."""
    headers: Headers
    rest: bytes
    """What the client sent after the head in the same reads: a WebSocket's first frames."""
    version: str | None
    """Its ``Sec-WebSocket-Version``."""
    key: str | None
    """Its ``Sec-WebSocket-Key``."""
    offered: list[str]
    """The subprotocols it offers, in its order."""
    path: str | None
    """The path, still percent-encoded, of a WebSocket upgrade (``Upgrade: websocket`` and
    ``Connection: upgrade``); None for any other request and for a URL that does not parse."""
    query: str
    """Its query string, still percent-encoded (empty for any other request)."""
    way: Way
    """Who serves it."""

    @classmethod
    def parsed(
        cls,
        method: str,
        http_version: str,
        raw_headers: tuple[tuple[bytes, bytes], ...],
        path: str,
        query: str,
    ) -> Head:
        """The head of a WebSocket upgrade for the driver that another parser read (aiohttp's
        ``raw_headers``, names as sent; its path and query still percent-encoded)."""
        headers = [(name.lower(), value) for name, value in raw_headers]
        _, version, key, offered = scan_upgrade(headers)
        return cls(method, http_version, headers, b"", version, key, offered, path, query, _DRIVER)

    def header(self, name: bytes) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for found, value in self.headers:
            if found == name:
                return value.decode("latin-1")
        return None


class Door(Generic[Key]):
    """What the connections of one listening socket share: the limits of a request head, the
    edge's rules, and the deadline of every connection (``Key``) still read or lingering."""

    def __init__(
        self,
        *,
        max_head: int = 16384,
        max_headers: int = 100,
        timeout: float = 10.0,
        linger: float = 2.0,
        trusted_proxies: tuple[str, ...] = (),
        proxy_header: str = "x-forwarded-for",
        allowed_origins: tuple[str, ...] = ("*",),
        addresses: AddressCounter | None = None,
        served_by_http: Callable[[str], bool] = lambda path: False,
    ) -> None:
        self.max_head = max_head
        self.max_headers = max_headers
        self.timeout = timeout
        """Seconds a request head has to arrive (0: no limit)."""
        self.linger = linger
        """Seconds a refused connection is still read so that its answer is not lost."""
        self.proxies = TrustedProxies(trusted_proxies, proxy_header)
        self.origins = AllowedOrigins(allowed_origins)
        self.addresses = addresses if addresses is not None else AddressCounter(0)
        """Open connections per client address (``MAX_CONNECTIONS_PER_IP``)."""
        self.served_by_http = served_by_http
        """Whether the requests on a path, WebSockets included, stay with aiohttp."""
        self.pending: dict[Key, float] = {}
        """Each connection whose request head is awaited or which lingers, with the time by
        which it must be done."""

    @property
    def sweep_interval(self) -> float:
        """Seconds between two looks for connections past their deadline: a quarter of
        ``HEADER_TIMEOUT`` (so a head is cut at most a quarter late), at most one second."""
        return min(1.0, self.timeout / 4) if self.timeout > 0 else 1.0

    def late(self, now: float) -> list[Key]:
        """The connections whose deadline has come at ``now``, in the order they began."""
        return [key for key, deadline in self.pending.items() if deadline <= now]

    def too_late(self) -> Refusal:
        """The answer to a request whose head did not arrive within ``HEADER_TIMEOUT``."""
        return Refusal(408, f"the request did not arrive within {self.timeout:g}s")

    def client(self, peer: str, headers: Headers) -> str:
        """The client's address of a request from TCP peer ``peer`` with ``headers``: read from
        the proxy's header when ``peer`` is a trusted proxy, else ``peer`` itself."""
        name = self.proxies.header_bytes
        values = [value.decode("latin-1") for found, value in headers if found == name]
        return self.proxies.client(peer, values)

    def origin_allowed(self, head: Head) -> bool:
        """Whether ``head``'s ``Origin`` may open a WebSocket (``ALLOWED_ORIGINS``)."""
        origins = self.origins
        return origins.any or origins.allows(head.header(b"origin"))

    def check_upgrade(self, head: Head, stopping: bool) -> str:
        """The client's key, once the WebSocket upgrade ``head`` may go on to a protocol; else
        HandshakeError: 405 for another method than GET, 400 or 426 for a bad handshake
        (``check_handshake``), ``OriginRefused`` (403) for a page whose origin is not allowed,
        503 on a ``stopping`` node."""
        if head.method != "GET":
            raise HandshakeError(405, "a WebSocket upgrade must be a GET", (("Allow", "GET"),))
        key = check_handshake(head.http_version, head.version, head.key)
        origins = self.origins  # origin_allowed, without a call: this runs per upgrade
        if not origins.any and not origins.allows(head.header(b"origin")):
            raise OriginRefused(403, ORIGIN_REFUSED)
        if stopping:
            raise HandshakeError(503, "shutting down")
        return key


class RequestIntake:
    """One connection while its first request head is read; gone once the request is routed
    (to a protocol on the driver, or to aiohttp) or refused."""

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
        "url",
    )

    def __init__(self, door: Door[Any]) -> None:
        self.door = door
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.raw = b""
        """Every byte read so far (aiohttp is handed them all)."""
        self.url = b""
        self.headers: Headers = []
        self.complete = False
        self.lingering = False
        """Refused, and read (what comes dropped) until the client closes."""
        self.peer = "unknown"
        """The TCP peer: a trusted proxy, or the client itself."""
        self.address: str | None = None
        """The client's address, while the connection holds its slot."""
        self.handed = False
        """The connection (and its slot) went to a protocol's connection or to aiohttp."""

    def open(self, peer: str, now: float) -> bool:
        """Accepted from TCP peer ``peer`` at ``now``, when its head begins to be awaited; False
        when ``peer``'s address has no slot left (refuse with ``TOO_MANY``). From a trusted
        proxy it takes no slot yet: its client's is taken once the head names it
        (``take_slot`` of ``Door.client``)."""
        self.peer = peer
        door = self.door
        if door.timeout > 0:
            door.pending[self] = now + door.timeout
        return door.proxies.trusts(peer) or self.take_slot(peer)

    def take_slot(self, address: str) -> bool:
        """Hold one of ``address``'s slots until the connection closes or is handed on; False
        when it has none left (``MAX_CONNECTIONS_PER_IP``): refuse with ``TOO_MANY``."""
        if not self.door.addresses.acquire(address):
            return False
        self.address = address
        return True

    def feed(self, data: bytes) -> Head | Refusal | None:
        """Read ``data``: the head once it is all in, the refusal to answer (431 past a limit,
        400 for what is not HTTP), or None (more is needed; or it stopped reading, and what
        comes is dropped). Reading stops with a head or a refusal."""
        parser = self.parser
        if parser is None:
            return None
        raw = self.raw = self.raw + data if self.raw else data
        rest = None
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
        except httptools.HttpParserError:
            if not self.complete:  # else a body that does not parse: aiohttp answers it
                self.stop()
                return MALFORMED
        door = self.door
        if rest is not None:
            size = len(raw) - len(rest)
        elif self.complete:  # the head ends at the first empty line; a body may follow
            end = raw.find(b"\r\n\r\n")
            size = len(raw) if end < 0 else end + 4
        else:
            size = len(raw)
        if size > door.max_head:
            self.stop()
            return Refusal(431, f"request line and headers longer than {door.max_head} bytes")
        if len(self.headers) > door.max_headers:
            self.stop()
            return Refusal(431, f"more than {door.max_headers} header lines")
        if not self.complete:
            return None
        door.pending.pop(self, None)  # as stop() does, without a call on every request
        self.parser = None
        # The head is in: what a WebSocket upgrade needs of it, and who serves it. (Read here
        # rather than in a function of its own: this runs per request.)
        headers = self.headers
        method = parser.get_method().decode("latin-1")
        http_version = parser.get_http_version()
        rest = rest or b""
        websocket, version, key, offered = scan_upgrade(headers)
        if websocket:  # the URL is parsed only for an upgrade, the only request served here
            try:
                parsed = httptools.parse_url(self.url)
            except httptools.HttpParserInvalidURLError:
                pass  # aiohttp answers it
            else:
                path = parsed.path.decode("latin-1")
                query = parsed.query.decode("latin-1") if parsed.query else ""
                way = _HTTP_WEBSOCKET if door.served_by_http(path) else _DRIVER
                return Head(
                    method, http_version, headers, rest, version, key, offered, path, query, way
                )
        return Head(method, http_version, headers, rest, version, key, offered, None, "", _HTTP)

    def hand_on(self) -> bytes:
        """The connection goes on to what serves it next (a protocol's connection, aiohttp),
        which holds its slot from now on: what was read so far, for aiohttp to read again."""
        self.handed = True
        raw = self.raw
        self.raw = b""
        return raw

    def stop(self) -> None:
        """Read no more: what comes is dropped, and no deadline holds it."""
        self.door.pending.pop(self, None)
        self.parser = None

    def linger(self, now: float) -> None:
        """Refused and answered at ``now``: read (and drop) what the client still sends until it
        closes, for ``LINGER`` seconds at most, so the answer is not lost to a reset."""
        self.lingering = True
        self.door.pending[self] = now + self.door.linger

    def overdue(self) -> tuple[Refusal | None, Exit]:
        """Its deadline passed: 408 when it began a request that did not arrive in time; reset
        when it lingered its time after a refusal; closed without an answer when it sent
        nothing at all (a browser's preconnect, say). It reads no more."""
        self.stop()
        if self.lingering:
            return None, Exit.ABORT
        if not self.raw:
            return None, Exit.CLOSE
        return self.door.too_late(), Exit.LINGER

    def shutdown(self) -> tuple[Refusal | None, Exit]:
        """The server stops: 503, unless a refusal was answered already; then close. It reads
        no more."""
        self.stop()
        return None if self.lingering else SHUTTING_DOWN, Exit.CLOSE

    def closed(self) -> None:
        """The connection closed: its slot comes back, unless what took it over holds it."""
        self.door.pending.pop(self, None)
        self.parser = None
        if self.address is not None and not self.handed:
            self.door.addresses.release(self.address)
        self.address = None

    # --- httptools callbacks ---
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True


class KeptAlive:
    """A connection aiohttp serves, as the front door counts it: the slot of ``address`` until it
    closes, and the clock of each later request's head (aiohttp has none): from the first byte
    after a request is done, ``HEADER_TIMEOUT`` for the next one's head to arrive."""

    __slots__ = ("address", "door", "in_request", "peer", "proxied")

    def __init__(self, door: Door[Any], address: str, peer: str | None = None) -> None:
        self.door = door
        self.address: str | None = address
        self.peer = peer if peer is not None else address
        """The TCP peer."""
        self.proxied = door.proxies.trusts(self.peer)
        """From a trusted proxy: each request names its client."""
        self.in_request = False

    def received(self, now: float) -> None:
        """Bytes arrived at ``now``: outside a request, the next one's head begins."""
        door = self.door
        if not self.in_request and door.timeout > 0 and self not in door.pending:
            door.pending[self] = now + door.timeout

    def request_started(self) -> None:
        """A request's head is in (aiohttp routed it): its clock stops."""
        self.in_request = True
        self.door.pending.pop(self, None)

    def request_done(self) -> None:
        self.in_request = False

    def move_slot(self, address: str) -> bool:
        """Hold a slot of ``address`` instead of the one held: a trusted proxy may send the
        requests of several clients on one connection. False (the slot stays) when ``address``
        has none left."""
        held = self.address
        if held is None or address == held:
            return True
        addresses = self.door.addresses
        if not addresses.acquire(address):
            return False
        addresses.release(held)
        self.address = address
        return True

    def give_slot(self) -> None:
        """What took the connection over (a WebSocket's connection) holds its slot now."""
        self.address = None

    def closed(self) -> None:
        """The connection closed: its slot comes back, unless what took it over holds it."""
        self.door.pending.pop(self, None)
        if self.address is not None:
            self.door.addresses.release(self.address)
            self.address = None


def peer_address(peername: object) -> str:
    """A client's IP address from what its socket names it (``getpeername``). Interned: the
    connections of one address share one string (the per-address count holds it while any is
    open)."""
    if isinstance(peername, tuple) and peername:
        return sys.intern(str(peername[0]))
    return "unknown"
