"""The rooms protocol's gate (core/rooms.py ``Gate``): the handshake token, each event's rate
limit, name, session token, shape and allowed rooms, ``auth-request`` and ``POST /app``, with no
socket, no event loop and no clock (every call is given its times)."""

from __future__ import annotations

from typing import Any

import pytest

from polysignal.core import rooms as core
from polysignal.core.auth import Identity
from polysignal.protocols import rooms as proto
from polysignal.protocols.rooms import MISSING, ServerEvent

SECRET = b"s" * 32
WALL = 1_700_000_000.0
LIFETIME = 3600


def gate(rate: float = 0.0, burst: int = 1, **limits: int) -> core.Gate:
    machine = core.RoomsMachine("A", core.RoomLimits(**limits), new_id=lambda: "tok")
    return core.Gate(
        machine,
        SECRET,
        proto.Limits(max_payload_bytes=64, max_room_length=8),
        token_lifetime=LIFETIME,
        rate=rate,
        burst=burst,
    )


def session(sid: str, exp: float = WALL + 60) -> str:
    return proto.session_token("app", sid, int(exp), SECRET)


def let_in(g: core.Gate, sid: str = "s1", identity: Identity | None = None) -> core.Member:
    return g.connected(sid, "10.0.0.1", 100.0, identity)


def emit(event: ServerEvent, body: dict[str, Any], sid: str = "s1") -> core.Emit:
    return core.Emit(event, body, (sid,))


# --- the handshake ---


@pytest.mark.parametrize(
    ("auth", "refusal"),
    [
        (None, proto.TOKEN_REQUIRED),
        ("token", proto.TOKEN_REQUIRED),
        ({}, proto.TOKEN_REQUIRED),
        ({"token": None}, proto.TOKEN_REQUIRED),
        ({"token": "not.a.token"}, proto.TOKEN_NOT_VALID),
        ({"token": proto.app_token("app", b"other" * 8)}, proto.TOKEN_NOT_VALID),
        ({"token": session("x", exp=WALL)}, proto.TOKEN_NOT_VALID),  # expired at WALL exactly
        ({"token": session("x", exp=WALL + 1)}, None),
        ({"token": proto.app_token("app", SECRET)}, None),  # no expiry
    ],
)
def test_the_handshake_token(auth: Any, refusal: str | None) -> None:
    assert gate().refusal(auth, WALL) == refusal


def test_a_socket_let_in_is_a_member_until_it_goes() -> None:
    g = gate(rate=5, burst=2)
    member = let_in(g, identity=Identity("alice"))
    assert g.members == {"s1": member}
    assert (member.address, member.identity, member.bucket.rate, member.bucket.burst) == (
        "10.0.0.1",
        Identity("alice"),
        5,
        2,
    )
    assert g.machine.held() == (1, 0)
    assert g.disconnected("s1") == []
    assert g.members == {}
    assert g.machine.held() == (0, 0)
    assert g.disconnected("s1") is None  # gone already, or never let in


def test_leaving_hands_the_machines_effects_back() -> None:
    g = gate()
    let_in(g, "s1")
    let_in(g, "s2")
    auth = session("s1")
    created = g.event("s1", "room-create-request", {"auth": auth, "room": "r"}, 100.0, WALL)
    assert created == [core.ClaimName("r", "tok")]
    g.machine.handle(core.ClaimAnswer("r", "tok", core.ClaimResult.CLAIMED))
    assert g.machine.rooms_of("s1") == ("r",)
    assert g.disconnected("s1") == [core.ReleaseName("r", "tok")]


# --- events ---


def test_an_event_of_a_socket_never_let_in_is_dropped() -> None:
    assert gate().event("ghost", "room-create-request", {}, 100.0, WALL) == []


def test_an_unknown_event_is_named_in_the_error() -> None:
    g = gate()
    let_in(g)
    assert g.event("s1", "nope", {"auth": session("s1")}, 100.0, WALL) == [
        emit(ServerEvent.ERROR, {"message": "unknown event 'nope'", "event": "nope"})
    ]
    long = "x" * 65
    cut = "x" * 64
    assert g.event("s1", long, None, 100.0, WALL) == [
        emit(ServerEvent.ERROR, {"message": f"unknown event {cut!r}", "event": cut})
    ]
    assert g.event("s1", 7, None, 100.0, WALL) == [
        emit(ServerEvent.ERROR, {"message": "unknown event '7'", "event": "7"})
    ]


@pytest.mark.parametrize(
    "auth",
    [None, "garbage", session("s2"), session("s1", exp=WALL), proto.app_token("app", SECRET)],
)
def test_an_event_without_this_sockets_live_session_token_is_unauthorized(auth: Any) -> None:
    g = gate()
    let_in(g)
    data = {"auth": auth, "room": "r"} if auth is not None else {"room": "r"}
    assert g.event("s1", "room-create-request", data, 100.0, WALL) == [
        emit(ServerEvent.UNAUTHORIZED, {"message": proto.TOKEN_NOT_VALID})
    ]
    assert g.event("s1", "room-create-request", "not an object", 100.0, WALL) == [
        emit(ServerEvent.UNAUTHORIZED, {"message": proto.TOKEN_NOT_VALID})
    ]


def test_a_session_token_one_second_before_its_expiry_passes() -> None:
    g = gate()
    let_in(g)
    data = {"auth": session("s1", exp=WALL + 1), "room": "r"}
    assert g.event("s1", "room-create-request", data, 100.0, WALL) == [core.ClaimName("r", "tok")]


def test_bad_data_is_rejected_with_the_events_own_reject() -> None:
    g = gate()
    let_in(g)
    data = {"auth": session("s1"), "room": "123456789", "payload": 1}
    message = "room-create-request: 'room' is longer than 8 characters"
    assert g.event("s1", "room-create-request", data, 100.0, WALL) == [
        emit(ServerEvent.ROOM_CREATE_REJECT, {"message": message, "payload": 1})
    ]


def test_rate_limit_answers_once_per_interval() -> None:
    g = gate(rate=1, burst=1)
    let_in(g)
    data = {"auth": session("s1"), "room": "r1"}
    assert g.event("s1", "room-create-request", data, 100.0, WALL) == [core.ClaimName("r1", "tok")]
    over = [
        emit(
            ServerEvent.ERROR,
            {
                "message": "rate limit exceeded (1 events/s); events dropped",
                "event": "room-create-request",
            },
        )
    ]
    assert g.event("s1", "room-create-request", data, 100.0, WALL) == over
    assert g.event("s1", "room-create-request", data, 100.5, WALL) == []  # reported 0.5 s ago
    # A second after the report, the bucket has a token again: the event passes.
    assert g.event("s1", "room-create-request", data, 101.0, WALL) == [core.ClaimName("r1", "tok")]


def test_rate_report_exactly_one_interval_later() -> None:
    g = gate(rate=0.001, burst=1)
    let_in(g)
    data = {"auth": session("s1"), "room": "r1"}
    g.event("s1", "room-create-request", data, 100.0, WALL)
    first = g.event("s1", "x", None, 100.0, WALL)
    assert first == [
        emit(
            ServerEvent.ERROR,
            {"message": "rate limit exceeded (0.001 events/s); events dropped", "event": "x"},
        )
    ]
    assert g.event("s1", "x", None, 100.0 + core.RATE_REPORT_INTERVAL - 0.001, WALL) == []
    assert g.event("s1", "x", None, 100.0 + core.RATE_REPORT_INTERVAL, WALL) == first


# --- auth-request ---


def test_auth_request_issues_a_session_token_for_this_socket() -> None:
    g = gate()
    let_in(g)
    data = {"token": proto.app_token("myapp", SECRET), "payload": "p", "peerinfo": {"n": 1}}
    (accept,) = g.event("s1", "auth-request", data, 100.0, WALL)
    assert isinstance(accept, core.Emit)
    assert (accept.event, accept.to) == (ServerEvent.AUTH_ACCEPT, ("s1",))
    assert accept.body["payload"] == "p"
    token = accept.body["token"]
    assert proto.verify_token(token, SECRET) == {
        "app": "myapp",
        "exp": int(WALL) + LIFETIME,
        "socket": "s1",
    }
    assert proto.verify_session(token, SECRET, "s1", WALL + LIFETIME - 1)
    assert not proto.verify_session(token, SECRET, "s1", WALL + LIFETIME)


def test_auth_request_records_the_peerinfo() -> None:
    g = gate()
    let_in(g)
    data = {"token": proto.app_token("myapp", SECRET), "peerinfo": {"n": 1}}
    g.event("s1", "auth-request", data, 100.0, WALL)
    create = {"auth": session("s1"), "room": "r"}
    g.event("s1", "room-create-request", create, 100.0, WALL)
    g.machine.handle(core.ClaimAnswer("r", "tok", core.ClaimResult.CLAIMED))
    snap = g.machine.room("r")
    assert snap is not None
    assert dict(snap.members)["s1"].data == {"peerinfo": {"n": 1}}


@pytest.mark.parametrize("token", ["bad", proto.app_token("app", b"x" * 32), None])
def test_auth_request_with_a_bad_app_token_is_rejected(token: Any) -> None:
    g = gate()
    let_in(g)
    assert g.event("s1", "auth-request", {"token": token, "payload": 2}, 100.0, WALL) == [
        emit(ServerEvent.AUTH_REJECT, {"message": proto.TOKEN_NOT_VALID, "payload": 2})
    ]


# --- identities: the rooms a token allows ---


def test_a_token_keeps_creates_and_joins_to_its_rooms() -> None:
    g = gate()
    let_in(g, identity=Identity("alice", rooms=("team-*",)))
    auth = session("s1")
    assert g.event("s1", "room-create-request", {"auth": auth, "room": "team-a"}, 100.0, WALL) == [
        core.ClaimName("team-a", "tok")
    ]
    assert g.event(
        "s1", "room-create-request", {"auth": auth, "room": "other", "payload": 3}, 100.0, WALL
    ) == [
        emit(
            ServerEvent.ROOM_CREATE_REJECT,
            {"message": "room 'other' not allowed for this token", "payload": 3},
        )
    ]
    assert g.event("s1", "room-create-request", {"auth": auth}, 100.0, WALL) == [
        emit(ServerEvent.ROOM_CREATE_REJECT, {"message": "a room name is required by this token"})
    ]
    assert g.event("s1", "room-join-request", {"auth": auth, "room": "nope"}, 100.0, WALL) == [
        emit(ServerEvent.ROOM_JOIN_REJECT, {"message": "room 'nope' not allowed for this token"})
    ]


def test_check_room_lets_other_commands_and_unlimited_tokens_through() -> None:
    anyone = Identity("bob")
    core.check_room(anyone, proto.CreateRoom(None, MISSING))  # any room, a new name included
    core.check_room(anyone, proto.JoinRoom("r", MISSING))
    limited = Identity("carol", rooms=("r",))
    core.check_room(limited, proto.Answer("x", "peer", MISSING))
    with pytest.raises(proto.BadEvent) as caught:
        core.check_room(limited, proto.JoinRoom("s" * 200, MISSING))
    assert caught.value.message == f"room {'s' * 100!r} not allowed for this token"


# --- POST /app ---


@pytest.mark.parametrize(
    ("form", "answer"),
    [
        ([1], (400, {"status": 400, "error": "Request body must be an object", "response": False})),
        ({}, (401, {"status": 401, "error": proto.UNAUTHORIZED_HTTP, "response": False})),
        ({"password": 5}, (401, {"status": 401, "error": "Unauthorized", "response": False})),
        ({"password": "pw!"}, (401, {"status": 401, "error": "Unauthorized", "response": False})),
        (
            {"password": "pw"},
            (400, {"status": 400, "error": proto.APP_REQUIRED, "response": False}),
        ),
        (
            {"password": "pw", "app": ""},
            (400, {"status": 400, "error": proto.APP_REQUIRED, "response": False}),
        ),
        (
            {"password": "pw", "app": 3},
            (400, {"status": 400, "error": proto.APP_REQUIRED, "response": False}),
        ),
    ],
)
def test_post_app_refusals(form: Any, answer: tuple[int, dict[str, Any]]) -> None:
    assert gate().app_token(form, "pw") == answer


def test_post_app_issues_an_app_token() -> None:
    status, body = gate().app_token({"password": "pw", "app": "myapp"}, "pw")
    assert (status, body["status"], body["error"]) == (200, 200, None)
    assert body["response"] == {"token": proto.app_token("myapp", SECRET)}
    assert proto.verify_token(body["response"]["token"], SECRET) == {"app": "myapp"}


def test_post_app_takes_any_mapping_with_get() -> None:
    class Form:
        def get(self, key: str) -> str:
            return {"password": "pw", "app": "a"}[key]

    assert gate().app_token(Form(), "pw")[0] == 200


@pytest.mark.parametrize(
    ("event", "data", "message"),
    [
        ("room-join-accept", {"room": "r"}, "room-join-accept: 'peer_id' is required"),
        ("room-join-reject", {"room": "r"}, "room-join-reject: 'peer_id' is required"),
        ("relay-ice-candidate", {}, "relay-ice-candidate: 'room' is required"),
        ("relay-session-description", {}, "relay-session-description: 'room' is required"),
    ],
)
def test_each_event_is_parsed_by_its_own_rules(event: str, data: Any, message: str) -> None:
    g = gate()
    let_in(g)
    assert g.event("s1", event, {"auth": session("s1"), **data}, 100.0, WALL) == [
        emit(ServerEvent.ERROR, {"message": message, "event": event})
    ]


def test_a_join_request_goes_to_the_rooms_owner() -> None:
    g = gate()
    let_in(g)
    (ask,) = g.event("s1", "room-join-request", {"auth": session("s1"), "room": "r"}, 100.0, WALL)
    assert isinstance(ask, core.ToOwner)
    assert (ask.message.op, ask.message.room, ask.message.sid) == (
        proto.ClusterOp.JOIN_REQUEST,
        "r",
        "s1",
    )
