"""A python-socketio client for the rooms protocol tests, recording every event it receives."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from typing import Any

import aiohttp
import socketio

from polysignal.protocols import rooms as proto

from rtc import RtcPeer
from support import UNIT

SECRET = "test-app-secret"
PASSWORD = "test-app-pass"


def rooms_settings() -> dict[str, Any]:
    """Settings overrides that enable the rooms protocol with known secrets."""
    from polysignal.config import Secret

    return {"app_secret": Secret(SECRET), "app_pass": Secret(PASSWORD)}


def app_token(app: str = "test-app") -> str:
    return proto.app_token(app, SECRET.encode())


async def fetch_app_token(url: str, app: str = "test-app") -> str:
    """An app token from ``POST /app``, as a deployment gets one."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/app", data={"app": app, "password": PASSWORD}) as resp,
    ):
        body = await resp.json()
        assert resp.status == 200, body
        token = body["response"]["token"]
        assert isinstance(token, str)
        return token


class RoomsClient:
    """One socket.io connection; ``expect(event)`` returns the next body of that event."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.queues: defaultdict[str, asyncio.Queue[Any]] = defaultdict(asyncio.Queue)
        self.session: str | None = None
        self._sid: str | None = None

        @self.sio.on("*")
        async def _any(event: str, *args: Any) -> None:
            self.queues[event].put_nowait(args[0] if len(args) == 1 else list(args))

    @property
    def sid(self) -> str:
        """The socket id (kept after a disconnect)."""
        assert self._sid is not None, "not connected"
        return self._sid

    async def connect(self, url: str, token: str | None = None, **kwargs: Any) -> RoomsClient:
        auth = {"token": token if token is not None else app_token()}
        await self.sio.connect(
            url, auth=auth, transports=["websocket"], wait_timeout=5 * UNIT, **kwargs
        )
        self._sid = self.sio.get_sid()
        return self

    async def login(self, peerinfo: Any = proto.MISSING) -> str:
        """``auth-request`` with an app token; returns and keeps the session token."""
        data: dict[str, Any] = {"token": app_token(), "payload": {"step": "auth"}}
        if peerinfo is not proto.MISSING:
            data["peerinfo"] = peerinfo
        await self.emit("auth-request", data)
        accepted = await self.expect("auth-accept")
        self.session = accepted["token"]
        return str(accepted["token"])

    async def emit(self, event: str, data: Any = None) -> None:
        await self.sio.emit(event, data)

    async def send(self, event: str, **fields: Any) -> None:
        """Emit ``event`` with ``fields`` and this socket's session token as ``auth``."""
        await self.emit(event, {"auth": self.session, **fields})

    async def expect(self, event: str, timeout: float = 3 * UNIT) -> Any:
        try:
            return await asyncio.wait_for(self.queues[event].get(), timeout)
        except TimeoutError:
            seen = {k: q.qsize() for k, q in self.queues.items() if q.qsize()}
            raise AssertionError(f"no {event!r} within {timeout}s; queued: {seen}") from None

    async def assert_silent(self, *events: str, timeout: float = 0.3 * UNIT) -> None:
        """None of ``events`` (any event if none given) arrives within ``timeout``."""
        await asyncio.sleep(timeout)
        names = events or tuple(self.queues)
        got = {name: self.queues[name].get_nowait() for name in names if self.queues[name].qsize()}
        assert not got, f"unexpected events: {got}"

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.sio.disconnect()


async def create_room(owner: RoomsClient, room: str) -> None:
    await owner.send("room-create-request", room=room)
    assert (await owner.expect("room-create-accept"))["room"] == room


async def join_room(owner: RoomsClient, joiner: RoomsClient, room: str) -> dict[str, Any]:
    """``joiner`` asks, ``owner`` accepts; returns the joiner's ``room-join-accept``."""
    await joiner.send("room-join-request", room=room)
    request = await owner.expect("room-join-request")
    assert request["peer_id"] == joiner.sid
    await owner.send("room-join-accept", room=room, peer_id=joiner.sid, to=joiner.sid)
    accepted: dict[str, Any] = await joiner.expect("room-join-accept")
    return accepted


async def rooms_handshake(owner: RoomsClient, joiner: RoomsClient, room: str) -> None:
    """The demo's order: the joiner offers to each peer of ``room-join-accept``; the owner
    answers after ``room-user-join``; both trickle ICE as ``relay-ice-candidate``."""
    await create_room(owner, room)
    accepted = await join_room(owner, joiner, room)
    assert accepted["peers"] == [owner.sid]
    assert (await owner.expect("room-user-join"))["peer_id"] == joiner.sid

    a, b = RtcPeer(), RtcPeer()
    try:
        offer, a_candidates = await a.offer()
        await joiner.send(
            "relay-session-description", to=owner.sid, room=room, session_description=offer
        )
        for candidate in a_candidates:
            await joiner.send(
                "relay-ice-candidate", to=owner.sid, room=room, ice_candidate=candidate
            )

        got = await owner.expect("session-description", timeout=10)
        assert got["peer_id"] == joiner.sid and got["room"] == room
        answer, b_candidates = await b.answer(got["session_description"])
        for _ in a_candidates:
            await b.add_candidate(
                (await owner.expect("ice-candidate", timeout=10))["ice_candidate"]
            )
        await owner.send(
            "relay-session-description", to=joiner.sid, room=room, session_description=answer
        )
        for candidate in b_candidates:
            await owner.send(
                "relay-ice-candidate", to=joiner.sid, room=room, ice_candidate=candidate
            )

        got = await joiner.expect("session-description", timeout=10)
        assert got["session_description"]["type"] == "answer"
        await a.accept(got["session_description"])
        for _ in b_candidates:
            await a.add_candidate(
                (await joiner.expect("ice-candidate", timeout=10))["ice_candidate"]
            )

        await asyncio.gather(a.wait_open(), b.wait_open())
        a.send("hello from the joiner")
        assert await b.receive() == "hello from the joiner"
        b.send("hello from the owner")
        assert await a.receive() == "hello from the owner"
    finally:
        await a.close()
        await b.close()


def check_flow(result: dict[str, Any]) -> None:
    """What the Node client saw, field by field, fixes included (docs/protocols/rooms.md)."""
    assert result.get("ok") is True, result
    room, owner, joiner = result["room"], result["ownerId"], result["joinerId"]
    assert result["refusal"] == {"message": "Token is not valid"}
    assert result["createAccept"] == {"room": room}
    assert result["joinRequest"] == {
        "room": room,
        "peer_id": joiner,
        "payload": {"hello": 1},
        "peerinfo": {"name": "joiner"},
    }
    assert result["joinAccept"] == {
        "room": room,
        "peer_id": joiner,
        "peers": [owner],
        "peersinfo": {
            owner: {"peerinfo": {"name": "owner"}},
            joiner: {"peerinfo": {"name": "joiner"}},
        },
    }
    assert result["userJoin"] == {"room": room, "peer_id": joiner, "peerinfo": {"name": "joiner"}}
    assert result["sessionDescription"] == {
        "peer_id": joiner,
        "session_description": {"type": "offer", "sdp": "v=0\r\n"},
        "room": room,
        "peerinfo": {"name": "joiner"},
    }
    assert result["iceCandidate"]["peer_id"] == owner
    assert result["iceCandidate"]["ice_candidate"]["sdpMLineIndex"] == 0
    assert result["iceCandidate"]["peerinfo"] == {"name": "owner"}
    assert result["unauthorized"] == {"message": "Token is not valid"}
    assert result["userLeave"] == {"room": room, "peer_id": joiner, "peerinfo": {"name": "joiner"}}
