"""Redis backend: many processes and hosts act as one signaling server (docs/redis.md).

What lives where in Redis (``P`` = ``SIGNAL_CHANNEL``, default ``signal:publish``; every name
comes from ``redis_name``, see docs/redis.md):

* topic fan-out: channel ``P:t:{namespace}:{topic}``. A node is subscribed to it exactly while
  it has local subscribers of the topic (batched SUBSCRIBE/UNSUBSCRIBE), so a node receives only
  traffic for its own topics. A bus message is ``<origin envelope><frame>``; a node drops its own
  (Redis pub/sub echoes a publisher that is subscribed too).
* presence: hash ``topic:presence:{topic}`` (Flow-Like's key, docs/redis.md) or
  ``{namespace}:presence:{topic}`` for other namespaces; field = node id, value = that node's
  count; ``EXPIRE presence_ttl`` refreshed every ``presence_refresh``; HDEL at zero and at stop.
  A node also holds ``P:alive:{node}`` with the same TTL: fields of nodes whose alive key is
  gone (killed nodes) are deleted by whoever reads the hash, so a dead node's counts vanish
  within the TTL even while live nodes keep the hash itself alive.
* presence notices: channel ``P:presence``; every change of a node's count is announced there,
  and nodes patch their cached view of that topic.
* direct delivery: channel ``P:direct:{node}``; id claims: hash ``P:claim:{key}`` (token, node)
  with a PEXPIRE lease, changed only by Lua scripts (atomic claim/takeover/renew/release).

Cost per publish: ``publish`` appends to a bounded outbox that one writer task flushes as a
pipeline (one round trip per batch, not per message), and a frame that no other node can receive
(the cache knows no other node has subscribers) is not sent at all; ``topic_clients`` answers
from a cache.
Staleness bound of ``clients``: a change on another node reaches the cache with its presence
notice (one Redis hop); a cached count is re-read at most ``presence_cache_ttl`` after it was
read, which also bounds a missed notice; a killed node's counts are gone ``presence_ttl`` after
its last refresh (plus ``presence_cache_ttl``). While Redis is away ``clients`` is the local
count: those are the peers a publish can reach.

Ordering guarantee: a node SUBSCRIBEs to a topic's channel and waits for Redis to confirm before
it writes its presence for that topic, so once presence is visible the node receives every later
publish. Faults: the node keeps serving local peers while Redis is away, retries with capped,
jittered backoff, and on reconnect re-subscribes, re-asserts presence and drops its cache.
Nothing queues without bound while Redis is away: publishes are dropped (counted, logged once
per outage), presence is state that is re-asserted, not a queue of changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from polysignal.backends.base import TOPICS, Backend, BackendUnavailable, Claim
from polysignal.config import Settings, redact_url

log = logging.getLogger("polysignal.redis")
presence_log = logging.getLogger("polysignal.presence")
publish_log = logging.getLogger("polysignal.publish")

CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection to Redis."""
COMMAND_TIMEOUT = 5.0
"""Seconds one batch of commands may take before the connection is considered lost."""
READ_TIMEOUT = 2.0
"""Seconds a presence read may delay a publish before the cached or local count is used."""
KEEPALIVE = 5.0
"""Seconds between PINGs on the subscriber connection; silence for 3x this drops it."""
BACKOFF_BASE = 0.2
MAX_BATCH = 1024
"""Commands per pipeline written by the writer task."""
OUTBOX_MAX_BYTES = 8 << 20
OUTBOX_MAX_ITEMS = 65536
"""Outbox high-water marks: above them publishers wait for the writer (backpressure)."""
CACHE_MAX = 65536
"""Most topics whose cluster-wide count is cached."""
SYNC_KIND = "polysignal.sync"
"""Direct-message kind a node sends itself to learn that its reader caught up (``sync``)."""

Key = tuple[str, str]
"""(namespace, topic)"""


def escape(part: str) -> str:
    """``part`` with ``%`` and ``:`` percent-encoded, so it cannot contain a separator."""
    return part.replace("%", "%25").replace(":", "%3A")


def redis_name(*parts: str) -> str:
    """The one naming function: parts joined by ``:``, all but the last escaped.

    The last part is kept verbatim (it is unambiguous at the tail), which keeps Flow-Like's
    ``topic:presence:{topic}`` exact for any topic, colons included.
    """
    *head, last = parts
    return ":".join([*(escape(p) for p in head), last])


def presence_key(namespace: str, topic: str) -> str:
    """``topic:presence:{topic}`` for the topics protocol, ``{namespace}:presence:{topic}`` else."""
    return redis_name("topic" if namespace == TOPICS else namespace, "presence", topic)


@functools.lru_cache(maxsize=65536)
def topic_channel(prefix: str, namespace: str, topic: str) -> bytes:
    return f"{prefix}:{redis_name('t', namespace, topic)}".encode()


def _head(text: str) -> bytes:
    """A length-prefixed field of a bus message: ``<len>:<utf-8 bytes>``."""
    raw = text.encode()
    return b"%d:%b" % (len(raw), raw)


def _split_head(data: bytes, start: int = 0) -> tuple[str, int]:
    """Parse one ``_head`` field at ``start``; returns it and the offset after it."""
    colon = data.index(b":", start, start + 11)
    end = colon + 1 + int(data[start:colon])
    if end > len(data):
        raise ValueError("truncated field")
    return data[colon + 1 : end].decode(), end


# Claims: a hash {token, node} with a PEXPIRE lease. Lua makes check-and-set atomic.
_CLAIM = """
local t = redis.call('HGET', KEYS[1], 'token')
if t and t ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'node', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
_RENEW = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# ARGV[2] = node id, or '' for any node (a node stopping releases only what it still holds).
_RELEASE = """
local v = redis.call('HMGET', KEYS[1], 'token', 'node')
if v[1] == ARGV[1] and (ARGV[2] == '' or v[2] == ARGV[2]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
# Presence read: the hash without the fields of nodes whose alive key expired (deleted here).
_READ_PRESENCE = """
local h = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #h, 2 do
  if redis.call('EXISTS', ARGV[1] .. h[i]) == 1 then
    out[#out + 1] = h[i]
    out[#out + 1] = h[i + 1]
  else
    redis.call('HDEL', KEYS[1], h[i])
  end
end
return out
"""


@dataclass(slots=True)
class _Remote:
    """The other nodes' counts of one topic, as last read or patched by notices."""

    counts: dict[str, int] = field(default_factory=dict)
    expires: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(slots=True)
class _Out:
    """One outbox entry: a PUBLISH, or (channel None) a marker resolved when flushed.

    ``topic`` is set for topic publishes (``data`` is then the bare frame): the writer skips
    those that no other node can receive and prefixes the origin to the others.
    """

    channel: bytes | None
    data: bytes
    future: asyncio.Future[Any] | None = None
    topic: Key | None = None


class RedisBackend(Backend):
    """The cluster seam on Redis pub/sub and hashes; see the module docstring."""

    def __init__(self, settings: Settings, url: str | None = None) -> None:
        super().__init__(settings.server.node_id)
        self.url = url or settings.server.backend_url
        self.safe_url = redact_url(self.url)
        self.prefix = settings.redis.signal_channel
        self.presence_ttl = max(1, settings.redis.presence_ttl)
        self.presence_refresh = max(0.05, settings.redis.presence_refresh)
        if self.presence_refresh >= self.presence_ttl:
            # Presence would expire between two refreshes: refresh three times per TTL instead.
            presence_log.warning(
                "PRESENCE_REFRESH (%gs) is not below PRESENCE_TTL (%ds); refreshing every %gs",
                self.presence_refresh,
                self.presence_ttl,
                self.presence_ttl / 3,
            )
            self.presence_refresh = self.presence_ttl / 3
        self.cache_ttl = settings.redis.presence_cache_ttl
        self.backoff_max = max(BACKOFF_BASE, settings.redis.redis_backoff_max)
        self._own = _head(self.node_id)
        self._presence_channel = f"{self.prefix}:presence".encode()
        self._direct_channel = self._direct_channel_of(self.node_id)
        self._alive_prefix = f"{self.prefix}:alive:"
        self._alive_key = self._alive_prefix + self.node_id
        # Local truth, kept through outages and re-asserted on reconnect.
        self._local: dict[Key, int] = {}
        self._dirty: dict[Key, None] = {}  # ordered set of keys whose presence must be written
        self._asserted: set[Key] = set()  # keys holding this node's field in Redis
        self._claims: dict[str, str] = {}  # claim key -> token this node holds
        # State of the current connection.
        self._subscribed: dict[bytes, Key] = {}
        self._sub_pending = 0
        self._sub_done: asyncio.Future[None] | None = None
        self._outbox: deque[_Out] = deque()
        self._outbox_bytes = 0
        self._cache: dict[Key, _Remote] = {}
        self._reads: dict[Key, asyncio.Task[_Remote]] = {}
        # Notices that arrived while a read of the same topic was in flight, applied on top of
        # its result (the read may predate them).
        self._patches: dict[Key, dict[str, int]] = {}
        self._sync_seq = 0
        self._sync_waiters: dict[str, asyncio.Future[None]] = {}
        self._refresh_due = False
        self._last_rx = 0.0
        self._connected = False
        self._closing = False
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pool: ConnectionPool | None = None
        self._sub_pool: ConnectionPool | None = None
        self._client: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self.dropped_publishes = 0
        self._drop_reported = False

    # --- lifecycle ---
    async def start(self) -> None:
        common: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),  # this class reconnects, with its own backoff
            "health_check_interval": 0,
            # RESP2: bus messages arrive as plain replies on the subscriber connection (with
            # RESP3, redis-py routes them to push handlers instead).
            "protocol": 2,
        }
        self._pool = ConnectionPool.from_url(self.url, socket_timeout=COMMAND_TIMEOUT, **common)
        # Dedicated connections (subscriber, writer) block on reads without a socket timeout;
        # liveness is checked by KEEPALIVE pings and per-batch timeouts instead.
        self._sub_pool = ConnectionPool.from_url(self.url, socket_timeout=None, **common)
        self._client = Redis(connection_pool=self._pool)
        for name, source in (
            ("claim", _CLAIM),
            ("renew", _RENEW),
            ("release", _RELEASE),
            ("read", _READ_PRESENCE),
        ):
            self._scripts[name] = self._client.register_script(source)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-backend")

    async def close(self) -> None:
        if self._closing:
            return
        if self._connected:
            # Flush what local peers published just before the stop.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sync(), 2.0)
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        was_connected = self._connected
        self._on_disconnect()
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None and was_connected:
            try:
                async with asyncio.timeout(2.0):
                    await self._remove_node()
                presence_log.info("removed this node's presence from Redis")
            except Exception as exc:
                presence_log.warning(
                    "could not remove this node's presence (%s); it expires within %ds",
                    _describe(exc),
                    self.presence_ttl,
                )
        if self._client is not None:
            await self._client.aclose()
        for pool in (self._pool, self._sub_pool):
            if pool is not None:
                await pool.disconnect()

    @property
    def ready(self) -> bool:
        return self._connected and not self._closing

    async def sync(self) -> None:
        """Flush this node's writes, then wait until its own reader has seen a marker sent
        after them: every presence notice other nodes published before that is applied here."""
        if not self._connected:
            raise BackendUnavailable(f"Redis at {self.safe_url} is not connected")
        loop = asyncio.get_running_loop()
        flushed: asyncio.Future[None] = loop.create_future()
        self._enqueue(_Out(None, b"", flushed))
        await flushed
        self._sync_seq += 1
        token = str(self._sync_seq)
        seen: asyncio.Future[None] = loop.create_future()
        self._sync_waiters[token] = seen
        data = self._own + _head(SYNC_KIND) + token.encode()
        self._enqueue(_Out(self._direct_channel, data))
        try:
            await seen
        finally:
            self._sync_waiters.pop(token, None)

    # --- topic fan-out and presence ---
    def local_count_changed(self, topic: str, count: int, namespace: str = TOPICS) -> None:
        key = (namespace, topic)
        if count > 0:
            self._local[key] = count
        else:
            self._local.pop(key, None)
            if key not in self._asserted and (
                topic_channel(self.prefix, namespace, topic) not in self._subscribed
            ):
                # Nothing of it reached Redis: nothing to undo. Keeps ``_dirty`` bounded by
                # the topics in use, also when peers churn through topics during an outage.
                self._dirty.pop(key, None)
                return
        self._dirty[key] = None
        self._wake.set()

    def topic_clients_nowait(
        self, topic: str, local_count: int, namespace: str = TOPICS
    ) -> int | None:
        entry = self._cache.get((namespace, topic))
        if entry is not None and entry.expires > time.monotonic():
            return local_count + entry.total
        if not self._connected:
            # Only this node's peers can be reached while Redis is away; count those.
            return local_count
        return None

    async def topic_clients(self, topic: str, local_count: int, namespace: str = TOPICS) -> int:
        known = self.topic_clients_nowait(topic, local_count, namespace)
        if known is not None:
            return known
        key = (namespace, topic)
        entry = self._cache.get(key)
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                entry = await self._read_presence(key)
        except Exception as exc:
            presence_log.warning("presence read failed (%s); using cached count", _describe(exc))
            return local_count + (entry.total if entry is not None else 0)
        return local_count + entry.total

    async def publish(self, topic: str, frame: bytes, namespace: str = TOPICS) -> None:
        if self.publish_nowait(topic, frame, namespace):
            return
        await self._drained.wait()
        if not self._connected:
            self._drop_publish()
            return
        self._enqueue_publish(topic, frame, namespace)

    def publish_nowait(self, topic: str, frame: bytes, namespace: str = TOPICS) -> bool:
        if not self._connected:
            self._drop_publish()
            return True
        if not self._drained.is_set():
            return False  # the outbox is full: the publisher waits for the writer
        self._enqueue_publish(topic, frame, namespace)
        return True

    def _enqueue_publish(self, topic: str, frame: bytes, namespace: str) -> None:
        channel = topic_channel(self.prefix, namespace, topic)
        # The origin envelope is added when the frame is sent (most are not: see the writer).
        self._enqueue(_Out(channel, frame, None, (namespace, topic)))

    # --- direct delivery ---
    async def send_direct(self, node_id: str, kind: str, payload: bytes) -> bool:
        loop = asyncio.get_running_loop()
        if node_id == self.node_id:
            self._spawn(self._deliver_direct(node_id, kind, payload))
            return True
        if not self._connected:
            return False
        if not self._drained.is_set():
            await self._drained.wait()
        future: asyncio.Future[bool] = loop.create_future()
        data = self._own + _head(kind) + payload
        self._enqueue(_Out(self._direct_channel_of(node_id), data, future))
        return await future

    # --- id claims ---
    async def claim(self, key: str, token: str, ttl: float) -> bool:
        ok = await self._script("claim", self._claim_key(key), token, self.node_id, _ms(ttl))
        if ok:
            self._claims[key] = token
        return bool(ok)

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        ok = await self._script("renew", self._claim_key(key), token, _ms(ttl))
        if not ok:
            self._claims.pop(key, None)
        return bool(ok)

    async def release(self, key: str, token: str) -> bool:
        ok = await self._script("release", self._claim_key(key), token, "")
        if self._claims.get(key) == token:
            del self._claims[key]
        return bool(ok)

    async def lookup(self, key: str) -> Claim | None:
        client = self._require_client()
        if not self._connected:
            raise BackendUnavailable(f"Redis at {self.safe_url} is not connected")
        try:
            node, token = await client.hmget(self._claim_key(key), ["node", "token"])
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis: {_describe(exc)}") from exc
        if node is None or token is None:
            return None
        return Claim(_text(node), _text(token))

    # --- names ---
    def _claim_key(self, key: str) -> str:
        return f"{self.prefix}:{redis_name('claim', key)}"

    def _direct_channel_of(self, node_id: str) -> bytes:
        return f"{self.prefix}:{redis_name('direct', node_id)}".encode()

    # --- connection supervision ---
    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._connected:
                    log.warning(
                        "lost %s (%s): serving local peers only until it returns",
                        self.safe_url,
                        _describe(exc),
                    )
                    attempt = 0
                self._on_disconnect()
                delay = min(self.backoff_max, BACKOFF_BASE * 2 ** min(attempt, 30))
                delay *= random.uniform(0.5, 1.0)
                level = logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG
                log.log(
                    level,
                    "cannot reach %s (%s); retry %d in %.1fs, /readyz is 503 meanwhile",
                    self.safe_url,
                    _describe(exc),
                    attempt + 1,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection epoch: connect, subscribe, assert presence, then serve until it fails."""
        assert self._pool is not None and self._sub_pool is not None
        sub: AbstractConnection = self._sub_pool.make_connection()  # type: ignore[no-untyped-call]
        writer: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await sub.connect()  # type: ignore[no-untyped-call]
                await writer.connect()  # type: ignore[no-untyped-call]
            async with asyncio.TaskGroup() as group:
                self._last_rx = time.monotonic()
                group.create_task(self._reader(sub), name="redis-reader")
                channels: list[tuple[bytes, Key | None]] = [
                    (self._presence_channel, None),
                    (self._direct_channel, None),
                ]
                channels += [(topic_channel(self.prefix, *k), k) for k in self._local]
                await self._subscribe(sub, channels)
                self._cache.clear()
                await self._assert_all(writer, announce=True)
                self._connected = True
                self._drop_reported = False
                self._became_ready()
                log.info(
                    "connected to %s (node %s, %d topics re-subscribed)",
                    self.safe_url,
                    self.node_id,
                    len(channels) - 2,
                )
                group.create_task(self._writer(writer, sub), name="redis-writer")
                group.create_task(self._keepalive(sub), name="redis-keepalive")
                group.create_task(self._refresher(), name="redis-presence")
        except BaseExceptionGroup as group_exc:
            # Report the first real failure, not the cancellations it caused.
            first = _first_error(group_exc)
            if first is None:
                raise
            raise first from None
        finally:
            for conn in (sub, writer):
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    def _on_disconnect(self) -> None:
        """Forget the connection's state; fail what waited on it; drop queued publishes."""
        self._connected = False
        self._subscribed.clear()
        self._cache.clear()
        self._sub_pending = 0
        if self._sub_done is not None and not self._sub_done.done():
            self._sub_done.set_exception(BackendUnavailable("Redis connection lost"))
            self._sub_done.exception()
        self._sub_done = None
        dropped = 0
        while self._outbox:
            item = self._outbox.popleft()
            if item.future is None:
                dropped += 1
            elif not item.future.done():
                if item.channel is None:
                    item.future.set_exception(BackendUnavailable("Redis connection lost"))
                    item.future.exception()
                else:
                    item.future.set_result(False)
        self._outbox_bytes = 0
        self._drained.set()
        for waiter in self._sync_waiters.values():
            if not waiter.done():
                waiter.set_exception(BackendUnavailable("Redis connection lost"))
                waiter.exception()
        self._sync_waiters.clear()
        self._patches.clear()
        if dropped:
            self.dropped_publishes += dropped
            publish_log.warning("%d queued cross-node publishes dropped: Redis lost", dropped)

    # --- tasks of one connection ---
    async def _reader(self, sub: AbstractConnection) -> None:
        """Read the subscriber connection: bus messages, subscribe confirmations, pongs."""
        read = sub.read_response
        while True:
            response = await read()
            self._last_rx = time.monotonic()
            if not isinstance(response, list) or len(response) < 2:
                continue
            kind = response[0]
            if kind == b"message" and len(response) == 3:
                try:
                    self._on_message(response[1], response[2])
                except (ValueError, TypeError, LookupError) as exc:
                    # Not from a polysignal node (or corrupted): drop it, keep reading.
                    log.warning("malformed bus message on %r dropped: %s", response[1], exc)
            elif kind == b"subscribe":
                self._sub_pending -= 1
                if self._sub_pending <= 0 and self._sub_done is not None:
                    if not self._sub_done.done():
                        self._sub_done.set_result(None)
                    self._sub_done = None

    async def _keepalive(self, sub: AbstractConnection) -> None:
        """Ping the subscriber connection; a silent one is dead (a half-open TCP connection)."""
        while True:
            await asyncio.sleep(KEEPALIVE)
            if time.monotonic() - self._last_rx > 3 * KEEPALIVE:
                raise TimeoutError(f"no reply from Redis for {3 * KEEPALIVE:g}s")
            await sub.send_command("PING", check_health=False)

    async def _refresher(self) -> None:
        """Every ``presence_refresh``: re-assert presence (writer) and sweep dead nodes' counts."""
        while True:
            await asyncio.sleep(self.presence_refresh)
            self._refresh_due = True
            self._wake.set()
            try:
                await self._sweep()
            except Exception as exc:
                presence_log.debug("sweep failed: %s", _describe(exc))

    async def _writer(self, writer: AbstractConnection, sub: AbstractConnection) -> None:
        """The one task writing to Redis: presence changes first, then outbox batches in order."""
        while True:
            if not (self._dirty or self._outbox or self._refresh_due):
                self._wake.clear()
                await self._wake.wait()
            if self._refresh_due:
                self._refresh_due = False
                await self._assert_all(writer, announce=False)
            if self._dirty:
                await self._write_presence(writer, sub)
            if self._outbox:
                await self._flush_outbox(writer)

    # --- writing ---
    def _enqueue(self, item: _Out) -> None:
        self._outbox.append(item)
        self._outbox_bytes += len(item.data)
        if len(self._outbox) >= OUTBOX_MAX_ITEMS or self._outbox_bytes >= OUTBOX_MAX_BYTES:
            self._drained.clear()
        self._wake.set()

    def _drop_publish(self) -> None:
        self.dropped_publishes += 1
        if not self._drop_reported:
            self._drop_reported = True
            publish_log.warning(
                "Redis unavailable: cross-node publishes are dropped until it returns "
                "(local delivery continues)"
            )

    async def _flush_outbox(self, writer: AbstractConnection) -> None:
        count = min(len(self._outbox), MAX_BATCH)
        items = [self._outbox.popleft() for _ in range(count)]
        # Decided here, not when ``publish`` was called: this task was woken by the publish, so
        # a reader woken by notice bytes that reached the process before the publish's frame
        # was scheduled ahead of it and has applied them.
        now = time.monotonic()
        sent = [i for i in items if i.channel is not None and not self._nobody_else(i.topic, now)]
        own = self._own
        commands = [
            ("PUBLISH", i.channel, i.data if i.topic is None else own + i.data) for i in sent
        ]
        replies = await _execute(writer, commands)
        self._outbox_bytes -= sum(len(i.data) for i in items)
        if not self._drained.is_set() and (
            len(self._outbox) < OUTBOX_MAX_ITEMS // 2 and self._outbox_bytes < OUTBOX_MAX_BYTES // 2
        ):
            self._drained.set()
        reply_of = {id(item): reply for item, reply in zip(sent, replies, strict=True)}
        for item in items:
            if item.future is None or item.future.done():
                continue
            if item.channel is None:
                item.future.set_result(None)
            else:
                # PUBLISH answers how many subscribers got it: 0 = the node is gone.
                reply = reply_of.get(id(item))
                item.future.set_result(isinstance(reply, int) and reply > 0)

    def _nobody_else(self, topic: Key | None, now: float) -> bool:
        """True when the cache knows, freshly, that no other node has subscribers of ``topic``:
        then a publish to it would only come back to this node, and is not sent."""
        if topic is None:
            return False
        entry = self._cache.get(topic)
        return entry is not None and entry.expires > now and not entry.counts

    async def _subscribe(
        self, sub: AbstractConnection, channels: Sequence[tuple[bytes, Key | None]]
    ) -> None:
        """SUBSCRIBE in batches and wait until Redis confirmed every channel."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(channels), MAX_BATCH):
            chunk = channels[start : start + MAX_BATCH]
            for channel, key in chunk:
                if key is not None:
                    self._subscribed[channel] = key
            done: asyncio.Future[None] = loop.create_future()
            self._sub_done = done
            self._sub_pending = len(chunk)
            await sub.send_command("SUBSCRIBE", *(c for c, _ in chunk), check_health=False)
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await done

    async def _write_presence(self, writer: AbstractConnection, sub: AbstractConnection) -> None:
        keys = list(self._dirty)
        self._dirty.clear()
        new = [
            (channel, key)
            for key in keys
            if key in self._local
            and (channel := topic_channel(self.prefix, *key)) not in self._subscribed
        ]
        if new:
            await self._subscribe(sub, new)
        commands: list[tuple[Any, ...]] = []
        for key in keys:
            count = self._local.get(key, 0)
            # The notice goes first: a node that can see the new hash has already been sent
            # the notice, so its cached count is not behind what a reader of Redis sees.
            if count > 0:
                if topic_channel(self.prefix, *key) not in self._subscribed:
                    self._dirty[key] = None  # became active during the await: next round
                    continue
                commands.append(("PUBLISH", self._presence_channel, self._notice(key, count)))
                commands += self._hset(key, count)
                self._asserted.add(key)
            elif key in self._asserted:
                commands.append(("PUBLISH", self._presence_channel, self._notice(key, count)))
                commands.append(("HDEL", presence_key(*key), self.node_id))
                self._asserted.discard(key)
        for start in range(0, len(commands), MAX_BATCH):
            self._check(await _execute(writer, commands[start : start + MAX_BATCH]))
        gone = []
        for key in keys:
            if key not in self._local:
                channel = topic_channel(self.prefix, *key)
                if self._subscribed.pop(channel, None) is not None:
                    gone.append(channel)
        for start in range(0, len(gone), MAX_BATCH):
            await sub.send_command("UNSUBSCRIBE", *gone[start : start + MAX_BATCH])

    async def _assert_all(self, writer: AbstractConnection, *, announce: bool) -> None:
        """Write this node's alive key and every local count (on connect, and as TTL refresh)."""
        commands: list[tuple[Any, ...]] = [("SET", self._alive_key, "1", "EX", self.presence_ttl)]
        for key, count in list(self._local.items()):
            if topic_channel(self.prefix, *key) not in self._subscribed:
                self._dirty[key] = None  # not subscribed yet: the writer handles it
                continue
            if announce:
                commands.append(("PUBLISH", self._presence_channel, self._notice(key, count)))
            commands += self._hset(key, count)
            self._asserted.add(key)
        for key in [k for k in self._asserted if k not in self._local and k not in self._dirty]:
            commands.append(("HDEL", presence_key(*key), self.node_id))
            self._asserted.discard(key)
        for start in range(0, len(commands), MAX_BATCH):
            self._check(await _execute(writer, commands[start : start + MAX_BATCH]))

    def _hset(self, key: Key, count: int) -> list[tuple[Any, ...]]:
        name = presence_key(*key)
        return [("HSET", name, self.node_id, count), ("EXPIRE", name, self.presence_ttl)]

    def _notice(self, key: Key, count: int) -> bytes:
        return orjson.dumps([self.node_id, key[0], key[1], count])

    @staticmethod
    def _check(replies: Iterable[Any]) -> None:
        for reply in replies:
            if isinstance(reply, ResponseError):
                # e.g. WRONGTYPE: something else owns a presence key's name.
                presence_log.warning("Redis refused a presence write: %s", reply)

    async def _remove_node(self) -> None:
        """At a graceful stop: HDEL every field of this node, drop its alive key and claims."""
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        for key in self._asserted | set(self._local):
            pipe.hdel(presence_key(*key), self.node_id)
        pipe.delete(self._alive_key)
        pipe.publish(self._presence_channel, orjson.dumps([self.node_id, None, None, 0]))
        for claim_key, token in self._claims.items():
            await self._scripts["release"](
                keys=[self._claim_key(claim_key)], args=[token, self.node_id], client=pipe
            )
        await pipe.execute()
        self._asserted.clear()
        self._claims.clear()

    # --- reading ---
    def _on_message(self, channel: bytes, data: bytes) -> None:
        key = self._subscribed.get(channel)
        if key is not None:
            if data.startswith(self._own):
                return  # our own publish, echoed because this node is subscribed too
            _, offset = _split_head(data)
            self._deliver_topic(key[0], key[1], data[offset:])
        elif channel == self._presence_channel:
            self._on_notice(data)
        elif channel == self._direct_channel:
            origin, offset = _split_head(data)
            kind, offset = _split_head(data, offset)
            if kind == SYNC_KIND and origin == self.node_id:
                waiter = self._sync_waiters.get(data[offset:].decode())
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                return
            self._spawn(self._deliver_direct(origin, kind, data[offset:]))
        # else: a late message for a channel just unsubscribed

    def _on_notice(self, data: bytes) -> None:
        origin, namespace, topic, count = orjson.loads(data)
        if origin == self.node_id or not isinstance(count, int):
            return
        if namespace is None:  # the node stopped: drop it everywhere
            for remote in self._cache.values():
                remote.counts.pop(origin, None)
            for pending in self._patches.values():
                pending[origin] = 0
            return
        key = (namespace, topic)
        patches = self._patches.get(key)
        if patches is not None:
            patches[origin] = count
        entry = self._cache.get(key)
        if entry is None:
            return
        if count > 0:
            entry.counts[origin] = count
        else:
            entry.counts.pop(origin, None)

    async def _read_presence(self, key: Key) -> _Remote:
        """Read one topic's counts and cache them; one read per topic in flight, and a caller
        that stops waiting (timeout) does not cancel it."""
        task = self._reads.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_presence(key))
            task.add_done_callback(_retrieve)
            self._reads[key] = task
            task.add_done_callback(lambda _: self._reads.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch_presence(self, key: Key) -> _Remote:
        self._patches.setdefault(key, {})
        try:
            raw = await self._scripts["read"](keys=[presence_key(*key)], args=[self._alive_prefix])
        except BaseException:
            self._patches.pop(key, None)
            raise
        return self._store(key, raw)

    async def _sweep(self) -> None:
        """Re-read this node's active topics: drops dead nodes' fields and refreshes the cache."""
        client = self._require_client()
        keys = list(self._local)
        for start in range(0, len(keys), 256):
            chunk = [k for k in keys[start : start + 256] if k not in self._patches]
            for key in chunk:
                self._patches[key] = {}
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                await self._scripts["read"](
                    keys=[presence_key(*key)], args=[self._alive_prefix], client=pipe
                )
            try:
                results = await pipe.execute()
            except BaseException:
                for key in chunk:
                    self._patches.pop(key, None)
                raise
            for key, raw in zip(chunk, results, strict=True):
                self._store(key, raw)

    def _store(self, key: Key, raw: list[bytes]) -> _Remote:
        counts: dict[str, int] = {}
        for i in range(0, len(raw) - 1, 2):
            node = raw[i].decode(errors="replace")
            if node == self.node_id:
                continue
            try:
                counts[node] = int(raw[i + 1])
            except ValueError:
                continue
        for node, count in self._patches.pop(key, {}).items():
            if count > 0:
                counts[node] = count
            else:
                counts.pop(node, None)
        entry = _Remote(counts, time.monotonic() + self.cache_ttl)
        if len(self._cache) >= CACHE_MAX and key not in self._cache:
            now = time.monotonic()
            for stale in [k for k, v in self._cache.items() if v.expires <= now]:
                del self._cache[stale]
            if len(self._cache) >= CACHE_MAX:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = entry
        return entry

    # --- helpers ---
    def _require_client(self) -> Redis:
        if self._client is None or self._closing:
            raise BackendUnavailable("the Redis backend is not running")
        return self._client

    async def _script(self, name: str, key: str, *args: Any) -> Any:
        self._require_client()
        if not self._connected:
            raise BackendUnavailable(f"Redis at {self.safe_url} is not connected")
        try:
            return await self._scripts[name](keys=[key], args=list(args))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis: {_describe(exc)}") from exc

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _execute(conn: AbstractConnection, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one write and read every reply (error replies returned, not raised)."""
    if not commands:
        return []
    replies: list[Any] = []
    async with asyncio.timeout(COMMAND_TIMEOUT):
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
    return replies


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (a read nobody else waited for)."""
    if not future.cancelled():
        future.exception()


def _first_error(group: BaseExceptionGroup[Any]) -> Exception | None:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, Exception):
            return exc
    return None


def _describe(exc: BaseException) -> str:
    """An exception as one log-safe phrase (redis-py messages carry host:port, never passwords)."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
