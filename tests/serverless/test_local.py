"""`polysignal serverless-local`: the Lambda handler behind a local WebSocket server, driven by
real WebSocket clients, on moto's DynamoDB."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import aiohttp
import orjson
import pytest

from support import UNIT, assert_silent, chromium_ready, free_port, receive_json, run_node

pytestmark = pytest.mark.timeout(60)


async def send(ws: aiohttp.ClientWebSocketResponse, message: dict) -> None:
    await ws.send_str(orjson.dumps(message).decode())


async def sync(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Round-trip a ping: frames of one connection are handled in order."""
    await ws.send_str('{"type":"ping"}')
    assert await receive_json(ws, timeout=5 * UNIT) == {"type": "pong"}


async def wait_until(condition, timeout: float = 5 * UNIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_topics_protocol_through_local_mode(local):
    """Three subscribers: a publish reaches the two others with clients=3; no echo."""
    a, b, c = [await local.ws() for _ in range(3)]
    for ws in (a, b, c):
        await send(ws, {"type": "subscribe", "topics": ["room"]})
        await sync(ws)
    await send(a, {"type": "publish", "topic": "room", "data": {"n": 1}, "extra": "kept"})
    for ws in (b, c):
        got = await receive_json(ws, timeout=5 * UNIT)
        assert got["data"] == {"n": 1} and got["extra"] == "kept" and got["clients"] == 3
    await assert_silent(a)
    await send(b, {"type": "unsubscribe", "topics": ["room"]})
    await sync(b)
    await send(a, {"type": "publish", "topic": "room", "data": 2})
    assert (await receive_json(c, timeout=5 * UNIT))["clients"] == 2
    await assert_silent(b)


async def test_bad_input_gets_error_frames_and_the_connection_stays(local):
    ws = await local.ws()
    await ws.send_str("{nope")
    assert (await receive_json(ws, timeout=5 * UNIT))["message"].startswith("invalid JSON")
    await ws.send_str('{"type":"teleport"}')
    assert (await receive_json(ws, timeout=5 * UNIT))["message"] == "unknown type 'teleport'"
    await ws.send_bytes(b'{"type":"ping"}')
    assert (await receive_json(ws, timeout=5 * UNIT))["message"].startswith("binary frames")
    await ws.send_str('{"type":"subscribe","topics":["' + "x" * 70000 + '"]}')
    assert (await receive_json(ws, timeout=5 * UNIT))["message"].startswith("message too large")
    await sync(ws)


async def test_messages_over_the_api_gateway_limit_close_1009(local):
    ws = await local.ws()
    await ws.send_str("x" * (128 * 1024 + 1))
    msg = await ws.receive(timeout=5 * UNIT)
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 1009


async def test_abrupt_disconnect_removes_every_subscription(local, items):
    """$disconnect runs when a client vanishes without a close frame."""
    keeper, leaver = await local.ws(), await local.ws()
    await send(keeper, {"type": "subscribe", "topics": ["t"]})
    await send(leaver, {"type": "subscribe", "topics": ["t", "u", "v"]})
    await sync(keeper)
    await sync(leaver)
    assert len(items()) == 4
    transport = leaver._response.connection.transport  # cut the TCP connection, no close frame
    transport.abort()
    await wait_until(lambda: len(items()) == 1)
    assert items()[0]["sk"]["S"].startswith("CONNECTION-")
    await send(keeper, {"type": "publish", "topic": "t", "data": 1})
    await sync(keeper)


async def test_plain_http_is_answered(local):
    async with local.session.get(local.url + "/") as resp:
        assert resp.status == 426
    async with local.session.get(local.url + "/healthz") as resp:
        assert resp.status == 200 and await resp.text() == "okay"


async def test_ywebrtc_browsers_sync_through_local_mode(local):
    """The published y-webrtc client in two isolated Chromium contexts, signalled through the
    serverless handler."""
    chromium_ready()
    result = await run_node("ywebrtc_browser.mjs", local.url, timeout=60)
    assert result["synced"] is True
    assert result["webrtcPeers"] == [1, 1]
    assert result["bcPeers"] == [0, 0]


async def test_cli_serves_creates_the_table_and_stops_on_sigterm(moto_url, dynamodb, tmp_path):
    """`polysignal serverless-local --create-table` as a process: table, ping, clean stop."""
    table = f"local-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = {
        **os.environ,
        "TABLE_NAME": table,
        "AWS_DYNAMODB_ENDPOINT": moto_url,
        "AWS_REGION": "us-east-1",
        "LOG_LEVEL": "INFO",
    }
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(key, None)  # local mode signs with placeholder keys when none are set
    log = tmp_path / "serverless-local.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "polysignal", "serverless-local"),
            *("--port", str(port), "--create-table"),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20 * UNIT
            while True:
                assert proc.returncode is None, log.read_text()
                try:
                    ws = await session.ws_connect(f"ws://127.0.0.1:{port}/")
                    break
                except aiohttp.ClientConnectorError:
                    assert time.monotonic() < deadline, "serverless-local did not start"
                    await asyncio.sleep(0.1)
            await send(ws, {"type": "subscribe", "topics": ["t"]})
            await sync(ws)
            assert table in dynamodb.list_tables()["TableNames"]
            ttl = dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
            assert ttl["TimeToLiveStatus"] == "ENABLED"
            assert dynamodb.scan(TableName=table)["Count"] == 1
            proc.send_signal(signal.SIGTERM)
            msg = await ws.receive(timeout=10 * UNIT)
            assert msg.type is aiohttp.WSMsgType.CLOSE and ws.close_code == 1001
        assert await asyncio.wait_for(proc.wait(), 10 * UNIT) == 0, log.read_text()
        assert f"table {table} created" in log.read_text()
        # Closing the connection ran $disconnect.
        assert dynamodb.scan(TableName=table)["Count"] == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        dynamodb.delete_table(TableName=table)
