"""The Redis Cluster backend (rediscluster.py) and standalone shards (shards.py): placement,
URLs, shard balance, a primary's failover and slots moving between primaries on a real cluster
(docs/redis-cluster.md).

The contract suite (test_contract.py) runs on both backends too; this file checks what is
their own. Every figure a test measures is printed (``-s`` shows it); none is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from backends.cluster import Cluster, eventually
from polysignal.backends import Backend
from polysignal.backends.base import TOPICS
from polysignal.backends.names import topic_channel
from polysignal.backends.rediscluster import (
    SLOTS,
    ClusterLink,
    RedisClusterBackend,
    partition_tags,
)
from polysignal.backends.shards import jump_hash, name_key, ordered_segments
from polysignal.config import ConfigError, Settings, check_backend_url, redact_url

from support import UNIT, RedisClusterServers, node_settings, redis_cluster_servers

# --- placement (no server) ---


@pytest.mark.parametrize("count", [1, 3, 128, 1000])
def test_partition_tags_are_evenly_spaced_over_the_slots(count: int):
    tags = partition_tags(count)
    slots = [key_slot(b"{%b}anything" % tag) for tag in tags]
    assert len(set(tags)) == count
    assert slots == sorted(slots)
    for i, slot in enumerate(slots):
        assert slot == (2 * i + 1) * SLOTS // (2 * count)


def test_partitions_spread_over_three_primaries_evenly():
    """redis-cli's three slot ranges hold 43, 42 and 43 of the 128 partitions."""
    ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
    slots = [key_slot(b"{%b}x" % tag) for tag in partition_tags(128)]
    assert [sum(lo <= s <= hi for s in slots) for lo, hi in ranges] == [43, 42, 43]


def test_adding_a_third_shard_moves_a_third_of_the_names_and_none_between_the_old_two():
    names = [f"signal:publish:t:topics:room-{i}".encode() for i in range(10_000)]
    before = [jump_hash(name_key(n), 2) for n in names]
    after = [jump_hash(name_key(n), 3) for n in names]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == 2 for _, a in moved), "a moved name goes to the new shard only"
    share = len(moved) / len(names)
    print(f"\nadding a 3rd shard moved {share:.3f} of 10000 names")
    assert 0.28 <= share <= 0.38
    assert 0.4 <= before.count(0) / len(names) <= 0.6


def test_a_batch_keeps_direct_messages_in_order_with_publishes_on_other_shards():
    # p = publish (any node may receive it), d = direct message (one node).
    assert ordered_segments([0, 1, 2, 0], [False] * 4) == [[0, 1, 2, 3]]
    assert ordered_segments([0, 1, 2], [True] * 3) == [[0, 1, 2]]
    assert ordered_segments([0, 1], [False, True]) == [[0], [1]]
    assert ordered_segments([0, 0, 1], [False, True, False]) == [[0, 1], [2]]
    assert ordered_segments([0, 1, 0, 1], [False, True, False, True]) == [[0], [1], [2], [3]]
    assert ordered_segments([], []) == []


# --- URLs (no server) ---


def test_cluster_and_shard_urls_are_checked_and_redacted():
    good = [
        "redis+cluster://h1:7000,h2:7001/",
        "rediss+cluster://u:pw@h1:7000,[::1]:7001/0?ssl_cert_reqs=none",
        "redis://a:6379/0,redis://b:6379/0",
        "redis://a:6379,rediss://:pw@b:6380/1,unix:///tmp/r.sock",
    ]
    for url in good:
        check_backend_url("BACKEND", url)
    bad = {
        "redis+cluster://h1:7000/3": "only database 0",
        "redis+cluster://h1:x/": "not a number",
        "redis+cluster://:pw@/": "without a host",
        "redis://a:6379,memory://": "redis://, rediss:// or unix:// URLs only",
        "redis://a:6379,redis://a:6379": "names one shard twice",
    }
    for url, reason in bad.items():
        with pytest.raises(ConfigError, match=reason):
            check_backend_url("BACKEND", url)
    assert (
        redact_url("redis://:pw1@a:1/0,redis://u:pw2@b:2/0?password=x")
        == "redis://:***@a:1/0,redis://u:***@b:2/0?password=***"
    )
    assert redact_url("rediss+cluster://u:pw@h1:1,h2:2/") == "rediss+cluster://u:***@h1:1,h2:2/"
    schemes = {
        "redis+cluster://h:1/": "redis+cluster",
        "redis://a:1,redis://b:2": "redis+shards",
        "redis://a:1": "redis",
    }
    for url, scheme in schemes.items():
        assert Settings.of(backend_url=url).backend_scheme == scheme


# --- on a real Redis Cluster ---


async def spublish_calls(cluster: RedisClusterServers) -> dict[int, int]:
    """SPUBLISH calls each running primary has answered so far."""
    calls: dict[int, int] = {}
    for port in cluster.primary_ports():
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        calls[port] = int(stats.get("cmdstat_spublish", {}).get("calls", 0))
    return calls


@contextlib.asynccontextmanager
async def cluster_link(url: str) -> AsyncIterator[ClusterLink]:
    link = ClusterLink(url, node_settings(signal_channel=f"t:{uuid.uuid4().hex[:8]}").redis)
    await link.connect()
    try:
        yield link
    finally:
        await link.disconnect()
        await link.close()


@pytest.mark.redis
@pytest.mark.slow
async def test_publishes_on_1000_topics_land_evenly_on_every_primary(redis_cluster_session):
    cluster = redis_cluster_session
    async with cluster_link(cluster.url) as link:
        channels = [topic_channel(link.names.prefix, "topics", f"room-{i}") for i in range(1000)]
        before = await spublish_calls(cluster)
        await link.publish(channels, [b"x"] * len(channels))
        after = await spublish_calls(cluster)
    landed = {port: after[port] - before[port] for port in after}
    print(f"\nSPUBLISH per primary for 1000 topics: {sorted(landed.values())}")
    assert sum(landed.values()) == 1000
    even = 1000 / len(landed)
    for count in landed.values():
        assert 0.8 * even <= count <= 1.2 * even, landed


@pytest.mark.redis
@pytest.mark.slow
async def test_a_node_subscribes_only_the_partitions_of_its_topics(redis_cluster_session):
    """Reference-counted: two topics in one partition are one SSUBSCRIBE, held until both are
    gone; a message of a topic not subscribed in a held partition is not handed on."""
    cluster = redis_cluster_session
    async with cluster_link(cluster.url) as link:
        got: list[tuple[bytes, bytes]] = []
        link.listen(lambda channel, data: got.append((channel, data)))
        serving = asyncio.create_task(link.serve())
        prefix = link.names.prefix
        by_partition: dict[bytes, list[bytes]] = {}
        i = 0
        while not any(len(v) >= 3 for v in by_partition.values()):
            channel = topic_channel(prefix, "topics", f"room-{i}")
            by_partition.setdefault(link.place(channel)[0], []).append(channel)
            i += 1
        partition, (one, two, other) = next(
            (p, c[:3]) for p, c in by_partition.items() if len(c) >= 3
        )
        clients = [aioredis.Redis(host="127.0.0.1", port=p) for p in cluster.primary_ports()]

        async def subscribers() -> int:
            """Subscribers of the partition's shard channel, on whichever primary has it."""
            total = 0
            for client in clients:
                reply = await client.execute_command("PUBSUB SHARDNUMSUB", partition)
                total += sum(int(count) for _, count in reply)  # [(channel, count)]
            return total

        try:
            await link.subscribe([one, two])
            assert await subscribers() == 1
            await link.publish([other, one], [b"not mine", b"mine"])
            await eventually(lambda: _true(len(got) >= 1), "the message of a subscribed topic")
            await asyncio.sleep(0.1 * UNIT)
            assert got == [(one, b"mine")]
            await link.unsubscribe([one])
            assert await subscribers() == 1
            await link.unsubscribe([two])
            assert await subscribers() == 0
        finally:
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
            for client in clients:
                await client.aclose()


async def _true(value: bool) -> bool:
    return value


def test_bus_bytes_per_publish_on_one_redis_and_on_the_cluster():
    """What one cross-node publish costs on the wire to Redis (the RESP command; the message to
    each receiving node carries the same payload): printed for docs/scaling.md."""
    from redis.connection import Connection

    pack = Connection().pack_command
    settings = node_settings()
    prefix = settings.redis.signal_channel
    link = ClusterLink("redis+cluster://127.0.0.1:1/", settings.redis)
    frame = b"x" * 1000
    origin = b"36:" + str(uuid.uuid4()).encode()
    channel = topic_channel(prefix, "topics", "a-room-name")
    single = sum(map(len, pack("PUBLISH", channel, origin + frame)))
    shard_channel, _ = link.place(channel)
    envelope = b"%d:%b%b%b" % (len(channel), channel, origin, frame)
    sharded = sum(map(len, pack("SPUBLISH", shard_channel, envelope)))
    print(
        f"\n1000-byte frame: PUBLISH {single} bytes on one Redis, SPUBLISH {sharded} bytes on "
        f"the cluster (+{sharded - single}); received by each node subscribed to the partition"
    )
    assert sharded > single


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_primary_killed_under_load_fails_over_and_delivery_and_presence_heal():
    """Two nodes; b has subscribers of 24 topics spread over every primary; a publishes to each
    every 20 ms. A primary is SIGKILLed: once its replica is promoted, every topic is delivered
    again and a counts b's subscribers again. The gap is printed, never asserted."""
    with redis_cluster_servers(node_timeout_ms=1000) as servers:
        nodes = Cluster("cluster", servers.url, redis_backoff_max=0.5, redis_cluster_probe=0.5)
        try:
            a, b = await nodes.node("a"), await nodes.node("b")
            topics = [nodes.topic(f"room-{i}") for i in range(24)]
            last: dict[str, float] = {}
            b.on_topic_message(lambda topic, frame: last.__setitem__(topic, time.monotonic()))
            for topic in topics:
                b.local_count_changed(topic, 1)
            await nodes.settle()
            for topic in topics:
                await eventually(lambda t=topic: counts_one(a, t), "a counts b")

            async def load() -> None:
                while True:
                    for topic in topics:
                        await a.publish(topic, b"frame")
                    await asyncio.sleep(0.02)

            publisher = asyncio.create_task(load())
            try:
                await eventually(lambda: _true(len(last) == len(topics)), "every topic arrives")
                victim = servers.primary_ports()[0]
                killed = time.monotonic()
                servers.kill(victim)
                resumed: dict[str, float] = {}

                async def all_resumed() -> bool:
                    for topic in topics:
                        if last.get(topic, 0) > killed and topic not in resumed:
                            resumed[topic] = last[topic]
                    return len(resumed) == len(topics)

                await eventually(all_resumed, "delivery on every topic after the failover", 30)
                for topic in topics:
                    await eventually(lambda t=topic: counts_one(a, t), "presence healed", 15)
                healed = time.monotonic()
            finally:
                publisher.cancel()
                with contextlib.suppress(BaseException):
                    await publisher
            gaps = sorted(t - killed for t in resumed.values())
            print(
                f"\nprimary {victim} killed: delivery resumed on every topic after "
                f"{gaps[0]:.2f}-{gaps[-1]:.2f}s, presence healed after {healed - killed:.2f}s; "
                f"a reconnected {a.connects - 1}x, b {b.connects - 1}x"
            )
        finally:
            await nodes.close()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_partition_slots_moved_to_another_primary_under_load_delivery_and_presence_heal():
    """Two nodes; b has subscribers of 8 topics whose partitions are all on one primary; a
    publishes to each every 20 ms. The slots of those partitions are moved, one by one, to
    another primary (CLUSTER SETSLOT IMPORTING/MIGRATING, MIGRATE of their keys, SETSLOT NODE
    on every primary: what ``redis-cli --cluster reshard`` does). Afterwards every topic is
    delivered again, through the new owner, a counts b's subscribers again, and no message
    arrived twice. The gap is printed, never asserted. A cluster of its own: the session's
    keeps its slot ranges for the other tests."""
    with redis_cluster_servers() as servers:
        nodes = Cluster("cluster", servers.url, redis_backoff_max=0.5, redis_cluster_probe=0.5)
        admin = {p: aioredis.Redis(host="127.0.0.1", port=p) for p in servers.primary_ports()}
        try:
            a, b = await nodes.node("a"), await nodes.node("b")
            assert isinstance(b, RedisClusterBackend)
            ids = {p: _text(await c.execute_command("CLUSTER", "MYID")) for p, c in admin.items()}
            owner = await slot_owners(admin)
            # The partitions of the first 8 topics placed on the first slot's primary.
            source = owner[0]
            target = next(p for p in admin if p != source)
            slot_of: dict[str, int] = {}
            partition: dict[int, bytes] = {}  # slot -> the partition's shard channel
            i = 0
            while len(slot_of) < 8:
                topic = nodes.topic(f"room-{i}")
                shard_channel, slot = b.link.place(topic_channel(b.prefix, TOPICS, topic))
                if owner[slot] == source:
                    slot_of[topic], partition[slot] = slot, shard_channel
                i += 1
            topics, slots = list(slot_of), sorted(set(slot_of.values()))

            received: Counter[tuple[str, bytes]] = Counter()
            arrivals: list[tuple[float, str, int]] = []  # (when, topic, round)

            def on_message(topic: str, frame: bytes) -> None:
                received[topic, frame] += 1
                arrivals.append((time.monotonic(), topic, int(frame)))

            b.on_topic_message(on_message)
            for topic in topics:
                b.local_count_changed(topic, 1)
            await nodes.settle()
            for topic in topics:
                await eventually(lambda t=topic: counts_one(a, t), "a counts b")

            started: list[float] = []  # when each round of publishes began

            async def load() -> None:
                deadline = time.monotonic() + 30 * UNIT
                while time.monotonic() < deadline:
                    started.append(time.monotonic())
                    frame = b"%d" % (len(started) - 1)
                    for topic in topics:
                        await a.publish(topic, frame)
                    await asyncio.sleep(0.02)

            publisher = asyncio.create_task(load())
            try:
                await eventually(
                    lambda: _true({t for _, t, _ in arrivals} == set(topics)),
                    "every topic arrives before the move",
                )
                begun = time.monotonic()
                moved = await move_slots(admin, ids, slots, source, target)
                done = time.monotonic()

                def resumed() -> dict[str, float]:
                    """Per topic: the first arrival of a message published after its slot
                    had left the source (it can only have come through the new owner)."""
                    first: dict[str, float] = {}
                    for when, topic, round_ in arrivals:
                        if topic not in first and started[round_] > moved[slot_of[topic]]:
                            first[topic] = when
                    return first

                await eventually(
                    lambda: _true(len(resumed()) == len(topics)),
                    "delivery on every topic after the move",
                    10 * UNIT,
                )
                for topic in topics:
                    await eventually(lambda t=topic: counts_one(a, t), "presence healed", 10 * UNIT)
                healed = time.monotonic()
                last = len(started) - 1

                async def delivering() -> bool:
                    """Every topic got 5 rounds published after presence was whole."""
                    later = Counter(t for _, t, r in arrivals if r > last)
                    return all(later[t] >= 5 for t in topics)

                await eventually(delivering, "steady delivery after the move", 10 * UNIT)
            finally:
                publisher.cancel()
                with contextlib.suppress(BaseException):
                    await publisher
            await nodes.settle()  # whatever a sent has reached b
            twice = {key: n for key, n in received.items() if n > 1}
            assert not twice, f"delivered more than once: {twice}"
            after = await slot_owners(admin)
            assert all(after[slot] == target for slot in slots)
            for slot in slots:
                reply = await admin[target].execute_command(
                    "PUBSUB", "SHARDNUMSUB", partition[slot]
                )
                assert int(reply[1]) == 1, f"b subscribes {partition[slot]!r} on the new owner"
            first = resumed()
            gaps = sorted(first[t] - moved[slot_of[t]] for t in topics)
            print(
                f"\n{len(slots)} partition slots moved {source} -> {target} in "
                f"{done - begun:.3f}s: delivery resumed on every topic {gaps[0]:.2f}-"
                f"{gaps[-1]:.2f}s after its slot moved, presence whole {healed - done:.2f}s after "
                f"the last move; a reconnected {a.connects - 1}x, b {b.connects - 1}x; "
                f"{sum(received.values())} messages, none twice"
            )
        finally:
            for client in admin.values():
                await client.aclose()
            await nodes.close()


async def slot_owners(admin: dict[int, aioredis.Redis]) -> dict[int, int]:
    """The port of every slot's primary, as the first primary sees it (CLUSTER SLOTS)."""
    reply = await next(iter(admin.values())).execute_command("CLUSTER", "SLOTS")
    owner: dict[int, int] = {}
    for start, end, primary, *_ in reply:
        for slot in range(int(start), int(end) + 1):
            owner[slot] = int(primary[1])
    return owner


async def move_slots(
    admin: dict[int, aioredis.Redis],
    ids: dict[int, str],
    slots: list[int],
    source: int,
    target: int,
) -> dict[int, float]:
    """Move ``slots`` from the primary ``source`` to ``target``, one by one, keys included, as
    ``redis-cli --cluster reshard`` does; when each slot left the source (monotonic)."""
    src, dst = admin[source], admin[target]
    others = [client for port, client in admin.items() if port not in (source, target)]
    moved: dict[int, float] = {}
    for slot in slots:
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        while keys := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            await src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        await src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        moved[slot] = time.monotonic()
        for client in others:
            await client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    return moved


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def counts_one(node: Backend, topic: str) -> bool:
    return await node.topic_clients(topic, 0) == 1
