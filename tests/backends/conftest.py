"""Fixtures of the backend contract suite (helpers in ``cluster.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from backends.cluster import Cluster

URL_FIXTURES = {"redis": "redis_url", "cluster": "cluster_url", "shards": "shards_url"}
"""The fixture (tests/conftest.py) with the backend URL of each kind but memory."""


@pytest.fixture(
    params=[
        "memory",
        "redis",
        pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.slow]),
        pytest.param("shards", marks=pytest.mark.redis),
    ]
)
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    """The contract suite runs once per backend: memory, one Redis, a Redis Cluster (3
    primaries + 3 replicas) and standalone shards (two redis-servers, jump hash)."""
    fixture = URL_FIXTURES.get(request.param)
    url = request.getfixturevalue(fixture) if fixture else None
    made = Cluster(request.param, url)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def redis_cluster(redis_url: str) -> AsyncIterator[Cluster]:
    made = Cluster("redis", redis_url)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client of the test Redis, to look at or upset what the nodes keep there."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()
