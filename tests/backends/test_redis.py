"""What only the Redis backend has: its names in Redis, TTLs, dead nodes, and Redis faults."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aioredis

from backends.cluster import Cluster, Inbox, eventually
from polysignal import cli
from polysignal.backends import BackendUnavailable, create_backend
from polysignal.backends.base import TOPICS
from polysignal.backends.cluster import OUTBOX_MAX_ITEMS
from polysignal.backends.names import escape, presence_key, redis_name
from polysignal.backends.redis import RedisBackend
from polysignal.config import Settings, redact_url
from polysignal.server.runner import serve

from support import UNIT, RedisServer, free_port, node_settings

pytestmark = [pytest.mark.timeout(60), pytest.mark.redis]


def fast_settings(url: str, node_id: str, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "node_id": node_id,
        "backend_url": url,
        "presence_ttl": 5,
        "presence_refresh": 0.5,
        "presence_cache_ttl": 0.5,
        "redis_backoff_max": 0.3,
    }
    base.update(overrides)
    return node_settings(**base)


# --- names ---


def test_names_escape_all_but_the_last_part():
    assert redis_name("topic", "presence", "session:abcd") == "topic:presence:session:abcd"
    assert redis_name("a:b", "c") == "a%3Ab:c"
    assert redis_name("a", "b:c") != redis_name("a:b", "c")
    assert escape("%3A") == "%253A" and escape("%3A") != escape(":")


def test_presence_keys_are_flow_likes():
    assert presence_key("topics", "room:1") == "topic:presence:room:1"
    assert presence_key("rooms", "room:1") == "rooms:presence:room:1"


def test_backend_selected_by_url():
    url = "redis://127.0.0.1:1/0"
    assert isinstance(create_backend(Settings.of(backend_url=url)), RedisBackend)
    from_env = Settings.from_env({"REDIS_URL": url})
    assert isinstance(create_backend(from_env), RedisBackend)
    assert from_env.redis.signal_channel == "signal:publish"


def test_refresh_kept_below_the_ttl(caplog: pytest.LogCaptureFixture):
    """A refresh period not below the TTL would let presence lapse: it is shortened, loudly."""
    url = "redis://127.0.0.1:1/0"
    backend = RedisBackend(node_settings(backend_url=url, presence_ttl=3, presence_refresh=10.0))
    assert backend.presence_refresh == 1.0
    assert "PRESENCE_REFRESH (10s) is not below PRESENCE_TTL (3s)" in caplog.text


# --- credentials in URLs ---


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:secret@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://h:6379/0?password=secret", "redis://h:6379/0?password=***"),
        (
            "rediss://u:s1@h/0?db=1&password=s2&socket_timeout=3",
            "rediss://u:***@h/0?db=1&password=***&socket_timeout=3",
        ),
        ("redis://[::1]:6379/0?Password=secret", "redis://[::1]:6379/0?Password=***"),
        ("unix:///run/redis.sock?db=0&password=secret", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://u:p@ss@h:1/0", "redis://u:***@h:1/0"),
        ("redis://h:6379/0?token=secret#secret", "redis://h:6379/0?token=***"),
        ("redis://user@h:6379/0", "redis://user@h:6379/0"),
        ("redis://h:6379", "redis://h:6379"),
        ("memory://", "memory://"),
    ],
)
def test_credentials_in_a_url_are_redacted(url: str, shown: str):
    assert redact_url(url) == shown


async def test_no_credential_reaches_a_log_line_an_error_or_a_repr(
    caplog: pytest.LogCaptureFixture,
):
    """A Redis password given as user:pass@ and as ?password=: the listening line, the
    reconnect warnings, the worker's wait line, the backend's errors and the settings' repr
    show the URL with both as ``***``."""
    caplog.set_level(logging.DEBUG, "polysignal")
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0?password=hunter3&db=0"
    shown = f"{url.split('//')[0]}//user:***@{url.split('@')[1].replace('hunter3', '***')}"
    settings = fast_settings(url, "redact", backend_wait=0.3)
    listening = asyncio.Event()
    stop = asyncio.Event()
    node = asyncio.create_task(
        serve(settings, reuse_port=True, on_listening=lambda _: listening.set(), stop=stop)
    )
    try:
        await asyncio.wait_for(listening.wait(), 5 * UNIT)

        async def retried() -> bool:
            return "retry 2 in" in caplog.text

        await eventually(retried, "two reconnect attempts logged")
        backend = RedisBackend(settings)
        with pytest.raises(BackendUnavailable) as raised:
            await backend.claim("id", "token", 10)
        assert str(raised.value) == f"Redis at {shown} is not connected"
    finally:
        stop.set()
        await asyncio.wait_for(node, 10 * UNIT)
    text = caplog.text
    assert f"backend {shown})" in text  # the listening line
    assert f"backend {shown} not reachable after 0.3s" in text
    assert f"cannot reach {shown} (" in text
    assert "hunter" not in text
    assert "hunter" not in repr(settings) and shown in repr(settings)


def test_a_backend_url_that_does_not_parse_is_refused_without_showing_it(
    capsys: pytest.CaptureFixture[str],
):
    assert cli.main(["serve", "--backend", "redis://user:hunter2@[::1/0"]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == (
        "",
        "polysignal: configuration error: BACKEND: not a URL (Invalid IPv6 URL)\n",
    )


# --- presence in Redis ---


async def test_presence_hash_ttl_and_hdel(redis_cluster: Cluster, r: aioredis.Redis):
    """Flow-Like's hash: field = node id, value = count, EXPIRE set; HDEL at zero."""
    a = await redis_cluster.node("a")
    topic = redis_cluster.topic("session:abcd")
    a.local_count_changed(topic, 3)
    a.local_count_changed(topic, 2, "rooms")
    await a.sync()
    key = f"topic:presence:{topic}"
    assert await r.hgetall(key) == {a.node_id.encode(): b"3"}
    assert 0 < await r.ttl(key) <= 5
    assert await r.hgetall(f"rooms:presence:{topic}") == {a.node_id.encode(): b"2"}
    a.local_count_changed(topic, 0)
    await a.sync()
    assert await r.exists(key) == 0


async def test_channel_subscribed_only_while_local_subscribers(
    redis_cluster: Cluster, r: aioredis.Redis
):
    a = await redis_cluster.node("a")
    topic = redis_cluster.topic("x:y")
    channel = f"test:{redis_cluster.uid}:t:topics:{topic}".encode()
    assert channel not in await r.pubsub_channels(f"test:{redis_cluster.uid}:t:*")
    a.local_count_changed(topic, 1)
    await a.sync()
    assert channel in await r.pubsub_channels(f"test:{redis_cluster.uid}:t:*")
    a.local_count_changed(topic, 0)
    await a.sync()

    async def unsubscribed() -> bool:
        return channel not in await r.pubsub_channels(f"test:{redis_cluster.uid}:t:*")

    await eventually(unsubscribed, "UNSUBSCRIBE")


async def test_publish_not_sent_when_no_other_node_listens(
    redis_cluster: Cluster, r: aioredis.Redis
):
    """A node alone on a topic keeps its publishes off Redis; once another node's presence is
    known they go out on the topic's channel (watched here by a plain Redis subscriber)."""
    a, b = await redis_cluster.node("a"), await redis_cluster.node("b")
    topic = redis_cluster.topic()
    watcher = r.pubsub()
    await watcher.subscribe(f"test:{redis_cluster.uid}:t:topics:{topic}")
    assert (await watcher.get_message(timeout=1))["type"] == "subscribe"
    a.local_count_changed(topic, 1)
    await redis_cluster.settle()
    assert await a.topic_clients(topic, 1) == 1
    await a.publish(topic, b"alone")
    await a.sync()
    assert await watcher.get_message(timeout=0.3) is None
    b.local_count_changed(topic, 1)
    await redis_cluster.settle()
    assert await a.topic_clients(topic, 1) == 2
    await a.publish(topic, b"together")
    got = await watcher.get_message(timeout=2)
    assert got is not None and got["data"].endswith(b"together")
    await watcher.aclose()


async def test_dead_nodes_counts_vanish_although_the_hash_lives(
    redis_cluster: Cluster, r: aioredis.Redis
):
    """A node whose alive key expired (killed) loses its fields; live nodes keep theirs."""
    a = await redis_cluster.node("a")
    b = await redis_cluster.node("b", presence_refresh=60.0)
    topic = redis_cluster.topic()
    a.local_count_changed(topic, 1)
    b.local_count_changed(topic, 4)
    await redis_cluster.settle()
    assert await a.topic_clients(topic, 1) == 5
    # What the TTL does to a killed node: its alive key is gone and nobody refreshes it.
    await r.delete(f"test:{redis_cluster.uid}:alive:{b.node_id}")

    async def b_gone() -> bool:
        return await r.hget(f"topic:presence:{topic}", b.node_id) is None

    await eventually(b_gone, "b's field swept by a's refresh")
    assert await r.hget(f"topic:presence:{topic}", a.node_id) == b"1"

    async def a_counts_one() -> bool:
        return await a.topic_clients(topic, 1) == 1

    await eventually(a_counts_one, "a's cache after the sweep")


async def test_malformed_bus_messages_are_dropped(redis_cluster: Cluster, r: aioredis.Redis):
    """Foreign or corrupt bytes on any channel never stop a node's reader."""
    a, b = await redis_cluster.node("a"), await redis_cluster.node("b")
    inbox, direct = Inbox(), Inbox()
    b.on_topic_message(inbox)
    b.on_direct("k", direct)
    topic = redis_cluster.topic()
    b.local_count_changed(topic, 1)
    await b.sync()
    prefix = f"test:{redis_cluster.uid}"
    channels = (f"{prefix}:t:topics:{topic}", f"{prefix}:presence", f"{prefix}:direct:{b.node_id}")
    for channel in channels:
        for junk in (b"", b"garbage", b"99999:x", b"[1,2]", b'["x","topics",[],"no"]', b"\xff"):
            await r.publish(channel, junk)
    await a.publish(topic, b"still works")
    assert await inbox.next() == (topic, b"still works")
    assert await a.send_direct(b.node_id, "k", b"and this")
    assert await direct.next() == (a.node_id, b"and this")
    assert b.ready


async def test_outbox_is_bounded_while_redis_stalls(redis_cluster: Cluster, r: aioredis.Redis):
    """Redis not answering writes: publishers wait at the outbox bound instead of queueing
    without limit, and everything flows once Redis answers again."""
    a, b = await redis_cluster.node("a"), await redis_cluster.node("b")
    received = 0

    def count(topic: str, frame: bytes) -> None:
        nonlocal received
        received += 1

    b.on_topic_message(count)
    topic = redis_cluster.topic()
    b.local_count_changed(topic, 1)
    await redis_cluster.settle()
    await a.topic_clients(topic, 0)
    total = OUTBOX_MAX_ITEMS + 100

    async def flood() -> None:
        for i in range(total):
            await a.publish(topic, b"%d" % i)

    await r.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
    task = asyncio.create_task(flood())

    async def blocked() -> bool:
        assert isinstance(a, RedisBackend)
        return not a._drained.is_set()

    await eventually(blocked, "publishers held at the outbox bound")
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()
    assert isinstance(a, RedisBackend) and len(a._outbox) <= OUTBOX_MAX_ITEMS
    await asyncio.wait_for(task, 20 * UNIT)

    async def all_received() -> bool:
        return received == total

    await eventually(all_received, f"{total} frames at b", timeout=20 * UNIT)
    assert a.ready and a.dropped_publishes == 0


async def test_outbox_bound_in_bytes_is_the_setting(redis_cluster: Cluster, r: aioredis.Redis):
    """``REDIS_OUTBOX_BYTES``: with Redis not answering, ``publish_nowait`` accepts exactly that
    many bytes, then the publisher has to wait; everything arrives once Redis answers."""
    a = await redis_cluster.node("a", redis_outbox_bytes=64 * 1024)
    b = await redis_cluster.node("b")
    inbox = Inbox()
    b.on_topic_message(inbox)
    topic = redis_cluster.topic()
    b.local_count_changed(topic, 1)
    await redis_cluster.settle()
    assert await a.topic_clients(topic, 0) == 1
    frame = b"x" * 1024
    await r.execute_command("CLIENT", "PAUSE", str(int(1000 * UNIT)), "WRITE")
    accepted = 0
    while a.publish_nowait(topic, frame):
        accepted += 1
        assert accepted <= 64
    assert accepted == 64
    await asyncio.wait_for(a.publish(topic, frame), 10 * UNIT)
    for _ in range(65):
        assert await inbox.next(timeout=10 * UNIT) == (topic, frame)
    assert a.ready and a.dropped_publishes == 0


async def test_a_batch_not_answered_in_the_command_timeout_is_a_lost_connection(
    redis_cluster: Cluster, r: aioredis.Redis
):
    """``REDIS_COMMAND_TIMEOUT``: a stalled batch drops the connection; it comes back."""
    a = await redis_cluster.node("a", redis_command_timeout=0.3)
    b = await redis_cluster.node("b")
    topic = redis_cluster.topic()
    b.local_count_changed(topic, 1)
    await redis_cluster.settle()
    assert await a.topic_clients(topic, 0) == 1
    await r.execute_command("CLIENT", "PAUSE", str(int(1500 * UNIT)), "WRITE")
    await a.publish(topic, b"stalled")

    async def lost() -> bool:
        return not a.ready

    async def back() -> bool:
        return a.ready

    await eventually(lost, "the stalled batch counted as a lost connection")
    await eventually(back, "reconnected once Redis answers", timeout=10 * UNIT)


async def test_a_silent_subscriber_connection_is_a_lost_connection(
    redis_cluster: Cluster, r: aioredis.Redis
):
    """``REDIS_KEEPALIVE``: no reply to its PINGs for three times that drops the connection."""
    a = await redis_cluster.node("a", redis_keepalive=0.2)
    await r.execute_command("CLIENT", "PAUSE", str(int(1500 * UNIT)), "ALL")

    async def lost() -> bool:
        return not a.ready

    async def back() -> bool:
        return a.ready

    await eventually(lost, "the silent connection dropped")
    await eventually(back, "reconnected once Redis answers", timeout=10 * UNIT)


# --- a publish never waits for Redis ---


async def test_a_stale_count_is_answered_at_once_while_redis_hangs(
    redis_cluster: Cluster, r: aioredis.Redis
):
    """``topic_clients_nowait`` answers the best known count at once, also when it is older
    than PRESENCE_CACHE_TTL and Redis does not answer; the count is re-read in the background,
    so a change the cache could not know of (no notice) shows once Redis answers."""
    a = await redis_cluster.node("a", presence_cache_ttl=0.2)
    b = await redis_cluster.node("b")
    topic = redis_cluster.topic()
    a.local_count_changed(topic, 1)
    b.local_count_changed(topic, 2)
    await redis_cluster.settle()
    assert await a.topic_clients(topic, 1) == 3
    assert isinstance(a, RedisBackend)
    entry = a._presence.cache[(TOPICS, topic)]

    async def stale() -> bool:
        return entry.expires <= time.monotonic()

    await r.execute_command("CLIENT", "PAUSE", str(int(1000 * UNIT)), "WRITE")
    try:
        await eventually(stale, "the cached count is older than its TTL")
        assert a.topic_clients_nowait(topic, 1) == 3
        assert a.topic_clients_nowait(topic, 4) == 6
    finally:
        await r.execute_command("CLIENT", "UNPAUSE")
    await r.hset(f"topic:presence:{topic}", b.node_id, 5)  # behind the nodes' backs

    async def re_read() -> bool:
        return a.topic_clients_nowait(topic, 1) == 6

    await eventually(re_read, "the count re-read in the background")


async def test_the_other_nodes_counts_are_read_when_a_topic_becomes_local(
    redis_cluster: Cluster,
):
    """A node's first subscriber of a topic: the other nodes' counts are read then, so the first
    publish to it counts them without waiting for Redis."""
    # No periodic re-read of a's topics within the test: only the read at its first subscriber.
    a = await redis_cluster.node("a", presence_ttl=120, presence_refresh=60.0)
    b = await redis_cluster.node("b")
    topic = redis_cluster.topic()
    b.local_count_changed(topic, 2)
    await redis_cluster.settle()
    a.local_count_changed(topic, 1)

    async def counted() -> bool:
        return a.topic_clients_nowait(topic, 1) == 3

    await eventually(counted, "b's subscribers counted without a read on the publish path")


# --- faults ---


async def test_redis_down_at_start(private_redis: RedisServer, caplog: pytest.LogCaptureFixture):
    """Not ready, nothing raises, local counts kept; connects and asserts them once Redis runs."""
    caplog.set_level(logging.WARNING, "polysignal")
    url = private_redis.url.replace("redis://", "redis://user:hunter2@")
    a = RedisBackend(fast_settings(url, "down-a"))
    await a.start()
    try:
        topic = "down:room"
        a.local_count_changed(topic, 2)
        await a.publish(topic, b"dropped")
        assert not a.ready
        assert await a.topic_clients(topic, 2) == 2
        assert not await a.send_direct("down-b", "k", b"x")
        with pytest.raises(BackendUnavailable):
            await a.claim("id", "tok", 10)
        with pytest.raises(BackendUnavailable):
            await a.sync()
        assert a.dropped_publishes == 1
        await asyncio.sleep(0.5)
        text = caplog.text
        assert "cannot reach redis://user:***@127.0.0.1" in text
        assert "hunter2" not in text
        # redis-server has no such user; run it with a matching one so the URL can log in.
        private_redis.start()
        client = aioredis.Redis.from_url(private_redis.url)
        await client.execute_command(
            "ACL", "SETUSER", "user", "on", ">hunter2", "~*", "&*", "+@all"
        )

        async def ready() -> bool:
            return a.ready

        await eventually(ready, "connected after Redis came up", timeout=10 * UNIT)
        assert await client.hget(f"topic:presence:{topic}", "down-a") == b"2"
        await client.aclose()
    finally:
        await a.close()


async def test_redis_restart_resumes_delivery(private_redis: RedisServer):
    """Redis stops (all state lost) and returns on the same port: nodes re-subscribe and
    re-assert presence; publishes made meanwhile are dropped, not queued."""
    private_redis.start()
    a = RedisBackend(fast_settings(private_redis.url, "restart-a"))
    b = RedisBackend(fast_settings(private_redis.url, "restart-b"))
    inbox = Inbox()
    b.on_topic_message(inbox)

    async def both_ready() -> bool:
        return a.ready and b.ready

    async def both_down() -> bool:
        return not a.ready and not b.ready

    try:
        await a.start()
        await b.start()
        await eventually(both_ready, "connected")
        topic = "restart:room"
        b.local_count_changed(topic, 1)
        await b.sync()
        await a.publish(topic, b"before")
        assert await inbox.next() == (topic, b"before")

        private_redis.stop()
        await eventually(both_down, "outage noticed")
        for i in range(1000):
            await a.publish(topic, b"during %d" % i)
        assert a.dropped_publishes >= 1000
        b.local_count_changed(topic, 2)  # changes during the outage are re-asserted later

        private_redis.start()
        await eventually(both_ready, "reconnected", timeout=10 * UNIT)
        await b.sync()
        client = aioredis.Redis.from_url(private_redis.url)
        assert await client.hget(f"topic:presence:{topic}", "restart-b") == b"2"
        await client.aclose()
        assert await a.topic_clients(topic, 0) == 2
        await a.publish(topic, b"after")
        assert await inbox.next() == (topic, b"after")
        await inbox.silent()
    finally:
        await a.close()
        await b.close()


async def test_topic_churn_during_an_outage_keeps_no_backlog(private_redis: RedisServer):
    """Topics that come and go while Redis is away leave nothing queued; those still in use
    are written when it returns."""
    a = RedisBackend(fast_settings(private_redis.url, "churn-a"))
    await a.start()
    try:
        for i in range(10_000):
            a.local_count_changed(f"gone-{i}", 1)
            a.local_count_changed(f"gone-{i}", 0)
        a.local_count_changed("kept", 1)
        assert len(a._presence.dirty) == 1
        private_redis.start()

        async def ready() -> bool:
            return a.ready

        await eventually(ready, "connected", timeout=10 * UNIT)
        await a.sync()
        client = aioredis.Redis.from_url(private_redis.url)
        assert await client.keys("topic:presence:*") == [b"topic:presence:kept"]
        await client.aclose()
    finally:
        await a.close()


async def test_after_an_empty_restart_every_claim_is_back_before_the_node_is_ready(
    private_redis: RedisServer,
):
    """Redis restarts empty: the first node back starts the settle window in Redis (its grace:
    REDIS_BACKOFF_MAX + 0.5 s), and each node counts as ready only once its own claims are back
    in Redis; new claims wait until the window is over."""
    private_redis.start()
    a = RedisBackend(fast_settings(private_redis.url, "settle-a"))
    b = RedisBackend(fast_settings(private_redis.url, "settle-b"))

    async def both_ready() -> bool:
        return a.ready and b.ready

    async def both_down() -> bool:
        return not a.ready and not b.ready

    try:
        await a.start()
        await b.start()
        await eventually(both_ready, "connected", timeout=10 * UNIT)
        for i in range(50):
            assert await a.claim(f"id-{i}", f"token-{i}", 30)
        private_redis.stop()
        await eventually(both_down, "outage noticed")
        private_redis.start()
        client = aioredis.Redis.from_url(private_redis.url)
        try:
            await eventually(lambda: _ready(a), "a reconnected", timeout=10 * UNIT)
            left = await client.pttl("polysignal:settling")
            assert 0 < left <= (0.3 + 0.5) * 1000
            assert await client.get("polysignal:epoch") == b"1"
            for i in range(50):
                assert await client.hmget(f"signal:publish:claim:id-{i}", ["node", "token"]) == [
                    b"settle-a",
                    f"token-{i}".encode(),
                ]
            await eventually(lambda: _ready(b), "b reconnected", timeout=10 * UNIT)
            assert not await b.claim("id-7", "someone else", 30)
            assert await b.claim("new", "token", 30)
            assert await client.exists("polysignal:settling") == 0
        finally:
            await client.aclose()
    finally:
        await a.close()
        await b.close()


async def _ready(backend: RedisBackend) -> bool:
    return backend.ready


async def test_close_while_redis_is_down_does_not_hang(private_redis: RedisServer):
    private_redis.start()
    a = RedisBackend(fast_settings(private_redis.url, "close-a"))
    await a.start()

    async def ready() -> bool:
        return a.ready

    await eventually(ready, "connected")
    a.local_count_changed("t", 1)
    private_redis.stop()
    async with asyncio.timeout(5 * UNIT):
        await a.close()
    assert not a.ready
