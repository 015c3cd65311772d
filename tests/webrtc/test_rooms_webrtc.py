"""Two real WebRTC peers (aiortc) signal through the rooms protocol and open a data channel."""

from __future__ import annotations

import pytest

from rooms_client import RoomsClient, rooms_handshake, rooms_settings

from rtc import loopback_only
from support import node_settings, running_server

pytestmark = pytest.mark.timeout(60)


async def test_two_aiortc_peers_connect_through_rooms():
    async with running_server(node_settings(**rooms_settings())) as srv:
        owner = await RoomsClient().connect(srv.url)
        joiner = await RoomsClient().connect(srv.url)
        try:
            await owner.login({"name": "owner"})
            await joiner.login({"name": "joiner"})
            with loopback_only():
                await rooms_handshake(owner, joiner, "call")
        finally:
            await owner.close()
            await joiner.close()
