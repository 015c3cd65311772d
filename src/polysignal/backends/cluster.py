"""The Cluster: every semantic of the cluster seam, once, over a Bus and a LeaseStore
(docs/architecture.md, "The cluster seam"; docs/redis.md for what it keeps in Redis).

What goes where (``P`` = ``SIGNAL_CHANNEL``; every name comes from names.py):

* topic fan-out: channel ``P:t:{namespace}:{topic}``. A node is subscribed to it exactly while
  it has local subscribers of the topic (batched subscribes and unsubscribes), so a node receives
  only traffic for its own topics. A bus message is ``<origin envelope><frame>``; a node drops
  its own (a bus echoes a publisher that is subscribed too).
* presence: every node's count of a topic in the LeaseStore under ``presence_key`` (Flow-Like's
  ``topic:presence:{topic}`` for the topics namespace), written with the TTL ``presence_ttl`` and
  again every ``presence_refresh``, deleted at zero and at stop; the store reads only the counts
  of nodes still alive, so a killed node's counts vanish within the TTL.
* presence notices: channel ``P:presence``; every change of a node's count is announced there,
  and nodes patch their cached view of that topic.
* direct delivery: channel ``P:direct:{node}``; id claims: the LeaseStore's keys ``P:claim:{id}``.

Cost per publish: ``publish`` appends to a bounded outbox that one writer task flushes as one
Bus batch (one round trip per batch, not per message), and a frame that no other node can
receive (the cache knows no other node has subscribers) is not sent at all; ``topic_clients``
answers from a cache.
Staleness bound of ``clients``: a change on another node reaches the cache with its presence
notice (one hop); a cached count is re-read at most ``presence_cache_ttl`` after it was read,
which also bounds a missed notice; a killed node's counts are gone ``presence_ttl`` after its
last refresh (plus ``presence_cache_ttl``). While the bus is away ``clients`` is the local
count: those are the peers a publish can reach.

Ordering guarantee: a node subscribes to a topic's channel and waits for the confirmation before
it announces and writes its presence for that topic, so once presence is visible the node
receives every later publish. Faults: the node keeps serving local peers while the bus is away,
retries with capped, jittered backoff, and on reconnect re-subscribes, re-asserts presence,
claims again every claim it held (before it counts as ready) and re-reads its cache. Nothing
queues without bound meanwhile: publishes are dropped (counted, logged once per outage),
presence is state that is re-asserted, not a queue of changes. A publish never waits for the
bus: ``topic_clients_nowait`` answers the best known count and re-reads a stale one in the
background.

Claims after the store came back empty (docs/redis.md, "Faults"): the first node to connect
starts a settling window of ``settle_grace`` (the backoff's cap + ``SETTLE_MARGIN``) in the
store; until it is over, every node holds new claims and lookups (``_settled``), so each node,
reconnecting within its backoff, claims its own back first. A claim found taken then is lost
to its owner (``on_claim_lost``), never overwritten.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from polysignal.backends.base import TOPICS, Backend, BackendUnavailable, Claim
from polysignal.backends.interfaces import Bus, LeaseStore, describe, first_error
from polysignal.backends.names import Names, presence_key, topic_channel
from polysignal.config import RedisSettings
from polysignal.logs import more

presence_log = logging.getLogger("polysignal.presence")
publish_log = logging.getLogger("polysignal.publish")

BACKOFF_BASE = 0.2
"""Seconds before the first reconnect; doubles per attempt up to ``redis_backoff_max``."""
MAX_BATCH = 1024
"""Outbox entries per Bus batch written by the writer task."""
OUTBOX_MAX_ITEMS = 65536
"""Outbox high-water mark in entries (in bytes: ``redis_outbox_bytes``); above either,
publishers wait for the writer (backpressure)."""
CACHE_MAX = 65536
"""Most topics whose cluster-wide count is cached."""
SWEEP_BATCH = 256
"""Topics per presence read of the periodic sweep."""
STOP_TIMEOUT = 2.0
"""Seconds ``close`` spends flushing, and then removing this node's presence and claims."""
SYNC_KIND = "polysignal.sync"
"""Direct-message kind a node sends itself to learn that its reader caught up (``sync``)."""
SETTLE_MARGIN = 0.5
"""Seconds added to the reconnect backoff's cap to make the settle grace: what a node needs,
once it tries again, to connect, re-subscribe and claim again what it held."""

Key = tuple[str, str]
"""(namespace, topic)"""


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


@dataclass(slots=True)
class _Remote:
    """The other nodes' counts of one topic, as last read or patched by notices."""

    counts: dict[str, int] = field(default_factory=dict)
    expires: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


PUBLISH_SAMPLE = 16
"""One publish in this many is timed from ``publish`` to its write's completion (the publish
latency histogram of ``/metrics``): one clock read per sampled publish, none for the others."""

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5
)  # fmt: skip
"""Upper bounds, in seconds, of the publish latency histogram's buckets."""


class LatencyHistogram:
    """Durations counted in fixed buckets (``counts[i]``: at most ``bounds[i]``, the last one
    above every bound), their sum and count: what a Prometheus histogram exports, kept as plain
    numbers that ``/metrics`` reads at scrape time."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds
        self.count += 1


@dataclass(slots=True)
class _Out:
    """One outbox entry: a publish, or (channel None) a marker resolved when flushed.

    ``topic`` is set for topic publishes (``data`` is then the bare frame): the writer skips
    those that no other node can receive and prefixes the origin to the others.
    """

    channel: bytes | None
    data: bytes
    future: asyncio.Future[Any] | None = None
    topic: Key | None = None
    at: float = 0.0  # when a sampled publish was made (monotonic), else 0


class Cluster(Backend):
    """The cluster seam over ``bus`` and ``store``; see the module docstring."""

    def __init__(self, node_id: str, bus: Bus, store: LeaseStore, settings: RedisSettings) -> None:
        super().__init__(node_id)
        self.bus = bus
        self.store = store
        self.prefix = settings.signal_channel
        self.names = Names(self.prefix)
        self.log = logging.getLogger(f"polysignal.{bus.name.lower()}")
        self.presence_ttl = max(1, settings.presence_ttl)
        self.presence_refresh = max(0.05, settings.presence_refresh)
        if self.presence_refresh >= self.presence_ttl:
            # Presence would expire between two refreshes: refresh three times per TTL instead.
            presence_log.warning(
                "PRESENCE_REFRESH (%gs) is not below PRESENCE_TTL (%ds); refreshing every %gs",
                self.presence_refresh,
                self.presence_ttl,
                self.presence_ttl / 3,
            )
            self.presence_refresh = self.presence_ttl / 3
        # The cache TTL bounds how long a missed notice can go unnoticed; an in-process bus
        # misses none, so its cache is re-read only by the sweep.
        self.cache_ttl = math.inf if bus.in_process else settings.presence_cache_ttl
        self.read_timeout = settings.redis_read_timeout
        self.backoff_max = max(BACKOFF_BASE, settings.redis_backoff_max)
        # Every node tries to reconnect at least every ``backoff_max``: within this grace after
        # the first node found the store empty, every node has claimed its leases again.
        self.settle_grace = self.backoff_max + SETTLE_MARGIN
        self.outbox_max_bytes = max(1, settings.redis_outbox_bytes)
        self._in_process = bus.in_process
        self._own = _head(self.node_id)
        self._own_notice = orjson.dumps([self.node_id])[:-1] + b","
        self._presence_channel = self.names.presence_channel
        self._direct_channel = self.names.direct(self.node_id)
        # Local truth, kept through outages and re-asserted on reconnect.
        self._local: dict[Key, int] = {}
        self._dirty: dict[Key, None] = {}  # ordered set of keys whose presence must be written
        self._asserted: set[Key] = set()  # keys holding this node's count in the store
        self._claims: dict[str, tuple[str, float]] = {}  # claim key -> (token, ttl) held here
        # Claims given up while the store was away, released when it is back (if still ours).
        self._unreleased: dict[str, str] = {}
        self._settle_until = 0.0  # until then new claims and lookups wait (``_settled``)
        self._rejoining = False  # connecting: this node's claims are not claimed again yet
        self._rejoined = asyncio.Event()  # set while not connecting
        self._rejoined.set()
        # State of the current connection.
        self._subscribed: dict[bytes, Key] = {}
        self._outbox: deque[_Out] = deque()
        self._outbox_bytes = 0
        self._cache: dict[Key, _Remote] = {}
        self._reads: dict[Key, asyncio.Task[_Remote]] = {}
        # Notices that arrived while a read of the same topic was in flight, applied on top of
        # its result (the read may predate them).
        self._patches: dict[Key, dict[str, int]] = {}
        # Notices about a local topic whose counts were not read yet, applied to its first read.
        self._early: dict[Key, dict[str, int]] = {}
        self._sync_seq = 0
        self._sync_waiters: dict[str, asyncio.Future[None]] = {}
        self._refresh_due = False
        self._connected = False
        self._closing = False
        self._up = asyncio.Event()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dropped_publishes = 0
        # For ``/metrics`` (server/metrics.py), read at scrape time.
        self.connects = 0  # connections made to the bus; each after the first is a reconnect
        self.publish_latency = LatencyHistogram()
        self._publish_seq = 0
        self._drop_reported = False
        bus.listen(self._on_message)

    # --- lifecycle ---
    async def start(self) -> None:
        if self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"cluster-{self.bus.name}")
        if self._in_process:
            # It connects at once and is never lost: ready when start returns.
            up = loop.create_task(self._up.wait())
            await asyncio.wait((up, self._task), return_when=asyncio.FIRST_COMPLETED)
            up.cancel()

    async def close(self) -> None:
        if self._closing:
            return
        if self._connected:
            # Flush what local peers published just before the stop.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.sync(), STOP_TIMEOUT)
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # Bounded: a client library that swallowed the cancellation must not hold the stop.
            done, _ = await asyncio.wait((self._task,), timeout=STOP_TIMEOUT)
            if not done:
                self.log.warning(
                    "the %s connection did not stop within %gs", self.bus.name, STOP_TIMEOUT
                )
        was_connected = self._connected
        self._on_disconnect()
        for task in list(self._tasks):
            task.cancel()
        if was_connected:
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._remove_node()
                presence_log.log(
                    logging.DEBUG if self._in_process else logging.INFO,
                    "removed this node's presence from %s",
                    self.bus.name,
                )
            except Exception as exc:
                presence_log.warning(
                    "could not remove this node's presence (%s); it expires within %ds",
                    describe(exc),
                    self.presence_ttl,
                )
        with contextlib.suppress(Exception):
            await self.bus.disconnect()
        with contextlib.suppress(Exception):
            await self.store.close()

    @property
    def ready(self) -> bool:
        return self._connected and not self._closing

    def outbox(self) -> tuple[int, int]:
        """Entries and bytes waiting in the outbox for the writer (``/metrics``)."""
        return len(self._outbox), self._outbox_bytes

    async def sync(self) -> None:
        """Flush this node's writes, then wait until its own reader has seen a marker sent
        after them: every presence notice other nodes published before that is applied here."""
        if not self._connected:
            raise BackendUnavailable(f"{self.bus.name} at {self.bus.where} is not connected")
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
            self._early.pop(key, None)
            if key not in self._asserted and (
                topic_channel(self.prefix, namespace, topic) not in self._subscribed
            ):
                # Nothing of it reached the bus or the store: nothing to undo. Keeps ``_dirty``
                # bounded by the topics in use, also when peers churn through topics during an
                # outage.
                self._dirty.pop(key, None)
                return
        self._dirty[key] = None
        self._wake.set()

    def topic_clients_nowait(self, topic: str, local_count: int, namespace: str = TOPICS) -> int:
        if not self._connected:
            # Only this node's peers can be reached while the bus is away; count those.
            return local_count
        key = (namespace, topic)
        entry = self._cache.get(key)
        if entry is None or entry.expires <= time.monotonic():
            entry = self._refresh(key, entry)
        return local_count + (entry.total if entry is not None else 0)

    async def topic_clients(self, topic: str, local_count: int, namespace: str = TOPICS) -> int:
        if not self._connected:
            return local_count
        key = (namespace, topic)
        entry = self._cache.get(key)
        if entry is not None and entry.expires > time.monotonic():
            return local_count + entry.total
        try:
            async with asyncio.timeout(self.read_timeout):
                entry = await self._read_presence(key)
        except TimeoutError as exc:
            self._read_failed(exc)  # still running: the next caller may find it done
        except Exception:
            pass  # the read failed: logged as it did (``_read_done``)
        return local_count + (entry.total if entry is not None else 0)

    def _refresh(self, key: Key, entry: _Remote | None) -> _Remote | None:
        """Re-read ``key``'s counts for the next caller, without waiting (one read per topic in
        flight); an in-process store answers at once. The entry to use meanwhile."""
        if self._in_process:
            read = self.store.read_counts_nowait([presence_key(*key)])
            if read is not None:
                return self._store(key, read[0])
        self._start_read(key)
        return entry

    def _read_failed(self, exc: BaseException) -> None:
        held = self._throttle.allow("presence read")
        if held is not None:
            presence_log.warning(
                "presence read failed (%s); using the cached count%s", describe(exc), more(held)
            )

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
        if self._in_process and self.bus.settled():
            # Nothing that reached this node is waiting to be applied, so the cache is as
            # current as it would be when the writer flushes: decide now, without queueing.
            entry = self._cache.get((namespace, topic))
            if entry is not None and not entry.counts and entry.expires > time.monotonic():
                return True
        if not self._drained.is_set():
            return False  # the outbox is full: the publisher waits for the writer
        self._enqueue_publish(topic, frame, namespace)
        return True

    def _enqueue_publish(self, topic: str, frame: bytes, namespace: str) -> None:
        channel = topic_channel(self.prefix, namespace, topic)
        seq = self._publish_seq = self._publish_seq + 1
        at = time.monotonic() if seq % PUBLISH_SAMPLE == 0 else 0.0
        # The origin envelope is added when the frame is sent (most are not: see the writer).
        self._enqueue(_Out(channel, frame, None, (namespace, topic), at))

    # --- direct delivery ---
    async def send_direct(self, node_id: str, kind: str, payload: bytes) -> bool:
        if node_id == self.node_id:
            self._spawn(self._deliver_direct(node_id, kind, payload))
            return True
        if not self._connected:
            return False
        data = self._own + _head(kind) + payload
        if self._in_process and not (self._outbox or self._dirty):
            # Nothing is queued ahead of it and an in-process bus publishes without waiting:
            # handing it over now keeps the outbox's order and spares the sender the writer's
            # turn.
            (received,) = await self.bus.publish([self.names.direct(node_id)], [data])
            return received > 0
        if not self._drained.is_set():
            await self._drained.wait()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enqueue(_Out(self.names.direct(node_id), data, future))
        return await future

    # --- id claims ---
    async def claim(self, key: str, token: str, ttl: float) -> bool:
        held = self._claims.get(key)
        if held is None or held[0] != token:
            await self._settled()  # a new claim: not before the other nodes had their turn
        ok = await self.store.claim(self.names.claim(key), token, self.node_id, ttl)
        if ok:
            self._claims[key] = (token, ttl)
            self._unreleased.pop(key, None)
        return ok

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        ok = await self.store.renew(self.names.claim(key), token, ttl)
        if not ok:
            self._claims.pop(key, None)
        return ok

    async def release(self, key: str, token: str) -> bool:
        held = self._claims.get(key)
        ours = held is not None and held[0] == token
        if ours:
            del self._claims[key]
        try:
            return await self.store.release(self.names.claim(key), token)
        except BackendUnavailable:
            if ours:
                # Not re-asserted when the store is back, but released then (if still ours).
                self._unreleased[key] = token
            raise

    async def lookup(self, key: str) -> Claim | None:
        await self._settled()
        return await self.store.lookup(self.names.claim(key))

    async def claimed(self, prefix: str, limit: int) -> list[str]:
        await self._settled()
        base = len(self.names.claim(""))
        return [key[base:] for key in await self.store.claimed(self.names.claim(prefix), limit)]

    async def _settled(self) -> None:
        """Wait while the store settles: it came back empty, and until ``settle_grace`` after
        the first node noticed, only the claims the nodes held before are claimed (each node's
        own, as it reconnects), so none of them can be taken by a new claim, nor looked up as
        missing. While this node is connecting (its own claims are not claimed again yet) it
        waits for that, at most ``settle_grace``, and raises BackendUnavailable if it did not
        succeed by then; while it is not connected at all, the store answers."""
        while True:
            if self._rejoining:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settle_grace):
                        await self._rejoined.wait()
                if not self._connected:
                    raise BackendUnavailable(f"{self.bus.name} at {self.bus.where} is connecting")
                continue
            wait = self._settle_until - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _reassert_claims(self) -> int:
        """On connect, before anything else may claim: every claim this node held, claimed
        again with its token, and what it gave up meanwhile released. A claim another holder
        has now stays theirs: its owner here is told (``on_claim_lost``). Answers how many
        claims were re-asserted."""
        if not self._claims and not self._unreleased:
            return 0
        held = dict(self._claims)
        name = self.names.claim
        releases = {name(key): token for key, token in self._unreleased.items()}
        self._unreleased.clear()
        taken = await self.store.reclaim(
            {name(key): claim for key, claim in held.items()}, releases, self.node_id
        )
        reclaimed = 0
        lost: list[tuple[str, str, Claim | None]] = []
        for key, (token, _) in held.items():
            current = self._claims.get(key)
            if current is None or current[0] != token:
                if name(key) not in taken:  # released while this batch was on its way
                    try:
                        await self.store.release(name(key), token, self.node_id)
                    except BackendUnavailable:
                        self._unreleased[key] = token
                        raise
            elif name(key) in taken:
                del self._claims[key]
                lost.append((key, token, taken[name(key)]))
            else:
                reclaimed += 1
        if lost:
            key, _, holder = lost[0]
            self.log.warning(
                "%d claims were held by another holder when %s came back (e.g. %s, by %s); "
                "given up, their owners here are told",
                len(lost),
                self.bus.name,
                key,
                "nobody" if holder is None else f"node {holder.node_id}",
            )
        for key, token, holder in lost:
            self._claim_lost(key, token, holder)
        return reclaimed

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
                    self.log.warning(
                        "lost %s (%s): serving local peers only until it returns",
                        self.bus.where,
                        describe(exc),
                    )
                    attempt = 0
                self._on_disconnect()
                with contextlib.suppress(Exception):
                    await self.bus.disconnect()
                delay = min(self.backoff_max, BACKOFF_BASE * 2 ** min(attempt, 30))
                delay *= random.uniform(0.5, 1.0)
                level = logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG
                self.log.log(
                    level,
                    "cannot reach %s (%s); retry %d in %.1fs, /readyz is 503 meanwhile",
                    self.bus.where,
                    describe(exc),
                    attempt + 1,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection: connect, subscribe, settle, assert presence and claims, then serve
        until it fails."""
        self._rejoining = True
        self._rejoined.clear()
        await self.bus.connect()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.bus.serve(), name=f"{self.bus.name}-reader")
                topics = [(topic_channel(self.prefix, *key), key) for key in self._local]
                self._subscribed.update(topics)
                await self.bus.subscribe(
                    [self._presence_channel, self._direct_channel, *(c for c, _ in topics)]
                )
                self._cache.clear()
                settling = await self.store.settle(self.settle_grace)
                self._settle_until = time.monotonic() + settling
                await self._sweep()  # the other nodes' counts, before this node announces its own
                await self._assert_all(announce=True)
                reclaimed = await self._reassert_claims()
                self._connected = True
                self.connects += 1
                self._rejoining = False
                self._rejoined.set()
                self._up.set()
                self._drop_reported = False
                self._became_ready()
                self.log.log(
                    logging.DEBUG if self._in_process else logging.INFO,
                    "connected to %s (node %s, %d topics re-subscribed, %d claims re-asserted)%s",
                    self.bus.where,
                    self.node_id,
                    len(topics),
                    reclaimed,
                    f"; new claims wait {settling:.2f}s while every node re-asserts its own"
                    if settling > 0
                    else "",
                )
                group.create_task(self._writer(), name=f"{self.bus.name}-writer")
                group.create_task(self._refresher(), name=f"{self.bus.name}-presence")
        except BaseExceptionGroup as group_exc:
            # Report the first real failure, not the cancellations it caused.
            first = first_error(group_exc)
            if first is None:
                raise
            raise first from None

    def _on_disconnect(self) -> None:
        """Forget the connection's state; fail what waited on it; drop queued publishes."""
        self._connected = False
        self._rejoining = False
        self._rejoined.set()
        self._up.clear()
        self._subscribed.clear()
        self._cache.clear()
        lost = f"{self.bus.name} connection lost"
        dropped = 0
        while self._outbox:
            item = self._outbox.popleft()
            if item.future is None:
                dropped += 1
            elif not item.future.done():
                if item.channel is None:
                    item.future.set_exception(BackendUnavailable(lost))
                    item.future.exception()
                else:
                    item.future.set_result(False)
        self._outbox_bytes = 0
        self._drained.set()
        for waiter in self._sync_waiters.values():
            if not waiter.done():
                waiter.set_exception(BackendUnavailable(lost))
                waiter.exception()
        self._sync_waiters.clear()
        self._patches.clear()
        self._early.clear()
        if dropped:
            self.dropped_publishes += dropped
            publish_log.warning(
                "%d queued cross-node publishes dropped: %s lost", dropped, self.bus.name
            )

    # --- tasks of one connection ---
    async def _refresher(self) -> None:
        """Every ``presence_refresh``: re-assert presence (writer) and sweep dead nodes' counts."""
        while True:
            await asyncio.sleep(self.presence_refresh)
            self._refresh_due = True
            self._wake.set()
            try:
                await self._sweep()
            except Exception as exc:
                presence_log.debug("sweep failed: %s", describe(exc))

    async def _writer(self) -> None:
        """The one task writing to the bus and the store: presence changes first, then outbox
        batches in order."""
        while True:
            if not (self._dirty or self._outbox or self._refresh_due):
                self._wake.clear()
                await self._wake.wait()
            if self._refresh_due:
                self._refresh_due = False
                await self._assert_all(announce=False)
            if self._dirty:
                await self._write_presence()
            if self._outbox:
                await self._flush_outbox()

    # --- writing ---
    def _enqueue(self, item: _Out) -> None:
        self._outbox.append(item)
        self._outbox_bytes += len(item.data)
        if len(self._outbox) >= OUTBOX_MAX_ITEMS or self._outbox_bytes >= self.outbox_max_bytes:
            self._drained.clear()
        self._wake.set()

    def _drop_publish(self) -> None:
        self.dropped_publishes += 1
        if not self._drop_reported:
            self._drop_reported = True
            publish_log.warning(
                "%s unavailable: cross-node publishes are dropped until it returns "
                "(local delivery continues)",
                self.bus.name,
            )

    async def _flush_outbox(self) -> None:
        count = min(len(self._outbox), MAX_BATCH)
        items = [self._outbox.popleft() for _ in range(count)]
        # Decided here, not when ``publish`` was called: this task was woken by the publish, so
        # a reader woken by notice bytes that reached the process before the publish's frame
        # was scheduled ahead of it and has applied them.
        now = time.monotonic()
        own = self._own
        sent: list[_Out] = []
        channels: list[bytes] = []
        payloads: list[bytes] = []
        for item in items:
            if item.channel is None or self._nobody_else(item.topic, now):
                continue
            sent.append(item)
            channels.append(item.channel)
            payloads.append(item.data if item.topic is None else own + item.data)
        replies = await self.bus.publish(channels, payloads) if sent else []
        done = 0.0
        for item in sent:
            if item.at:
                done = done or time.monotonic()
                self.publish_latency.observe(done - item.at)
        self._outbox_bytes -= sum(len(i.data) for i in items)
        if not self._drained.is_set() and (
            len(self._outbox) < OUTBOX_MAX_ITEMS // 2
            and self._outbox_bytes < self.outbox_max_bytes // 2
        ):
            self._drained.set()
        reply_of = {id(item): reply for item, reply in zip(sent, replies, strict=True)}
        for item in items:
            if item.future is None or item.future.done():
                continue
            if item.channel is None:
                item.future.set_result(None)
            else:
                # The bus answers how many subscribers got it: 0 = the node is gone.
                item.future.set_result(reply_of.get(id(item), 0) > 0)

    def _nobody_else(self, topic: Key | None, now: float) -> bool:
        """True when the cache knows, freshly, that no other node has subscribers of ``topic``:
        then a publish to it would only come back to this node, and is not sent."""
        if topic is None:
            return False
        entry = self._cache.get(topic)
        return entry is not None and entry.expires > now and not entry.counts

    async def _write_presence(self) -> None:
        keys = list(self._dirty)
        self._dirty.clear()
        local, subscribed = self._local, self._subscribed
        channels = [topic_channel(self.prefix, *key) for key in keys]
        new: list[bytes] = []
        for key, channel in zip(keys, channels, strict=True):
            if key in local and channel not in subscribed:
                subscribed[channel] = key
                new.append(channel)
        if new:
            await self.bus.subscribe(new)
            # The other nodes' counts, read before this node's count is announced: by the time
            # another node (or a client) can see this node's presence, a publish here counts
            # theirs without waiting (notices from now on are applied on top of the read).
            fresh = [key for key in map(subscribed.get, new) if key and key not in self._cache]
            await self._read_counts(fresh)
        notices: list[bytes] = []
        counts: dict[str, int] = {}
        for key, channel in zip(keys, channels, strict=True):
            count = local.get(key, 0)
            if count > 0:
                if channel not in subscribed:
                    self._dirty[key] = None  # became active during the await: next round
                    continue
                notices.append(self._notice(key, count))
                counts[presence_key(*key)] = count
                self._asserted.add(key)
            elif key in self._asserted:
                notices.append(self._notice(key, 0))
                counts[presence_key(*key)] = 0
                self._asserted.discard(key)
        # The notices go first: a node that can see the new counts has already been sent the
        # notices, so its cached count is not behind what a reader of the store sees.
        if notices:
            await self._announce(notices)
        if counts:
            await self.store.set_counts(self.node_id, counts, self.presence_ttl)
        gone = [
            channel
            for key, channel in zip(keys, channels, strict=True)
            if key not in local and subscribed.pop(channel, None) is not None
        ]
        if gone:
            await self.bus.unsubscribe(gone)

    async def _assert_all(self, *, announce: bool) -> None:
        """Mark this node alive and write every local count (on connect, and as TTL refresh)."""
        notices: list[bytes] = []
        counts: dict[str, int] = {}
        for key, count in list(self._local.items()):
            if topic_channel(self.prefix, *key) not in self._subscribed:
                self._dirty[key] = None  # not subscribed yet: the writer handles it
                continue
            if announce:
                notices.append(self._notice(key, count))
            counts[presence_key(*key)] = count
            self._asserted.add(key)
        for key in [k for k in self._asserted if k not in self._local and k not in self._dirty]:
            counts[presence_key(*key)] = 0
            self._asserted.discard(key)
        await self._announce(notices)
        await self.store.set_counts(self.node_id, counts, self.presence_ttl)

    async def _announce(self, notices: list[bytes]) -> None:
        if len(notices) <= MAX_BATCH:
            await self.bus.publish([self._presence_channel] * len(notices), notices)
            return
        for start in range(0, len(notices), MAX_BATCH):
            await self._announce(notices[start : start + MAX_BATCH])

    def _notice(self, key: Key, count: int) -> bytes:
        return orjson.dumps([self.node_id, key[0], key[1], count])

    async def _remove_node(self) -> None:
        """At a graceful stop: remove this node's counts, alive mark and claims, and tell the
        other nodes that its counts are gone."""
        keys = [presence_key(*key) for key in self._asserted | set(self._local)]
        claims = {self.names.claim(key): token for key, token in self._unreleased.items()}
        claims.update({self.names.claim(key): token for key, (token, _) in self._claims.items()})
        await self.store.remove_node(self.node_id, keys, claims)
        notice = orjson.dumps([self.node_id, None, None, 0])
        await self.bus.publish([self._presence_channel], [notice])
        self._asserted.clear()
        self._claims.clear()
        self._unreleased.clear()

    # --- reading ---
    def _on_message(self, channel: bytes, data: bytes) -> None:
        """The bus listener: frames, presence notices and direct messages from other nodes."""
        if self._closing:
            return
        try:
            key = self._subscribed.get(channel)
            if key is not None:
                if data.startswith(self._own):
                    return  # our own publish, echoed because this node is subscribed too
                _, offset = _split_head(data)
                self._deliver_topic(key[0], key[1], data[offset:])
            elif channel == self._presence_channel:
                if not data.startswith(self._own_notice):  # ours, echoed: nothing to learn
                    self._on_notice(data)
            elif channel == self._direct_channel:
                origin, offset = _split_head(data)
                kind, offset = _split_head(data, offset)
                if kind == SYNC_KIND and origin == self.node_id:
                    waiter = self._sync_waiters.get(data[offset:].decode())
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                    return
                rest = self._deliver_direct_now(origin, kind, data[offset:])
                if rest is not None:
                    self._spawn(rest)
            # else: a late message for a channel just unsubscribed
        except (ValueError, TypeError, LookupError) as exc:
            # Not from a polysignal node (or corrupted): drop it, keep reading.
            self.log.warning("malformed bus message on %r dropped: %s", channel, exc)

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
            if patches is None and key in self._local:
                # Not read yet (its read starts once this node's subscribe is confirmed): the
                # read may predate this notice's count, which is then applied on top of it.
                self._early.setdefault(key, {})[origin] = count
            return
        if count > 0:
            entry.counts[origin] = count
        else:
            entry.counts.pop(origin, None)

    async def _read_presence(self, key: Key) -> _Remote:
        """Read one topic's counts and cache them; one read per topic in flight, and a caller
        that stops waiting (timeout) does not cancel it."""
        return await asyncio.shield(self._start_read(key))

    def _start_read(self, key: Key) -> asyncio.Task[_Remote]:
        """The read of ``key``'s counts in flight, started if there is none."""
        task = self._reads.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_presence(key))
            task.add_done_callback(self._read_done)
            self._reads[key] = task
            task.add_done_callback(lambda _: self._reads.pop(key, None))
        return task

    def _read_done(self, task: asyncio.Task[_Remote]) -> None:
        """A read failed (also one nobody waits for): logged, at most once per interval."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._connected:
            self._read_failed(exc)

    async def _fetch_presence(self, key: Key) -> _Remote:
        self._patches.setdefault(key, {}).update(self._early.pop(key, {}))
        try:
            (counts,) = await self.store.read_counts([presence_key(*key)])
        except BaseException:
            self._patches.pop(key, None)
            raise
        return self._store(key, counts)

    async def _sweep(self) -> None:
        """Re-read this node's active topics: drops dead nodes' counts and refreshes the cache."""
        await self._read_counts(list(self._local))

    async def _read_counts(self, keys: list[Key]) -> None:
        """Read and cache the other nodes' counts of ``keys``, a batch per ``SWEEP_BATCH``
        (those with a read in flight are left to it); notices that arrive meanwhile, or arrived
        before for a topic not read yet, are applied on top."""
        for start in range(0, len(keys), SWEEP_BATCH):
            chunk = [k for k in keys[start : start + SWEEP_BATCH] if k not in self._patches]
            if not chunk:
                continue
            for key in chunk:
                self._patches[key] = self._early.pop(key, {})
            try:
                results = await self.store.read_counts([presence_key(*key) for key in chunk])
            except BaseException:
                for key in chunk:
                    self._patches.pop(key, None)
                raise
            for key, counts in zip(chunk, results, strict=True):
                self._store(key, counts)

    def _store(self, key: Key, read: dict[str, int]) -> _Remote:
        counts = {node: count for node, count in read.items() if node != self.node_id}
        notices = self._patches.pop(key, {})
        early = self._early.pop(key, None)  # a read that started without them (in-process)
        if early:
            notices = {**early, **notices}
        for node, count in notices.items():
            if count > 0:
                counts[node] = count
            else:
                counts.pop(node, None)
        now = time.monotonic()
        entry = _Remote(counts, now + self.cache_ttl)
        if len(self._cache) >= CACHE_MAX and key not in self._cache:
            for stale in [k for k, v in self._cache.items() if v.expires <= now]:
                del self._cache[stale]
            if len(self._cache) >= CACHE_MAX:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = entry
        return entry

    # --- helpers ---
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
