"""Rooms tokens and event validation, without a server (docs/protocols/rooms.md)."""

from __future__ import annotations

import base64
import hmac

import orjson
import pytest

from polysignal.core.errors import FrameTooLarge, MalformedFrame
from polysignal.protocols import rooms as proto

SECRET = b"wrtc-signal-secret"
# Made by wrtc-signal's TokenManager algorithm run in Node (Buffer base64 of JSON.stringify,
# crypto.createHmac('sha256', APP_SECRET), hex) with APP_SECRET=wrtc-signal-secret.
ORIGINAL_APP_TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJhcHAiOiJkZW1vLWNoYXQifQ==."
    "a11744eae18c68a7c1010b1d0149626c98d8d0dd8e21a9372e32b84cdbed4cea"
)
ORIGINAL_ODD_APP_TOKEN = (  # app = 'démo "chat"\n\u0001/é😀': escapes and non-ASCII as Node
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJhcHAiOiJkw6ltbyBcImNoYXRcIlxuXHUwMDAxL8Op8J+YgCJ9."
    "6a40f958f8983b07176f469c9a692287becccfaa298ca370429011690ef5c79b"
)
ORIGINAL_SESSION_TOKEN = (  # {app: 'demo-chat', exp: 1700000000, socket: 'AbC-123_xyz'}
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJhcHAiOiJkZW1vLWNoYXQiLCJleHAiOjE3MDAwMDAwMDAsInNvY2tldCI6IkFiQy0xMjNfeHl6In0=."
    "a918461fc0c202531eceb348785aa8f82c4c911f3fdfdcbd8bca4903dafd1eaa"
)
LIMITS = proto.Limits(max_payload_bytes=100, max_room_length=10)


def test_header_is_the_originals():
    assert base64.b64decode(proto.HEADER) == b'{"alg":"HS256","typ":"JWT"}'


def test_round_trip():
    token = proto.app_token("demo-chat", SECRET)
    assert proto.verify_token(token, SECRET) == {"app": "demo-chat"}


def test_tokens_made_the_original_way_verify_and_are_reproduced():
    assert proto.verify_token(ORIGINAL_APP_TOKEN, SECRET) == {"app": "demo-chat"}
    assert proto.app_token("demo-chat", SECRET) == ORIGINAL_APP_TOKEN
    odd = 'démo "chat"\n\u0001/é😀'
    assert proto.app_token(odd, SECRET) == ORIGINAL_ODD_APP_TOKEN
    assert proto.verify_token(ORIGINAL_ODD_APP_TOKEN, SECRET) == {"app": odd}
    assert proto.session_token("demo-chat", "AbC-123_xyz", 1700000000, SECRET) == (
        ORIGINAL_SESSION_TOKEN
    )


def test_session_token_round_trip_and_checks():
    token = proto.session_token("a", "sid-1", 2000, SECRET)
    assert proto.verify_session(token, SECRET, "sid-1", now=1999)
    assert not proto.verify_session(token, SECRET, "sid-1", now=2000)  # expired: exp <= now
    assert not proto.verify_session(token, SECRET, "sid-2", now=1000)  # other socket
    assert not proto.verify_session(token, b"other", "sid-1", now=1000)  # other secret
    # an app token has no socket and no expiry: never a session token
    assert not proto.verify_session(proto.app_token("a", SECRET), SECRET, "sid-1", now=0)


def _forge(payload_json: bytes, signature: str | None = None) -> str:
    payload = base64.b64encode(payload_json).decode()
    return f"{proto.HEADER}.{payload}.{signature or '0' * 64}"


@pytest.mark.parametrize(
    "token",
    [
        # the original checked only exp/socket on events, never the signature: forgeable
        _forge(b'{"app":"a","exp":9999999999,"socket":"sid-1"}'),
        # a signature from another secret
        proto.session_token("a", "sid-1", 9999999999, b"not-the-secret"),
        # a valid token with its payload swapped
        ORIGINAL_SESSION_TOKEN.split(".")[0]
        + "."
        + base64.b64encode(b'{"app":"demo-chat","exp":9999999999,"socket":"sid-1"}').decode()
        + "."
        + ORIGINAL_SESSION_TOKEN.split(".")[2],
        # uppercase hex of the right signature: the original compares exact strings
        ".".join(proto.session_token("a", "sid-1", 9999999999, SECRET).split(".")[:2])
        + "."
        + proto.session_token("a", "sid-1", 9999999999, SECRET).split(".")[2].upper(),
    ],
    ids=["unsigned", "other-secret", "swapped-payload", "uppercase-hex"],
)
def test_forged_session_tokens_fail(token):
    assert not proto.verify_session(token, SECRET, "sid-1", now=0)


@pytest.mark.parametrize(
    "token",
    [
        None,
        42,
        "",
        "a.b",
        "a.b.c.d",
        "x.eyJhcHAiOiJkZW1vLWNoYXQifQ==.00",
        "é.ü.ö",  # non-ASCII must not break the constant-time compare
        ORIGINAL_APP_TOKEN.replace("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", "eyJhbGciOiJub25lIn0="),
    ],
)
def test_malformed_tokens_fail_without_raising(token):
    assert proto.verify_token(token, SECRET) is None
    assert not proto.verify_session(token, SECRET, "s", now=0)
    assert not proto.verify_handshake(token, SECRET, now=0)


def test_validly_signed_payloads_without_app_or_json_fail():
    assert proto.verify_token(proto.create_token({"socket": "s"}, SECRET), SECRET) is None
    assert proto.verify_token(proto.create_token({"app": ""}, SECRET), SECRET) is None
    payload = base64.b64encode(b"not json").decode()
    sig = hmac.new(SECRET, (proto.HEADER + payload).encode(), "sha256").hexdigest()
    assert proto.verify_token(f"{proto.HEADER}.{payload}.{sig}", SECRET) is None


def test_handshake_accepts_app_tokens_and_unexpired_session_tokens():
    assert proto.verify_handshake(ORIGINAL_APP_TOKEN, SECRET, now=1e10)
    assert proto.verify_handshake(ORIGINAL_SESSION_TOKEN, SECRET, now=1699999999)
    assert not proto.verify_handshake(ORIGINAL_SESSION_TOKEN, SECRET, now=1700000000)
    weird_exp = proto.create_token({"app": "a", "exp": "never"}, SECRET)
    assert not proto.verify_handshake(weird_exp, SECRET, now=0)


def test_compares_are_constant_time(monkeypatch):
    """Signature, header and socket id all go through hmac.compare_digest, for every token."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(proto.hmac, "compare_digest", spy)
    good = proto.session_token("a", "sid-1", 2000, SECRET)
    assert proto.verify_session(good, SECRET, "sid-1", now=0)
    signature = good.split(".")[2].encode()
    assert (signature, signature) in calls
    assert (b"sid-1", b"sid-1") in calls
    calls.clear()
    forged = good[:-1] + ("0" if good[-1] != "0" else "1")
    assert not proto.verify_session(forged, SECRET, "sid-1", now=0)
    # the header compare runs even though the signature is wrong (no early exit)
    assert len(calls) == 2
    assert calls[1] == (forged.split(".")[2].encode(), signature)


def test_js_json_matches_json_stringify():
    assert proto.js_json({"a": [1, 2.5, None, True], "b": "é\n\u2028"}) == (
        '{"a":[1,2.5,null,true],"b":"é\\n\u2028"}'
    )


# --- event validation ---------------------------------------------------------------------------


def test_payload_limit_and_missing_fields():
    assert proto.parse_join({"room": "r"}, LIMITS) == proto.JoinRoom("r", proto.MISSING)
    assert proto.parse_join({"room": "r", "payload": None}, LIMITS).payload is None
    with pytest.raises(proto.BadEvent, match="payload is too large: 103 bytes"):
        proto.parse_join({"room": "r", "payload": "x" * 101}, LIMITS)
    assert proto.parse_join({"room": "r", "payload": "x" * 98}, LIMITS).payload == "x" * 98


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "expected an object, got null"),
        ([1], "expected an object, got a list"),
        ({}, "'room' is required"),
        ({"room": 1}, "'room' must be a string, got a number"),
        ({"room": True}, "got a boolean"),
        ({"room": "x" * 11}, "longer than 10"),
        ({"room": "r", "payload": b"\x00"}, "no binary"),
    ],
)
def test_join_validation(data, message):
    with pytest.raises(proto.BadEvent, match=message):
        proto.parse_join(data, LIMITS)


def test_bad_event_keeps_payload_for_the_reject():
    with pytest.raises(proto.BadEvent) as info:
        proto.parse_join({"room": 5, "payload": {"k": 1}}, LIMITS)
    assert info.value.payload == {"k": 1}


def test_create_room_falsy_means_uuid():
    assert proto.parse_create({}, LIMITS).room is None
    assert proto.parse_create({"room": ""}, LIMITS).room is None
    assert proto.parse_create({"room": "r"}, LIMITS).room == "r"


def test_relay_and_answer_parsing():
    relay = proto.parse_relay(
        proto.ClientEvent.RELAY_ICE_CANDIDATE,
        {"to": "p", "room": "r", "ice_candidate": {"candidate": "c"}, "peer_id": "ignored"},
        LIMITS,
    )
    assert relay == proto.Relay("p", "r", {"candidate": "c"})
    with pytest.raises(proto.BadEvent, match="'session_description' must be an object"):
        proto.parse_relay(
            proto.ClientEvent.RELAY_SESSION_DESCRIPTION, {"to": "p", "room": "r"}, LIMITS
        )
    with pytest.raises(proto.BadEvent, match="ice_candidate must be JSON data"):
        proto.parse_relay(
            proto.ClientEvent.RELAY_ICE_CANDIDATE,
            {"to": "p", "room": "r", "ice_candidate": {"c": b"binary"}},
            LIMITS,
        )
    answer = proto.parse_answer(
        proto.ClientEvent.ROOM_JOIN_ACCEPT, {"room": "r", "peer_id": "p", "to": 5}, LIMITS
    )
    assert answer == proto.Answer("r", "p")


def test_auth_request_parsing():
    cmd = proto.parse_auth_request({"token": "t", "peerinfo": {"n": 1}}, LIMITS)
    assert cmd == proto.AuthRequest("t", proto.MISSING, {"n": 1})
    assert proto.parse_auth_request({"token": "t", "peerinfo": None}, LIMITS).peerinfo is (
        proto.MISSING
    )
    for falsy in (None, False, 0, "", 0.0):  # as the original's `if (peerinfo)`
        assert proto.parse_auth_request({"token": "t", "peerinfo": falsy}, LIMITS).peerinfo is (
            proto.MISSING
        )
    for truthy in ([], {}, "0", 1, True):
        assert proto.parse_auth_request({"token": "t", "peerinfo": truthy}, LIMITS).peerinfo == (
            truthy
        )
    with pytest.raises(proto.BadEvent, match="peerinfo is too large"):
        proto.parse_auth_request({"token": "t", "peerinfo": "x" * 200}, LIMITS)


def test_bodies_drop_missing_fields():
    assert proto.body(room="r", payload=proto.MISSING, peerinfo=None) == {
        "room": "r",
        "peerinfo": None,
    }
    assert proto.peerinfo_of({}) is proto.MISSING
    assert proto.error_body("m", "e") == {"message": "m", "event": "e"}


def test_cluster_messages_round_trip():
    snap = proto.Snapshot(
        room="r",
        token="t",
        owner="a",
        version=3,
        members=(("a", proto.Member("n1", {})), ("b", proto.Member("n2", {"peerinfo": 1}))),
        pending=(("c", proto.Pending("n3", {}, proto.MISSING)), ("d", proto.Pending("n1", {}, 0))),
    )
    for msg in [
        proto.ClusterMessage(proto.ClusterOp.HANDOVER, "r", snapshot=snap),
        proto.ClusterMessage(
            proto.ClusterOp.JOIN_REQUEST, "r", sid="s", node="n", data={"peerinfo": None}
        ),
        proto.ClusterMessage(proto.ClusterOp.ADMIT, "r", sid="s", payload=None, hops=2),
        proto.ClusterMessage(
            proto.ClusterOp.LEAVE, "r", sid="s", token="t", data={"peerinfo": 1}, to=("a", "b")
        ),
        proto.ClusterMessage(proto.ClusterOp.WITHDRAW, "r", sid="s", token="t"),
        proto.ClusterMessage(
            proto.ClusterOp.EMIT,
            "r",
            event=proto.ServerEvent.ICE_CANDIDATE,
            body={"peer_id": "a", "ice_candidate": {"c": 1}},
            to=("b",),
        ),
    ]:
        assert proto.decode_cluster(proto.encode_cluster(msg)) == msg
    # an EMIT carries only the fields it uses
    emit = proto.ClusterMessage(
        proto.ClusterOp.EMIT, "r", event=proto.ServerEvent.ERROR, body={"m": 1}, to=("b",)
    )
    assert orjson.loads(proto.encode_cluster(emit)) == {
        "op": "emit",
        "room": "r",
        "event": "error",
        "body": {"m": 1},
        "to": ["b"],
    }
    for bad in (
        b'{"op":"nope","room":"r"}',
        b"not json",
        b"[]",
        b'{"op":"leave"}',
        b'{"op":"emit","room":"r","event":"no-such-event"}',
        b'{"op":"emit","room":"r","to":"b"}',
        b'{"op":"emit","room":"r","to":[1]}',
    ):
        with pytest.raises(MalformedFrame, match="invalid cluster message"):
            proto.decode_cluster(bad)


# --- values every peer reads back -------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), [1, {"a": float("-inf")}], {"x": [[float("nan")]]}, 2**64, b"x"],
)
def test_payloads_a_javascript_peer_could_not_read_back_are_refused(value):
    with pytest.raises(proto.BadEvent) as refused:
        proto.json_size(value)
    assert refused.value.message == "payload must be JSON data (no binary, NaN or Infinity)"


def test_payloads_with_null_and_finite_numbers_pass():
    assert proto.json_size([None, 1.5, {"a": None}, -0.0, 2**63 - 1]) == len(
        orjson.dumps([None, 1.5, {"a": None}, -0.0, 2**63 - 1])
    )


def test_names_must_be_unicode_text():
    assert proto.parse_join({"room": "é😀"}, LIMITS) == proto.JoinRoom("é😀")
    with pytest.raises(proto.BadEvent, match="'room' must be Unicode text"):
        proto.parse_join({"room": "a\udc80", "payload": 1}, LIMITS)
    assert proto.verify_token("\ud800.x.y", SECRET) is None


# --- packets ------------------------------------------------------------------------------------


def nested_text(levels: int, inner: str = "1") -> str:
    return "[" * levels + inner + "]" * levels


@pytest.mark.parametrize(
    ("text", "deeper"),
    [
        (nested_text(64), False),
        (nested_text(65), True),
        ("42" + nested_text(63, '"x"'), False),
        ("42" + nested_text(65, '"x"'), True),
        # brackets in strings, escaped quotes and backslashes included, do not count
        ("42" + nested_text(60, '"' + "[{" * 40 + '\\"[[\\\\"'), False),
        ('42["' + "[" * 100 + '"]', False),
        # closed brackets count down: many arrays side by side are not deep
        ("42[" + ",".join(["[]"] * 200) + "]", False),
        ('{"a":' * 65 + "1" + "}" * 65, True),
    ],
)
def test_nesting_is_measured_on_the_text(text, deeper):
    assert proto.nests_deeper(text) is deeper


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        ("", "empty engine.io packet"),
        ("7", "unknown engine.io packet type"),
        ("d=4hello", "unknown engine.io packet type"),
        ("42" + nested_text(65), "packet nested deeper than 64 levels"),
    ],
)
def test_engineio_packets_a_client_may_not_send(packet, message):
    with pytest.raises(MalformedFrame) as refused:
        proto.check_packet(packet)
    assert refused.value.message == message


def test_polling_payloads_are_bounded_at_their_limits():
    assert proto.polling_packets(b"", 10) == []
    assert proto.polling_packets(b"4abcdefghi", 10) == ["4abcdefghi"]  # exactly 10 bytes
    with pytest.raises(FrameTooLarge) as large:
        proto.polling_packets(b"4abcdefghij", 10)
    assert large.value.message == "payload is too large: 11 bytes, the limit is 10"
    sixteen = "\x1e".join(["3"] * 16).encode()
    assert proto.polling_packets(sixteen, 100) == ["3"] * 16
    with pytest.raises(MalformedFrame, match="more than 16 packets in one payload"):
        proto.polling_packets(sixteen + b"\x1e3", 100)
    with pytest.raises(MalformedFrame, match="payload is not UTF-8"):
        proto.polling_packets(b"4\xff", 100)
    assert proto.polling_packets(b"4\xc3\xa9\x1eb3", 100) == ["4é", "b3"]
    proto.check_packet(b"\x00binary")  # a binary message carries no JSON
