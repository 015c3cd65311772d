"""Signal-Fire (docs/protocols/signal-fire.md) on a real server on a free port, raw clients.

Only what crosses a socket (or the cluster's claims) is asserted here; every rule of the state
machine is tested without sockets in tests/core/test_signalfire_core.py.
"""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from polysignal.backends import MemoryBackend, MemoryBus
from polysignal.client.signalfire import Outcome, SignalFireError, connect
from polysignal.core.signalfire import CLAIM_PREFIX

from rawws import frame, upgraded
from support import UNIT, RunningServer, assert_silent, node_settings, receive_json, running_server

pytestmark = pytest.mark.timeout(30)

NANOID = re.compile(r"^[A-Za-z0-9_-]{21}$")
SF3 = "Signal-Fire@3"
OFFER = {"type": "offer", "sdp": "v=0\r\n"}
ANSWER = {"type": "answer", "sdp": "v=0\r\n"}
CANDIDATE = {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host", "sdpMid": "0"}
UNKNOWN_ID = "Z" * 21


class Peer:
    """A raw Signal-Fire client: one WebSocket, its welcome, and request helpers."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.id: str = welcome["data"]["id"]
        self._n = 0

    async def send(self, cmd: str, target: Any = None, data: Any = None, **extra: Any) -> str:
        self._n += 1
        rid = f"req-{self._n}"
        message: dict[str, Any] = {"id": rid, "cmd": cmd, **extra}
        if target is not None:
            message["target"] = target
        if data is not None:
            message["data"] = data
        await self.ws.send_str(orjson.dumps(message).decode())
        return rid

    async def request(self, cmd: str, target: Any = None, data: Any = None) -> dict[str, Any]:
        """Send and return the reply, checking that it answers this request."""
        rid = await self.send(cmd, target, data)
        reply = await receive_json(self.ws)
        assert reply["id"] == rid, reply
        return reply

    async def expect_error(self, cmd: str, target: Any, data: Any, message: str) -> None:
        reply = await self.request(cmd, target, data)
        assert reply == {"id": reply["id"], "ok": False, "data": {"message": message}}

    async def next(self) -> dict[str, Any]:
        return await receive_json(self.ws)

    async def closed(self) -> aiohttp.WSMessage:
        msg = await self.ws.receive(timeout=2 * UNIT)
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        return msg


async def join(srv: RunningServer, path: str = "/signal-fire", **kwargs: Any) -> Peer:
    ws = await srv.ws(path, **kwargs)
    welcome = await receive_json(ws)
    assert welcome["cmd"] == "welcome", welcome
    return Peer(ws, welcome)


async def released(srv: RunningServer, peer_id: str) -> None:
    """Wait until the node has released the cluster's claim of ``peer_id`` (it forgets the peer
    before it releases the claim)."""
    backend = srv.node.backend
    for _ in range(100):
        if await backend.lookup(CLAIM_PREFIX + peer_id) is None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"claim of {peer_id} not released")


# --- handshake and routing --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/socket", "/any/path/at/all"])
@pytest.mark.parametrize("subprotocol", ["Signal-Fire@3", "Signal-Fire@2"])
async def test_subprotocol_selects_signal_fire_on_any_path_and_is_echoed(server, path, subprotocol):
    """The non-token subprotocol is accepted and echoed; the welcome carries a nanoid id."""
    peer = await join(server, path, protocols=(subprotocol,))
    assert peer.ws.protocol == subprotocol
    welcome = peer.welcome
    assert set(welcome) == {"id", "cmd", "data"} and NANOID.match(welcome["id"])
    assert set(welcome["data"]) == {"id"} and NANOID.match(peer.id)
    assert welcome["id"] != peer.id


async def test_raw_handshake_echoes_the_exact_header(server):
    """Checked on the wire, below any client library: `Sec-WebSocket-Protocol: Signal-Fire@3`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET /socket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: other, Signal-Fire@3\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2 * UNIT)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 101 Switching Protocols"
    assert "Sec-WebSocket-Protocol: Signal-Fire@3" in lines
    # The first frame is the welcome, unmasked text.
    first = await asyncio.wait_for(reader.readexactly(2), 2 * UNIT)
    assert first[0] == 0x81
    length = first[1]
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    welcome = orjson.loads(await reader.readexactly(length))
    assert welcome["cmd"] == "welcome"
    writer.close()


async def test_signal_fire_path_without_subprotocol(server):
    peer = await join(server, "/signal-fire")
    assert peer.ws.protocol is None and NANOID.match(peer.id)


async def test_configured_path_and_other_paths_stay_topics():
    async with running_server(node_settings(signalfire_path="/sf")) as srv:
        assert NANOID.match((await join(srv, "/sf")).id)
        topics = await srv.ws("/signal-fire")
        await topics.send_str('{"type":"ping"}')
        assert await receive_json(topics) == {"type": "pong"}


async def test_welcome_carries_configured_ice_servers():
    servers = ({"urls": "stun:127.0.0.1:3478"}, {"urls": ["turn:127.0.0.1"], "username": "u"})
    async with running_server(node_settings(ice_servers=servers)) as srv:
        peer = await join(srv, "/", protocols=(SF3,))
        assert peer.welcome["data"]["configuration"] == {"iceServers": list(servers)}


async def test_every_connection_gets_its_own_id(server):
    peers = [await join(server) for _ in range(5)]
    assert len({p.id for p in peers}) == 5
    for p in peers:
        claim = await server.node.backend.lookup(CLAIM_PREFIX + p.id)
        assert claim is not None and claim.node_id == server.node.node_id


async def test_browser_client_module_is_served(server):
    async with (
        aiohttp.ClientSession() as http,
        http.get(server.url + "/client/signal-fire.js") as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "text/javascript"
        body = await resp.text()
    assert "export function connect" in body and "session-start" in body


# --- the session flow -------------------------------------------------------------------------


async def test_full_session_flow_acks_before_relays(server):
    """start, accept, offer, answer, ice both ways: ack with the same id, relay with a fresh id,
    ``origin`` and no ``target``; data relayed whole."""
    a, b = await join(server), await join(server, "/", protocols=(SF3,))

    rid = await a.send("session-start", b.id, data={"dropped": True})
    assert await a.next() == {"id": rid, "ok": True}
    start = await b.next()
    assert set(start) == {"id", "cmd", "origin"}
    assert start["cmd"] == "session-start" and start["origin"] == a.id
    assert NANOID.match(start["id"]) and start["id"] != rid

    rid = await b.send("session-accept", a.id)
    assert await b.next() == {"id": rid, "ok": True}
    accept = await a.next()
    assert accept["cmd"] == "session-accept" and accept["origin"] == b.id and "data" not in accept

    offer_data = {"offer": OFFER, "extra": {"kept": [1, 2]}}
    for sender, receiver, cmd, data in [
        (a, b, "offer", offer_data),
        (b, a, "answer", {"answer": ANSWER}),
        (a, b, "ice", {"candidate": CANDIDATE}),
        (b, a, "ice", {"candidate": CANDIDATE}),
    ]:
        rid = await sender.send(cmd, receiver.id, data)
        assert await sender.next() == {"id": rid, "ok": True}
        relayed = await receiver.next()
        assert relayed["cmd"] == cmd and relayed["origin"] == sender.id
        assert relayed["data"] == data and "target" not in relayed and relayed["id"] != rid
    await assert_silent(a.ws)
    await assert_silent(b.ws)


async def test_reject_forwards_reason_and_cancel_reaches_target(server):
    a, b = await join(server), await join(server)
    assert (await a.request("session-start", b.id))["ok"] is True
    await b.next()
    assert (await b.request("session-reject", a.id, {"message": "busy"}))["ok"] is True
    reject = await a.next()
    assert reject["cmd"] == "session-reject" and reject["origin"] == b.id
    assert reject["data"] == {"message": "busy"}

    assert (await a.request("session-start", b.id))["ok"] is True
    await b.next()
    assert (await a.request("session-cancel", b.id))["ok"] is True
    cancel = await b.next()
    assert cancel["cmd"] == "session-cancel" and cancel["origin"] == a.id


async def test_binary_frames_are_read_as_json_text(server):
    """ws@7 hands Luce binary frames that JSON.parse reads as text; polysignal does the same."""
    a, b = await join(server), await join(server)
    await a.ws.send_bytes(orjson.dumps({"id": "bin-1", "cmd": "session-start", "target": b.id}))
    assert await a.next() == {"id": "bin-1", "ok": True}
    assert (await b.next())["cmd"] == "session-start"


async def test_legacy_subprotocol_accepts_sdp_field(server):
    a = await join(server, "/", protocols=("Signal-Fire@2",))
    b = await join(server)
    assert (await a.request("offer", b.id, {"sdp": OFFER}))["ok"] is True
    assert (await b.next())["data"] == {"sdp": OFFER}
    # On a Signal-Fire@3 connection the same frame is missing its offer.
    await b.expect_error("offer", a.id, {"sdp": OFFER}, "Missing Offer")


# --- every error string -----------------------------------------------------------------------


async def test_every_error_string(server):
    a, b = await join(server), await join(server)
    for cmd in ("session-start", "session-accept", "session-reject", "session-cancel"):
        await a.expect_error(cmd, None, None, "Missing Target")
        await a.expect_error(cmd, "", None, "Missing Target")
        await a.expect_error(cmd, a.id, None, "Can't Send to Yourself")
        await a.expect_error(cmd, UNKNOWN_ID, None, "Peer Not Found")
    await a.expect_error("offer", b.id, None, "Missing Offer")
    await a.expect_error("offer", b.id, {"answer": ANSWER}, "Missing Offer")
    await a.expect_error("answer", b.id, {"offer": OFFER}, "Missing Answer")
    await a.expect_error("ice", b.id, {}, "Missing ICE Candidate")
    await a.expect_error("ice", b.id, "not an object", "Missing ICE Candidate")
    # Target errors come before payload errors, as in the original.
    await a.expect_error("offer", UNKNOWN_ID, None, "Peer Not Found")
    await a.expect_error("offer", a.id, None, "Can't Send to Yourself")
    await a.expect_error("ice", None, None, "Missing Target")
    # Ids of the wrong type or shape cannot exist.
    await a.expect_error("session-start", 12345, None, "Peer Not Found")
    await a.expect_error("session-start", {"id": b.id}, None, "Peer Not Found")
    await a.expect_error("session-start", "../../etc", None, "Peer Not Found")
    # Nothing was relayed for any failed request.
    await assert_silent(b.ws)


async def test_peer_offline_while_its_socket_closes(server):
    """A registered id whose socket is closing is "Peer Offline" (the original's offline status):
    here the server closed b (4400) and b, a raw client, never answers the close."""
    a = await join(server)
    b = await upgraded(server.port, "/signal-fire")
    opcode, welcome = await b.frame()
    assert opcode == 0x1
    b_id = orjson.loads(welcome)["data"]["id"]
    b.send(frame(b"not json"))
    assert await b.close_frame() == (4400, "Bad Request")
    await a.expect_error("session-start", b_id, None, "Peer Offline")
    await a.expect_error("offer", b_id, None, "Peer Offline")  # before the payload's check
    await b.aclose()
    await released(server, b_id)
    await a.expect_error("session-start", b_id, None, "Peer Not Found")


async def test_ghost_claim_gets_ack_then_peer_offline():
    """An id claimed by a node that no longer listens: ok:true, then a second reply Peer Offline,
    as the original's registry errors arrive after the ack."""
    bus = MemoryBus()
    settings = node_settings(session_timeout=0.3 * UNIT)
    async with running_server(settings, MemoryBackend("live", bus)) as srv:
        ghost = MemoryBackend("ghost", bus)  # never started: nothing receives its deliveries
        assert await ghost.claim(CLAIM_PREFIX + UNKNOWN_ID, "token", 60)
        a = await join(srv)
        rid = await a.send("session-start", UNKNOWN_ID)
        assert await a.next() == {"id": rid, "ok": True}
        assert await a.next() == {"id": rid, "ok": False, "data": {"message": "Peer Offline"}}
        # No timer for a session that never arrived: no session-timeout follows.
        await assert_silent(a.ws, timeout=0.6 * UNIT)


async def test_unknown_commands_get_no_reply(server):
    a, b = await join(server), await join(server)
    await a.send("dance", b.id)
    await a.send("session-timeout", b.id)  # only the server sends it
    await a.send("welcome", b.id)
    await a.ws.send_str(orjson.dumps({"id": "x", "target": b.id}).decode())
    await a.ws.send_str(orjson.dumps({"id": "y", "cmd": 5}).decode())
    await assert_silent(a.ws)
    await assert_silent(b.ws)
    assert (await a.request("session-start", b.id))["ok"] is True


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ('{"cmd":"session-start","target":"x"}', "Missing message ID"),
        ('{"id":"","cmd":"offer"}', "Missing message ID"),
        ('{"id":null}', "Missing message ID"),
        ("{}", "Missing message ID"),
        ("not json", "Bad Request"),
        ('{"id":"x",', "Bad Request"),
        ("[1,2,3]", "Bad Request"),
        ('{"id":{"nested":1},"cmd":"offer"}', "Bad Request"),
    ],
)
async def test_close_4400_and_id_released(server, frame, reason):
    a, other = await join(server), await join(server)
    await a.ws.send_str(frame)
    msg = await a.closed()
    assert msg.data == 4400 and msg.extra == reason
    await released(server, a.id)
    await other.expect_error("session-start", a.id, None, "Peer Not Found")


async def test_oversize_frame_closes_1009_and_releases_id():
    async with running_server(node_settings(max_frame_bytes=4096)) as srv:
        a, b = await join(srv), await join(srv)
        await a.send("offer", b.id, {"offer": {"type": "offer", "sdp": "x" * 5000}})
        msg = await a.closed()
        assert msg.data == 1009 and msg.extra == "Message too large"
        await released(srv, a.id)
        await b.expect_error("offer", a.id, {"offer": OFFER}, "Peer Not Found")
        await assert_silent(b.ws)


async def test_flood_every_request_answered_once_and_others_served():
    async with running_server(node_settings(rate_limit=20, rate_burst=10)) as srv:
        flooder, target, bystander = await join(srv), await join(srv), await join(srv)
        sent = [await flooder.send("ice", target.id, {"candidate": CANDIDATE}) for _ in range(200)]
        replies: dict[str, dict[str, Any]] = {}
        while len(replies) < len(sent):
            reply = await flooder.next()
            assert reply["id"] not in replies
            replies[reply["id"]] = reply
        ok = [r for r in replies.values() if r["ok"]]
        refused = [r for r in replies.values() if not r["ok"]]
        assert 10 <= len(ok) < 100
        assert refused and all(r["data"]["message"] == "Too Many Requests" for r in refused)
        relayed = 0
        while relayed < len(ok):
            assert (await target.next())["cmd"] == "ice"
            relayed += 1
        await assert_silent(target.ws)
        assert (await bystander.request("session-start", target.id))["ok"] is True


# --- disconnects and the session timer --------------------------------------------------------


async def test_peer_that_disconnects_mid_session(server):
    """After the target leaves, the id is gone: requests to it get Peer Not Found."""
    a, b = await join(server), await join(server)
    assert (await a.request("session-start", b.id))["ok"] is True
    await b.next()
    assert (await b.request("session-accept", a.id))["ok"] is True
    await a.next()
    assert (await a.request("offer", b.id, {"offer": OFFER}))["ok"] is True
    await b.ws.close()
    await released(server, b.id)
    await a.expect_error("ice", b.id, {"candidate": CANDIDATE}, "Peer Not Found")
    await a.expect_error("answer", b.id, {"answer": ANSWER}, "Peer Not Found")


async def test_abrupt_disconnect_releases_id(server):
    """A socket cut without a close frame is cleaned up like a polite close."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"GET /signal-fire HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    data = b""
    while b"welcome" not in data:
        chunk = await asyncio.get_running_loop().run_in_executor(None, sock.recv, 4096)
        assert chunk, "connection closed before welcome"
        data += chunk
    ghost_id = orjson.loads(data[data.index(b"{") :])["data"]["id"]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST, no close frame
    await released(server, ghost_id)
    a = await join(server)
    await a.expect_error("session-start", ghost_id, None, "Peer Not Found")


async def test_initiator_leaving_cancels_its_pending_sessions():
    async with running_server(node_settings(session_timeout=0.5 * UNIT)) as srv:
        a, b = await join(srv), await join(srv)
        assert (await a.request("session-start", b.id))["ok"] is True
        await b.next()
        await a.ws.close()
        cancel = await b.next()
        assert cancel["cmd"] == "session-cancel" and cancel["origin"] == a.id
        # The session is gone with its initiator: no session-timeout follows.
        await assert_silent(b.ws, timeout=0.8 * UNIT)


async def test_unanswered_session_times_out_on_both_sides():
    async with running_server(node_settings(session_timeout=0.3)) as srv:
        a, b = await join(srv), await join(srv)
        assert (await a.request("session-start", b.id))["ok"] is True
        assert (await b.next())["cmd"] == "session-start"
        to_a, to_b = await a.next(), await b.next()
        assert to_a["cmd"] == to_b["cmd"] == "session-timeout"
        assert to_a["origin"] == b.id and to_b["origin"] == a.id
        assert NANOID.match(to_a["id"]) and to_a["id"] != to_b["id"]
        assert set(to_a) == set(to_b) == {"id", "cmd", "origin"}
        await assert_silent(a.ws, timeout=0.6 * UNIT)  # once only
        await assert_silent(b.ws, timeout=0.1 * UNIT)


@pytest.mark.parametrize("answer", ["session-accept", "session-reject"])
async def test_answered_session_does_not_time_out(answer):
    async with running_server(node_settings(session_timeout=0.3)) as srv:
        a, b = await join(srv), await join(srv)
        assert (await a.request("session-start", b.id))["ok"] is True
        await b.next()
        assert (await b.request(answer, a.id))["ok"] is True
        assert (await a.next())["cmd"] == answer
        await assert_silent(a.ws, timeout=0.6 * UNIT)
        await assert_silent(b.ws, timeout=0.1 * UNIT)


async def test_cancelled_session_does_not_time_out():
    async with running_server(node_settings(session_timeout=0.3)) as srv:
        a, b = await join(srv), await join(srv)
        assert (await a.request("session-start", b.id))["ok"] is True
        await b.next()
        assert (await a.request("session-cancel", b.id))["ok"] is True
        assert (await b.next())["cmd"] == "session-cancel"
        await assert_silent(a.ws, timeout=0.6 * UNIT)
        await assert_silent(b.ws, timeout=0.1 * UNIT)


# --- two nodes in one process (memory bus) -----------------------------------------------------


@asynccontextmanager
async def two_nodes(**overrides: Any):
    bus = MemoryBus()
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                running_server(node_settings(node_id=name, **overrides), MemoryBackend(name, bus))
            )
            for name in ("node-1", "node-2")
        ]
        yield nodes


async def test_relays_cross_nodes_in_order():
    async with two_nodes(session_timeout=0.5 * UNIT) as (n1, n2):
        a, b = await join(n1), await join(n2)
        assert (await a.request("session-start", b.id))["ok"] is True
        assert (await b.next()) | {"id": "-"} == {"id": "-", "cmd": "session-start", "origin": a.id}
        assert (await b.request("session-accept", a.id))["ok"] is True
        assert (await a.next())["cmd"] == "session-accept"
        for i in range(20):
            assert (await a.request("ice", b.id, {"candidate": {"n": i}}))["ok"] is True
        for i in range(20):
            got = await b.next()
            assert got["data"] == {"candidate": {"n": i}} and got["origin"] == a.id
        # The initiator's node saw the answer: the session never times out.
        await assert_silent(a.ws, timeout=0.8 * UNIT)
        await assert_silent(b.ws, timeout=0.1 * UNIT)


async def test_timeout_and_cancel_cross_nodes():
    async with two_nodes(session_timeout=0.3) as (n1, n2):
        a, b = await join(n1), await join(n2)
        assert (await a.request("session-start", b.id))["ok"] is True
        await b.next()
        to_a, to_b = await a.next(), await b.next()
        assert (to_a["cmd"], to_a["origin"]) == ("session-timeout", b.id)
        assert (to_b["cmd"], to_b["origin"]) == ("session-timeout", a.id)
        assert (await a.request("session-start", b.id))["ok"] is True
        await b.next()
        await a.ws.close()
        cancel = await b.next()
        assert (cancel["cmd"], cancel["origin"]) == ("session-cancel", a.id)


async def test_cross_node_target_gone_after_lookup_gets_second_reply():
    """The target's node holds the claim but has no socket for it (as when it closed just now):
    ack, then Peer Offline; and no timer for the session that never arrived."""
    async with two_nodes(session_timeout=0.3 * UNIT) as (n1, n2):
        a, b = await join(n1), await join(n2)
        # A claim node-2 holds with no peer behind it there.
        assert await n2.node.backend.claim(CLAIM_PREFIX + UNKNOWN_ID, "token", 60)
        rid = await a.send("session-start", UNKNOWN_ID)
        assert await a.next() == {"id": rid, "ok": True}
        assert await a.next() == {"id": rid, "ok": False, "data": {"message": "Peer Offline"}}
        await assert_silent(a.ws, timeout=0.6 * UNIT)
        await assert_silent(b.ws, timeout=0.1 * UNIT)


async def test_cross_node_target_closing_gets_ack_then_peer_offline():
    """b's socket on node-2 is closing (the server closed it, b never answers), its claim still
    stands: a's request on node-1 is acked, then answered Peer Offline from node-2."""
    async with two_nodes(session_timeout=0.3 * UNIT) as (n1, n2):
        a = await join(n1)
        b = await upgraded(n2.port, "/signal-fire")
        b_id = orjson.loads((await b.frame())[1])["data"]["id"]
        b.send(frame(b"not json"))
        assert await b.close_frame() == (4400, "Bad Request")
        rid = await a.send("offer", b_id, {"offer": OFFER})
        assert await a.next() == {"id": rid, "ok": True}
        assert await a.next() == {"id": rid, "ok": False, "data": {"message": "Peer Offline"}}
        await b.aclose()


async def test_cross_node_not_found_after_close():
    async with two_nodes() as (n1, n2):
        a, b = await join(n1), await join(n2)
        await b.ws.close()
        await released(n2, b.id)
        await a.expect_error("session-start", b.id, None, "Peer Not Found")


async def test_an_id_taken_over_by_another_holder_closes_1013():
    """The lease renewal finds the id held by another holder: its socket closes, 1013."""
    bus = MemoryBus()
    async with running_server(node_settings(id_lease_ttl=1), MemoryBackend("node-1", bus)) as srv:
        a, b = await join(srv), await join(srv)
        thief = MemoryBackend("node-2", bus)
        key = CLAIM_PREFIX + a.id
        holder = await thief.lookup(key)
        assert holder is not None and holder.node_id == "node-1"
        assert await thief.release(key, holder.token)
        assert await thief.claim(key, "thief", 60)
        msg = await a.ws.receive(timeout=3 * UNIT)  # leases are renewed every third of a second
        assert msg.type is aiohttp.WSMsgType.CLOSE, msg
        assert (msg.data, msg.extra) == (1013, "id taken over")
        await assert_silent(b.ws)  # the other peer keeps its id and its socket
        claim = await thief.lookup(key)  # once a's socket is gone: left to its new holder
        assert claim is not None and claim.token == "thief"


@pytest.mark.redis
async def test_a_hung_redis_does_not_hold_the_welcome_up(redis_url: str):
    """Redis stops answering (CLIENT PAUSE): a new client is welcomed within a fraction of a
    second all the same, its id served on this node, and claimed in Redis once it answers."""
    settings = node_settings(backend_url=redis_url, signal_channel=f"test:{uuid.uuid4().hex}")
    client = Redis.from_url(redis_url)
    async with running_server(settings) as srv:
        backend = srv.node.backend
        for _ in range(int(5 * UNIT / 0.02)):
            if backend.ready:
                break
            await asyncio.sleep(0.02)
        assert backend.ready
        await client.execute_command("CLIENT", "PAUSE", str(int(3000 * UNIT)), "WRITE")
        try:
            asked = asyncio.get_running_loop().time()
            ws = await srv.ws("/signal-fire")
            welcome = await receive_json(ws, timeout=0.5 * UNIT)
            assert asyncio.get_running_loop().time() - asked < 0.5 * UNIT
        finally:
            await client.execute_command("CLIENT", "UNPAUSE")
            await client.aclose()
        peer = Peer(ws, welcome)
        assert NANOID.match(peer.id)
        for _ in range(int(5 * UNIT / 0.02)):
            claim = await backend.lookup(CLAIM_PREFIX + peer.id)
            if claim is not None:
                break
            await asyncio.sleep(0.02)
        assert claim is not None and claim.node_id == settings.server.node_id
        await peer.expect_error("session-start", peer.id, None, "Can't Send to Yourself")


async def test_shutdown_releases_every_id():
    bus = MemoryBus()
    async with running_server(backend=MemoryBackend("other", bus)) as other:
        async with running_server(backend=MemoryBackend("going", bus)) as going:
            peer = await join(going)
            watcher = await join(other)
            await going.server.stop()
            assert (await peer.closed()).data == 1001
        await watcher.expect_error("session-start", peer.id, None, "Peer Not Found")


# --- the Python client against one node ---------------------------------------------------------


async def test_python_client_outcomes():
    """Errors raise with the server's message; reject, cancel and timeout reach the sessions."""
    async with running_server(node_settings(session_timeout=0.3)) as srv:
        a = await connect(srv.ws_url + "/")
        b = await connect(srv.ws_url + "/signal-fire", subprotocol=None)
        try:
            with pytest.raises(SignalFireError, match="Peer Not Found"):
                await a.create_session(UNKNOWN_ID)
            with pytest.raises(SignalFireError, match="Can't Send to Yourself"):
                await a.send_offer(a.id, OFFER)
            session = await a.create_session(b.id)
            incoming = await b.next_session()
            await incoming.reject("not now")
            end = await asyncio.wait_for(session.outcome(), 2 * UNIT)
            assert (end.kind, end.reason) == (Outcome.REJECTED, "not now")

            session = await a.create_session(b.id)
            incoming = await b.next_session()
            await session.cancel()
            end = await asyncio.wait_for(incoming.outcome(), 2 * UNIT)
            assert end.kind is Outcome.CANCELLED

            session = await a.create_session(b.id)
            incoming = await b.next_session()
            ends = await asyncio.wait_for(
                asyncio.gather(session.outcome(), incoming.outcome()), 2 * UNIT
            )
            assert [e.kind for e in ends] == [Outcome.TIMED_OUT, Outcome.TIMED_OUT]
        finally:
            await a.close()
            await b.close()
        assert a.closed.is_set()
        with pytest.raises(SignalFireError, match="connection closed"):
            await a.create_session(b.id)


async def test_python_client_refuses_a_server_that_does_not_echo(server):
    """Like the published client: an offered subprotocol that is not echoed is refused."""
    with pytest.raises(SignalFireError, match="did not accept subprotocol"):
        await connect(server.ws_url + "/signal-fire", subprotocol="Signal-Fire@9")


async def test_malformed_relays_from_other_nodes_are_dropped(caplog):
    """What arrives on the bus for Signal-Fire is checked; bad envelopes are logged, not fatal."""
    bus = MemoryBus()
    async with running_server(backend=MemoryBackend("node-1", bus)) as srv:
        a, b = await join(srv), await join(srv)
        other = MemoryBackend("node-2", bus)
        await other.start()
        for payload in [
            b"not json",
            b"[]",
            orjson.dumps({"to": b.id}),
            orjson.dumps({"to": 5, "message": {}}),
            orjson.dumps({"to": b.id, "message": "text"}),
        ]:
            assert await other.send_direct("node-1", "signalfire", payload)
        assert await other.send_direct("node-1", "signalfire-undeliverable", b"{}")
        # A well-formed one still gets through, after the bad ones.
        good = {"to": b.id, "message": {"id": "x", "cmd": "session-accept", "origin": a.id}}
        assert await other.send_direct("node-1", "signalfire", orjson.dumps(good))
        assert await b.next() == good["message"]
        await assert_silent(a.ws)
        assert "malformed" in caplog.text
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        await other.close()
