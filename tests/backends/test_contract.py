"""The backend contract (docs/architecture.md): one suite, run against memory and a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from backends.cluster import Cluster, Inbox, eventually
from polysignal.backends import Claim, MemoryBackend, MemoryBus

pytestmark = pytest.mark.timeout(30)


# --- topic fan-out ---


async def test_publish_reaches_each_other_subscribed_node_once(cluster: Cluster):
    """B and C have subscribers, D has none: B and C get the frame once, A and D never."""
    a, b, c, d = [await cluster.node(n) for n in "abcd"]
    inboxes = {name: Inbox() for name in "abcd"}
    for name, node in zip("abcd", (a, b, c, d), strict=True):
        node.on_topic_message(inboxes[name])
    topic = cluster.topic()
    for node in (a, b, c):
        node.local_count_changed(topic, 1)
    await cluster.settle()
    await a.publish(topic, b'{"n":1}')
    assert await inboxes["b"].next() == (topic, b'{"n":1}')
    assert await inboxes["c"].next() == (topic, b'{"n":1}')
    for name in "abcd":
        await inboxes[name].silent()


async def test_unsubscribed_node_stops_receiving(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    inbox = Inbox()
    b.on_topic_message(inbox)
    topic = cluster.topic()
    b.local_count_changed(topic, 2)
    await cluster.settle()
    await a.publish(topic, b"1")
    assert await inbox.next() == (topic, b"1")
    b.local_count_changed(topic, 0)
    await cluster.settle()
    await a.publish(topic, b"2")
    await inbox.silent()


async def test_subscriber_arriving_later_receives(cluster: Cluster):
    """A node that knew it was alone on a topic learns of a new subscriber elsewhere."""
    a, b = await cluster.node("a"), await cluster.node("b")
    inbox = Inbox()
    b.on_topic_message(inbox)
    topic = cluster.topic()
    a.local_count_changed(topic, 1)
    await cluster.settle()
    assert await a.topic_clients(topic, 1) == 1
    await a.publish(topic, b"alone")
    b.local_count_changed(topic, 1)
    await cluster.settle()
    assert await a.topic_clients(topic, 1) == 2
    await a.publish(topic, b"together")
    assert await inbox.next() == (topic, b"together")
    await inbox.silent()


async def test_frames_keep_their_order(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    inbox = Inbox()
    b.on_topic_message(inbox)
    topic = cluster.topic()
    b.local_count_changed(topic, 1)
    await cluster.settle()
    for i in range(200):
        await a.publish(topic, b"%d" % i)
    got = [(await inbox.next())[1] for _ in range(200)]
    assert got == [b"%d" % i for i in range(200)]


async def test_namespaces_are_separate(cluster: Cluster):
    """The same topic name in two namespaces is two topics."""
    a, b = await cluster.node("a"), await cluster.node("b")
    topics_inbox, rooms_inbox = Inbox(), Inbox()
    b.on_topic_message(topics_inbox)
    b.on_topic_message(rooms_inbox, "rooms")
    topic = cluster.topic()
    b.local_count_changed(topic, 1, "rooms")
    await cluster.settle()
    await a.publish(topic, b"topics-frame")
    await a.publish(topic, b"rooms-frame", "rooms")
    assert await rooms_inbox.next() == (topic, b"rooms-frame")
    await topics_inbox.silent()
    assert await a.topic_clients(topic, 0) == 0
    assert await a.topic_clients(topic, 0, "rooms") == 1


@pytest.mark.parametrize(
    "name",
    ["a:b", "a%3Ab", "spaced out/ünïcödé ✓", "{braces}*?[x]", "x" * 500, ":", "%"],
)
async def test_arbitrary_topic_names(cluster: Cluster, name: str):
    """Any string is a topic; names that escape alike never share a channel or a count."""
    a, b = await cluster.node("a"), await cluster.node("b")
    inbox = Inbox()
    b.on_topic_message(inbox)
    topic, lookalike = cluster.topic(name), cluster.topic(name.replace(":", "%3A") + "%")
    b.local_count_changed(topic, 3)
    await cluster.settle()
    await a.publish(lookalike, b"wrong")
    await a.publish(topic, b"right")
    assert await inbox.next() == (topic, b"right")
    await inbox.silent()
    assert await a.topic_clients(topic, 1) == 4
    assert await a.topic_clients(lookalike, 0) == 0


async def test_failing_handler_does_not_stop_delivery(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    inbox = Inbox()

    def handler(topic: str, frame: bytes) -> None:
        if frame == b"boom":
            raise RuntimeError("handler bug")
        inbox(topic, frame)

    b.on_topic_message(handler)
    topic = cluster.topic()
    b.local_count_changed(topic, 1)
    await cluster.settle()
    await a.publish(topic, b"boom")
    await a.publish(topic, b"after")
    assert await inbox.next() == (topic, b"after")


async def test_a_direct_message_sent_after_a_publish_arrives_after_it(cluster: Cluster):
    """One node's publishes and direct messages to another keep the order they were sent in."""
    a, b = await cluster.node("a"), await cluster.node("b")
    got: list[bytes] = []
    b.on_topic_message(lambda topic, frame: got.append(frame))
    b.on_direct("k", lambda origin, payload: got.append(payload))
    topic = cluster.topic()
    b.local_count_changed(topic, 1)
    await cluster.settle()
    for i in range(50):
        await a.publish(topic, b"p%d" % i)
        assert await a.send_direct(b.node_id, "k", b"d%d" % i)

    async def all_arrived() -> bool:
        return len(got) == 100

    await eventually(all_arrived, "100 messages at b")
    assert got == [m % i for i in range(50) for m in (b"p%d", b"d%d")]


async def test_publishes_and_direct_messages_in_one_batch_keep_their_order(cluster: Cluster):
    """Sent without waiting for each other, they reach the bus in batches: a batch is handed to
    the handlers in order, direct messages as promptly as topic frames."""
    a, b = await cluster.node("a"), await cluster.node("b")
    got: list[bytes] = []
    b.on_topic_message(lambda topic, frame: got.append(frame))
    b.on_direct("k", lambda origin, payload: got.append(payload))
    topic = cluster.topic()
    b.local_count_changed(topic, 1)
    await cluster.settle()
    sends = []
    for i in range(50):
        await a.publish(topic, b"p%d" % i)
        sends.append(asyncio.ensure_future(a.send_direct(b.node_id, "k", b"d%d" % i)))
        await asyncio.sleep(0)  # the send is queued behind the publish, not waited for
    assert all(await asyncio.gather(*sends))

    async def all_arrived() -> bool:
        return len(got) == 100

    await eventually(all_arrived, "100 messages at b")
    assert got == [m % i for i in range(50) for m in (b"p%d", b"d%d")]


# --- presence ---


async def test_presence_is_cluster_wide(cluster: Cluster):
    """``topic_clients`` = sum of every node's count, with the caller's own count as given."""
    a, b, c = [await cluster.node(n) for n in "abc"]
    topic = cluster.topic()
    a.local_count_changed(topic, 2)
    b.local_count_changed(topic, 3)
    await cluster.settle()
    assert await c.topic_clients(topic, 0) == 5
    assert await b.topic_clients(topic, 3) == 5

    async def a_sees(expected: int) -> bool:
        return await a.topic_clients(topic, 2) == expected

    await eventually(lambda: a_sees(5), "a counts 5")
    b.local_count_changed(topic, 1)
    await cluster.settle()
    await eventually(lambda: a_sees(3), "a sees b's new count")
    b.local_count_changed(topic, 0)
    await cluster.settle()
    await eventually(lambda: a_sees(2), "a sees b leave")


async def test_close_removes_presence_at_once(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    topic = cluster.topic()
    a.local_count_changed(topic, 1)
    b.local_count_changed(topic, 4)
    await cluster.settle()

    async def a_sees(expected: int) -> bool:
        return await a.topic_clients(topic, 1) == expected

    await eventually(lambda: a_sees(5), "a counts 5")
    await b.close()
    assert not b.ready
    # "At once": well inside every cache and TTL of the Redis backend (1 s and 5 s here).
    await eventually(lambda: a_sees(1), "b's count gone", timeout=0.5)


async def test_ready_follows_lifecycle(cluster: Cluster):
    a = await cluster.node("a")
    assert a.ready
    await a.close()
    assert not a.ready


# --- direct delivery ---


async def test_direct_delivery(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    inbox, other = Inbox(), Inbox()
    b.on_direct("relay", inbox)
    b.on_direct("other", other)
    assert await a.send_direct(b.node_id, "relay", b"\x00binary\xff")
    assert await inbox.next() == (a.node_id, b"\x00binary\xff")
    await other.silent(0.1)


async def test_direct_to_self_and_async_handler(cluster: Cluster):
    a = await cluster.node("a")
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def handler(origin: str, payload: bytes) -> None:
        await asyncio.sleep(0)
        got.put_nowait((origin, payload))

    a.on_direct("k", handler)
    assert await a.send_direct(a.node_id, "k", b"me")
    assert await asyncio.wait_for(got.get(), 3) == (a.node_id, b"me")


async def test_direct_to_unknown_node_is_refused(cluster: Cluster):
    a = await cluster.node("a")
    assert not await a.send_direct(f"{cluster.uid}-nobody", "k", b"x")


async def test_direct_keeps_order_and_unknown_kinds_are_dropped(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    inbox = Inbox()
    b.on_direct("pipe", inbox)
    assert await a.send_direct(b.node_id, "no-such-kind", b"dropped")
    results = [await a.send_direct(b.node_id, "pipe", b"%d" % i) for i in range(100)]
    assert all(results)
    assert [(await inbox.next())[1] for _ in range(100)] == [b"%d" % i for i in range(100)]


async def test_direct_to_closed_node_is_refused(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    await b.close()
    assert not await a.send_direct(b.node_id, "k", b"x")


# --- id claims ---


async def test_claim_lookup_release(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    key = cluster.key()
    assert await a.lookup(key) is None
    assert await a.claim(key, "tok-1", 30)
    assert await b.lookup(key) == Claim(a.node_id, "tok-1")
    assert not await b.claim(key, "tok-2", 30), "held by another owner"
    assert not await b.release(key, "tok-2")
    assert await b.lookup(key) == Claim(a.node_id, "tok-1")
    assert await a.release(key, "tok-1")
    assert await b.lookup(key) is None
    assert not await a.release(key, "tok-1"), "already released"
    assert await b.claim(key, "tok-2", 30)


async def test_claimed_lists_the_clusters_keys_by_prefix(cluster: Cluster):
    """Every node's claims under a prefix, glob characters taken literally, expired ones not,
    at most ``limit`` (PeerJS's ``/peers``)."""
    a, b = await cluster.node("a"), await cluster.node("b")
    prefix = cluster.key("list*[?]\\:")
    assert await a.claimed(prefix, 10) == []
    assert await a.claim(prefix + "x", "t", 30)
    assert await b.claim(prefix + "y:z", "t", 30)
    assert await a.claim(prefix + "gone", "t", 0.2)
    assert await a.claim(cluster.key("listX"), "t", 30), "a glob's * would match this"
    assert await a.claim(cluster.key("lis"), "t", 30)

    async def expired() -> bool:
        return await b.lookup(prefix + "gone") is None

    await eventually(expired, "lease expiry", timeout=3)
    assert sorted(await b.claimed(prefix, 10)) == [prefix + "x", prefix + "y:z"]
    assert len(await a.claimed(prefix, 1)) == 1
    assert await a.release(prefix + "x", "t")
    assert await a.claimed(prefix, 10) == [prefix + "y:z"]


async def test_takeover_by_the_same_token_moves_the_claim(cluster: Cluster):
    """A peer reconnecting to another node keeps its id: same token, new node."""
    a, b = await cluster.node("a"), await cluster.node("b")
    key = cluster.key()
    assert await a.claim(key, "owner", 30)
    assert await b.claim(key, "owner", 30)
    assert await a.lookup(key) == Claim(b.node_id, "owner")


async def test_renew_only_with_the_token(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    key = cluster.key()
    assert not await a.renew(key, "tok", 30), "nothing to renew"
    assert await a.claim(key, "tok", 0.4)
    assert not await b.renew(key, "other", 30)
    assert await a.renew(key, "tok", 30)
    await asyncio.sleep(0.6)
    assert await b.lookup(key) == Claim(a.node_id, "tok"), "renewed lease outlived the first"


async def test_expired_claim_is_free(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    key = cluster.key()
    assert await a.claim(key, "tok-1", 0.2)

    async def expired() -> bool:
        return await b.lookup(key) is None

    await eventually(expired, "lease expiry", timeout=3)
    assert await b.claim(key, "tok-2", 30)
    assert not await a.renew(key, "tok-1", 30)


async def test_concurrent_claims_have_one_winner(cluster: Cluster):
    nodes = [await cluster.node(f"n{i}") for i in range(4)]
    key = cluster.key()
    results = await asyncio.gather(
        *(node.claim(key, f"tok-{i}", 30) for i, node in enumerate(nodes))
    )
    assert sorted(results) == [False, False, False, True]
    winner = results.index(True)
    assert await nodes[0].lookup(key) == Claim(nodes[winner].node_id, f"tok-{winner}")


async def test_close_releases_own_claims_only(cluster: Cluster):
    """A stopping node drops what it holds, not an id its owner has moved to another node."""
    a, b = await cluster.node("a"), await cluster.node("b")
    mine, moved = cluster.key("mine"), cluster.key("moved")
    assert await a.claim(mine, "t1", 30)
    assert await a.claim(moved, "t2", 30)
    assert await b.claim(moved, "t2", 30)
    await a.close()
    assert await b.lookup(mine) is None
    assert await b.lookup(moved) == Claim(b.node_id, "t2")


# --- the in-process implementation ---


async def test_a_memory_node_is_ready_when_start_returns():
    """In-process, connecting cannot fail or wait: no caller has to poll ``ready``."""
    node = MemoryBackend("solo")
    await node.start()
    assert node.ready
    await node.close()
    assert not node.ready


async def test_a_memory_publish_nobody_else_can_receive_is_not_queued():
    """The hot path of a node alone on a topic: counted from the cache, then dropped at once,
    without an outbox entry or a writer turn."""
    net = MemoryBus()
    a, b = MemoryBackend("a", net), MemoryBackend("b", net)
    await a.start()
    await b.start()
    try:
        a.local_count_changed("room", 3)
        await a.sync()
        assert await a.topic_clients("room", 3) == 3
        assert a.topic_clients_nowait("room", 3) == 3
        assert a.publish_nowait("room", b"frame")
        assert not a._outbox
        b.local_count_changed("room", 1)
        await b.sync()
        await a.sync()
        assert a.topic_clients_nowait("room", 3) == 4
        assert a.publish_nowait("room", b"frame")
        assert len(a._outbox) == 1, "another node listens now: the frame goes out"
    finally:
        await a.close()
        await b.close()
