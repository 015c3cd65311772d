"""PeerJS across nodes: in-process nodes on one MemoryBus, and node processes on a real Redis.

Ids are leased cluster-wide, messages for a client on another node are handed to that node,
queued messages and EXPIRE follow their ids and senders, ``/peers`` lists the cluster, and a
ghost holder on another node (stale, or on a node that is gone) does not block its id.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from polysignal.backends import MemoryBackend, MemoryBus
from polysignal.core.peerjs import claim_key
from polysignal.protocols.peerjs import token_digest
from polysignal.server.app import PEERJS_KEY

from support import (
    ALSO_ON_CLUSTER,
    UNIT,
    NodeProcess,
    RunningServer,
    node_processes,
    node_settings,
    receive_json,
    running_server,
    until,
)

pytestmark = pytest.mark.timeout(60)

OPEN = {"type": "OPEN"}
ID_TAKEN = {"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}}
WS = aiohttp.ClientWebSocketResponse


def url(peer_id: str, token: str = "tok") -> str:
    return f"/peerjs?key=peerjs&id={peer_id}&token={token}&version=1.5.4"


async def join(srv: RunningServer, peer_id: str, token: str = "tok") -> WS:
    ws = await srv.ws(url(peer_id, token))
    assert await receive_json(ws, timeout=5 * UNIT) == OPEN
    return ws


async def send(ws: WS, **message: Any) -> None:
    await ws.send_str(orjson.dumps(message).decode())


@asynccontextmanager
async def two_nodes(**overrides: Any) -> AsyncIterator[list[RunningServer]]:
    bus = MemoryBus()
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running_server(
                    node_settings(node_id=name, peerjs_allow_discovery=True, **overrides),
                    MemoryBackend(name, bus),
                )
            )
            for name in ("node-1", "node-2")
        ]


async def test_relay_across_nodes_in_order_with_src_stamped():
    async with two_nodes() as (n1, n2):
        a, b = await join(n1, "a"), await join(n2, "b")
        for n in range(5):
            await send(a, type="CANDIDATE", dst="b", src="forged", payload=n)
        for n in range(5):
            assert await receive_json(b) == {
                "type": "CANDIDATE",
                "src": "a",
                "dst": "b",
                "payload": n,
            }
        await send(b, type="ANSWER", dst="a", payload="x")
        assert await receive_json(a) == {"type": "ANSWER", "src": "b", "dst": "a", "payload": "x"}


async def test_peers_lists_the_whole_cluster():
    async with two_nodes() as (n1, n2):
        await join(n1, "a")
        await join(n2, "b")
        for srv in (n1, n2):
            async with srv.session.get(srv.url + "/peerjs/peers") as resp:
                assert sorted(await resp.json()) == ["a", "b"]


async def test_a_queue_follows_its_id_to_the_node_it_appears_on():
    async with two_nodes(peerjs_expire_timeout=5 * UNIT) as (n1, n2):
        a = await join(n1, "a")
        await send(a, type="OFFER", dst="b", payload=1)
        await send(a, type="CANDIDATE", dst="b", payload=2)
        b = await n2.ws(url("b"))
        assert await receive_json(b) == OPEN
        assert await receive_json(b, timeout=3 * UNIT) == {
            "type": "OFFER",
            "src": "a",
            "dst": "b",
            "payload": 1,
        }
        assert (await receive_json(b))["payload"] == 2


async def test_expire_reaches_a_sender_on_another_node():
    """A relay reaches b's node after b left: it waits there, and its EXPIRE crosses back."""
    bus = MemoryBus()
    settings = node_settings(node_id="node-2", peerjs_expire_timeout=0.5 * UNIT)
    async with (
        running_server(node_settings(node_id="node-1"), MemoryBackend("node-1", bus)) as n1,
        running_server(settings, MemoryBackend("node-2", bus)) as n2,
    ):
        # b's claim says node-2, but b is not connected there any more.
        stale = MemoryBackend("node-2", bus)  # never started: only its claim counts
        assert await stale.claim(claim_key("b"), "gone", 60)
        a = await join(n1, "a")
        await send(a, type="OFFER", dst="b")
        assert await receive_json(a, timeout=3 * UNIT) == {
            "type": "EXPIRE",
            "src": "b",
            "dst": "a",
        }
        assert n2.node.node_id == "node-2"


async def test_ghost_takeover_of_a_stale_holder_on_another_node():
    async with two_nodes(peerjs_stale_after=1 * UNIT) as (n1, n2):
        ghost = await join(n1, "a", "old")  # silent from here on
        live = await n2.ws(url("a", "new"))
        assert await receive_json(live) == ID_TAKEN  # asked within stale_after: live
        old, clock = token_digest("a", "old"), asyncio.get_running_loop().time
        machine = n1.app[PEERJS_KEY].machine
        await until(lambda: not machine.holder_live("a", old, clock()), timeout=3 * UNIT)
        new = await join(n2, "a", "new")
        msg = await ghost.receive(timeout=3 * UNIT)
        assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1000, "id taken over")
        holder = await n1.node.backend.lookup(claim_key("a"))
        assert holder is not None and holder.node_id == "node-2"
        assert holder.token == token_digest("a", "new") + ":node-2"
        b = await join(n1, "b")
        await send(b, type="OFFER", dst="a")
        assert (await receive_json(new))["src"] == "b"


async def test_a_holder_on_a_node_that_is_gone_does_not_block_its_id():
    bus = MemoryBus()
    async with running_server(node_settings(node_id="live"), MemoryBackend("live", bus)) as srv:
        gone = MemoryBackend("gone", bus)  # never started: nothing receives its messages
        assert await gone.claim(claim_key("a"), token_digest("a", "old") + ":gone", 60)
        await join(srv, "a", "new")
        holder = await srv.node.backend.lookup(claim_key("a"))
        assert holder is not None and holder.node_id == "live"


async def test_same_token_on_another_node_re_attaches():
    async with two_nodes() as (n1, n2):
        first = await join(n1, "a")
        second = await join(n2, "a")  # the same token: its own claim moves
        msg = await first.receive(timeout=3 * UNIT)  # evicted by node-2
        assert msg.type is aiohttp.WSMsgType.CLOSE
        b = await join(n1, "b")
        await send(b, type="OFFER", dst="a")
        assert (await receive_json(second))["src"] == "b"


# --- node processes on a real Redis --------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_nodes(redis_url: str) -> Iterator[list[NodeProcess]]:
    env = {"REDIS_URL": redis_url, "PEERJS_ALLOW_DISCOVERY": "1", "PEERJS_EXPIRE_TIMEOUT": "3"}
    with node_processes(2, env) as started:
        yield started


@pytest.fixture(scope="module")
def cluster_nodes(cluster_url: str) -> Iterator[list[NodeProcess]]:
    env = {"REDIS_URL": cluster_url, "PEERJS_ALLOW_DISCOVERY": "1", "PEERJS_EXPIRE_TIMEOUT": "3"}
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


async def process_join(http: aiohttp.ClientSession, node: NodeProcess, peer_id: str) -> WS:
    ws = await http.ws_connect(node.ws_url + url(peer_id, "tok"))
    assert await receive_json(ws, timeout=5 * UNIT) == OPEN
    return ws


@pytest.mark.redis
@pytest.mark.slow
@ALSO_ON_CLUSTER
async def test_on_redis_relay_queue_and_peers_across_node_processes(nodes, http):
    a = await process_join(http, nodes[0], "ra")
    b = await process_join(http, nodes[1], "rb")
    await send(a, type="OFFER", dst="rb", payload={"sdp": "v=0"})
    assert await receive_json(b, timeout=5 * UNIT) == {
        "type": "OFFER",
        "src": "ra",
        "dst": "rb",
        "payload": {"sdp": "v=0"},
    }
    async with http.get(nodes[1].url + "/peerjs/peers") as resp:
        assert {"ra", "rb"} <= set(await resp.json())
    # Queued on node 0, delivered on node 1 where the id appears.
    await send(a, type="OFFER", dst="rc", payload=1)
    c = await process_join(http, nodes[1], "rc")
    assert (await receive_json(c, timeout=5 * UNIT))["payload"] == 1
    # Nobody: EXPIRE after PEERJS_EXPIRE_TIMEOUT.
    await send(b, type="OFFER", dst="nobody")
    assert await receive_json(b, timeout=10 * UNIT) == {
        "type": "EXPIRE",
        "src": "nobody",
        "dst": "rb",
    }
    for ws in (a, b, c):
        await ws.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_on_redis_a_killed_nodes_ids_are_free_at_once(redis_url, http):
    env = {"REDIS_URL": redis_url}
    with node_processes(2, env) as (doomed, survivor):
        await process_join(http, doomed, "kx")
        assert doomed.proc is not None
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10 * UNIT)
        ws = await http.ws_connect(survivor.ws_url + url("kx", "other-token"))
        assert await receive_json(ws, timeout=5 * UNIT) == OPEN
        await ws.close()
