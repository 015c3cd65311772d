"""In-process backend: the default for one node, and the test double for several.

Nodes created with the same ``MemoryBus`` behave like nodes sharing one Redis: fan-out reaches
only the other nodes with subscribers for a topic, presence sums every node's count, claims and
direct delivery are cluster-wide. Deliveries are scheduled with ``call_soon``, never run inside
the sender's call, so ordering and re-entrancy match a real bus.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from polysignal.backends.base import TOPICS, Backend, Claim


@dataclass
class MemoryBus:
    """State shared by the in-process nodes of one "cluster"."""

    nodes: dict[str, MemoryBackend] = field(default_factory=dict)
    # (namespace, topic) -> node id -> that node's local subscriber count
    presence: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    claims: dict[str, tuple[Claim, float]] = field(default_factory=dict)

    def holder(self, key: str) -> Claim | None:
        entry = self.claims.get(key)
        if entry is None:
            return None
        claim, expires = entry
        if expires <= time.monotonic():
            del self.claims[key]
            return None
        return claim


class MemoryBackend(Backend):
    def __init__(self, node_id: str, bus: MemoryBus | None = None) -> None:
        super().__init__(node_id)
        self.bus = bus if bus is not None else MemoryBus()
        self._started = False

    async def start(self) -> None:
        self.bus.nodes[self.node_id] = self
        self._started = True
        self._became_ready()

    async def close(self) -> None:
        self.bus.nodes.pop(self.node_id, None)
        for topic in list(self.bus.presence):
            counts = self.bus.presence[topic]
            counts.pop(self.node_id, None)
            if not counts:
                del self.bus.presence[topic]
        for key, (claim, _) in list(self.bus.claims.items()):
            if claim.node_id == self.node_id:
                del self.bus.claims[key]
        self._started = False

    @property
    def ready(self) -> bool:
        return self._started

    def local_count_changed(self, topic: str, count: int, namespace: str = TOPICS) -> None:
        key = (namespace, topic)
        if count > 0:
            self.bus.presence.setdefault(key, {})[self.node_id] = count
            return
        counts = self.bus.presence.get(key)
        if counts is not None:
            counts.pop(self.node_id, None)
            if not counts:
                del self.bus.presence[key]

    async def topic_clients(self, topic: str, local_count: int, namespace: str = TOPICS) -> int:
        return self.topic_clients_nowait(topic, local_count, namespace)

    def topic_clients_nowait(self, topic: str, local_count: int, namespace: str = TOPICS) -> int:
        counts = self.bus.presence.get((namespace, topic))
        if not counts:
            return local_count
        return sum(counts.values()) - counts.get(self.node_id, 0) + local_count

    async def publish(self, topic: str, frame: bytes, namespace: str = TOPICS) -> None:
        self.publish_nowait(topic, frame, namespace)

    def publish_nowait(self, topic: str, frame: bytes, namespace: str = TOPICS) -> bool:
        counts = self.bus.presence.get((namespace, topic))
        if not counts:
            return True
        loop = asyncio.get_running_loop()
        for node_id in counts:
            if node_id != self.node_id:
                node = self.bus.nodes.get(node_id)
                if node is not None:
                    loop.call_soon(node._deliver_topic, namespace, topic, frame)
        return True

    async def send_direct(self, node_id: str, kind: str, payload: bytes) -> bool:
        node = self.bus.nodes.get(node_id)
        if node is None:
            return False
        asyncio.get_running_loop().create_task(node._deliver_direct(self.node_id, kind, payload))
        return True

    async def claim(self, key: str, token: str, ttl: float) -> bool:
        holder = self.bus.holder(key)
        if holder is not None and holder.token != token:
            return False
        self.bus.claims[key] = (Claim(self.node_id, token), time.monotonic() + ttl)
        return True

    async def renew(self, key: str, token: str, ttl: float) -> bool:
        holder = self.bus.holder(key)
        if holder is None or holder.token != token:
            return False
        self.bus.claims[key] = (holder, time.monotonic() + ttl)
        return True

    async def release(self, key: str, token: str) -> bool:
        holder = self.bus.holder(key)
        if holder is None or holder.token != token:
            return False
        del self.bus.claims[key]
        return True

    async def lookup(self, key: str) -> Claim | None:
        return self.bus.holder(key)
