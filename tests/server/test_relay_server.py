"""The relay protocol against real servers on free ports with raw WebSocket clients.

Every generation (JSON ``join``/``keys``, JSON ``documentIds``, msgpack v4), the pipes, the
limits and bad input (docs/protocols/relay.md); then two nodes sharing one ``MemoryBus``,
which behave like two nodes sharing Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest

from polysignal.backends.base import Claim
from polysignal.backends.memory import MemoryBackend, MemoryBus
from polysignal.core.errors import CloseCode
from polysignal.core.relay import peer_claim_key
from polysignal.server.app import RELAY_KEY
from polysignal.server.relay import RelayHub

from support import (
    UNIT,
    RunningServer,
    assert_silent,
    free_port,
    node_settings,
    receive_json,
    running_server,
    until,
)

pytestmark = pytest.mark.timeout(30)

WS = aiohttp.ClientWebSocketResponse
CLOSED = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


def hub(server: RunningServer) -> RelayHub:
    return server.app[RELAY_KEY]


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


# --- introductions ---------------------------------------------------------------------------


async def test_v1_join_keys_introductions_both_ways(server):
    """cevitxe 0.4: Join with `join`, Introduction with `id`, `keys` (docs/protocols/relay.md)."""
    a = await server.ws("/introduction/aaaa4242")
    b = await server.ws("/introduction/qrst7890")
    await join_json(a, "happy-raccoon", "hairy-thumb", field="join")
    await until(lambda: "aaaa4242" in hub(server).directory)
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
    a = await server.ws("/introduction/alice")
    b = await server.ws("/introduction/bob")
    await join_json(a, "d1", "d2")
    await until(lambda: "alice" in hub(server).directory)
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
    a = await server.ws("/introduction/alice")
    b = await server.ws("/introduction/bob")
    await join_v4(a, "doc1")
    await until(lambda: "alice" in hub(server).directory)
    await join_v4(b, "doc1")
    intro = {"type": "Introduction", "peerId": "alice", "documentIds": ["doc1"]}
    assert await receive_msgpack(b) == intro
    assert await receive_msgpack(a) == {**intro, "peerId": "bob"}


async def test_each_generation_is_answered_in_its_own_shape(server):
    v1 = await server.ws("/introduction/v1")
    v2 = await server.ws("/introduction/v2")
    v4 = await server.ws("/introduction/v4")
    await join_json(v1, "doc", field="join")
    await join_json(v2, "doc")
    await until(lambda: "v1" in hub(server).directory and "v2" in hub(server).directory)
    await join_v4(v4, "doc")
    got_v4 = [await receive_msgpack(v4), await receive_msgpack(v4)]
    assert sorted(m["peerId"] for m in got_v4) == ["v1", "v2"]
    v1_msgs = [await receive_json(v1), await receive_json(v1)]
    assert {"type": "Introduction", "id": "v4", "keys": ["doc"]} in v1_msgs
    v2_msgs = [await receive_json(v2), await receive_json(v2)]
    assert {"type": "Introduction", "userName": "v4", "documentIds": ["doc"]} in v2_msgs


async def test_repeated_joins_repeat_introductions(server):
    """The originals re-introduce on every Join; clients dedupe (docs/protocols/relay.md)."""
    a = await server.ws("/introduction/a")
    b = await server.ws("/introduction/b")
    await join_json(a, "k")
    await until(lambda: "a" in hub(server).directory)
    await join_json(b, "k")
    await receive_json(a)
    await receive_json(b)
    for _ in range(2):
        await join_json(b, "k")
        assert (await receive_json(a))["userName"] == "b"
        assert (await receive_json(b))["userName"] == "a"


async def test_leave_sends_nothing_and_stops_introductions(server):
    a = await server.ws("/introduction/a")
    await join_json(a, "k1", "k2")
    await a.send_str('{"type":"Leave","documentIds":["k1"]}')
    await until(lambda: hub(server).directory.documents_of("a") == ("k2",))
    await assert_silent(a)
    b = await server.ws("/introduction/b")
    await join_json(b, "k1")
    await until(lambda: "b" in hub(server).directory)
    await assert_silent(a)
    await assert_silent(b)
    await join_json(b, "k2")
    assert (await receive_json(b))["documentIds"] == ["k2"]


async def test_v1_leave_and_join_with_leave(server):
    a = await server.ws("/introduction/a")
    await join_json(a, "k1", "k2", field="join")
    await a.send_str('{"type":"Leave","leave":["k1"]}')
    await until(lambda: hub(server).directory.documents_of("a") == ("k2",))
    await a.send_str('{"type":"Join","join":["k3"],"leave":["k2"]}')
    await until(lambda: hub(server).directory.documents_of("a") == ("k3",))


async def test_heartbeats_are_accepted_silently(server):
    j = await server.ws("/introduction/j")
    m = await server.ws("/introduction/m")
    await j.send_str('{"type":"Heartbeat"}')
    await m.send_bytes(msgpack.packb({"type": "Heartbeat"}))
    await m.send_bytes(msgpack.packb({"type": "❤️"}))
    await join_json(j, "k")
    await join_v4(m, "k")
    # Still open and serving: the two are introduced.
    assert (await receive_msgpack(m))["peerId"] == "j"
    assert (await receive_json(j))["userName"] == "m"


async def test_a_closed_peer_is_forgotten(server):
    a = await server.ws("/introduction/a")
    await join_json(a, "k")
    await until(lambda: "a" in hub(server).directory)
    await a.close()
    await until(lambda: "a" not in hub(server).directory)
    b = await server.ws("/introduction/b")
    await join_json(b, "k")
    await assert_silent(b)


async def test_abrupt_disconnect_is_forgotten(server):
    a = await server.ws("/introduction/a")
    await join_json(a, "k")
    await until(lambda: "a" in hub(server).directory)
    transport = a._response.connection.transport  # cut the TCP connection without a close frame
    assert transport is not None
    transport.abort()
    await until(lambda: "a" not in hub(server).directory and not hub(server).peers)


async def test_second_socket_with_the_same_id_replaces_the_first_cleanly(server):
    """The old socket is closed; its cleanup does not orphan the new one (the original's did)."""
    old = await server.ws("/introduction/dup")
    await join_json(old, "k")
    await until(lambda: "dup" in hub(server).directory)
    new = await server.ws("/introduction/dup")
    code, reason = await closed_with(old)
    assert code == CloseCode.NORMAL and "replaced" in reason
    await until(lambda: "dup" not in hub(server).directory)  # the old socket's documents went
    await join_json(new, "k")
    other = await server.ws("/introduction/other")
    await join_json(other, "k")
    assert (await receive_json(new))["userName"] == "other"
    assert (await receive_json(other))["userName"] == "dup"


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code", "reason"),
    [
        ("{not json", CloseCode.UNSUPPORTED_DATA, "invalid JSON"),
        (b"\xc1\xc1", CloseCode.UNSUPPORTED_DATA, "invalid msgpack"),
        ('{"type":"Dance"}', CloseCode.POLICY_VIOLATION, "unknown message type 'Dance'"),
        ('{"type":"Join","documentIds":[1]}', CloseCode.UNSUPPORTED_DATA, "not a string"),
        (msgpack.packb({"type": "Join"}), CloseCode.UNSUPPORTED_DATA, "missing 'documentIds'"),
        (msgpack.packb([1, 2]), CloseCode.UNSUPPORTED_DATA, "expected an object"),
    ],
)
async def test_bad_frames_close_with_a_code_and_reason_and_others_keep_working(
    server, frame, code, reason
):
    bad = await server.ws("/introduction/bad")
    if isinstance(frame, bytes):
        await bad.send_bytes(frame)
    else:
        await bad.send_str(frame)
    got_code, got_reason = await closed_with(bad)
    assert got_code == code and reason in got_reason
    a = await server.ws("/introduction/a")
    b = await server.ws("/introduction/b")
    await join_v4(a, "k")
    await until(lambda: "a" in hub(server).directory)
    await join_v4(b, "k")
    assert (await receive_msgpack(b))["peerId"] == "a"


async def test_switching_encoding_mid_connection_is_refused(server):
    ws = await server.ws("/introduction/x")
    await join_v4(ws, "k")
    await ws.send_str('{"type":"Heartbeat"}')
    assert await closed_with(ws) == (
        CloseCode.UNSUPPORTED_DATA,
        "this connection speaks msgpack binary frames",
    )


async def test_too_many_documents_and_too_long_ids_are_refused():
    settings = node_settings(relay_max_documents=2, relay_max_id_length=8)
    async with running_server(settings) as srv:
        ws = await srv.ws("/introduction/x")
        await join_json(ws, "a", "b")
        await join_json(ws, "c")
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "at most 2 document ids" in reason
        ws = await srv.ws("/introduction/y")
        await join_json(ws, "123456789")
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "longer than 8" in reason
        ws = await srv.ws("/introduction/123456789")
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "peer id is longer than 8" in reason
        ws = await srv.ws("/connection/a/b/123456789")
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "document id is longer than 8" in reason


async def test_flood_of_introduction_messages_closes_with_a_reason():
    async with running_server(node_settings(rate_limit=1.0, rate_burst=3)) as srv:
        ws = await srv.ws("/introduction/flood")
        for _ in range(6):
            await ws.send_str('{"type":"Heartbeat"}')
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "rate limit exceeded" in reason


async def test_oversize_frame_closes_with_1009():
    async with running_server(node_settings(max_frame_bytes=1024)) as srv:
        ws = await srv.ws("/introduction/big")
        await join_json(ws, "x" * 2000)
        assert (await closed_with(ws))[0] == CloseCode.MESSAGE_TOO_BIG


async def test_paths_without_their_ids_are_refused_with_a_reason(server):
    ws = await server.ws("/introduction/")
    assert await closed_with(ws) == (CloseCode.POLICY_VIOLATION, "expected /introduction/{peerId}")
    ws = await server.ws("/connection/a/b")
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
    first = await server.ws(f"/connection/{a}/{b}/{key}")
    await until(lambda: any(e.a == a for e in hub(server).ends.values()))
    second = await server.ws(f"/connection/{b}/{a}/{key}")
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
    async with running_server(settings) as srv:
        first, second = await pipe_pair(srv)
        blob = bytes(range(256)) * 700  # 179,200 bytes: over MAX_FRAME_BYTES, under the pipe's
        await first.send_bytes(blob)
        assert await receive_frame(second) == (BINARY, blob)
        await second.send_bytes(b"x" * 200_001)
        assert (await closed_with(second))[0] == CloseCode.MESSAGE_TOO_BIG
        # The introduction channel keeps the signalling limit.
        ws = await srv.ws("/introduction/big")
        await join_json(ws, "x" * 5000)
        assert (await closed_with(ws))[0] == CloseCode.MESSAGE_TOO_BIG


async def test_frames_sent_while_held_are_flushed_in_order_first(server):
    first = await server.ws("/connection/a/b/k")
    for i in range(20):
        if i % 2:
            await first.send_bytes(bytes([i]))
        else:
            await first.send_str(f"held {i}")
    await until(
        lambda: (
            sum(e.buffer.size for e in hub(server).ends.values()) > 0
            and len(next(iter(hub(server).ends.values())).buffer.frames) == 20
        )
    )
    second = await server.ws("/connection/b/a/k")
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
    await until(lambda: not hub(server).ends)


async def test_hold_buffer_is_bounded_in_bytes():
    async with running_server(node_settings(relay_buffer_bytes=100)) as srv:
        ws = await srv.ws("/connection/a/b/k")
        await ws.send_bytes(b"x" * 60)
        await ws.send_bytes(b"x" * 60)
        code, reason = await closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "relay buffer full" in reason
        # The hold is gone: a new request is held afresh and pairs normally.
        await until(lambda: not hub(srv).ends)
        first, second = await pipe_pair(srv)
        await first.send_str("ok")
        assert await receive_frame(second) == (TEXT, "ok")


async def test_hold_waits_a_bounded_time():
    async with running_server(node_settings(relay_wait_timeout=0.3)) as srv:
        ws = await srv.ws("/connection/a/b/k")
        code, reason = await closed_with(ws, timeout=5 * UNIT)
        assert code == CloseCode.TRY_AGAIN_LATER and "no peer connected within 0.3 s" in reason


async def test_duplicate_request_replaces_the_held_socket(server):
    old = await server.ws("/connection/a/b/k")
    await old.send_str("from the old socket")
    await until(lambda: len(hub(server).ends) == 1)
    new = await server.ws("/connection/a/b/k")
    code, reason = await closed_with(old)
    assert code == CloseCode.NORMAL and "replaced" in reason
    await new.send_str("from the new socket")
    await until(lambda: len(hub(server).ends) == 1)
    peer = await server.ws("/connection/b/a/k")
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
    ws = await server.ws("/connection/a/b/k")
    await until(lambda: len(hub(server).ends) == 1)
    transport = ws._response.connection.transport
    assert transport is not None
    transport.abort()
    await until(lambda: not hub(server).ends)
    first, second = await pipe_pair(server)
    await second.send_str("fine")
    assert await receive_frame(first) == (TEXT, "fine")


# --- two nodes on one MemoryBus ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def two_nodes(**overrides: Any) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    bus = MemoryBus()
    async with (
        running_server(node_settings(node_id="n1", **overrides), MemoryBackend("n1", bus)) as one,
        running_server(node_settings(node_id="n2", **overrides), MemoryBackend("n2", bus)) as two,
    ):
        yield one, two


async def test_introductions_cross_nodes_in_each_generation():
    async with two_nodes() as (one, two):
        a = await one.ws("/introduction/alice")
        b = await two.ws("/introduction/bob")
        await join_v4(a, "d0", "doc")
        await until(lambda: "alice" in hub(one).directory)
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
        c = await one.ws("/introduction/carol")
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
        a = await one.ws("/introduction/alice")
        await join_json(a, "doc")
        await a.send_str('{"type":"Leave","documentIds":["doc"]}')
        await until(lambda: "alice" not in hub(one).directory)
        b = await two.ws("/introduction/bob")
        await join_json(b, "doc")
        await assert_silent(b)
        await assert_silent(a)


async def test_pipe_across_nodes_keeps_order_and_frame_types():
    async with two_nodes() as (one, two):
        first = await one.ws("/connection/a/b/k")
        for i in range(5):
            await first.send_str(f"held {i}")
        await until(
            lambda: (
                bool(hub(one).ends) and len(next(iter(hub(one).ends.values())).buffer.frames) == 5
            )
        )
        second = await two.ws("/connection/b/a/k")
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
        await until(lambda: not hub(one).ends and not hub(two).ends)


async def test_large_pipe_frames_cross_nodes_whole():
    async with two_nodes() as (one, two):
        first = await one.ws("/connection/a/b/k")
        await until(lambda: bool(hub(one).ends))
        second = await two.ws("/connection/b/a/k")
        blobs = [bytes([i]) * 250_000 for i in range(3)]
        for blob in blobs:
            await first.send_bytes(blob)
        for blob in blobs:
            assert await receive_frame(second, timeout=5 * UNIT) == (BINARY, blob)
        await second.send_str("y" * 200_000)
        assert await receive_frame(first, timeout=5 * UNIT) == (TEXT, "y" * 200_000)


async def test_same_peer_id_on_another_node_replaces_the_first():
    async with two_nodes() as (one, two):
        old = await one.ws("/introduction/dup")
        await join_json(old, "k")
        await until(lambda: "dup" in hub(one).directory)
        new = await two.ws("/introduction/dup")
        code, reason = await closed_with(old)
        assert code == CloseCode.NORMAL and "replaced" in reason
        await until(lambda: "dup" not in hub(one).directory)
        other = await one.ws("/introduction/other")
        await join_json(new, "k")
        await until(lambda: "dup" in hub(two).directory)
        await join_json(other, "k")
        assert (await receive_json(new))["userName"] == "other"
        assert (await receive_json(other))["userName"] == "dup"


async def test_duplicate_pipe_request_on_another_node_replaces_the_held_one():
    async with two_nodes() as (one, two):
        old = await one.ws("/connection/a/b/k")
        await until(lambda: bool(hub(one).ends))
        new = await two.ws("/connection/a/b/k")
        code, reason = await closed_with(old)
        assert code == CloseCode.NORMAL and "replaced" in reason
        await until(lambda: not hub(one).ends and bool(hub(two).ends))
        peer = await one.ws("/connection/b/a/k")
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
        a = await srv.ws("/introduction/a")
        await join_v4(a, "k")
        await until(lambda: "a" in hub(srv).directory)
        b = await srv.ws("/introduction/b")
        await join_v4(b, "k")
        assert (await receive_msgpack(b))["peerId"] == "a"
        assert (await receive_msgpack(a))["peerId"] == "b"
        again = await srv.ws("/introduction/a")
        assert (await closed_with(a))[0] == CloseCode.NORMAL
        await join_v4(again, "k")
        assert (await receive_msgpack(again))["peerId"] == "b"
        old = await srv.ws("/connection/a/b/k")
        await until(lambda: bool(hub(srv).holding))
        first = await srv.ws("/connection/a/b/k")
        assert "replaced" in (await closed_with(old))[1]
        await first.send_str("held")
        await until(lambda: len(hub(srv).ends) == 1)
        second = await srv.ws("/connection/b/a/k")
        assert await receive_frame(second) == (TEXT, "held")
        await second.send_bytes(b"\x01")
        assert await receive_frame(first) == (BINARY, b"\x01")


async def test_peer_id_lease_is_renewed_and_a_lost_claim_closes_the_socket():
    """The claim outlives its TTL while the socket is open; taken over elsewhere (an eviction
    message that never arrived), the socket yields at the next renewal."""
    async with running_server(node_settings(id_lease_ttl=3)) as srv:
        ws = await srv.ws("/introduction/leased")
        await until(lambda: "leased" in hub(srv).peers)
        backend = srv.node.backend
        key = peer_claim_key("leased")
        token = hub(srv).peers["leased"].token
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
    async with running_server(node_settings(send_buffer_bytes=256 * 1024)) as srv:
        first, second = await pipe_pair(srv)
        await slow_reader_case(first, second)


async def test_a_slow_reader_on_another_node_slows_the_writer():
    """Flow control across nodes: the receiving node acknowledges what its client has read."""
    async with two_nodes(send_buffer_bytes=256 * 1024) as (one, two):
        first = await one.ws("/connection/a/b/k")
        await until(lambda: bool(hub(one).holding))
        second = await two.ws("/connection/b/a/k")
        await slow_reader_case(first, second)
