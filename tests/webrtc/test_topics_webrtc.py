"""Two real WebRTC peers (aiortc) signal through the topics protocol as y-webrtc does."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from rtc import RtcPeer, exchange_and_close, loopback_only
from support import RunningServer, receive_json

pytestmark = pytest.mark.timeout(60)

ROOM = "y-webrtc-room"


async def _publish(ws: aiohttp.ClientWebSocketResponse, data: dict[str, Any]) -> None:
    await ws.send_str(orjson.dumps({"type": "publish", "topic": ROOM, "data": data}).decode())


async def _signal(ws: aiohttp.ClientWebSocketResponse, me: str, to: str, signal: Any) -> None:
    await _publish(ws, {"type": "signal", "from": me, "to": to, "signal": signal})


async def _next_signal(ws: aiohttp.ClientWebSocketResponse, me: str) -> dict[str, Any]:
    """The next y-webrtc signal addressed to ``me`` (announces and others' signals skipped)."""
    while True:
        msg = await receive_json(ws, timeout=10)
        data = msg.get("data", {})
        if data.get("type") == "signal" and data.get("to") == me:
            assert msg["clients"] == 2
            return data["signal"]


async def _send_candidates(ws, me, to, candidates):
    for c in candidates:
        await _signal(ws, me, to, {"type": "candidate", "candidate": c})


async def handshake_through(ws_a, ws_b) -> tuple[RtcPeer, RtcPeer]:
    """A offers to B over the topic; both trickle candidates; returns the connected peers."""
    # Both subscribed (the pong answers after the subscribe) before either announces: an
    # announce may otherwise arrive ahead of the other's pong.
    for ws in (ws_a, ws_b):
        await ws.send_str(orjson.dumps({"type": "subscribe", "topics": [ROOM]}).decode())
        await ws.send_str('{"type":"ping"}')
        assert await receive_json(ws) == {"type": "pong"}
    for ws, me in ((ws_a, "peer-a"), (ws_b, "peer-b")):
        await _publish(ws, {"type": "announce", "from": me})
    a, b = RtcPeer(), RtcPeer()
    offer, a_candidates = await a.offer()
    await _signal(ws_a, "peer-a", "peer-b", offer)
    await _send_candidates(ws_a, "peer-a", "peer-b", a_candidates)

    got_offer = await _next_signal(ws_b, "peer-b")
    assert got_offer["type"] == "offer"
    answer, b_candidates = await b.answer(got_offer)
    for _ in a_candidates:
        await b.add_candidate((await _next_signal(ws_b, "peer-b"))["candidate"])
    await _signal(ws_b, "peer-b", "peer-a", answer)
    await _send_candidates(ws_b, "peer-b", "peer-a", b_candidates)

    got_answer = await _next_signal(ws_a, "peer-a")
    assert got_answer["type"] == "answer"
    await a.accept(got_answer)
    for _ in b_candidates:
        await a.add_candidate((await _next_signal(ws_a, "peer-a"))["candidate"])
    await asyncio.gather(a.wait_open(), b.wait_open())
    return a, b


async def test_two_aiortc_peers_connect_through_topics(server: RunningServer):
    with loopback_only():
        a, b = await handshake_through(await server.ws(), await server.ws())
        await exchange_and_close(a, b)
