"""Fixtures of the backend contract suite (helpers in ``cluster.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

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
