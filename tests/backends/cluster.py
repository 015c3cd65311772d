"""A "cluster" of backends for the contract suite: in-process memory nodes, or nodes on Redis
(one Redis, a Redis Cluster, or standalone shards: whatever backend URL ``redis_url`` is)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from polysignal.backends import Backend, MemoryBackend, MemoryBus, create_backend

from support import UNIT, node_settings


class Cluster:
    """Nodes of one cluster; every name made by ``topic``/``key`` is unique to the test."""

    def __init__(self, kind: str, redis_url: str | None, **settings: Any) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.uid = uuid.uuid4().hex[:10]
        self.bus = MemoryBus()
        self.settings = settings
        self.nodes: list[Backend] = []

    def topic(self, name: str = "room") -> str:
        return f"{self.uid}:{name}"

    def key(self, name: str = "peer") -> str:
        return f"{self.uid}/{name}"

    async def node(self, name: str, **settings: Any) -> Backend:
        """A started node named ``name`` (ready for cross-node work)."""
        node_id = f"{self.uid}-{name}"
        backend: Backend
        if self.kind == "memory":
            backend = MemoryBackend(node_id, self.bus)
        else:
            assert self.redis_url is not None
            merged = {
                "presence_ttl": 5,
                "presence_refresh": 1.0,
                "presence_cache_ttl": 1.0,
                "redis_backoff_max": 0.5,
                **self.settings,
                **settings,
            }
            backend = create_backend(
                node_settings(
                    node_id=node_id,
                    backend_url=self.redis_url,
                    signal_channel=f"test:{self.uid}",
                    **merged,
                )
            )
        self.nodes.append(backend)
        await backend.start()
        await eventually(lambda: _ready(backend), f"{name} ready")
        return backend

    async def settle(self) -> None:
        """Every node's changes so far are visible to, and applied by, every other node.

        Two rounds: the first flushes every node's writes, the second makes every node's
        reader catch up with all of them.
        """
        for _ in range(2):
            for node in self.nodes:
                if node.ready:
                    await node.sync()

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()


async def _ready(backend: Backend) -> bool:
    return backend.ready


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 5 * UNIT
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


class Inbox:
    """Collects what a node's handlers receive, and waits for it."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._event = asyncio.Event()

    def __call__(self, *item: Any) -> None:
        self.items.append(item)
        self._event.set()

    async def next(self, timeout: float = 3 * UNIT) -> Any:
        async with asyncio.timeout(timeout):
            while not self.items:
                self._event.clear()
                await self._event.wait()
        return self.items.pop(0)

    async def silent(self, wait: float = 0.3 * UNIT) -> None:
        await asyncio.sleep(wait)
        assert self.items == [], f"expected nothing, got {self.items!r}"
