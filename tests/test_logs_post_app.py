"""``POST /app`` against password guessing: wrong passwords counted per client address, 429 with
``Retry-After`` past ``APP_MAX_FAILURES``, each failure logged with its address
(docs/protocols/rooms.md, "POST /app"; docs/operations.md, "Logs")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from polysignal.server.rooms import TOO_MANY_FAILURES
from rooms_client import PASSWORD, rooms_settings

from support import UNIT, RunningServer, node_settings, running_server

pytestmark = pytest.mark.timeout(60)

WRONG = {"app": "a", "password": "wrong"}
RIGHT = {"app": "a", "password": PASSWORD}
UNAUTHORIZED = {"status": 401, "error": "Unauthorized", "response": False}
LOCKED = {"status": 429, "error": TOO_MANY_FAILURES, "response": False}


@pytest.fixture
async def rooms() -> AsyncIterator[RunningServer]:
    async with running_server(node_settings(**rooms_settings())) as srv:
        yield srv


async def post(
    srv: RunningServer, form: dict[str, str], session: aiohttp.ClientSession | None = None
) -> tuple[int, Any, str | None]:
    async with (session or srv.session).post(f"{srv.url}/app", data=form) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


def warnings(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.getMessage(), r.__dict__.get("remote", ""))
        for r in caplog.records
        if r.name == "polysignal.rooms" and r.levelno == logging.WARNING
    ]


async def test_the_sixth_wrong_password_is_answered_429_and_every_failure_is_logged(rooms, caplog):
    caplog.set_level(logging.WARNING, logger="polysignal.rooms")
    for _ in range(5):
        assert await post(rooms, WRONG) == (401, UNAUTHORIZED, None)
    status, body, retry_after = await post(rooms, WRONG)
    assert (status, body) == (429, LOCKED)
    assert retry_after is not None and 1 <= int(retry_after) <= 60
    # Locked out whatever it sends, the right password too: guessing cannot go on.
    assert (await post(rooms, RIGHT))[:2] == (429, LOCKED)
    assert warnings(caplog) == [
        *[(f"POST /app: wrong password ({n} of 5 within 60s)", "127.0.0.1") for n in range(1, 6)],
        (
            f"POST /app refused (429, retry after {retry_after}s): 5 wrong passwords within 60s",
            "127.0.0.1",
        ),
    ]  # the second refusal is held back (once per interval, counted in the next line)


async def test_a_success_does_not_count_and_another_address_is_not_affected(rooms):
    for _ in range(4):
        assert (await post(rooms, WRONG))[0] == 401
    status, body, _ = await post(rooms, RIGHT)
    assert status == 200 and body["error"] is None
    assert (await post(rooms, WRONG))[0] == 401  # the fifth failure: the success did not count
    assert (await post(rooms, WRONG))[:2] == (429, LOCKED)
    # 127.0.0.2, another loopback address, has its own count.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as other:
        assert await post(rooms, WRONG, other) == (401, UNAUTHORIZED, None)
        status, body, _ = await post(rooms, RIGHT, other)
        assert status == 200 and body["error"] is None
    assert (await post(rooms, RIGHT))[:2] == (429, LOCKED)


async def test_after_retry_after_seconds_the_address_may_try_again():
    window = 2 * UNIT
    settings = node_settings(**rooms_settings(), app_max_failures=2, app_failure_window=window)
    async with running_server(settings) as srv:
        assert [(await post(srv, WRONG))[0] for _ in range(2)] == [401, 401]
        status, _, retry_after = await post(srv, RIGHT)
        assert status == 429 and retry_after is not None and 1 <= int(retry_after) <= window
        await asyncio.sleep(int(retry_after))  # what Retry-After promises
        status, body, _ = await post(srv, RIGHT)
        assert status == 200 and body["error"] is None


async def test_no_limit_with_app_max_failures_0(caplog):
    caplog.set_level(logging.WARNING, logger="polysignal.rooms")
    settings = node_settings(**rooms_settings(), app_max_failures=0)
    async with running_server(settings) as srv:
        assert [(await post(srv, WRONG))[0] for _ in range(8)] == [401] * 8
    failures = [m for m, _ in warnings(caplog) if "wrong password" in m]
    assert failures == ["POST /app: wrong password"]  # once per interval, the rest held back
