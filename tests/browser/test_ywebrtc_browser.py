"""The published y-webrtc client, in two isolated headless Chromium contexts, through polysignal."""

from __future__ import annotations

import pytest

from support import RunningServer, chromium_ready, run_node

pytestmark = pytest.mark.timeout(90)


async def test_ywebrtc_peers_sync_a_document_over_webrtc(server: RunningServer):
    """Signalling through the topics protocol yields a WebRTC connection that carries Yjs sync."""
    chromium_ready()
    result = await run_node("ywebrtc_browser.mjs", server.url, timeout=60)
    assert result["synced"] is True
    assert result["value"] == "hello over webrtc"
    assert result["webrtcPeers"] == [1, 1]
    # Separate contexts share no BroadcastChannel: the data went over WebRTC.
    assert result["bcPeers"] == [0, 0]
