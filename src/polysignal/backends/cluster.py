"""The Cluster: every semantic of the cluster seam, once, over a Bus and a LeaseStore
(docs/architecture.md, "The cluster seam"; docs/redis.md for what it keeps in Redis).

Its decisions are made without I/O in ``core/``: presence and its cache in core/presence.py, the
envelope, the outbox and the reconnect schedule in core/bus.py, the claims it holds in
core/claims.py. This class carries them out: it owns the connection, the tasks, the waits and
the clock, and performs what their generators ask of the bus and the store (``_drive``).

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
import contextlib
import functools
import logging
import random
import time
from collections.abc import Generator
from typing import Any, TypeVar

from polysignal.backends.base import TOPICS, Backend, BackendUnavailable, Claim
from polysignal.backends.interfaces import Bus, LeaseStore, describe, first_error
from polysignal.backends.names import Names, presence_key, topic_channel
from polysignal.config import RedisSettings
from polysignal.core import claims, presence
from polysignal.core.bus import (
    MAX_BATCH,
    OUTBOX_MAX_ITEMS,
    Backoff,
    Envelope,
    LatencyHistogram,
    Outbox,
    Outgoing,
)
from polysignal.core.claims import ClaimLedger
from polysignal.core.effects import ReleaseOp
from polysignal.core.presence import Key, PresenceState, PresenceTiming, Remote, stopped_notice
from polysignal.drive import drive
from polysignal.logs import more

__all__ = ["MAX_BATCH", "OUTBOX_MAX_ITEMS", "SETTLE_MARGIN", "Cluster", "LatencyHistogram"]

presence_log = logging.getLogger("polysignal.presence")
publish_log = logging.getLogger("polysignal.publish")

STOP_TIMEOUT = 2.0
"""Seconds ``close`` spends flushing, and then removing this node's presence and claims."""
SETTLE_MARGIN = 0.5
"""Seconds added to the reconnect backoff's cap to make the settle grace: what a node needs,
once it tries again, to connect, re-subscribe and claim again what it held."""

Waiter = asyncio.Future[Any]
"""What an outbox entry's sender waits on."""
T = TypeVar("T")


class Cluster(Backend):
    """The cluster seam over ``bus`` and ``store``; see the module docstring."""

    def __init__(self, node_id: str, bus: Bus, store: LeaseStore, settings: RedisSettings) -> None:
        super().__init__(node_id)
        self.bus = bus
        self.store = store
        self.prefix = settings.signal_channel
        self.names = Names(self.prefix)
        self.log = logging.getLogger(f"polysignal.{bus.name.lower()}")
        timing = PresenceTiming.of(
            settings.presence_ttl,
            settings.presence_refresh,
            settings.presence_cache_ttl,
            lossless=bus.in_process,
        )
        if timing.adjusted:
            presence_log.warning(
                "PRESENCE_REFRESH (%gs) is not below PRESENCE_TTL (%ds); refreshing every %gs",
                timing.asked,
                timing.ttl,
                timing.refresh,
            )
        self.presence_ttl = timing.ttl
        self.presence_refresh = timing.refresh
        self.read_timeout = settings.redis_read_timeout
        self._backoff = Backoff(settings.redis_backoff_max, random.uniform)
        self.backoff_max = self._backoff.cap
        # Every node tries to reconnect at least every ``backoff_max``: within this grace after
        # the first node found the store empty, every node has claimed its leases again.
        self.settle_grace = self.backoff_max + SETTLE_MARGIN
        self._in_process = bus.in_process
        self._envelope = Envelope(node_id)
        self._presence_channel = self.names.presence_channel
        self._direct_channel = self.names.direct(self.node_id)
        # Local truth (kept through outages and re-asserted on reconnect), and the state of the
        # current connection: the channels subscribed, the cached counts of the other nodes.
        self._presence = PresenceState(
            node_id,
            channel_of=functools.partial(topic_channel, self.prefix),
            count_key=presence_key,
            cache_ttl=timing.cache_ttl,
        )
        self._subscribed = self._presence.channels  # the same dict, read per bus message
        self._claims = ClaimLedger(self.names.claim)
        self._rejoining = False  # connecting: this node's claims are not claimed again yet
        self._rejoined = asyncio.Event()  # set while not connecting
        self._rejoined.set()
        self._outbox: Outbox[Waiter] = Outbox(settings.redis_outbox_bytes, time.monotonic)
        self._reads: dict[Key, asyncio.Task[Remote]] = {}
        self._sync_seq = 0
        self._sync_waiters: dict[str, asyncio.Future[None]] = {}
        self._refresh_due = False
        self._connected = False
        self._closing = False
        self._up = asyncio.Event()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()  # cleared while the outbox is full
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # For ``/metrics`` (server/metrics.py), read at scrape time.
        self.connects = 0  # connections made to the bus; each after the first is a reconnect
        bus.listen(self._on_message)

    @property
    def publish_latency(self) -> LatencyHistogram:
        """From ``publish`` to its write's completion, sampled (``/metrics``)."""
        return self._outbox.latency

    @property
    def dropped_publishes(self) -> int:
        """Cross-node publishes dropped while the bus was away (``/metrics``)."""
        return self._outbox.dropped

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
        return len(self._outbox), self._outbox.size

    async def sync(self) -> None:
        """Flush this node's writes, then wait until its own reader has seen a marker sent
        after them: every presence notice other nodes published before that is applied here."""
        if not self._connected:
            raise BackendUnavailable(f"{self.bus.name} at {self.bus.where} is not connected")
        loop = asyncio.get_running_loop()
        flushed: asyncio.Future[None] = loop.create_future()
        self._enqueue(Outgoing(None, b"", flushed))
        await flushed
        self._sync_seq += 1
        token = str(self._sync_seq)
        seen: asyncio.Future[None] = loop.create_future()
        self._sync_waiters[token] = seen
        self._enqueue(Outgoing(self._direct_channel, self._envelope.sync_marker(token)))
        try:
            await seen
        finally:
            self._sync_waiters.pop(token, None)

    # --- topic fan-out and presence ---
    def local_count_changed(self, topic: str, count: int, namespace: str = TOPICS) -> None:
        if self._presence.set_local((namespace, topic), count):
            self._wake.set()

    def topic_clients_nowait(self, topic: str, local_count: int, namespace: str = TOPICS) -> int:
        if not self._connected:
            # Only this node's peers can be reached while the bus is away; count those.
            return local_count
        key = (namespace, topic)
        entry = self._presence.cache.get(key)
        if entry is None or entry.expires <= time.monotonic():
            entry = self._refresh(key, entry)
        return local_count + (entry.total if entry is not None else 0)

    async def topic_clients(self, topic: str, local_count: int, namespace: str = TOPICS) -> int:
        if not self._connected:
            return local_count
        key = (namespace, topic)
        entry = self._presence.cache.get(key)
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

    def _refresh(self, key: Key, entry: Remote | None) -> Remote | None:
        """Re-read ``key``'s counts for the next caller, without waiting (one read per topic in
        flight); an in-process store answers at once. The entry to use meanwhile."""
        if self._in_process:
            read = self.store.read_counts_nowait([presence_key(*key)])
            if read is not None:
                return self._presence.store(key, read[0], time.monotonic())
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
        if (
            self._in_process
            and self.bus.settled()
            and self._presence.nobody_else((namespace, topic), time.monotonic())
        ):
            # Nothing that reached this node is waiting to be applied, so the cache is as
            # current as it would be when the writer flushes: decide now, without queueing.
            return True
        if not self._drained.is_set():
            return False  # the outbox is full: the publisher waits for the writer
        self._enqueue_publish(topic, frame, namespace)
        return True

    def _enqueue_publish(self, topic: str, frame: bytes, namespace: str) -> None:
        channel = topic_channel(self.prefix, namespace, topic)
        if self._outbox.publish(channel, frame, (namespace, topic)):
            self._drained.clear()
        self._wake.set()

    # --- direct delivery ---
    async def send_direct(self, node_id: str, kind: str, payload: bytes) -> bool:
        if node_id == self.node_id:
            self._spawn(self._deliver_direct(node_id, kind, payload))
            return True
        if not self._connected:
            return False
        data = self._envelope.direct(kind, payload)
        if self._in_process and not (self._outbox or self._presence.dirty):
            # Nothing is queued ahead of it and an in-process bus publishes without waiting:
            # handing it over now keeps the outbox's order and spares the sender the writer's
            # turn.
            (received,) = await self.bus.publish([self.names.direct(node_id)], [data])
            return received > 0
        if not self._drained.is_set():
            await self._drained.wait()
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enqueue(Outgoing(self.names.direct(node_id), data, future))
        return await future

    # --- id claims ---
    async def claim(self, key: str, token: str, ttl: float) -> bool:
        if self._claims.is_new(key, token):
            await self._settled()  # a new claim: not before the other nodes had their turn
        ok = await self.store.claim(self.names.claim(key), token, self.node_id, ttl)
        if ok:
            self._claims.claimed(key, token, ttl)
        return ok

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        ok = await self.store.renew(self.names.claim(key), token, ttl)
        if not ok:
            self._claims.renew_failed(key)
        return ok

    async def release(self, key: str, token: str) -> bool:
        ours = self._claims.releasing(key, token)
        try:
            return await self.store.release(self.names.claim(key), token)
        except BackendUnavailable:
            if ours:
                # Not re-asserted when the store is back, but released then (if still ours).
                self._claims.release_failed(key, token)
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
            wait = self._claims.settle_wait(time.monotonic())
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _reassert_claims(self) -> int:
        """On connect, before anything else may claim: every claim this node held, claimed
        again with its token, and what it gave up meanwhile released (``ClaimLedger.rejoin``).
        A claim another holder has now stays theirs: its owner here is told
        (``on_claim_lost``). Answers how many claims were re-asserted."""
        rejoined = await self._drive(self._claims.rejoin())
        lost: list[tuple[str, str, Claim | None]] = rejoined.lost
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
        return rejoined.reclaimed

    # --- connection supervision ---
    async def _run(self) -> None:
        backoff = self._backoff
        backoff.reset()
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
                    backoff.reset()
                self._on_disconnect()
                with contextlib.suppress(Exception):
                    await self.bus.disconnect()
                retry = backoff.next()
                self.log.log(
                    logging.WARNING if retry.loud else logging.DEBUG,
                    "cannot reach %s (%s); retry %d in %.1fs, /readyz is 503 meanwhile",
                    self.bus.where,
                    describe(exc),
                    retry.number,
                    retry.delay,
                )
                await asyncio.sleep(retry.delay)

    async def _session(self) -> None:
        """One connection: connect, subscribe, settle, assert presence and claims, then serve
        until it fails."""
        self._rejoining = True
        self._rejoined.clear()
        await self.bus.connect()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.bus.serve(), name=f"{self.bus.name}-reader")
                topics = self._presence.connected()
                await self.bus.subscribe([self._presence_channel, self._direct_channel, *topics])
                self._presence.clear_cache()
                settling = await self.store.settle(self.settle_grace)
                self._claims.settling(time.monotonic(), settling)
                await self._sweep()  # the other nodes' counts, before this node announces its own
                await self._assert_all(announce=True)
                reclaimed = await self._reassert_claims()
                self._connected = True
                self.connects += 1
                self._rejoining = False
                self._rejoined.set()
                self._up.set()
                self._outbox.reconnected()
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
        self._presence.disconnected()
        lost = f"{self.bus.name} connection lost"
        dropped, waiting = self._outbox.clear()
        for waiter, marker in waiting:
            if waiter.done():
                continue
            if marker:
                waiter.set_exception(BackendUnavailable(lost))
                waiter.exception()
            else:
                waiter.set_result(False)
        self._drained.set()
        for seen in self._sync_waiters.values():
            if not seen.done():
                seen.set_exception(BackendUnavailable(lost))
                seen.exception()
        self._sync_waiters.clear()
        if dropped:
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
        presence = self._presence
        while True:
            if not (presence.dirty or self._outbox or self._refresh_due):
                self._wake.clear()
                await self._wake.wait()
            if self._refresh_due:
                self._refresh_due = False
                await self._assert_all(announce=False)
            if presence.dirty:
                await self._write_presence()
            if self._outbox:
                await self._flush_outbox()

    # --- writing ---
    def _enqueue(self, item: Outgoing[Waiter]) -> None:
        if self._outbox.put(item):
            self._drained.clear()
        self._wake.set()

    def _drop_publish(self) -> None:
        if self._outbox.drop():
            publish_log.warning(
                "%s unavailable: cross-node publishes are dropped until it returns "
                "(local delivery continues)",
                self.bus.name,
            )

    async def _flush_outbox(self) -> None:
        # Decided here, not when ``publish`` was called: this task was woken by the publish, so
        # a reader woken by notice bytes that reached the process before the publish's frame
        # was scheduled ahead of it and has applied them.
        batch = self._outbox.take(
            time.monotonic(), self._envelope.origin, self._presence.nobody_else
        )
        replies = await self.bus.publish(batch.channels, batch.payloads) if batch.channels else []
        answers = self._outbox.written(batch, replies)
        if not self._drained.is_set() and self._outbox.has_room:
            self._drained.set()
        for waiter, answer in answers:
            if not waiter.done():
                waiter.set_result(answer)

    async def _drive(self, steps: Generator[presence.Op | claims.Op, Any, T]) -> T:
        """Carry out what ``steps`` asks of the bus and the store, in order, sending each
        answer back (and each failure, which it raises again) until it has its result."""
        return await drive(steps, self._perform, BaseException)

    async def _perform(self, op: presence.Op | claims.Op) -> Any:
        match op:
            case presence.SubscribeOp(channels):
                await self.bus.subscribe(channels)
            case presence.UnsubscribeOp(channels):
                await self.bus.unsubscribe(channels)
            case presence.AnnounceOp(notices):
                await self._announce(notices)
            case presence.WriteCountsOp(counts):
                await self.store.set_counts(self.node_id, counts, self.presence_ttl)
            case presence.ReadCountsOp(names):
                return await self.store.read_counts(names), time.monotonic()
            case claims.ReclaimOp(held, releases):
                return await self.store.reclaim(held, releases, self.node_id)
            case ReleaseOp(name, token):
                return await self.store.release(name, token, self.node_id)
        return None

    async def _write_presence(self) -> None:
        await self._drive(self._presence.write())

    async def _assert_all(self, *, announce: bool) -> None:
        """Mark this node alive and write every local count (on connect, and as TTL refresh)."""
        await self._drive(self._presence.assert_all(announce=announce))

    async def _announce(self, notices: list[bytes]) -> None:
        if len(notices) <= MAX_BATCH:
            await self.bus.publish([self._presence_channel] * len(notices), notices)
            return
        for start in range(0, len(notices), MAX_BATCH):
            await self._announce(notices[start : start + MAX_BATCH])

    async def _remove_node(self) -> None:
        """At a graceful stop: remove this node's counts, alive mark and claims, and tell the
        other nodes that its counts are gone."""
        await self.store.remove_node(
            self.node_id, self._presence.node_keys(), self._claims.node_claims()
        )
        await self.bus.publish([self._presence_channel], [stopped_notice(self.node_id)])
        self._presence.removed()
        self._claims.removed()

    # --- reading ---
    def _on_message(self, channel: bytes, data: bytes) -> None:
        """The bus listener: frames, presence notices and direct messages from other nodes."""
        if self._closing:
            return
        try:
            key = self._subscribed.get(channel)
            if key is not None:
                frame = self._envelope.topic_frame(data)
                if frame is not None:  # else our own publish, echoed: this node subscribes too
                    self._deliver_topic(key[0], key[1], frame)
            elif channel == self._presence_channel:
                self._presence.on_notice(data)
            elif channel == self._direct_channel:
                self._on_direct(data)
            # else: a late message for a channel just unsubscribed
        except (ValueError, TypeError, LookupError) as exc:
            # Not from a polysignal node (or corrupted): drop it, keep reading.
            self.log.warning("malformed bus message on %r dropped: %s", channel, exc)

    def _on_direct(self, data: bytes) -> None:
        message = self._envelope.open_direct(data)
        token = self._envelope.sync_token(message)
        if token is not None:
            waiter = self._sync_waiters.get(token)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        rest = self._deliver_direct_now(message.origin, message.kind, message.payload)
        if rest is not None:
            self._spawn(rest)

    async def _read_presence(self, key: Key) -> Remote:
        """Read one topic's counts and cache them; one read per topic in flight, and a caller
        that stops waiting (timeout) does not cancel it."""
        return await asyncio.shield(self._start_read(key))

    def _start_read(self, key: Key) -> asyncio.Task[Remote]:
        """The read of ``key``'s counts in flight, started if there is none."""
        task = self._reads.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._drive(self._presence.read_one(key)))
            task.add_done_callback(self._read_done)
            self._reads[key] = task
            task.add_done_callback(lambda _: self._reads.pop(key, None))
        return task

    def _read_done(self, task: asyncio.Task[Remote]) -> None:
        """A read failed (also one nobody waits for): logged, at most once per interval."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._connected:
            self._read_failed(exc)

    async def _sweep(self) -> None:
        """Re-read this node's active topics: drops dead nodes' counts and refreshes the cache."""
        await self._drive(self._presence.read(list(self._presence.local)))

    # --- helpers ---
    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
