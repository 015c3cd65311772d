"""The published ``peerjs`` 1.5 client in isolated headless Chromium contexts, through polysignal.

tests/js/peerjs_browser.mjs drives the pages and takes the server's URL, so the same cases run
against the original server, ``peer`` 1.0.2 (tests/js/peerjs_reference_server.mjs): the
compatible ones pass there too (``test_reference_server_*``), which shows the harness is right.
The original fails the ghost-id cases: it keeps a dead socket's id, answering ID-TAKEN to a new
token until its alive timeout (90 s), and re-attaches the same token without sending OPEN, so
the client never opens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from support import (
    JS_DIR,
    UNIT,
    RunningServer,
    chromium_ready,
    node_processes,
    node_settings,
    run_node,
    running_server,
    two_nodes_on_one_bus,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.browser, pytest.mark.node]


@contextlib.asynccontextmanager
async def reference_server() -> AsyncIterator[str]:
    """The original PeerJS server (``peer`` 1.0.2 from tests/js); yields its http base URL."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(JS_DIR / "peerjs_reference_server.mjs"),
        cwd=str(JS_DIR),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 15 * UNIT)
        assert line, "peerjs_reference_server.mjs exited before listening"
        yield f"http://127.0.0.1:{orjson.loads(line)['port']}"
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 5 * UNIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def check_connect(result: dict[str, Any]) -> None:
    """Data both ways, a call with streams both ways, and ``unavailable-id`` for A's live id."""
    assert "error" not in result, result
    id_a, id_b = result["idA"], result["idB"]
    assert result["openA"] == {"outcome": "open", "id": id_a}
    assert result["openB"] == {"outcome": "open", "id": id_b}
    assert result["receivedByB"] == "hello from A"
    assert result["reply"] == "echo: hello from A"
    assert result["incomingPeer"] == id_a
    assert result["incomingMetadata"] == {"hello": f"from {id_a}"}
    assert result["callerGot"] == {"kinds": ["audio", "video"]}
    assert result["calleeGot"] == {
        "from": id_a,
        "metadata": {"call": 1},
        "kinds": ["audio", "video"],
    }
    assert result["claimA"]["outcome"] == "error", result["claimA"]
    assert result["claimA"]["type"] == "unavailable-id", result["claimA"]
    assert result["aStillOpen"] is True


def check_ghosts_made(result: dict[str, Any]) -> None:
    """Both ghosts opened through the proxy, and their pages saw the socket drop."""
    assert "error" not in result, result
    assert result["checkerOpen"]["outcome"] == "open", result["checkerOpen"]
    for ghost in ("ghostNew", "ghostSame"):
        assert result[ghost]["opened"]["outcome"] == "open", result[ghost]
        assert result[ghost]["connections"] == 1, result[ghost]
        assert result[ghost]["seen"] == "disconnected", result[ghost]


async def test_two_browsers_connect_and_call(server: RunningServer):
    """A connects to B by id: data both ways; A calls B: both get the remote stream; a third
    page claiming A's live id gets ``unavailable-id``."""
    chromium_ready()
    check_connect(await run_node("peerjs_browser.mjs", "connect", server.url, timeout=60 * UNIT))


async def test_two_browsers_on_two_nodes():
    """A on one node, B (and the page claiming A's id) on another node of one backend bus."""
    chromium_ready()
    async with two_nodes_on_one_bus(ice_servers=()) as (n1, n2):
        result = await run_node("peerjs_browser.mjs", "connect", n1.url, n2.url, timeout=60 * UNIT)
    check_connect(result)


@pytest.mark.redis
@pytest.mark.slow
async def test_two_browsers_on_two_node_processes_with_redis(redis_url: str):
    """A and B on two ``polysignal serve`` processes sharing a real redis-server."""
    chromium_ready()
    with node_processes(2, {"REDIS_URL": redis_url, "ICE_SERVERS": "[]"}) as (n1, n2):
        result = await run_node("peerjs_browser.mjs", "connect", n1.url, n2.url, timeout=60 * UNIT)
    check_connect(result)


# The ghost tests: pages send their heartbeat every PING_MS, and polysignal counts a client
# silent for STALE_AFTER seconds a ghost (by default 5 s and 10 s: two heartbeats missed).
PING_MS = 250
STALE_AFTER = 1.0 * UNIT


async def test_ghost_ids_are_claimed_back():
    """A page whose socket dies without a close (its TCP path cut, the server side left open):
    a new page with a new token gets the id as soon as the ghost has missed its heartbeats
    (claiming again on ``unavailable-id`` until then), and a reload presenting the same token
    re-attaches and gets OPEN at once; each is then reachable by a data connection.

    The original ``peer`` 1.0.2 fails both (see ``test_reference_server_keeps_ghost_ids``)."""
    chromium_ready()
    settings = node_settings(ice_servers=(), peerjs_stale_after=STALE_AFTER)
    bound = int((STALE_AFTER + 10 * UNIT) * 1000)  # retrying stops at the first OPEN
    async with running_server(settings) as server:
        result = await run_node(
            "peerjs_browser.mjs", "ghost", server.url, str(PING_MS), str(bound), timeout=60 * UNIT
        )
    check_ghosts_made(result)
    new_token = result["newToken"]
    assert new_token["outcome"] == "open", new_token
    *taken, last = new_token["answers"]
    assert last == "open" and set(taken) <= {"unavailable-id"}, new_token
    # Back as soon as the ghost is stale: claiming took at most its heartbeats missed plus a
    # margin (the first claim may come later than the cut on a busy machine), not 90 s.
    assert new_token["claimingMs"] < (STALE_AFTER + 3 * UNIT) * 1000, new_token
    assert result["newTokenReply"] == "echo: to the new owner"
    same_token = result["sameToken"]
    # At once: the first claim opens (the original never sends OPEN to a re-attached token).
    assert same_token["outcome"] == "open" and same_token["answers"] == ["open"], same_token
    assert result["sameTokenReply"] == "echo: to the reloaded page"


async def test_reference_server_connect_and_call():
    """The compatible cases pass against the original server too (the harness's own check)."""
    chromium_ready()
    async with reference_server() as url:
        check_connect(await run_node("peerjs_browser.mjs", "connect", url, timeout=60 * UNIT))


async def test_reference_server_keeps_ghost_ids():
    """Against ``peer`` 1.0.2 the ghost stays: a new token gets ``unavailable-id`` (ID-TAKEN,
    until its 90 s alive timeout) for as long as polysignal's test lets it retry, and the same
    token re-attaches without OPEN, so the client never opens. This shows the cut leaves a real
    ghost (no close reached the server)."""
    chromium_ready()
    bound = int((STALE_AFTER + 1 * UNIT) * 1000)
    async with reference_server() as url:
        result = await run_node(
            "peerjs_browser.mjs", "ghost", url, str(PING_MS), str(bound), timeout=60 * UNIT
        )
    check_ghosts_made(result)
    new_token = result["newToken"]
    assert new_token["outcome"] == "error", new_token
    assert set(new_token["answers"]) == {"unavailable-id"}, new_token
    assert new_token["ms"] > bound, new_token
    assert result["sameToken"]["answers"] == ["timeout"], result["sameToken"]
