"""The Origin allow-list (``ALLOWED_ORIGINS``; core/edge.py, server/frontdoor.py): a page of
another origin cannot open a WebSocket of any protocol, nor read socket.io's or PeerJS's
answers; clients that send no Origin (not a browser) are served as before."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from polysignal.config import ConfigError, Settings
from rooms_client import rooms_settings

from rawws import connect, request
from support import node_settings, running_server, until

pytestmark = pytest.mark.timeout(60)

GOOD = "https://app.example.com"
EVIL = "https://evil.example"
REFUSED = b"origin not allowed\n"

# Every WebSocket protocol, by a path it is served on.
PROTOCOLS = {
    "topics": "/",
    "relay": "/introduction/alice",
    "signal-fire": "/signal-fire",
    "peerjs": "/peerjs?key=peerjs&id=alice&token=t1",
    "socket.io": "/socket.io/?EIO=4&transport=websocket",
}


def origin_settings(**overrides: object) -> Settings:
    return node_settings(allowed_origins=(GOOD,), **rooms_settings(), **overrides)


@pytest.mark.parametrize("path", PROTOCOLS.values(), ids=PROTOCOLS.keys())
async def test_a_refused_origin_gets_403_before_the_upgrade(path):
    async with running_server(origin_settings()) as srv:
        raw = await connect(srv.port)
        raw.send(request(path, headers={"Origin": EVIL}))
        response = await raw.response()
        assert response.status == 403
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.headers["connection"] == "close"
        assert response.body == REFUSED
        assert await raw.eof() == b""
        assert not srv.node.connections
        await raw.aclose()
        await until(lambda: srv.node.addresses.count("127.0.0.1") == 0)


@pytest.mark.parametrize("path", PROTOCOLS.values(), ids=PROTOCOLS.keys())
@pytest.mark.parametrize("origin", [GOOD, "HTTPS://APP.EXAMPLE.COM", None])
async def test_an_allowed_origin_or_none_connects(path, origin):
    """A listed origin (as browsers send it, or in another case) and a client without one."""
    async with running_server(origin_settings()) as srv:
        ws = await srv.ws(path, origin=origin) if origin else await srv.ws(path)
        if path.startswith("/socket.io/"):
            opened = await ws.receive(timeout=5)
            assert opened.type is aiohttp.WSMsgType.TEXT and opened.data.startswith("0{")
        elif path.startswith("/peerjs"):
            assert await ws.receive_json(timeout=5) == {"type": "OPEN"}
        else:
            assert not ws.closed
        await ws.close()


@pytest.mark.parametrize("path", ["/", "/socket.io/?EIO=4&transport=websocket"])
async def test_a_refused_origin_on_a_kept_alive_connection_gets_403(path):
    """An upgrade asked for after a plain request, on the connection aiohttp kept alive (for
    socket.io, engine.io would answer 400)."""
    async with running_server(origin_settings()) as srv:
        raw = await connect(srv.port)
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await raw.response()).body == b"okay"
        raw.send(request(path, headers={"Origin": EVIL}))
        response = await raw.response()
        assert response.status == 403
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert response.body == REFUSED
        assert not srv.node.connections
        await raw.aclose()


async def test_every_origin_is_allowed_by_default():
    """``*``, as the original servers: any page may connect, and socket.io echoes its origin."""
    async with running_server(node_settings(**rooms_settings())) as srv:
        for path in PROTOCOLS.values():
            ws = await srv.ws(path, origin=EVIL)
            assert not ws.closed
            await ws.close()
        url = f"{srv.url}/socket.io/?EIO=4&transport=polling"
        async with srv.session.get(url, headers={"Origin": EVIL}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == EVIL


async def test_socketio_long_polling_echoes_only_an_allowed_origin():
    async with running_server(origin_settings()) as srv:
        url = f"{srv.url}/socket.io/?EIO=4&transport=polling"
        async with srv.session.get(url, headers={"Origin": EVIL}) as response:
            assert response.status == 400
            assert await response.text() == f'"{EVIL} is not an accepted origin."'
            assert "Access-Control-Allow-Origin" not in response.headers  # not readable
        async with srv.session.get(url, headers={"Origin": GOOD}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == GOOD
            assert response.headers["Access-Control-Allow-Credentials"] == "true"
            assert (await response.text()).startswith("0{")


@pytest.mark.parametrize(
    ("overrides", "allowed", "refused"),
    [
        ({}, GOOD, EVIL),  # PEERJS_CORS_ORIGINS unset: ALLOWED_ORIGINS
        ({"peerjs_cors_origins": (EVIL,)}, EVIL, GOOD),  # set: it alone decides
    ],
)
async def test_peerjs_cors_follows_allowed_origins_unless_its_own_list_is_set(
    overrides, allowed, refused
):
    async with running_server(origin_settings(**overrides)) as srv:
        for path in ("/peerjs/id", "/"):
            async with srv.session.get(srv.url + path, headers={"Origin": allowed}) as response:
                assert response.status == 200
                assert response.headers["Access-Control-Allow-Origin"] == allowed
            async with srv.session.get(srv.url + path, headers={"Origin": refused}) as response:
                assert response.status == 200
                assert "Access-Control-Allow-Origin" not in response.headers
                assert response.headers["Vary"] == "Origin"
        preflight = {"Origin": refused, "Access-Control-Request-Method": "GET"}
        async with srv.session.options(srv.url + "/peerjs/id", headers=preflight) as response:
            assert response.status == 204
            assert "Access-Control-Allow-Origin" not in response.headers


async def test_repeated_refusals_log_one_line_per_interval(caplog):
    caplog.set_level(logging.DEBUG, logger="polysignal")
    async with running_server(origin_settings()) as srv:
        for _ in range(4):
            for path in PROTOCOLS.values():
                raw = await connect(srv.port)
                raw.send(request(path, headers={"Origin": EVIL}))
                assert (await raw.response()).status == 403
                await raw.aclose()
    lines = [r.getMessage() for r in caplog.records if "ALLOWED_ORIGINS" in r.getMessage()]
    assert lines == [
        f"refused a WebSocket upgrade from 127.0.0.1: origin '{EVIL}' not in ALLOWED_ORIGINS"
    ]
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not noisy


# --- the setting ----------------------------------------------------------------------------


def test_origins_are_written_as_browsers_send_them():
    settings = Settings.from_env(
        {"ALLOWED_ORIGINS": "https://App.Example.com:443, http://localhost:8080/, null"}
    )
    assert settings.server.allowed_origins == (
        "https://app.example.com",
        "http://localhost:8080",
        "null",
    )
    assert Settings().server.allowed_origins == ("*",)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            "app.example.com",
            "ALLOWED_ORIGINS: 'app.example.com' is not an origin (scheme://host[:port], `*` or"
            " `null`)",
        ),
        (
            "https://app.example.com/path",
            "ALLOWED_ORIGINS: 'https://app.example.com/path' is not an origin"
            " (scheme://host[:port], `*` or `null`)",
        ),
        ("https://x:70000", "ALLOWED_ORIGINS: 'https://x:70000' has a port out of range"),
    ],
)
def test_a_bad_origin_setting_is_refused_by_name(raw, message):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"ALLOWED_ORIGINS": raw})
    assert str(caught.value) == message
