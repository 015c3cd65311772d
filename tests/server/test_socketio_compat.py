"""Every private python-socketio / python-engineio API that server/socketio_compat.py relies on,
one test each: if the library renames it, changes its signature or stops going through it, the
test that names it fails (pyproject.toml bounds the versions these tests passed on)."""

from __future__ import annotations

import asyncio
import binascii
import inspect
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
from aiohttp import web
from socketio.async_pubsub_manager import AsyncPubSubManager

from polysignal.server import socketio_compat as compat

from support import UNIT

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


def bounded(max_queued: int = 64, max_bytes: int = 65536) -> compat.BoundedServer:
    return compat.BoundedServer(
        max_queued=max_queued,
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
    ["2not-json", "9", "", '2{"a":1}', "4"],
    ids=["bad-json", "unknown-type", "empty", "not-a-list", "connect-error"],
)
async def test_handle_eio_message_raises_for_a_malformed_packet(packet):
    """``_handle_eio_message(eio_sid, data)`` decodes a socket.io packet and raises one of
    ``compat.MALFORMED`` for one it cannot use."""
    assert params(socketio.AsyncServer._handle_eio_message) == ["self", "eio_sid", "data"]
    server = socketio.AsyncServer(async_mode="aiohttp")
    with pytest.raises(compat.MALFORMED):
        await server._handle_eio_message("eio-sid", packet)


async def test_a_malformed_packet_closes_its_connection(live):
    disconnected = asyncio.Event()
    live.client.on("disconnect", lambda *_: disconnected.set())
    socket = live.engine_socket()
    await live.server._handle_eio_message(socket.sid, '2{"not":"a list"}')
    await asyncio.wait_for(disconnected.wait(), 2 * UNIT)


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
    """``eio.sockets``: eio_sid -> ``AsyncSocket`` with ``queue`` (an ``asyncio.Queue``),
    ``closing``, ``closed``, ``upgraded`` and ``close(wait, abort)``."""
    socket = live.engine_socket()
    assert isinstance(socket, engineio.async_socket.AsyncSocket)
    assert isinstance(socket.queue, asyncio.Queue)
    assert (socket.closing, socket.closed, socket.upgraded) == (False, False, True)
    close = inspect.signature(engineio.async_socket.AsyncSocket.close).parameters
    assert {"wait", "abort"} <= set(close) and close["wait"].default is True
    before = socket.queue.qsize()
    await socket.send(engineio.packet.Packet(engineio.packet.NOOP))
    assert socket.queue.qsize() in (before, before + 1)  # queued (the writer may have taken it)


async def test_a_full_queue_cuts_the_client_off(live):
    live.server.max_queued = 0  # every queue is "full" now
    disconnected = asyncio.Event()
    live.client.on("disconnect", lambda *_: disconnected.set())
    socket = live.engine_socket()
    await live.server.emit("never", {}, to=live.sid)
    await asyncio.wait_for(disconnected.wait(), 2 * UNIT)
    assert socket.closed
    assert live.received.empty()


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
