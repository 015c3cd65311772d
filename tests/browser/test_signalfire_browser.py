"""Polysignal's Signal-Fire browser client in two isolated headless Chromium contexts."""

from __future__ import annotations

import pytest

from support import (
    RunningServer,
    chromium_ready,
    run_node,
    two_nodes_on_one_bus,
)

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
    async with two_nodes_on_one_bus(ice_servers=()) as (n1, n2):
        result = await run_node("signalfire_browser.mjs", n1.url, n2.url, timeout=60)
    check(result)
    assert result["iceServers"] == []
