"""Every private python-socketio / python-engineio API that server/socketio_compat.py relies on,
one test each: if the library renames it, changes its signature or stops going through it, the
test that names it fails (pyproject.toml bounds the versions these tests passed on)."""

from __future__ import annotations

import asyncio
import binascii
import inspect
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import engineio
import engineio.async_drivers.aiohttp
import engineio.async_socket
import engineio.packet
import pytest
import socketio
import socketio.packet
from aiohttp import web
from socketio.async_pubsub_manager import AsyncPubSubManager

from polysignal.core.limits import AddressCounter
from polysignal.server import socketio_compat as compat

from support import UNIT, until

pytestmark = pytest.mark.timeout(30)


def params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


@dataclass
class Live:
    """A BoundedServer on a free port, with one python-socketio client connected."""

    server: compat.BoundedServer
    client: socketio.AsyncClient
    url: str
    received: asyncio.Queue[Any]

    @property
    def sid(self) -> str:
        sid = self.client.get_sid()
        assert isinstance(sid, str)
        return sid

    def engine_socket(self) -> Any:
        (socket,) = self.server.eio.sockets.values()
        return socket


async def serve(server: compat.BoundedServer) -> tuple[web.AppRunner, str]:
    app = web.Application()
    server.attach(app, socketio_path="socket.io")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def bounded(max_queued_bytes: int = 1 << 20, max_bytes: int = 65536) -> compat.BoundedServer:
    return compat.BoundedServer(
        max_queued_bytes=max_queued_bytes,
        max_http_buffer_size=max_bytes,
        async_mode="aiohttp",
        async_handlers=False,
        logger=False,
        engineio_logger=False,
    )


@pytest.fixture
async def live() -> AsyncIterator[Live]:
    server = bounded()
    runner, url = await serve(server)
    client = socketio.AsyncClient(reconnection=False)
    received: asyncio.Queue[Any] = asyncio.Queue()
    client.on("*", lambda event, data: received.put_nowait((event, data)))
    await client.connect(url, transports=["websocket"], wait_timeout=5 * UNIT)
    try:
        yield Live(server, client, url, received)
    finally:
        await client.disconnect()
        await server.shutdown()
        await runner.cleanup()


# --- python-socketio ---------------------------------------------------------------------------


def test_the_default_manager_is_the_in_memory_one():
    """Rooms use no message queue: nothing crosses nodes through socket.io (no pickle)."""
    server = bounded()
    assert type(server.manager) is socketio.AsyncManager
    assert not isinstance(server.manager, AsyncPubSubManager)


def test_the_engineio_server_is_made_from_engineio_server_class():
    """``_engineio_server_class()`` is the class the constructor makes ``eio`` of, with the
    engine.io options; a BoundedServer's is a GuardedEngineServer."""
    assert params(socketio.AsyncServer._engineio_server_class) == ["self"]
    assert (
        socketio.AsyncServer(async_mode="aiohttp")._engineio_server_class() is engineio.AsyncServer
    )
    server = bounded(max_bytes=1234)
    assert type(server.eio) is compat.GuardedEngineServer
    assert server.eio.max_http_buffer_size == 1234


async def test_emits_go_through_send_eio_packet(live, monkeypatch):
    """``AsyncManager.emit`` sends each recipient's packet with ``_send_eio_packet(eio_sid, pkt)``;
    ``emit`` with a list of socket ids reaches each of them once."""
    assert params(socketio.AsyncServer._send_eio_packet) == ["self", "eio_sid", "eio_pkt"]
    assert inspect.iscoroutinefunction(socketio.AsyncServer._send_eio_packet)
    calls: list[tuple[str, Any]] = []
    original = live.server._send_eio_packet

    async def spy(eio_sid: str, eio_pkt: Any) -> None:
        calls.append((eio_sid, eio_pkt))
        await original(eio_sid, eio_pkt)

    monkeypatch.setattr(live.server, "_send_eio_packet", spy)
    await live.server.emit("hello", {"n": 1}, to=[live.sid, "not-a-socket"])
    assert await asyncio.wait_for(live.received.get(), 2 * UNIT) == ("hello", {"n": 1})
    ((eio_sid, pkt),) = calls
    assert eio_sid in live.server.eio.sockets
    assert pkt.packet_type == engineio.packet.MESSAGE


async def test_other_packets_go_through_send_packet(live, monkeypatch):
    """``_send_packet(eio_sid, pkt)`` sends socket.io packets built per client (acks, connect
    answers)."""
    assert params(socketio.AsyncServer._send_packet) == ["self", "eio_sid", "pkt"]
    calls: list[str] = []
    original = live.server._send_packet

    async def spy(eio_sid: str, pkt: Any) -> None:
        calls.append(eio_sid)
        await original(eio_sid, pkt)

    monkeypatch.setattr(live.server, "_send_packet", spy)
    live.server.on("ask", lambda sid, data: data)  # an ack answer
    assert await live.client.call("ask", 5, timeout=2 * UNIT) == 5
    assert calls == [next(iter(live.server.eio.sockets))]


@pytest.mark.parametrize(
    "packet",
    ["2not-json", "9", "", '2{"a":1}', "4", '2["x",' + "[" * 30000 + "]" * 30000 + "]"],
    ids=["bad-json", "unknown-type", "empty", "not-a-list", "connect-error", "too-deep"],
)
async def test_handle_eio_message_raises_for_a_malformed_packet(packet):
    """``_handle_eio_message(eio_sid, data)`` decodes a socket.io packet and raises one of
    ``compat.MALFORMED`` for one it cannot use."""
    assert params(socketio.AsyncServer._handle_eio_message) == ["self", "eio_sid", "data"]
    server = socketio.AsyncServer(async_mode="aiohttp")
    with pytest.raises(compat.MALFORMED):
        await server._handle_eio_message("eio-sid", packet)


async def test_json_nested_past_the_recursion_limit_raises_recursion_error():
    """The reason ``compat.MALFORMED`` holds RecursionError: socket.io's JSON parser (the
    standard library's) recurses, and a packet nested ~30,000 deep escapes as RecursionError,
    no ValueError. Packets nested deeper than MAX_DEPTH are refused before it parses them."""
    server = socketio.AsyncServer(async_mode="aiohttp")
    with pytest.raises(RecursionError):
        await server._handle_eio_message("eio-sid", '2["x",' + "[" * 30000 + "]" * 30000 + "]")
    with pytest.raises(RecursionError):
        engineio.packet.Packet(encoded_packet="4" + "[" * 30000 + "]" * 30000)


async def test_a_packet_nested_deeper_than_max_depth_is_refused_unparsed(live, monkeypatch):
    """Refused from its text (``proto.nests_deeper``): python-socketio's decoder never runs."""
    disconnected = asyncio.Event()
    live.client.on("disconnect", lambda *_: disconnected.set())
    decoded: list[Any] = []
    original = socketio.packet.Packet.decode

    def spy(self: Any, encoded_packet: Any) -> Any:
        decoded.append(encoded_packet)
        return original(self, encoded_packet)

    monkeypatch.setattr(socketio.packet.Packet, "decode", spy)
    socket = live.engine_socket()
    await live.server._handle_eio_message(socket.sid, '2["x",' + "[" * 65 + "]" * 65 + "]")
    await asyncio.wait_for(disconnected.wait(), 2 * UNIT)
    assert decoded == [] and socket.closed
    assert socket.polysignal_refused == "packet nested deeper than 64 levels"


async def test_a_malformed_packet_closes_its_connection(live):
    disconnected = asyncio.Event()
    live.client.on("disconnect", lambda *_: disconnected.set())
    socket = live.engine_socket()
    await live.server._handle_eio_message(socket.sid, '2{"not":"a list"}')
    await asyncio.wait_for(disconnected.wait(), 2 * UNIT)
    assert socket.closed
    # what its client still sends is dropped, a CONNECT included
    await live.server._handle_eio_message(socket.sid, "40")
    assert live.server.manager.sid_from_eio_sid(socket.sid, "/") is None


async def test_binary_packet_holds_a_binary_event_awaiting_its_attachments(live):
    """``_binary_packet``: eio_sid -> the binary event waiting for its attachments."""
    assert live.server._binary_packet == {}
    eio_sid = live.engine_socket().sid
    await live.server._handle_eio_message(eio_sid, '51-["x",{"_placeholder":true,"num":0}]')
    assert live.server._binary_packet[eio_sid].packet_type == socketio.packet.BINARY_EVENT
    await live.server._handle_eio_message(eio_sid, "9")  # malformed: the entry is dropped
    assert eio_sid not in live.server._binary_packet


# --- python-engineio ---------------------------------------------------------------------------


async def test_engineio_sockets_and_their_queue(live):
    """``eio.sockets``: eio_sid -> ``AsyncSocket`` with ``queue`` (made by the server's
    ``create_queue()``), ``closing``, ``closed``, ``connected``, ``upgraded`` and
    ``close(wait, abort)``."""
    socket = live.engine_socket()
    assert isinstance(socket, engineio.async_socket.AsyncSocket)
    assert params(engineio.AsyncServer.create_queue) == ["self", "args", "kwargs"]
    assert isinstance(socket.queue, compat.SendQueue)
    assert (socket.closing, socket.closed, socket.connected, socket.upgraded) == (
        False,
        False,
        True,
        True,
    )
    close = inspect.signature(engineio.async_socket.AsyncSocket.close).parameters
    assert {"wait", "abort"} <= set(close) and close["wait"].default is True
    before = socket.queue.qsize()
    await socket.send(engineio.packet.Packet(engineio.packet.NOOP))
    assert socket.queue.qsize() in (before, before + 1)  # queued (the writer may have taken it)


def test_queue_hooks_see_every_put_and_get():
    """``asyncio.Queue`` hands every item to ``_put`` and takes it from ``_get``, whichever of
    ``put``/``put_nowait``/``get``/``get_nowait`` is called: SendQueue counts there."""
    queue = compat.SendQueue()
    hello = engineio.packet.Packet(engineio.packet.MESSAGE, data="hello")
    binary = engineio.packet.Packet(engineio.packet.MESSAGE, data=b"\x00\x01\x02")
    queue.put_nowait(hello)
    queue.put_nowait(binary)
    queue.put_nowait(None)  # engine.io's "stop" for its writer: not a packet
    assert queue.waiting == len("4hello") + 3
    assert queue.get_nowait() is hello and queue.waiting == 3  # no WebSocket: a poll took it
    assert queue.get_nowait() is binary and queue.waiting == 0
    assert binary.encode(b64=True) == "bAAEC"  # measuring it cached no raw encoding


async def test_written_packets_leave_the_count(live):
    """On a WebSocket, a packet counts from ``put`` until ``GuardedWebSocket.send`` wrote it:
    engine.io's writer takes every queued packet at once, then writes them one by one."""
    assert params(compat.GuardedWebSocket.send) == ["self", "message"]
    queue = live.engine_socket().queue
    for n in range(20):
        await live.server.emit("n", n, to=live.sid)
    for n in range(20):
        assert await asyncio.wait_for(live.received.get(), 2 * UNIT) == ("n", n)
    await until(lambda: queue.waiting == 0)


async def test_a_queue_past_its_bytes_cuts_the_client_off(live, caplog):
    """More than ``max_queued_bytes`` waiting: the client is cut off at once (logged once)."""
    caplog.set_level(logging.INFO)
    live.server.max_queued_bytes = 0  # any packet waiting is one byte too many
    disconnected = asyncio.Event()
    live.client.on("disconnect", lambda *_: disconnected.set())
    socket = live.engine_socket()
    await live.server.emit("never", {}, to=live.sid)
    await asyncio.wait_for(disconnected.wait(), 2 * UNIT)
    assert socket.closed
    assert live.received.empty()
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(loud) == 1 and "is not reading" in loud[0], loud


async def test_polling_sessions_are_closed_at_stop():
    server = bounded()
    runner, url = await serve(server)
    client = socketio.AsyncClient(reconnection=False)
    gone = asyncio.Event()
    client.on("disconnect", lambda *_: gone.set())
    try:
        await client.connect(url, transports=["polling"], wait_timeout=5 * UNIT)
        (socket,) = server.eio.sockets.values()
        assert socket.upgraded is False
        await compat.close_websockets(server, 1 * UNIT)
        await asyncio.wait_for(gone.wait(), 3 * UNIT)
    finally:
        await client.disconnect()
        await server.shutdown()
        await runner.cleanup()


def test_the_websocket_class_of_the_aiohttp_mode():
    """``_async["websocket"]`` is engine.io's aiohttp WebSocket, ``WebSocket(handler, server)``
    with ``__call__(environ)`` and ``wait()``; a BoundedServer swaps in GuardedWebSocket."""
    plain = engineio.AsyncServer(async_mode="aiohttp")
    cls = engineio.async_drivers.aiohttp.WebSocket
    assert plain._async["websocket"] is cls
    assert params(cls.__init__) == ["self", "handler", "server"]
    assert params(cls.__call__) == ["self", "environ"]
    assert params(cls.wait) == ["self"]
    assert issubclass(compat.GuardedWebSocket, cls)
    server = bounded()
    assert server.eio._async["websocket"] is compat.GuardedWebSocket
    assert plain._async["websocket"] is cls  # only that server's


async def test_an_open_websocket_and_what_it_holds(live):
    """While open: ``_sock`` is aiohttp's WebSocketResponse, ``environ["aiohttp.request"]`` the
    request, ``handler.__self__`` the engine.io socket, ``server`` the engine.io server."""
    (ws,) = live.server.websockets.sockets
    assert isinstance(ws, compat.GuardedWebSocket)
    assert isinstance(ws._sock, web.WebSocketResponse)
    assert isinstance(compat.request_of(ws.environ), web.Request)
    assert compat.remote_address(ws.environ) == "127.0.0.1"
    assert ws.handler.__self__ is live.engine_socket()
    assert ws.server is live.server.eio
    assert not live.server.websockets.idle.is_set()


async def test_a_graceful_stop_closes_websockets_with_1001():
    server = bounded()
    runner, url = await serve(server)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket") as ws,
        ):
            assert (await ws.receive(timeout=2 * UNIT)).data.startswith("0{")
            await ws.send_str("40")
            assert (await ws.receive(timeout=2 * UNIT)).data.startswith("40")
            await compat.close_websockets(server, 1 * UNIT)
            closing = await ws.receive(timeout=2 * UNIT)
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1001
        assert server.websockets.idle.is_set()
    finally:
        await server.shutdown()
        await runner.cleanup()


async def test_websocket_frames_are_held_to_max_http_buffer_size():
    """engine.io's aiohttp WebSocket refuses a frame over ``max_http_buffer_size`` while reading
    it (1009), rather than reading it whole first (docs/protocols/rooms.md)."""
    server = bounded(max_bytes=1024)
    runner, url = await serve(server)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket") as ws,
        ):
            assert (await ws.receive(timeout=2 * UNIT)).data.startswith("0{")
            await ws.send_str("4" + "x" * 2048)
            closing = await ws.receive(timeout=2 * UNIT)
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1009
    finally:
        await server.shutdown()
        await runner.cleanup()


async def test_websockets_are_served_without_compression():
    """A client offering permessage-deflate (socket.io-client and browsers do) gets a WebSocket
    without it: its zlib state would be most of an idle socket's memory."""
    server = bounded()
    runner, url = await serve(server)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{url}/socket.io/?EIO=4&transport=websocket", compress=15) as ws,
        ):
            assert ws.compress == 0
            assert "Sec-WebSocket-Extensions" not in ws._response.headers
            assert (await ws.receive(timeout=2 * UNIT)).data.startswith("0{")
    finally:
        await server.shutdown()
        await runner.cleanup()


def test_engineio_websocket_call_is_what_guarded_websocket_replaces():
    """GuardedWebSocket.__call__ does engine.io's ``__call__`` (prepare a WebSocketResponse of
    ``max_http_buffer_size`` on ``environ['aiohttp.request']``, set ``environ``, run the
    handler, return the response) without compression: engine.io's must still be that."""
    source = inspect.getsource(engineio.async_drivers.aiohttp.WebSocket.__call__)
    for part in (
        "request = environ['aiohttp.request']",
        "max_msg_size=self.server.max_http_buffer_size",
        "await self._sock.prepare(request)",
        "self.environ = environ",
        "await self.handler(self)",
        "return self._sock",
    ):
        assert part in source, part


def test_translate_request_puts_the_aiohttp_request_in_environ():
    source = inspect.getsource(engineio.async_drivers.aiohttp.translate_request)
    assert "'aiohttp.request': request" in source
    assert compat.request_of({}) is None and compat.remote_address({}) == "unknown"


@pytest.mark.parametrize(
    ("encoded", "kind"),
    [("4hello", engineio.packet.MESSAGE), ("2probe", engineio.packet.PING), (b"\x04ab", 4)],
)
def test_engineio_packets_decode(encoded, kind):
    assert engineio.packet.Packet(encoded_packet=encoded).packet_type == kind
    assert engineio.packet.packet_names[engineio.packet.NOOP] == "NOOP"
    assert len(engineio.packet.packet_names) == 7


@pytest.mark.parametrize("encoded", ["", "x", "bnot base64!"])
def test_undecodable_engineio_packets_raise(encoded):
    with pytest.raises((ValueError, IndexError, binascii.Error)):
        engineio.packet.Packet(encoded_packet=encoded)


# --- python-engineio: sessions, requests, refusals ---------------------------------------------


def test_the_handshake_and_event_hooks():
    """``_handle_connect(environ, transport, jsonp_index)`` starts a session;
    ``_trigger_event(event, *args, run_async=...)`` runs its handlers; ``_log_error_once``
    logs what a client got wrong."""
    assert params(engineio.AsyncServer._handle_connect) == [
        "self",
        "environ",
        "transport",
        "jsonp_index",
    ]
    assert params(engineio.AsyncServer._trigger_event) == ["self", "event", "args", "kwargs"]
    assert params(engineio.AsyncServer._log_error_once) == ["self", "message", "message_key"]
    assert params(engineio.AsyncServer.handle_request) == ["self", "args", "kwargs"]


def test_the_post_branch_helpers():
    """What ``GuardedEngineServer._handle_post`` uses in place of engine.io's POST branch."""
    assert params(engineio.AsyncServer._make_response) == ["self", "response_dict", "environ"]
    assert params(engineio.AsyncServer._ok) == ["self", "packets", "headers", "jsonp_index"]
    assert params(engineio.AsyncServer._cors_allowed_origins) == ["self", "environ"]
    assert params(engineio.async_socket.AsyncSocket.receive) == ["self", "pkt"]
    server = bounded()
    assert server.eio._ok() == {
        "status": "200 OK",
        "headers": [("Content-Type", "text/plain")],
        "response": b"OK",
    }
    assert callable(server.eio._async["translate_request"])


async def test_sessions_hold_their_address_from_the_handshake_until_they_close():
    """Counted at the handshake (a long-polling session that never CONNECTs included), refused
    past the limit with 429, given back by ``disconnect``, once, however the session ends."""
    sessions = AddressCounter(2)
    server = compat.BoundedServer(
        max_queued_bytes=1 << 20, sessions=sessions, async_mode="aiohttp", logger=False
    )
    runner, url = await serve(server)
    client = socketio.AsyncClient(reconnection=False)
    try:
        await client.connect(url, transports=["websocket"], wait_timeout=5 * UNIT)
        assert sessions.count("127.0.0.1") == 1
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/socket.io/?EIO=4&transport=polling") as resp:
                assert resp.status == 200
                sid = json.loads((await resp.text())[1:])["sid"]
            assert sessions.count("127.0.0.1") == 2
            async with http.get(f"{url}/socket.io/?EIO=4&transport=polling") as resp:
                assert (resp.status, await resp.text()) == (
                    429,
                    '"too many connections from this address"',
                )
            polling = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
            async with http.post(polling, data=b"1") as resp:  # engine.io CLOSE
                assert (resp.status, await resp.text()) == (200, "OK")
            assert sessions.count("127.0.0.1") == 1
            async with http.post(polling, data=b"1") as resp:
                assert (resp.status, await resp.text()) == (400, '"Invalid session"')
        await client.disconnect()
        await until(lambda: sessions.count("127.0.0.1") == 0)
    finally:
        await client.disconnect()
        await server.shutdown()
        await runner.cleanup()


async def test_a_session_that_stops_polling_is_closed_by_the_ping_timeout():
    """engine.io's service task closes a session whose ping goes unanswered for
    ``ping_timeout`` (it pings ``ping_interval`` after the handshake), and ``disconnect``
    gives its place back."""
    sessions = AddressCounter(1)
    server = compat.BoundedServer(
        max_queued_bytes=1 << 20,
        sessions=sessions,
        async_mode="aiohttp",
        logger=False,
        ping_interval=0.1,
        ping_timeout=0.1,
    )
    assert (server.eio.ping_interval, server.eio.ping_timeout) == (0.1, 0.1)
    runner, url = await serve(server)
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/socket.io/?EIO=4&transport=polling") as resp,
        ):
            assert resp.status == 200
        assert sessions.count("127.0.0.1") == 1
        await until(lambda: sessions.count("127.0.0.1") == 0, timeout=5 * UNIT)
        (socket,) = server.eio.sockets.values() or [None]
        assert socket is None or socket.closed
    finally:
        await server.shutdown()
        await runner.cleanup()


async def test_client_errors_engineio_answers_are_not_logged_as_errors(live, caplog):
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as http:
        for query in ("EIO=4&transport=polling&sid=nope", "EIO=3&transport=polling"):
            async with http.get(f"{live.url}/socket.io/?{query}") as resp:
                assert resp.status == 400
    loud = [r for r in caplog.records if r.levelno >= logging.INFO and r.name != "aiohttp.access"]
    assert not loud, [r.getMessage() for r in loud]


async def test_a_post_from_an_origin_not_allowed_is_refused(live):
    """As engine.io checks every request's ``Origin`` (same origin only, by default)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{live.url}/socket.io/?EIO=4&transport=polling") as resp:
            sid = json.loads((await resp.text())[1:])["sid"]
        async with http.post(
            f"{live.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
            data=b"40",
            headers={"Origin": "http://elsewhere.invalid"},
        ) as resp:
            assert (resp.status, await resp.text()) == (400, '"Not an accepted origin"')


async def test_a_websocket_handshake_that_fails_gives_its_place_back():
    """aiohttp refuses the upgrade (no ``Sec-WebSocket-Key``) after engine.io started the
    session: the session is closed at once, not at its ping timeout."""
    sessions = AddressCounter(1)
    server = compat.BoundedServer(
        max_queued_bytes=1 << 20, sessions=sessions, async_mode="aiohttp", logger=False
    )
    runner, url = await serve(server)
    try:
        upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{url}/socket.io/?EIO=4&transport=websocket", headers=upgrade) as resp,
        ):
            assert resp.status == 400
        assert sessions.count("127.0.0.1") == 0
        assert all(socket.closed for socket in server.eio.sockets.values())
    finally:
        await server.shutdown()
        await runner.cleanup()


def test_aiohttp_ends_a_connection_with_force_close():
    """``answer_and_close``: ``request.protocol`` is aiohttp's RequestHandler, whose
    ``force_close()`` ends the connection once the answer is written (no lingering read of a
    body that does not decode); ``RequestPayloadError`` is what reading such a body raises."""
    from aiohttp.web_protocol import RequestHandler, RequestPayloadError

    assert isinstance(inspect.getattr_static(web.BaseRequest, "protocol"), property)
    assert params(RequestHandler.force_close) == ["self"]
    assert web.RequestPayloadError is RequestPayloadError
    assert web.RequestPayloadError in compat.BODY_ERRORS
