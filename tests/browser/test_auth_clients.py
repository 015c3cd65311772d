"""The published clients with ``AUTH`` on (docs/security.md): y-webrtc (token in the signaling
URL's query), peerjs (its ``token`` option) and @localfirst/relay (a ``/token/<jwt>`` path
prefix) connect with a token and are refused without one or with another subject's."""

from __future__ import annotations

import jwt
import pytest

from polysignal.config import Secret

from support import chromium_ready, node_settings, run_node, running_server

pytestmark = [pytest.mark.timeout(120), pytest.mark.node]

SECRET = "the-app-backend-signs-with-this-secret-0123456789"


def token(sub: str, **claims: object) -> str:
    return jwt.encode({"sub": sub, "exp": 4_000_000_000, **claims}, SECRET, algorithm="HS256")


def auth_settings(*protocols: str) -> object:
    return node_settings(auth=protocols, auth_jwt_key=Secret(SECRET))


async def test_peerjs_and_relay_clients_connect_with_a_token_and_only_with_one():
    chromium_ready()
    async with running_server(auth_settings("relay", "peerjs")) as srv:
        result = await run_node(
            "auth_clients.mjs", srv.url, token("alice"), token("mallory"), timeout=60
        )
    assert "error" not in result, result
    assert result["relayWithToken"] == "open"
    assert result["relayWithoutToken"] == "refused"
    assert result["relayOtherId"] == "refused"
    assert result["peerjsWithToken"] == {"outcome": "open", "id": "alice"}
    # A refused upgrade is, to peerjs, a WebSocket that closed: its "network" error (the reason
    # is in the server's log and the 401/403 body).
    refused = {"outcome": "error", "type": "network", "message": "Lost connection to server."}
    assert result["peerjsWithoutToken"] == refused
    assert result["peerjsOtherSubject"] == refused


async def test_ywebrtc_syncs_through_a_server_that_requires_a_token():
    chromium_ready()
    async with running_server(auth_settings("topics")) as srv:
        query = "?token=" + token("editor", topics=["polysignal-ywebrtc-*"])
        result = await run_node("ywebrtc_browser.mjs", srv.url, query, timeout=60)
    assert result["synced"] is True
    assert result["webrtcPeers"] == [1, 1]
