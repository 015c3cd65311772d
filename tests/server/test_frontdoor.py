"""The front door (server/frontdoor.py): every request's first bytes, on a real socket."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import orjson
import pytest

from rawws import ACCEPT, Raw, close, connect, frame, request, upgraded
from support import UNIT, assert_log_bounded, node_settings, running_server, until, until_true

pytestmark = pytest.mark.timeout(30)

PING = frame(b'{"type":"ping"}')
PONG = (0x1, b'{"type":"pong"}')


async def test_an_upgrade_is_answered_with_the_rfc_accept_key(server):
    raw = await connect(server.port)
    raw.send(request())
    response = await raw.response()
    assert response.status == 101
    assert response.headers["upgrade"] == "websocket"
    assert response.headers["connection"] == "Upgrade"
    assert response.headers["sec-websocket-accept"] == ACCEPT
    assert "sec-websocket-protocol" not in response.headers
    await raw.aclose()


async def test_frames_pipelined_after_the_upgrade_request_are_read(server):
    """Frames sent in the same write as the request are the connection's first frames."""
    raw = await connect(server.port)
    raw.send(request() + PING + PING)
    assert (await raw.response()).status == 101
    assert await raw.frame() == PONG
    assert await raw.frame() == PONG
    await raw.aclose()


async def test_a_request_split_into_single_bytes_is_read(server):
    raw = await connect(server.port)
    for byte in request():
        raw.send(bytes([byte]))
        await raw.writer.drain()
    assert (await raw.response()).status == 101
    raw.send(PING)
    assert await raw.frame() == PONG
    await raw.aclose()


@pytest.mark.parametrize(
    ("headers", "status", "body"),
    [
        (
            {"Sec-WebSocket-Version": "8"},
            426,
            "unsupported Sec-WebSocket-Version; this server speaks 13",
        ),
        (
            {"Sec-WebSocket-Version": None},
            426,
            "unsupported Sec-WebSocket-Version; this server speaks 13",
        ),
        ({"Sec-WebSocket-Key": None}, 400, "missing Sec-WebSocket-Key"),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400, "invalid Sec-WebSocket-Key"),
    ],
)
async def test_a_bad_handshake_is_refused_before_the_upgrade(server, headers, status, body):
    raw = await connect(server.port)
    raw.send(request(headers=headers))
    response = await raw.response()
    assert (response.status, response.body.decode()) == (status, body + "\n")
    assert response.headers["connection"] == "close"
    if status == 426:
        assert response.headers["sec-websocket-version"] == "13"
    assert await raw.eof() == b""
    assert not server.node.connections


async def test_an_http_1_0_upgrade_is_refused(server):
    raw = await connect(server.port)
    raw.send(request(version="HTTP/1.0"))
    response = await raw.response()
    assert (response.status, response.body) == (400, b"a WebSocket upgrade needs HTTP/1.1\n")


async def test_an_upgrade_with_another_method_is_not_a_websocket(server):
    """A POST asking for an upgrade goes to the HTTP routes, which only allow GET there."""
    raw = await connect(server.port)
    raw.send(request(method="POST", headers={"Content-Length": "0"}))
    response = await raw.response()
    assert response.status == 405
    assert not server.node.connections


async def test_a_malformed_request_line_is_answered_400(server):
    raw = await connect(server.port)
    raw.send(b"NOT HTTP AT ALL\r\n\r\n")
    response = await raw.response()
    assert (response.status, response.body) == (400, b"malformed HTTP request\n")
    assert await raw.eof() == b""


def padded_request(size: int) -> bytes:
    """An upgrade request whose request line and headers are exactly ``size`` bytes."""
    base = request(extra=[("X-Pad", "")])
    return request(extra=[("X-Pad", "p" * (size - len(base)))])


async def test_headers_of_exactly_the_byte_limit_are_accepted():
    async with running_server(node_settings(max_header_bytes=2048)) as srv:
        raw = await connect(srv.port)
        data = padded_request(2048)
        assert len(data) == 2048
        raw.send(data)
        assert (await raw.response()).status == 101


async def test_headers_one_byte_over_the_limit_are_refused_431():
    async with running_server(node_settings(max_header_bytes=2048)) as srv:
        raw = await connect(srv.port)
        raw.send(padded_request(2049))
        response = await raw.response()
        assert (response.status, response.body) == (
            431,
            b"request line and headers longer than 2048 bytes\n",
        )


async def test_an_endless_header_is_refused_once_it_passes_the_limit():
    """Bytes that never end the headers are not buffered past the limit."""
    async with running_server(node_settings(max_header_bytes=2048)) as srv:
        raw = await connect(srv.port)
        raw.send(b"GET / HTTP/1.1\r\nX-Endless: " + b"x" * 4096)
        assert (await raw.response()).status == 431


async def test_header_count_at_the_limit_is_accepted_and_one_more_refused():
    async with running_server(node_settings(max_headers=8)) as srv:
        five = 5  # request() sends Host, Upgrade, Connection, Key, Version
        raw = await connect(srv.port)
        raw.send(request(extra=[(f"X-{i}", "v") for i in range(8 - five)]))
        assert (await raw.response()).status == 101
        raw = await connect(srv.port)
        raw.send(request(extra=[(f"X-{i}", "v") for i in range(9 - five)]))
        response = await raw.response()
        assert (response.status, response.body) == (431, b"more than 8 header lines\n")


async def test_a_trickled_request_is_closed_at_the_header_timeout():
    """One byte per 100 ms: answered 408 once HEADER_TIMEOUT has passed, not before."""
    timeout = 0.6 * UNIT
    async with running_server(node_settings(header_timeout=timeout)) as srv:
        raw = await connect(srv.port)
        started = time.monotonic()

        async def trickle() -> None:
            for byte in request():
                raw.send(bytes([byte]))
                await asyncio.sleep(0.1 * UNIT)

        sender = asyncio.get_running_loop().create_task(trickle())
        try:
            response = await raw.response(timeout=5 * UNIT)
        finally:
            sender.cancel()
        waited = time.monotonic() - started
        assert response.status == 408
        assert response.body == f"the request did not arrive within {timeout:g}s\n".encode()
        assert timeout <= waited < timeout + 1.5 * UNIT
        # Then the server lingers: it reads what still comes until the client is done.
        assert srv.door.pending
        assert await raw.eof() == b""  # its side is closed
        await raw.aclose()
        await until(lambda: not srv.door.pending)


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout():
    async with running_server(node_settings(header_timeout=0.4 * UNIT)) as srv:
        raw = await connect(srv.port)
        assert await raw.eof(timeout=5 * UNIT) == b""
        assert not srv.door.pending


async def test_plain_requests_are_handed_to_aiohttp_with_keep_alive_and_pipelining(server):
    raw = await connect(server.port)
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await raw.response()
    second = await raw.response()
    assert (first.status, first.body, second.status, second.body) == (
        200,
        b"okay",
        200,
        b"ready",
    )
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # PeerJS's description (PEERJS_PATH /)
    third = await raw.response()
    assert (third.status, orjson.loads(third.body)["name"]) == (200, "PeerJS Server")
    await raw.aclose()


async def test_an_upgrade_after_plain_requests_on_the_same_connection(server):
    """A WebSocket asked for on a connection aiohttp kept alive is served the same way."""
    raw = await connect(server.port)
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await raw.response()).body == b"okay"
    raw.send(request() + PING)  # the frame follows in the same write
    response = await raw.response()
    assert (response.status, response.headers["sec-websocket-accept"]) == (101, ACCEPT)
    assert await raw.frame() == PONG
    (conn,) = server.node.connections
    raw.send(frame(b"\x03\xe8", 0x8))
    assert await raw.close_frame() == (1000, "")
    assert await raw.eof() == b""
    await until(lambda: not server.node.connections)
    assert conn.lost


async def test_a_bad_upgrade_after_plain_requests_is_refused_the_same_way(server):
    raw = await connect(server.port)
    raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await raw.response()
    raw.send(request(headers={"Sec-WebSocket-Version": "7"}))
    response = await raw.response()
    assert response.status == 426
    assert response.body == b"unsupported Sec-WebSocket-Version; this server speaks 13\n"


async def test_aiohttp_clients_reusing_a_connection_get_a_websocket(server):
    """aiohttp's ClientSession reuses its pooled connection for ws_connect."""
    async with server.session.get(server.url + "/healthz") as resp:
        assert await resp.text() == "okay"
    ws = await server.ws("/")
    await ws.send_str('{"type":"ping"}')
    assert (await ws.receive_json(timeout=3 * UNIT)) == {"type": "pong"}


async def test_signal_fire_subprotocol_is_echoed_as_offered(server):
    raw = await upgraded(server.port, "/", headers={"Sec-WebSocket-Protocol": "x, Signal-Fire@3"})
    opcode, payload = await raw.frame()  # the welcome
    assert opcode == 0x1 and b'"cmd":"welcome"' in payload
    raw2 = await connect(server.port)
    raw2.send(request("/", headers={"Sec-WebSocket-Protocol": "Signal-Fire@2"}))
    response = await raw2.response()
    assert response.headers["sec-websocket-protocol"] == "Signal-Fire@2"


async def test_a_subprotocol_no_protocol_speaks_is_not_echoed(server):
    raw = await connect(server.port)
    raw.send(request("/", headers={"Sec-WebSocket-Protocol": "chat"}))
    response = await raw.response()
    assert response.status == 101 and "sec-websocket-protocol" not in response.headers


async def test_a_stopping_node_refuses_upgrades_503(server):
    server.node.stopping = True
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await server.ws()
    assert info.value.status == 503


async def test_refused_and_closed_requests_hold_no_address_slot():
    async with running_server(node_settings(max_connections_per_ip=1)) as srv:
        for headers in ({"Sec-WebSocket-Key": None}, {"Sec-WebSocket-Version": "8"}):
            raw = await connect(srv.port)
            raw.send(request(headers=headers))
            await raw.response()
        ws = await srv.ws()
        await ws.close()
        await until(lambda: not srv.node.connections)
        assert srv.node.addresses.count("127.0.0.1") == 0
        await srv.ws()
        assert srv.node.addresses.count("127.0.0.1") == 1


# --- every connection holds its address's slot, whatever it carries -------------------------


async def refused(port: int) -> bool:
    """Whether a new connection is answered 429 before it sends anything."""
    raw = await connect(port)
    try:
        response = await raw.response()
    except (TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        await raw.aclose()
    assert response.status == 429
    assert response.body == b"too many connections from this address\n"
    return True


async def admitted(port: int) -> Raw:
    """A connection that is served (its WebSocket upgrade answered 101)."""
    raw = await connect(port)
    raw.send(request())
    assert (await raw.response()).status == 101
    return raw


async def test_the_address_limit_counts_requests_still_being_read():
    """Half-open requests hold a slot: at the limit, the next connection is refused 429 at
    once; a slot comes back when one of them goes."""
    async with running_server(node_settings(max_connections_per_ip=3)) as srv:
        slow = [await connect(srv.port) for _ in range(3)]
        for raw in slow:
            raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        await until_true(lambda: refused(srv.port))
        await slow[0].aclose()
        raw = await until_admitted(srv.port)
        raw.send(frame(b'{"type":"ping"}'))
        assert await raw.frame() == PONG


async def until_admitted(port: int) -> Raw:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3 * UNIT
    while True:
        raw = await connect(port)
        raw.send(request())
        try:
            if (await raw.response()).status == 101:
                return raw
        except (TimeoutError, asyncio.IncompleteReadError):
            pass
        await raw.aclose()
        assert loop.time() < deadline, "no slot came back"
        await asyncio.sleep(0.02)


async def test_the_limit_is_exact_and_counts_every_kind_of_connection(caplog):
    """Two WebSockets and a kept-alive HTTP connection fill a limit of 3; the fourth is
    refused (logged once however often it is tried), and each kind gives its slot back."""
    async with running_server(node_settings(max_connections_per_ip=3)) as srv:
        first, second = await admitted(srv.port), await admitted(srv.port)
        http = await connect(srv.port)
        http.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await http.response()).body == b"okay"  # kept alive
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="polysignal"):
            for _ in range(5):
                assert await refused(srv.port)
        assert_log_bounded(caplog.records)
        assert [r.getMessage() for r in caplog.records] == [
            "refused 127.0.0.1: 3 connections from it"
        ]
        await http.aclose()
        third = await until_admitted(srv.port)
        assert await refused(srv.port)
        first.send(close())
        assert await first.close_frame() == (1000, "")
        fourth = await until_admitted(srv.port)
        for raw in (second, third, fourth):
            raw.send(frame(b'{"type":"ping"}'))
            assert await raw.frame() == PONG


async def test_a_websocket_on_a_kept_alive_connection_holds_one_slot():
    async with running_server(node_settings(max_connections_per_ip=2)) as srv:
        raw = await connect(srv.port)
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await raw.response()
        raw.send(request())
        assert (await raw.response()).status == 101
        other = await admitted(srv.port)  # the upgraded connection counts once
        assert await refused(srv.port)
        raw.send(close())
        assert await raw.close_frame() == (1000, "")
        assert await raw.eof() == b""
        again = await until_admitted(srv.port)
        for ws in (other, again):
            ws.send(frame(b'{"type":"ping"}'))
            assert await ws.frame() == PONG


async def test_a_later_request_trickled_on_a_kept_alive_connection_is_cut():
    """aiohttp reads later requests without a clock: the front door times them too."""
    timeout = 0.5 * UNIT
    async with running_server(node_settings(header_timeout=timeout)) as srv:
        raw = await connect(srv.port)
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await raw.response()).body == b"okay"
        started = time.monotonic()

        async def trickle() -> None:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                raw.send(bytes([byte]))
                await asyncio.sleep(0.05 * UNIT)

        sender = asyncio.get_running_loop().create_task(trickle())
        try:
            assert await raw.eof(timeout=5 * UNIT) == b""
        finally:
            sender.cancel()
        assert timeout <= time.monotonic() - started < timeout + 2 * UNIT


async def test_a_kept_alive_connection_idle_between_requests_is_not_timed():
    """The clock starts at a request's first byte, not while the connection is idle."""
    async with running_server(node_settings(header_timeout=0.3 * UNIT)) as srv:
        raw = await connect(srv.port)
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await raw.response()
        await asyncio.sleep(0.6 * UNIT)  # idle, longer than the header timeout
        raw.send(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await raw.response()).body == b"ready"


async def test_malformed_requests_behind_the_door_are_answered_400_and_logged_once(server, caplog):
    """What aiohttp parses (bodies, later requests on a kept-alive connection) is refused 400
    without an ERROR traceback per request: one INFO line per interval."""
    caplog.set_level(logging.DEBUG)
    bad = [
        # A chunked body whose chunk size is not hex.
        b"POST /app HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ZZZ\r\nab\r\n0\r\n\r\n",
        # A malformed request line after a good request on the same connection.
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n",
    ]
    for _ in range(5):
        for data in bad:
            raw = await connect(server.port)
            raw.send(data)
            response = await raw.response()
            if response.status == 200:  # the good request first
                response = await raw.response()
            assert response.status == 400
            await raw.aclose()
    records = [r for r in caplog.records if r.name.startswith(("aiohttp", "polysignal"))]
    assert_log_bounded(records)
    assert [r.getMessage() for r in records if r.levelno >= logging.INFO] == [
        "malformed HTTP request (Invalid character in chunk size:): answered 400"
    ]
