"""What a node checks at its edge before any protocol: who the client is, and which pages may
open a WebSocket (docs/operations/edge.md).

* ``TrustedProxies`` (``TRUSTED_PROXIES``, ``PROXY_HEADER``): the client's address behind a
  proxy. From a TCP peer inside one of the trusted networks, the address is the rightmost hop of
  ``X-Forwarded-For`` (or of RFC 7239 ``Forwarded: for=``) that is not itself a trusted proxy;
  from any other peer those headers are ignored, since anyone can send them. Only the header the
  proxy is configured to append is read: a proxy passes the other one through from the client
  untouched, so its rightmost value would be the client's own claim.
* ``AllowedOrigins`` (``ALLOWED_ORIGINS``): the ``Origin`` a browser sends with a WebSocket
  upgrade. Browsers let any page open a WebSocket to any server, with the user's cookies and
  from the user's network; only the server can refuse a page it does not know.

The front door (``server/frontdoor.py``) resolves the address once per request head and checks
the origin of every WebSocket upgrade; ``client_address`` gives aiohttp's ``request.remote`` the
same address for every request aiohttp serves (socket.io included).

Both are written here over ``ipaddress`` rather than taken from ``aiohttp-remotes``: that package
is a set of aiohttp middlewares, and most requests never reach aiohttp. The front door reads the
request head with httptools and must know the address before it takes the address's connection
slot; one resolver serves both paths so they cannot disagree.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ORIGIN_REFUSED = "origin not allowed"
"""The body of the 403 a WebSocket upgrade from a page of another origin gets."""


def parse_address(text: str) -> IPAddress | None:
    """An address as a peer name or a forwarding hop writes it: ``192.0.2.1``, ``2001:db8::1``,
    ``192.0.2.1:4711``, ``[2001:db8::1]:4711``, ``fe80::1%eth0``; None when it is none of those
    (``unknown``, an obfuscated ``_hidden``, garbage). An IPv4-mapped IPv6 address is the IPv4
    one, as a dual-stack socket reports an IPv4 peer."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and not text[end + 1 :].startswith(":")):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.partition(":")[0]
    text = text.partition("%")[0]  # an IPv6 zone
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_text(address: IPAddress) -> str:
    """How logs and per-address counters name ``address`` (interned: the connections of one
    address share one string)."""
    return sys.intern(str(address))


class TrustedProxies:
    """The proxies in front of a node, and how to read a client's address through them."""

    def __init__(self, networks: Iterable[str] = (), header: str = "x-forwarded-for") -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(network, strict=False) for network in networks
        )
        self.header = header.lower()
        """The header read from a trusted peer: ``x-forwarded-for`` or ``forwarded``."""
        self.header_bytes = self.header.encode()

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, peer: str) -> bool:
        """True when the TCP peer ``peer`` (as ``peer_address`` in ``core/intake.py`` names it)
        is a trusted proxy."""
        if not self.networks:
            return False
        address = parse_address(peer)
        return address is not None and self._trusted(address)

    def _trusted(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def client(self, peer: str, values: Sequence[str]) -> str:
        """The client's address for a request from TCP peer ``peer`` carrying ``values`` (every
        value of the configured header, in order).

        From an untrusted peer, the peer. From a trusted one, walking the forwarding chain from
        its end (the hop the peer itself appended) back: the first hop that is not a trusted
        proxy; every hop trusted, the first one. A hop that is no address ends the walk at the
        last trusted hop before it, since what lies beyond it was written by no one known.
        """
        if not self.networks or not values:
            return peer
        peer_ip = parse_address(peer)
        if peer_ip is None or not self._trusted(peer_ip):
            return peer
        client = peer
        for hop in reversed(self.hops(values)):
            address = parse_address(hop) if hop is not None else None
            if address is None:
                return client
            client = address_text(address)
            if not self._trusted(address):
                return client
        return client

    def hops(self, values: Sequence[str]) -> list[str | None]:
        """The forwarding chain in ``values``, first hop first (None: a hop without a
        ``for=``)."""
        if self.header == "forwarded":
            return [hop for value in values for hop in forwarded_for(value)]
        return [hop.strip() for value in values for hop in value.split(",")]


_ELEMENT = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^,"])+')
_PAIR = re.compile(r'(?:"(?:[^"\\]|\\.)*"|[^;"])+')
_ESCAPE = re.compile(r"\\(.)")


def forwarded_for(value: str) -> list[str | None]:
    """The ``for=`` of each element of one RFC 7239 ``Forwarded`` value, in order (None for an
    element without one or one that does not parse)."""
    found: list[str | None] = []
    for element in _ELEMENT.findall(value):
        if not element.strip():
            continue
        hop: str | None = None
        for pair in _PAIR.findall(element):
            name, eq, raw = pair.partition("=")
            if eq and name.strip().lower() == "for":
                raw = raw.strip()
                if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                    raw = _ESCAPE.sub(r"\1", raw[1:-1])
                hop = raw
                break
        found.append(hop)
    return found


class AllowedOrigins:
    """``ALLOWED_ORIGINS``: which ``Origin`` may open a WebSocket (and read socket.io's and
    PeerJS's responses cross-origin)."""

    def __init__(self, origins: Iterable[str] = ("*",)) -> None:
        listed = tuple(origins)
        self.any = "*" in listed or not listed
        self.origins = frozenset(origin.lower() for origin in listed if origin != "*")

    def allows(self, origin: str | None) -> bool:
        """True for a request without an Origin (not sent by a browser page), and for an origin
        on the list (any, with ``*``)."""
        if self.any or not origin:
            return True
        return origin.strip().lower() in self.origins

    def for_engineio(self) -> object:
        """python-engineio's ``cors_allowed_origins``: ``*`` (any origin is echoed, as the
        originals), or this check, so only a listed origin is echoed with credentials."""
        if self.any:
            return "*"
        return self._engineio

    def _engineio(self, origin: str | None, environ: object = None) -> bool:
        return self.allows(origin)
