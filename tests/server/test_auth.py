"""Authentication at the edge (``AUTH``; server/auth.py, server/frontdoor.py): a protocol that
requires it refuses an upgrade without a valid token before any state exists, binds ids to the
token's subject, and keeps topics to the token's patterns; a real webhook process decides when
one is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import jwt
import orjson
import pytest
import socketio

from polysignal.config import Settings
from rooms_client import RoomsClient, app_token, rooms_settings

from rawws import connect, request
from support import UNIT, free_port, node_settings, receive_json, running_server, until

pytestmark = pytest.mark.timeout(60)

SECRET = "the-app-backend-signs-with-this-secret-0123456789"
HOOK = Path(__file__).parents[1] / "authhook.py"


def token(sub: str = "alice", **claims: object) -> str:
    return jwt.encode({"sub": sub, "exp": 4_000_000_000, **claims}, SECRET, algorithm="HS256")


def jwt_settings(protocols: str = "all", **overrides: object) -> Settings:
    return node_settings(
        auth=Settings.from_env({"AUTH": protocols, "AUTH_JWT_KEY": SECRET}).auth.auth,
        auth_jwt_key=Settings.from_env({"AUTH_JWT_KEY": SECRET}).auth.auth_jwt_key,
        **overrides,
    )


async def refusal(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    raw = await connect(port)
    raw.send(request(path, headers=headers))
    response = await raw.response()
    await raw.aclose()
    if response.status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="polysignal"'
    return response.status, response.body


# --- JWT --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/introduction/alice",
        "/connection/alice/bob/doc-1",
        "/signal-fire",
        "/peerjs?key=peerjs&id=alice",
    ],
)
async def test_without_a_token_every_protocol_answers_401_before_any_state(path, caplog):
    caplog.set_level(logging.INFO, "polysignal.auth")
    async with running_server(jwt_settings()) as srv:
        assert await refusal(srv.port, path) == (401, b"authentication required: no token\n")
        assert not srv.node.connections
        async with srv.session.get(f"{srv.url}/metrics") as response:
            assert "\npolysignal_auth_refusals_total 1.0\n" in await response.text()
    lines = [r.getMessage() for r in caplog.records if r.name == "polysignal.auth"]
    assert len(lines) == 1 and "(401): authentication required: no token" in lines[0]


async def test_a_bad_token_is_refused_with_its_reason_and_never_logged(caplog):
    caplog.set_level(logging.INFO, "polysignal.auth")
    forged = jwt.encode({"sub": "alice", "exp": 4_000_000_000}, "x" * 40, algorithm="HS256")
    expired = jwt.encode({"sub": "alice", "exp": 1_000_000_000}, SECRET, algorithm="HS256")
    async with running_server(jwt_settings()) as srv:
        assert await refusal(srv.port, f"/?token={forged}") == (
            401,
            b"authentication failed: the token's signature does not verify\n",
        )
        assert await refusal(srv.port, f"/?token={expired}") == (
            401,
            b"authentication failed: the token has expired\n",
        )
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert forged not in text and expired not in text
    assert "token=" not in text


async def test_the_token_may_come_in_the_query_a_header_a_cookie_or_a_path_prefix():
    good = token()
    async with running_server(jwt_settings()) as srv:
        for path, headers in [
            (f"/?token={good}", {}),
            ("/", {"Authorization": f"Bearer {good}"}),
            ("/", {"Cookie": f"other=1; polysignal_token={good}"}),
            (f"/token/{good}", {}),
            (f"/token/{good}/", {}),
        ]:
            ws = await srv.ws(path, headers=headers)
            await ws.send_json({"type": "ping"})
            assert await receive_json(ws) == {"type": "pong"}
            await ws.close()
        await until(lambda: not srv.node.connections)


async def test_only_the_protocols_auth_names_require_a_token():
    async with running_server(jwt_settings("relay")) as srv:
        ws = await srv.ws("/")  # topics: anonymous as before
        await ws.send_json({"type": "ping"})
        assert await receive_json(ws) == {"type": "pong"}
        assert await refusal(srv.port, "/introduction/alice") == (
            401,
            b"authentication required: no token\n",
        )


async def test_topics_are_kept_to_the_token_s_patterns():
    async with running_server(jwt_settings("topics")) as srv:
        limited = await srv.ws(f"/?token={token('alice', topics=['doc-*'])}")
        free = await srv.ws(f"/?token={token('bob')}")
        await limited.send_json({"type": "subscribe", "topics": ["doc-1", "secret", "doc-2"]})
        assert await receive_json(limited) == {
            "type": "error",
            "message": "subscribe: topic 'secret' not allowed for this token",
        }
        await free.send_json({"type": "subscribe", "topics": ["secret", "doc-1"]})
        await until(lambda: len(srv.node.connections) == 2)
        await limited.send_json({"type": "publish", "topic": "secret", "data": 1})
        assert await receive_json(limited) == {
            "type": "error",
            "message": "publish: topic 'secret' not allowed for this token",
        }
        await limited.send_json({"type": "publish", "topic": "doc-1", "data": 2})
        delivered = await receive_json(free)
        assert delivered["topic"] == "doc-1" and delivered["data"] == 2  # not the refused one
        await free.send_json({"type": "publish", "topic": "doc-2", "data": 3})
        assert (await receive_json(limited))["data"] == 3


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/introduction/alice", 101),
        ("/introduction/bob", 403),
        ("/connection/alice/bob/doc-1", 101),
        ("/connection/bob/alice/doc-1", 403),
        ("/peerjs?key=peerjs&id=alice", 101),
        ("/peerjs?key=peerjs&id=bob", 403),
    ],
)
async def test_ids_are_bound_to_the_token_s_subject(path, status):
    async with running_server(jwt_settings()) as srv:
        separator = "&" if "?" in path else "?"
        raw = await connect(srv.port)
        raw.send(request(f"{path}{separator}token={token('alice')}"))
        response = await raw.response()
        assert response.status == status
        if status == 403:
            peer = "bob"
            assert response.body == f"the id '{peer}' is not allowed for this token\n".encode()
            assert not srv.node.connections
        await raw.aclose()


async def test_the_relay_path_prefix_survives_the_clients_appending_paths():
    """The relay clients append ``/introduction/<id>`` to the URL they are given."""
    async with running_server(jwt_settings("relay")) as srv:
        ids = token("alice", ids=["alice", "alice-*"])
        for path in ("/introduction/alice", "/introduction/alice-2"):
            ws = await srv.ws(f"/token/{ids}{path}")
            assert not ws.closed
        assert await refusal(srv.port, f"/token/{ids}/introduction/bob") == (
            403,
            b"the id 'bob' is not allowed for this token\n",
        )


async def test_signal_fire_welcomes_an_authenticated_client():
    async with running_server(jwt_settings("signalfire")) as srv:
        ws = await srv.ws(f"/signal-fire?token={token()}")
        welcome = await receive_json(ws)
        assert welcome["cmd"] == "welcome"


# --- the webhook ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def webhook() -> AsyncIterator[str]:
    """The webhook of tests/authhook.py, as its own process on a free loopback port."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(HOOK), str(port), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 10 * UNIT)
        assert line.strip() == b"ready"
        yield f"http://127.0.0.1:{port}"
    finally:
        process.kill()
        await process.wait()


def hook_settings(url: str, **overrides: object) -> Settings:
    auth = Settings.from_env(
        {"AUTH": "all", "AUTH_WEBHOOK_URL": f"{url}/hook", "AUTH_WEBHOOK_TIMEOUT": str(UNIT)}
    ).auth
    return node_settings(
        auth=auth.auth,
        auth_webhook_url=auth.auth_webhook_url,
        auth_webhook_timeout=auth.auth_webhook_timeout,
        **overrides,
    )


async def asked(url: str) -> list[dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/asked") as response:
        return orjson.loads(await response.read())  # type: ignore[no-any-return]


async def test_the_webhook_allows_denies_and_is_asked_once_per_cached_answer():
    async with webhook() as url, running_server(hook_settings(url)) as srv:
        ws = await srv.ws("/?token=allow-carol&room=1", headers={"Origin": "https://app.example"})
        await ws.send_json({"type": "ping"})
        assert await receive_json(ws) == {"type": "pong"}
        questions = await asked(url)
        assert questions == [
            {
                "address": "127.0.0.1",
                "origin": "https://app.example",
                "path": "/",
                "protocol": "topics",
                "query": "room=1",
                "token": "allow-carol",
            }
        ]
        # The same question again: answered from the cache.
        again = await srv.ws(
            "/?token=allow-carol&room=1", headers={"Origin": "https://app.example"}
        )
        assert not again.closed
        assert len(await asked(url)) == 1
        assert await refusal(srv.port, "/?token=deny") == (
            401,
            b"authentication refused: denied by the webhook\n",
        )
        assert await refusal(srv.port, "/?token=garbage") == (
            401,
            b"authentication refused: the webhook's answer is not JSON\n",
        )
        assert await refusal(srv.port, "/?token=status-500") == (
            401,
            b"authentication refused: the webhook answered 500\n",
        )
        # Claims from the webhook bind ids as a JWT's do.
        assert await refusal(srv.port, "/introduction/dave?token=allow-carol") == (
            403,
            b"the id 'dave' is not allowed for this token\n",
        )
        peer = await srv.ws("/introduction/carol?token=allow-carol")
        assert not peer.closed


async def test_a_slow_or_unreachable_webhook_denies_with_503():
    async with webhook() as url, running_server(hook_settings(url)) as srv:
        assert await refusal(srv.port, "/?token=slow") == (
            503,
            b"authentication unavailable; try again\n",
        )
        assert not srv.node.connections
    closed = f"http://127.0.0.1:{free_port()}"
    async with running_server(hook_settings(closed)) as srv:
        assert await refusal(srv.port, "/?token=allow-x") == (
            503,
            b"authentication unavailable; try again\n",
        )


async def test_questions_asked_together_share_one_request():
    async with webhook() as url, running_server(hook_settings(url)) as srv:
        results = await asyncio.gather(*(srv.ws("/?token=allow-erin") for _ in range(5)))
        assert all(not ws.closed for ws in results)
        assert len(await asked(url)) == 1


# --- rooms (socket.io): the URL's token, beside socket.io's own ``auth`` -----------------------


async def test_rooms_sockets_authenticate_and_keep_to_their_rooms():
    async with running_server(jwt_settings("rooms", **rooms_settings())) as srv:
        client = socketio.AsyncClient(reconnection=False)
        errors: asyncio.Queue[object] = asyncio.Queue()
        client.on("connect_error", errors.put_nowait)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect(
                srv.url, auth={"token": app_token()}, transports=["websocket"], wait_timeout=5
            )
        await client.disconnect()
        assert await asyncio.wait_for(errors.get(), 2 * UNIT) == {
            "message": "authentication required: no token"
        }
        limited = token("alice", rooms=["team-*"])
        member = await RoomsClient().connect(f"{srv.url}?token={limited}")
        await member.login()
        await member.send("room-create-request", room="team-1", payload=1)
        assert (await member.expect("room-create-accept"))["room"] == "team-1"
        await member.send("room-create-request", room="other", payload=2)
        assert await member.expect("room-create-reject") == {
            "message": "room 'other' not allowed for this token",
            "payload": 2,
        }
        await member.send("room-create-request", payload=3)
        assert await member.expect("room-create-reject") == {
            "message": "a room name is required by this token",
            "payload": 3,
        }
        await member.close()


# --- TURN credentials for the token's subject ---------------------------------------------------


async def test_turn_credentials_require_the_token_and_name_its_subject():
    turn = Settings.from_env(
        {"TURN_SECRET": "turn-secret", "TURN_URIS": "turn:127.0.0.1:3478"}
    ).turn
    settings = jwt_settings("signalfire", turn_secret=turn.turn_secret, turn_uris=turn.turn_uris)
    async with running_server(settings) as srv:
        url = f"{srv.url}/turn-credentials"
        async with srv.session.get(url) as response:
            assert response.status == 401
            assert await response.text() == "authentication required: no token\n"
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="polysignal"'
        async with srv.session.get(url, headers={"Authorization": "Bearer nope"}) as response:
            assert response.status == 401
            assert await response.text() == "authentication failed: the token is not a valid JWT\n"
        headers = {"Authorization": f"Bearer {token('alice')}"}
        async with srv.session.get(url, headers=headers) as response:
            assert response.status == 200
            body = await response.json()
        assert body["username"].endswith(":alice")
        ws = await srv.ws(f"/signal-fire?token={token('bob')}")
        welcome = await receive_json(ws)
        (turn_entry,) = welcome["data"]["configuration"]["iceServers"]
        assert turn_entry["username"].endswith(":bob")
