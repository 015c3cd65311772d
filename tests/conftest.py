"""Fixtures shared by every tier; the helpers themselves live in ``support.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from support import RunningServer, redis_server, running_server


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
