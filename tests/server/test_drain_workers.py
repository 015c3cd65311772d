"""Draining under ``--workers 2`` (docs/operations/drain.md): the parent passes SIGTERM on,
every worker drains, and the parent waits for the drain before it would kill a worker."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from polysignal.server.workers import STOP_MARGIN

from support import UNIT, NodeProcess, receive_json, until_true

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120)]

WS = aiohttp.ClientWebSocketResponse
SHUTDOWN = 1 * UNIT


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def workers_node(redis_url: str, drain: float) -> tuple[NodeProcess, str]:
    node_id = f"d{uuid.uuid4().hex[:8]}"
    env = {
        "REDIS_URL": redis_url,
        "SIGNAL_CHANNEL": f"test:{node_id}",
        "NODE_ID": node_id,
        "DRAIN_SECONDS": f"{drain:g}",
        "SHUTDOWN_TIMEOUT": f"{SHUTDOWN:g}",
        "ECHO": "1",
    }
    return NodeProcess(env, args=["--workers", "2"]), node_id


async def send(ws: WS, message: dict[str, object]) -> None:
    await ws.send_str(orjson.dumps(message).decode())


async def worker_of(ws: WS, n: int) -> str:
    """The worker serving ``ws``: the ``_origin`` of its own publish (``ECHO=1``) to a topic of
    its own, which never leaves its worker."""
    topic = f"own-{n}"
    await send(ws, {"type": "subscribe", "topics": [topic]})
    await send(ws, {"type": "publish", "topic": topic, "data": n})
    got = await receive_json(ws, timeout=5 * UNIT)
    assert got["data"] == n, got
    return str(got["_origin"])


async def pairs_on_both_workers(
    http: aiohttp.ClientSession, node: NodeProcess, node_id: str
) -> dict[str, tuple[WS, WS]]:
    """Per worker, a subscriber of the topic ``pair-{worker}`` and a publisher on the same
    worker (the kernel spreads new connections over the workers). Messages between them are
    delivered within the worker: what is checked is that the worker serves them."""

    async def listening() -> bool:
        text = node.log()
        return all(f"(node {node_id}-{i}, backend" in text for i in (1, 2))

    await until_true(listening, timeout=20 * UNIT)
    found: dict[str, list[WS]] = {}
    for n in range(80):
        ws = await http.ws_connect(node.ws_url)
        group = found.setdefault(await worker_of(ws, n), [])
        if len(group) < 2:
            group.append(ws)
        else:
            await ws.close()
        if len(found) == 2 and all(len(group) == 2 for group in found.values()):
            break
    assert {origin: len(group) for origin, group in found.items()} == {
        f"{node_id}-1": 2,
        f"{node_id}-2": 2,
    }
    pairs = {}
    for origin, (subscriber, publisher) in found.items():
        await send(subscriber, {"type": "subscribe", "topics": [f"pair-{origin}"]})
        await send(subscriber, {"type": "ping"})
        assert await receive_json(subscriber) == {"type": "pong"}
        pairs[origin] = (subscriber, publisher)
    return pairs


async def close_code(ws: WS) -> int | None:
    for _ in range(100):
        msg = await ws.receive(timeout=30 * UNIT)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code
    raise AssertionError("no close after 100 messages")


async def readyz_503_from_every_worker(http: aiohttp.ClientSession, node: NodeProcess) -> None:
    """``/readyz`` on fresh connections answers 503 ``draining``, until 20 answers in a row did
    (new connections land on either worker)."""
    in_a_row = 0

    async def twenty_in_a_row() -> bool:
        nonlocal in_a_row
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as fresh,
            fresh.get(node.url + "/readyz") as resp,
        ):
            body = await resp.text()
        in_a_row = in_a_row + 1 if (resp.status, body) == (503, "draining") else 0
        return in_a_row >= 20

    await until_true(twenty_in_a_row, timeout=10 * UNIT)


async def new_on_both_workers(http: aiohttp.ClientSession, node: NodeProcess) -> list[WS]:
    """New connections until each worker has served one (one kept per worker)."""
    kept: dict[str, WS] = {}
    for n in range(1000, 1080):
        ws = await http.ws_connect(node.ws_url)
        origin = await worker_of(ws, n)
        if origin in kept:
            await ws.close()
        else:
            kept[origin] = ws
        if len(kept) == 2:
            return list(kept.values())
    raise AssertionError(f"new connections reached only {set(kept)}")


async def exchange(node: NodeProcess, pairs: dict[str, tuple[WS, WS]], data: str) -> None:
    """On each worker, the publisher reaches the subscriber."""
    for origin, (subscriber, publisher) in pairs.items():
        await send(publisher, {"type": "publish", "topic": f"pair-{origin}", "data": data})
        try:
            got = await receive_json(subscriber, timeout=5 * UNIT)
        except TimeoutError:
            raise AssertionError(f"no publish on {origin}:\n{node.log()}") from None
        assert (got["_origin"], got["topic"], got["data"]) == (origin, f"pair-{origin}", data)


async def test_workers_drain_then_stop_without_being_killed(redis_url, http):
    """A drain longer than SHUTDOWN_TIMEOUT + STOP_MARGIN, left to end by itself: every worker
    drains while serving (old and new connections), then closes its peers with 1001; the parent
    waits for it and exits 0 (before, it killed the workers after SHUTDOWN_TIMEOUT + 5 s)."""
    drain = SHUTDOWN + STOP_MARGIN + 5 * UNIT
    node, node_id = workers_node(redis_url, drain)
    try:
        node.start()
        pairs = await pairs_on_both_workers(http, node, node_id)
        node.send_signal(signal.SIGTERM)
        await readyz_503_from_every_worker(http, node)
        await exchange(node, pairs, "during")
        latecomers = await new_on_both_workers(http, node)

        peers = [*latecomers, *(ws for pair in pairs.values() for ws in pair)]
        assert await asyncio.gather(*(close_code(ws) for ws in peers)) == [1001] * len(peers)
        assert node.proc is not None
        assert await asyncio.to_thread(node.proc.wait, drain + 30 * UNIT) == 0, node.log()
        log = node.log()
        assert log.count(f"draining for {drain:g}s") == 2
        assert log.count(f"drain over after {drain:g}s") == 2
        assert "killing it" not in log
    finally:
        node.stop()


async def test_second_sigterm_to_the_parent_ends_every_drain(redis_url, http):
    """A second SIGTERM to the parent is passed on: both workers end their drains at once."""
    node, node_id = workers_node(redis_url, 60 * UNIT)
    try:
        node.start()
        pairs = await pairs_on_both_workers(http, node, node_id)
        node.send_signal(signal.SIGTERM)
        await readyz_503_from_every_worker(http, node)
        await exchange(node, pairs, "during")
        node.send_signal(signal.SIGTERM)
        peers = [ws for pair in pairs.values() for ws in pair]
        assert await asyncio.gather(*(close_code(ws) for ws in peers)) == [1001] * len(peers)
        assert node.proc is not None
        assert await asyncio.to_thread(node.proc.wait, 20 * UNIT) == 0, node.log()
        log = node.log()
        assert log.count("drain ended early by a second signal") == 2
        assert "killing it" not in log
    finally:
        node.stop()
