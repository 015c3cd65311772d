"""A real WebRTC handshake (two aiortc peers) whose peers are connected to different nodes.

The two nodes are separate processes sharing a real Redis; the offer, the answer and every
trickled ICE candidate cross from one node to the other as y-webrtc signals on a topic.
"""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest
import redis.asyncio as aioredis

from webrtc.test_topics_webrtc import ROOM, handshake_through

from rtc import exchange_and_close, loopback_only
from support import UNIT, node_processes

pytestmark = [pytest.mark.timeout(90), pytest.mark.redis, pytest.mark.slow]


async def test_aiortc_peers_on_two_nodes_connect(redis_url: str):
    env = {"REDIS_URL": redis_url, "SIGNAL_CHANNEL": f"test:{uuid.uuid4().hex[:10]}"}
    r = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with node_processes(2, env) as (node_a, node_b):
            async with aiohttp.ClientSession() as session:
                ws_a = await session.ws_connect(node_a.ws_url)
                ws_b = await session.ws_connect(node_b.ws_url)
                # Both subscribe first and the test waits until each node's presence is in
                # Redis, so each node receives the other's signals from the first one on.
                for ws in (ws_a, ws_b):
                    await ws.send_str(f'{{"type":"subscribe","topics":["{ROOM}"]}}')
                expected = {node_a.node_id: "1", node_b.node_id: "1"}
                for _ in range(int(200 * UNIT)):
                    if await r.hgetall(f"topic:presence:{ROOM}") == expected:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"presence never reached {expected}")
                with loopback_only():
                    a, b = await handshake_through(ws_a, ws_b)
                    await exchange_and_close(a, b)
    finally:
        await r.aclose()
