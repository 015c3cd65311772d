"""Fixtures of the backend contract suite (helpers in ``cluster.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from backends.cluster import Cluster


@pytest.fixture(params=["memory", "redis"])
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    """The contract suite runs once per backend."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
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
