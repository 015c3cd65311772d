"""The shipped deploy/nginx.conf in a real nginx, in front of two polysignal node processes on a
private Redis: the compose shape (deploy/compose.yaml) on loopback addresses.

nginx runs the shipped file with only its `listen` port and its upstream `server` lines changed
(conftest.shipped_nginx_conf). The nodes trust 127.0.0.1, the address nginx connects from. Python
clients connect from loopback addresses of their own (127.0.0.2 and up), as distinct internet
clients would; the published Node and browser clients connect from 127.0.0.1.

What each test proves:
- every client is routed by its address to one node, both nodes get clients, and each node sees
  the client's own address (X-Forwarded-For, TRUSTED_PROXIES), not nginx's nor a forged one;
- the published y-webrtc client in two Chromium contexts syncs a document through nginx
  (topics on /);
- a pair of @localfirst/relay 4 clients introduce and pipe through nginx (/introduction/,
  /connection/);
- two Signal-Fire clients on different nodes start a session and relay an offer (/signal-fire,
  across nodes on Redis);
- socket.io long-polling works through nginx, from clients routed to each node, and a room join
  crosses nodes (sticky routing: with round-robin a session's requests would reach the node that
  does not hold it and get 400 "Invalid session").
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import socketio

from deploy.tools import Nginx, running_nginx
from polysignal.client.signalfire import Outcome, connect
from rooms_client import PASSWORD, SECRET, RoomsClient, app_token, create_room, join_room

from support import (
    UNIT,
    NodeProcess,
    chromium_ready,
    node_processes,
    node_ready,
    receive_json,
    redis_server,
    run_node,
)

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(120)]

# Client addresses of the Python clients: 16, so that each node surely gets some of them.
SOURCES = [f"127.0.0.{n}" for n in range(2, 18)]
OPEN = re.compile(r"<Connection #\d+ (\S+) (\S+)> open on (\S*)")


@dataclass
class Stack:
    nginx: Nginx
    nodes: list[NodeProcess]
    routes: dict[str, int] = field(default_factory=dict)  # client address -> node index

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.nginx.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.nginx.port}"

    def opened(self, node: int) -> list[tuple[str, str, str]]:
        """(protocol, client address, path) of every connection ``node`` logged as open."""
        return OPEN.findall(self.nodes[node].log())

    def address_on(self, node: int) -> str:
        assert self.routes, "test_clients_are_routed_by_address_and_seen_as_themselves first"
        return next(a for a, n in self.routes.items() if n == node)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with redis_server() as url:
        env = {
            "REDIS_URL": url,
            "TRUSTED_PROXIES": "127.0.0.1/32",
            "APP_SECRET": SECRET,
            "APP_PASS": PASSWORD,
            "LOG_LEVEL": "INFO",
        }
        with (
            node_processes(2, env) as nodes,
            running_nginx([f"127.0.0.1:{node.port}" for node in nodes]) as nginx,
        ):
            yield Stack(nginx, nodes)


def session_from(source: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``source`` (a loopback address of its own)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))


async def test_clients_are_routed_by_address_and_seen_as_themselves(stack: Stack):
    """Each client address reaches one node (hash $remote_addr), both nodes get clients, and the
    nodes log each client's own address: the one nginx appended to X-Forwarded-For, not nginx's
    127.0.0.1 and not the 198.51.100.7 the client claimed itself."""
    forged = {"X-Forwarded-For": "198.51.100.7"}
    sessions = [session_from(source) for source in SOURCES]
    try:
        sockets = [await s.ws_connect(stack.ws + "/", headers=forged) for s in sessions]
        for ws in sockets:
            await ws.send_str('{"type":"ping"}')
        assert [await receive_json(ws) for ws in sockets] == [{"type": "pong"}] * len(SOURCES)
        # A second connection of each client reaches the same node as its first, made in
        # another order (round-robin would send each to the other node).
        again = [await s.ws_connect(stack.ws + "/") for s in [*sessions[1:], sessions[0]]]
        for ws in [*sockets, *again]:
            await ws.close()
    finally:
        for s in sessions:
            await s.close()
    await asyncio.sleep(0.2 * UNIT)  # the log lines are written as the upgrades complete
    seen: dict[str, list[int]] = {}
    for index in range(2):
        for protocol, address, path in stack.opened(index):
            if protocol == "topics" and path == "/":
                seen.setdefault(address, []).append(index)
    assert "198.51.100.7" not in seen
    for source in SOURCES:
        assert source in seen, f"no node logged a connection from {source}: {seen}"
        assert seen[source] == [seen[source][0]] * 2, f"{source} reached {seen[source]}"
        stack.routes[source] = seen[source][0]
    assert set(stack.routes.values()) == {0, 1}, f"one node got every client: {stack.routes}"
    assert "127.0.0.1" not in seen  # nginx's own address names no client here


async def test_ywebrtc_browsers_sync_through_nginx(stack: Stack):
    """The published y-webrtc client, in two isolated Chromium contexts, signals through nginx
    (topics on /) and syncs a Yjs document over the WebRTC connection it negotiated."""
    chromium_ready()
    result = await run_node("ywebrtc_browser.mjs", stack.http, timeout=60 * UNIT)
    assert result["synced"] is True and result["value"] == "hello over webrtc", result
    assert result["webrtcPeers"] == [1, 1]


async def test_relay_clients_pipe_through_nginx(stack: Stack):
    """Two @localfirst/relay 4.2.2 clients are introduced on /introduction/{peerId} and talk over
    their piped socket on /connection/..., text and binary frames both ways."""
    node_ready()
    result = await run_node("relay_v4.mjs", stack.ws, timeout=30 * UNIT)
    assert result["ok"], result
    for me, other in (("alice", "bob"), ("bob", "alice")):
        got = result[me]
        assert got["remote"] == other and got["doc"] == result["documentId"]
        assert got["got"] == [
            {"kind": "text", "value": f"hello from {other}"},
            {"kind": "binary", "value": "000102ff"},
        ]


async def test_signal_fire_session_across_nodes_through_nginx(stack: Stack):
    """Signal-Fire on /signal-fire: clients routed to different nodes start a session, accept it,
    and relay an offer; the nodes log the clients' own addresses."""
    a_source, b_source = stack.address_on(0), stack.address_on(1)
    async with session_from(a_source) as a_http, session_from(b_source) as b_http:
        url = stack.ws + "/signal-fire"
        alice = await connect(url, session=a_http, request_timeout=5 * UNIT)
        bob = await connect(url, session=b_http, request_timeout=5 * UNIT)
        try:
            outgoing = await alice.create_session(bob.id)
            incoming = await asyncio.wait_for(bob.next_session(), 5 * UNIT)
            assert incoming.origin == alice.id
            await incoming.accept()
            assert (await outgoing.outcome()).kind is Outcome.ACCEPTED
            offer = {"type": "offer", "sdp": "v=0 through nginx"}
            await alice.send_offer(bob.id, offer)
            signal = await asyncio.wait_for(bob.next_signal(alice.id), 5 * UNIT)
            assert signal.data == {"offer": offer}
        finally:
            await alice.close()
            await bob.close()
    assert ("signalfire", a_source, "/signal-fire") in stack.opened(0)
    assert ("signalfire", b_source, "/signal-fire") in stack.opened(1)


class PollingRoomsClient(RoomsClient):
    """The rooms client of the tests on socket.io's long-polling transport only, from its own
    address."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        super().__init__()
        self.sio = socketio.AsyncClient(reconnection=False, http_session=http)

        @self.sio.on("*")
        async def _any(event: str, *args: Any) -> None:
            self.queues[event].put_nowait(args[0] if len(args) == 1 else list(args))

    async def connect(self, url: str, token: str | None = None, **kwargs: Any) -> RoomsClient:
        auth = {"token": token if token is not None else app_token()}
        await self.sio.connect(url, auth=auth, transports=["polling"], wait_timeout=5 * UNIT)
        self._sid = self.sio.get_sid()
        assert self.sio.transport() == "polling"
        return self


async def test_socketio_long_polling_through_nginx_on_both_nodes(stack: Stack):
    """socket.io long-polling (python-socketio, transports=['polling']) through nginx from a
    client on each node: log in, create a room, and join it across nodes. Every poll and POST of
    a session must reach the node that holds it, which the upstream's hash does."""
    owner_source, joiner_source = stack.address_on(0), stack.address_on(1)
    async with session_from(owner_source) as owner_http, session_from(joiner_source) as joiner_http:
        owner, joiner = PollingRoomsClient(owner_http), PollingRoomsClient(joiner_http)
        try:
            await owner.connect(stack.http)
            await joiner.connect(stack.http)
            await owner.login()
            await joiner.login()
            await create_room(owner, "through-nginx")
            accepted = await join_room(owner, joiner, "through-nginx")
            assert accepted["peers"] == [owner.sid]
            assert (await owner.expect("room-user-join"))["peer_id"] == joiner.sid
        finally:
            # python-engineio's server answers a poll that is pending when its client sends the
            # close packet only when the poll times out (ping interval + timeout, 45 s), and the
            # client's disconnect waits for that poll: end the polls by closing the HTTP sessions
            # first. (Directly against a node it is the same; nginx adds nothing to it.)
            await owner_http.close()
            await joiner_http.close()
            await owner.close()
            await joiner.close()
    # Each session lived on its own node: no request of it reached the other one.
    assert not any("Invalid session" in node.log() for node in stack.nodes)
