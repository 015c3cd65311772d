"""Behind a proxy (``TRUSTED_PROXIES``, ``PROXY_HEADER``; core/edge.py, server/frontdoor.py):
the client's address through a real nginx, and forwarding headers ignored from anyone else.

Clients connect from their own loopback addresses (127.0.0.2, 127.0.0.3), nginx reaches
polysignal from 127.0.0.1 (``proxy_bind``), and only 127.0.0.1 is trusted, so each client is
counted on its own address exactly as it would be on the internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from polysignal.config import ConfigError, Settings
from polysignal.server.app import create_app
from polysignal.server.rooms import ROOMS_KEY
from polysignal.server.runner import NodeServer
from rooms_client import rooms_settings

from rawws import Raw, request
from support import UNIT, free_port, node_settings, receive_json, running_server, until

pytestmark = pytest.mark.timeout(60)

PROXY = "127.0.0.1"  # nginx's address as polysignal sees it
CLIENT_A = "127.0.0.2"
CLIENT_B = "127.0.0.3"
TOO_MANY = "too many connections from this address\n"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TRUSTED_PROXIES": "10.0.0.0/8, 10.0.0.0/33"},
            "TRUSTED_PROXIES: '10.0.0.0/33' is not an IP network (CIDR)",
        ),
        (
            {"TRUSTED_PROXIES": "nginx"},
            "TRUSTED_PROXIES: 'nginx' is not an IP network (CIDR)",
        ),
        (
            {"PROXY_HEADER": "X-Real-IP"},
            "PROXY_HEADER: expected X-Forwarded-For or Forwarded, got 'X-Real-IP'",
        ),
    ],
)
def test_bad_proxy_settings_are_refused_by_name(env, message):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert str(caught.value) == message


def test_proxy_settings_are_read():
    settings = Settings.from_env(
        {"TRUSTED_PROXIES": "10.1.2.3/8, 2001:db8::/32,192.0.2.1", "PROXY_HEADER": "Forwarded"}
    )
    assert settings.server.trusted_proxies == ("10.0.0.0/8", "2001:db8::/32", "192.0.2.1/32")
    assert settings.server.proxy_header == "forwarded"
    assert Settings().server.trusted_proxies == ()


# --- a real nginx in front of a node ------------------------------------------------------------

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_bind 127.0.0.1;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 1h;
            proxy_buffering off;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


@contextlib.asynccontextmanager
async def nginx(upstream: int) -> AsyncIterator[int]:
    """A real nginx on a free loopback port proxying HTTP and WebSockets to ``upstream``, as
    docs/operations/edge.md configures it; yields its port."""
    binary = nginx_binary()
    if binary is None:
        if os.environ.get("POLYSIGNAL_REQUIRE_ALL") == "1":
            pytest.fail("required for CI: nginx is not installed")
        pytest.skip("nginx is not installed: `apt-get install nginx` (scripts/test does)")
    port = free_port()
    workdir = nginx_config(upstream, port)
    proc = await asyncio.create_subprocess_exec(
        binary,
        *("-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(workdir / "nginx.conf")),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10 * UNIT
        while True:
            if proc.returncode is not None:
                log = (workdir / "error.log").read_text(errors="replace")
                raise AssertionError(f"nginx exited with {proc.returncode}:\n{log}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert loop.time() < deadline, "nginx did not start listening"
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                await asyncio.wait_for(proc.wait(), 10 * UNIT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def nginx_config(upstream: int, port: int) -> Path:
    """A directory with nginx.conf (and room for nginx's files) for one test."""
    workdir = Path(tempfile.mkdtemp(prefix="polysignal-nginx-"))
    workdir.chmod(0o755)  # nginx's worker may run as another user
    (workdir / "nginx.conf").write_text(
        NGINX_CONF.format(dir=workdir, port=port, upstream=upstream)
    )
    return workdir


def client_session(source: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``source`` (a loopback address of its own)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))


UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


async def refused_upgrade(session: aiohttp.ClientSession, url: str, **headers: str) -> Any:
    """An upgrade request that must be refused: (status, body)."""
    async with session.get(url, headers={**UPGRADE, **headers}) as response:
        return response.status, await response.text()


async def test_clients_behind_a_trusted_proxy_are_limited_on_their_own_address(caplog):
    """Through nginx, two clients each get their own MAX_CONNECTIONS_PER_IP (2 here); the
    proxy's own address holds no slot; a client's own X-Forwarded-For claim changes nothing."""
    caplog.set_level(logging.INFO, logger="polysignal")
    settings = node_settings(trusted_proxies=(f"{PROXY}/32",), max_connections_per_ip=2)
    async with (
        running_server(settings) as srv,
        nginx(srv.port) as port,
        client_session(CLIENT_A) as a,
        client_session(CLIENT_B) as b,
    ):
        url = f"http://127.0.0.1:{port}/"
        addresses = srv.node.addresses
        spoof = {"X-Forwarded-For": "198.51.100.7"}  # appended to by nginx: ignored
        a1 = await a.ws_connect(url, headers=spoof)
        a2 = await a.ws_connect(url)
        assert addresses.count(CLIENT_A) == 2
        assert await refused_upgrade(a, url, **spoof) == (429, TOO_MANY)
        b1 = await b.ws_connect(url)
        b2 = await b.ws_connect(url)
        assert await refused_upgrade(b, url) == (429, TOO_MANY)
        held = sorted(conn.address for conn in srv.node.connections)
        assert held == [CLIENT_A, CLIENT_A, CLIENT_B, CLIENT_B]
        assert addresses.count(PROXY) == 0
        assert addresses.count("198.51.100.7") == 0
        # Each client's slots are its own: one closed, that client (only) may connect again.
        await a1.close()
        await until(lambda: addresses.count(CLIENT_A) == 1)
        a3 = await a.ws_connect(url)
        assert addresses.count(CLIENT_A) == 2
        assert await refused_upgrade(b, url) == (429, TOO_MANY)
        for ws in (a2, a3, b1, b2):
            await ws.close()
        await until(lambda: not srv.node.connections)
        assert addresses.count(CLIENT_A) == addresses.count(CLIENT_B) == 0
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert refusals == [f"refused {CLIENT_A}: 2 connections from it"]


async def test_plain_http_through_the_proxy_counts_the_client_too():
    """A request aiohttp serves (a kept-alive connection nginx holds open for a client's
    requests) holds its client's slot, not the proxy's, and ``request.remote`` is the client."""
    settings = node_settings(trusted_proxies=(f"{PROXY}/32",), max_connections_per_ip=1)
    app = create_app(settings)
    seen: list[str | None] = []

    async def whoami(request: web.Request) -> web.Response:
        seen.append(request.remote)
        return web.Response(text=str(request.remote))

    app.router.add_get("/whoami", whoami)
    node_server = NodeServer(app)
    upstream = await node_server.start("127.0.0.1", 0)
    try:
        async with (
            nginx(upstream) as port,
            client_session(CLIENT_A) as a,
            client_session(CLIENT_B) as b,
        ):
            for session, client in ((a, CLIENT_A), (b, CLIENT_B)):
                headers = {"X-Forwarded-For": "198.51.100.7"}
                async with session.get(f"http://127.0.0.1:{port}/whoami", headers=headers) as r:
                    assert (r.status, await r.text()) == (200, client)
        assert seen == [CLIENT_A, CLIENT_B]
    finally:
        await node_server.stop()


async def test_per_address_budgets_follow_the_client_behind_the_proxy():
    """MAX_TOPICS_PER_ADDRESS (2 here) is each client's, not shared through the proxy."""
    settings = node_settings(trusted_proxies=(f"{PROXY}/32",), max_topics_per_address=2)
    async with (
        running_server(settings) as srv,
        nginx(srv.port) as port,
        client_session(CLIENT_A) as a,
        client_session(CLIENT_B) as b,
    ):
        url = f"http://127.0.0.1:{port}/"
        a1, a2, b1 = await a.ws_connect(url), await a.ws_connect(url), await b.ws_connect(url)
        await a1.send_str('{"type":"subscribe","topics":["t1","t2"]}')
        await a2.send_str('{"type":"subscribe","topics":["t3"]}')
        refusal = await receive_json(a2)
        assert refusal == {
            "type": "error",
            "message": "subscribe: 1 topic(s) refused, the connections of one address may hold"
            " at most 2 topics",
        }
        await b1.send_str('{"type":"subscribe","topics":["t1","t2"]}')
        await b1.send_str('{"type":"ping"}')
        assert await receive_json(b1) == {"type": "pong"}  # no error before it
        for ws in (a1, a2, b1):
            await ws.close()


async def test_socketio_sessions_behind_the_proxy_are_counted_per_client():
    """engine.io sessions per address (the rooms protocol) read the client's address too."""
    settings = node_settings(trusted_proxies=(f"{PROXY}/32",), **rooms_settings())
    async with (
        running_server(settings) as srv,
        nginx(srv.port) as port,
        client_session(CLIENT_A) as a,
    ):
        sessions = srv.app[ROOMS_KEY].sessions
        url = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=polling"
        async with a.get(url) as response:
            assert response.status == 200
            handshake = orjson.loads((await response.read())[1:])
        assert sessions.count(CLIENT_A) == 1
        assert sessions.count(PROXY) == 0
        async with a.post(f"{url}&sid={handshake['sid']}", data=b"1") as response:
            assert response.status == 200
        await until(lambda: sessions.count(CLIENT_A) == 0)
        # engine.io's WebSocket, through nginx to aiohttp behind the front door.
        ws_url = f"http://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
        async with a.ws_connect(ws_url) as ws:
            opened = await ws.receive(timeout=5 * UNIT)
            assert opened.type is aiohttp.WSMsgType.TEXT and opened.data.startswith("0{")
            assert sessions.count(CLIENT_A) == 1
            assert srv.node.addresses.count(CLIENT_A) == 1
            assert srv.node.addresses.count(PROXY) == 0
        await until(lambda: sessions.count(CLIENT_A) == 0)


# --- forwarding headers from anyone else --------------------------------------------------------


async def raw_from(source: str, port: int) -> Raw:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return Raw(reader, writer)


@pytest.mark.parametrize("trusted", [(), (f"{PROXY}/32",)])
async def test_an_untrusted_peer_s_forwarding_headers_are_ignored(trusted):
    """From 127.0.0.2 (not trusted), X-Forwarded-For and Forwarded name no one: its own
    address is counted and its third connection is refused, whatever each one claims."""
    settings = node_settings(trusted_proxies=trusted, max_connections_per_ip=2)
    async with running_server(settings) as srv:
        raws = []
        for n in range(3):
            raw = await raw_from(CLIENT_A, srv.port)
            claims = {"X-Forwarded-For": f"198.51.100.{n}", "Forwarded": f"for=203.0.113.{n}"}
            raw.send(request(headers=claims))
            raws.append(raw)
        statuses = [(await raw.response()).status for raw in raws[:2]]
        assert statuses == [101, 101]
        refused = await raws[2].response()
        assert (refused.status, refused.body.decode()) == (429, TOO_MANY)
        assert [conn.address for conn in srv.node.connections] == [CLIENT_A] * 2
        assert srv.node.addresses.count(CLIENT_A) == 2
        for raw in raws:
            await raw.aclose()


async def test_forwarded_is_read_when_configured_and_x_forwarded_for_is_not():
    settings = node_settings(trusted_proxies=(f"{PROXY}/32",), proxy_header="forwarded")
    async with running_server(settings) as srv:
        raw = await raw_from(PROXY, srv.port)
        forwarded = 'for=198.51.100.1, for="[2001:db8::17]:4711";proto=https'
        raw.send(request(headers={"Forwarded": forwarded, "X-Forwarded-For": "203.0.113.1"}))
        assert (await raw.response()).status == 101
        other = await raw_from(PROXY, srv.port)
        other.send(request(headers={"X-Forwarded-For": "203.0.113.1"}))
        assert (await other.response()).status == 101
        await until(lambda: len(srv.node.connections) == 2)
        assert sorted(conn.address for conn in srv.node.connections) == [PROXY, "2001:db8::17"]
        for r in (raw, other):
            await r.aclose()


async def test_a_kept_alive_proxy_connection_moves_its_slot_to_the_next_client():
    """nginx may send several clients' requests on one kept-alive connection: a WebSocket
    asked for on it counts against its own client, and the earlier client's slot is freed."""
    settings = node_settings(trusted_proxies=(f"{PROXY}/32",), max_connections_per_ip=1)
    async with running_server(settings) as srv:
        addresses = srv.node.addresses
        busy = await raw_from(CLIENT_B, srv.port)  # B's one slot, held directly
        busy.send(request())
        assert (await busy.response()).status == 101
        raw = await raw_from(PROXY, srv.port)
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n")
        response = await raw.response()
        assert (response.status, response.body) == (200, b"okay")
        assert addresses.count("198.51.100.1") == 1
        assert addresses.count(PROXY) == 0
        # The next request on it is B's, who has no slot left: refused, the slot stays.
        raw.send(request(headers={"X-Forwarded-For": CLIENT_B}))
        response = await raw.response()
        assert (response.status, response.body.decode()) == (429, TOO_MANY)
        assert addresses.count("198.51.100.1") == 1
        raw.send(request(headers={"X-Forwarded-For": "198.51.100.2"}))
        assert (await raw.response()).status == 101
        await until(lambda: len(srv.node.connections) == 2)
        assert addresses.count("198.51.100.1") == 0
        assert addresses.count("198.51.100.2") == 1
        assert sorted(conn.address for conn in srv.node.connections) == [CLIENT_B, "198.51.100.2"]
        for r in (busy, raw):
            await r.aclose()
        await until(lambda: not srv.node.connections)
        assert addresses.count("198.51.100.2") == addresses.count(CLIENT_B) == 0


async def test_a_trusted_proxy_holds_no_slot_while_its_request_head_is_read():
    """Connections from the proxy are not counted against MAX_CONNECTIONS_PER_IP (1 here) before
    their heads name their clients; one whose head never comes is cut at HEADER_TIMEOUT."""
    settings = node_settings(
        trusted_proxies=(f"{PROXY}/32",), max_connections_per_ip=1, header_timeout=0.5 * UNIT
    )
    async with running_server(settings) as srv:
        raws = [await raw_from(PROXY, srv.port) for _ in range(3)]
        slow = await raw_from(PROXY, srv.port)
        slow.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        await until(lambda: len(srv.door.pending) == 4)
        assert srv.node.addresses.count(PROXY) == 0
        for n, raw in enumerate(raws):
            raw.send(request(headers={"X-Forwarded-For": f"198.51.100.{n}"}))
            assert (await raw.response()).status == 101
        response = await slow.response(timeout=5 * UNIT)
        late = f"the request did not arrive within {settings.server.header_timeout:g}s\n"
        assert (response.status, response.body.decode()) == (408, late)
        assert sorted(conn.address for conn in srv.node.connections) == [
            "198.51.100.0",
            "198.51.100.1",
            "198.51.100.2",
        ]
        assert srv.node.addresses.count(PROXY) == 0
        for raw in [*raws, slow]:
            await raw.aclose()
