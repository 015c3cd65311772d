"""Polysignal's Signal-Fire browser client in two isolated headless Chromium contexts."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from polysignal.backends import MemoryBackend, MemoryBus

from support import RunningServer, chromium_ready, node_settings, run_node, running_server

pytestmark = pytest.mark.timeout(90)


def check(result: dict[str, object]) -> None:
    assert "error" not in result, result
    assert result["notFound"] == "Peer Not Found"
    assert result["rejectedWith"] == "busy right now"
    assert result["receivedByB"] == "hello from A"
    assert result["reply"] == "echo: hello from A"
    assert result["sessionOrigin"] == result["aId"]
    assert result["aId"] != result["bId"]


async def test_two_browsers_open_a_data_channel(server: RunningServer):
    """A session to the other page's id, once accepted, carries data-channel messages both ways."""
    chromium_ready()
    result = await run_node("signalfire_browser.mjs", server.url, server.url, timeout=60)
    check(result)
    assert result["iceServers"] == []


async def test_two_browsers_on_two_nodes():
    """Each page connects to a different node of one backend bus; relays cross between them."""
    chromium_ready()
    bus = MemoryBus()
    async with AsyncExitStack() as stack:
        n1, n2 = [
            await stack.enter_async_context(
                running_server(node_settings(node_id=n, ice_servers=()), MemoryBackend(n, bus))
            )
            for n in ("node-1", "node-2")
        ]
        result = await run_node("signalfire_browser.mjs", n1.url, n2.url, timeout=60)
    check(result)
    assert result["iceServers"] == []
