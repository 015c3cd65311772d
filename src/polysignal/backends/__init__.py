"""Backends selected by URL (docs/architecture.md): ``memory://`` (default), ``redis://`` (one
Redis), ``redis+cluster://`` (a Redis Cluster) and ``redis://a,redis://b`` (standalone shards).

Each is the ``Cluster`` (cluster.py) over a Bus and a LeaseStore (interfaces.py): in-process
(memory.py), on one Redis (redis.py), on a Redis Cluster (rediscluster.py), or on several
standalone Redis servers placed by jump hash (shards.py).
"""

from __future__ import annotations

from polysignal.backends.base import Backend, BackendUnavailable, Claim
from polysignal.backends.cluster import Cluster
from polysignal.backends.memory import MemoryBackend, MemoryBus
from polysignal.config import Settings

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Claim",
    "Cluster",
    "MemoryBackend",
    "MemoryBus",
    "create_backend",
]


def create_backend(settings: Settings) -> Backend:
    """The backend ``settings.server.backend_url`` names."""
    scheme = settings.backend_scheme
    if scheme == "memory":
        return MemoryBackend(settings.server.node_id, settings=settings.redis)
    if scheme in ("redis+cluster", "rediss+cluster"):
        from polysignal.backends.rediscluster import RedisClusterBackend

        return RedisClusterBackend(settings)
    if scheme == "redis+shards":
        from polysignal.backends.shards import ShardedBackend

        return ShardedBackend(settings)
    from polysignal.backends.redis import RedisBackend

    return RedisBackend(settings)
