"""The contract of the two interfaces an implementation provides (backends/interfaces.py): the
Bus and the LeaseStore, run against memory and a real Redis. The Cluster over them is
test_contract.py's."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from backends.cluster import Inbox, eventually
from polysignal.backends import BackendUnavailable, Claim
from polysignal.backends.cluster import MAX_BATCH
from polysignal.backends.interfaces import Bus, LeaseStore
from polysignal.backends.memory import MemoryBus, MemoryLink
from polysignal.backends.redis import RedisLink
from polysignal.config import RedisSettings

from support import UNIT

pytestmark = pytest.mark.timeout(30)


class Link:
    """One node's connected Bus and LeaseStore, with what its Bus received."""

    def __init__(self, bus: Bus, store: LeaseStore) -> None:
        self.bus = bus
        self.store = store
        self.inbox = Inbox()
        bus.listen(self.inbox)
        self.served: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        await self.bus.connect()
        self.served = asyncio.get_running_loop().create_task(self.bus.serve())

    async def disconnect(self) -> None:
        if self.served is not None:
            self.served.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.served
            self.served = None
        await self.bus.disconnect()


class Net:
    """Links of one kind on one net (a MemoryBus, or one Redis with a prefix of this test)."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.uid = uuid.uuid4().hex[:10]
        self.memory = MemoryBus()
        self.links: list[Link] = []

    def name(self, what: str) -> str:
        return f"test:{self.uid}:{what}"

    def channel(self, what: str = "ch") -> bytes:
        return self.name(what).encode()

    async def link(self) -> Link:
        if self.kind == "memory":
            memory = MemoryLink(self.memory)
            made = Link(memory, memory)
        else:
            assert self.redis_url is not None
            redis = RedisLink(self.redis_url, RedisSettings(signal_channel=f"test:{self.uid}"))
            made = Link(redis, redis)
        self.links.append(made)
        await made.connect()
        return made

    async def close(self) -> None:
        for made in self.links:
            await made.disconnect()
            await made.store.close()


@pytest.fixture(params=["memory", "redis"])
async def net(request: pytest.FixtureRequest) -> AsyncIterator[Net]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    made = Net(request.param, url)
    try:
        yield made
    finally:
        await made.close()


# --- Bus ---


async def test_publish_reaches_the_subscribers_of_its_channel_only(net: Net):
    x, y, z, publisher = [await net.link() for _ in range(4)]
    one, two = net.channel("one"), net.channel("two")
    await x.bus.subscribe([one])
    await y.bus.subscribe([two])
    assert await publisher.bus.publish([one], [b"\x00bytes\xff"]) == [1]
    assert await x.inbox.next() == (one, b"\x00bytes\xff")
    for link in (x, y, z, publisher):
        await link.inbox.silent()


async def test_a_confirmed_subscribe_receives_the_next_publish(net: Net):
    """Once ``subscribe`` returns, a publish from another node arrives, also for a batch of
    more channels than one command carries."""
    sub, publisher = await net.link(), await net.link()
    channels = [net.channel(f"c{i}") for i in range(MAX_BATCH + 10)]
    await sub.bus.subscribe(channels)
    assert await publisher.bus.publish([channels[0], channels[-1]], [b"first", b"last"]) == [1, 1]
    assert await sub.inbox.next() == (channels[0], b"first")
    assert await sub.inbox.next() == (channels[-1], b"last")


async def test_unsubscribe_stops_delivery(net: Net):
    sub, publisher = await net.link(), await net.link()
    channel, other = net.channel("a"), net.channel("b")
    await sub.bus.subscribe([channel, other])
    await publisher.bus.publish([channel], [b"1"])
    assert await sub.inbox.next() == (channel, b"1")
    await sub.bus.unsubscribe([channel])
    assert await publisher.bus.publish([channel, other], [b"2", b"3"]) == [0, 1]
    assert await sub.inbox.next() == (other, b"3")
    await sub.inbox.silent()


async def test_order_is_kept_per_channel(net: Net):
    sub, publisher = await net.link(), await net.link()
    channel = net.channel()
    await sub.bus.subscribe([channel])
    for start in range(0, 600, 200):
        batch = [b"%d" % i for i in range(start, start + 200)]
        assert await publisher.bus.publish([channel] * 200, batch) == [1] * 200
    got = [(await sub.inbox.next())[1] for _ in range(600)]
    assert got == [b"%d" % i for i in range(600)]


async def test_an_unknown_channel_is_silent(net: Net):
    sub, publisher = await net.link(), await net.link()
    await sub.bus.subscribe([net.channel("known")])
    assert await publisher.bus.publish([net.channel("unknown")], [b"x"]) == [0]
    await sub.inbox.silent()
    await publisher.inbox.silent()


async def test_a_subscribed_publisher_gets_its_own_message(net: Net):
    """The Cluster drops its own by the origin envelope (and ``sync`` relies on the echo)."""
    a, b = await net.link(), await net.link()
    channel = net.channel()
    await a.bus.subscribe([channel])
    await b.bus.subscribe([channel])
    assert await a.bus.publish([channel], [b"echo"]) == [2]
    assert await a.inbox.next() == (channel, b"echo")
    assert await b.inbox.next() == (channel, b"echo")


async def test_subscriptions_end_with_the_connection(net: Net):
    sub, publisher = await net.link(), await net.link()
    channel = net.channel()
    await sub.bus.subscribe([channel])
    await sub.disconnect()
    with pytest.raises(BackendUnavailable):
        await sub.bus.publish([channel], [b"x"])

    async def nobody_listens() -> bool:
        return await publisher.bus.publish([channel], [b"x"]) == [0]

    await eventually(nobody_listens, "the subscription gone with the connection")
    await sub.connect()
    assert await publisher.bus.publish([channel], [b"y"]) == [0], "a new connection starts empty"
    await sub.bus.subscribe([channel])
    assert await publisher.bus.publish([channel], [b"z"]) == [1]
    assert await sub.inbox.next() == (channel, b"z")


# --- LeaseStore: claims ---


async def test_claim_renew_release_lookup_with_tokens(net: Net):
    a, b = await net.link(), await net.link()
    key = net.name("claim:peer")
    assert await a.store.lookup(key) is None
    assert not await a.store.renew(key, "t1", 30), "nothing to renew"
    assert await a.store.claim(key, "t1", "node-a", 30)
    assert await b.store.lookup(key) == Claim("node-a", "t1")
    assert not await b.store.claim(key, "t2", "node-b", 30), "held with another token"
    assert not await b.store.renew(key, "t2", 30)
    assert not await b.store.release(key, "t2")
    assert not await b.store.release(key, "t1", "node-b"), "held by another node"
    assert await a.store.renew(key, "t1", 30)
    assert await a.store.release(key, "t1", "node-a")
    assert await b.store.lookup(key) is None
    assert not await a.store.release(key, "t1"), "already released"
    assert await b.store.claim(key, "t2", "node-b", 30)
    assert await a.store.release(key, "t2"), "any node may release with the token"


async def test_the_same_token_takes_a_claim_over(net: Net):
    a, b = await net.link(), await net.link()
    key = net.name("claim:moving")
    assert await a.store.claim(key, "owner", "node-a", 30)
    assert await b.store.claim(key, "owner", "node-b", 30)
    assert await a.store.lookup(key) == Claim("node-b", "owner")


async def test_a_claim_expires_after_its_ttl(net: Net):
    a, b = await net.link(), await net.link()
    key = net.name("claim:short")
    assert await a.store.claim(key, "t1", "node-a", 0.2)
    assert await a.store.renew(key, "t1", 0.3)

    async def expired() -> bool:
        return await b.store.lookup(key) is None

    await eventually(expired, "lease expiry", timeout=3 * UNIT)
    assert not await a.store.renew(key, "t1", 30)
    assert await b.store.claim(key, "t2", "node-b", 30)


async def test_concurrent_claims_have_one_winner(net: Net):
    links = [await net.link() for _ in range(4)]
    key = net.name("claim:contested")
    results = await asyncio.gather(
        *(link.store.claim(key, f"t{i}", f"node-{i}", 30) for i, link in enumerate(links))
    )
    assert sorted(results) == [False, False, False, True]
    winner = results.index(True)
    assert await links[0].store.lookup(key) == Claim(f"node-{winner}", f"t{winner}")


async def test_reclaim_claims_again_releases_and_names_the_holders_of_the_rest(net: Net):
    """A reconnecting node's batch: its claims again (free or its own: claimed; another token's:
    answered with that holder, left alone), and the releases of what it gave up meanwhile (only
    where its token still holds)."""
    a, b = await net.link(), await net.link()
    mine, free, theirs, given, moved = (
        net.name(f"claim:{what}") for what in ("mine", "free", "theirs", "given", "moved")
    )
    assert await a.store.claim(mine, "t-mine", "node-a", 30)
    assert await b.store.claim(theirs, "t-b", "node-b", 30)
    assert await a.store.claim(given, "t-given", "node-a", 30)
    assert await b.store.claim(moved, "t-b2", "node-b", 30)
    taken = await a.store.reclaim(
        {mine: ("t-mine", 30), free: ("t-free", 30), theirs: ("t-a", 30)},
        {given: "t-given", moved: "t-old"},
        "node-a",
    )
    assert taken == {theirs: Claim("node-b", "t-b")}
    assert await b.store.lookup(mine) == Claim("node-a", "t-mine")
    assert await b.store.lookup(free) == Claim("node-a", "t-free")
    assert await b.store.lookup(theirs) == Claim("node-b", "t-b")
    assert await b.store.lookup(given) is None
    assert await b.store.lookup(moved) == Claim("node-b", "t-b2")
    assert await a.store.reclaim({}, {}, "node-a") == {}


async def test_reclaim_in_batches_larger_than_one(net: Net):
    a = await net.link()
    claims = {net.name(f"claim:many-{i}"): (f"t{i}", 30.0) for i in range(MAX_BATCH + 5)}
    assert await a.store.reclaim(claims, {}, "node-a") == {}
    last = net.name(f"claim:many-{MAX_BATCH + 4}")
    assert await a.store.lookup(last) == Claim("node-a", f"t{MAX_BATCH + 4}")


# --- LeaseStore: counts ---


async def test_counts_per_node_zero_deletes(net: Net):
    a, b = await net.link(), await net.link()
    one, two, none = net.name("count:one"), net.name("count:two"), net.name("count:none")
    await a.store.set_counts("node-a", {one: 3, two: 1}, 30)
    await b.store.set_counts("node-b", {one: 2}, 30)
    assert await b.store.read_counts([one, two, none]) == [
        {"node-a": 3, "node-b": 2},
        {"node-a": 1},
        {},
    ]
    await a.store.set_counts("node-a", {one: 0, two: 5}, 30)
    assert await a.store.read_counts([one]) == [{"node-b": 2}]
    assert await a.store.read_counts([two]) == [{"node-a": 5}]


async def test_counts_live_for_their_ttl(net: Net):
    a = await net.link()
    key = net.name("count:ttl")
    await a.store.set_counts("node-a", {key: 1}, 1)
    assert await a.store.read_counts([key]) == [{"node-a": 1}]

    async def expired() -> bool:
        return await a.store.read_counts([key]) == [{}]

    await eventually(expired, "counts expired", timeout=4 * UNIT)


async def test_counts_of_a_node_no_longer_alive_are_not_read(net: Net):
    """A node that stopped refreshing (killed) loses its counts although another node keeps
    the key itself alive."""
    a, b = await net.link(), await net.link()
    key = net.name("count:dead")
    await a.store.set_counts("node-a", {key: 4}, 1)
    await b.store.set_counts("node-b", {key: 1}, 30)

    async def a_gone() -> bool:
        return await b.store.read_counts([key]) == [{"node-b": 1}]

    await eventually(a_gone, "node-a's count gone with its alive mark", timeout=4 * UNIT)


async def test_removing_a_node_removes_its_counts_and_its_claims_only(net: Net):
    a, b = await net.link(), await net.link()
    key = net.name("count:shared")
    mine, moved = net.name("claim:mine"), net.name("claim:moved")
    await a.store.set_counts("node-a", {key: 2}, 30)
    await b.store.set_counts("node-b", {key: 3}, 30)
    assert await a.store.claim(mine, "t1", "node-a", 30)
    assert await a.store.claim(moved, "t2", "node-a", 30)
    assert await b.store.claim(moved, "t2", "node-b", 30)
    await a.store.remove_node("node-a", [key], {mine: "t1", moved: "t2"})
    assert await b.store.read_counts([key]) == [{"node-b": 3}]
    assert await b.store.lookup(mine) is None
    assert await b.store.lookup(moved) == Claim("node-b", "t2")
