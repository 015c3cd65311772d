"""The relay protocol on two polysignal processes sharing one real Redis.

Peers on different nodes are introduced to each other, and their ``/connection`` sockets are
piped across the nodes with frame order and text/binary types kept (docs/protocols/relay.md,
"Across nodes"): with raw clients of every generation and with the published npm clients.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest

from polysignal.core.errors import CloseCode
from server.test_relay_server import slow_reader_case

from support import (
    ALSO_ON_CLUSTER,
    UNIT,
    NodeProcess,
    assert_silent,
    node_processes,
    node_ready,
    receive_json,
    run_node,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.redis, pytest.mark.slow]

WS = aiohttp.ClientWebSocketResponse
TEXT, BINARY = aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


def node_env(redis_url: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "SIGNAL_CHANNEL": f"test:{uuid.uuid4().hex[:10]}",
        "REDIS_BACKOFF_MAX": "0.5",
        "SHUTDOWN_TIMEOUT": "2",
    }


@pytest.fixture(scope="module")
def redis_nodes(redis_url: str) -> Iterator[list[NodeProcess]]:
    """Two node processes on the shared Redis, for the tests that leave both running."""
    with node_processes(2, node_env(redis_url)) as pair:
        yield pair


@pytest.fixture(scope="module")
def cluster_nodes(cluster_url: str) -> Iterator[list[NodeProcess]]:
    """Two node processes on a Redis Cluster, for the tests that leave both running."""
    with node_processes(2, node_env(cluster_url)) as pair:
        yield pair


@pytest.fixture
def nodes(request: pytest.FixtureRequest) -> list[NodeProcess]:
    """The node processes on one Redis, or (``ALSO_ON_CLUSTER``) on a Redis Cluster."""
    kind = getattr(request, "param", "redis")
    nodes: list[NodeProcess] = request.getfixturevalue(f"{kind}_nodes")
    return nodes


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def uid() -> str:
    return uuid.uuid4().hex[:8]


async def receive_msgpack(ws: WS, timeout: float = 5 * UNIT) -> Any:
    msg = await ws.receive(timeout=timeout)
    assert msg.type is BINARY, f"expected binary, got {msg.type}: {msg.data}"
    return msgpack.unpackb(msg.data)


async def receive_frame(ws: WS, timeout: float = 5 * UNIT) -> tuple[aiohttp.WSMsgType, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type in (TEXT, BINARY), msg
    return msg.type, msg.data


async def closed_with(ws: WS, timeout: float = 5 * UNIT) -> tuple[int, str]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type in CLOSED, f"expected a close, got {msg.type}: {msg.data!r}"
    return int(ws.close_code or 0), str(msg.extra or "")


async def drain(ws: WS, expected: Callable[[aiohttp.WSMessage], bool]) -> None:
    """Receive until ``ws`` is quiet; every message received must satisfy ``expected``."""
    for _ in range(10):
        try:
            msg = await ws.receive(timeout=0.5 * UNIT)
        except TimeoutError:
            return
        assert expected(msg), msg
    raise AssertionError("more than 10 repeated messages")


async def test_published_relay_4_clients_across_nodes(nodes):
    """@localfirst/relay 4.2.2: Alice on one node, Bob on the other, a message both ways."""
    node_ready()
    one, two = nodes
    result = await run_node("relay_v4.mjs", one.ws_url, two.ws_url, timeout=40)
    assert result["ok"], result
    assert result["alice"]["got"] == [
        {"kind": "text", "value": "hello from bob"},
        {"kind": "binary", "value": "000102ff"},
    ]
    assert result["bob"]["got"][0] == {"kind": "text", "value": "hello from alice"}


async def test_published_cevitxe_clients_across_nodes(nodes):
    node_ready()
    one, two = nodes
    result = await run_node("relay_cevitxe.mjs", one.ws_url, two.ws_url, timeout=40)
    assert result["ok"], result
    assert result["alice"]["got"] == "hello from bob"
    assert result["bob"]["got"] == "hello from alice"


@ALSO_ON_CLUSTER
async def test_introductions_across_nodes_in_each_generation(nodes, session):
    one, two = nodes
    doc, alice, bob = f"doc-{uid()}", f"alice-{uid()}", f"bob-{uid()}"
    a = await session.ws_connect(f"{one.ws_url}/introduction/{alice}")
    b = await session.ws_connect(f"{two.ws_url}/introduction/{bob}")
    await a.send_bytes(msgpack.packb({"type": "Join", "documentIds": [doc]}))
    await b.send_str(orjson.dumps({"type": "Join", "join": [doc]}).decode())
    intro_a = {"type": "Introduction", "peerId": bob, "documentIds": [doc]}
    intro_b = {"type": "Introduction", "id": alice, "keys": [doc]}
    assert await receive_msgpack(a) == intro_a
    assert await receive_json(b, 5 * UNIT) == intro_b
    # Joins this close together may both be announced in time for the other node, so each side
    # can be introduced twice (harmless: clients dedupe introductions per peer and document).
    await drain(a, lambda msg: msgpack.unpackb(msg.data) == intro_a)
    await drain(b, lambda msg: orjson.loads(msg.data) == intro_b)
    # A Join that adds nothing introduces nobody, on either node...
    await b.send_str(orjson.dumps({"type": "Join", "join": [doc]}).decode())
    await a.send_bytes(msgpack.packb({"type": "Join", "documentIds": [doc, f"{doc}-2"]}))
    await assert_silent(a, 0.5 * UNIT)
    await assert_silent(b, 0.5 * UNIT)
    # ...and one that adds a shared document introduces both with everything they share, once.
    await b.send_str(orjson.dumps({"type": "Join", "join": [f"{doc}-2"]}).decode())
    assert await receive_msgpack(a) == {**intro_a, "documentIds": [doc, f"{doc}-2"]}
    assert await receive_json(b, 5 * UNIT) == {**intro_b, "keys": [doc, f"{doc}-2"]}
    await assert_silent(a, 0.5 * UNIT)
    await assert_silent(b, 0.5 * UNIT)
    await a.close()
    await b.close()


@ALSO_ON_CLUSTER
async def test_pipe_across_nodes_keeps_order_and_types(nodes, session):
    one, two = nodes
    key, alice, bob = f"doc-{uid()}", f"alice-{uid()}", f"bob-{uid()}"
    first = await session.ws_connect(f"{one.ws_url}/connection/{alice}/{bob}/{key}")
    for i in range(10):
        await first.send_str(f"held {i}")
    second = await session.ws_connect(f"{two.ws_url}/connection/{bob}/{alice}/{key}")
    for i in range(10):
        assert await receive_frame(second) == (TEXT, f"held {i}")
    for i in range(200):
        await first.send_bytes(i.to_bytes(2, "big"))
        await second.send_str(f"back {i}")
    for i in range(200):
        assert await receive_frame(second) == (BINARY, i.to_bytes(2, "big"))
        assert await receive_frame(first) == (TEXT, f"back {i}")
    await first.close()
    assert (await closed_with(second))[0] == CloseCode.NORMAL


async def test_frames_sent_while_the_pipe_forms_follow_the_held_ones(nodes, session):
    """The held side keeps sending while the other side's node matches it: the held frames and
    those sent meanwhile arrive in the order they were sent."""
    one, two = nodes
    key = f"doc-{uid()}"
    first = await session.ws_connect(f"{one.ws_url}/connection/a/b/{key}")
    count = 400
    sent = asyncio.Event()

    async def send_all() -> None:
        for i in range(count):
            await first.send_bytes(i.to_bytes(2, "big") * 64)
            if i == 20:
                sent.set()  # some are held: now the other side may come
            await asyncio.sleep(0)

    sending = asyncio.create_task(send_all())
    try:
        await sent.wait()
        second = await session.ws_connect(f"{two.ws_url}/connection/b/a/{key}")
        for i in range(count):
            assert await receive_frame(second) == (BINARY, i.to_bytes(2, "big") * 64), i
        await sending
    finally:
        sending.cancel()
    await first.close()
    assert (await closed_with(second))[0] == CloseCode.NORMAL


async def test_slow_reader_on_the_other_node_slows_the_writer(nodes, session):
    """8 MiB across nodes to a reader that pauses: all of it arrives in order, nobody is cut."""
    one, two = nodes
    key = f"doc-{uid()}"
    first = await session.ws_connect(f"{one.ws_url}/connection/a/b/{key}")
    second = await session.ws_connect(f"{two.ws_url}/connection/b/a/{key}")
    await first.send_str("start")
    assert await receive_frame(second) == (TEXT, "start")
    await slow_reader_case(first, second)
    await first.close()
    assert (await closed_with(second))[0] == CloseCode.NORMAL


async def test_same_peer_id_on_the_other_node_replaces_the_first(nodes, session):
    one, two = nodes
    peer = f"dup-{uid()}"
    old = await session.ws_connect(f"{one.ws_url}/introduction/{peer}")
    await old.send_str('{"type":"Heartbeat"}')
    await asyncio.sleep(0)  # the old socket is registered once its upgrade has completed
    new = await session.ws_connect(f"{two.ws_url}/introduction/{peer}")
    code, reason = await closed_with(old)
    assert code == CloseCode.NORMAL and "replaced" in reason
    await new.send_str('{"type":"Heartbeat"}')
    await assert_silent(new, 0.3 * UNIT)
    assert not new.closed
    await new.close()


async def test_stopping_a_node_closes_the_pipes_it_carried(redis_url, session):
    """A graceful stop closes the node's sockets (1001); their piped peers elsewhere are closed."""
    with node_processes(2, node_env(redis_url)) as (one, two):
        key = f"doc-{uid()}"
        first = await session.ws_connect(f"{one.ws_url}/connection/a/b/{key}")
        second = await session.ws_connect(f"{two.ws_url}/connection/b/a/{key}")
        await first.send_str("ready?")
        assert await receive_frame(second) == (TEXT, "ready?")
        one.stop()
        assert (await closed_with(first))[0] == CloseCode.GOING_AWAY
        assert (await closed_with(second))[0] == CloseCode.NORMAL


async def test_a_killed_node_ends_the_pipes_it_carried_at_the_next_frame(redis_url, session):
    """No close reaches the survivor from a killed node; its next frame finds the node gone."""
    with node_processes(2, node_env(redis_url)) as (one, two):
        key = f"doc-{uid()}"
        first = await session.ws_connect(f"{one.ws_url}/connection/a/b/{key}")
        second = await session.ws_connect(f"{two.ws_url}/connection/b/a/{key}")
        await first.send_str("ready?")
        assert await receive_frame(second) == (TEXT, "ready?")
        one.stop(signal.SIGKILL)
        await second.send_str("anyone there?")
        code, reason = await closed_with(second)
        assert code == CloseCode.TRY_AGAIN_LATER and "unreachable" in reason


ROUNDS = 8


@pytest.mark.parametrize("spread", ["one node", "two nodes"])
@pytest.mark.parametrize("closer", ["holder", "arrival"])
async def test_frames_sent_just_before_a_close_all_arrive(nodes, session, spread, closer):
    """One side sends and closes at once, as soon as both sockets are open: the other side gets
    every frame, in order, then `1000 "peer closed"`, round after round (docs/protocols/relay.md,
    "Pipes"). The close used to overtake the frames whenever the pipe was still forming (the
    holder's hold and its frames were dropped before the other request reached it)."""
    one, two = nodes
    other = one if spread == "one node" else two
    for i in range(ROUNDS):
        key = f"doc-{uid()}"
        holder = await session.ws_connect(f"{one.ws_url}/connection/a/b/{key}")
        await holder.send_str(f"early {i}")  # held until the other side comes
        arrival = await session.ws_connect(f"{other.ws_url}/connection/b/a/{key}")
        sender, receiver = (holder, arrival) if closer == "holder" else (arrival, holder)
        await sender.send_str(f"last words {i}")
        await sender.send_bytes(bytes([i, 0, 255]))
        await sender.close()
        if closer == "holder":
            assert await receive_frame(receiver) == (TEXT, f"early {i}"), i
        assert await receive_frame(receiver) == (TEXT, f"last words {i}"), i
        assert await receive_frame(receiver) == (BINARY, bytes([i, 0, 255])), i
        assert await closed_with(receiver) == (CloseCode.NORMAL, "peer closed"), i
