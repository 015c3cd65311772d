"""The rooms demo page (/demo) in two isolated headless Chromium contexts: a real WebRTC call."""

from __future__ import annotations

from typing import Any

import pytest

from rooms_client import PASSWORD, rooms_settings

from support import chromium_ready, node_settings, run_node, running_server

pytestmark = [pytest.mark.timeout(90), pytest.mark.browser]


def check(result: dict[str, Any]) -> None:
    assert result.get("ok") is True, result
    assert result["dialog"].endswith(f"asks to join {result['room']}. Accept?")
    assert result["dialog"].startswith("joiner ")  # the joiner's peerinfo name
    assert result["ownerReceived"] == ["hello from the joiner"]
    assert result["joinerReceived"] == ["hello from the owner"]
    assert "connected to 1 peer(s)" in result["ownerStatus"]
    for key in ("ownerVideos", "joinerVideos"):  # own camera, and the other's over WebRTC
        assert sorted(v["local"] for v in result[key]) == [False, True], result[key]
        assert all(v["tracks"] == ["audio", "video"] for v in result[key]), result[key]


async def test_two_demo_pages_make_a_webrtc_call():
    """Owner creates, joiner asks, owner confirms; the data channel opens and carries chat."""
    chromium_ready()
    async with running_server(node_settings(**rooms_settings(), ice_servers=())) as srv:
        result = await run_node("rooms_demo_browser.mjs", srv.url, srv.url, PASSWORD, timeout=75)
    check(result)
    assert result["iceServers"] == []
