"""Draining on SIGTERM (``DRAIN_SECONDS``, docs/operations/drain.md), with real node processes.

Every wait is on a condition; the drains are long (``DRAIN_SECONDS`` far above what the checks
take) and ended by a second signal, except where the test is the drain ending by itself.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from rooms_client import PASSWORD, SECRET

from support import UNIT, NodeProcess, receive_json, until_true

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

WS = aiohttp.ClientWebSocketResponse
LONG_DRAIN = 60 * UNIT
"""A drain no test waits out: ended by a second signal."""


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def draining_node(seconds: float) -> NodeProcess:
    """A node process with ``DRAIN_SECONDS`` and the rooms protocol on (socket.io included)."""
    return NodeProcess(
        {
            "BACKEND": "memory://",
            "DRAIN_SECONDS": f"{seconds:g}",
            "SHUTDOWN_TIMEOUT": f"{2 * UNIT:g}",
            "APP_SECRET": SECRET,
            "APP_PASS": PASSWORD,
        }
    )


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


async def send(ws: WS, message: dict[str, object]) -> None:
    await ws.send_str(orjson.dumps(message).decode())


async def subscribed(http: aiohttp.ClientSession, node: NodeProcess, topic: str) -> WS:
    """A topics WebSocket subscribed to ``topic`` (confirmed by a ping's pong)."""
    ws = await http.ws_connect(node.ws_url + "/")
    await send(ws, {"type": "subscribe", "topics": [topic]})
    await send(ws, {"type": "ping"})
    assert await receive_json(ws) == {"type": "pong"}
    return ws


async def engineio_open(http: aiohttp.ClientSession, node: NodeProcess) -> WS:
    """A socket.io (engine.io 4) WebSocket session: its OPEN packet received."""
    ws = await http.ws_connect(node.ws_url + "/socket.io/?EIO=4&transport=websocket")
    msg = await ws.receive(timeout=5 * UNIT)
    assert msg.type is aiohttp.WSMsgType.TEXT and msg.data.startswith("0{"), msg
    assert set(orjson.loads(msg.data[1:])) >= {"sid", "pingInterval", "pingTimeout"}
    return ws


async def close_code(ws: WS) -> int | None:
    """Read ``ws`` until it closes (at most 100 messages: pings, say); the close code."""
    for _ in range(100):
        msg = await ws.receive(timeout=10 * UNIT)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code
    raise AssertionError("no close after 100 messages")


async def exited(node: NodeProcess) -> int:
    assert node.proc is not None
    return await asyncio.to_thread(node.proc.wait, 15 * UNIT)


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_drain_serves_everything_while_readyz_is_503(http, first):
    """After the signal /readyz is 503 at once; a WebSocket opened before still exchanges
    messages, new WebSockets (topics, socket.io) and plain requests are served; a second
    signal ends the drain: every peer gets 1001 and the process exits 0."""
    node = draining_node(LONG_DRAIN).start()
    try:
        assert await get(http, node.url + "/readyz") == (200, "ready")
        before_a = await subscribed(http, node, "drain")
        before_b = await subscribed(http, node, "drain")

        node.send_signal(first)

        async def not_ready() -> bool:
            return (await get(http, node.url + "/readyz"))[0] == 503

        await until_true(not_ready, timeout=5 * UNIT)
        assert await get(http, node.url + "/readyz") == (503, "draining")
        assert await get(http, node.url + "/healthz") == (200, "okay")

        # connections opened before the signal keep exchanging messages
        await send(before_a, {"type": "publish", "topic": "drain", "data": "during"})
        got = await receive_json(before_b)
        assert (got["type"], got["topic"], got["data"]) == ("publish", "drain", "during")

        # a new WebSocket is accepted and reaches the old ones, and the other way round
        after = await subscribed(http, node, "drain")
        await send(after, {"type": "publish", "topic": "drain", "data": "new"})
        assert (await receive_json(before_a))["data"] == "new"
        assert (await receive_json(before_b))["data"] == "new"
        await send(before_b, {"type": "publish", "topic": "drain", "data": "old"})
        assert (await receive_json(after))["data"] == "old"
        # socket.io takes new sessions too
        engineio = await engineio_open(http, node)

        assert f"draining for {LONG_DRAIN:g}s" in node.log()
        assert node.alive

        node.send_signal(signal.SIGTERM)  # the second signal: stop now
        codes = await asyncio.gather(
            *(close_code(ws) for ws in (before_a, before_b, after, engineio))
        )
        assert codes == [1001, 1001, 1001, 1001]
        assert await exited(node) == 0
        log = node.log()
        assert "drain ended early by a second signal" in log
        assert log.index("drain ended early") < log.index("shutting down: closing connections")
        assert "stopped" in log
    finally:
        node.stop()


async def test_drain_ends_by_itself_then_closes_peers_with_1001(http):
    """A drain left alone ends after DRAIN_SECONDS: the peers get 1001, the exit status is 0."""
    seconds = 1 * UNIT
    node = draining_node(seconds).start()
    try:
        ws = await subscribed(http, node, "ends")
        node.send_signal(signal.SIGTERM)
        assert await close_code(ws) == 1001
        assert ws.close_code == 1001
        assert await exited(node) == 0
        lines = [
            line.split("] ", 1)[1]
            for line in node.log().splitlines()
            if "[server]" in line and ("drain" in line or "shutting down" in line)
        ]
        assert lines == [
            f"draining for {seconds:g}s: /readyz answers 503, connections are still served "
            "(a second SIGTERM ends the drain)",
            f"drain over after {seconds:g}s",
            "shutting down: closing connections with 1001",
        ]
    finally:
        node.stop()


async def test_no_drain_by_default(http):
    """DRAIN_SECONDS unset: SIGTERM closes the peers with 1001 at once, as before."""
    node = NodeProcess({"BACKEND": "memory://"}).start()
    try:
        ws = await subscribed(http, node, "default")
        node.send_signal(signal.SIGTERM)
        assert await close_code(ws) == 1001
        assert await exited(node) == 0
        assert "drain" not in node.log()
    finally:
        node.stop()
