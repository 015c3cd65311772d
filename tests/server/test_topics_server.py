"""The topics protocol against a real server on a free port with real WebSocket clients."""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import orjson
import pytest

from support import (
    UNIT,
    assert_log_bounded,
    assert_silent,
    node_settings,
    receive_json,
    running_server,
    topic_subscribers,
)


async def _subscribed(server, topic: str, count: int) -> bool:
    return await topic_subscribers(server, topic) == count


pytestmark = pytest.mark.timeout(30)


async def subscribe(ws: aiohttp.ClientWebSocketResponse, *topics: str) -> None:
    await ws.send_str(orjson.dumps({"type": "subscribe", "topics": list(topics)}).decode())


async def sync(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Round-trip a ping so everything sent before it has been handled."""
    await ws.send_str('{"type":"ping"}')
    assert await receive_json(ws) == {"type": "pong"}


async def test_flow_like_fanout_semantics(server):
    """4 subscribers, one publishes an extra field: exactly the 3 others get it once each."""
    peers = [await server.ws() for _ in range(4)]
    for ws in peers:
        await subscribe(ws, "sync-test-room")
        await sync(ws)
    await peers[0].send_str(
        '{"type":"publish","topic":"sync-test-room","data":{"test":"sync"},"messageId":"m-1"}'
    )
    for ws in peers[1:]:
        got = await receive_json(ws)
        assert got == {
            "type": "publish",
            "topic": "sync-test-room",
            "data": {"test": "sync"},
            "messageId": "m-1",
            "clients": 4,
            "_origin": server.node.node_id,
        }
        await assert_silent(ws)
    await assert_silent(peers[0])


async def test_client_cannot_forge_clients_or_origin(server):
    a, b = await server.ws(), await server.ws()
    await subscribe(b, "t")
    await sync(b)
    await a.send_str('{"type":"publish","topic":"t","data":1,"clients":99,"_origin":"forged"}')
    got = await receive_json(b)
    assert got["clients"] == 1 and got["_origin"] == server.node.node_id


async def test_publisher_need_not_be_subscribed(server):
    a, b = await server.ws(), await server.ws()
    await subscribe(b, "t")
    await sync(b)
    await a.send_str('{"type":"publish","topic":"t","data":"x"}')
    assert (await receive_json(b))["data"] == "x"


async def test_echo_option_delivers_to_sender():
    async with running_server(node_settings(echo=True)) as srv:
        a, b = await srv.ws(), await srv.ws()
        for ws in (a, b):
            await subscribe(ws, "t")
            await sync(ws)
        await a.send_str('{"type":"publish","topic":"t","data":"x"}')
        assert (await receive_json(a))["clients"] == 2
        assert (await receive_json(b))["data"] == "x"


async def test_duplicate_subscribe_not_double_counted(server):
    a, b = await server.ws(), await server.ws()
    await subscribe(a, "t", "t")
    await subscribe(a, "t")
    await sync(a)
    await b.send_str('{"type":"publish","topic":"t","data":0}')
    assert (await receive_json(a))["clients"] == 1
    await assert_silent(a)


async def test_ping_pong(server):
    ws = await server.ws()
    await ws.send_str('{"type":"ping"}')
    assert await receive_json(ws) == {"type": "pong"}


async def test_unsubscribe_stops_delivery(server):
    a, b = await server.ws(), await server.ws()
    await subscribe(a, "t", "u")
    await sync(a)
    await a.send_str('{"type":"unsubscribe","topics":["t"]}')
    await sync(a)
    await b.send_str('{"type":"publish","topic":"t","data":0}')
    await b.send_str('{"type":"publish","topic":"u","data":1}')
    got = await receive_json(a)
    assert got["topic"] == "u" and got["clients"] == 1
    await assert_silent(a)


async def test_close_removes_connection_everywhere(server):
    a, b = await server.ws(), await server.ws()
    await subscribe(a, "t", "u")
    await subscribe(b, "t")
    await sync(a)
    await sync(b)
    c = await server.ws()
    await c.send_str('{"type":"publish","topic":"t","data":0}')
    assert (await receive_json(b))["clients"] == 2
    await a.close()
    for _ in range(int(100 * UNIT)):  # until a's close is handled: b is then t's only one
        await c.send_str('{"type":"publish","topic":"t","data":0}')
        if (await receive_json(b))["clients"] == 1:
            break
    else:
        raise AssertionError("a is still subscribed to t")
    await subscribe(b, "u")
    await sync(b)
    await c.send_str('{"type":"publish","topic":"u","data":0}')
    assert (await receive_json(b))["clients"] == 1  # a left u too


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        ("not json", "invalid JSON"),
        ("[1,2]", "expected a JSON object"),
        ('"str"', "expected a JSON object"),
        ("{}", "missing 'type'"),
        ('{"type":5}', "'type' must be a string"),
        ('{"type":"dance"}', "unknown type 'dance'"),
        ('{"type":"subscribe","topics":"t"}', "'topics' must be a list"),
        ('{"type":"subscribe"}', "missing 'topics'"),
        ('{"type":"subscribe","topics":["ok",3,null]}', "topics[1] is a number"),
        ('{"type":"publish","data":1}', "publish: missing 'topic'"),
        ('{"type":"publish","topic":{"a":1}}', "'topic' must be a string"),
    ],
)
async def test_bad_input_gets_error_and_connection_stays(server, frame, needle):
    ws = await server.ws()
    await ws.send_str(frame)
    got = await receive_json(ws)
    assert got["type"] == "error" and needle in got["message"]
    await sync(ws)


async def test_binary_frame_is_an_error_not_a_close(server):
    ws = await server.ws()
    await ws.send_bytes(b'{"type":"ping"}')
    got = await receive_json(ws)
    assert got["type"] == "error" and "binary" in got["message"]
    await sync(ws)


async def test_oversize_frame_closes_1009():
    async with running_server(node_settings(max_frame_bytes=4096)) as srv:
        ws = await srv.ws()
        other = await srv.ws()
        await ws.send_str('{"type":"publish","topic":"t","data":"' + "x" * 5000 + '"}')
        msg = await ws.receive(timeout=2 * UNIT)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == 1009 and msg.extra == "Message too large"
        await sync(other)


async def test_topic_limits():
    settings = node_settings(max_topics_per_connection=2, max_topic_length=8)
    async with running_server(settings) as srv:
        ws = await srv.ws()
        await subscribe(ws, "a", "b", "c")
        got = await receive_json(ws)
        assert "at most 2 topics" in got["message"]
        await subscribe(ws, "way-too-long-topic")
        got = await receive_json(ws)
        assert "longer than 8" in got["message"]
        await sync(ws)


async def test_the_connections_of_one_address_share_a_topic_budget():
    async with running_server(node_settings(max_topics_per_address=3)) as srv:
        first, second, publisher = await srv.ws(), await srv.ws(), await srv.ws()
        await subscribe(first, "a", "b")
        await sync(first)
        await subscribe(second, "c", "d")  # "c" is the 3rd: accepted; "d" refused
        assert await receive_json(second) == {
            "type": "error",
            "message": "subscribe: 1 topic(s) refused, the connections of one address may "
            "hold at most 3 topics",
        }
        await sync(second)
        await publisher.send_str('{"type":"publish","topic":"d","data":1}')
        await publisher.send_str('{"type":"publish","topic":"c","data":2}')
        assert (await receive_json(second))["data"] == 2  # subscribed to c, not to d
        await first.close()
        for _ in range(int(100 * UNIT)):  # until first's close is handled: its slots are back
            await subscribe(second, "d")
            await second.send_str('{"type":"ping"}')
            if await receive_json(second) == {"type": "pong"}:
                break  # no refusal came before the pong
            assert await receive_json(second) == {"type": "pong"}
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the closed connection's topics were never given back")
        await publisher.send_str('{"type":"publish","topic":"d","data":3}')
        assert (await receive_json(second))["data"] == 3


async def test_flood_is_rate_limited_and_server_keeps_serving():
    async with running_server(node_settings(rate_limit=50, rate_burst=20)) as srv:
        flooder, other = await srv.ws(), await srv.ws()
        for _ in range(300):
            await flooder.send_str('{"type":"ping"}')
        pongs = errors = 0
        while True:
            try:
                got = await receive_json(flooder, timeout=0.5 * UNIT)
            except TimeoutError:
                break
            if got["type"] == "pong":
                pongs += 1
            else:
                assert "rate limit" in got["message"]
                errors += 1
        assert errors >= 1
        assert 20 <= pongs < 100
        await sync(other)


async def test_per_address_connection_limit():
    async with running_server(node_settings(max_connections_per_ip=2)) as srv:
        await srv.ws()
        await srv.ws()
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await srv.ws()
        assert info.value.status == 429


async def non_reading_subscriber(port: int, topic: str) -> socket.socket:
    """A raw socket with a tiny receive buffer, upgraded and subscribed to ``topic`` (its pong
    read to show the subscribe was handled), that never reads again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(
        sock,
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    assert (await loop.sock_recv(sock, 4096)).startswith(b"HTTP/1.1 101")
    # masked client frames with a zero mask
    payload = orjson.dumps({"type": "subscribe", "topics": [topic]})
    ping = b'{"type":"ping"}'
    await loop.sock_sendall(
        sock,
        bytes([0x81, 0x80 | len(payload)])
        + b"\0\0\0\0"
        + payload
        + bytes([0x81, 0x80 | len(ping)])
        + b"\0\0\0\0"
        + ping,
    )
    pong = b"\x81\x0f" + b'{"type":"pong"}'
    assert await loop.sock_recv(sock, 4096) == pong
    return sock


async def test_non_reading_clients_are_cut_off_others_keep_receiving(caplog):
    """Peers that never read are closed (1013) once their send buffer passes the limit; the
    cuts of one fan-out are one WARNING line per interval, not one per peer."""
    caplog.set_level(logging.WARNING, "polysignal.server")
    settings = node_settings(send_buffer_bytes=64 * 1024, rate_limit=0)
    async with running_server(settings) as srv:
        socks = [await non_reading_subscriber(srv.port, "t") for _ in range(2)]
        reader = await srv.ws()
        publisher = await srv.ws()
        await subscribe(reader, "t")
        await sync(reader)
        blob = "y" * 8000
        for i in range(400):
            await publisher.send_str(
                orjson.dumps({"type": "publish", "topic": "t", "data": blob, "i": i}).decode()
            )
            got = await receive_json(reader)
            assert got["i"] == i
            if sum(c.closing for c in srv.node.connections) == 2:
                break
        assert sum(c.closing for c in srv.node.connections) == 2, "not both cut off"
        # The others keep receiving after the cut.
        await publisher.send_str('{"type":"publish","topic":"t","data":"after"}')
        assert (await receive_json(reader))["data"] == "after"
        for sock in socks:
            sock.close()
    lines = [r.getMessage() for r in caplog.records if "is not reading" in r.getMessage()]
    assert len(lines) == 1, lines


async def test_health_paths(server):
    async with aiohttp.ClientSession() as http:
        for path, status, text in [
            ("/healthz", 200, "okay"),
            ("/health", 200, "okay"),
            ("/anything/else", 200, "okay"),
            ("/readyz", 200, "ready"),
        ]:
            async with http.get(server.url + path) as resp:
                assert resp.status == status, path
                if text:
                    assert await resp.text() == text
                    assert resp.content_type == "text/plain"


async def test_plain_get_on_the_root_is_426_unless_peerjs_is_mounted_there():
    """The topics protocol's WebSocket path answers a plain GET 426, as Flow-Like; with
    PEERJS_PATH on `/` (the default) the root describes the PeerJS server instead, and a
    WebSocket there is still the topics protocol."""
    async with (
        running_server(node_settings(peerjs_path="/p/")) as srv,
        srv.session.get(srv.url + "/") as resp,
    ):
        assert (resp.status, resp.headers["Upgrade"]) == (426, "websocket")
    async with running_server() as srv:
        async with srv.session.get(srv.url + "/") as resp:
            assert resp.status == 200
            assert (await resp.json())["name"] == "PeerJS Server"
        ws = await srv.ws("/")
        await sync(ws)


async def test_graceful_shutdown_closes_peers_with_1001():
    async with running_server() as srv:
        ws = await srv.ws()
        await sync(ws)
        await srv.server.stop()
        msg = await ws.receive(timeout=3 * UNIT)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001


async def test_deep_nesting_is_an_error_and_logs_no_traceback(server, caplog):
    """Nested past MAX_DEPTH: a clear error for each frame, the connection stays, and the log
    holds no traceback (it used to answer `internal error` with one per frame)."""
    ws = await server.ws()
    deep = '{"type":"publish","topic":"t","data":' + "[" * 300 + "]" * 300 + "}"
    with caplog.at_level(logging.DEBUG, logger="polysignal"):
        for _ in range(20):
            await ws.send_str(deep)
            got = await receive_json(ws)
            assert got == {"type": "error", "message": "JSON nested deeper than 64 levels"}
        await sync(ws)
    assert_log_bounded(caplog.records)
