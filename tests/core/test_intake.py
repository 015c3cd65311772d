"""The front door's decisions without a socket (core/intake.py): request heads in any split,
every limit at its boundary, refusals, deadlines with an explicit clock, slots, routing."""

from __future__ import annotations

import dataclasses
import itertools
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polysignal.core.edge import ORIGIN_REFUSED
from polysignal.core.intake import (
    INTERNAL,
    MALFORMED,
    SHUTTING_DOWN,
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
from polysignal.core.limits import AddressCounter
from polysignal.protocols.websocket import HandshakeError, http_error

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (
    b"GET /topics?room=a%20b HTTP/1.1\r\n"
    b"Host: signal.example.com\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: chat, Signal-Fire@3\r\n"
    b"Origin: https://app.example.com\r\n"
    b"\r\n"
)
FRAMES = b"\x81\x85\x01\x02\x03\x04\x69\x67\x6f\x68\x6e"  # "hello", masked
HEADERS = [
    (b"host", b"signal.example.com"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", KEY.encode()),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-protocol", b"chat, Signal-Fire@3"),
    (b"origin", b"https://app.example.com"),
]


def upgrade_head(rest: bytes = b"") -> Head:
    """What ``UPGRADE`` reads as, followed by ``rest``."""
    offered = ["chat", "Signal-Fire@3"]
    return Head(
        "GET", "1.1", HEADERS, rest, "13", KEY, offered, "/topics", "room=a%20b", Way.DRIVER
    )


def changed(head: Head, **fields: object) -> Head:
    return dataclasses.replace(head, **fields)


def padded(size: int, body: bytes = b"") -> bytes:
    """A GET whose request line and headers are exactly ``size`` bytes, then ``body``."""
    base = b"GET / HTTP/1.1\r\nX-Pad: \r\n\r\n"
    return b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * (size - len(base)) + b"\r\n\r\n" + body


def intake(door: Door[object] | None = None) -> RequestIntake:
    return RequestIntake(door if door is not None else Door())


def feed_all(machine: RequestIntake, chunks: list[bytes]) -> tuple[object, bytes]:
    """Feed ``chunks`` until one gives an outcome: (the outcome, every byte after that chunk)."""
    for n, chunk in enumerate(chunks):
        outcome = machine.feed(chunk)
        if outcome is not None:
            return outcome, b"".join(chunks[n + 1 :])
    return None, b""


# --- the refusals' exact answers ---------------------------------------------------------------


def test_the_constant_refusals_have_their_exact_statuses_and_bodies():
    assert (MALFORMED.status, MALFORMED.message, MALFORMED.headers) == (
        400,
        "malformed HTTP request",
        (),
    )
    assert (TOO_MANY.status, TOO_MANY.message) == (429, "too many connections from this address")
    assert (SHUTTING_DOWN.status, SHUTTING_DOWN.message) == (503, "shutting down")
    assert (UNAVAILABLE.status, UNAVAILABLE.message) == (
        503,
        "the service is unavailable; try again",
    )
    assert (INTERNAL.status, INTERNAL.message) == (500, "internal error")
    assert Refusal is HandshakeError
    assert http_error(TOO_MANY.status, TOO_MANY.message) == (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 39\r\nConnection: close\r\n\r\ntoo many connections from this address\n"
    )


# --- reading a head ----------------------------------------------------------------------------


def test_a_new_intake_holds_nothing_yet():
    door: Door[object] = Door()
    machine = intake(door)
    assert (machine.door, machine.raw, machine.url, machine.headers) == (door, b"", b"", [])
    assert (machine.complete, machine.lingering, machine.handed) == (False, False, False)
    assert (machine.peer, machine.address) == ("unknown", None)
    assert machine.parser is not None and door.pending == {}


def test_the_machines_made_per_connection_have_no_instance_dict():
    """Per-connection memory: slots only (the front door's subclasses add theirs)."""
    assert not hasattr(intake(), "__dict__")
    assert not hasattr(KeptAlive(Door(), "192.0.2.1"), "__dict__")
    assert not hasattr(upgrade_head(), "__dict__")  # one per request


def test_an_upgrade_read_in_one_chunk():
    machine = intake()
    assert machine.feed(UPGRADE) == upgrade_head()
    assert machine.parser is None and machine.raw == UPGRADE


def test_frames_sent_with_the_upgrade_are_the_bytes_after_the_head():
    assert intake().feed(UPGRADE + FRAMES) == upgrade_head(FRAMES)


def test_an_upgrade_split_at_every_byte_boundary_reads_the_same():
    data = UPGRADE + FRAMES
    for cut in range(1, len(data)):
        outcome, later = feed_all(intake(), [data[:cut], data[cut:]])
        assert isinstance(outcome, Head), cut
        assert outcome.rest + later == FRAMES, cut
        assert outcome == upgrade_head(outcome.rest), cut


@given(st.lists(st.integers(min_value=1, max_value=len(UPGRADE) + len(FRAMES) - 1), max_size=12))
def test_an_upgrade_split_anywhere_reads_the_same(cuts):
    data = UPGRADE + FRAMES
    bounds = [0, *sorted(set(cuts)), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    outcome, later = feed_all(intake(), chunks)
    assert isinstance(outcome, Head)
    assert outcome.rest + later == FRAMES
    assert outcome == upgrade_head(outcome.rest)


def test_an_upgrade_sent_one_byte_at_a_time():
    machine = intake()
    outcomes = [machine.feed(bytes([byte])) for byte in UPGRADE]
    assert outcomes[:-1] == [None] * (len(UPGRADE) - 1)
    assert outcomes[-1] == upgrade_head()


def test_a_plain_request_with_a_body_is_a_head_for_aiohttp():
    data = b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    machine = intake()
    head = machine.feed(data)
    headers = [(b"host", b"x"), (b"content-length", b"5")]
    assert head == Head("POST", "1.1", headers, b"", None, None, [], None, "", Way.HTTP)
    assert machine.raw == data  # aiohttp reads it all again, body included
    assert machine.hand_on() == data
    assert (machine.raw, machine.handed) == (b"", True)


def test_a_body_that_does_not_parse_is_left_to_aiohttp():
    """Past the head, a parse error is the body's: aiohttp answers it."""
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n"
    head = intake().feed(data)
    assert isinstance(head, Head) and head.method == "POST" and head.path is None


def test_an_http_1_0_head_names_its_version():
    head = intake().feed(b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(head, Head) and (head.method, head.http_version) == ("GET", "1.0")


@pytest.mark.parametrize(
    "data",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on a plain port
    ],
)
def test_what_is_not_http_is_refused_400_and_nothing_more_is_read(data):
    door: Door[object] = Door()
    machine = intake(door)
    assert machine.open("192.0.2.1", 0.0) is True
    assert machine.feed(data) is MALFORMED
    assert machine.parser is None and not door.pending
    assert machine.feed(b"GET / HTTP/1.1\r\n\r\n") is None
    assert machine.raw == data


def test_a_malformed_line_after_a_partial_head_is_refused():
    machine = intake()
    assert machine.feed(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    assert machine.feed(b"Bad Header\r\n\r\n") is MALFORMED


# --- the limits, at their exact boundaries -----------------------------------------------------


def test_a_head_of_exactly_max_head_bytes_is_read():
    data = padded(2048)
    assert len(data) == 2048
    head = intake(Door(max_head=2048)).feed(data)
    assert isinstance(head, Head) and head.headers == [(b"x-pad", b"p" * (2048 - 27))]


def test_a_head_one_byte_over_max_head_is_refused_431():
    machine = intake(Door(max_head=2048))
    refusal = machine.feed(padded(2049))
    assert refusal == Refusal(431, "request line and headers longer than 2048 bytes")
    assert machine.parser is None


def test_an_upgrade_of_exactly_max_head_bytes_with_frames_after_is_read():
    door: Door[object] = Door(max_head=len(UPGRADE))
    assert intake(door).feed(UPGRADE + FRAMES) == upgrade_head(FRAMES)
    door = Door(max_head=len(UPGRADE) - 1)
    assert intake(door).feed(UPGRADE + FRAMES) == Refusal(
        431, f"request line and headers longer than {len(UPGRADE) - 1} bytes"
    )


def test_a_body_does_not_count_against_max_head():
    head = intake(Door(max_head=2048)).feed(padded(2048, body=b"x" * 4096))
    assert isinstance(head, Head)


def test_a_head_that_never_ends_is_refused_once_it_passes_max_head():
    machine = intake(Door(max_head=64))
    start = b"GET / HTTP/1.1\r\nX-Endless: "
    assert machine.feed(start) is None
    assert machine.feed(b"x" * (64 - len(start))) is None  # 64 bytes so far
    assert machine.feed(b"x") == Refusal(431, "request line and headers longer than 64 bytes")


def test_exactly_max_headers_lines_are_read_and_one_more_refused():
    lines = b"".join(b"X-%d: v\r\n" % n for n in range(8))
    head = intake(Door(max_headers=8)).feed(b"GET / HTTP/1.1\r\n" + lines + b"\r\n")
    assert isinstance(head, Head) and len(head.headers) == 8
    nine = b"GET / HTTP/1.1\r\n" + lines + b"X-8: v\r\n"
    machine = intake(Door(max_headers=8))
    assert machine.feed(nine + b"\r\n") == Refusal(431, "more than 8 header lines")
    assert machine.parser is None
    machine = intake(Door(max_headers=8))
    assert machine.feed(nine) is None  # the ninth is not known to be whole yet
    assert machine.feed(b"X-9") == Refusal(431, "more than 8 header lines")


# --- who serves a head -------------------------------------------------------------------------


def socket_io(path: str) -> bool:
    return path.startswith("/socket.io/")


def test_a_websocket_for_a_protocol_goes_to_the_driver():
    head = intake(Door(served_by_http=socket_io)).feed(UPGRADE)
    assert isinstance(head, Head) and head.way is Way.DRIVER


def test_a_websocket_on_a_path_aiohttp_keeps_is_aiohttp_s_once_its_origin_is_allowed():
    data = UPGRADE.replace(b"/topics?room=a%20b", b"/socket.io/?EIO=4")
    head = intake(Door(served_by_http=socket_io)).feed(data)
    assert isinstance(head, Head)
    assert (head.path, head.query, head.way) == ("/socket.io/", "EIO=4", Way.HTTP_WEBSOCKET)
    head = intake().feed(data)  # by default, aiohttp keeps no path
    assert isinstance(head, Head) and head.way is Way.DRIVER


def test_any_other_request_goes_to_aiohttp():
    data = b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n"
    head = intake(Door(served_by_http=socket_io)).feed(data)
    assert isinstance(head, Head)
    assert (head.path, head.query, head.way) == (None, "", Way.HTTP)


@pytest.mark.parametrize(
    ("upgrade", "connection"), [(b"websocket", b"keep-alive"), (b"h2c", b"Upgrade")]
)
def test_an_upgrade_to_something_else_goes_to_aiohttp(upgrade, connection):
    data = b"GET / HTTP/1.1\r\nUpgrade: " + upgrade + b"\r\nConnection: " + connection + b"\r\n\r\n"
    head = intake().feed(data)
    assert isinstance(head, Head) and (head.path, head.way) == (None, Way.HTTP)


def test_a_websocket_whose_url_does_not_parse_goes_to_aiohttp():
    """aiohttp answers it (400)."""
    head = intake().feed(UPGRADE.replace(b"/topics?room=a%20b", b"http://x:99999/"))
    assert isinstance(head, Head)
    assert (head.path, head.query, head.way, head.version) == (None, "", Way.HTTP, "13")


def test_a_websocket_without_a_query_has_an_empty_one():
    for target in (b"/", b"/?"):
        head = intake().feed(UPGRADE.replace(b"/topics?room=a%20b", target))
        assert isinstance(head, Head) and (head.path, head.query) == ("/", "")


def test_a_head_read_by_aiohttp_has_its_names_in_lower_case():
    raw_headers = tuple((name.title(), value) for name, value in HEADERS)
    assert Head.parsed("GET", "1.1", raw_headers, "/topics", "room=a%20b") == upgrade_head()


def test_header_is_the_first_value_or_none():
    raw_headers = ((b"A", b"1"), (b"Origin", b"\xe9"), (b"origin", b"2"))
    head = Head.parsed("GET", "1.1", raw_headers, "/", "")
    assert head.header(b"origin") == "\xe9"
    assert head.header(b"host") is None


# --- what the door checks ----------------------------------------------------------------------


def test_an_upgrade_with_another_method_is_refused_405_with_allow():
    head = changed(upgrade_head(), method="POST")
    with pytest.raises(HandshakeError) as info:
        Door().check_upgrade(head, stopping=True)
    assert info.value == HandshakeError(
        405, "a WebSocket upgrade must be a GET", (("Allow", "GET"),)
    )


@pytest.mark.parametrize(
    ("http_version", "version", "key", "status", "message"),
    [
        ("1.0", "13", KEY, 400, "a WebSocket upgrade needs HTTP/1.1"),
        ("1.1", "8", KEY, 426, "unsupported Sec-WebSocket-Version; this server speaks 13"),
        ("1.1", "13", None, 400, "missing Sec-WebSocket-Key"),
        ("1.1", "13", "c2hvcnQ=", 400, "invalid Sec-WebSocket-Key"),
    ],
)
def test_a_bad_handshake_is_refused(http_version, version, key, status, message):
    head = changed(upgrade_head(), http_version=http_version, version=version, key=key)
    head.headers = [(b"origin", b"https://evil.example")]  # the handshake is checked first
    with pytest.raises(HandshakeError) as info:
        Door(allowed_origins=("https://app.example.com",)).check_upgrade(head, stopping=True)
    assert (info.value.status, info.value.message) == (status, message)


def test_a_valid_upgrade_gives_its_key():
    head = changed(upgrade_head(), key=f" {KEY} ")
    assert Door().check_upgrade(head, stopping=False) == KEY
    listed: Door[object] = Door(allowed_origins=("https://app.example.com",))
    assert listed.check_upgrade(head, stopping=False) == KEY


def test_an_upgrade_from_an_origin_not_allowed_is_refused_403_before_a_stopping_node_s_503():
    head = changed(upgrade_head(), headers=[(b"origin", b"https://evil.example")])
    listed: Door[object] = Door(allowed_origins=("https://app.example.com",))
    with pytest.raises(OriginRefused) as info:
        listed.check_upgrade(head, stopping=True)
    assert (info.value.status, info.value.message, info.value.headers) == (
        403,
        "origin not allowed",
        (),
    )
    assert isinstance(info.value, HandshakeError)
    with pytest.raises(HandshakeError) as stopping:
        Door().check_upgrade(head, stopping=True)
    assert stopping.value == HandshakeError(503, "shutting down")


def test_the_origin_allow_list():
    listed: Door[object] = Door(allowed_origins=("https://app.example.com",))
    assert listed.origin_allowed(upgrade_head()) is True
    other = changed(upgrade_head(), headers=[(b"origin", b"https://evil.example")])
    assert listed.origin_allowed(other) is False
    assert Door().origin_allowed(other) is True  # ``*``
    other = changed(other, headers=[])
    assert listed.origin_allowed(other) is True  # not a browser page
    assert ORIGIN_REFUSED == "origin not allowed"


def test_the_client_behind_a_trusted_proxy_is_read_from_the_configured_header():
    door: Door[object] = Door(trusted_proxies=("10.0.0.0/8",))
    headers = [(b"x-forwarded-for", b"198.51.100.7, 10.0.0.2"), (b"forwarded", b"for=203.0.113.9")]
    assert door.client("10.0.0.1", headers) == "198.51.100.7"
    assert door.client("192.0.2.1", headers) == "192.0.2.1"  # an untrusted peer names itself
    forwarded: Door[object] = Door(trusted_proxies=("10.0.0.0/8",), proxy_header="Forwarded")
    assert forwarded.client("10.0.0.1", headers) == "203.0.113.9"
    split = [(b"x-forwarded-for", b"198.51.100.7"), (b"x-forwarded-for", b"10.0.0.3")]
    assert door.client("10.0.0.1", split) == "198.51.100.7"


def test_the_door_s_defaults():
    door: Door[object] = Door()
    assert (door.max_head, door.max_headers, door.timeout, door.linger) == (16384, 100, 10.0, 2.0)
    assert not door.proxies and door.origins.any
    assert door.addresses.limit == 0 and door.pending == {}
    assert door.served_by_http("/socket.io/") is False
    counter = AddressCounter(3)
    assert Door(addresses=counter).addresses is counter


@pytest.mark.parametrize(
    ("timeout", "interval"), [(0.0, 1.0), (0.4, 0.1), (2.0, 0.5), (4.0, 1.0), (10.0, 1.0)]
)
def test_the_sweep_looks_four_times_per_timeout_at_most_once_a_second(timeout, interval):
    assert Door(timeout=timeout).sweep_interval == interval


@pytest.mark.parametrize(("timeout", "text"), [(10.0, "10s"), (0.6, "0.6s"), (2.5, "2.5s")])
def test_the_408_names_the_timeout(timeout, text):
    assert Door(timeout=timeout).too_late() == Refusal(
        408, f"the request did not arrive within {text}"
    )


# --- slots -------------------------------------------------------------------------------------


def test_a_direct_connection_takes_its_peer_s_slot_at_once():
    door: Door[object] = Door(addresses=AddressCounter(1))
    first = intake(door)
    assert first.open("192.0.2.1", 5.0) is True
    assert (first.peer, first.address, door.addresses.count("192.0.2.1")) == (
        "192.0.2.1",
        "192.0.2.1",
        1,
    )
    second = intake(door)
    assert second.open("192.0.2.1", 5.0) is False  # the 429
    assert second.address is None and door.addresses.count("192.0.2.1") == 1
    second.closed()
    assert door.addresses.count("192.0.2.1") == 1  # held none: gives none back
    first.closed()
    assert door.addresses.count("192.0.2.1") == 0 and first.address is None
    first.closed()
    assert door.addresses.count("192.0.2.1") == 0


def test_a_trusted_proxy_s_connection_takes_its_client_s_slot_once_the_head_names_it():
    door: Door[object] = Door(trusted_proxies=("10.0.0.0/8",), addresses=AddressCounter(1))
    machine = intake(door)
    assert machine.open("10.0.0.1", 0.0) is True
    assert machine.address is None and door.addresses.count("10.0.0.1") == 0
    head = machine.feed(b"GET / HTTP/1.1\r\nX-Forwarded-For: 198.51.100.7\r\n\r\n")
    assert isinstance(head, Head)
    client = door.client(machine.peer, head.headers)
    assert client == "198.51.100.7"
    assert machine.take_slot(client) is True
    assert machine.address == client and door.addresses.count(client) == 1
    other = intake(door)
    assert other.open("10.0.0.1", 0.0) is True
    assert other.take_slot(client) is False and other.address is None
    machine.closed()
    assert door.addresses.count(client) == 0


def test_a_connection_handed_on_keeps_its_slot_with_whoever_took_it():
    door: Door[object] = Door()
    machine = intake(door)
    machine.open("192.0.2.1", 0.0)
    machine.feed(UPGRADE)
    assert machine.hand_on() == UPGRADE
    machine.closed()
    assert door.addresses.count("192.0.2.1") == 1


# --- deadlines ---------------------------------------------------------------------------------


def test_a_head_is_awaited_from_the_connection_and_late_exactly_at_its_deadline():
    door: Door[object] = Door(timeout=10.0)
    machine = intake(door)
    machine.open("192.0.2.1", 100.0)
    assert door.pending == {machine: 110.0}
    assert door.late(109.999) == []
    assert door.late(110.0) == [machine]


def test_no_deadline_without_a_header_timeout():
    door: Door[object] = Door(timeout=0.0)
    machine = intake(door)
    machine.open("192.0.2.1", 100.0)
    assert door.pending == {} and door.late(1e9) == []


def test_late_connections_come_in_the_order_they_began():
    door: Door[object] = Door(timeout=1.0)
    machines = [intake(door) for _ in range(3)]
    for n, machine in enumerate(machines):
        machine.open("192.0.2.1", float(n))
    assert door.late(1.5) == machines[:1]
    assert door.late(3.0) == machines


def test_a_head_read_or_refused_is_no_longer_timed():
    door: Door[object] = Door()
    read, refused = intake(door), intake(door)
    read.open("192.0.2.1", 0.0)
    refused.open("192.0.2.2", 0.0)
    read.feed(UPGRADE)
    refused.feed(b"NOT HTTP\r\n\r\n")
    assert door.pending == {}


def test_a_request_begun_and_not_done_in_time_is_answered_408_and_lingers():
    door: Door[object] = Door(timeout=10.0, linger=2.0)
    machine = intake(door)
    machine.open("192.0.2.1", 0.0)
    machine.feed(b"GET / HTTP/1.1\r\n")
    assert machine.overdue() == (Refusal(408, "the request did not arrive within 10s"), Exit.LINGER)
    assert machine.parser is None and door.pending == {}
    assert machine.feed(b"Host: x\r\n\r\n") is None
    machine.linger(10.0)
    assert machine.lingering is True and door.pending == {machine: 12.0}
    assert door.late(11.999) == [] and door.late(12.0) == [machine]


def test_a_connection_that_sent_nothing_is_closed_silently():
    door: Door[object] = Door()
    machine = intake(door)
    machine.open("192.0.2.1", 0.0)
    assert machine.overdue() == (None, Exit.CLOSE)
    assert door.pending == {} and machine.parser is None


def test_a_lingering_connection_is_reset_when_its_time_is_up():
    door: Door[object] = Door()
    machine = intake(door)
    machine.open("192.0.2.1", 0.0)
    machine.feed(b"NOT HTTP\r\n\r\n")
    machine.linger(1.0)
    assert machine.overdue() == (None, Exit.ABORT)
    assert door.pending == {}


def test_at_shutdown_a_request_still_read_is_answered_503_a_refused_one_only_closed():
    door: Door[object] = Door()
    waiting, lingering = intake(door), intake(door)
    waiting.open("192.0.2.1", 0.0)
    lingering.open("192.0.2.2", 0.0)
    lingering.linger(0.0)
    assert waiting.shutdown() == (SHUTTING_DOWN, Exit.CLOSE)
    assert lingering.shutdown() == (None, Exit.CLOSE)
    assert door.pending == {} and waiting.parser is None


def test_a_closed_connection_is_no_longer_timed():
    door: Door[object] = Door()
    machine = intake(door)
    machine.open("192.0.2.1", 0.0)
    machine.closed()
    assert door.pending == {} and machine.parser is None


# --- a connection aiohttp serves ---------------------------------------------------------------


def test_a_kept_alive_connection_times_each_later_head_from_its_first_byte():
    door: Door[object] = Door(timeout=5.0)
    served = KeptAlive(door, "192.0.2.1")
    assert (served.peer, served.proxied, served.in_request) == ("192.0.2.1", False, False)
    served.received(10.0)
    served.received(12.0)  # the same head: its clock runs from its first byte
    assert door.pending == {served: 15.0}
    served.request_started()
    assert served.in_request is True and door.pending == {}
    served.received(20.0)  # a body, or a WebSocket's frames: not timed
    assert door.pending == {}
    served.request_done()
    assert served.in_request is False and door.pending == {}
    served.received(30.0)
    assert door.pending == {served: 35.0}


def test_a_kept_alive_connection_is_not_timed_without_a_header_timeout():
    door: Door[object] = Door(timeout=0.0)
    served = KeptAlive(door, "192.0.2.1")
    served.received(10.0)
    assert door.pending == {}
    door = Door(timeout=0.5)
    served = KeptAlive(door, "192.0.2.1")
    served.received(10.0)
    assert door.pending == {served: 10.5}


def test_a_kept_alive_connection_from_a_trusted_proxy_knows_its_peer():
    door: Door[object] = Door(trusted_proxies=("10.0.0.0/8",))
    served = KeptAlive(door, "198.51.100.7", "10.0.0.1")
    assert (served.address, served.peer, served.proxied) == ("198.51.100.7", "10.0.0.1", True)


def test_a_kept_alive_slot_moves_to_another_client_if_it_has_one_left():
    counter = AddressCounter(1)
    door: Door[object] = Door(addresses=counter)
    counter.acquire("198.51.100.7")
    served = KeptAlive(door, "198.51.100.7", "10.0.0.1")
    assert served.move_slot("198.51.100.7") is True  # the same client: nothing moves
    assert counter.count("198.51.100.7") == 1
    assert served.move_slot("203.0.113.9") is True
    assert served.address == "203.0.113.9"
    assert (counter.count("198.51.100.7"), counter.count("203.0.113.9")) == (0, 1)
    counter.acquire("198.51.100.7")
    assert served.move_slot("198.51.100.7") is False  # full: the slot stays
    assert served.address == "203.0.113.9"
    assert (counter.count("198.51.100.7"), counter.count("203.0.113.9")) == (1, 1)


def test_a_kept_alive_connection_gives_its_slot_back_when_it_closes():
    counter = AddressCounter(0)
    door: Door[object] = Door(timeout=5.0, addresses=counter)
    counter.acquire("192.0.2.1")
    served = KeptAlive(door, "192.0.2.1")
    served.received(0.0)
    served.closed()
    assert counter.count("192.0.2.1") == 0 and door.pending == {} and served.address is None
    served.closed()
    assert counter.count("192.0.2.1") == 0


def test_a_websocket_that_took_a_kept_alive_connection_over_holds_its_slot():
    counter = AddressCounter(0)
    door: Door[object] = Door(addresses=counter)
    counter.acquire("192.0.2.1")
    served = KeptAlive(door, "192.0.2.1")
    served.give_slot()
    assert served.move_slot("198.51.100.7") is True and served.address is None
    served.closed()
    assert counter.count("192.0.2.1") == 1 and counter.count("198.51.100.7") == 0


# --- the peer's name ---------------------------------------------------------------------------


def test_the_peer_is_named_by_its_address_interned():
    assert peer_address(("192.0.2.1", 4711)) == "192.0.2.1"
    assert peer_address(("2001:db8::1", 4711, 0, 0)) == "2001:db8::1"
    built = "".join(["192.0.", "2.1"])
    assert peer_address((built, 1)) is sys.intern("192.0.2.1")
    assert peer_address(()) == "unknown"
    assert peer_address(None) == "unknown"
    assert peer_address("/run/polysignal.sock") == "unknown"
