"""socket.io long-polling under ``--workers 2`` (docs/operations/drain.md, "--workers and
long-polling"): refused at the handshake with engine.io's error, while WebSocket sessions work.

A long-polling session is many HTTP requests, each on whichever worker the kernel hands its
connection to; a session lives in one worker. So a worker refuses the long-polling handshake
with a message that tells the client what to use instead.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import socketio

from polysignal.protocols import rooms as proto
from polysignal.server.workers import POLLING_REFUSED
from rooms_client import PASSWORD, SECRET, RoomsClient, rooms_settings

from support import (
    JS_DIR,
    UNIT,
    NodeProcess,
    node_ready,
    node_settings,
    running_server,
    until_true,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120)]

REFUSAL = {"code": 3, "message": POLLING_REFUSED}
HANDSHAKES = 20
"""Fresh connections per check: the kernel spreads them over both workers."""


@pytest.fixture(scope="module")
def workers(redis_url: str) -> Iterator[NodeProcess]:
    """``polysignal serve --workers 2`` with the rooms protocol on, both workers listening."""
    node_id = f"p{uuid.uuid4().hex[:8]}"
    node = NodeProcess(
        {
            "REDIS_URL": redis_url,
            "SIGNAL_CHANNEL": f"test:{node_id}",
            "NODE_ID": node_id,
            "APP_SECRET": SECRET,
            "APP_PASS": PASSWORD,
        },
        args=["--workers", "2"],
    )
    try:
        node.start()
        asyncio.run(_both_listening(node, node_id))
        yield node
    finally:
        node.stop()


async def _both_listening(node: NodeProcess, node_id: str) -> None:
    async def listening() -> bool:
        text = node.log()
        return all(f"(node {node_id}-{i}, backend" in text for i in (1, 2))

    await until_true(listening, timeout=20 * UNIT)


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session opening a new connection per request."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        yield s


@pytest.mark.parametrize(
    "query", ["EIO=4&transport=polling", "EIO=4"], ids=["transport=polling", "no transport"]
)
async def test_polling_handshake_refused_by_every_worker(workers, fresh, query):
    """Every long-polling handshake, on whichever worker, gets 400 and the JSON error."""
    for _ in range(HANDSHAKES):
        async with fresh.get(f"{workers.url}/socket.io/?{query}") as resp:
            body = await resp.read()
            assert resp.status == 400
            assert resp.content_type == "application/json"
        assert json.loads(body) == REFUSAL
        assert body == (
            b'{"code":3,"message":"Bad request: long-polling is not available with '
            b'--workers > 1; use the websocket transport"}'
        )
    assert "socket.io long-polling is refused under --workers" in workers.log()


async def test_websocket_sessions_work_on_every_worker(workers, fresh):
    """WebSocket handshakes are not refused: each opens an engine.io session; a socket.io
    client on the websocket transport logs in."""
    sids = set()
    for _ in range(HANDSHAKES):
        ws = await fresh.ws_connect(f"{workers.ws_url}/socket.io/?EIO=4&transport=websocket")
        msg = await ws.receive(timeout=5 * UNIT)
        assert msg.type is aiohttp.WSMsgType.TEXT and msg.data.startswith("0{"), msg
        sids.add(json.loads(msg.data[1:])["sid"])
        await ws.close()
    assert len(sids) == HANDSHAKES
    client = await RoomsClient().connect(workers.url)
    try:
        assert await client.login({"name": "ws"})
    finally:
        await client.close()


async def test_python_socketio_client_on_polling_is_told_to_use_websocket(workers):
    """python-socketio's client forced to long-polling fails to connect (400); on the default
    transports it would start with long-polling too, so clients must ask for the websocket."""
    client = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError, match="400"):
        await client.connect(
            workers.url, transports=["polling"], auth={"token": "x"}, wait_timeout=5 * UNIT
        )
    await client.disconnect()


NODE_CLIENT = """
import { io } from 'socket.io-client'
const [url, transport] = process.argv.slice(1)
const socket = io(url, { transports: [transport], reconnection: false, auth: { token: 'x' } })
const done = (result) => {
  socket.disconnect()
  console.log(JSON.stringify(result))
  process.exit(0)
}
socket.on('connect', () => done({ connected: true }))
socket.on('connect_error', (err) => done({
  connected: false,
  message: err.message,
  status: err.description ?? null,
  body: err.context?.responseText ?? null
}))
setTimeout(() => done({ connected: false, message: 'timed out' }), 15000)
"""


async def run_node_client(url: str, transport: str) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        "node",
        "--input-type=module",
        "-e",
        NODE_CLIENT,
        url,
        transport,
        cwd=str(JS_DIR),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30 * UNIT)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    result: dict[str, object] = json.loads(text.strip().splitlines()[-1])
    return result


async def test_published_socketio_client_on_polling_gets_the_error(workers):
    """socket.io-client 4.x (npm) forced to long-polling: connect_error carrying the status and
    the refusal; on the websocket transport it connects (its token is then checked)."""
    node_ready()
    for _ in range(4):  # four fresh clients, likely meeting both workers
        result = await run_node_client(workers.url, "polling")
        assert result == {
            "connected": False,
            "message": "xhr poll error",
            "status": 400,
            "body": json.dumps(REFUSAL, separators=(",", ":")),
        }
    # Over WebSocket the session opens; the forged token is refused by the rooms protocol.
    result = await run_node_client(workers.url, "websocket")
    assert result == {
        "connected": False,
        "message": proto.TOKEN_NOT_VALID,
        "status": None,
        "body": None,
    }


async def test_one_process_still_serves_long_polling():
    """Without --workers a long-polling handshake opens its session as before."""
    async with (
        running_server(node_settings(**rooms_settings())) as srv,
        srv.session.get(f"{srv.url}/socket.io/?EIO=4&transport=polling") as resp,
    ):
        body = await resp.text()
        assert resp.status == 200
        assert body.startswith("0{") and "sid" in json.loads(body[1:])
