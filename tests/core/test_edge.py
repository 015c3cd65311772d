"""The edge policy on its own (core/edge.py): the client's address through trusted proxies,
RFC 7239 ``Forwarded`` parsing, and the Origin allow-list. Through a real nginx and real
sockets: tests/server/test_proxy.py and tests/server/test_origin.py."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polysignal.core.edge import (
    AllowedOrigins,
    TrustedProxies,
    forwarded_for,
    parse_address,
)

GOOD = "https://app.example.com"
EVIL = "https://evil.example"


@pytest.mark.parametrize(
    ("peer", "values", "client"),
    [
        # an untrusted peer: its headers are ignored
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        # the rightmost hop that is not a trusted proxy
        ("10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["198.51.100.1, 203.0.113.5"], "203.0.113.5"),
        ("10.0.0.1", ["198.51.100.1, 10.0.0.7"], "198.51.100.1"),
        ("10.0.0.1", ["198.51.100.1", "10.0.0.7, 10.0.0.8"], "198.51.100.1"),
        # every hop trusted: the first
        ("10.0.0.1", ["10.0.0.5, 10.0.0.6"], "10.0.0.5"),
        # a hop that is no address: the last trusted hop before it
        ("10.0.0.1", ["198.51.100.1, unknown, 10.0.0.6"], "10.0.0.6"),
        ("10.0.0.1", ["garbage"], "10.0.0.1"),
        ("10.0.0.1", [""], "10.0.0.1"),
        ("10.0.0.1", [], "10.0.0.1"),
        # ports, IPv6, brackets, zones, IPv4-mapped IPv6
        ("10.0.0.1", ["198.51.100.1:4711"], "198.51.100.1"),
        ("10.0.0.1", ["2001:DB8::1"], "2001:db8::1"),
        ("10.0.0.1", ["[2001:db8::1]:4711"], "2001:db8::1"),
        ("10.0.0.1", ["fe80::1%eth0"], "fe80::1"),
        ("10.0.0.1", ["::ffff:198.51.100.1"], "198.51.100.1"),
        ("::ffff:10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("fd00::1", ["198.51.100.1"], "198.51.100.1"),
        ("fd00::1", ["2001:db8::9, fd00::2"], "2001:db8::9"),
        ("unknown", ["198.51.100.1"], "unknown"),
    ],
)
def test_the_client_is_the_rightmost_untrusted_hop(peer, values, client):
    proxies = TrustedProxies(["10.0.0.0/8", "fd00::/8"])
    assert proxies.client(peer, values) == client


def test_without_trusted_proxies_nothing_is_read():
    proxies = TrustedProxies()
    assert not proxies
    assert not proxies.trusts("127.0.0.1")
    assert proxies.client("127.0.0.1", ["198.51.100.1"]) == "127.0.0.1"


@pytest.mark.parametrize(
    ("value", "hops"),
    [
        ("for=192.0.2.60;proto=http;by=203.0.113.43", ["192.0.2.60"]),
        ('For="[2001:db8:cafe::17]:4711"', ["[2001:db8:cafe::17]:4711"]),
        ("for=192.0.2.43, for=198.51.100.17", ["192.0.2.43", "198.51.100.17"]),
        ('proto=https;for="192.0.2.1", by=x', ["192.0.2.1", None]),
        ('for="a\\"b,c";by=x, for=unknown', ['a"b,c', "unknown"]),
        ("for=_hidden", ["_hidden"]),
        ("", []),
    ],
)
def test_forwarded_for_values(value, hops):
    assert forwarded_for(value) == hops


def test_forwarded_mode_reads_forwarded_and_ignores_x_forwarded_for():
    proxies = TrustedProxies(["10.0.0.0/8"], "forwarded")
    assert proxies.header_bytes == b"forwarded"
    chain = ['for=198.51.100.1, for="[2001:db8::17]:4711";proto=https', "for=10.0.0.3"]
    assert proxies.client("10.0.0.1", chain) == "2001:db8::17"
    assert proxies.client("10.0.0.1", ["for=_hidden, for=10.0.0.3"]) == "10.0.0.3"
    assert proxies.client("10.0.0.1", ["by=10.0.0.2"]) == "10.0.0.1"


def test_addresses_are_parsed_strictly():
    assert parse_address("[2001:db8::1") is None
    assert parse_address("[2001:db8::1]x") is None
    assert parse_address("198.51.100.1:80:80") is None
    assert str(parse_address(" 198.51.100.1 ")) == "198.51.100.1"


def test_the_allow_list():
    origins = AllowedOrigins((GOOD, "null"))
    assert origins.allows(None) and origins.allows("")
    assert origins.allows(GOOD) and origins.allows("null")
    assert not origins.allows(EVIL)
    assert not origins.allows(GOOD + ".evil.example")
    assert not origins.allows("http://app.example.com")  # another scheme is another origin
    assert AllowedOrigins().allows(EVIL)
    assert AllowedOrigins().for_engineio() == "*"


# --- properties: any input, no exception, and never an address the chain did not name ------

TRUSTED = TrustedProxies(["10.0.0.0/8", "fd00::/8"])
HEADER_TEXT = st.text(alphabet=st.characters(codec="latin-1"), max_size=80)
IPV4 = st.ip_addresses(v=4)
IPV6 = st.ip_addresses(v=6)


def _hop_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"[{address}]:443" if address.version == 6 else f"{address}:443"


@given(st.lists(HEADER_TEXT, max_size=4))
def test_any_x_forwarded_for_gives_the_peer_or_an_address_it_names(values):
    client = TRUSTED.client("10.0.0.1", values)
    named = {str(parse_address(hop)) for v in values for hop in v.split(",") if parse_address(hop)}
    assert client == "10.0.0.1" or client in named


@given(st.lists(HEADER_TEXT, max_size=4))
def test_any_forwarded_header_parses_without_error(values):
    proxies = TrustedProxies(["10.0.0.0/8"], "forwarded")
    client = proxies.client("10.0.0.1", values)
    assert client == "10.0.0.1" or parse_address(client) is not None
    for value in values:
        assert all(hop is None or isinstance(hop, str) for hop in forwarded_for(value))


@given(st.lists(IPV4 | IPV6, min_size=1, max_size=5), st.booleans())
def test_an_untrusted_peer_is_the_client_whatever_it_forwards(hops, ports):
    values = [", ".join(_hop_text(h) if ports else str(h) for h in hops)]
    assert TRUSTED.client("203.0.113.9", values) == "203.0.113.9"


UNTRUSTED = (
    (IPV4 | IPV6)
    .map(lambda a: a.ipv4_mapped or a if a.version == 6 else a)
    .filter(lambda a: not TRUSTED.trusts(str(a)))
)


@given(
    st.lists(UNTRUSTED, min_size=1, max_size=4),
    st.lists(st.ip_addresses(network="10.0.0.0/8"), max_size=3),
    st.booleans(),
)
def test_the_client_is_the_last_untrusted_hop_before_the_trusted_ones(outside, inside, forwarded):
    chain = [*outside, *inside]
    if forwarded:
        proxies = TrustedProxies(["10.0.0.0/8", "fd00::/8"], "forwarded")
        values = [", ".join(f'for="{_hop_text(hop)}"' for hop in chain)]
    else:
        proxies = TRUSTED
        values = [", ".join(_hop_text(hop) for hop in chain)]
    assert proxies.client("10.0.0.1", values) == str(outside[-1])


@given(HEADER_TEXT)
def test_the_origin_check_matches_only_listed_origins(origin):
    origins = AllowedOrigins((GOOD,))
    assert origins.allows(origin) == (not origin or origin.strip().lower() == GOOD)
    assert AllowedOrigins().allows(origin)
