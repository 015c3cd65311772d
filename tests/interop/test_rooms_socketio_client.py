"""The published socket.io-client 4.x (Node) against the rooms protocol: the whole §5.5 flow."""

from __future__ import annotations

from typing import Any

import pytest

from rooms_client import PASSWORD, rooms_settings

from support import node_ready, node_settings, run_node, running_server

pytestmark = [pytest.mark.timeout(60), pytest.mark.node]


def check_flow(result: dict[str, Any]) -> None:
    """What the Node client saw, field by field (PROTOCOLS.md §5.5, DESIGN.md §5 fixes)."""
    assert result.get("ok") is True, result
    room, owner, joiner = result["room"], result["ownerId"], result["joinerId"]
    assert result["refusal"] == {"message": "Token is not valid"}
    assert result["createAccept"] == {"room": room}
    assert result["joinRequest"] == {
        "room": room,
        "peer_id": joiner,
        "payload": {"hello": 1},
        "peerinfo": {"name": "joiner"},
    }
    assert result["joinAccept"] == {
        "room": room,
        "peer_id": joiner,
        "peers": [owner],
        "peersinfo": {
            owner: {"peerinfo": {"name": "owner"}},
            joiner: {"peerinfo": {"name": "joiner"}},
        },
    }
    assert result["userJoin"] == {"room": room, "peer_id": joiner, "peerinfo": {"name": "joiner"}}
    assert result["sessionDescription"] == {
        "peer_id": joiner,
        "session_description": {"type": "offer", "sdp": "v=0\r\n"},
        "room": room,
        "peerinfo": {"name": "joiner"},
    }
    assert result["iceCandidate"]["peer_id"] == owner
    assert result["iceCandidate"]["ice_candidate"]["sdpMLineIndex"] == 0
    assert result["iceCandidate"]["peerinfo"] == {"name": "owner"}
    assert result["unauthorized"] == {"message": "Token is not valid"}
    assert result["userLeave"] == {"room": room, "peer_id": joiner, "peerinfo": {"name": "joiner"}}


async def test_socketio_client_whole_flow():
    """Auth, create, join/accept, relays and leave with the published client on one node."""
    node_ready()
    async with running_server(node_settings(**rooms_settings())) as srv:
        result = await run_node("rooms_socketio.mjs", srv.url, srv.url, PASSWORD, timeout=40)
    check_flow(result)
