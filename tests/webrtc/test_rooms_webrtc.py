"""Two real WebRTC peers (aiortc) signal through the rooms protocol and open a data channel."""

from __future__ import annotations

import asyncio

import pytest

from rooms_client import RoomsClient, create_room, join_room, rooms_settings

from rtc import RtcPeer, loopback_only
from support import node_settings, running_server

pytestmark = pytest.mark.timeout(60)


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


async def test_two_aiortc_peers_connect_through_rooms():
    async with running_server(node_settings(**rooms_settings())) as srv:
        owner = await RoomsClient().connect(srv.url)
        joiner = await RoomsClient().connect(srv.url)
        try:
            await owner.login({"name": "owner"})
            await joiner.login({"name": "joiner"})
            with loopback_only():
                await rooms_handshake(owner, joiner, "call")
        finally:
            await owner.close()
            await joiner.close()
