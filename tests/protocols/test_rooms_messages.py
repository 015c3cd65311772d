"""The rooms protocol's refusals word for word, and each limit at its exact boundary
(docs/protocols/rooms.md, "Errors and limits"), without a server."""

from __future__ import annotations

import base64
import hmac
from typing import Any

import pytest

from polysignal.core.errors import MalformedFrame
from polysignal.protocols import rooms as proto
from polysignal.protocols.rooms import MISSING, ClientEvent

SECRET = b"rooms-messages-secret"
LIMITS = proto.Limits(max_payload_bytes=100, max_room_length=10)
CREATE = ClientEvent.ROOM_CREATE_REQUEST
JOIN = ClientEvent.ROOM_JOIN_REQUEST
ACCEPT = ClientEvent.ROOM_JOIN_ACCEPT
REFUSE = ClientEvent.ROOM_JOIN_REJECT
SDP = ClientEvent.RELAY_SESSION_DESCRIPTION
ICE = ClientEvent.RELAY_ICE_CANDIDATE


def parse(kind: ClientEvent, data: Any) -> Any:
    match kind:
        case ClientEvent.AUTH_REQUEST:
            return proto.parse_auth_request(data, LIMITS)
        case ClientEvent.ROOM_CREATE_REQUEST:
            return proto.parse_create(data, LIMITS)
        case ClientEvent.ROOM_JOIN_REQUEST:
            return proto.parse_join(data, LIMITS)
        case ClientEvent.ROOM_JOIN_ACCEPT | ClientEvent.ROOM_JOIN_REJECT:
            return proto.parse_answer(kind, data, LIMITS)
    return proto.parse_relay(kind, data, LIMITS)


def refusal(kind: ClientEvent, data: Any) -> tuple[str, Any]:
    """The message and the payload of ``data``'s refusal."""
    with pytest.raises(proto.BadEvent) as refused:
        parse(kind, data)
    return refused.value.message, refused.value.payload


def valid(kind: ClientEvent, **fields: Any) -> dict[str, Any]:
    """Data ``kind`` accepts, with ``fields`` instead."""
    data: dict[str, Any] = {"room": "r"}
    if kind in (ACCEPT, REFUSE):
        data["peer_id"] = "p"
    if kind in (SDP, ICE):
        data["to"] = "p"
        data[proto.RELAY_BODY[kind]] = {"c": 1}
    data.update(fields)
    return {k: v for k, v in data.items() if v is not MISSING}


ROOM_EVENTS = [CREATE, JOIN, ACCEPT, REFUSE, SDP, ICE]


@pytest.mark.parametrize("kind", [ClientEvent.AUTH_REQUEST, *ROOM_EVENTS])
@pytest.mark.parametrize(
    ("data", "got"), [(None, "null"), ([1], "a list"), ("r", "a string"), (3, "a number")]
)
def test_event_data_must_be_an_object(kind, data, got):
    assert refusal(kind, data) == (f"{kind.value}: expected an object, got {got}", MISSING)


@pytest.mark.parametrize("kind", [JOIN, ACCEPT, REFUSE, SDP, ICE])
@pytest.mark.parametrize("room", [MISSING, None, ""])
def test_a_room_is_required(kind, room):
    data = valid(kind, room=room, payload={"k": 1})
    assert refusal(kind, data) == (f"{kind.value}: 'room' is required", {"k": 1})


@pytest.mark.parametrize("kind", ROOM_EVENTS)
@pytest.mark.parametrize(
    ("room", "got"), [(1, "a number"), (True, "a boolean"), (["r"], "a list"), ({}, "an object")]
)
def test_a_room_must_be_a_string(kind, room, got):
    data = valid(kind, room=room, payload=5)
    assert refusal(kind, data) == (f"{kind.value}: 'room' must be a string, got {got}", 5)


@pytest.mark.parametrize("kind", ROOM_EVENTS)
def test_a_room_is_bounded_at_its_exact_length(kind):
    assert parse(kind, valid(kind, room="x" * 10)).room == "x" * 10
    assert refusal(kind, valid(kind, room="x" * 11, payload=[1])) == (
        f"{kind.value}: 'room' is longer than 10 characters",
        [1],
    )
    assert refusal(kind, valid(kind, room="é" * 11, payload=[1]))[0] == (
        f"{kind.value}: 'room' is longer than 10 characters"  # characters, not bytes
    )
    assert parse(kind, valid(kind, room="é" * 10)).room == "é" * 10


@pytest.mark.parametrize("kind", ROOM_EVENTS)
def test_a_room_must_be_unicode_text(kind):
    assert refusal(kind, valid(kind, room="a\udc80", payload=2)) == (
        f"{kind.value}: 'room' must be Unicode text",
        2,
    )


@pytest.mark.parametrize(("kind", "key"), [(ACCEPT, "peer_id"), (REFUSE, "peer_id"), (SDP, "to")])
def test_the_peer_named_is_checked_as_a_room_is(kind, key):
    assert refusal(kind, valid(kind, **{key: MISSING, "payload": 1})) == (
        f"{kind.value}: '{key}' is required",
        1,
    )
    assert refusal(kind, valid(kind, **{key: "", "payload": 1})) == (
        f"{kind.value}: '{key}' is required",
        1,
    )
    assert refusal(kind, valid(kind, **{key: 7, "payload": 1})) == (
        f"{kind.value}: '{key}' must be a string, got a number",
        1,
    )
    assert refusal(kind, valid(kind, **{key: "\ud800", "payload": 1})) == (
        f"{kind.value}: '{key}' must be Unicode text",
        1,
    )


@pytest.mark.parametrize("kind", [ClientEvent.AUTH_REQUEST, *ROOM_EVENTS])
def test_the_payload_is_bounded_at_its_exact_size_and_not_echoed(kind):
    data = valid(kind, token="t") if kind is ClientEvent.AUTH_REQUEST else valid(kind)
    assert parse(kind, {**data, "payload": "x" * 98}).payload == "x" * 98  # 100 bytes as JSON
    assert refusal(kind, {**data, "payload": "x" * 99}) == (
        "payload is too large: 101 bytes, the limit is 100",
        MISSING,
    )
    assert refusal(kind, {**data, "payload": b"x"}) == (
        "payload must be JSON data (no binary, NaN or Infinity)",
        MISSING,
    )


@pytest.mark.parametrize("kind", [ClientEvent.AUTH_REQUEST, *ROOM_EVENTS])
def test_commands_carry_the_payload_or_missing(kind):
    data = valid(kind, token="t") if kind is ClientEvent.AUTH_REQUEST else valid(kind)
    assert parse(kind, data).payload is MISSING
    assert parse(kind, {**data, "payload": None}).payload is None
    assert parse(kind, {**data, "payload": {"n": 1}}).payload == {"n": 1}


def test_commands_whole():
    assert proto.parse_create({}, LIMITS) == proto.CreateRoom(None, MISSING)
    assert proto.parse_create({"room": None, "payload": 1}, LIMITS) == proto.CreateRoom(None, 1)
    assert proto.parse_create({"room": "", "payload": 2}, LIMITS) == proto.CreateRoom(None, 2)
    assert proto.parse_create({"room": "r", "payload": 3}, LIMITS) == proto.CreateRoom("r", 3)
    assert proto.parse_join({"room": "r", "payload": 4}, LIMITS) == proto.JoinRoom("r", 4)
    assert proto.parse_answer(REFUSE, {"room": "r", "peer_id": "p", "payload": 5}, LIMITS) == (
        proto.Answer("r", "p", 5)
    )
    sdp = {"type": "offer", "sdp": "v=0"}
    data = {"to": "p", "room": "r", "session_description": sdp, "payload": 6}
    assert proto.parse_relay(SDP, data, LIMITS) == proto.Relay("p", "r", sdp, 6)
    ice = {"to": "p", "room": "r", "ice_candidate": "candidate:1", "payload": 7}
    assert proto.parse_relay(ICE, ice, LIMITS) == proto.Relay("p", "r", "candidate:1", 7)


@pytest.mark.parametrize("kind", [SDP, ICE])
@pytest.mark.parametrize(
    ("body", "got"), [(MISSING, "null"), (None, "null"), (3, "a number"), ([1], "a list")]
)
def test_a_relay_carries_an_object(kind, body, got):
    key = proto.RELAY_BODY[kind]
    assert refusal(kind, valid(kind, **{key: body, "payload": 8})) == (
        f"{kind.value}: '{key}' must be an object, got {got}",
        8,
    )


@pytest.mark.parametrize("kind", [SDP, ICE])
def test_a_relay_body_must_be_json_data(kind):
    key = proto.RELAY_BODY[kind]
    assert refusal(kind, valid(kind, **{key: {"x": float("nan")}, "payload": 8})) == (
        f"{key} must be JSON data (no binary, NaN or Infinity)",
        MISSING,
    )


def test_peerinfo_is_bounded_at_its_exact_size_and_echoes_the_payload():
    assert proto.parse_auth_request({"token": "t", "peerinfo": "x" * 98}, LIMITS).peerinfo == (
        "x" * 98
    )
    with pytest.raises(proto.BadEvent) as refused:
        proto.parse_auth_request({"token": "t", "peerinfo": "x" * 99, "payload": 1}, LIMITS)
    assert (refused.value.message, refused.value.payload) == (
        "peerinfo is too large: 101 bytes, the limit is 100",
        1,
    )
    with pytest.raises(proto.BadEvent) as refused:
        proto.parse_auth_request({"token": "t", "peerinfo": [float("inf")]}, LIMITS)
    assert refused.value.message == "peerinfo must be JSON data (no binary, NaN or Infinity)"
    assert proto.parse_auth_request({"token": 5}, LIMITS) == proto.AuthRequest(5)


def test_missing_shows_as_missing():
    assert repr(MISSING) == "MISSING"


def test_js_json_refuses_what_json_stringify_would_write_as_null():
    with pytest.raises(ValueError):
        proto.js_json({"x": float("nan")})


def _signed(payload: str) -> str:
    sig = hmac.new(SECRET, (proto.HEADER + payload).encode(), "sha256").hexdigest()
    return f"{proto.HEADER}.{payload}.{sig}"


def test_a_signed_payload_is_decoded_leniently_as_nodes_buffer_does():
    """Node's ``Buffer.from(payload, 'base64')`` skips characters outside base64."""
    payload = base64.b64encode(b'{"app":"a"}').decode()
    assert proto.verify_token(_signed(payload[:4] + " " + payload[4:]), SECRET) == {"app": "a"}


@pytest.mark.parametrize(
    "data",
    [
        {"app": "a", "exp": True, "socket": "s"},
        {"app": "a", "exp": "9999999999", "socket": "s"},
        {"app": "a", "exp": None, "socket": "s"},
        {"app": "a", "exp": 9999999999, "socket": 5},
        {"app": "a", "exp": 9999999999, "socket": None},
        {"app": "a", "exp": 9999999999},
    ],
)
def test_a_session_needs_a_numeric_exp_and_a_socket_string(data):
    assert proto.verify_session(proto.create_token(data, SECRET), SECRET, "s", now=0) is False


def test_a_session_expires_at_its_exp():
    token = proto.create_token({"app": "a", "exp": 10.5, "socket": "s"}, SECRET)
    assert proto.verify_session(token, SECRET, "s", now=10.4) is True
    assert proto.verify_session(token, SECRET, "s", now=10.5) is False


@pytest.mark.parametrize(
    ("text", "deeper"),
    [
        # more brackets than the limit, none deeper than it
        ("42" + "[" * 64 + "]" * 64 + "[]", False),
        ("42" + "[" * 65 + "]" * 65, True),
        # a close goes one level up, no more
        ("42[" + "[]" * 2 + "[" * 64 + "]" * 65, True),
        ("42" + "[" * 64 + "]" + "[[]]" + "]" * 63, True),
    ],
)
def test_nesting_is_counted_level_by_level(text, deeper):
    assert proto.nests_deeper(text) is deeper


def test_polling_packets_split_on_the_record_separator_only():
    assert proto.polling_packets(b"4a b\x1e4c\td", 100) == ["4a b", "4c\td"]
    with pytest.raises(MalformedFrame) as refused:
        proto.polling_packets(b"4\xff", 100)
    assert refused.value.message == "payload is not UTF-8"
