"""Cluster faults with real processes: Redis hung (SIGSTOP) or restarted empty under publish load
across two node processes, and a node SIGKILLed in the middle of a pipe (docs/redis.md, "Faults").

What must hold:

* local delivery never waits for the cluster: while Redis is hung every publish reaches the
  subscribers on its own node within ``LOCAL_BOUND``, and a new Signal-Fire client is welcomed
  within ``WELCOME_BOUND``;
* after Redis comes back empty every lease (a room name, a Signal-Fire id, a relay peer id) is back
  in Redis within ``REASSERT_BOUND`` of its start, and nothing of a node can be taken by a client
  of another node meanwhile, not even while that node is late;
* a pipe whose other end's node is killed ends on the surviving node with the documented close.

Every figure these tests measure is printed (``-s`` shows them); docs/redis.md quotes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from polysignal.core.errors import CloseCode
from polysignal.protocols import rooms as proto
from rooms_client import PASSWORD, SECRET, RoomsClient, create_room

from support import UNIT, NodeProcess, RedisServer, node_processes, receive_json, until

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120)]

WS = aiohttp.ClientWebSocketResponse
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)

LOCAL_BOUND = 0.05 * UNIT
"""Longest a publish may take to reach a subscriber on its own node, whatever Redis does."""
WELCOME_BOUND = 0.5 * UNIT
"""Longest a new Signal-Fire client may wait for its welcome while Redis is hung."""
REASSERT_BOUND = 1.0 * UNIT
"""Longest after Redis is started again until every lease of a node is back in it."""
HUNG = 2.5
"""Seconds Redis stays stopped (SIGSTOP): longer than the presence cache's TTL of the nodes
below, so their cached counts are stale meanwhile, and shorter than REDIS_COMMAND_TIMEOUT, so
they do not count the connection as lost."""
DOWN = 3.0
"""Seconds Redis stays down before it restarts empty: long enough for a reconnect backoff that
doubled a few times (0.2, 0.4, 0.8, 1.6 s...) to matter."""
PREFIX = "signal:publish"


def fault_env(redis_url: str) -> dict[str, str]:
    """The defaults of the reconnect backoff (and so of the settle grace), rooms enabled."""
    return {
        "REDIS_URL": redis_url,
        "APP_SECRET": SECRET,
        "APP_PASS": PASSWORD,
        "ICE_SERVERS": "[]",
        "PRESENCE_CACHE_TTL": "0.5",
        "SHUTDOWN_TIMEOUT": "2",
    }


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def started_redis(private_redis: RedisServer) -> Iterator[RedisServer]:
    private_redis.start()
    try:
        yield private_redis
    finally:
        # A stopped redis-server does not act on SIGTERM until it runs again.
        if private_redis.proc is not None and private_redis.proc.poll() is None:
            private_redis.proc.send_signal(signal.SIGCONT)


async def status(http: aiohttp.ClientSession, node: NodeProcess) -> int:
    async with http.get(node.url + "/readyz") as resp:
        return resp.status


async def until_status(
    http: aiohttp.ClientSession, node: NodeProcess, code: int, timeout: float = 10 * UNIT
) -> None:
    deadline = time.monotonic() + timeout
    while await status(http, node) != code:
        assert time.monotonic() < deadline, f"{node.node_id}: /readyz never answered {code}"
        await asyncio.sleep(0.02)


async def closed_with(ws: WS, timeout: float = 5 * UNIT) -> tuple[int, str]:
    msg = await ws.receive(timeout=timeout)
    while msg.type not in CLOSED:
        msg = await ws.receive(timeout=timeout)
    return int(ws.close_code or 0), str(msg.extra or "")


# --- publish load -------------------------------------------------------------------------------


@dataclass
class Load:
    """On each node a publisher and a subscriber of one topic (both subscribed, as y-webrtc
    peers are); each publisher publishes every ``interval`` seconds. Records when each publish
    reached the subscriber on its own node, and which reached the other node."""

    http: aiohttp.ClientSession
    nodes: list[NodeProcess]
    interval: float = 0.02
    topic: str = field(default_factory=lambda: f"load-{uuid.uuid4().hex[:8]}")
    sent: dict[tuple[int, int], float] = field(default_factory=dict)
    local: dict[tuple[int, int], float] = field(default_factory=dict)
    remote: set[tuple[int, int]] = field(default_factory=set)
    _sockets: list[tuple[WS, WS]] = field(default_factory=list)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _running: bool = False

    async def start(self) -> None:
        for node in self.nodes:
            pub, sub = [await self.http.ws_connect(node.ws_url + "/") for _ in range(2)]
            for ws in (pub, sub):
                await ws.send_str(
                    orjson.dumps({"type": "subscribe", "topics": [self.topic]}).decode()
                )
                await ws.send_str('{"type":"ping"}')
                assert await receive_json(ws) == {"type": "pong"}
            self._sockets.append((pub, sub))
        for index, (pub, sub) in enumerate(self._sockets):
            self._tasks.append(asyncio.create_task(self._receive(index, sub)))
            self._tasks.append(asyncio.create_task(self._drain(pub)))

    async def _receive(self, index: int, sub: WS) -> None:
        async for msg in sub:
            data = orjson.loads(msg.data)
            key = (int(data["data"]["node"]), int(data["data"]["n"]))
            if key[0] == index:
                self.local.setdefault(key, time.monotonic())
            else:
                self.remote.add(key)

    async def _drain(self, pub: WS) -> None:
        async for _ in pub:  # the other node's publishes; not measured here
            pass

    async def publish_for(self, seconds: float) -> list[tuple[int, int]]:
        """Publish on every node for ``seconds`` (at most ``seconds / interval`` rounds); the
        publishes made."""
        made: list[tuple[int, int]] = []
        rounds = int(seconds / self.interval)
        start = len(self.sent) // max(1, len(self._sockets))
        for n in range(start, start + rounds):
            for index, (pub, _) in enumerate(self._sockets):
                self.sent[(index, n)] = time.monotonic()
                message = {"type": "publish", "topic": self.topic, "data": {"node": index, "n": n}}
                await pub.send_str(orjson.dumps(message).decode())
                made.append((index, n))
            await asyncio.sleep(self.interval)
        return made

    async def delivered_locally(self, made: list[tuple[int, int]]) -> float:
        """Every publish of ``made`` reached its own node's subscriber within ``LOCAL_BOUND``
        of being sent; the longest it took."""
        with contextlib.suppress(AssertionError):  # which ones are missing is asserted below
            await until(lambda: all(key in self.local for key in made), 2 * UNIT)
        missing = [key for key in made if key not in self.local]
        assert not missing, f"{len(missing)} local publishes never arrived: {missing[:5]}"
        took = {key: self.local[key] - self.sent[key] for key in made}
        late = {key: round(t, 3) for key, t in took.items() if t > LOCAL_BOUND}
        assert not late, (
            f"{len(late)} of {len(made)} local publishes later than {LOCAL_BOUND * 1000:g} ms "
            f"(slowest {max(late.values())} s): {dict(list(late.items())[:6])}"
        )
        return max(took.values())

    async def crossing(self) -> None:
        """Publishes reach the other node again."""
        before = len(self.remote)
        deadline = time.monotonic() + 10 * UNIT
        while len(self.remote) <= before:
            assert time.monotonic() < deadline, "cross-node delivery did not resume"
            await self.publish_for(0.1)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for pub, sub in self._sockets:
            await pub.close()
            await sub.close()


@contextlib.asynccontextmanager
async def load_on(http: aiohttp.ClientSession, nodes: list[NodeProcess]) -> AsyncIterator[Load]:
    load = Load(http, nodes)
    await load.start()
    try:
        yield load
    finally:
        await load.close()


# --- Signal-Fire and relay clients ----------------------------------------------------------------


async def signalfire_client(http: aiohttp.ClientSession, node: NodeProcess) -> tuple[WS, str]:
    ws = await http.ws_connect(node.ws_url + "/", protocols=("Signal-Fire@3",))
    welcome = await receive_json(ws, timeout=5 * UNIT)
    assert welcome["cmd"] == "welcome"
    return ws, str(welcome["data"]["id"])


_ids = itertools.count(1)


async def signalfire_ok(ws: WS, cmd: str, target: str) -> None:
    """``cmd`` to ``target`` is acknowledged."""
    rid = f"r{next(_ids)}"
    await ws.send_str(orjson.dumps({"id": rid, "cmd": cmd, "target": target}).decode())
    assert await receive_json(ws, timeout=5 * UNIT) == {"id": rid, "ok": True}


def claim(key: str) -> str:
    return f"{PREFIX}:claim:{key}"


async def holders(redis: RedisServer, keys: list[str]) -> list[str | None]:
    """The node holding each key's claim in Redis (a new connection: Redis may have restarted)."""
    client = Redis.from_url(redis.url)
    try:
        found = []
        for key in keys:
            node = await client.hget(claim(key), "node")
            found.append(None if node is None else node.decode())
        return found
    finally:
        await client.aclose()


# --- the tests ------------------------------------------------------------------------------------


async def test_redis_hung_local_delivery_and_welcomes_do_not_wait(started_redis, http):
    """SIGSTOP of Redis under publish load: every local publish arrives within LOCAL_BOUND and a
    new Signal-Fire client is welcomed within WELCOME_BOUND; once Redis runs again, publishes
    cross nodes again and the new client's id is claimed in Redis."""
    with node_processes(2, fault_env(started_redis.url)) as nodes:
        async with load_on(http, nodes) as load:
            await load.crossing()
            redis = started_redis.proc
            assert redis is not None
            redis.send_signal(signal.SIGSTOP)
            try:
                hung = asyncio.create_task(load.publish_for(HUNG))
                await asyncio.sleep(1.0)  # past the presence cache's TTL: counts are stale
                asked = time.monotonic()
                newcomer, newcomer_id = await signalfire_client(http, nodes[0])
                welcomed = time.monotonic() - asked
                made = await hung
            finally:
                redis.send_signal(signal.SIGCONT)
            slowest = await load.delivered_locally(made)
            print(f"\nRedis hung: {len(made)} publishes, slowest local {slowest * 1000:.1f} ms")
            print(f"Redis hung: a new Signal-Fire client welcomed in {welcomed * 1000:.0f} ms")
            assert welcomed < WELCOME_BOUND
            await load.crossing()
        deadline = time.monotonic() + 5 * UNIT
        while await holders(started_redis, [f"signalfire:{newcomer_id}"]) != [nodes[0].node_id]:
            assert time.monotonic() < deadline, "the id served locally was never claimed"
            await asyncio.sleep(0.02)
        await newcomer.close()
        for node in nodes:
            assert "Traceback" not in node.log()


async def test_redis_restarted_empty_leases_are_back_and_none_can_be_taken(started_redis, http):
    """Redis restarted empty: every lease of a node is back within REASSERT_BOUND; then, with
    that node late (stopped while Redis restarts), a client of the other node can neither create
    its room, nor take its Signal-Fire id's place, and a newer relay socket replaces its peer's
    socket cleanly instead of holding the id next to it."""
    with node_processes(2, fault_env(started_redis.url)) as (a, b):
        owner = await RoomsClient().connect(a.url)
        intruder = await RoomsClient().connect(b.url)
        try:
            await owner.login({"name": "owner"})
            await intruder.login({"name": "intruder"})
            room, peer = f"room-{uuid.uuid4().hex[:8]}", f"peer-{uuid.uuid4().hex[:8]}"
            await create_room(owner, room)
            callee, callee_id = await signalfire_client(http, a)
            caller, caller_id = await signalfire_client(http, b)
            old = await http.ws_connect(f"{a.ws_url}/introduction/{peer}")
            await old.send_str('{"type":"Heartbeat"}')
            keys = [f"rooms/room/{room}", f"signalfire:{callee_id}", f'relay:peer:"{peer}"']
            deadline = time.monotonic() + 5 * UNIT
            while await holders(started_redis, keys) != [a.node_id] * 3:
                assert time.monotonic() < deadline, await holders(started_redis, keys)
                await asyncio.sleep(0.02)

            # 1. Every lease is back within the bound, under publish load.
            async with load_on(http, [a, b]) as load:
                outage = asyncio.create_task(load.publish_for(DOWN + 2.0))
                await asyncio.to_thread(started_redis.stop)
                await until_status(http, a, 503)
                await until_status(http, b, 503)
                await asyncio.sleep(DOWN)  # the outage itself: the nodes keep trying meanwhile
                launched = time.monotonic()
                await asyncio.to_thread(started_redis.start)
                deadline = launched + 5 * UNIT
                while await holders(started_redis, keys) != [a.node_id] * 3:
                    assert time.monotonic() < deadline, await holders(started_redis, keys)
                    await asyncio.sleep(0.01)
                back = time.monotonic() - launched
                made = await outage
                slowest = await load.delivered_locally(made)
                print(f"\nRedis restarted empty: every lease back {back * 1000:.0f} ms after start")
                print(f"Redis restarted: slowest local delivery {slowest * 1000:.1f} ms")
                assert back < REASSERT_BOUND
                await load.crossing()

            # 2. Node a is late: nothing of it can be taken by b's clients meanwhile.
            await asyncio.to_thread(started_redis.stop)
            await until_status(http, a, 503)
            await until_status(http, b, 503)
            a.send_signal(signal.SIGSTOP)
            try:
                await asyncio.to_thread(started_redis.start)
                await until_status(http, b, 200)
                asked = time.monotonic()
                await intruder.send("room-create-request", room=room)
                new = await http.ws_connect(f"{b.ws_url}/introduction/{peer}")
                await new.send_str('{"type":"Heartbeat"}')
                start = asyncio.create_task(signalfire_ok(caller, "session-start", callee_id))
                assert await holders(started_redis, keys) == [None, None, None]
            finally:
                a.send_signal(signal.SIGCONT)
            assert await intruder.expect("room-create-reject", 5 * UNIT) == {
                "message": proto.ROOM_TAKEN
            }
            held = time.monotonic() - asked
            print(f"a late node: b held the intruder's claim {held * 1000:.0f} ms")
            for node in (a, b):
                settled = [line for line in node.log().splitlines() if "new claims wait" in line]
                print(f"{node.node_id}: {settled[-1].split('claims re-asserted)')[-1]}")
            await start
            relayed = await receive_json(callee, timeout=5 * UNIT)
            assert (relayed["cmd"], relayed["origin"]) == ("session-start", caller_id)
            code, reason = await closed_with(old)
            assert (code, reason) == (
                CloseCode.NORMAL,
                "replaced by a newer connection with the same peer id",
            )
            assert not new.closed
            assert await holders(started_redis, keys) == [a.node_id, a.node_id, b.node_id]
            await new.close()
            await callee.close()
            await caller.close()
        finally:
            await owner.close()
            await intruder.close()
        for node in (a, b):
            assert "Traceback" not in node.log()


async def test_a_node_killed_mid_pipe_ends_the_pipe_on_the_survivor(redis_url, http):
    """Frames flow both ways through a pipe across two nodes; one node is SIGKILLed; the
    surviving side's socket is closed with 1013 "the peer's node is unreachable" promptly."""
    env = {"REDIS_URL": redis_url, "SIGNAL_CHANNEL": f"test:{uuid.uuid4().hex[:10]}"}
    with node_processes(2, env) as (doomed, survivor):
        key = f"doc-{uuid.uuid4().hex[:8]}"
        first = await http.ws_connect(f"{doomed.ws_url}/connection/a/b/{key}")
        second = await http.ws_connect(f"{survivor.ws_url}/connection/b/a/{key}")
        for i in range(20):
            await first.send_bytes(b"a%d" % i)
            await second.send_bytes(b"b%d" % i)
        for ws, other in ((second, b"a"), (first, b"b")):
            for i in range(20):
                msg = await ws.receive(timeout=5 * UNIT)
                assert msg.data == other + b"%d" % i
        doomed.stop(signal.SIGKILL)
        killed = time.monotonic()
        closing = asyncio.create_task(closed_with(second, timeout=10 * UNIT))
        for i in range(int(5 / 0.02)):  # the survivor keeps sending, as a syncing peer does
            if closing.done() or second.closed:
                break
            with contextlib.suppress(ConnectionResetError):
                await second.send_bytes(b"more %d" % i)
            await asyncio.sleep(0.02)
        code, reason = await closing
        took = time.monotonic() - killed
        print(f"\nnode killed mid-pipe: the survivor's socket closed after {took * 1000:.0f} ms")
        assert (code, reason) == (CloseCode.TRY_AGAIN_LATER, "the peer's node is unreachable")
        assert took < 2 * UNIT
