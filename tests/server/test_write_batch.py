"""Batched output (server/connection.py WriteBatch): frames held within one loop iteration arrive
whole, in order, and before a close that followed them."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from rawws import frame, upgraded
from support import UNIT, node_settings, receive_json, running_server

pytestmark = pytest.mark.timeout(30)


async def sync(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str('{"type":"ping"}')
    assert await receive_json(ws) == {"type": "pong"}


async def test_burst_of_publishes_in_one_read_arrives_whole_and_in_order():
    """200 publishes in one TCP write fan out to 3 subscribers complete and in order."""
    async with running_server(node_settings(rate_limit=0)) as srv:
        subscribers = [await srv.ws() for _ in range(3)]
        for ws in subscribers:
            await ws.send_str('{"type":"subscribe","topics":["burst"]}')
            await sync(ws)
        raw = await upgraded(srv.port)
        try:
            count = 200
            burst = b"".join(
                frame(orjson.dumps({"type": "publish", "topic": "burst", "i": i, "pad": "x" * i}))
                for i in range(count)
            )
            raw.send(burst)
            await raw.writer.drain()
            for ws in subscribers:
                for i in range(count):
                    got = await receive_json(ws)
                    assert (got["i"], got["pad"], got["clients"]) == (i, "x" * i, 3)
        finally:
            await raw.aclose()


async def test_frame_sent_just_before_close_goes_out_before_the_close_frame():
    """send_text then close in the same tick: the client reads the text, then the close code."""
    async with running_server(node_settings()) as srv:
        ws = await srv.ws()
        await sync(ws)
        (conn,) = srv.node.connections
        conn.send_text(b'{"type":"error","message":"last words"}')
        conn.close(4000, "bye")
        got = await receive_json(ws)
        assert got == {"type": "error", "message": "last words"}
        msg = await asyncio.wait_for(ws.receive(), 5 * UNIT)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 4000
