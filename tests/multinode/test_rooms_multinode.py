"""The rooms protocol across separate node processes sharing one real Redis.

Rooms are claimed cluster-wide through the backend; room state lives on the owner's node; every
event for a socket on another node travels by the backend's direct delivery, straight to that
node (docs/protocols/rooms.md, "Many nodes").
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from redis.asyncio import Redis

from polysignal.config import RoomsSettings
from polysignal.protocols import rooms as proto
from rooms_client import (
    PASSWORD,
    SECRET,
    RoomsClient,
    check_flow,
    create_room,
    join_room,
    rooms_handshake,
)

from rtc import loopback_only
from support import (
    ALSO_ON_CLUSTER,
    UNIT,
    NodeProcess,
    chromium_ready,
    node_processes,
    node_ready,
    run_node,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]

Connect = Callable[[NodeProcess, str], Awaitable[RoomsClient]]


def rooms_env(redis_url: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "APP_SECRET": SECRET, "APP_PASS": PASSWORD, "ICE_SERVERS": "[]"}


@pytest.fixture(scope="module")
def redis_nodes(redis_url: str) -> Iterator[list[NodeProcess]]:
    """Three node processes on one Redis with the rooms protocol enabled."""
    with node_processes(3, rooms_env(redis_url)) as started:
        yield started


@pytest.fixture(scope="module")
def cluster_nodes(cluster_url: str) -> Iterator[list[NodeProcess]]:
    """Three node processes on a Redis Cluster with the rooms protocol enabled."""
    with node_processes(3, rooms_env(cluster_url)) as started:
        yield started


@pytest.fixture
def nodes(request: pytest.FixtureRequest) -> list[NodeProcess]:
    """The node processes on one Redis, or (``ALSO_ON_CLUSTER``) on a Redis Cluster."""
    kind = getattr(request, "param", "redis")
    nodes: list[NodeProcess] = request.getfixturevalue(f"{kind}_nodes")
    return nodes


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Connected, logged-in clients on a given node; all closed after the test."""
    clients: list[RoomsClient] = []

    async def _connect(node: NodeProcess, name: str) -> RoomsClient:
        client = await RoomsClient().connect(node.url)
        clients.append(client)
        await client.login({"name": name})
        return client

    yield _connect
    for client in clients:
        await client.close()


@ALSO_ON_CLUSTER
async def test_owner_and_joiner_on_two_nodes(nodes, connect):
    """Create on node 1; the name is taken on node 2; join, accept, relays and leave cross."""
    n1, n2, _ = nodes
    owner = await connect(n1, "owner")
    joiner = await connect(n2, "joiner")
    third = await connect(n2, "third")
    await create_room(owner, "mn-room")
    await third.send("room-create-request", room="mn-room")
    assert (await third.expect("room-create-reject"))["message"] == proto.ROOM_TAKEN

    await joiner.send("room-join-request", room="mn-room", payload={"hi": 1})
    assert await owner.expect("room-join-request") == {
        "room": "mn-room",
        "peer_id": joiner.sid,
        "payload": {"hi": 1},
        "peerinfo": {"name": "joiner"},
    }
    await owner.send("room-join-accept", room="mn-room", peer_id=joiner.sid, to=joiner.sid)
    accepted = await joiner.expect("room-join-accept")
    assert accepted["peers"] == [owner.sid]
    assert accepted["peersinfo"] == {
        owner.sid: {"peerinfo": {"name": "owner"}},
        joiner.sid: {"peerinfo": {"name": "joiner"}},
    }
    assert (await owner.expect("room-user-join"))["peer_id"] == joiner.sid

    # relays both ways across the nodes, with the sender's peerinfo
    await joiner.send(
        "relay-session-description", to=owner.sid, room="mn-room", session_description={"s": 1}
    )
    got = await owner.expect("session-description")
    assert got["peer_id"] == joiner.sid and got["peerinfo"] == {"name": "joiner"}
    await owner.send("relay-ice-candidate", to=joiner.sid, room="mn-room", ice_candidate={"c": 1})
    assert (await joiner.expect("ice-candidate"))["peer_id"] == owner.sid

    # a non-member on node 2 can neither relay into the room nor answer for its owner
    await third.send("relay-ice-candidate", to=owner.sid, room="mn-room", ice_candidate={"c": 1})
    assert (await third.expect("error"))["message"] == proto.NOT_SHARING_ROOM
    await third.send("room-join-request", room="mn-room")
    assert (await owner.expect("room-join-request"))["peer_id"] == third.sid
    await joiner.send("room-join-accept", room="mn-room", peer_id=third.sid)
    assert (await joiner.expect("error"))["message"] == proto.NOT_OWNER
    await third.assert_silent("room-join-accept")
    await owner.assert_silent("ice-candidate")

    await joiner.close()
    leave = await owner.expect("room-user-leave")
    assert leave == {"room": "mn-room", "peer_id": joiner.sid, "peerinfo": {"name": "joiner"}}


class BusTap:
    """Every message published on the test's Redis while it listens (``PSUBSCRIBE *``), counted
    per channel: what any node can receive is among these."""

    def __init__(self, redis_url: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BusTap:
        await self.pubsub.psubscribe("*")
        confirmed = await self.pubsub.get_message(timeout=5 * UNIT)
        assert confirmed is not None and confirmed["type"] == "psubscribe", confirmed
        self._task = asyncio.get_running_loop().create_task(self._listen())
        return self

    async def _listen(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] == "pmessage":
                channel = message["channel"].decode()
                self.counts[channel] += 1
                self.bytes[channel] += len(message["data"])

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.pubsub.aclose()
        await self.redis.aclose()

    def of(self, node: NodeProcess) -> int:
        """Messages on the channels named for ``node`` (its direct-delivery channel)."""
        return sum(n for channel, n in self.counts.items() if node.node_id in channel)


async def test_an_event_between_two_nodes_reaches_no_third(nodes, connect, redis_url):
    """Members of one room on nodes A and B: their whole session (create, join, accept, relays
    both ways, leave) puts messages only on A's and B's own channels, one per event for the
    other node; node C, which every node used to hear through socket.io's Redis manager,
    receives nothing (docs/protocols/rooms.md, "Many nodes")."""
    a, b, c = nodes
    owner = await connect(a, "owner")
    joiner = await connect(b, "joiner")
    await connect(c, "bystander")  # a socket on C, in no room with them
    relays = 20
    async with BusTap(redis_url) as tap:
        await create_room(owner, "no-third")
        await join_room(owner, joiner, "no-third")
        await owner.expect("room-user-join")
        setup = tap.counts.copy()
        await joiner.send(
            "relay-session-description",
            to=owner.sid,
            room="no-third",
            session_description={"type": "offer", "sdp": "v=0"},
        )
        await owner.expect("session-description")
        for i in range(relays):
            await owner.send(
                "relay-ice-candidate", to=joiner.sid, room="no-third", ice_candidate={"i": i}
            )
            await joiner.send(
                "relay-ice-candidate", to=owner.sid, room="no-third", ice_candidate={"i": i}
            )
        for client in (owner, joiner):
            for _ in range(relays):
                await client.expect("ice-candidate")
        relayed = tap.counts - setup
        await joiner.close()
        await owner.expect("room-user-leave")
        await asyncio.sleep(0.2 * UNIT)  # anything still on its way is counted too
    total = sum(tap.counts.values())
    figures = {"total": total, "A": tap.of(a), "B": tap.of(b), "C": tap.of(c)}
    print(f"\nbus messages of one two-node room session: {figures}, by channel: {dict(tap.counts)}")
    assert tap.of(c) == 0, tap.counts
    assert figures["A"] + figures["B"] == total, tap.counts  # nothing anywhere else
    assert not [ch for ch in tap.counts if "socketio" in ch], tap.counts
    # each relay is exactly one message, to the other node's channel
    assert sum(relayed.values()) == 2 * relays + 1, relayed
    assert sorted(relayed.values()) == [relays, relays + 1], relayed


async def test_ownership_passes_to_a_member_on_the_other_node(nodes, connect):
    n1, n2, _ = nodes
    owner = await connect(n1, "owner")
    second = await connect(n2, "second")
    third = await connect(n1, "third")
    late = await connect(n1, "late")
    await create_room(owner, "handover")
    await join_room(owner, second, "handover")
    await join_room(owner, third, "handover")
    await late.send("room-join-request", room="handover")
    await owner.expect("room-join-request")
    await owner.close()
    assert (await third.expect("room-user-leave"))["peer_id"] == owner.sid
    # the room moved to node 2 with its pending request
    assert (await second.expect("room-join-request", timeout=5))["peer_id"] == late.sid
    await second.send("room-join-accept", room="handover", peer_id=late.sid)
    accepted = await late.expect("room-join-accept")
    assert accepted["peers"] == [second.sid, third.sid]
    assert (await third.expect("room-user-join"))["peer_id"] == late.sid
    await late.send("relay-ice-candidate", to=second.sid, room="handover", ice_candidate={"c": 1})
    assert (await second.expect("ice-candidate"))["peer_id"] == late.sid
    # the old owner's node no longer holds the room: its members cannot answer for it
    await third.send("room-join-accept", room="handover", peer_id=late.sid)
    assert (await third.expect("error"))["message"] == proto.NOT_OWNER


async def test_join_requests_across_nodes_are_bounded_and_withdrawn(nodes, connect):
    """An asker on node 2, rooms on node 1: ``ROOMS_MAX_PENDING_PER_SOCKET`` (16) requests
    wait at once, the next is refused on node 2. The owner leaves: the rooms only it was in
    close and refuse the requests they held; the one with other members moves to node 3 with
    its request. The asker leaves: its request is withdrawn there too."""
    n1, n2, n3 = nodes
    limit = RoomsSettings().rooms_max_pending_per_socket
    owner = await connect(n1, "owner")
    member = await connect(n3, "member")
    helper = await connect(n2, "helper")  # node 2 holds a copy of the room that moves
    asker = await connect(n2, "asker")
    rooms = [f"bounded-{i}" for i in range(limit + 1)]
    for room in rooms:
        await create_room(owner, room)
    await join_room(owner, member, rooms[0])
    await join_room(owner, helper, rooms[0])
    # the asker is in a room of the member's, so its leaving shows on node 3
    await create_room(member, "beacon")
    await join_room(member, asker, "beacon")
    for room in rooms[:limit]:
        await asker.send("room-join-request", room=room)
        assert (await owner.expect("room-join-request"))["room"] == room
    await asker.send("room-join-request", room=rooms[limit], payload=limit)
    assert await asker.expect("room-join-reject") == {
        "message": f"too many pending join requests for one socket (limit {limit})",
        "payload": limit,
    }
    await owner.assert_silent("room-join-request")
    await owner.close()
    assert (await member.expect("room-user-leave", timeout=5 * UNIT))["peer_id"] == owner.sid
    assert (await member.expect("room-join-request", timeout=5 * UNIT))["peer_id"] == asker.sid
    closed = [await asker.expect("room-join-reject", timeout=5 * UNIT) for _ in rooms[1:limit]]
    assert closed == [{"message": proto.ROOM_NOT_FOUND}] * (limit - 1)
    gone = asker.sid
    await asker.close()
    # node 2 sends the withdrawal, then the leave, to node 3: once the leave shows, the
    # request is gone there
    leave = await member.expect("room-user-leave", timeout=5 * UNIT)
    assert leave == {"room": "beacon", "peer_id": gone, "peerinfo": {"name": "asker"}}
    await member.send("room-join-accept", room=rooms[0], peer_id=gone)
    assert await member.expect("error", timeout=5 * UNIT) == {
        "message": proto.NO_PENDING_REQUEST,
        "event": "room-join-accept",
    }
    await helper.assert_silent("room-user-join")


async def test_room_name_is_free_again_after_everyone_left(nodes, connect):
    n1, n2, _ = nodes
    first = await connect(n1, "first")
    await create_room(first, "reuse")
    await first.close()
    other = await connect(n2, "other")
    for _ in range(20):  # the release travels to Redis; bounded retry
        await other.send("room-create-request", room="reuse")
        event = await asyncio.wait_for(
            _first_of(other, "room-create-accept", "room-create-reject"), 5
        )
        if event == "room-create-accept":
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("room name never freed")


async def _first_of(client: RoomsClient, *events: str) -> str:
    while True:
        for event in events:
            if client.queues[event].qsize():
                client.queues[event].get_nowait()
                return event
        await asyncio.sleep(0.02)


async def test_published_socketio_client_across_nodes(nodes):
    """socket.io-client 4.x: the owner on node 1, the joiner on node 2."""
    node_ready()
    n1, n2, _ = nodes
    check_flow(await run_node("rooms_socketio.mjs", n1.url, n2.url, PASSWORD, timeout=40))


async def test_aiortc_peers_across_nodes(nodes, connect):
    n1, n2, _ = nodes
    owner = await connect(n1, "owner")
    joiner = await connect(n2, "joiner")
    with loopback_only():
        await rooms_handshake(owner, joiner, "mn-call")


async def test_demo_pages_on_two_nodes(nodes):
    """The owner's page on node 1, the joiner's on node 2: the data channel opens."""
    chromium_ready()
    n1, n2, _ = nodes
    result = await run_node("rooms_demo_browser.mjs", n1.url, n2.url, PASSWORD, timeout=75)
    assert result.get("ok") is True, result
    assert result["ownerReceived"] == ["hello from the joiner"]
    assert result["joinerReceived"] == ["hello from the owner"]


async def test_graceful_stop_of_the_owners_node_hands_the_room_over(redis_url):
    """SIGTERM on the owner's node: members elsewhere see it leave and one becomes owner."""
    with node_processes(2, rooms_env(redis_url)) as (n1, n2):
        owner = await RoomsClient().connect(n1.url)
        member = await RoomsClient().connect(n2.url)
        asker = await RoomsClient().connect(n2.url)
        try:
            for client in (owner, member, asker):
                await client.login()
            await create_room(owner, "stop")
            await join_room(owner, member, "stop")
            await asker.send("room-join-request", room="stop")
            await owner.expect("room-join-request")
            n1.send_signal(signal.SIGTERM)
            assert (await member.expect("room-user-leave", timeout=10))["peer_id"] == owner.sid
            assert (await member.expect("room-join-request", timeout=5))["peer_id"] == asker.sid
            # exits by itself, cleanly (a second SIGTERM from stop() could race its exit)
            assert n1.proc is not None
            assert await asyncio.to_thread(n1.proc.wait, 10 * UNIT) == 0, n1.log()
        finally:
            for client in (owner, member, asker):
                await client.close()


async def test_published_client_against_workers_sharing_one_port(redis_url):
    """WORKERS=2: the kernel spreads the clients over two worker nodes behind one port.
    WebSocket only: long-polling would need sticky sessions (docs/protocols/rooms.md)."""
    node_ready()
    node = NodeProcess({**rooms_env(redis_url), "WORKERS": "2"})
    try:
        node.start()
        for _ in range(3):  # three runs, so owner and joiner likely meet different workers
            url = node.url
            check_flow(await run_node("rooms_socketio.mjs", url, url, PASSWORD, "websocket"))
    finally:
        assert node.stop() in (0, -15), node.log()
