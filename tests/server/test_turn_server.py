"""TURN credentials handed out by a real server (server/turn.py): ``GET /turn-credentials``, the
Signal-Fire welcome and the rooms demo's configuration. Against a real coturn: tests/turn/."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from polysignal.client.signalfire import connect
from polysignal.config import Secret
from polysignal.server.turn import TURN_KEY, TURN_PATH
from rooms_client import rooms_settings

from support import RunningServer, node_settings, receive_json, running_server

URIS = ("turn:127.0.0.1:3478?transport=udp", "turn:127.0.0.1:3478?transport=tcp")
NOW = 1_700_000_000
STUN = {"urls": "stun:127.0.0.1:3478"}


def turn_settings(**extra: Any) -> dict[str, Any]:
    return {
        "turn_secret": (Secret("first-secret"), Secret("second-secret")),
        "turn_uris": URIS,
        "turn_ttl": 600,
        **extra,
    }


def signed(secret: str, name: str) -> str:
    return base64.b64encode(
        hmac.new(secret.encode(), name.encode(), hashlib.sha1).digest()
    ).decode()


def fixed_clock(srv: RunningServer) -> None:
    """Make the node's TURN clock and anonymous ids known: NOW, then user-1, user-2, ..."""
    turn = srv.app[TURN_KEY]
    counter = itertools.count(1)
    turn.clock = lambda: NOW + 0.75
    turn.new_user = lambda: f"user-{next(counter)}"


async def get(srv: RunningServer, **headers: str) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with srv.session.get(srv.url + TURN_PATH, headers=headers) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body, resp


async def test_not_configured_is_404_with_a_clear_text(server: RunningServer):
    status, body, resp = await get(server)
    assert status == 404
    assert resp.content_type == "text/plain"
    assert "TURN is not configured" in body and "TURN_SECRET" in body and "TURN_URIS" in body
    assert resp.headers["Cache-Control"] == "no-store"


async def test_credentials_document():
    async with running_server(node_settings(**turn_settings())) as srv:
        fixed_clock(srv)
        status, body, resp = await get(srv)
    assert status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    name = "1700000600:user-1"
    password = signed("first-secret", name)
    assert body == {
        "username": name,
        "password": password,
        "ttl": 600,
        "uris": list(URIS),
        "iceServers": [{"urls": list(URIS), "username": name, "credential": password}],
    }
    assert password != signed("second-secret", name)  # the rotation secret never signs


async def test_fresh_per_request_with_the_real_clock():
    async with running_server(node_settings(**turn_settings())) as srv:
        before = int(time.time())
        first = (await get(srv))[1]
        second = (await get(srv))[1]
        after = int(time.time())
    assert first["username"] != second["username"]
    for doc in (first, second):
        expiry, _, user = doc["username"].partition(":")
        assert before + 600 <= int(expiry) <= after + 600
        assert len(user) >= 16 and ":" not in user
        assert doc["password"] == signed("first-secret", doc["username"])


async def test_cors_as_allowed_origins_says():
    settings = node_settings(**turn_settings(), allowed_origins=("https://app.example",))
    async with running_server(settings) as srv:
        status, _, resp = await get(srv, Origin="https://app.example")
        assert status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Origin" in resp.headers.getall("Vary")
        # A page the list does not name gets no credential at all.
        status, body, resp = await get(srv, Origin="https://evil.example")
        assert status == 403 and "origin not allowed" in body
        assert "Access-Control-Allow-Origin" not in resp.headers
        # Not a browser (no Origin): served, nothing to echo.
        status, _, resp = await get(srv)
        assert status == 200 and "Access-Control-Allow-Origin" not in resp.headers
        async with srv.session.options(
            srv.url + TURN_PATH,
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        ) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert resp.headers["Access-Control-Allow-Methods"] == "GET"
            assert resp.headers["Access-Control-Allow-Headers"] == "authorization"
        async with srv.session.options(
            srv.url + TURN_PATH, headers={"Origin": "https://app.example"}
        ) as resp:
            assert resp.status == 204
            assert "Access-Control-Allow-Headers" not in resp.headers


async def test_any_origin_by_default_is_echoed():
    async with running_server(node_settings(**turn_settings())) as srv:
        status, _, resp = await get(srv, Origin="https://anywhere.example")
    assert status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://anywhere.example"


async def test_identify_seam_names_the_user_or_refuses():
    async with running_server(node_settings(**turn_settings())) as srv:
        fixed_clock(srv)
        turn = srv.app[TURN_KEY]

        async def alice(request: web.Request) -> str | None:
            return "alice:admin"

        turn.identify = alice
        status, body, _ = await get(srv)
        assert status == 200
        assert body["username"] == "1700000600:alice%3Aadmin"
        assert body["password"] == signed("first-secret", "1700000600:alice%3Aadmin")

        async def refuse(request: web.Request) -> str | None:
            raise web.HTTPUnauthorized(text="who are you?")

        turn.identify = refuse
        status, body, resp = await get(srv, Origin="https://app.example")
        assert status == 401 and body == "who are you?"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"


async def test_signalfire_welcome_carries_fresh_turn_credentials():
    settings = node_settings(**turn_settings(), ice_servers=(STUN,))
    async with running_server(settings) as srv:
        fixed_clock(srv)
        a = await connect(srv.ws_url + "/signal-fire", session=srv.session)
        b = await connect(srv.ws_url + "/signal-fire", session=srv.session)
        await a.close()
        await b.close()
    for client, user in ((a, "user-1"), (b, "user-2")):
        name = f"1700000600:{user}"
        assert client.configuration == {
            "iceServers": [
                STUN,
                {"urls": list(URIS), "username": name, "credential": signed("first-secret", name)},
            ]
        }


async def test_signalfire_welcome_with_turn_alone():
    async with running_server(node_settings(**turn_settings())) as srv:
        client = await connect(srv.ws_url + "/signal-fire", session=srv.session)
        await client.close()
    assert client.configuration is not None
    (entry,) = client.configuration["iceServers"]
    assert entry["urls"] == list(URIS)
    assert entry["credential"] == signed("first-secret", entry["username"])


async def test_rooms_demo_config_carries_fresh_turn_credentials():
    settings = node_settings(**rooms_settings(), **turn_settings(), ice_servers=(STUN,))
    async with running_server(settings) as srv:
        fixed_clock(srv)
        async with srv.session.get(f"{srv.url}/demo/config.json") as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Control"] == "no-store"
            body = await resp.json()
    name = "1700000600:user-1"
    assert body == {
        "iceServers": [
            STUN,
            {"urls": list(URIS), "username": name, "credential": signed("first-secret", name)},
        ]
    }


@pytest.mark.parametrize("ice", [None, (STUN,)])
async def test_without_turn_the_demo_config_is_as_before(ice):
    settings = node_settings(**rooms_settings(), ice_servers=ice)
    async with (
        running_server(settings) as srv,
        srv.session.get(f"{srv.url}/demo/config.json") as resp,
    ):
        assert "Cache-Control" not in resp.headers
        assert await resp.json() == {"iceServers": list(ice or ())}


async def test_a_websocket_on_a_kept_alive_connection_is_still_a_websocket():
    """Asked for on the path after a plain request on the same connection (aiohttp's pool), it
    is served as on any path (the topics protocol), never answered with credentials."""
    async with running_server(node_settings(**turn_settings())) as srv:
        assert (await get(srv))[0] == 200
        ws = await srv.ws(TURN_PATH)
        await ws.send_str('{"type":"ping"}')
        assert await receive_json(ws) == {"type": "pong"}
