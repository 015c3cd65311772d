"""The published socket.io-client 4.x (Node) against the rooms protocol: its whole flow."""

from __future__ import annotations

import pytest

from rooms_client import PASSWORD, check_flow, rooms_settings

from support import node_ready, node_settings, run_node, running_server

pytestmark = [pytest.mark.timeout(60), pytest.mark.node]


async def test_socketio_client_whole_flow():
    """Auth, create, join/accept, relays and leave with the published client on one node."""
    node_ready()
    async with running_server(node_settings(**rooms_settings())) as srv:
        result = await run_node("rooms_socketio.mjs", srv.url, srv.url, PASSWORD, timeout=40)
    check_flow(result)
