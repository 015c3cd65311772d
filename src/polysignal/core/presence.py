"""Presence without I/O: this node's subscriber counts of its topics, what of them the bus and
the store still have to learn, and the cached view of the other nodes' counts (docs/redis.md,
"Delivery"; docs/architecture.md, "The cluster seam").

``backends/cluster.py`` carries it out: the writes and reads are generators that yield what
they ask of the bus and the store (``Op``), in the order it must happen, and are sent each
answer; the Cluster also feeds in what the other nodes announce. Time is passed in (``now``,
monotonic seconds); nothing here waits or reads a clock.

Ordering: a node subscribes to a topic's channel, and reads the other nodes' counts of it,
before it announces its own count, so once its presence is visible it receives every later
publish, and counts the others' without waiting. The notices go before the counts.

Staleness of a cached count: a change on another node arrives with its notice (one hop); a
count is re-read once it is ``cache_ttl`` old, which also bounds a missed notice. A read and the
notices that cross it: the notices that arrive while a topic's read is in flight (``patches``),
or for a local topic before its first read (``early``), are applied on top of the read, which
may predate them.

A presence notice is JSON ``[node, namespace, topic, count]``, or ``[node, null, null, 0]``
when a node stops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

Key = tuple[str, str]
"""(namespace, topic)"""

CACHE_MAX = 65536
"""Most topics whose cluster-wide count is cached."""
SWEEP_BATCH = 256
"""Topics per presence read of the periodic sweep."""
MIN_TTL = 1
"""Seconds: the shortest presence TTL."""
MIN_REFRESH = 0.05
"""Seconds: the shortest interval between presence refreshes."""


# --- notices ---


class MalformedNotice(ValueError):
    """A presence notice no polysignal node sends; the text says what is wrong with it."""


def notice(node_id: str, key: Key, count: int) -> bytes:
    """``node_id`` has ``count`` subscribers of ``key`` now."""
    return orjson.dumps([node_id, key[0], key[1], count])


def stopped_notice(node_id: str) -> bytes:
    """``node_id`` stopped: its counts are gone everywhere."""
    return orjson.dumps([node_id, None, None, 0])


def notice_prefix(node_id: str) -> bytes:
    """How every notice of ``node_id`` starts (``["node",``): its own come back on the bus."""
    return orjson.dumps([node_id])[:-1] + b","


@dataclass(frozen=True, slots=True)
class Notice:
    """A parsed notice: ``origin``'s count of ``key`` (None: ``origin`` stopped)."""

    origin: str
    key: Key | None
    count: int


def parse_notice(data: bytes) -> Notice:
    """Parse a presence notice; raises ``MalformedNotice``."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MalformedNotice("presence notice is not JSON") from None
    if not isinstance(value, list) or len(value) != 4:
        raise MalformedNotice("presence notice is not [node, namespace, topic, count]")
    origin, namespace, topic, count = value
    if not isinstance(origin, str):
        raise MalformedNotice("presence notice's node is not a string")
    if not isinstance(count, int) or count < 0:
        raise MalformedNotice("presence notice's count is not a count")
    if namespace is None and topic is None:
        return Notice(origin, None, count)
    if not isinstance(namespace, str) or not isinstance(topic, str):
        raise MalformedNotice("presence notice's namespace or topic is not a string")
    return Notice(origin, (namespace, topic), count)


# --- timing ---


@dataclass(frozen=True, slots=True)
class PresenceTiming:
    """How long counts live (``ttl``), how often they are written again (``refresh``) and how
    long a cached count is used without a re-read (``cache_ttl``)."""

    ttl: int
    refresh: float
    cache_ttl: float
    asked: float
    """The refresh asked for (at least ``MIN_REFRESH``): ``refresh`` differs when that was not
    below the TTL, so the counts would expire between two refreshes."""

    @classmethod
    def of(cls, ttl: int, refresh: float, cache_ttl: float, *, lossless: bool) -> PresenceTiming:
        """The timing for the settings given; ``lossless``: the bus loses no notice (it is
        in-process), so a cached count needs no re-read but the sweep's."""
        ttl = max(MIN_TTL, ttl)
        asked = max(MIN_REFRESH, refresh)
        # Presence would expire between two refreshes: refresh three times per TTL instead.
        refresh = ttl / 3 if asked >= ttl else asked
        return cls(ttl, refresh, math.inf if lossless else cache_ttl, asked)

    @property
    def adjusted(self) -> bool:
        return self.refresh != self.asked


# --- what presence asks of the bus and the store ---


@dataclass(frozen=True, slots=True)
class SubscribeOp:
    """Subscribe to ``channels``; answered once every one is confirmed."""

    channels: list[bytes]


@dataclass(frozen=True, slots=True)
class UnsubscribeOp:
    """Unsubscribe from ``channels``."""

    channels: list[bytes]


@dataclass(frozen=True, slots=True)
class AnnounceOp:
    """Publish ``notices`` on the presence channel."""

    notices: list[bytes]


@dataclass(frozen=True, slots=True)
class WriteCountsOp:
    """Write this node's ``counts`` (count key -> count, 0 deleting it) with the presence TTL,
    and mark the node alive."""

    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class ReadCountsOp:
    """Read every alive node's counts of the count keys ``names``; answered with
    ``(counts, now)``: one node -> count mapping per name, and the time of the answer."""

    names: list[str]


Op = SubscribeOp | UnsubscribeOp | AnnounceOp | WriteCountsOp | ReadCountsOp
Steps = Generator[Op, Any, None]
"""A write or read in progress: it yields what it needs and is sent each answer; a failure is
thrown in, and raised out again."""


# --- the state ---


@dataclass(slots=True)
class Remote:
    """The other nodes' counts of one topic, as last read or patched by notices, and until when
    they are used without a re-read."""

    counts: dict[str, int] = field(default_factory=dict)
    expires: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(slots=True)
class Changes:
    """What a presence write sends: the notices first, then the counts (count key -> count,
    0 deleting it)."""

    notices: list[bytes] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WriteRound:
    """One round of presence writing: the topics whose count changed, their channels, and the
    channels to subscribe first (already in ``PresenceState.channels``)."""

    keys: list[Key]
    channels: list[bytes]
    subscribe: list[bytes]


class PresenceState:
    """This node's presence: its own counts (the truth, kept through outages and asserted again
    on reconnect) and its cached view of the other nodes'.

    ``channel_of(namespace, topic)`` and ``count_key(namespace, topic)`` name a topic's channel
    and the store key of its counts.
    """

    __slots__ = (
        "asserted",
        "cache",
        "cache_max",
        "cache_ttl",
        "channel_of",
        "channels",
        "count_key",
        "dirty",
        "early",
        "local",
        "node_id",
        "own_notice",
        "patches",
    )

    def __init__(
        self,
        node_id: str,
        *,
        channel_of: Callable[[str, str], bytes],
        count_key: Callable[[str, str], str],
        cache_ttl: float,
        cache_max: int = CACHE_MAX,
    ) -> None:
        self.node_id = node_id
        self.channel_of = channel_of
        self.count_key = count_key
        self.cache_ttl = cache_ttl
        self.cache_max = cache_max
        self.own_notice = notice_prefix(node_id)
        self.local: dict[Key, int] = {}
        """This node's count of each topic it has subscribers of."""
        self.dirty: dict[Key, None] = {}
        """The topics whose count the next write announces, in order."""
        self.asserted: set[Key] = set()
        """The topics whose count the store holds for this node."""
        self.channels: dict[bytes, Key] = {}
        """The topic channels subscribed on the current connection, and their topics."""
        self.cache: dict[Key, Remote] = {}
        self.patches: dict[Key, dict[str, int]] = {}
        """Notices that arrived while a topic's read was in flight (node -> count)."""
        self.early: dict[Key, dict[str, int]] = {}
        """Notices about a local topic not read yet, for its first read."""

    # --- this node's counts ---
    def set_local(self, key: Key, count: int) -> bool:
        """This node has ``count`` subscribers of ``key`` now; True when the writer has
        something to write."""
        if count > 0:
            self.local[key] = count
        else:
            self.local.pop(key, None)
            self.early.pop(key, None)
            if key not in self.asserted and self.channel_of(*key) not in self.channels:
                # Nothing of it reached the bus or the store: nothing to undo. Keeps ``dirty``
                # bounded by the topics in use, also when peers churn through topics during an
                # outage.
                self.dirty.pop(key, None)
                return False
        self.dirty[key] = None
        return True

    def write(self) -> Steps:
        """Write what changed: subscribe the channels of topics that became active and read
        their counts, announce and write the counts, unsubscribe the topics no longer active."""
        write = self._begin_write()
        if write.subscribe:
            yield SubscribeOp(write.subscribe)
            yield from self.read(self._unread(write.subscribe))
        changes = self._changes(write)
        if changes.notices:
            yield AnnounceOp(changes.notices)
        if changes.counts:
            yield WriteCountsOp(changes.counts)
        gone = self._end_write(write)
        if gone:
            yield UnsubscribeOp(gone)

    def _begin_write(self) -> WriteRound:
        """Take the changed topics for a write; the active ones not subscribed yet are
        subscribed first (the round's ``subscribe``), then their counts read (``_unread``)."""
        keys = list(self.dirty)
        self.dirty.clear()
        channels = [self.channel_of(*key) for key in keys]
        local, subscribed = self.local, self.channels
        new: list[bytes] = []
        for key, channel in zip(keys, channels, strict=True):
            if key in local and channel not in subscribed:
                subscribed[channel] = key
                new.append(channel)
        return WriteRound(keys, channels, new)

    def _unread(self, channels: Iterable[bytes]) -> list[Key]:
        """The topics of ``channels`` (just subscribed) whose counts are not cached: read them
        before this node announces its own, so that by the time another node can see it, a
        publish here counts theirs without waiting."""
        cache = self.cache
        return [key for key in map(self.channels.get, channels) if key and key not in cache]

    def _changes(self, write: WriteRound) -> Changes:
        """The notices and counts of ``write``: an active topic's count once its channel is
        subscribed (one that became active meanwhile waits for the next round), 0 for one no
        longer active whose count the store holds."""
        changes = Changes()
        local, subscribed, asserted = self.local, self.channels, self.asserted
        for key, channel in zip(write.keys, write.channels, strict=True):
            count = local.get(key, 0)
            if count > 0:
                if channel not in subscribed:
                    self.dirty[key] = None
                    continue
                asserted.add(key)
            elif key in asserted:
                asserted.discard(key)
            else:
                continue
            changes.notices.append(notice(self.node_id, key, count))
            changes.counts[self.count_key(*key)] = count
        return changes

    def _end_write(self, write: WriteRound) -> list[bytes]:
        """The channels of ``write``'s topics no longer active, to unsubscribe."""
        local, subscribed = self.local, self.channels
        return [
            channel
            for key, channel in zip(write.keys, write.channels, strict=True)
            if key not in local and subscribed.pop(channel, None) is not None
        ]

    def assert_all(self, *, announce: bool) -> Steps:
        """Mark this node alive and write every count of it again (on connect, with notices,
        and as the TTL refresh, without); a topic not subscribed yet is left to the next write,
        and the counts of topics no longer active are deleted."""
        changes = self._all_counts(announce)
        yield AnnounceOp(changes.notices)
        yield WriteCountsOp(changes.counts)

    def _all_counts(self, announce: bool) -> Changes:
        changes = Changes()
        subscribed, asserted = self.channels, self.asserted
        for key, count in self.local.items():
            if self.channel_of(*key) not in subscribed:
                self.dirty[key] = None
                continue
            if announce:
                changes.notices.append(notice(self.node_id, key, count))
            changes.counts[self.count_key(*key)] = count
            asserted.add(key)
        for key in [k for k in asserted if k not in self.local and k not in self.dirty]:
            changes.counts[self.count_key(*key)] = 0
            asserted.discard(key)
        return changes

    def node_keys(self) -> list[str]:
        """The count keys this node may hold in the store (to remove them at a stop)."""
        return [self.count_key(*key) for key in self.asserted | self.local.keys()]

    def removed(self) -> None:
        """This node's counts are gone from the store."""
        self.asserted.clear()

    # --- the connection ---
    def connected(self) -> list[bytes]:
        """A new connection: the channel of every active topic, to subscribe at once (recorded
        as subscribed)."""
        channels = {self.channel_of(*key): key for key in self.local}
        self.channels.update(channels)
        return list(channels)

    def clear_cache(self) -> None:
        """Forget every cached count (their reads predate the connection)."""
        self.cache.clear()

    def disconnected(self) -> None:
        """The connection is lost: nothing is subscribed, nothing cached or read."""
        self.channels.clear()
        self.cache.clear()
        self.patches.clear()
        self.early.clear()

    # --- what the other nodes say ---
    def on_notice(self, data: bytes) -> None:
        """Apply another node's presence notice; raises ``MalformedNotice``."""
        if data.startswith(self.own_notice):
            return  # this node's own, echoed: nothing to learn
        message = parse_notice(data)
        origin, key, count = message.origin, message.key, message.count
        if origin == self.node_id:
            return
        if key is None:  # the node stopped: drop it everywhere
            for remote in self.cache.values():
                remote.counts.pop(origin, None)
            for pending in self.patches.values():
                pending[origin] = 0
            return
        patches = self.patches.get(key)
        if patches is not None:
            patches[origin] = count
        entry = self.cache.get(key)
        if entry is None:
            if patches is None and key in self.local:
                # Not read yet (its read starts once this node's subscribe is confirmed): the
                # read may predate this notice's count, which is then applied on top of it.
                self.early.setdefault(key, {})[origin] = count
            return
        if count > 0:
            entry.counts[origin] = count
        else:
            entry.counts.pop(origin, None)

    # --- reads of the store ---
    def read(self, keys: list[Key]) -> Steps:
        """Read and cache the other nodes' counts of ``keys``, a batch per ``SWEEP_BATCH``
        (those with a read in flight are left to it)."""
        for start in range(0, len(keys), SWEEP_BATCH):
            chunk = [key for key in keys[start : start + SWEEP_BATCH] if key not in self.patches]
            if not chunk:
                continue
            for key in chunk:
                self.patches[key] = self.early.pop(key, {})
            try:
                results, now = yield ReadCountsOp([self.count_key(*key) for key in chunk])
            except BaseException:
                self._read_failed(chunk)
                raise
            for key, counts in zip(chunk, results, strict=True):
                self.store(key, counts, now)

    def read_one(self, key: Key) -> Generator[Op, Any, Remote]:
        """Read and cache the other nodes' counts of ``key`` (one read of it in flight is the
        caller's to ensure)."""
        self.patches.setdefault(key, {}).update(self.early.pop(key, {}))
        try:
            (counts,), now = yield ReadCountsOp([self.count_key(*key)])
        except BaseException:
            self._read_failed([key])
            raise
        return self.store(key, counts, now)

    def _read_failed(self, keys: Iterable[Key]) -> None:
        """The read of ``keys`` failed: the notices kept for it are dropped."""
        for key in keys:
            self.patches.pop(key, None)

    def store(self, key: Key, read: dict[str, int], now: float) -> Remote:
        """Cache the counts of ``key`` read from the store (node -> count), patched by the
        notices that crossed the read. At ``cache_max`` topics, the expired entries go first,
        then the oldest."""
        counts = {node: count for node, count in read.items() if node != self.node_id}
        notices = self.patches.pop(key, {})
        early = self.early.pop(key, None)  # a read that started without them (in-process)
        if early:
            notices = {**early, **notices}
        for node, count in notices.items():
            if count > 0:
                counts[node] = count
            else:
                counts.pop(node, None)
        entry = Remote(counts, now + self.cache_ttl)
        cache = self.cache
        if len(cache) >= self.cache_max and key not in cache:
            for stale in [k for k, v in cache.items() if v.expires <= now]:
                del cache[stale]
            if len(cache) >= self.cache_max:
                del cache[next(iter(cache))]
        cache[key] = entry
        return entry

    # --- answers ---
    def nobody_else(self, key: Key, now: float) -> bool:
        """True when the cache knows, freshly, that no other node has subscribers of ``key``:
        a publish to it would only come back to this node."""
        entry = self.cache.get(key)
        return entry is not None and not entry.counts and entry.expires > now
