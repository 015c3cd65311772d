"""PeerJS (docs/protocols/peerjs.md) on a real server on a free port, raw clients.

Only what crosses a socket is asserted here; every rule of the state machine is tested without
sockets in tests/core/test_peerjs_core.py. Error bodies are asserted whole.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from polysignal.core.peerjs import PeerJsNode, claim_key
from polysignal.protocols.peerjs import token_digest
from polysignal.server.app import PEERJS_KEY

from rawws import frame, upgraded
from support import (
    UNIT,
    RunningServer,
    assert_log_bounded,
    assert_silent,
    node_settings,
    receive_json,
    running_server,
    until,
)

pytestmark = pytest.mark.timeout(30)

OPEN = {"type": "OPEN"}
WS = aiohttp.ClientWebSocketResponse


def error(text: str) -> dict[str, Any]:
    return {"type": "ERROR", "payload": {"msg": text}}


def url(peer_id: str, token: str = "tok", key: str = "peerjs", path: str = "/peerjs") -> str:
    return f"{path}?key={key}&id={peer_id}&token={token}&version=1.5.4"


async def join(srv: RunningServer, peer_id: str, token: str = "tok", **kwargs: Any) -> WS:
    ws = await srv.ws(url(peer_id, token, **kwargs))
    assert await receive_json(ws) == OPEN
    return ws


async def send(ws: WS, **message: Any) -> None:
    await ws.send_str(orjson.dumps(message).decode())


async def refused(ws: WS, body: dict[str, Any]) -> None:
    """``ws`` got exactly ``body`` and then a close."""
    assert await receive_json(ws) == body
    msg = await ws.receive(timeout=2 * UNIT)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg


def machine(srv: RunningServer) -> PeerJsNode:
    return srv.app[PEERJS_KEY].machine


def abort(ws: WS) -> None:
    """Cut the TCP connection without a close frame."""
    assert ws._response is not None and ws._response.connection is not None
    transport = ws._response.connection.transport
    assert transport is not None
    transport.abort()


# --- HTTP -------------------------------------------------------------------------------------


async def test_get_path_describes_the_server_with_cors(server):
    async with server.session.get(server.url + "/", headers={"Origin": "http://app"}) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        assert await resp.text() == (
            '{"name":"PeerJS Server","description":"A server side element to broker connections'
            ' between PeerJS clients.","website":"https://peerjs.com/"}'
        )
        assert resp.headers["Access-Control-Allow-Origin"] == "http://app"
        assert resp.headers["Vary"] == "Origin"
    async with server.session.get(server.url + "/") as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_id_is_a_fresh_uuid_and_ignores_ts_and_version(server):
    ids = set()
    for n in range(3):
        async with server.session.get(f"{server.url}/anykey/id?ts={n}0.5&version=1.5.4") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            text = await resp.text()
            assert str(uuid.UUID(text)) == text
            ids.add(text)
    assert len(ids) == 3


async def test_peers_is_401_unless_discovery_is_on(server):
    async with server.session.get(server.url + "/peerjs/peers") as resp:
        assert resp.status == 401
    async with running_server(node_settings(peerjs_allow_discovery=True)) as srv:
        await join(srv, "alice")
        await join(srv, "bob")
        async with srv.session.get(srv.url + "/peerjs/peers?ts=1") as resp:
            assert resp.status == 200 and sorted(await resp.json()) == ["alice", "bob"]


async def test_cors_allow_list_and_preflight():
    settings = node_settings(peerjs_cors_origins=("http://ok",))
    async with running_server(settings) as srv:
        for origin, allowed in (("http://ok", "http://ok"), ("http://evil", None)):
            async with srv.session.get(srv.url + "/k/id", headers={"Origin": origin}) as resp:
                assert resp.headers.get("Access-Control-Allow-Origin") == allowed
        headers = {
            "Origin": "http://ok",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-a",
        }
        async with srv.session.options(srv.url + "/k/id", headers=headers) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "http://ok"
            assert resp.headers["Access-Control-Allow-Methods"] == "GET,HEAD,PUT,PATCH,POST,DELETE"
            assert resp.headers["Access-Control-Allow-Headers"] == "x-a"


async def test_a_custom_path_mounts_every_route_under_it():
    async with running_server(node_settings(peerjs_path="/myapp")) as srv:
        for path in ("/myapp", "/myapp/"):
            async with srv.session.get(srv.url + path) as resp:
                assert (await resp.json())["name"] == "PeerJS Server"
        async with srv.session.get(srv.url + "/myapp/peerjs/id") as resp:
            assert resp.status == 200
        await join(srv, "a", path="/myapp/peerjs")
        # /peerjs is no PeerJS path here: the topics protocol takes it.
        ws = await srv.ws("/peerjs")
        await ws.send_str('{"type":"ping"}')
        assert await receive_json(ws) == {"type": "pong"}


async def test_a_websocket_on_a_kept_alive_connection_still_reaches_peerjs(server):
    raw = await upgraded(server.port, url("a"))
    opcode, payload = await raw.frame()
    assert (opcode, orjson.loads(payload)) == (1, OPEN)
    await raw.aclose()


# --- opening ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "text"),
    [
        ("", "No id, token, or key supplied to websocket server"),
        ("?key=peerjs&id=a", "No id, token, or key supplied to websocket server"),
        ("?key=peerjs&token=t", "No id, token, or key supplied to websocket server"),
        ("?id=a&token=t", "No id, token, or key supplied to websocket server"),
        ("?key=other&id=a&token=t", "Invalid key provided"),
        ("?key=peerjs&id=" + "a" * 257 + "&token=t", "id, token or key longer than 256 characters"),
    ],
)
async def test_bad_parameters_get_the_originals_error_then_a_close(server, query, text):
    await refused(await server.ws("/peerjs" + query), error(text))


async def test_the_key_is_a_setting():
    async with running_server(node_settings(peerjs_key="s3cret")) as srv:
        await join(srv, "a", key="s3cret")
        await refused(await srv.ws(url("b")), error("Invalid key provided"))


async def test_concurrent_limit_at_its_exact_boundary():
    async with running_server(node_settings(peerjs_concurrent_limit=2)) as srv:
        a = await join(srv, "a")
        await join(srv, "b")
        await refused(await srv.ws(url("c")), error("Server has reached its concurrent user limit"))
        await a.close()
        await until(lambda: "a" not in machine(srv))
        await join(srv, "c")


async def test_same_token_re_attaches_with_open_and_queued_messages(server):
    """Unlike the original (peerjs-server#462), a re-attach is sent OPEN."""
    first = await join(server, "a")
    second = await join(server, "a")
    msg = await first.receive(timeout=2 * UNIT)
    assert (msg.type, msg.data, msg.extra) == (
        aiohttp.WSMsgType.CLOSE,
        1000,
        "replaced by a newer connection",
    )
    b = await join(server, "b")
    await send(b, type="OFFER", dst="a", payload=1)
    assert await receive_json(second) == {"type": "OFFER", "src": "b", "dst": "a", "payload": 1}


async def test_another_token_while_the_holder_is_live_is_id_taken(server):
    holder = await join(server, "a")
    await refused(
        await server.ws(url("a", "other")), {"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}}
    )
    await send(holder, type="HEARTBEAT")
    await send(holder, type="OFFER", dst="a")
    assert (await receive_json(holder))["src"] == "a"  # the holder is untouched


async def test_ghost_id_a_cut_tcp_connection_frees_the_id_at_once(server):
    """The holder's TCP connection is cut without a close: a new token gets the id at once."""
    ghost = await join(server, "a", "old")
    abort(ghost)
    await join(server, "a", "new")


async def test_ghost_id_a_holder_that_missed_its_heartbeats_is_taken_over():
    async with running_server(node_settings(peerjs_stale_after=1 * UNIT)) as srv:
        ghost = await join(srv, "a", "old")  # sends nothing from here on
        await refused(
            await srv.ws(url("a", "new")), {"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}}
        )
        old = token_digest("a", "old")
        clock = asyncio.get_running_loop().time
        await until(lambda: not machine(srv).holder_live("a", old, clock()), timeout=3 * UNIT)
        new = await join(srv, "a", "new")
        msg = await ghost.receive(timeout=2 * UNIT)
        assert (msg.type, msg.data, msg.extra) == (
            aiohttp.WSMsgType.CLOSE,
            1000,
            "id taken over",
        )
        b = await join(srv, "b")
        await send(b, type="OFFER", dst="a")
        assert (await receive_json(new))["src"] == "b"


async def test_a_silent_client_is_closed_at_the_alive_timeout():
    async with running_server(node_settings(peerjs_alive_timeout=0.4 * UNIT)) as srv:
        silent = await join(srv, "a")
        msg = await silent.receive(timeout=3 * UNIT)
        assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1000, "alive timeout")
        await join(srv, "a", "new")


async def test_closing_releases_the_claim(server):
    ws = await join(server, "a")
    backend = server.node.backend
    assert await backend.lookup(claim_key("a")) is not None
    await ws.close()
    for _ in range(100):
        if await backend.lookup(claim_key("a")) is None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("claim not released")


# --- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["OFFER", "ANSWER", "CANDIDATE", "LEAVE", "EXPIRE"])
async def test_every_relayed_type_reaches_dst_with_src_stamped(server, kind):
    a, b = await join(server, "a"), await join(server, "b")
    await send(a, type=kind, dst="b", src="forged", payload={"sdp": "v=0"}, extra=1)
    assert await receive_json(b) == {
        "type": kind,
        "src": "a",
        "dst": "b",
        "payload": {"sdp": "v=0"},
    }


async def test_heartbeat_is_not_answered_and_binary_frames_are_json(server):
    a, b = await join(server, "a"), await join(server, "b")
    await send(a, type="HEARTBEAT")
    await assert_silent(a)
    await a.send_bytes(b'{"type":"CANDIDATE","dst":"b"}')
    assert await receive_json(b) == {"type": "CANDIDATE", "src": "a", "dst": "b"}


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ("not json", "Invalid message: not JSON"),
        ("[1,2]", "Invalid message: expected a JSON object"),
        ("{}", "Invalid message: type must be a string"),
        ('{"type":"BOGUS"}', "Unknown message type: BOGUS"),
        ('{"type":"OFFER"}', "Invalid message: dst is missing"),
        ('{"type":"OFFER","dst":{}}', "Invalid message: dst must be a string"),
        (
            '{"type":"OFFER","dst":"b","payload":' + "[" * 64 + "]" * 64 + "}",
            "Invalid message: JSON nested deeper than 64 levels",
        ),
    ],
)
async def test_bad_input_gets_an_error_and_the_socket_stays_open(server, caplog, data, text):
    caplog.set_level(logging.DEBUG, logger="polysignal")
    a = await join(server, "a")
    for _ in range(5):
        await a.send_str(data)
        assert await receive_json(a) == error(text)
    await send(a, type="CANDIDATE", dst="a")
    assert (await receive_json(a))["type"] == "CANDIDATE"
    assert_log_bounded(caplog.records)


async def test_oversize_frames_close_with_1009():
    async with running_server(node_settings(max_frame_bytes=1024)) as srv:
        a, b = await join(srv, "a"), await join(srv, "b")
        payload = "x" * (1024 - len('{"type":"OFFER","dst":"b","payload":""}'))
        await send(a, type="OFFER", dst="b", payload=payload)  # exactly the limit
        assert (await receive_json(b))["payload"] == payload
        await send(a, type="OFFER", dst="b", payload=payload + "x")
        msg = await a.receive(timeout=2 * UNIT)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1009)


async def test_a_flood_is_answered_too_many_messages(caplog):
    caplog.set_level(logging.INFO, logger="polysignal")
    async with running_server(node_settings(rate_limit=1, rate_burst=3)) as srv:
        a = await join(srv, "a")
        caplog.clear()
        for _ in range(3):  # the burst, exactly
            await send(a, type="CANDIDATE", dst="a")
            assert (await receive_json(a))["type"] == "CANDIDATE"
        for _ in range(20):
            await send(a, type="CANDIDATE", dst="a")
        assert await receive_json(a) == error("Too many messages")
        await assert_silent(a)
    assert_log_bounded(caplog.records)


async def test_a_message_to_a_peer_that_just_closed_is_answered():
    """Its socket closing (LEAVE) or already gone (queued, then EXPIRE): never silence."""
    async with running_server(node_settings(peerjs_expire_timeout=0.5 * UNIT)) as srv:
        a = await join(srv, "a")
        raw = await upgraded(srv.port, url("b"))
        assert orjson.loads((await raw.frame())[1]) == OPEN
        raw.send(frame(b"\x03\xe8", 0x8))  # b closes
        await raw.close_frame()
        await send(a, type="OFFER", dst="b")
        assert await receive_json(a) in (
            {"type": "LEAVE", "src": "b", "dst": "a"},
            {"type": "EXPIRE", "src": "b", "dst": "a"},
        )
        await raw.aclose()


# --- queues and expiry ------------------------------------------------------------------------


async def test_messages_for_an_offline_id_wait_for_it_but_leave_and_expire_do_not():
    async with running_server(node_settings(peerjs_expire_timeout=3 * UNIT)) as srv:
        a = await join(srv, "a")
        await send(a, type="OFFER", dst="b", payload=1)
        await send(a, type="LEAVE", dst="b")
        await send(a, type="EXPIRE", dst="b")
        await send(a, type="CANDIDATE", dst="b", payload=2)
        await until(lambda: machine(srv).queued("b") == 2)
        b = await srv.ws(url("b"))
        assert await receive_json(b) == OPEN
        assert await receive_json(b) == {"type": "OFFER", "src": "a", "dst": "b", "payload": 1}
        assert await receive_json(b) == {"type": "CANDIDATE", "src": "a", "dst": "b", "payload": 2}
        await assert_silent(a)


async def test_an_unread_queue_expires_once_per_sender():
    async with running_server(node_settings(peerjs_expire_timeout=0.5 * UNIT)) as srv:
        a, c = await join(srv, "a"), await join(srv, "c")
        for _ in range(3):
            await send(a, type="OFFER", dst="nobody")
        await send(c, type="OFFER", dst="nobody")
        assert await receive_json(a) == {"type": "EXPIRE", "src": "nobody", "dst": "a"}
        assert await receive_json(c) == {"type": "EXPIRE", "src": "nobody", "dst": "c"}
        await assert_silent(a)
        assert machine(srv).queued_bytes == 0


async def test_queue_count_bound_at_its_exact_boundary():
    settings = node_settings(peerjs_queue_messages=3, peerjs_expire_timeout=10 * UNIT)
    async with running_server(settings) as srv:
        a = await join(srv, "a")
        for n in range(3):
            await send(a, type="CANDIDATE", dst="b", payload=n)
        await until(lambda: machine(srv).queued("b") == 3)
        await assert_silent(a)
        await send(a, type="CANDIDATE", dst="b", payload=3)
        assert await receive_json(a) == {"type": "EXPIRE", "src": "b", "dst": "a"}
        b = await join(srv, "b")
        assert [(await receive_json(b))["payload"] for _ in range(3)] == [0, 1, 2]


async def test_queue_byte_bound_at_its_exact_boundary():
    size = len(b'{"type":"CANDIDATE","src":"a","dst":"b","payload":"xxxxxxxxxx"}')
    settings = node_settings(peerjs_queue_bytes=2 * size, peerjs_expire_timeout=10 * UNIT)
    async with running_server(settings) as srv:
        a = await join(srv, "a")
        for _ in range(2):
            await send(a, type="CANDIDATE", dst="b", payload="x" * 10)
        await until(lambda: machine(srv).queued("b") == 2)
        await send(a, type="CANDIDATE", dst="b", payload="x")
        assert await receive_json(a) == {"type": "EXPIRE", "src": "b", "dst": "a"}
