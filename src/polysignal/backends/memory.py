"""In-process backend: the default for one node, and the test double for several.

A ``MemoryBus`` is one in-process "net": channels and keys. Nodes created on the same net behave
like nodes sharing one Redis, because they are the same ``Cluster`` (cluster.py) over an
in-process ``Bus`` and ``LeaseStore`` (``MemoryLink``): fan-out reaches only the other nodes with
subscribers for a topic, presence sums every node's count, claims and direct delivery are
cluster-wide. Deliveries are scheduled with ``call_soon``, never run inside the sender's call,
so ordering and re-entrancy match a real bus.

A net can also fail as a Redis server does, for the fault tests: ``stop`` drops every node's
connection and loses what the net kept (a redis-server without persistence), ``start`` lets
the nodes connect again; a link whose ``cut`` is set cannot reach it (a node cut off).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence

from polysignal.backends.base import BackendUnavailable, Claim
from polysignal.backends.cluster import Cluster
from polysignal.backends.interfaces import Bus, LeaseStore, Listener
from polysignal.config import RedisSettings


class MemoryBus:
    """One in-process net, shared by the in-process nodes of one "cluster"."""

    def __init__(self) -> None:
        # channel -> the links subscribed to it (a dict: ordered, no duplicates)
        self.subscribers: dict[bytes, dict[MemoryLink, None]] = {}
        self.claims: dict[str, tuple[Claim, float]] = {}  # key -> holder, expiry
        self.counts: dict[str, dict[str, int]] = {}  # key -> node id -> count
        self.counts_expire: dict[str, float] = {}  # key -> expiry
        self.alive: dict[str, float] = {}  # node id -> expiry
        # A new net has lost nothing: nodes need not settle on it (``MemoryLink.settle``).
        self.epoch = True
        self.settling_until = 0.0
        self.down = False
        self.links: set[MemoryLink] = set()

    def stop(self) -> None:
        """Fail as a redis-server that stops: every connection is lost, nobody can connect until
        ``start``, and everything the net kept is gone."""
        self.down = True
        self.claims.clear()
        self.counts.clear()
        self.counts_expire.clear()
        self.alive.clear()
        self.epoch = False
        self.settling_until = 0.0
        for link in list(self.links):
            link.lose("the in-process net stopped")

    def start(self) -> None:
        """Run again (empty): nodes connect at their next attempt."""
        self.down = False

    def holder(self, key: str) -> Claim | None:
        entry = self.claims.get(key)
        if entry is None:
            return None
        claim, expires = entry
        if expires <= time.monotonic():
            del self.claims[key]
            return None
        return claim

    def live_counts(self, key: str) -> dict[str, int] | None:
        """The counts of ``key``, with expired keys and dead nodes' counts deleted."""
        counts = self.counts.get(key)
        if counts is None:
            return None
        now = time.monotonic()
        if self.counts_expire.get(key, 0.0) <= now:
            self.drop(key)
            return None
        for node in [n for n in counts if self.alive.get(n, 0.0) <= now]:
            del counts[node]
        if not counts:
            self.drop(key)
            return None
        return counts

    def drop(self, key: str) -> None:
        self.counts.pop(key, None)
        self.counts_expire.pop(key, None)


class MemoryLink(Bus, LeaseStore):
    """One node's Bus and LeaseStore on a ``MemoryBus``."""

    name = "memory"
    where = "memory://"
    in_process = True

    def __init__(self, net: MemoryBus) -> None:
        self.net = net
        self.cut = False
        """Set: this node cannot reach the net: it cannot connect and its store calls fail
        (``lose`` drops its live connection)."""
        self._listener: Listener | None = None
        self._channels: set[bytes] = set()
        self._connected = False
        self._lost: asyncio.Future[None] | None = None
        self._pending = 0  # batches scheduled for this link, not yet handed to the listener

    def lose(self, why: str) -> None:
        """The connection is lost (``serve`` raises)."""
        if self._lost is not None and not self._lost.done():
            self._lost.set_exception(BackendUnavailable(why))

    # --- Bus ---
    def listen(self, listener: Listener) -> None:
        self._listener = listener

    async def connect(self) -> None:
        self._reachable()
        self._connected = True
        self._lost = asyncio.get_running_loop().create_future()
        self.net.links.add(self)

    async def serve(self) -> None:
        assert self._lost is not None
        await self._lost  # lost only when the net stops (or the link is cut)

    async def disconnect(self) -> None:
        self._connected = False
        self.net.links.discard(self)
        self.lose("disconnected")
        if self._lost is not None and self._lost.done() and not self._lost.cancelled():
            self._lost.exception()
        for channel in self._channels:
            self._leave(channel)
        self._channels.clear()

    async def subscribe(self, channels: Sequence[bytes]) -> None:
        self._require()
        for channel in channels:
            self.net.subscribers.setdefault(channel, {})[self] = None
            self._channels.add(channel)

    async def unsubscribe(self, channels: Sequence[bytes]) -> None:
        self._require()
        for channel in channels:
            if channel in self._channels:
                self._channels.discard(channel)
                self._leave(channel)

    async def publish(self, channels: Sequence[bytes], payloads: Sequence[bytes]) -> list[int]:
        self._require()
        subscribers = self.net.subscribers
        received = []
        # One scheduled delivery per receiving link and batch, in the batch's order.
        batches: dict[MemoryLink, list[tuple[bytes, bytes]]] = {}
        for channel, data in zip(channels, payloads, strict=True):
            links = subscribers.get(channel)
            if not links:
                received.append(0)
                continue
            for link in links:
                batch = batches.get(link)
                if batch is None:
                    batches[link] = [(channel, data)]
                else:
                    batch.append((channel, data))
            received.append(len(links))
        if batches:
            call_soon = asyncio.get_running_loop().call_soon
            for link, batch in batches.items():
                link._pending += 1
                call_soon(link._receive, batch)
        return received

    def settled(self) -> bool:
        return self._pending == 0

    def _receive(self, batch: list[tuple[bytes, bytes]]) -> None:
        self._pending -= 1
        listener = self._listener
        for channel, data in batch:
            if not self._connected or listener is None:
                return
            listener(channel, data)

    def _leave(self, channel: bytes) -> None:
        links = self.net.subscribers.get(channel)
        if links is not None:
            links.pop(self, None)
            if not links:
                del self.net.subscribers[channel]

    def _require(self) -> None:
        if not self._connected:
            raise BackendUnavailable("the in-process bus is not connected")

    def _reachable(self) -> None:
        if self.net.down or self.cut:
            raise BackendUnavailable("the in-process net cannot be reached")

    # --- LeaseStore ---
    async def claim(self, key: str, token: str, node_id: str, ttl: float) -> bool:
        self._reachable()
        holder = self.net.holder(key)
        if holder is not None and holder.token != token:
            return False
        self.net.claims[key] = (Claim(node_id, token), time.monotonic() + ttl)
        return True

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        self._reachable()
        holder = self.net.holder(key)
        if holder is None or holder.token != token:
            return False
        self.net.claims[key] = (holder, time.monotonic() + ttl)
        return True

    async def release(self, key: str, token: str, node_id: str | None = None) -> bool:
        self._reachable()
        holder = self.net.holder(key)
        if holder is None or holder.token != token:
            return False
        if node_id is not None and holder.node_id != node_id:
            return False
        del self.net.claims[key]
        return True

    async def lookup(self, key: str) -> Claim | None:
        self._reachable()
        return self.net.holder(key)

    async def claimed(self, prefix: str, limit: int) -> list[str]:
        self._reachable()
        found: list[str] = []
        for key in list(self.net.claims):
            if len(found) >= limit:
                break
            if key.startswith(prefix) and self.net.holder(key) is not None:
                found.append(key)
        return found

    async def reclaim(
        self, claims: Mapping[str, tuple[str, float]], releases: Mapping[str, str], node_id: str
    ) -> dict[str, Claim | None]:
        self._reachable()
        taken: dict[str, Claim | None] = {}
        for key, (token, ttl) in claims.items():
            if not await self.claim(key, token, node_id, ttl):
                taken[key] = self.net.holder(key)
        for key, token in releases.items():
            await self.release(key, token)
        return taken

    async def settle(self, grace: float) -> float:
        self._reachable()
        net, now = self.net, time.monotonic()
        if not net.epoch:
            net.epoch = True
            net.settling_until = now + grace
        return max(0.0, net.settling_until - now)

    async def set_counts(self, node_id: str, counts: Mapping[str, int], ttl: float) -> None:
        self._reachable()
        net = self.net
        expires = time.monotonic() + ttl
        net.alive[node_id] = expires
        for key, count in counts.items():
            if count > 0:
                net.live_counts(key)  # an expired key starts over, as in Redis
                net.counts.setdefault(key, {})[node_id] = count
                net.counts_expire[key] = expires
            else:
                held = net.counts.get(key)
                if held is not None:
                    held.pop(node_id, None)
                    if not held:
                        net.drop(key)

    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, int]]:
        self._reachable()
        return [dict(self.net.live_counts(key) or {}) for key in keys]

    def read_counts_nowait(self, keys: Sequence[str]) -> list[dict[str, int]] | None:
        if self.net.down or self.cut:
            return None
        return [dict(self.net.live_counts(key) or {}) for key in keys]

    async def remove_node(
        self, node_id: str, keys: Iterable[str], claims: Mapping[str, str]
    ) -> None:
        self._reachable()
        net = self.net
        for key in keys:
            held = net.counts.get(key)
            if held is not None:
                held.pop(node_id, None)
                if not held:
                    net.drop(key)
        net.alive.pop(node_id, None)
        for key, token in claims.items():
            await self.release(key, token, node_id)

    async def close(self) -> None:
        return None


class MemoryBackend(Cluster):
    """A node on an in-process ``MemoryBus`` (its own unless ``bus`` is given: several nodes on
    one ``bus`` form one cluster, as nodes sharing one Redis do)."""

    def __init__(
        self, node_id: str, bus: MemoryBus | None = None, settings: RedisSettings | None = None
    ) -> None:
        self.net = bus if bus is not None else MemoryBus()
        self.link = MemoryLink(self.net)
        super().__init__(
            node_id, self.link, self.link, settings if settings is not None else RedisSettings()
        )
