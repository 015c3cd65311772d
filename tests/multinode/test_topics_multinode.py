"""The topics protocol on several polysignal processes sharing one real Redis.

Each node is a separate OS process with its own node id (``support.NodeProcess``); clients are
real WebSocket clients. The same client-visible behaviour as one process is expected, plus the
cluster's own faults: a node stopped or killed, Redis down at start or restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from support import (
    ON_EVERY_SHARED_BACKEND,
    UNIT,
    KeyReader,
    NodeProcess,
    assert_silent,
    backend_url,
    node_processes,
    receive_json,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.redis, pytest.mark.slow]

WS = aiohttp.ClientWebSocketResponse


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The shared backend's URL: one Redis, unless a test runs on every shared backend
    (``ON_EVERY_SHARED_BACKEND``: also a Redis Cluster and standalone shards)."""
    return backend_url(request, getattr(request, "param", "redis"))


@pytest.fixture
def env(backend: str, uid: str) -> dict[str, str]:
    """Node environment: the shared backend, channels private to the test, short TTLs."""
    return {
        "REDIS_URL": backend,
        "SIGNAL_CHANNEL": f"test:{uid}",
        "PRESENCE_TTL": "2",
        "PRESENCE_REFRESH": "0.5",
        "PRESENCE_CACHE_TTL": "0.5",
        "REDIS_BACKOFF_MAX": "0.5",
        "SHUTDOWN_TIMEOUT": "2",
    }


@pytest.fixture
async def r(backend: str) -> AsyncIterator[Any]:
    """Reads the keys the nodes keep (on whichever shard holds each)."""
    client = KeyReader(backend)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def send(ws: WS, message: dict[str, Any]) -> None:
    await ws.send_str(orjson.dumps(message).decode())


async def subscribe(ws: WS, *topics: str) -> None:
    await send(ws, {"type": "subscribe", "topics": list(topics)})


async def sync(ws: WS) -> None:
    """Round-trip a ping so the node has handled everything sent before it."""
    await ws.send_str('{"type":"ping"}')
    assert await receive_json(ws) == {"type": "pong"}


async def eventually(check: Any, what: str, timeout: float = 10 * UNIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


async def wait_presence(r: Any, topic: str, expected: dict[str, str]) -> None:
    """Until Flow-Like's hash holds exactly ``expected`` (node id -> count). A node writes its
    presence only after Redis confirmed its channel subscription, so afterwards every node
    listed receives every publish to ``topic``."""
    key = f"topic:presence:{topic}"
    last: dict[str, str] = {}

    async def matches() -> bool:
        nonlocal last
        last = await r.hgetall(key)
        return last == expected

    try:
        await eventually(matches, f"{key} == {expected}")
    except AssertionError:
        raise AssertionError(f"{key} is {last}, expected {expected}") from None


async def http_status(session: aiohttp.ClientSession, node: NodeProcess, path: str) -> int:
    async with session.get(node.url + path) as response:
        return response.status


# On one Redis only: the cluster runs the topics protocol's cross-node publishes and presence in
# test_presence_follows_subscribe_unsubscribe_close (this case would add 7 s to the suite).
@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_flow_like_multi_worker_case(r, env, uid, session):
    """Flow-Like's test-multi-worker: 4 clients over 2 nodes, one publishes: exactly the 3
    others get it, ``clients`` is 4 on every copy, ``_origin`` is the publishing node."""
    topic = f"sync-test-room-{uid}"
    with node_processes(2, env) as (a, b):
        assert a.node_id != b.node_id
        clients = [await session.ws_connect(n.ws_url) for n in (a, b, a, b)]
        for ws in clients:
            await subscribe(ws, topic)
        await wait_presence(r, topic, {a.node_id: "2", b.node_id: "2"})
        message = {
            "type": "publish",
            "topic": topic,
            "data": {"test": "sync", "from": "client-1"},
            "messageId": "m-1",
        }
        await send(clients[0], message)
        for ws in clients[1:]:
            assert await receive_json(ws) == {**message, "clients": 4, "_origin": a.node_id}
        for ws in clients:
            await assert_silent(ws)
        # And from the other node: its own node id as the origin.
        await send(clients[1], {**message, "messageId": "m-2"})
        for ws in (clients[0], clients[2], clients[3]):
            got = await receive_json(ws)
            assert (got["messageId"], got["clients"], got["_origin"]) == ("m-2", 4, b.node_id)
        await assert_silent(clients[1])


@ON_EVERY_SHARED_BACKEND
async def test_presence_follows_subscribe_unsubscribe_close(r, env, uid, session):
    topic = f"presence-{uid}"
    with node_processes(2, env) as (a, b):
        a1 = await session.ws_connect(a.ws_url)
        b1, b2 = await session.ws_connect(b.ws_url), await session.ws_connect(b.ws_url)
        await subscribe(a1, topic)
        await wait_presence(r, topic, {a.node_id: "1"})
        await subscribe(b1, topic)
        await subscribe(b2, topic)
        await wait_presence(r, topic, {a.node_id: "1", b.node_id: "2"})
        await send(b1, {"type": "unsubscribe", "topics": [topic]})
        await wait_presence(r, topic, {a.node_id: "1", b.node_id: "1"})
        await b2.close()
        await wait_presence(r, topic, {a.node_id: "1"})
        # The count a client sees follows: only a1 is left.
        await send(b1, {"type": "publish", "topic": topic, "data": "x"})
        got = await receive_json(a1)
        assert (got["clients"], got["_origin"]) == (1, b.node_id)
        await a1.close()
        await wait_presence(r, topic, {})


async def test_graceful_stop_removes_presence_at_once(r, env, uid, session):
    topic = f"stop-{uid}"
    with node_processes(2, env) as (a, b):
        a1, b1 = await session.ws_connect(a.ws_url), await session.ws_connect(b.ws_url)
        await subscribe(a1, topic)
        await subscribe(b1, topic)
        await wait_presence(r, topic, {a.node_id: "1", b.node_id: "1"})
        b_id = b.node_id
        closing = asyncio.create_task(b1.receive())  # answers the 1001 close at once
        assert await asyncio.to_thread(b.stop, signal.SIGTERM) == 0
        # No waiting: the stopped node removed its field before it exited.
        assert await r.hgetall(f"topic:presence:{topic}") == {a.node_id: "1"}
        closed = await closing
        assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 1001
        assert await r.exists(f"{env['SIGNAL_CHANNEL']}:alive:{b_id}") == 0


async def test_killed_node_presence_expires(r, env, uid, session):
    """SIGKILL: nothing is cleaned up by the node; its count is gone within PRESENCE_TTL (2 s)
    although the surviving node keeps the hash alive."""
    topic = f"kill-{uid}"
    with node_processes(2, env) as (a, b):
        a1, a2 = await session.ws_connect(a.ws_url), await session.ws_connect(a.ws_url)
        b1 = await session.ws_connect(b.ws_url)
        for ws in (a1, a2, b1):
            await subscribe(ws, topic)
        await wait_presence(r, topic, {a.node_id: "2", b.node_id: "1"})
        b.stop(signal.SIGKILL)
        await wait_presence(r, topic, {a.node_id: "2"})
        await sync(a1)

        async def counted_two() -> bool:
            await send(a1, {"type": "publish", "topic": topic, "data": "n"})
            return (await receive_json(a2))["clients"] == 2

        await eventually(counted_two, "clients == 2 without the killed node", timeout=5 * UNIT)


async def test_redis_restart_mid_run(private_redis, uid, session):
    """Redis stops (losing all state) and returns on the same port: local delivery never stops,
    /readyz reports the outage, cross-node delivery resumes, no process died, and nothing
    published during the outage arrives late."""
    private_redis.start()
    env = {
        "REDIS_URL": private_redis.url,
        "SIGNAL_CHANNEL": f"test:{uid}",
        "REDIS_BACKOFF_MAX": "0.5",
    }
    topic = f"restart-{uid}"
    r = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        with node_processes(2, env) as (a, b):
            a1, a2 = await session.ws_connect(a.ws_url), await session.ws_connect(a.ws_url)
            b1 = await session.ws_connect(b.ws_url)
            for ws in (a1, a2, b1):
                await subscribe(ws, topic)
            await wait_presence(r, topic, {a.node_id: "2", b.node_id: "1"})
            await send(a1, {"type": "publish", "topic": topic, "data": "before"})
            assert (await receive_json(b1))["data"] == "before"
            assert (await receive_json(a2))["data"] == "before"

            private_redis.stop()

            async def both_unready() -> bool:
                return {await http_status(session, n, "/readyz") for n in (a, b)} == {503}

            await eventually(both_unready, "/readyz 503 on both nodes")
            await send(a1, {"type": "publish", "topic": topic, "data": "during"})
            got = await receive_json(a2)
            assert (got["data"], got["clients"]) == ("during", 2), "local delivery continues"

            private_redis.start()

            async def both_ready() -> bool:
                return {await http_status(session, n, "/readyz") for n in (a, b)} == {200}

            await eventually(both_ready, "/readyz 200 on both nodes")
            await r.aclose()  # its pooled connection died with the old server
            r = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
            await wait_presence(r, topic, {a.node_id: "2", b.node_id: "1"})
            await send(a1, {"type": "publish", "topic": topic, "data": "after"})
            got = await receive_json(b1)
            assert (got["data"], got["clients"]) == ("after", 3)
            assert (await receive_json(a2))["data"] == "after"
            await assert_silent(b1)
            assert a.alive and b.alive
    finally:
        await r.aclose()


async def test_redis_down_at_start(private_redis, uid, session):
    """The node serves without Redis (local delivery), /readyz 503, then connects."""
    node = NodeProcess(
        {
            "REDIS_URL": private_redis.url,
            "SIGNAL_CHANNEL": f"test:{uid}",
            "REDIS_BACKOFF_MAX": "0.5",
        }
    )
    try:
        node.start(wait_ready=False)
        assert await http_status(session, node, "/readyz") == 503
        a1, a2 = await session.ws_connect(node.ws_url), await session.ws_connect(node.ws_url)
        await subscribe(a2, "t")
        await sync(a2)
        await send(a1, {"type": "publish", "topic": "t", "data": 1})
        got = await receive_json(a2)
        assert (got["data"], got["clients"], got["_origin"]) == (1, 1, node.node_id)
        private_redis.start()

        async def ready() -> bool:
            return await http_status(session, node, "/readyz") == 200

        await eventually(ready, "/readyz 200 once Redis runs")
        r = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
        try:
            await wait_presence(r, "t", {node.node_id: "1"})
        finally:
            await r.aclose()
        assert "cannot reach redis://127.0.0.1" in node.log()
    finally:
        node.stop()


async def test_workers_serve_from_every_worker(r, env, uid, session):
    """``--workers 2``: two processes on one port, each its own node on the shared Redis."""
    node_id = f"w{uid}"
    node = NodeProcess({**env, "NODE_ID": node_id}, args=["--workers", "2"])
    topic = f"workers-{uid}"
    try:
        node.start()
        await wait_workers_listening(node, node_id, 2)
        listener = await session.ws_connect(node.ws_url)
        await subscribe(listener, topic)
        await wait_presence_total(r, topic, 1)
        origins: set[str] = set()
        publishers: list[WS] = []
        for _ in range(40):  # the kernel spreads connections over the workers
            ws = await session.ws_connect(node.ws_url)
            publishers.append(ws)
            await send(ws, {"type": "publish", "topic": topic, "data": len(publishers)})
            got = await receive_json(listener)
            assert got["data"] == len(publishers)
            origins.add(got["_origin"])
            if len(origins) == 2:
                break
        assert origins == {f"{node_id}-1", f"{node_id}-2"}
        # Every publisher subscribes too: ``clients`` counts the subscribers of both workers.
        for ws in publishers:
            await subscribe(ws, topic)
        total = len(publishers) + 1
        await wait_presence_total(r, topic, total)

        async def counted_all() -> bool:
            await send(publishers[0], {"type": "publish", "topic": topic, "data": "count"})
            return bool((await receive_json(listener))["clients"] == total)

        await eventually(counted_all, f"clients == {total}", timeout=3 * UNIT)
        # Read on every client, so each answers the workers' 1001 close at once.
        readers = [asyncio.create_task(_drain(ws)) for ws in (listener, *publishers)]
        # A port held by both workers: a plain TCP client is accepted.
        with socket.create_connection(("127.0.0.1", node.port), timeout=2):
            pass
        assert await asyncio.to_thread(node.stop, signal.SIGTERM) == 0
        assert await r.hgetall(f"topic:presence:{topic}") == {}
        assert set(await asyncio.gather(*readers)) == {1001}
    finally:
        node.stop()


async def _drain(ws: WS) -> int | None:
    """Read ``ws`` until it closes (at most 10,000 messages); the close code."""
    for _ in range(10_000):
        msg = await ws.receive()
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code
    raise AssertionError("no close after 10,000 messages")


async def wait_workers_listening(node: NodeProcess, node_id: str, count: int) -> None:
    """Until every worker logged that it listens (each waits for Redis first)."""

    async def listening() -> bool:
        text = node.log()
        return all(f"(node {node_id}-{i}, backend" in text for i in range(1, count + 1))

    await eventually(listening, f"{count} workers listening")


async def wait_presence_total(r: aioredis.Redis, topic: str, total: int) -> None:
    async def reached() -> bool:
        counts = await r.hgetall(f"topic:presence:{topic}")
        return sum(int(v) for v in counts.values()) == total

    await eventually(reached, f"{total} subscribers of {topic} in Redis")


def test_workers_refused_on_the_memory_backend():
    """N > 1 workers cannot share peers without Redis: a clear error, exit status 2."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BACKEND")}
    result = subprocess.run(
        [sys.executable, "-m", "polysignal", "serve", "--workers", "2", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30 * UNIT,
    )
    assert result.returncode == 2
    assert "--workers > 1 needs a shared backend" in result.stderr


def worker_pids(node: NodeProcess) -> dict[int, int]:
    """Worker index -> pid, from the parent's log lines (the latest start of each)."""
    pids: dict[int, int] = {}
    for match in re.finditer(r"worker (\d+)/\d+ started \(pid (\d+)\)", node.log()):
        pids[int(match[1])] = int(match[2])
    return pids


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    return False


async def test_worker_restarted_and_orphans_stop(r, env, uid, session):
    """A killed worker is replaced (same node id); when the parent is killed, the workers stop
    by themselves and remove their presence."""
    node_id = f"w{uid}"
    node = NodeProcess({**env, "NODE_ID": node_id}, args=["--workers", "2"])
    topic = f"orphans-{uid}"
    try:
        node.start()
        first = worker_pids(node)
        assert sorted(first) == [1, 2]
        os.kill(first[1], signal.SIGKILL)

        async def replaced() -> bool:
            pids = worker_pids(node)
            return pids.get(1, first[1]) != first[1]

        await eventually(replaced, "worker 1 restarted")
        node.wait_http("/readyz")
        assert "worker 1 exited unexpectedly" in node.log()
        pids = worker_pids(node)
        # Subscribers on the workers, so each has presence to remove.
        clients = [await session.ws_connect(node.ws_url) for _ in range(6)]
        for ws in clients:
            await subscribe(ws, topic)
            await sync(ws)
        await wait_presence_total(r, topic, 6)
        # Read on every client, so each answers the workers' 1001 close at once.
        readers = [asyncio.create_task(ws.receive()) for ws in clients]
        node.stop(signal.SIGKILL)  # the parent only

        async def workers_gone() -> bool:
            return not any(pid_alive(pid) for pid in pids.values())

        try:
            await eventually(workers_gone, "orphaned workers stopped", timeout=30 * UNIT)
        except AssertionError as exc:  # what the workers logged says where they are stuck
            alive = [pid for pid in pids.values() if pid_alive(pid)]
            raise AssertionError(f"{exc}; alive: {alive}; log:\n{node.log()[-6000:]}") from None
        closes = await asyncio.gather(*readers)
        assert {(m.type, m.data) for m in closes} == {(aiohttp.WSMsgType.CLOSE, 1001)}
        counts = await r.hgetall(f"topic:presence:{topic}")
        assert counts == {}, "each worker removed its presence on the way out"
    finally:
        node.stop()
        for pid in worker_pids(node).values():
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
