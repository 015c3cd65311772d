"""The relay protocol against real servers on free ports with raw WebSocket clients.

Every generation (JSON ``join``/``keys``, JSON ``documentIds``, msgpack v4), the pipes, the
limits and bad input (docs/protocols/relay.md); then two nodes sharing one ``MemoryBus``,
which behave like two nodes sharing Redis.

The tests see what clients see, and what another node sees through the cluster (presence of
a document, the holder of a claim): never the hub's own state. A client knows the server has
handled everything it sent once the server answers its WebSocket ping (``synced``): a socket
is read again only when its earlier messages, and its rendezvous, are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest

from polysignal.backends.base import Claim
from polysignal.backends.memory import MemoryBackend, MemoryBus
from polysignal.config import Settings
from polysignal.core.errors import CloseCode
from polysignal.core.relay import FRAME_COST, peer_claim_key, pipe_claim_key
from polysignal.protocols.relay import NAMESPACE
from polysignal.server.driver import CLOSE_LINE, OPEN_LINE

from support import (
    UNIT,
    RunningServer,
    assert_log_bounded,
    assert_silent,
    free_port,
    node_processes,
    node_settings,
    receive_json,
    require,
    running_server,
    until_true,
)

pytestmark = pytest.mark.timeout(30)

WS = aiohttp.ClientWebSocketResponse
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


class Watch:
    """Another node on the same bus: what the cluster shows of the nodes under test."""

    def __init__(self, bus: MemoryBus) -> None:
        self.backend = MemoryBackend("watch", bus)

    async def start(self) -> None:
        await self.backend.start()

    async def peers_in(self, document: str) -> int:
        """Peers of the other nodes that joined ``document``."""
        return await self.backend.topic_clients(document, 0, NAMESPACE)

    async def holder(self, key: str) -> Claim | None:
        return await self.backend.lookup(key)


@contextlib.asynccontextmanager
async def watched(settings: Settings | None = None) -> AsyncIterator[RunningServer]:
    """One node on a bus of its own, and a ``watch`` on that bus."""
    settings = settings or node_settings()
    bus = MemoryBus()
    watch = Watch(bus)
    await watch.start()
    backend = MemoryBackend(settings.server.node_id, bus)
    async with running_server(settings, backend) as srv:
        srv.watch = watch  # type: ignore[attr-defined]
        yield srv


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with watched() as srv:
        yield srv


async def client(server: RunningServer, path: str) -> WS:
    """A WebSocket whose pongs the test reads itself (``synced``)."""
    return await server.ws(path, autoping=False)


async def synced(ws: WS, timeout: float = 2 * UNIT) -> None:
    """The server has handled everything sent on ``ws`` so far (it answered a later ping)."""
    await ws.ping(b"sync")
    msg = await ws.receive(timeout=timeout)
    assert msg.type is aiohttp.WSMsgType.PONG and msg.data == b"sync", msg


async def join_json(ws: WS, *ids: str, field: str = "documentIds") -> None:
    await ws.send_str(orjson.dumps({"type": "Join", field: list(ids)}).decode())


async def join_v4(ws: WS, *ids: str) -> None:
    await ws.send_bytes(msgpack.packb({"type": "Join", "documentIds": list(ids)}))


async def receive_msgpack(ws: WS, timeout: float = 2 * UNIT) -> Any:
    msg = await ws.receive(timeout=timeout)
    assert msg.type is aiohttp.WSMsgType.BINARY, f"expected binary, got {msg.type}: {msg.data}"
    return msgpack.unpackb(msg.data)


async def closed_with(ws: WS, timeout: float = 2 * UNIT) -> tuple[int, str]:
    """The close code and reason the server closed ``ws`` with (nothing else may arrive)."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type in CLOSED, f"expected a close, got {msg.type}: {msg.data!r}"
    return int(ws.close_code or 0), str(msg.extra or "")


async def receive_frame(ws: WS, timeout: float = 2 * UNIT) -> tuple[aiohttp.WSMsgType, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
    return msg.type, msg.data


TEXT, BINARY = aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY


async def _none_in(server: RunningServer, document: str) -> bool:
    return await server.watch.peers_in(document) == 0  # type: ignore[attr-defined, no-any-return]


async def _free(server: RunningServer, key: str) -> bool:
    return await server.watch.holder(key) is None  # type: ignore[attr-defined]


# --- introductions ---------------------------------------------------------------------------


async def test_v1_join_keys_introductions_both_ways(server):
    """cevitxe 0.4: Join with `join`, Introduction with `id`, `keys` (docs/protocols/relay.md)."""
    a = await client(server, "/introduction/aaaa4242")
    b = await client(server, "/introduction/qrst7890")
    await join_json(a, "happy-raccoon", "hairy-thumb", field="join")
    await synced(a)
    await join_json(b, "happy-raccoon", field="join")
    assert await receive_json(b) == {
        "type": "Introduction",
        "id": "aaaa4242",
        "keys": ["happy-raccoon"],
    }
    assert await receive_json(a) == {
        "type": "Introduction",
        "id": "qrst7890",
        "keys": ["happy-raccoon"],
    }
    await assert_silent(a)
    await assert_silent(b)


async def test_v2_document_ids_introductions_carry_user_name(server):
    a = await client(server, "/introduction/alice")
    b = await client(server, "/introduction/bob")
    await join_json(a, "d1", "d2")
    await synced(a)
    await join_json(b, "d2", "d1")
    # The full common list, in the joiner's order.
    assert await receive_json(b) == {
        "type": "Introduction",
        "userName": "alice",
        "documentIds": ["d2", "d1"],
    }
    assert await receive_json(a) == {
        "type": "Introduction",
        "userName": "bob",
        "documentIds": ["d2", "d1"],
    }


async def test_v4_msgpack_introductions_are_binary_with_peer_id(server):
    a = await client(server, "/introduction/alice")
    b = await client(server, "/introduction/bob")
    await join_v4(a, "doc1")
    await synced(a)
    await join_v4(b, "doc1")
    intro = {"type": "Introduction", "peerId": "alice", "documentIds": ["doc1"]}
    assert await receive_msgpack(b) == intro
    assert await receive_msgpack(a) == {**intro, "peerId": "bob"}


async def test_each_generation_is_answered_in_its_own_shape(server):
    v1 = await client(server, "/introduction/v1")
    v2 = await client(server, "/introduction/v2")
    v4 = await client(server, "/introduction/v4")
    await join_json(v1, "doc", field="join")
    await synced(v1)
    await join_json(v2, "doc")
    assert await receive_json(v1) == {"type": "Introduction", "id": "v2", "keys": ["doc"]}
    assert await receive_json(v2) == {
        "type": "Introduction",
        "userName": "v1",
        "documentIds": ["doc"],
    }
    await join_v4(v4, "doc")
    got_v4 = [await receive_msgpack(v4), await receive_msgpack(v4)]
    assert sorted(m["peerId"] for m in got_v4) == ["v1", "v2"]
    assert await receive_json(v1) == {"type": "Introduction", "id": "v4", "keys": ["doc"]}
    assert await receive_json(v2) == {
        "type": "Introduction",
        "userName": "v4",
        "documentIds": ["doc"],
    }


async def test_a_join_that_adds_no_document_introduces_nobody(server):
    """Only a Join that adds a document introduces, and then every peer sharing one of the added
    documents, with the full common list (docs/protocols/relay.md, "Introductions"). Repeated
    Joins used to repeat every introduction, a flood amplified by the number of sharing peers."""
    a = await client(server, "/introduction/a")
    b = await client(server, "/introduction/b")
    await join_json(a, "k1", "k2")
    await synced(a)
    await join_json(b, "k1")
    assert await receive_json(b) == {"type": "Introduction", "userName": "a", "documentIds": ["k1"]}
    assert await receive_json(a) == {"type": "Introduction", "userName": "b", "documentIds": ["k1"]}
    await join_json(b, "k1")  # adds nothing
    await join_json(a, "k2", "k1")  # adds nothing
    await join_json(a, "k3")  # adds a document nobody else holds
    await synced(a)
    await synced(b)
    await assert_silent(a)
    await assert_silent(b)
    await join_json(b, "k1", "k2")  # adds k2: both are introduced with all they share
    assert await receive_json(b) == {
        "type": "Introduction",
        "userName": "a",
        "documentIds": ["k1", "k2"],
    }
    assert await receive_json(a) == {
        "type": "Introduction",
        "userName": "b",
        "documentIds": ["k1", "k2"],
    }
    await assert_silent(a)
    await assert_silent(b)


async def test_leave_sends_nothing_and_stops_introductions(server):
    a = await client(server, "/introduction/a")
    await join_json(a, "k1", "k2")
    await a.send_str('{"type":"Leave","documentIds":["k1"]}')
    await synced(a)
    assert (await server.watch.peers_in("k1"), await server.watch.peers_in("k2")) == (0, 1)
    await assert_silent(a)
    b = await client(server, "/introduction/b")
    await join_json(b, "k1")
    await synced(b)
    await assert_silent(a)
    await assert_silent(b)
    await join_json(b, "k2")
    assert (await receive_json(b))["documentIds"] == ["k2"]


async def test_v1_leave_and_join_with_leave(server):
    a = await client(server, "/introduction/a")
    await join_json(a, "k1", "k2", field="join")
    await a.send_str('{"type":"Leave","leave":["k1"]}')
    await synced(a)
    watch = server.watch
    assert [await watch.peers_in(k) for k in ("k1", "k2", "k3")] == [0, 1, 0]
    await a.send_str('{"type":"Join","join":["k3"],"leave":["k2"]}')
    await synced(a)
    assert [await watch.peers_in(k) for k in ("k1", "k2", "k3")] == [0, 0, 1]


async def test_heartbeats_are_accepted_silently(server):
    j = await client(server, "/introduction/j")
    m = await client(server, "/introduction/m")
    await j.send_str('{"type":"Heartbeat"}')
    await m.send_bytes(msgpack.packb({"type": "Heartbeat"}))
    await m.send_bytes(msgpack.packb({"type": "❤️"}))
    await join_json(j, "k")
    await join_v4(m, "k")
    # Still open and serving: the two are introduced.
    assert (await receive_msgpack(m))["peerId"] == "j"
    assert (await receive_json(j))["userName"] == "m"


async def test_a_closed_peer_is_forgotten(server):
    a = await client(server, "/introduction/a")
    await join_json(a, "k")
    await synced(a)
    assert await server.watch.peers_in("k") == 1
    await a.close()
    await until_true(lambda: _none_in(server, "k"))
    b = await client(server, "/introduction/b")
    await join_json(b, "k")
    await assert_silent(b)


async def test_abrupt_disconnect_is_forgotten(server):
    a = await client(server, "/introduction/a")
    await join_json(a, "k")
    await synced(a)
    assert await server.watch.holder(peer_claim_key("a")) is not None
    transport = a._response.connection.transport  # cut the TCP connection without a close frame
    assert transport is not None
    transport.abort()
    await until_true(lambda: _none_in(server, "k"))
    await until_true(lambda: _free(server, peer_claim_key("a")))


async def test_second_socket_with_the_same_id_replaces_the_first_cleanly(server):
    """The old socket is closed; its cleanup does not orphan the new one (the original's did)."""
    old = await client(server, "/introduction/dup")
    await join_json(old, "k")
    await synced(old)
    new = await client(server, "/introduction/dup")
    code, reason = await closed_with(old)
    assert code == CloseCode.NORMAL and "replaced" in reason
    await until_true(lambda: _none_in(server, "k"))  # the old socket's documents went
    await join_json(new, "k")
    other = await client(server, "/introduction/other")
    await join_json(other, "k")
    assert (await receive_json(new))["userName"] == "other"
    assert (await receive_json(other))["userName"] == "dup"


# --- bad input ---------------------------------------------------------------------------------


GARBAGE = [
    pytest.param("{╯°□°}╯︵ ┻━┻", id="relay 3.6's malformed JSON"),
    pytest.param(bytes([1, 2, 3]), id="relay 4's malformed msgpack"),
    pytest.param(b"\xc1", id="invalid msgpack"),
    pytest.param('"just a string"', id="not an object"),
    pytest.param(msgpack.packb([1, 2]), id="a msgpack array"),
    pytest.param('{"documentIds":["k"]}', id="no type"),
    pytest.param('{"type":7}', id="type not a string"),
    pytest.param('{"type":"Dance"}', id="unknown type"),
    pytest.param('{"type":"Join","documentIds":[1]}', id="an id not a string"),
    pytest.param('{"type":"Join","documentIds":[""]}', id="an empty id"),
    pytest.param(msgpack.packb({"type": "Join"}), id="no id list"),
    pytest.param('{"type":"Leave","join":["k"]}', id="a Leave with join"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_a_malformed_frame_is_ignored_and_the_socket_stays_open(server, caplog, garbage):
    """As @localfirst/relay 3.6 and 4.x: the frame is dropped (a DEBUG line), the socket stays
    open, and a valid Join after it gets its Introduction (docs/protocols/relay.md, "Errors and
    limits"). It used to close with 1003."""
    binary = isinstance(garbage, bytes)
    alice = await client(server, "/introduction/alice")
    await (join_v4(alice, "doc") if binary else join_json(alice, "doc"))
    await synced(alice)
    bob = await client(server, "/introduction/bob")
    with caplog.at_level(logging.DEBUG, logger="polysignal"):
        for _ in range(3):
            await (bob.send_bytes(garbage) if binary else bob.send_str(garbage))
        await synced(bob)  # handled, and still open
        if binary:
            await join_v4(bob, "doc")
            intro = {"type": "Introduction", "peerId": "alice", "documentIds": ["doc"]}
            assert await receive_msgpack(bob) == intro
            assert await receive_msgpack(alice) == {**intro, "peerId": "bob"}
        else:
            await join_json(bob, "doc")
            intro = {"type": "Introduction", "userName": "alice", "documentIds": ["doc"]}
            assert await receive_json(bob) == intro
            assert await receive_json(alice) == {**intro, "userName": "bob"}
    assert_log_bounded(caplog.records, most=0)


DEEP = '{"type":"Join","documentIds":' + "[" * 70 + "]" * 70 + "}"


@pytest.mark.parametrize(
    ("v4", "frame", "reason"),
    [
        (True, '{"type":"Heartbeat"}', "this connection speaks msgpack binary frames"),
        (True, "{not even json", "this connection speaks msgpack binary frames"),
        (False, b"\xc1", "this connection speaks JSON text frames"),
        (False, DEEP, "JSON nested deeper than 64 levels"),
    ],
)
async def test_what_still_closes_an_introduction_socket(server, v4, frame, reason):
    """A frame in the other encoding than the connection's first (garbage too), and one nested
    past the decode limit, close with 1003 and a reason; the other limits have their own tests."""
    ws = await client(server, "/introduction/x")
    await (join_v4(ws, "k") if v4 else join_json(ws, "k"))
    await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
    assert await closed_with(ws) == (CloseCode.UNSUPPORTED_DATA, reason)


async def test_a_flood_of_garbage_is_cut_by_the_rate_limit_at_its_exact_boundary(caplog):
    """Garbage counts against the connection's rate limit like any message: the burst's last
    token still carries a valid Join, the next message closes; three flooders leave one line."""
    async with watched(node_settings(rate_limit=0.01, rate_burst=5)) as srv:
        alice = await client(srv, "/introduction/alice")
        await join_v4(alice, "doc")
        await synced(alice)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="polysignal"):
            for n in range(3):
                flood = await client(srv, f"/introduction/flood{n}")
                for _ in range(4):
                    await flood.send_bytes(bytes([1, 2, 3]))
                await join_v4(flood, "doc")  # the fifth message: the burst's last token
                assert await receive_msgpack(flood) == {
                    "type": "Introduction",
                    "peerId": "alice",
                    "documentIds": ["doc"],
                }
                assert (await receive_msgpack(alice))["peerId"] == f"flood{n}"
                await flood.send_bytes(bytes([1, 2, 3]))  # the sixth: over the limit
                assert await closed_with(flood) == (
                    CloseCode.POLICY_VIOLATION,
                    "rate limit exceeded (0.01 messages/s)",
                )
        assert_log_bounded(caplog.records)
        (line,) = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.INFO and r.msg not in (OPEN_LINE, CLOSE_LINE)
        ]
        assert line.endswith(" relay 127.0.0.1> is over the rate limit"), line


async def test_too_many_documents_and_too_long_ids_are_refused():
    settings = node_settings(relay_max_documents=2, relay_max_id_length=8)
    async with watched(settings) as srv:
        ws = await client(srv, "/introduction/x")
        await join_json(ws, "a", "b")
        await join_json(ws, "c")
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "at most 2 document ids" in reason
        ws = await client(srv, "/introduction/y")
        await join_json(ws, "123456789")
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "longer than 8" in reason
        ws = await client(srv, "/introduction/123456789")
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "peer id is longer than 8" in reason
        ws = await client(srv, "/connection/a/b/123456789")
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "document id is longer than 8" in reason


async def test_flood_of_introduction_messages_closes_with_a_reason():
    async with watched(node_settings(rate_limit=1.0, rate_burst=3)) as srv:
        ws = await client(srv, "/introduction/flood")
        for _ in range(6):
            await ws.send_str('{"type":"Heartbeat"}')
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "rate limit exceeded" in reason


async def test_oversize_frame_closes_with_1009():
    async with watched(node_settings(max_frame_bytes=1024)) as srv:
        ws = await client(srv, "/introduction/big")
        await join_json(ws, "x" * 2000)
        assert (await closed_with(ws))[0] == CloseCode.MESSAGE_TOO_BIG


async def test_paths_without_their_ids_are_refused_with_a_reason(server):
    ws = await client(server, "/introduction/")
    assert await closed_with(ws) == (CloseCode.POLICY_VIOLATION, "expected /introduction/{peerId}")
    ws = await client(server, "/connection/a/b")
    code, reason = await closed_with(ws)
    assert code == CloseCode.POLICY_VIOLATION and "/connection/{localId}" in reason


async def test_plain_get_on_relay_paths_is_a_health_answer(server):
    for path in ("/introduction/x", "/connection/a/b/k"):
        async with server.session.get(server.url + path) as resp:
            assert resp.status == 200 and await resp.text() == "okay"


# --- pipes -------------------------------------------------------------------------------------


async def pipe_pair(
    server: RunningServer, a: str = "a", b: str = "b", key: str = "k"
) -> tuple[WS, WS]:
    first = await client(server, f"/connection/{a}/{b}/{key}")
    await synced(first)  # held
    second = await client(server, f"/connection/{b}/{a}/{key}")
    return first, second


async def test_pipe_forwards_text_and_binary_both_ways_byte_exact(server):
    first, second = await pipe_pair(server)
    await first.send_str("hello ✓")
    await first.send_bytes(b"\x00\x01\xff")
    assert await receive_frame(second) == (TEXT, "hello ✓")
    assert await receive_frame(second) == (BINARY, b"\x00\x01\xff")
    await second.send_bytes(b"\x80")
    await second.send_str('{"json":"kept as text"}')
    assert await receive_frame(first) == (BINARY, b"\x80")
    assert await receive_frame(first) == (TEXT, '{"json":"kept as text"}')


async def test_pipes_carry_frames_larger_than_signalling_frames_up_to_their_own_limit():
    settings = node_settings(max_frame_bytes=4096, relay_max_frame_bytes=200_000)
    async with watched(settings) as srv:
        first, second = await pipe_pair(srv)
        blob = bytes(range(256)) * 700  # 179,200 bytes: over MAX_FRAME_BYTES, under the pipe's
        await first.send_bytes(blob)
        assert await receive_frame(second) == (BINARY, blob)
        await second.send_bytes(b"x" * 200_001)
        assert (await closed_with(second))[0] == CloseCode.MESSAGE_TOO_BIG
        # The introduction channel keeps the signalling limit.
        ws = await client(srv, "/introduction/big")
        await join_json(ws, "x" * 5000)
        assert (await closed_with(ws))[0] == CloseCode.MESSAGE_TOO_BIG


async def test_frames_sent_while_held_are_flushed_in_order_first(server):
    first = await client(server, "/connection/a/b/k")
    for i in range(20):
        if i % 2:
            await first.send_bytes(bytes([i]))
        else:
            await first.send_str(f"held {i}")
    await synced(first)  # all 20 held
    assert await server.watch.holder(pipe_claim_key("a", "b", "k")) is not None
    second = await client(server, "/connection/b/a/k")
    await first.send_str("after")
    for i in range(20):
        expected = (BINARY, bytes([i])) if i % 2 else (TEXT, f"held {i}")
        assert await receive_frame(second) == expected
    assert await receive_frame(second) == (TEXT, "after")


async def test_closing_either_side_closes_the_other(server):
    first, second = await pipe_pair(server)
    await first.close()
    assert (await closed_with(second))[0] == CloseCode.NORMAL
    first, second = await pipe_pair(server, key="k2")
    transport = second._response.connection.transport
    assert transport is not None
    transport.abort()
    assert (await closed_with(first))[0] == CloseCode.NORMAL
    # Nothing of either pair is left: the same requests pair afresh.
    first, second = await pipe_pair(server, key="k2")
    await first.send_str("again")
    assert await receive_frame(second) == (TEXT, "again")


async def test_hold_buffer_is_bounded_in_bytes_at_its_exact_boundary():
    """A held socket may hold RELAY_BUFFER_BYTES, each frame counted as its payload plus
    FRAME_COST (so empty frames are not free): two 60-byte frames fill it, one more frame of any
    size closes."""
    limit = 2 * (60 + FRAME_COST)
    async with watched(node_settings(relay_buffer_bytes=limit)) as srv:
        ws = await client(srv, "/connection/a/b/k")
        await ws.send_bytes(b"x" * 60)
        await ws.send_bytes(b"y" * 60)
        await synced(ws)  # exactly at the limit: held
        await ws.send_bytes(b"")
        assert await closed_with(ws) == (
            CloseCode.POLICY_VIOLATION,
            f"relay buffer full: more than {limit} bytes held before the peer connected",
        )
        # The hold is gone: a new request is held afresh and pairs normally.
        await until_true(lambda: _free(srv, pipe_claim_key("a", "b", "k")))
        first, second = await pipe_pair(srv)
        await first.send_str("ok")
        assert await receive_frame(second) == (TEXT, "ok")


async def test_held_bytes_of_one_address_are_bounded_at_the_exact_boundary():
    """Every held socket of one client address shares RELAY_ADDRESS_BUFFER_BYTES: three sockets
    holding 100 bytes each fill it exactly, a fourth socket's first frame closes that socket; the
    held frames still reach their peers, and once delivered the address may hold again."""
    cost = 100 + FRAME_COST
    settings = node_settings(relay_buffer_bytes=4096, relay_address_buffer_bytes=3 * cost)
    async with watched(settings) as srv:
        held = []
        for i in range(3):
            ws = await client(srv, f"/connection/a{i}/b{i}/k")
            await ws.send_bytes(bytes([i]) * 100)
            await synced(ws)
            held.append(ws)
        over = await client(srv, "/connection/a3/b3/k")
        await synced(over)
        await over.send_bytes(b"")
        assert await closed_with(over) == (
            CloseCode.POLICY_VIOLATION,
            f"relay buffer full: more than {3 * cost} bytes held for this address",
        )
        for i in range(3):
            peer = await client(srv, f"/connection/b{i}/a{i}/k")
            assert await receive_frame(peer) == (BINARY, bytes([i]) * 100)
        again = await client(srv, "/connection/a4/b4/k")
        for i in range(3):
            await again.send_bytes(bytes([i]) * 100)
        await synced(again)  # the budget came back whole
        peer = await client(srv, "/connection/b4/a4/k")
        for i in range(3):
            assert await receive_frame(peer) == (BINARY, bytes([i]) * 100)


async def test_hold_waits_a_bounded_time():
    async with watched(node_settings(relay_wait_timeout=0.3)) as srv:
        ws = await client(srv, "/connection/a/b/k")
        code, reason = await closed_with(ws, timeout=5 * UNIT)
        assert code == CloseCode.TRY_AGAIN_LATER and "no peer connected within 0.3 s" in reason


async def test_duplicate_request_replaces_the_held_socket(server):
    old = await client(server, "/connection/a/b/k")
    await old.send_str("from the old socket")
    await synced(old)
    new = await client(server, "/connection/a/b/k")
    code, reason = await closed_with(old)
    assert code == CloseCode.NORMAL and "replaced" in reason
    await new.send_str("from the new socket")
    await synced(new)
    peer = await client(server, "/connection/b/a/k")
    assert await receive_frame(peer) == (TEXT, "from the new socket")
    await peer.send_str("back")
    assert await receive_frame(new) == (TEXT, "back")


async def test_a_third_request_after_pairing_is_held_again(server):
    first, second = await pipe_pair(server)
    third, fourth = await pipe_pair(server)
    await third.send_str("second pair")
    assert await receive_frame(fourth) == (TEXT, "second pair")
    await first.send_str("first pair")
    assert await receive_frame(second) == (TEXT, "first pair")


async def test_abrupt_close_of_a_held_socket_frees_its_request(server):
    ws = await client(server, "/connection/a/b/k")
    await synced(ws)
    assert await server.watch.holder(pipe_claim_key("a", "b", "k")) is not None
    transport = ws._response.connection.transport
    assert transport is not None
    transport.abort()
    await until_true(lambda: _free(server, pipe_claim_key("a", "b", "k")))
    first, second = await pipe_pair(server)
    await second.send_str("fine")
    assert await receive_frame(first) == (TEXT, "fine")


# --- two nodes on one MemoryBus ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_nodes(**overrides: Any) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    bus = MemoryBus()
    watch = Watch(bus)
    await watch.start()
    async with (
        running_server(node_settings(node_id="n1", **overrides), MemoryBackend("n1", bus)) as one,
        running_server(node_settings(node_id="n2", **overrides), MemoryBackend("n2", bus)) as two,
    ):
        one.watch = two.watch = watch  # type: ignore[attr-defined]
        yield one, two


async def test_introductions_cross_nodes_in_each_generation():
    async with two_nodes() as (one, two):
        a = await client(one, "/introduction/alice")
        b = await client(two, "/introduction/bob")
        await join_v4(a, "d0", "doc")
        await synced(a)
        await join_json(b, "doc", "other", field="join")
        assert await receive_json(b) == {"type": "Introduction", "id": "alice", "keys": ["doc"]}
        assert await receive_msgpack(a) == {
            "type": "Introduction",
            "peerId": "bob",
            "documentIds": ["doc"],
        }
        await assert_silent(a)
        await assert_silent(b)
        # A Join naming several shared documents still introduces each remote peer once.
        c = await client(one, "/introduction/carol")
        await join_json(c, "other", "doc")
        got = {
            (m["userName"], tuple(m["documentIds"])) for m in [await receive_json(c) for _ in "ab"]
        }
        assert got == {("alice", ("doc",)), ("bob", ("other", "doc"))}
        assert await receive_json(b) == {
            "type": "Introduction",
            "id": "carol",
            "keys": ["other", "doc"],  # in the joiner's order, as on one node
        }
        assert (await receive_msgpack(a))["peerId"] == "carol"
        for ws in (a, b, c):
            await assert_silent(ws)


async def test_a_left_document_gets_no_introductions_from_other_nodes():
    async with two_nodes() as (one, two):
        a = await client(one, "/introduction/alice")
        await join_json(a, "doc")
        await a.send_str('{"type":"Leave","documentIds":["doc"]}')
        await synced(a)
        assert await one.watch.peers_in("doc") == 0
        b = await client(two, "/introduction/bob")
        await join_json(b, "doc")
        await assert_silent(b)
        await assert_silent(a)


async def test_pipe_across_nodes_keeps_order_and_frame_types():
    async with two_nodes() as (one, two):
        first = await client(one, "/connection/a/b/k")
        for i in range(5):
            await first.send_str(f"held {i}")
        await synced(first)  # all 5 held
        second = await client(two, "/connection/b/a/k")
        for i in range(5):
            assert await receive_frame(second) == (TEXT, f"held {i}")
        for i in range(100):
            await first.send_bytes(i.to_bytes(2, "big"))
            await second.send_str(f"back {i}")
        for i in range(100):
            assert await receive_frame(second) == (BINARY, i.to_bytes(2, "big"))
            assert await receive_frame(first) == (TEXT, f"back {i}")
        await second.close()
        assert (await closed_with(first))[0] == CloseCode.NORMAL
        # Nothing of the pipe is left on either node: the same requests pair afresh.
        first = await client(two, "/connection/a/b/k")
        await synced(first)
        second = await client(one, "/connection/b/a/k")
        await second.send_str("again")
        assert await receive_frame(first) == (TEXT, "again")


async def test_large_pipe_frames_cross_nodes_whole():
    async with two_nodes() as (one, two):
        first = await client(one, "/connection/a/b/k")
        await synced(first)
        second = await client(two, "/connection/b/a/k")
        blobs = [bytes([i]) * 250_000 for i in range(3)]
        for blob in blobs:
            await first.send_bytes(blob)
        for blob in blobs:
            assert await receive_frame(second, timeout=5 * UNIT) == (BINARY, blob)
        await second.send_str("y" * 200_000)
        assert await receive_frame(first, timeout=5 * UNIT) == (TEXT, "y" * 200_000)


async def test_same_peer_id_on_another_node_replaces_the_first():
    async with two_nodes() as (one, two):
        old = await client(one, "/introduction/dup")
        await join_json(old, "k")
        await synced(old)
        new = await client(two, "/introduction/dup")
        code, reason = await closed_with(old)
        assert code == CloseCode.NORMAL and "replaced" in reason
        await until_true(lambda: _none_in(one, "k"))
        other = await client(one, "/introduction/other")
        await join_json(new, "k")
        await synced(new)
        await join_json(other, "k")
        assert (await receive_json(new))["userName"] == "other"
        assert (await receive_json(other))["userName"] == "dup"


async def test_duplicate_pipe_request_on_another_node_replaces_the_held_one():
    async with two_nodes() as (one, two):
        old = await client(one, "/connection/a/b/k")
        await synced(old)
        new = await client(two, "/connection/a/b/k")
        code, reason = await closed_with(old)
        assert code == CloseCode.NORMAL and "replaced" in reason
        await synced(new)
        holder = await one.watch.holder(pipe_claim_key("a", "b", "k"))
        assert holder is not None and holder.node_id == "n2"
        peer = await client(one, "/connection/b/a/k")
        await peer.send_str("hi")
        assert await receive_frame(new) == (TEXT, "hi")


# --- backend away ------------------------------------------------------------------------------


async def test_one_node_keeps_serving_while_redis_is_unreachable():
    """Claims fail with BackendUnavailable: introductions, pipes and replacements stay local."""
    settings = node_settings(
        backend_url=f"redis://127.0.0.1:{free_port()}/0", redis_backoff_max=0.5
    )
    async with running_server(settings) as srv:
        assert not srv.node.backend.ready
        a = await client(srv, "/introduction/a")
        await join_v4(a, "k")
        await synced(a)
        b = await client(srv, "/introduction/b")
        await join_v4(b, "k")
        assert (await receive_msgpack(b))["peerId"] == "a"
        assert (await receive_msgpack(a))["peerId"] == "b"
        again = await client(srv, "/introduction/a")
        assert (await closed_with(a))[0] == CloseCode.NORMAL
        await join_v4(again, "k")
        assert (await receive_msgpack(again))["peerId"] == "b"
        old = await client(srv, "/connection/a/b/k")
        await synced(old)  # held here: the claim failed, Redis being away
        first = await client(srv, "/connection/a/b/k")
        assert "replaced" in (await closed_with(old))[1]
        await first.send_str("held")
        await synced(first)
        second = await client(srv, "/connection/b/a/k")
        assert await receive_frame(second) == (TEXT, "held")
        await second.send_bytes(b"\x01")
        assert await receive_frame(first) == (BINARY, b"\x01")


async def test_peer_id_lease_is_renewed_and_a_lost_claim_closes_the_socket():
    """The claim outlives its TTL while the socket is open; taken over elsewhere (an eviction
    message that never arrived), the socket yields at the next renewal."""
    async with watched(node_settings(id_lease_ttl=3)) as srv:
        ws = await client(srv, "/introduction/leased")
        await synced(ws)
        backend = srv.watch.backend  # type: ignore[attr-defined]
        key = peer_claim_key("leased")
        claim = await backend.lookup(key)
        assert claim is not None and claim.node_id == srv.node.node_id
        token = claim.token
        await asyncio.sleep(3.5 * UNIT)  # longer than the lease
        assert await backend.lookup(key) == Claim(srv.node.node_id, token)
        assert await backend.release(key, token)
        assert await backend.claim(key, "a newer socket elsewhere", 60)
        code, reason = await closed_with(ws, timeout=3 * UNIT)
        assert code == CloseCode.NORMAL and "replaced" in reason


async def slow_reader_case(sender: WS, receiver: WS) -> None:
    """8 MiB through a pipe whose reader pauses: every frame arrives, in order; nobody is cut."""
    chunk = 32 * 1024
    count = 256

    async def send_all() -> None:
        for i in range(count):
            await sender.send_bytes(i.to_bytes(4, "big") * (chunk // 4))

    # The reader stops reading for a while: the kernel's buffers fill, then the server's.
    transport = receiver._response.connection.transport
    assert transport is not None
    transport.pause_reading()
    sending = asyncio.create_task(send_all())
    await asyncio.sleep(0.5 * UNIT)
    transport.resume_reading()
    for i in range(count):
        kind, data = await receive_frame(receiver, timeout=10 * UNIT)
        assert kind is BINARY and data[:4] == i.to_bytes(4, "big") and len(data) == chunk
    await sending
    await receiver.send_str("done")
    assert await receive_frame(sender) == (TEXT, "done")


async def test_a_slow_reader_slows_the_writer_instead_of_being_cut_off():
    async with watched(node_settings(send_buffer_bytes=256 * 1024)) as srv:
        first, second = await pipe_pair(srv)
        await slow_reader_case(first, second)


async def test_a_slow_reader_on_another_node_slows_the_writer():
    """Flow control across nodes: the receiving node acknowledges what its client has read."""
    async with two_nodes(send_buffer_bytes=256 * 1024) as (one, two):
        first = await client(one, "/connection/a/b/k")
        await synced(first)
        second = await client(two, "/connection/b/a/k")
        await slow_reader_case(first, second)


def rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_memory_one_address_holds_at_the_defaults_is_bounded():
    """A real server process at the default settings; one client address opens 960 held
    `/connection` sockets, then 64 of them try to fill their 1 MiB each. At most
    RELAY_ADDRESS_BUFFER_BYTES (16 MiB) are held: the sockets whose frames do not fit are closed,
    and the process grows by about that (before the budget: 1,000 x 1 MiB). Run with `-s` to see
    the figures docs/protocols/relay.md ("Security") quotes."""
    require(sys.platform == "linux", "reads the process's RSS from /proc")
    mib = 1 << 20
    with node_processes(1, {"LOG_LEVEL": "WARNING"}) as (node,):
        assert node.proc is not None
        pid = node.proc.pid
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def held(path: str) -> WS:
                return await session.ws_connect(node.ws_url + path, autoping=False)

            for i in range(20):  # warm up: what the first sockets allocate once
                ws = await held(f"/connection/w{i}/x/k")
                await synced(ws)
                await ws.close()
            base = rss(pid)
            sockets = [await held(f"/connection/a{i}/b{i}/k") for i in range(960)]
            for ws in sockets:
                await synced(ws, timeout=10 * UNIT)
            idle = rss(pid)
            frame = b"x" * (64 * 1024 - FRAME_COST)  # 16 of them fill one socket's 1 MiB
            for ws in sockets[:64]:
                for _ in range(16):
                    await ws.send_bytes(frame)
            reason = "relay buffer full: more than 16777216 bytes held for this address"
            refused = 0
            for ws in sockets[:64]:
                await ws.ping(b"sync")
                msg = await ws.receive(timeout=10 * UNIT)
                if msg.type is aiohttp.WSMsgType.PONG:
                    continue
                assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 1008, reason)
                refused += 1
            full = rss(pid)
            print(
                f"\n960 held sockets holding nothing: +{(idle - base) / mib:.1f} MiB RSS "
                f"({(idle - base) / 960:.0f} B each); 64 of them sending 1 MiB each: "
                f"{refused} refused, +{(full - idle) / mib:.1f} MiB more "
                f"(+{(full - base) / mib:.1f} MiB in all)"
            )
            assert 48 <= refused < 64  # the budget holds at most 16 sockets' worth
            assert full - idle < 32 * mib  # 16 MiB held, and what reading them cost
