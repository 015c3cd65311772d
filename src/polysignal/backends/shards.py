"""Standalone shards: several independent Redis servers as one bus and one store, where no Redis
Cluster runs (docs/redis-cluster.md, "Standalone shards").

``BACKEND=redis://a:6379,redis://b:6379`` (a comma-separated list of redis://, rediss:// or
unix:// URLs; every node must list the same shards in the same order). Each shard is an
ordinary single-Redis ``RedisLink`` (redis.py), reused as it is; this module only places names
on them:

* every channel on the shard ``jump(channel)``, every claim and presence key on ``jump(key)``,
  with Lamping & Veach's jump consistent hash of a 64-bit digest of the name: adding an (n+1)-th
  shard moves about 1/(n+1) of the names, each to the new shard, none between the old ones;
* the alive mark of a node on every shard (each shard's presence read checks the alive marks
  next to its own hashes), the settle window on every shard (each answers whether it lost its
  data; the longest window counts).

The ordering a node's messages keep on one Redis (one connection) across channels is kept where
the Cluster needs it: ``ordered_segments`` splits a batch so that a direct message and any
publish that could reach the same node never travel concurrently on two shards (see there).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeVar

from polysignal.backends.base import BackendUnavailable, Claim
from polysignal.backends.cluster import Cluster
from polysignal.backends.interfaces import Bus, LeaseStore, Listener, first_error
from polysignal.backends.redis import RedisLink
from polysignal.config import Settings, redact_url, split_backend_urls

__all__ = ["ShardedBackend", "ShardedLink", "jump_hash", "name_key", "ordered_segments"]

T = TypeVar("T")


def name_key(name: bytes | str) -> int:
    """A stable 64-bit key of a channel or key name (the same on every node and Python)."""
    raw = name.encode() if isinstance(name, str) else name
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach, 2014): the bucket in [0, buckets) of ``key``."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def ordered_segments(shards: Sequence[int], direct: Sequence[bool]) -> list[list[int]]:
    """Split a batch (item i goes to shard ``shards[i]``; ``direct[i]``: it is a direct message,
    for one known node) into segments sent one after another, each concurrently per shard.

    On one Redis, a node's messages reach another node in the order they were sent, whatever
    their channels (one connection each way); the Cluster relies on it between a publish and a
    direct message (a relay event after a room's frame, ``sync``'s marker). Over several shards
    the receiver reads several connections, so two messages that may reach the same node must
    not travel on two shards at once: a direct message waits for every earlier publish on
    another shard (any of them may reach its node), and a publish waits for every earlier
    direct message on another shard. Direct messages to different nodes, and publishes to
    different channels, need no order between them and travel concurrently. Answers the item
    indexes of each segment, in order.
    """
    segments: list[list[int]] = []
    current: list[int] = []
    plain_shards: set[int] = set()
    direct_shards: set[int] = set()
    for index, (shard, is_direct) in enumerate(zip(shards, direct, strict=True)):
        others = plain_shards if is_direct else direct_shards
        if others and (len(others) > 1 or shard not in others):
            segments.append(current)
            current, plain_shards, direct_shards = [], set(), set()
        current.append(index)
        (direct_shards if is_direct else plain_shards).add(shard)
    if current:
        segments.append(current)
    return segments


async def gather_all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Run ``calls`` concurrently; the first real failure is raised (the others cancelled)."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_awaited(call)) for call in calls]
    except BaseExceptionGroup as group_exc:
        first = first_error(group_exc)
        if first is None:
            raise
        raise first from None
    return [task.result() for task in tasks]


async def _awaited(call: Awaitable[T]) -> T:
    return await call


class ShardedLink(Bus, LeaseStore):
    """One node's Bus and LeaseStore on standalone shards; see the module docstring."""

    name = "Redis"

    def __init__(self, urls: Sequence[str], settings: Settings) -> None:
        self.links = [RedisLink(url, settings.redis) for url in urls]
        self.where = ",".join(redact_url(url) for url in urls)
        self.direct_prefix = f"{settings.redis.signal_channel}:direct:".encode()

    # --- placement ---
    def shard_of(self, name: bytes | str) -> int:
        return jump_hash(name_key(name), len(self.links))

    def _split(self, names: Iterable[T], key: Callable[[T], bytes | str]) -> dict[int, list[T]]:
        by_shard: dict[int, list[T]] = {}
        for name in names:
            by_shard.setdefault(self.shard_of(key(name)), []).append(name)
        return by_shard

    # --- Bus ---
    def listen(self, listener: Listener) -> None:
        for link in self.links:
            link.listen(listener)

    async def connect(self) -> None:
        try:
            await gather_all(link.connect() for link in self.links)
        except BaseException:
            await self.disconnect()
            raise

    async def serve(self) -> None:
        await gather_all(link.serve() for link in self.links)

    async def disconnect(self) -> None:
        for link in self.links:
            await link.disconnect()

    async def subscribe(self, channels: Sequence[bytes]) -> None:
        by_shard = self._split(channels, _same)
        await gather_all(self.links[i].subscribe(chunk) for i, chunk in by_shard.items())

    async def unsubscribe(self, channels: Sequence[bytes]) -> None:
        by_shard = self._split(channels, _same)
        await gather_all(self.links[i].unsubscribe(chunk) for i, chunk in by_shard.items())

    async def publish(self, channels: Sequence[bytes], payloads: Sequence[bytes]) -> list[int]:
        shards = [self.shard_of(channel) for channel in channels]
        direct = [channel.startswith(self.direct_prefix) for channel in channels]
        received = [0] * len(channels)
        for segment in ordered_segments(shards, direct):
            by_shard: dict[int, list[int]] = {}
            for index in segment:
                by_shard.setdefault(shards[index], []).append(index)
            order = list(by_shard.items())
            replies = await gather_all(
                self.links[shard].publish(
                    [channels[i] for i in indexes], [payloads[i] for i in indexes]
                )
                for shard, indexes in order
            )
            for (_, indexes), counts in zip(order, replies, strict=True):
                for index, count in zip(indexes, counts, strict=True):
                    received[index] = count
        return received

    # --- LeaseStore: claims ---
    async def claim(self, key: str, token: str, node_id: str, ttl: float) -> bool:
        return await self.links[self.shard_of(key)].claim(key, token, node_id, ttl)

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        return await self.links[self.shard_of(key)].renew(key, token, ttl)

    async def release(self, key: str, token: str, node_id: str | None = None) -> bool:
        return await self.links[self.shard_of(key)].release(key, token, node_id)

    async def lookup(self, key: str) -> Claim | None:
        return await self.links[self.shard_of(key)].lookup(key)

    async def claimed(self, prefix: str, limit: int) -> list[str]:
        found: list[str] = []
        for keys in await gather_all(link.claimed(prefix, limit) for link in self.links):
            found += keys
        return found[:limit]

    async def reclaim(
        self, claims: Mapping[str, tuple[str, float]], releases: Mapping[str, str], node_id: str
    ) -> dict[str, Claim | None]:
        shard_claims: dict[int, dict[str, tuple[str, float]]] = {}
        shard_releases: dict[int, dict[str, str]] = {}
        for key, claim in claims.items():
            shard_claims.setdefault(self.shard_of(key), {})[key] = claim
        for key, token in releases.items():
            shard_releases.setdefault(self.shard_of(key), {})[key] = token
        shards = sorted(set(shard_claims) | set(shard_releases))
        taken: dict[str, Claim | None] = {}
        for found in await gather_all(
            self.links[i].reclaim(shard_claims.get(i, {}), shard_releases.get(i, {}), node_id)
            for i in shards
        ):
            taken.update(found)
        return taken

    async def settle(self, grace: float) -> float:
        return max(await gather_all(link.settle(grace) for link in self.links))

    # --- LeaseStore: counts ---
    async def set_counts(self, node_id: str, counts: Mapping[str, int], ttl: float) -> None:
        by_shard: dict[int, dict[str, int]] = {i: {} for i in range(len(self.links))}
        for key, count in counts.items():
            by_shard[self.shard_of(key)][key] = count
        # Every shard: its share of the counts, and the alive mark its presence reads check.
        await gather_all(
            self.links[i].set_counts(node_id, part, ttl) for i, part in by_shard.items()
        )

    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, int]]:
        if len(keys) == 1:
            return await self.links[self.shard_of(keys[0])].read_counts(keys)
        by_shard = self._split(range(len(keys)), lambda i: keys[i])
        order = list(by_shard.items())
        replies = await gather_all(
            self.links[shard].read_counts([keys[i] for i in indexes]) for shard, indexes in order
        )
        counts: list[dict[str, int]] = [{} for _ in keys]
        for (_, indexes), read in zip(order, replies, strict=True):
            for index, one in zip(indexes, read, strict=True):
                counts[index] = one
        return counts

    async def remove_node(
        self, node_id: str, keys: Iterable[str], claims: Mapping[str, str]
    ) -> None:
        shard_keys: dict[int, list[str]] = {i: [] for i in range(len(self.links))}
        shard_claims: dict[int, dict[str, str]] = {i: {} for i in range(len(self.links))}
        for key in keys:
            shard_keys[self.shard_of(key)].append(key)
        for key, token in claims.items():
            shard_claims[self.shard_of(key)][key] = token
        await gather_all(
            link.remove_node(node_id, shard_keys[i], shard_claims[i])
            for i, link in enumerate(self.links)
        )

    async def close(self) -> None:
        for link in self.links:
            try:
                await link.close()
            except BackendUnavailable:
                continue


def _same(name: T) -> T:
    return name


class ShardedBackend(Cluster):
    """A node on standalone shards: the Cluster over a ``ShardedLink``."""

    def __init__(self, settings: Settings, url: str | None = None) -> None:
        self.url = url or settings.server.backend_url
        self.link = ShardedLink(split_backend_urls(self.url), settings)
        self.safe_url = self.link.where
        super().__init__(settings.server.node_id, self.link, self.link, settings.redis)
