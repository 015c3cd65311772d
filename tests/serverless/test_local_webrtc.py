"""Two real WebRTC peers (aiortc) signal through `serverless-local` as y-webrtc does: offer,
answer and trickled ICE candidates travel as topic publishes through the Lambda handler and
DynamoDB (moto), then a data-channel message crosses."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from rtc import RtcPeer, loopback_only
from support import UNIT, receive_json

pytestmark = pytest.mark.timeout(60)

ROOM = "serverless-webrtc-room"


class Signaller:
    """One y-webrtc-style peer on the signaling socket: announces, then signals to one peer."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, me: str) -> None:
        self.ws = ws
        self.me = me

    async def join(self) -> None:
        await self.ws.send_str(orjson.dumps({"type": "subscribe", "topics": [ROOM]}).decode())
        await self.ws.send_str('{"type":"ping"}')
        # The other peer's announce may come first: it was sent before this subscribe ended.
        for _ in range(10):
            msg = await receive_json(self.ws, timeout=5 * UNIT)
            if msg == {"type": "pong"}:
                break
            assert msg["data"]["type"] == "announce", msg
        else:
            raise AssertionError("no pong")
        await self.publish({"type": "announce", "from": self.me})

    async def publish(self, data: dict[str, Any]) -> None:
        message = {"type": "publish", "topic": ROOM, "data": data}
        await self.ws.send_str(orjson.dumps(message).decode())

    async def signal(self, to: str, signal: Any) -> None:
        await self.publish({"type": "signal", "from": self.me, "to": to, "signal": signal})

    async def candidates(self, to: str, candidates: list[dict[str, Any]]) -> None:
        for candidate in candidates:
            await self.signal(to, {"type": "candidate", "candidate": candidate})

    async def next_signal(self) -> dict[str, Any]:
        """The next signal addressed to me (announces skipped), sent by the one other peer."""
        for _ in range(100):
            msg = await receive_json(self.ws, timeout=10 * UNIT)
            assert msg["type"] == "publish" and msg["clients"] == 2
            data = msg["data"]
            if data.get("type") == "signal" and data.get("to") == self.me:
                return data["signal"]
        raise AssertionError("no signal among 100 messages")


async def test_two_aiortc_peers_connect_through_serverless_local(local):
    with loopback_only():
        a = Signaller(await local.ws(), "peer-a")
        b = Signaller(await local.ws(), "peer-b")
        await a.join()
        await b.join()
        pa, pb = RtcPeer(), RtcPeer()
        try:
            offer, a_candidates = await pa.offer()
            await a.signal("peer-b", offer)
            await a.candidates("peer-b", a_candidates)

            got_offer = await b.next_signal()
            assert got_offer["type"] == "offer"
            answer, b_candidates = await pb.answer(got_offer)
            for _ in a_candidates:
                await pb.add_candidate((await b.next_signal())["candidate"])
            await b.signal("peer-a", answer)
            await b.candidates("peer-a", b_candidates)

            got_answer = await a.next_signal()
            assert got_answer["type"] == "answer"
            await pa.accept(got_answer)
            for _ in b_candidates:
                await pa.add_candidate((await a.next_signal())["candidate"])

            await asyncio.gather(pa.wait_open(), pb.wait_open())
            pa.send("hello through lambda")
            assert await pb.receive() == "hello through lambda"
            pb.send("and back")
            assert await pa.receive() == "and back"
        finally:
            await pa.close()
            await pb.close()
