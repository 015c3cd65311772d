"""What a node puts on the cluster bus, without I/O: the origin envelope of its messages, the
bounded outbox its one writer flushes, when it tries to reach the bus again, and the latency of
its publishes (docs/redis.md, "What polysignal keeps in Redis"). ``backends/cluster.py`` carries
these out: it publishes, waits, sleeps and reads the clock.

A bus message is ``<origin><frame>`` on a topic's channel and ``<origin><kind><payload>`` on a
node's direct channel, where ``<origin>`` and ``<kind>`` are fields ``<len>:<utf-8 bytes>`` (the
length in bytes, in decimal). A node drops its own topic messages: a bus echoes a publisher that
is subscribed too.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from polysignal.core.presence import Key

W = TypeVar("W")
"""What the executor waits on for an outbox entry (a future): opaque here."""

HEAD_DIGITS = 10
"""Most digits of a field's length (fields are node ids and message kinds)."""
SYNC_KIND = "polysignal.sync"
"""Direct-message kind a node sends itself to learn that its reader caught up (``sync``)."""


class MalformedEnvelope(ValueError):
    """A bus message no polysignal node sends; the text says what is wrong with it."""


def head(text: str) -> bytes:
    """A length-prefixed field of a bus message: ``<len>:<utf-8 bytes>``."""
    raw = text.encode()
    return b"%d:%b" % (len(raw), raw)


def _field_end(data: bytes, start: int) -> tuple[int, int]:
    """Where the value of the field at ``start`` begins and ends; raises on broken framing."""
    colon = data.find(b":", start, start + HEAD_DIGITS + 1)
    if colon < 0:
        raise MalformedEnvelope(f"no field length at byte {start}")
    digits = data[start:colon]
    if not digits.isdigit():
        raise MalformedEnvelope(f"field length {digits!r} at byte {start} is not a number")
    end = colon + 1 + int(digits)
    if end > len(data):
        raise MalformedEnvelope(f"field at byte {start} is {end - len(data)} bytes short")
    return colon + 1, end


def split_head(data: bytes, start: int = 0) -> tuple[str, int]:
    """Parse one ``head`` field at ``start``; returns it and the offset after it."""
    begin, end = _field_end(data, start)
    try:
        return data[begin:end].decode(), end
    except UnicodeDecodeError:
        raise MalformedEnvelope(f"field at byte {start} is not UTF-8") from None


@dataclass(frozen=True, slots=True)
class Direct:
    """A direct message as received: who sent it, its kind and its payload."""

    origin: str
    kind: str
    payload: bytes


class Envelope:
    """One node's side of the envelope: the origin field it puts on what it sends, and how it
    opens what it receives."""

    __slots__ = ("node_id", "origin")

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.origin = head(node_id)
        """This node's origin field, the prefix of every message it sends."""

    def direct(self, kind: str, payload: bytes) -> bytes:
        """A direct message of ``kind`` from this node."""
        return self.origin + head(kind) + payload

    def sync_marker(self, token: str) -> bytes:
        """The direct message this node sends itself for ``sync`` number ``token``."""
        return self.direct(SYNC_KIND, token.encode())

    def topic_frame(self, data: bytes) -> bytes | None:
        """The frame of a topic message; None for this node's own, echoed back. Only the
        origin's framing is checked: the frame is all a topic message is received for."""
        if data.startswith(self.origin):
            return None
        return data[_field_end(data, 0)[1] :]

    def open_direct(self, data: bytes) -> Direct:
        """The origin, kind and payload of a direct message."""
        origin, offset = split_head(data)
        kind, offset = split_head(data, offset)
        return Direct(origin, kind, data[offset:])

    def sync_token(self, message: Direct) -> str | None:
        """The token of this node's own ``sync`` marker; None for any other message."""
        if message.kind != SYNC_KIND or message.origin != self.node_id:
            return None
        try:
            return message.payload.decode()
        except UnicodeDecodeError:
            raise MalformedEnvelope("sync token is not UTF-8") from None


# --- the outbox ---

MAX_BATCH = 1024
"""Outbox entries per Bus batch written by the writer task."""
OUTBOX_MAX_ITEMS = 65536
"""Outbox high-water mark in entries (in bytes: ``redis_outbox_bytes``); at either, publishers
wait for the writer (backpressure) until both are below half."""
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
class Outgoing(Generic[W]):
    """One outbox entry: a message for ``channel``, or (channel None) a marker answered once
    everything before it is written.

    ``topic`` is set for topic publishes (``data`` is then the bare frame): the writer leaves
    out those no other node can receive and puts the origin on the others. ``waiter`` is told
    the outcome (``Outbox.written``); ``at`` is when a sampled publish was made, else 0.
    """

    channel: bytes | None
    data: bytes
    waiter: W | None = None
    topic: Key | None = None
    at: float = 0.0


@dataclass(slots=True)
class Batch(Generic[W]):
    """What the writer hands the bus in one go (``channels[i]`` gets ``payloads[i]``), and what
    to do once it did: the sampled publishes' times and the waiters with the index of their
    message in the batch (-1: left out; None: a marker)."""

    channels: list[bytes] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    sampled: list[float] = field(default_factory=list)
    waiting: list[tuple[W, int | None]] = field(default_factory=list)
    size: int = 0
    """The bytes of every entry taken, counted in the outbox until the bus has them."""


class Outbox(Generic[W]):
    """The bounded queue of what the node's one writer sends, in order: topic publishes, direct
    messages and markers. Full at ``max_items`` entries or ``max_bytes`` bytes, with room again
    below half of both. ``clock`` (monotonic seconds) is read only for sampled publishes."""

    __slots__ = (
        "_clock",
        "_items",
        "_reported",
        "_seq",
        "dropped",
        "latency",
        "max_bytes",
        "max_items",
        "size",
    )

    def __init__(
        self, max_bytes: int, clock: Callable[[], float], max_items: int = OUTBOX_MAX_ITEMS
    ) -> None:
        self.max_items = max_items
        self.max_bytes = max(1, max_bytes)
        self.size = 0
        """Bytes queued (the payloads, without envelopes)."""
        self.dropped = 0
        """Publishes dropped because the bus was away, since the start."""
        self.latency = LatencyHistogram()
        self._items: deque[Outgoing[W]] = deque()
        self._clock = clock
        self._seq = 0
        self._reported = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def has_room(self) -> bool:
        """Below half of both high-water marks: publishers held at the bound may go on."""
        return len(self._items) < self.max_items // 2 and self.size < self.max_bytes // 2

    def put(self, item: Outgoing[W]) -> bool:
        """Queue ``item``; True when that reached a high-water mark (publishers must wait)."""
        items = self._items
        items.append(item)
        self.size += len(item.data)
        return len(items) >= self.max_items or self.size >= self.max_bytes

    def publish(self, channel: bytes, frame: bytes, topic: Key) -> bool:
        """Queue a publish of ``frame`` to ``topic``'s ``channel`` (its origin is put on when
        it is sent, if it is); as ``put``."""
        seq = self._seq = self._seq + 1
        at = self._clock() if seq % PUBLISH_SAMPLE == 0 else 0.0
        return self.put(Outgoing(channel, frame, None, topic, at))

    def take(
        self, now: float, origin: bytes, nobody_else: Callable[[Key, float], bool]
    ) -> Batch[W]:
        """The writer's next batch: up to ``MAX_BATCH`` entries in order, without the markers
        and the topic publishes that ``nobody_else`` says no other node can receive at ``now``;
        ``origin`` is put on the topic publishes sent."""
        queue = self._items
        batch: Batch[W] = Batch()
        channels, payloads, sampled = batch.channels, batch.payloads, batch.sampled
        size = 0
        index: int | None
        for _ in range(min(len(queue), MAX_BATCH)):
            item = queue.popleft()
            data, channel, topic = item.data, item.channel, item.topic
            size += len(data)
            if channel is None:
                index = None  # a marker
            elif topic is not None and nobody_else(topic, now):
                index = -1  # it would only come back to this node
            else:
                index = len(channels)
                channels.append(channel)
                payloads.append(data if topic is None else origin + data)
                if item.at:
                    sampled.append(item.at)
            if item.waiter is not None:
                batch.waiting.append((item.waiter, index))
        batch.size = size
        return batch

    def written(self, batch: Batch[W], replies: Sequence[int]) -> list[tuple[W, bool | None]]:
        """The bus took ``batch`` (``replies[i]``: how many subscribers got message i): its
        bytes leave the outbox, the sampled publishes' latencies are counted, and each waiter's
        answer is returned: None for a marker, else whether a subscriber got it (0: the node is
        gone; left out: False)."""
        if batch.sampled:
            done = self._clock()
            for at in batch.sampled:
                self.latency.observe(done - at)
        self.size -= batch.size
        return [
            (waiter, None if index is None else index >= 0 and replies[index] > 0)
            for waiter, index in batch.waiting
        ]

    def clear(self) -> tuple[int, list[tuple[W, bool]]]:
        """Drop everything queued (the connection is lost). Answers how many publishes were
        dropped (counted in ``dropped``), and the waiters to fail, each with whether it waits
        on a marker."""
        dropped = 0
        waiting: list[tuple[W, bool]] = []
        for item in self._items:
            if item.waiter is None:
                dropped += 1
            else:
                waiting.append((item.waiter, item.channel is None))
        self._items.clear()
        self.size = 0
        self.dropped += dropped
        return dropped, waiting

    def drop(self) -> bool:
        """Count a publish dropped while the bus is away; True for the first one since the bus
        was last reached (the one to log)."""
        self.dropped += 1
        if self._reported:
            return False
        self._reported = True
        return True

    def reconnected(self) -> None:
        """The bus is reached again: the next dropped publish is logged again."""
        self._reported = False


# --- reconnecting ---

BACKOFF_BASE = 0.2
"""Seconds before the first reconnect; doubles per attempt up to the cap."""


@dataclass(frozen=True, slots=True)
class Retry:
    """When to try again: attempt ``number`` (1 for the first retry) after ``delay`` seconds;
    ``loud``: log it as a warning (retries 1, 2, 3, 5, 9, 17, ...), not as debug."""

    number: int
    delay: float
    loud: bool


class Backoff:
    """The reconnect schedule: ``BACKOFF_BASE`` doubling per failed attempt up to ``cap``, each
    delay jittered down to as little as half (``uniform(a, b)``: a random number between a and
    b), so nodes that lost the bus together do not all come back at once."""

    __slots__ = ("attempt", "cap", "uniform")

    def __init__(self, cap: float, uniform: Callable[[float, float], float]) -> None:
        self.cap = max(BACKOFF_BASE, cap)
        self.uniform = uniform
        self.attempt = 0
        """Failed attempts since the bus was last reached."""

    def reset(self) -> None:
        """The bus was reached: the next failure starts from ``BACKOFF_BASE`` again."""
        self.attempt = 0

    def next(self) -> Retry:
        """The next retry after a failed attempt."""
        attempt = self.attempt
        self.attempt += 1
        delay = min(self.cap, BACKOFF_BASE * 2 ** min(attempt, 30))
        return Retry(attempt + 1, delay * self.uniform(0.5, 1.0), attempt & (attempt - 1) == 0)
