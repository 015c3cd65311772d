"""Backends selected by URL: ``memory://`` (default) and ``redis://`` (docs/architecture.md).

Either is the ``Cluster`` (cluster.py) over a Bus and a LeaseStore (interfaces.py): in-process
(memory.py) or on Redis (redis.py).
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
    if settings.backend_scheme == "memory":
        return MemoryBackend(settings.server.node_id, settings=settings.redis)
    from polysignal.backends.redis import RedisBackend

    return RedisBackend(settings)
