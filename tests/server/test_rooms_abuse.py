"""The rooms protocol held to its bounds by clients that do not play along (docs/protocols/rooms.md,
"Security and limits"): packets nested past the decoders, engine.io sessions that never CONNECT,
join requests piling up, clients that stop reading, HTTP bodies no client should send.

Real servers on free loopback ports; socket.io spoken by python-socketio clients, or by hand over
aiohttp (WebSocket and long-polling) where a test needs what no well-behaved client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polysignal.protocols import rooms as proto
from polysignal.server.rooms import ROOMS_KEY, RoomsHub
from rooms_client import RoomsClient, app_token, create_room, rooms_settings

from support import (
    UNIT,
    RunningServer,
    assert_log_bounded,
    node_settings,
    running_server,
    until,
    until_true,
)

pytestmark = pytest.mark.timeout(60)

EIO_WEBSOCKET = "/socket.io/?EIO=4&transport=websocket"
EIO_POLLING = "/socket.io/?EIO=4&transport=polling"
TOO_DEEP = "packet nested deeper than 64 levels"
NOT_JSON_OR_FORM = {
    "status": 400,
    "error": "Request body is not valid JSON or form data",
    "response": False,
}


def nested(levels: int) -> list[Any]:
    """A list ``levels`` deep: ``nested(2) == [[1]]``."""
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value  # type: ignore[no-any-return]


def deep_text(levels: int) -> str:
    return "[" * levels + "]" * levels


def hub_of(srv: RunningServer) -> RoomsHub:
    return srv.app[ROOMS_KEY]


async def engine_websocket(srv: RunningServer) -> aiohttp.ClientWebSocketResponse:
    """An engine.io WebSocket session, opened and nothing more (no socket.io CONNECT)."""
    ws = await srv.ws(EIO_WEBSOCKET)
    opened = await ws.receive(timeout=2 * UNIT)
    assert opened.type is aiohttp.WSMsgType.TEXT and opened.data.startswith("0{"), opened
    return ws


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, str]:
    """The close code and reason the server ends ``ws`` with (within 3 units)."""
    msg = await ws.receive(timeout=3 * UNIT)
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    return int(msg.data), str(msg.extra)


@dataclass
class Polling:
    """One engine.io long-polling session, spoken by hand over HTTP."""

    http: aiohttp.ClientSession
    base: str
    sid: str = ""

    @property
    def url(self) -> str:
        return f"{self.base}{EIO_POLLING}&sid={self.sid}"

    async def open(self) -> tuple[int, str]:
        """The handshake: 200 with the OPEN packet (and the session's id kept), or a refusal."""
        async with self.http.get(self.base + EIO_POLLING) as resp:
            text = await resp.text()
        if resp.status == 200:
            assert text.startswith("0{"), text
            self.sid = json.loads(text[1:])["sid"]
        return resp.status, text

    async def post(self, body: bytes | str) -> tuple[int, str]:
        data = body.encode() if isinstance(body, str) else body
        async with self.http.post(
            self.url, data=data, timeout=aiohttp.ClientTimeout(2 * UNIT)
        ) as resp:
            return resp.status, await resp.text()

    async def get(self) -> tuple[int, str]:
        async with self.http.get(self.url, timeout=aiohttp.ClientTimeout(2 * UNIT)) as resp:
            return resp.status, await resp.text()

    async def connect(self) -> str:
        """socket.io CONNECT with an app token; returns the socket.io id."""
        assert await self.post("40" + json.dumps({"token": app_token()})) == (200, "OK")
        status, text = await self.get()
        assert status == 200 and text.startswith("40{"), (status, text)
        return str(json.loads(text[2:])["sid"])


async def raw_post(port: int, path: str, head: str, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` in one write over a fresh connection; the answer, read until the server
    closes the connection (it must, within 2 units)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n"
        writer.write(request.encode() + body)
        answer = await asyncio.wait_for(reader.read(), 2 * UNIT)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.fixture
async def rooms() -> Any:
    async with running_server(node_settings(**rooms_settings())) as srv:
        yield srv


# --- 1. packets nested past the decoders -----------------------------------------------------


async def test_a_deeply_nested_packet_before_connect_is_refused_and_logged_once(rooms, caplog):
    """``42["x",[[[…]]]]`` 30,000 deep, right after the engine.io open, without CONNECT or
    token: each such connection is closed (1003 with the reason; a long-polling POST is
    answered 400 and its session closed), at most one line is logged, never a traceback, and
    nobody else notices."""
    caplog.set_level(logging.INFO)
    bystander = await RoomsClient().connect(rooms.url)
    try:
        await bystander.login()
        packet = f'42["x",{deep_text(30000)}]'
        for _ in range(3):
            ws = await engine_websocket(rooms)
            await ws.send_str(packet)
            assert await closed_with(ws) == (1003, TOO_DEEP)
        engine_json = f"4{deep_text(30000)}"  # a message engine.io itself parses as JSON
        ws = await engine_websocket(rooms)
        await ws.send_str(engine_json)
        assert await closed_with(ws) == (1003, TOO_DEEP)
        polling = Polling(rooms.session, rooms.url)
        assert (await polling.open())[0] == 200
        started = time.monotonic()
        assert await polling.post(packet) == (400, json.dumps(TOO_DEEP))
        assert time.monotonic() - started < 1 * UNIT
        assert await polling.get() == (400, json.dumps(f"'Session is disconnected' {polling.sid}"))
        await create_room(bystander, "still-fine")
        await until(lambda: hub_of(rooms).sessions.count("127.0.0.1") == 1)  # the bystander's
    finally:
        await bystander.close()
    assert_log_bounded(caplog.records)


async def test_nesting_is_bounded_at_64_levels_exactly(rooms, caplog):
    """A socket.io event nested 64 levels deep (the event's array and its data object count) is
    handled; 65 levels close the connection before python-socketio's parser sees it."""
    caplog.set_level(logging.INFO)
    client = await RoomsClient().connect(rooms.url)
    gone = asyncio.Event()
    client.sio.on("disconnect", lambda *_: gone.set())
    try:
        await client.login()
        await client.send("room-create-request", room="deep", payload=nested(62))
        assert await client.expect("room-create-accept") == {"room": "deep", "payload": nested(62)}
        await client.send("room-create-request", room="deeper", payload=nested(63))
        await asyncio.wait_for(gone.wait(), 3 * UNIT)
        await client.assert_silent("room-create-accept", "room-create-reject")
    finally:
        await client.close()
    assert_log_bounded(caplog.records)


# --- 2. engine.io sessions per address -------------------------------------------------------


async def test_engineio_sessions_per_address_are_counted_from_the_handshake(caplog):
    """``MAX_CONNECTIONS_PER_IP`` engine.io sessions, counted from the handshake (no CONNECT, no
    token): three long-polling sessions over one kept-alive connection fill a limit of 3, the
    fourth handshake (long-polling or WebSocket) is answered 429 at once, and a session that
    closes gives its place back."""
    caplog.set_level(logging.INFO)
    settings = node_settings(**rooms_settings(), max_connections_per_ip=3)
    async with running_server(settings) as srv:
        caplog.clear()  # the node's start
        sessions = [Polling(srv.session, srv.url) for _ in range(3)]
        for session in sessions:
            assert (await session.open())[0] == 200
        refused = (429, json.dumps("too many connections from this address"))
        for _ in range(3):
            assert await Polling(srv.session, srv.url).open() == refused
        with pytest.raises(aiohttp.WSServerHandshakeError) as handshake:
            await srv.session.ws_connect(srv.ws_url + EIO_WEBSOCKET)
        assert handshake.value.status == 429
        assert await sessions[0].post("1") == (200, "OK")  # engine.io CLOSE
        await until(lambda: hub_of(srv).sessions.count("127.0.0.1") == 2)
        assert (await Polling(srv.session, srv.url).open())[0] == 200
        assert await Polling(srv.session, srv.url).open() == refused
    assert_log_bounded(caplog.records)
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert loud == ["refused an engine.io session from 127.0.0.1: 3 sessions from it"]


async def test_sessions_that_never_connect_expire_and_give_their_place_back():
    """Long-polling sessions that never CONNECT and stop polling are closed by engine.io's ping
    timeout, and their places come back (shortened here from 25 + 20 s)."""
    settings = node_settings(**rooms_settings(), max_connections_per_ip=2)
    async with running_server(settings) as srv:
        engine = hub_of(srv).sio.eio
        engine.ping_interval, engine.ping_timeout = 0.2 * UNIT, 0.2 * UNIT
        for _ in range(2):
            assert (await Polling(srv.session, srv.url).open())[0] == 200
        assert (await Polling(srv.session, srv.url).open())[0] == 429

        async def admitted() -> bool:
            return (await Polling(srv.session, srv.url).open())[0] == 200

        await until_true(admitted, timeout=5 * UNIT)
        await until(lambda: hub_of(srv).sessions.count("127.0.0.1") == 0, timeout=5 * UNIT)


# --- 3. join requests per socket -------------------------------------------------------------


async def test_join_requests_per_socket_are_bounded_and_withdrawn_when_it_goes():
    """``ROOMS_MAX_PENDING_PER_SOCKET`` requests wait at once (2 here); the third is refused with
    the join's reject; an answered request frees its place; a socket that goes withdraws every
    request it had waiting."""
    settings = node_settings(**rooms_settings(), rooms_max_pending_per_socket=2)
    async with running_server(settings) as srv:
        clients = [await RoomsClient().connect(srv.url) for _ in range(4)]
        o1, o2, o3, asker = clients
        try:
            for client in clients:
                await client.login()
            for owner, room in ((o1, "r1"), (o2, "r2"), (o3, "r3")):
                await create_room(owner, room)
            await asker.send("room-join-request", room="r1")
            await asker.send("room-join-request", room="r2")
            for owner, room in ((o1, "r1"), (o2, "r2")):
                assert await owner.expect("room-join-request") == {
                    "room": room,
                    "peer_id": asker.sid,
                }
            await asker.send("room-join-request", room="r3", payload={"n": 3})
            assert await asker.expect("room-join-reject") == {
                "message": "too many pending join requests for one socket (limit 2)",
                "payload": {"n": 3},
            }
            await o3.assert_silent("room-join-request")
            await o1.send("room-join-reject", room="r1", peer_id=asker.sid)
            assert await asker.expect("room-join-reject") == {
                "room": "r1",
                "peer_id": asker.sid,
                "message": proto.OWNER_REJECTED,
            }
            await asker.send("room-join-request", room="r3")
            assert await o3.expect("room-join-request") == {"room": "r3", "peer_id": asker.sid}
            gone = asker.sid
            await asker.close()
            await until(lambda: gone not in hub_of(srv).conns)
            for owner, room in ((o2, "r2"), (o3, "r3")):
                await owner.send("room-join-accept", room=room, peer_id=gone)
                assert await owner.expect("error") == {
                    "message": proto.NO_PENDING_REQUEST,
                    "event": "room-join-accept",
                }
        finally:
            for client in clients:
                await client.close()


# --- 4. a client that stops reading ----------------------------------------------------------


def reply_size(payload: str) -> int:
    """Bytes of the engine.io packet answering a bad ``auth-request`` carrying ``payload``, as
    python-socketio encodes it."""
    body = {"message": proto.TOKEN_NOT_VALID, "payload": payload}
    return len("42" + json.dumps(["auth-reject", body], separators=(",", ":")))


def payload_for(size: int) -> str:
    """A payload whose reply (``reply_size``) is exactly ``size`` bytes."""
    return "x" * (size - reply_size(""))


async def test_the_send_queue_is_bounded_in_bytes_at_the_exact_limit():
    """Replies pile up for a long-polling client that does not poll: ``SEND_BUFFER_BYTES``
    waiting is still served (the next poll gets them all), one byte more cuts the client off."""
    limit = 4096
    settings = node_settings(**rooms_settings(), send_buffer_bytes=limit, rate_limit=0)
    async with running_server(settings) as srv:
        hub = hub_of(srv)
        polling = Polling(srv.session, srv.url)
        assert (await polling.open())[0] == 200
        sio_sid = await polling.connect()
        first, second = payload_for(limit // 2), payload_for(limit - limit // 2)
        for payload in (first, second):
            event = ["auth-request", {"token": "bad", "payload": payload}]
            assert await polling.post("42" + json.dumps(event)) == (200, "OK")
        status, text = await polling.get()
        replies = text.split("\x1e")
        assert status == 200 and [len(reply) for reply in replies] == [
            limit // 2,
            limit - limit // 2,
        ]
        assert [json.loads(reply[2:])[1]["payload"] for reply in replies] == [first, second]
        assert sio_sid in hub.conns
        for payload in (first, payload_for(limit - limit // 2 + 1)):
            event = ["auth-request", {"token": "bad", "payload": payload}]
            assert await polling.post("42" + json.dumps(event)) == (200, "OK")
        await until(lambda: sio_sid not in hub.conns)
        assert await polling.get() == (400, json.dumps(f"'Session is disconnected' {polling.sid}"))


# --- 5. HTTP bodies no client should send ----------------------------------------------------


async def test_post_app_refuses_malformed_bodies_with_400(rooms, caplog):
    caplog.set_level(logging.INFO)
    form = "application/x-www-form-urlencoded"
    cases = [
        (b"--xx\r\nbroken", {"Content-Type": "multipart/form-data; boundary=xx"}),
        (b"app=x", {"Content-Type": "multipart/form-data"}),  # no boundary
        (b"app=x&password=y", {"Content-Type": form + "; charset=nope"}),
        (b'{"app":"x"}', {"Content-Type": "application/json; charset=nope"}),
        (b'{"app":"\xff"}', {"Content-Type": "application/json"}),
    ]
    for body, headers in cases:
        async with rooms.session.post(rooms.url + "/app", data=body, headers=headers) as resp:
            assert (resp.status, await resp.json()) == (400, NOT_JSON_OR_FORM), headers
    for content_type in (form, "application/json"):  # answered, then the connection closed
        head = f"Content-Type: {content_type}\r\nContent-Encoding: gzip\r\n"
        status, body = await raw_post(rooms.port, "/app", head, b"not gzip at all")
        assert (status, json.loads(body)) == (400, NOT_JSON_OR_FORM)
    assert_log_bounded(caplog.records, most=0)


async def test_polling_posts_are_answered_at_once_and_without_a_traceback(rooms, caplog):
    """A long-polling POST over ``MAX_FRAME_BYTES`` (64 KiB) is answered 413 at once (its body
    unread) and one of exactly 64 KiB is served; invalid UTF-8 and packets a client may not
    send are answered 400; a POST for a closed session 400. Each refused one closes its
    session, as a refused WebSocket message does."""
    caplog.set_level(logging.INFO)
    limit = 65536
    at_limit = Polling(rooms.session, rooms.url)
    assert (await at_limit.open())[0] == 200
    await at_limit.connect()
    event = '42["x","' + "y" * (limit - len('42["x",""]')) + '"]'
    assert len(event) == limit
    assert await at_limit.post(event) == (200, "OK")  # an unknown event: answered by an error
    status, text = await at_limit.get()
    assert (status, json.loads(text[2:])) == (
        200,
        ["error", {"message": "unknown event 'x'", "event": "x"}],
    )

    cases = [
        (b"4" * (limit + 1), 413, f"payload is too large: {limit + 1} bytes, the limit is {limit}"),
        (b"42\xff\xfe", 400, "payload is not UTF-8"),
        (b"2", 400, "unexpected engine.io PING packet"),
        (b"x", 400, "unknown engine.io packet type"),
        (b"4\x1e" * 17, 400, "more than 16 packets in one payload"),
        (b"42[", 400, "malformed socket.io packet"),
    ]
    for body, status, message in cases:
        polling = Polling(rooms.session, rooms.url)
        assert (await polling.open())[0] == 200
        started = time.monotonic()
        assert await polling.post(body) == (status, json.dumps(message)), message
        assert time.monotonic() - started < 1 * UNIT, message
        assert await polling.post("40") == (400, json.dumps("Invalid session"))  # closed

    broken = Polling(rooms.session, rooms.url)  # answered, then the connection closed
    assert (await broken.open())[0] == 200
    path = broken.url.removeprefix(rooms.url)
    status, body = await raw_post(rooms.port, path, "Content-Encoding: gzip\r\n", b"not gzip")
    assert (status, body) == (400, json.dumps("the request body cannot be decoded").encode())
    assert await broken.post("40") == (400, json.dumps("Invalid session"))

    chunked = Polling(rooms.session, rooms.url)  # no Content-Length: refused while reading

    async def chunks() -> Any:
        for _ in range(limit // 1024 + 1):
            yield b"4" * 1024

    assert (await chunked.open())[0] == 200
    async with rooms.session.post(chunked.url, data=chunks()) as resp:
        expected = f"payload is too large: over {limit} bytes, the limit is {limit}"
        assert (resp.status, await resp.text()) == (413, json.dumps(expected))
    assert_log_bounded(caplog.records)


# --- 7. anything at all, on real sockets ------------------------------------------------------

FUZZ = settings(
    max_examples=int(os.environ.get("POLYSIGNAL_FUZZ_SOCKET_EXAMPLES", "20")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
brackety = st.text(alphabet='[]{}"\\,:1ax-/ ', max_size=120)
packets = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=40),
    st.builds(
        lambda kind, rest: kind + rest,
        st.sampled_from(["4", "42", "40", "41", "43", "45", "451-", "2", "3", "b", "6"]),
        brackety,
    ),
    st.builds(
        lambda depth: '42["room-create-request",' + "[" * depth + "]" * depth + "]",
        st.integers(60, 5000),
    ),
)


@FUZZ
@given(st.lists(packets, max_size=6), st.lists(packets, max_size=5))
def test_any_packets_are_answered_or_refused_cleanly(on_websocket, on_polling):
    """Arbitrary engine.io / socket.io packets after a CONNECT, on a WebSocket and in one
    long-polling POST: the server answers or closes within a bound, keeps serving others, and
    logs no traceback and nothing above INFO."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        asyncio.run(_fuzz_once(on_websocket, on_polling))
    finally:
        root.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]


async def _fuzz_once(on_websocket: list[str | bytes], on_polling: list[str | bytes]) -> None:
    settings = node_settings(**rooms_settings(), max_frame_bytes=4096, rate_limit=0)
    async with running_server(settings) as srv:
        ws = await engine_websocket(srv)
        await ws.send_str("40" + json.dumps({"token": app_token()}))
        assert (await ws.receive(timeout=2 * UNIT)).data.startswith("40{")
        for packet in on_websocket:
            if ws.closed:
                break
            with contextlib.suppress(ConnectionError):
                if isinstance(packet, bytes):
                    await ws.send_bytes(packet)
                else:
                    await ws.send_str(packet)
        hub = hub_of(srv)
        if hub.conns and not ws.closed:  # its socket.io session still on: it answers
            with contextlib.suppress(ConnectionError):
                await ws.send_str('42["marker"]')
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2 * UNIT):
                    while not ws.closed:
                        msg = await ws.receive()
                        if msg.type is not aiohttp.WSMsgType.TEXT or "marker" in msg.data:
                            break
        polling = Polling(srv.session, srv.url)
        assert (await polling.open())[0] == 200
        await polling.connect()
        body = b"\x1e".join(p if isinstance(p, bytes) else p.encode() for p in on_polling)
        status, _ = await polling.post(body)
        assert status in (200, 400, 413)
        again = Polling(srv.session, srv.url)  # and it serves the next one
        assert (await again.open())[0] == 200
        await again.connect()
