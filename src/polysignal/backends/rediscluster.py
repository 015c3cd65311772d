"""Redis Cluster (or Valkey cluster) backend: the bus scales with the shards
(docs/redis-cluster.md).

``BACKEND=redis+cluster://[user:password@]host:port,host:port/`` (``rediss+cluster://`` for
TLS). Every semantic is the ``Cluster``'s (cluster.py), unchanged; ``ClusterLink`` moves its
bytes and keys:

* **Bus: sharded pub/sub over partitions.** A topic channel (``P:t:…``) belongs to one of
  ``REDIS_CLUSTER_PARTITIONS`` partitions (``crc32(channel) % N``); partition *i* is the shard
  channel ``{tag_i}P:p:i``, whose hash tag ``tag_i`` is precomputed (``partition_tags``) so that
  its key slot is the middle of the *i*-th of N equal slices of the 16384 slots: partitions
  spread evenly over the primaries whatever their number, where bare ``{topic}`` tags would
  collide. A node SSUBSCRIBEs a partition while it has subscribed channels in it (reference
  counted), so it receives only partitions it has topics in; a publish is one SPUBLISH of the
  envelope ``<len>:<channel><data>`` to the partition's owner, and on receipt only messages of
  channels this node subscribed are handed on (the filter inside the partition). The other
  channels (``P:presence``, every node's ``P:direct:{node}``: one per node) are shard channels
  of their own, each in its own slot: SPUBLISH answers how many nodes received a direct message,
  which the Cluster uses to tell that a node is gone (a partition would count every node in it).
  Messages are enveloped alike, so a probe can go on any shard channel.
* **Why not redis-py's ClusterPubSub** (redis-py 8.1 has SSUBSCRIBE/SPUBLISH in asyncio): its
  ``get_sharded_message`` polls the per-node connections round-robin with a timeout instead of
  pushing each message as it arrives, its ``ssubscribe`` returns before Redis confirms (the
  Cluster announces presence only after a confirmed subscribe), and it re-subscribes moved
  channels in the background, invisibly to the caller. So the bus routes by key slot itself:
  the slot map from ``CLUSTER SLOTS`` (Redis 6, 7 and Valkey), one subscriber and one writer
  connection per primary (RESP2), ``redis.crc.key_slot`` for the slots.
* **Ordering.** One Redis keeps a node's messages to another node in order across channels;
  shards are read on several connections, so a batch is split by ``shards.ordered_segments``:
  a direct message waits for earlier publishes on other shards, and vice versa (publishes to
  different partitions, direct messages to different nodes, go concurrently).
* **Topology.** The slot map is read at connect. A MOVED/ASK/CLUSTERDOWN answer to an
  SPUBLISH or SSUBSCRIBE, an SUNSUBSCRIBE Redis sends on its own (the slot moved, or the
  primary became a replica), a lost connection to any primary, or a failed probe ends the
  bus's connection: the Cluster reconnects (reading the slot map again, so every partition is
  re-subscribed on its new owner) and re-asserts presence and claims, exactly as after a
  single-Redis outage. While a primary fails over, the whole bus of a node is down (with the
  default ``cluster-require-full-coverage yes`` the cluster refuses every command then anyway).
* **Liveness.** Every ``REDIS_CLUSTER_PROBE`` seconds, each primary connection that holds
  confirmed subscriptions gets one SPUBLISH of a probe (an envelope no node delivers) on one of
  them, round-robin: Redis must count a subscriber (0 means this subscription is stale: it is
  on another server than the slot's owner) and the probe must come back on the subscriber
  connection; a connection without subscriptions is PINGed. Silence for 3x the interval is a
  lost connection.
* **LeaseStore** on redis-py's ``RedisCluster`` (it follows MOVED/ASK and refreshes its slot
  map itself). Every key is one key, so in one slot: claims ``P:claim:{id}``, presence hashes,
  alive marks ``P:alive:{node}``; the Lua scripts (claim, renew, release) touch only their one
  key, run with EVAL (no script cache to load on a newly promoted primary). A batch (reclaim,
  counts, remove) is a non-transactional cluster pipeline: redis-py splits it per primary and
  runs the parts concurrently. A presence read cannot check alive marks inside its Lua script
  (they live in other slots): it reads the hashes, then the alive marks of the nodes found, then
  deletes each dead node's field only if it still holds the count read (compare-and-delete; a
  node that came back in between and wrote the same count loses it until its next refresh,
  ``PRESENCE_REFRESH``). The settle window (``settle``) is kept per partition tag,
  ``{tag_i}polysignal:epoch``/``…:settling``, so a shard that lost its data is noticed whichever
  it is; the longest window counts. ``claimed`` scans every primary.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import functools
import logging
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterCrossSlotError,
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from polysignal.backends.base import BackendUnavailable, Claim
from polysignal.backends.cluster import MAX_BATCH, Cluster
from polysignal.backends.interfaces import Bus, LeaseStore, Listener, describe, first_error
from polysignal.backends.names import EPOCH, SETTLING, Names
from polysignal.backends.redis import (
    _CLAIM,
    _RELEASE,
    _RENEW,
    _SETTLE,
    _glob,
    _ignore,
    _ms,
    _seconds,
    _text,
    execute,
)
from polysignal.backends.shards import gather_all, ordered_segments
from polysignal.config import ClusterUrl, RedisSettings, Settings, parse_cluster_url, redact_url

__all__ = ["ClusterLink", "RedisClusterBackend", "partition_tags"]

log = logging.getLogger("polysignal.redis")
presence_log = logging.getLogger("polysignal.presence")

SLOTS = 16384
"""Hash slots of a Redis Cluster."""
PROBE = b"0:probe"
"""A probe's envelope: the empty channel, which no node subscribes to."""

# Delete a dead node's count only if it is still the count that was read.
_DROP_FIELD = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

_TOPOLOGY_ERRORS = (AskError, TryAgainError, ClusterDownError, ClusterCrossSlotError, ReadOnlyError)
"""Error replies that mean the slot map changed or the cluster cannot answer (not bad data)."""


@functools.lru_cache(maxsize=8)
def partition_tags(count: int) -> tuple[bytes, ...]:
    """Hash tags of ``count`` partitions: tag *i* is the shortest decimal string whose key slot
    is the middle of the *i*-th of ``count`` equal slices of the slots, so the partitions are
    evenly spaced over the slots (computed once per count, about 50 ms for 128)."""
    wanted = {(2 * i + 1) * SLOTS // (2 * count): i for i in range(count)}
    tags: list[bytes] = [b""] * count
    missing = len(wanted)
    n = 0
    while missing:
        tag = b"%d" % n
        index = wanted.pop(binascii.crc_hqx(tag, 0) % SLOTS, None)
        if index is not None:
            tags[index] = tag
            missing -= 1
        n += 1
    return tuple(tags)


@dataclass(eq=False)
class _Shard:
    """One primary: its subscriber and writer connections and what is subscribed there."""

    host: str
    port: int
    sub: AbstractConnection
    writer: AbstractConnection
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # (kind, shard channel, future) per SSUBSCRIBE/SUNSUBSCRIBE sent, in the order sent.
    confirms: deque[tuple[bytes, bytes, asyncio.Future[None]]] = field(default_factory=deque)
    confirmed: dict[bytes, None] = field(default_factory=dict)  # subscriptions Redis confirmed
    last_rx: float = 0.0
    probes: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ClusterLink(Bus, LeaseStore):
    """One node's Bus and LeaseStore on a Redis Cluster; see the module docstring."""

    name = "Redis"

    def __init__(self, url: str, settings: RedisSettings) -> None:
        self.url = url
        self.where = redact_url(url)
        self.spec: ClusterUrl = parse_cluster_url("BACKEND", url)
        self.names = Names(settings.signal_channel)
        self.connect_timeout = settings.redis_connect_timeout
        self.command_timeout = settings.redis_command_timeout
        self.probe_interval = settings.redis_cluster_probe
        count = settings.redis_cluster_partitions
        prefix = settings.signal_channel.encode()
        self.partitions = [
            b"{%b}%b:p:%d" % (tag, prefix, i) for i, tag in enumerate(partition_tags(count))
        ]
        self.partition_slots = [key_slot(channel) for channel in self.partitions]
        self.topic_prefix = prefix + b":t:"
        self.direct_prefix = prefix + b":direct:"
        self._listener: Listener = _ignore
        self._up = False
        self._shards: list[_Shard] = []
        self._owner: list[int] = []  # slot -> index in _shards
        self._known: list[tuple[str, int]] = list(self.spec.seeds)  # where to ask for slots
        self._channels: dict[bytes, bytes] = {}  # subscribed channel -> its shard channel
        self._refs: dict[bytes, int] = {}  # shard channel -> subscribed channels in it
        self._pending: dict[bytes, asyncio.Future[None]] = {}  # SSUBSCRIBE not confirmed yet
        self._client: RedisCluster | None = None
        self._sessions = 0  # connections made (the store is refreshed on each after the first)

    # --- placement ---
    def place(self, channel: bytes) -> tuple[bytes, int]:
        """The shard channel that carries ``channel``, and its slot."""
        if channel.startswith(self.topic_prefix):
            index = zlib.crc32(channel) % len(self.partitions)
            return self.partitions[index], self.partition_slots[index]
        return channel, key_slot(channel)

    # --- Bus: the connection ---
    def listen(self, listener: Listener) -> None:
        self._listener = listener

    async def connect(self) -> None:
        if self._client is not None and self._sessions:
            # The last connection failed: the store's client reads the slot map again too (its
            # pooled connections to a failed primary would fail one by one otherwise).
            with contextlib.suppress(Exception):
                await self._client.aclose()
        self._sessions += 1
        self._open_store()
        async with asyncio.timeout(self.connect_timeout):
            primaries, owner = await self._discover()
        shards: list[_Shard] = []
        for host, port in primaries:
            pool = self._pool(host, port)
            sub: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
            writer: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
            shards.append(_Shard(host, port, sub, writer))
        self._shards, self._owner = shards, owner
        self._channels.clear()
        self._refs.clear()
        self._pending.clear()
        async with asyncio.timeout(self.connect_timeout):
            await gather_all(
                conn.connect()  # type: ignore[no-untyped-call]
                for shard in shards
                for conn in (shard.sub, shard.writer)
            )
        now = time.monotonic()
        for shard in shards:
            shard.last_rx = now
        self._up = True

    async def serve(self) -> None:
        self._require()
        try:
            async with asyncio.TaskGroup() as group:
                for shard in self._shards:
                    group.create_task(self._read(shard), name=f"redis-shard-{shard.address}")
                    group.create_task(self._probe(shard), name=f"redis-probe-{shard.address}")
        except BaseExceptionGroup as group_exc:
            first = first_error(group_exc)
            if first is None:
                raise
            raise first from None

    async def disconnect(self) -> None:
        self._up = False
        for shard in self._shards:
            while shard.confirms:
                future = shard.confirms.popleft()[2]
                if not future.done():
                    future.set_exception(BackendUnavailable("Redis connection lost"))
                    future.exception()
            for conn in (shard.sub, shard.writer):
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
        self._shards = []
        self._pending.clear()

    # --- Bus: messages ---
    async def subscribe(self, channels: Sequence[bytes]) -> None:
        self._require()
        waits: list[asyncio.Future[None]] = []
        send: dict[int, list[bytes]] = {}
        for channel in channels:
            if channel in self._channels:
                continue
            shard_channel, slot = self.place(channel)
            self._channels[channel] = shard_channel
            refs = self._refs.get(shard_channel, 0)
            self._refs[shard_channel] = refs + 1
            if refs == 0:
                send.setdefault(self._owner[slot], []).append(shard_channel)
            elif shard_channel in self._pending:  # another caller's SSUBSCRIBE on its way
                waits.append(self._pending[shard_channel])
        waits += await self._send(b"ssubscribe", send)
        await self._confirmed(waits)

    async def unsubscribe(self, channels: Sequence[bytes]) -> None:
        self._require()
        send: dict[int, list[bytes]] = {}
        for channel in channels:
            shard_channel = self._channels.pop(channel, None)
            if shard_channel is None:
                continue
            refs = self._refs[shard_channel] - 1
            if refs:
                self._refs[shard_channel] = refs
                continue
            del self._refs[shard_channel]
            slot = self.place(channel)[1]
            send.setdefault(self._owner[slot], []).append(shard_channel)
        await self._confirmed(await self._send(b"sunsubscribe", send))

    async def publish(self, channels: Sequence[bytes], payloads: Sequence[bytes]) -> list[int]:
        self._require()
        owner, place = self._owner, self.place
        shard_channels: list[bytes] = []
        shards: list[int] = []
        for channel in channels:
            shard_channel, slot = place(channel)
            shard_channels.append(shard_channel)
            shards.append(owner[slot])
        direct = [channel.startswith(self.direct_prefix) for channel in channels]
        received = [0] * len(channels)
        for segment in ordered_segments(shards, direct):
            by_shard: dict[int, list[int]] = {}
            for index in segment:
                by_shard.setdefault(shards[index], []).append(index)
            order = list(by_shard.items())
            replies = await gather_all(
                self._execute(
                    self._shards[shard],
                    [
                        (
                            "SPUBLISH",
                            shard_channels[i],
                            b"%d:%b%b" % (len(channels[i]), channels[i], payloads[i]),
                        )
                        for i in indexes
                    ],
                )
                for shard, indexes in order
            )
            for (shard, indexes), answers in zip(order, replies, strict=True):
                for index, answer in zip(indexes, answers, strict=True):
                    if isinstance(answer, Exception):
                        # MOVED, ASK, CLUSTERDOWN: the slot map changed; reconnect.
                        raise BackendUnavailable(
                            f"Redis {self._shards[shard].address}: {describe(answer)}"
                        )
                    received[index] = answer if isinstance(answer, int) else 0
        return received

    async def _send(self, kind: bytes, send: dict[int, list[bytes]]) -> list[asyncio.Future[None]]:
        """Write SSUBSCRIBE/SUNSUBSCRIBE of each shard channel (one command each: a command's
        channels must share a slot) to its primary; the futures of their confirmations. Each
        shard's confirmations are queued and its commands written without a pause between
        (the write happens before ``send_packed_command`` first waits), so the queue keeps the
        order of the wire."""
        loop = asyncio.get_running_loop()
        command = kind.decode().upper()
        waits: list[asyncio.Future[None]] = []
        for index, shard_channels in send.items():
            shard = self._shards[index]
            for shard_channel in shard_channels:
                future: asyncio.Future[None] = loop.create_future()
                shard.confirms.append((kind, shard_channel, future))
                waits.append(future)
                if kind == b"ssubscribe":
                    self._pending[shard_channel] = future
                else:
                    shard.confirmed.pop(shard_channel, None)
            packed = shard.sub.pack_commands([(command, c) for c in shard_channels])
            await shard.sub.send_packed_command(packed, check_health=False)
        return waits

    async def _confirmed(self, waits: list[asyncio.Future[None]]) -> None:
        if not waits:
            return
        async with asyncio.timeout(self.command_timeout):
            await asyncio.gather(*waits)

    async def _read(self, shard: _Shard) -> None:
        """Read one primary's subscriber connection: messages, confirmations, pongs."""
        read = shard.sub.read_response
        listener, channels = self._listener, self._channels
        while True:
            try:
                response = await read()
            except ResponseError as exc:  # MOVED/CLUSTERDOWN for an SSUBSCRIBE
                raise BackendUnavailable(f"Redis {shard.address}: {describe(exc)}") from exc
            shard.last_rx = time.monotonic()
            if not isinstance(response, list) or len(response) < 2:
                continue
            kind = response[0]
            if kind == b"smessage" and len(response) == 3:
                data: bytes = response[2]
                try:
                    colon = data.index(b":", 0, 11)
                    end = colon + 1 + int(data[:colon])
                except ValueError:
                    log.warning("malformed message on shard channel %r dropped", response[1])
                    continue
                channel = data[colon + 1 : end]
                if channel in channels:
                    listener(channel, data[end:])
            elif kind == b"ssubscribe" or kind == b"sunsubscribe":
                self._confirm(shard, kind, response[1])

    def _confirm(self, shard: _Shard, kind: bytes, shard_channel: bytes) -> None:
        if shard.confirms:
            want, name, future = shard.confirms[0]
            if want == kind and name == shard_channel:
                shard.confirms.popleft()
                if kind == b"ssubscribe":
                    if self._pending.get(shard_channel) is future:
                        del self._pending[shard_channel]
                    if shard_channel in self._refs:
                        shard.confirmed[shard_channel] = None
                if not future.done():
                    future.set_result(None)
                return
        if kind == b"sunsubscribe":
            # Not asked for: Redis dropped the subscription (its slot moved, or this server
            # became a replica). Reconnect, which subscribes again on the new owner.
            raise BackendUnavailable(
                f"Redis {shard.address} dropped the subscription of {shard_channel!r} "
                "(the slot moved)"
            )

    async def _probe(self, shard: _Shard) -> None:
        """Prove the subscriptions on ``shard`` alive (see the module docstring)."""
        interval = self.probe_interval
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - shard.last_rx > 3 * interval:
                raise TimeoutError(f"no reply from Redis {shard.address} for {3 * interval:g}s")
            subscribed = list(shard.confirmed)
            if not subscribed:
                await shard.sub.send_command("PING", check_health=False)
                continue
            shard.probes += 1
            target = subscribed[shard.probes % len(subscribed)]
            (answer,) = await self._execute(shard, [("SPUBLISH", target, PROBE)])
            if isinstance(answer, Exception):
                raise BackendUnavailable(f"Redis {shard.address}: {describe(answer)}")
            if answer == 0 and target in shard.confirmed:
                raise BackendUnavailable(
                    f"Redis {shard.address} counts no subscriber of {target!r}: the "
                    "subscription is stale (failover or slot move)"
                )

    async def _execute(self, shard: _Shard, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` on ``shard``'s writer in one write and read every reply (error
        replies returned, not raised)."""
        async with shard.lock:
            return await execute(shard.writer, commands, self.command_timeout)

    async def _discover(self) -> tuple[list[tuple[str, int]], list[int]]:
        """The primaries and the owner of every slot, from the first node that answers
        ``CLUSTER SLOTS`` (the seeds, then every node seen before)."""
        error: Exception | None = None
        for host, port in list(dict.fromkeys(self._known)):
            pool = self._pool(host, port)
            conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                async with asyncio.timeout(self.command_timeout):
                    await conn.connect()  # type: ignore[no-untyped-call]
                    await conn.send_command("CLUSTER", "SLOTS", check_health=False)
                    reply = await conn.read_response()
            except (RedisError, OSError, TimeoutError) as exc:
                error = exc
                continue
            finally:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            primaries: dict[tuple[str, int], int] = {}
            owner = [-1] * SLOTS
            known: list[tuple[str, int]] = []
            for entry in reply:
                start, end, nodes = int(entry[0]), int(entry[1]), entry[2:]
                addresses = [(_text(n[0]) or host, int(n[1])) for n in nodes]
                known += addresses
                index = primaries.setdefault(addresses[0], len(primaries))
                owner[start : end + 1] = [index] * (end + 1 - start)
            if -1 in owner:
                error = BackendUnavailable(
                    f"Redis Cluster at {host}:{port} does not cover every slot yet"
                )
                continue
            self._known = [*self.spec.seeds, *known]
            return list(primaries), owner
        raise BackendUnavailable(
            f"no node of {self.where} answered CLUSTER SLOTS"
            + (f" ({describe(error)})" if error else "")
        )

    def _pool(self, host: str, port: int) -> ConnectionPool:
        return ConnectionPool.from_url(
            self.spec.node_url(host, port),
            socket_connect_timeout=self.connect_timeout,
            socket_timeout=None,  # the subscriber blocks on reads; liveness is probed
            retry=Retry(NoBackoff(), 0),  # the Cluster reconnects, with its own backoff
            health_check_interval=0,
            protocol=2,  # RESP2: shard messages arrive as plain replies
        )

    def _require(self) -> None:
        if not self._up:
            raise BackendUnavailable(f"Redis at {self.where} is not connected")

    # --- LeaseStore ---
    def _open_store(self) -> RedisCluster:
        if self._client is None:
            options: dict[str, Any] = {
                "socket_connect_timeout": self.connect_timeout,
                "socket_timeout": self.command_timeout,
                "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
                "protocol": 2,
            }
            # Credentials, TLS and the query's options, as for one node.
            options.update(parse_url(self.spec.node_url(*self.spec.seeds[0])))
            for name in ("host", "port", "db", "path", "connection_class"):
                options.pop(name, None)
            if self.spec.tls:
                options["ssl"] = True
            self._client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self.spec.seeds],
                **options,
            )
        return self._client

    def _store(self) -> RedisCluster:
        if self._client is None or not self._up:
            raise BackendUnavailable(f"Redis at {self.where} is not connected")
        return self._client

    async def _call(self, *args: Any) -> Any:
        client = self._store()
        try:
            async with asyncio.timeout(self.command_timeout):
                return await client.execute_command(*args)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"Redis: {describe(exc)}") from exc

    async def _batch(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``commands`` as cluster pipelines of at most MAX_BATCH (each split per primary and
        run concurrently by redis-py). Error replies about data (WRONGTYPE) are returned; any
        other failure raises BackendUnavailable."""
        client = self._store()
        replies: list[Any] = []
        for start in range(0, len(commands), MAX_BATCH):
            pipe = client.pipeline(transaction=False)
            for command in commands[start : start + MAX_BATCH]:
                pipe.execute_command(*command)
            try:
                async with asyncio.timeout(self.command_timeout):
                    replies += await pipe.execute(raise_on_error=False)
            except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
                raise BackendUnavailable(f"Redis: {describe(exc)}") from exc
        for reply in replies:
            if isinstance(reply, Exception) and (
                not isinstance(reply, ResponseError) or isinstance(reply, _TOPOLOGY_ERRORS)
            ):
                if not isinstance(reply, ResponseError):
                    # A pipeline leaves a lost node in the slot map (the single commands'
                    # path does not): read it again at the next command.
                    with contextlib.suppress(Exception):
                        await client.aclose()
                raise BackendUnavailable(f"Redis: {describe(reply)}")
        return replies

    async def claim(self, key: str, token: str, node_id: str, ttl: float) -> bool:
        return bool(await self._call("EVAL", _CLAIM, 1, key, token, node_id, _ms(ttl)))

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        return bool(await self._call("EVAL", _RENEW, 1, key, token, _ms(ttl)))

    async def release(self, key: str, token: str, node_id: str | None = None) -> bool:
        return bool(await self._call("EVAL", _RELEASE, 1, key, token, node_id or ""))

    async def lookup(self, key: str) -> Claim | None:
        node, token = await self._call("HMGET", key, "node", "token")
        if node is None or token is None:
            return None
        return Claim(_text(node), _text(token))

    async def claimed(self, prefix: str, limit: int) -> list[str]:
        client = self._store()
        pattern = _glob(prefix) + "*"

        async def scan(node: ClusterNode) -> list[str]:
            keys: list[str] = []
            cursor = 0
            while True:
                reply = await node.execute_command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
                cursor, batch = int(reply[0]), reply[1]
                keys += [_text(key) for key in batch]
                if cursor == 0 or len(keys) >= limit:
                    return keys

        try:
            async with asyncio.timeout(self.command_timeout):
                if not client.get_primaries():  # not discovered yet
                    await client.initialize()
                found = await gather_all(scan(node) for node in client.get_primaries())
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"Redis: {describe(exc)}") from exc
        return list(dict.fromkeys(key for keys in found for key in keys))[:limit]

    async def reclaim(
        self, claims: Mapping[str, tuple[str, float]], releases: Mapping[str, str], node_id: str
    ) -> dict[str, Claim | None]:
        if not claims and not releases:
            return {}
        commands: list[tuple[Any, ...]] = [
            ("EVAL", _CLAIM, 1, key, token, node_id, _ms(ttl))
            for key, (token, ttl) in claims.items()
        ]
        commands += [("EVAL", _RELEASE, 1, key, token, "") for key, token in releases.items()]
        replies = await self._batch(commands)
        taken = [key for key, reply in zip(claims, replies, strict=False) if reply != 1]
        found: dict[str, Claim | None] = {}
        holders = await self._batch([("HMGET", key, "node", "token") for key in taken])
        for key, reply in zip(taken, holders, strict=True):
            node, owner = reply if isinstance(reply, list) else (None, None)
            found[key] = None if node is None or owner is None else Claim(_text(node), _text(owner))
        return found

    async def settle(self, grace: float) -> float:
        epoch, settling, ms = EPOCH.encode(), SETTLING.encode(), _ms(grace)
        replies = await self._batch(
            [
                ("EVAL", _SETTLE, 2, b"{%b}%b" % (tag, epoch), b"{%b}%b" % (tag, settling), ms)
                for tag in partition_tags(len(self.partitions))
            ]
        )
        left = max((int(r) for r in replies if isinstance(r, int)), default=0)
        return max(0, left) / 1000

    async def set_counts(self, node_id: str, counts: Mapping[str, int], ttl: float) -> None:
        seconds = _seconds(ttl)
        # The alive mark first: a reader that sees a count written below sees the mark too.
        await self._call("SET", self.names.alive(node_id), "1", "EX", seconds)
        commands: list[tuple[Any, ...]] = []
        for key, count in counts.items():
            if count > 0:
                commands += [("HSET", key, node_id, count), ("EXPIRE", key, seconds)]
            else:
                commands.append(("HDEL", key, node_id))
        for reply in await self._batch(commands):
            if isinstance(reply, ResponseError):
                presence_log.warning("Redis refused a presence write: %s", reply)

    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, int]]:
        hashes: list[dict[str, bytes]] = []
        for reply in await self._batch([("HGETALL", key) for key in keys]):
            if isinstance(reply, dict):
                hashes.append({_text(k): v for k, v in reply.items()})
            elif isinstance(reply, list):
                hashes.append({_text(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)})
            else:
                hashes.append({})
        nodes = sorted({node for one in hashes for node in one})
        if not nodes:
            return [{} for _ in keys]
        alive = await self._batch([("EXISTS", self.names.alive(node)) for node in nodes])
        dead = {node for node, exists in zip(nodes, alive, strict=True) if exists != 1}
        drops: list[tuple[Any, ...]] = []
        counts: list[dict[str, int]] = []
        for key, one in zip(keys, hashes, strict=True):
            mine: dict[str, int] = {}
            for node, raw in one.items():
                if node in dead:
                    drops.append(("EVAL", _DROP_FIELD, 1, key, node, raw))
                    continue
                with contextlib.suppress(ValueError):
                    mine[node] = int(raw)
            counts.append(mine)
        if drops:
            await self._batch(drops)
        return counts

    async def remove_node(
        self, node_id: str, keys: Iterable[str], claims: Mapping[str, str]
    ) -> None:
        commands: list[tuple[Any, ...]] = [("HDEL", key, node_id) for key in keys]
        commands.append(("DEL", self.names.alive(node_id)))
        commands += [("EVAL", _RELEASE, 1, key, token, node_id) for key, token in claims.items()]
        await self._batch(commands)

    async def close(self) -> None:
        self._up = False
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
        self._client = None


class RedisClusterBackend(Cluster):
    """A node on a Redis Cluster: the Cluster over a ``ClusterLink``."""

    def __init__(self, settings: Settings, url: str | None = None) -> None:
        self.url = url or settings.server.backend_url
        self.link = ClusterLink(self.url, settings.redis)
        self.safe_url = self.link.where
        super().__init__(settings.server.node_id, self.link, self.link, settings.redis)
