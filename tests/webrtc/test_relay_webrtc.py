"""Two real WebRTC peers (aiortc) find each other through relay introductions and signal over a
piped ``/connection`` socket, on one node and across two nodes sharing a ``MemoryBus``."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest

from polysignal.backends.memory import MemoryBackend, MemoryBus

from rtc import RtcPeer, loopback_only
from support import UNIT, RunningServer, node_settings, running_server

pytestmark = pytest.mark.timeout(60)

WS = aiohttp.ClientWebSocketResponse
DOC = "shared-document"


async def introduced(server: RunningServer, me: str) -> WS:
    """Open ``/introduction/{me}`` (relay 4.x, msgpack) and join DOC."""
    ws = await server.ws(f"/introduction/{me}")
    await ws.send_bytes(msgpack.packb({"type": "Join", "documentIds": [DOC]}))
    return ws


async def next_introduction(ws: WS) -> dict[str, Any]:
    msg = await ws.receive(timeout=10 * UNIT)
    assert msg.type is aiohttp.WSMsgType.BINARY, msg
    intro = msgpack.unpackb(msg.data)
    assert intro["type"] == "Introduction" and intro["documentIds"] == [DOC]
    return intro


async def send(ws: WS, message: dict[str, Any]) -> None:
    await ws.send_str(orjson.dumps(message).decode())


async def receive(ws: WS) -> dict[str, Any]:
    msg = await ws.receive(timeout=10 * UNIT)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return orjson.loads(msg.data)


async def call_over_relay(server_a: RunningServer, server_b: RunningServer) -> None:
    # Whichever Join is handled second introduces both sides.
    intro_a = await introduced(server_a, "alice")
    intro_b = await introduced(server_b, "bob")
    assert (await next_introduction(intro_b))["peerId"] == "alice"
    assert (await next_introduction(intro_a))["peerId"] == "bob"
    # Each opens its side of the pipe, as the relay clients do on an Introduction.
    pipe_a = await server_a.ws(f"/connection/alice/bob/{DOC}")
    pipe_b = await server_b.ws(f"/connection/bob/alice/{DOC}")

    a, b = RtcPeer(), RtcPeer()
    offer, a_candidates = await a.offer()
    await send(pipe_a, {"offer": offer})
    for candidate in a_candidates:
        await send(pipe_a, {"candidate": candidate})
    got = await receive(pipe_b)
    answer, b_candidates = await b.answer(got["offer"])
    for _ in a_candidates:
        await b.add_candidate((await receive(pipe_b))["candidate"])
    await send(pipe_b, {"answer": answer})
    for candidate in b_candidates:
        await send(pipe_b, {"candidate": candidate})
    await a.accept((await receive(pipe_a))["answer"])
    for _ in b_candidates:
        await a.add_candidate((await receive(pipe_a))["candidate"])
    await asyncio.gather(a.wait_open(), b.wait_open())
    a.send("hello from alice")
    assert await b.receive() == "hello from alice"
    b.send("hello from bob")
    assert await a.receive() == "hello from bob"
    await a.close()
    await b.close()


async def test_two_aiortc_peers_call_over_a_relay_pipe(server):
    with loopback_only():
        await call_over_relay(server, server)


async def test_two_aiortc_peers_call_over_a_pipe_across_nodes():
    bus = MemoryBus()
    async with (
        running_server(node_settings(node_id="n1"), MemoryBackend("n1", bus)) as one,
        running_server(node_settings(node_id="n2"), MemoryBackend("n2", bus)) as two,
    ):
        with loopback_only():
            await call_over_relay(one, two)
