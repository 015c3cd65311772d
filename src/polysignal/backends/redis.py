"""Redis backend: many processes and hosts act as one signaling server (docs/redis.md).

Every semantic is the ``Cluster``'s (cluster.py); this module moves its bytes and keys on Redis
(``RedisLink``: its Bus and its LeaseStore; names from names.py, ``P`` = ``SIGNAL_CHANNEL``):

* Bus: pub/sub on two dedicated connections per connection epoch. The subscriber connection is
  read by ``serve``: messages go to the listener, SUBSCRIBE/UNSUBSCRIBE confirmations are
  counted, and it is PINGed every ``redis_keepalive`` seconds (silence for three times that is a
  lost connection). On the writer connection a batch of PUBLISHes is one pipelined write and one
  round trip, answered within ``redis_command_timeout``. RESP2, so messages arrive as plain
  replies.
* LeaseStore, on a connection pool: claims are hashes ``P:claim:{id}`` (token, node) with a
  PEXPIRE lease, changed only by Lua scripts (atomic claim/takeover/renew/release), claimed again
  in pipelined batches when a node reconnects (``reclaim``); ``polysignal:epoch`` tells whether
  Redis lost its data, ``polysignal:settling`` is the settle window then (``settle``). Counts are
  hashes, field = node id, value = count (Flow-Like's ``topic:presence:{topic}`` for the topics
  protocol), EXPIRE'd; ``P:alive:{node}`` says a node is alive, with the same TTL, and the Lua
  read deletes the fields of nodes whose alive key is gone.

Connections open within ``redis_connect_timeout``; no command is retried here (the Cluster
reconnects, with its own backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from polysignal.backends.base import BackendUnavailable, Claim
from polysignal.backends.cluster import MAX_BATCH, Cluster
from polysignal.backends.interfaces import Bus, LeaseStore, Listener, describe, first_error
from polysignal.backends.names import EPOCH, SETTLING, Names, escape, presence_key, redis_name
from polysignal.config import RedisSettings, Settings, redact_url

__all__ = ["RedisBackend", "RedisLink", "escape", "presence_key", "redis_name"]

presence_log = logging.getLogger("polysignal.presence")

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
# Settling: the first node to find the epoch key missing starts the window for every node.
# KEYS = epoch, settling; ARGV[1] = the grace in ms. Answers the ms left of the window.
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], '1')
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
end
local left = redis.call('PTTL', KEYS[2])
if left < 0 then return 0 end
return left
"""
# Counts read: the hash without the fields of nodes whose alive key expired (deleted here).
_READ_COUNTS = """
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
class _Confirm:
    """A SUBSCRIBE or UNSUBSCRIBE waiting for one confirmation per channel."""

    kind: bytes
    remaining: int
    future: asyncio.Future[None]


class RedisLink(Bus, LeaseStore):
    """One node's Bus and LeaseStore on Redis; see the module docstring."""

    name = "Redis"

    def __init__(self, url: str, settings: RedisSettings) -> None:
        self.url = url
        self.where = redact_url(url)
        self.names = Names(settings.signal_channel)
        self.connect_timeout = settings.redis_connect_timeout
        self.command_timeout = settings.redis_command_timeout
        self.keepalive = settings.redis_keepalive
        self._listener: Listener = _ignore
        self._up = False
        self._pool: ConnectionPool | None = None
        self._sub_pool: ConnectionPool | None = None
        self._client: Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._sub: AbstractConnection | None = None
        self._writer: AbstractConnection | None = None
        self._confirms: deque[_Confirm] = deque()
        self._last_rx = 0.0

    # --- Bus: the connection ---
    def listen(self, listener: Listener) -> None:
        self._listener = listener

    async def connect(self) -> None:
        pool, sub_pool = self._open()
        sub: AbstractConnection = sub_pool.make_connection()  # type: ignore[no-untyped-call]
        writer: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        self._sub, self._writer = sub, writer
        async with asyncio.timeout(self.connect_timeout):
            await sub.connect()  # type: ignore[no-untyped-call]
            await writer.connect()  # type: ignore[no-untyped-call]
        self._last_rx = time.monotonic()
        self._up = True

    async def serve(self) -> None:
        sub = self._require(self._sub)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._keepalive(sub), name="redis-keepalive")
                await self._read(sub)
        except BaseExceptionGroup as group_exc:
            first = first_error(group_exc)
            if first is None:
                raise
            raise first from None

    async def disconnect(self) -> None:
        self._up = False
        while self._confirms:
            future = self._confirms.popleft().future
            if not future.done():
                future.set_exception(BackendUnavailable("Redis connection lost"))
                future.exception()
        for conn in (self._sub, self._writer):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
        self._sub = self._writer = None

    # --- Bus: messages ---
    async def subscribe(self, channels: Sequence[bytes]) -> None:
        await self._confirmed("SUBSCRIBE", b"subscribe", channels)

    async def unsubscribe(self, channels: Sequence[bytes]) -> None:
        await self._confirmed("UNSUBSCRIBE", b"unsubscribe", channels)

    async def publish(self, channels: Sequence[bytes], payloads: Sequence[bytes]) -> list[int]:
        writer = self._require(self._writer)
        if len(channels) > MAX_BATCH:
            received: list[int] = []
            for start in range(0, len(channels), MAX_BATCH):
                end = start + MAX_BATCH
                received += await self.publish(channels[start:end], payloads[start:end])
            return received
        commands = [("PUBLISH", c, d) for c, d in zip(channels, payloads, strict=True)]
        return [r if isinstance(r, int) else 0 for r in await self._execute(writer, commands)]

    async def _confirmed(self, command: str, kind: bytes, channels: Sequence[bytes]) -> None:
        """Send ``command`` in batches and wait until Redis confirmed every channel."""
        sub = self._require(self._sub)
        loop = asyncio.get_running_loop()
        for start in range(0, len(channels), MAX_BATCH):
            chunk = channels[start : start + MAX_BATCH]
            waiting = _Confirm(kind, len(chunk), loop.create_future())
            self._confirms.append(waiting)
            await sub.send_command(command, *chunk, check_health=False)
            async with asyncio.timeout(self.command_timeout):
                await waiting.future

    async def _read(self, sub: AbstractConnection) -> None:
        """Read the subscriber connection: messages, confirmations, pongs."""
        read = sub.read_response
        while True:
            response = await read()
            self._last_rx = time.monotonic()
            if not isinstance(response, list) or len(response) < 2:
                continue
            kind = response[0]
            if kind == b"message" and len(response) == 3:
                self._listener(response[1], response[2])
            elif kind == b"subscribe" or kind == b"unsubscribe":
                for waiting in self._confirms:
                    if waiting.kind == kind:
                        waiting.remaining -= 1
                        if waiting.remaining <= 0:
                            self._confirms.remove(waiting)
                            if not waiting.future.done():
                                waiting.future.set_result(None)
                        break

    async def _keepalive(self, sub: AbstractConnection) -> None:
        """Ping the subscriber connection; a silent one is dead (a half-open TCP connection)."""
        while True:
            await asyncio.sleep(self.keepalive)
            if time.monotonic() - self._last_rx > 3 * self.keepalive:
                raise TimeoutError(f"no reply from Redis for {3 * self.keepalive:g}s")
            await sub.send_command("PING", check_health=False)

    async def _execute(
        self, conn: AbstractConnection, commands: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        return await execute(conn, commands, self.command_timeout)

    # --- LeaseStore: claims ---
    async def claim(self, key: str, token: str, node_id: str, ttl: float) -> bool:
        return bool(await self._script("claim", key, token, node_id, _ms(ttl)))

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        return bool(await self._script("renew", key, token, _ms(ttl)))

    async def release(self, key: str, token: str, node_id: str | None = None) -> bool:
        return bool(await self._script("release", key, token, node_id or ""))

    async def lookup(self, key: str) -> Claim | None:
        client = self._store_client()
        try:
            node, token = await client.hmget(key, ["node", "token"])
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis: {describe(exc)}") from exc
        if node is None or token is None:
            return None
        return Claim(_text(node), _text(token))

    async def claimed(self, prefix: str, limit: int) -> list[str]:
        client = self._store_client()
        found: dict[str, None] = {}  # SCAN may return a key twice
        try:
            async for key in client.scan_iter(match=_glob(prefix) + "*", count=1000):
                found[_text(key)] = None
                if len(found) >= limit:
                    break
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis: {describe(exc)}") from exc
        return list(found)

    async def reclaim(
        self, claims: Mapping[str, tuple[str, float]], releases: Mapping[str, str], node_id: str
    ) -> dict[str, Claim | None]:
        if not claims and not releases:
            return {}
        client = self._store_client()
        claim, release = self._scripts["claim"], self._scripts["release"]
        calls = [(claim, key, [token, node_id, _ms(ttl)]) for key, (token, ttl) in claims.items()]
        calls += [(release, key, [token, ""]) for key, token in releases.items()]
        replies: list[Any] = []
        for start in range(0, len(calls), MAX_BATCH):
            pipe = client.pipeline(transaction=False)
            for script, key, args in calls[start : start + MAX_BATCH]:
                await script(keys=[key], args=args, client=pipe)
            replies += await self._run(pipe)
        taken = [key for key, reply in zip(claims, replies, strict=False) if reply != 1]
        found: dict[str, Claim | None] = {}
        for start in range(0, len(taken), MAX_BATCH):
            chunk = taken[start : start + MAX_BATCH]
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.hmget(key, ["node", "token"])
            for key, reply in zip(chunk, await self._run(pipe), strict=True):
                holder: list[Any] = reply if isinstance(reply, list) else [None, None]
                node, owner = holder
                found[key] = (
                    None if node is None or owner is None else Claim(_text(node), _text(owner))
                )
        return found

    async def settle(self, grace: float) -> float:
        self._store_client()
        try:
            left = await self._scripts["settle"](keys=[EPOCH, SETTLING], args=[_ms(grace)])
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis: {describe(exc)}") from exc
        return max(0, int(left)) / 1000

    # --- LeaseStore: counts ---
    async def set_counts(self, node_id: str, counts: Mapping[str, int], ttl: float) -> None:
        client = self._store_client()
        seconds = _seconds(ttl)
        commands: list[tuple[Any, ...]] = [("SET", self.names.alive(node_id), "1", "EX", seconds)]
        for key, count in counts.items():
            if count > 0:
                commands += [("HSET", key, node_id, count), ("EXPIRE", key, seconds)]
            else:
                commands.append(("HDEL", key, node_id))
        for start in range(0, len(commands), MAX_BATCH):
            pipe = client.pipeline(transaction=False)
            for command in commands[start : start + MAX_BATCH]:
                pipe.execute_command(*command)
            for reply in await self._run(pipe):
                if isinstance(reply, ResponseError):
                    # e.g. WRONGTYPE: something else owns a presence key's name.
                    presence_log.warning("Redis refused a presence write: %s", reply)

    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, int]]:
        client = self._store_client()
        read, args = self._scripts["read"], [self.names.alive_prefix]
        if len(keys) == 1:  # one EVALSHA, no pipeline (which checks its scripts first)
            try:
                return [_counts(await read(keys=list(keys), args=args))]
            except (RedisError, OSError) as exc:
                raise BackendUnavailable(f"Redis: {describe(exc)}") from exc
        pipe = client.pipeline(transaction=False)
        for key in keys:
            await read(keys=[key], args=args, client=pipe)
        return [_counts(raw) for raw in await self._run(pipe)]

    async def remove_node(
        self, node_id: str, keys: Iterable[str], claims: Mapping[str, str]
    ) -> None:
        client = self._store_client()
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hdel(key, node_id)
        pipe.delete(self.names.alive(node_id))
        for key, token in claims.items():
            await self._scripts["release"](keys=[key], args=[token, node_id], client=pipe)
        await self._run(pipe)

    async def close(self) -> None:
        self._up = False
        if self._client is not None:
            await self._client.aclose()
        for pool in (self._pool, self._sub_pool):
            if pool is not None:
                await pool.disconnect()
        self._client = self._pool = self._sub_pool = None

    # --- helpers ---
    def _open(self) -> tuple[ConnectionPool, ConnectionPool]:
        if self._pool is None or self._sub_pool is None:
            common: dict[str, Any] = {
                "socket_connect_timeout": self.connect_timeout,
                "retry": Retry(NoBackoff(), 0),  # the Cluster reconnects, with its own backoff
                "health_check_interval": 0,
                # RESP2: bus messages arrive as plain replies on the subscriber connection (with
                # RESP3, redis-py routes them to push handlers instead).
                "protocol": 2,
            }
            self._pool = ConnectionPool.from_url(
                self.url, socket_timeout=self.command_timeout, **common
            )
            # The subscriber connection blocks on reads without a socket timeout; liveness is
            # checked by keepalive pings instead.
            self._sub_pool = ConnectionPool.from_url(self.url, socket_timeout=None, **common)
            self._client = Redis(connection_pool=self._pool)
            for name, source in (
                ("settle", _SETTLE),
                ("claim", _CLAIM),
                ("renew", _RENEW),
                ("release", _RELEASE),
                ("read", _READ_COUNTS),
            ):
                self._scripts[name] = self._client.register_script(source)
        return self._pool, self._sub_pool

    def _require(self, conn: AbstractConnection | None) -> AbstractConnection:
        if conn is None or not self._up:
            raise BackendUnavailable(f"Redis at {self.where} is not connected")
        return conn

    def _store_client(self) -> Redis:
        if self._client is None or not self._up:
            raise BackendUnavailable(f"Redis at {self.where} is not connected")
        return self._client

    async def _script(self, name: str, key: str, *args: Any) -> Any:
        self._store_client()
        try:
            return await self._scripts[name](keys=[key], args=list(args))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis: {describe(exc)}") from exc

    @staticmethod
    async def _run(pipe: Any) -> list[Any]:
        try:
            result: list[Any] = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis: {describe(exc)}") from exc
        return result


async def execute(
    conn: AbstractConnection, commands: Sequence[tuple[Any, ...]], seconds: float
) -> list[Any]:
    """Send ``commands`` on ``conn`` in one write and read every reply within ``seconds``
    seconds (error replies returned, not raised)."""
    if not commands:
        return []
    replies: list[Any] = []
    try:
        async with asyncio.timeout(seconds):
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
    except BaseException:
        # Replies may be left unread: the connection must not carry another batch.
        await conn.disconnect(nowait=True)
        raise
    return replies


class RedisBackend(Cluster):
    """A node on Redis: the Cluster over a ``RedisLink`` to ``url`` (default: the settings')."""

    def __init__(self, settings: Settings, url: str | None = None) -> None:
        self.url = url or settings.server.backend_url
        self.link = RedisLink(self.url, settings.redis)
        self.safe_url = self.link.where
        super().__init__(settings.server.node_id, self.link, self.link, settings.redis)


def _counts(raw: list[bytes]) -> dict[str, int]:
    """A read's flat [node, count, ...] reply as a dict (unreadable counts skipped)."""
    counts: dict[str, int] = {}
    for i in range(0, len(raw) - 1, 2):
        try:
            counts[raw[i].decode(errors="replace")] = int(raw[i + 1])
        except ValueError:
            continue
    return counts


def _ignore(channel: bytes, data: bytes) -> None:
    return None


def _glob(text: str) -> str:
    """``text`` as a literal in a Redis glob pattern (SCAN's MATCH)."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))
