"""A Python peer (aiortc) reaches the published ``peerjs`` browser client through a PeerJS server.

The Python side speaks the PeerJS WebSocket protocol itself (``/peerjs?key=&id=&token=``,
messages ``{type, src, dst, payload}``): it offers a data connection with ``serialization:
'raw'``, trickles its candidates, and takes the browser's answer and candidates. The browser page
records every frame its WebSocket sends and receives, so the test shows the payloads cross the
server unchanged both ways, then a data-channel message crosses both ways.

The same test runs against the original server, ``peer`` 1.0.2, which shows the harness is right.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from rtc import RtcPeer, loopback_only
from support import (
    JS_DIR,
    UNIT,
    chromium_ready,
    node_settings,
    running_server,
    two_nodes_on_one_bus,
    until,
)

pytestmark = [pytest.mark.timeout(90), pytest.mark.browser, pytest.mark.node]

FRAME_KEYS = {"type", "src", "dst", "payload"}


@contextlib.asynccontextmanager
async def node_script(script: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``node tests/js/<script> args`` with pipes; killed if still running after the block."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(JS_DIR / script),
        *args,
        cwd=str(JS_DIR),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def json_line(proc: asyncio.subprocess.Process, timeout: float) -> dict[str, Any]:
    """The next stdout line of ``proc`` that is a JSON object (other lines are skipped)."""
    assert proc.stdout is not None
    async with asyncio.timeout(timeout):
        while True:
            line = await proc.stdout.readline()
            assert line, "the script ended without printing a JSON line"
            with contextlib.suppress(orjson.JSONDecodeError):
                value = orjson.loads(line)
                if isinstance(value, dict):
                    return value


@contextlib.asynccontextmanager
async def reference_server() -> AsyncIterator[str]:
    """The original PeerJS server (``peer`` 1.0.2 from tests/js); yields its http base URL."""
    async with node_script("peerjs_reference_server.mjs") as proc:
        started = await json_line(proc, 15 * UNIT)
        yield f"http://127.0.0.1:{started['port']}"
        assert proc.stdin is not None
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), 5 * UNIT)


@contextlib.asynccontextmanager
async def peerjs_servers(kind: str) -> AsyncIterator[tuple[str, str]]:
    """(http base for the browser, http base for the Python peer) of the server kind."""
    if kind == "reference":
        async with reference_server() as url:
            yield url, url
        return
    if kind == "polysignal":
        async with running_server(node_settings(ice_servers=())) as server:
            yield server.url, server.url
        return
    async with two_nodes_on_one_bus(ice_servers=()) as (n1, n2):
        yield n1.url, n2.url


class PeerJsClient:
    """A PeerJS client of our own: one WebSocket, frames ``{type, src, dst, payload}``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, peer_id: str) -> None:
        self.ws = ws
        self.id = peer_id
        self.frames: list[dict[str, Any]] = []
        self.arrived: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(frame).decode())

    async def read_all(self) -> None:
        """Record every frame until the socket closes."""
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = orjson.loads(msg.data)
                self.frames.append(frame)
                self.arrived.put_nowait(frame)

    async def next_of(self, kind: str, timeout: float = 10 * UNIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.arrived.get()
                if frame.get("type") == kind:
                    return frame


def of_type(frames: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("type") == kind]


@pytest.mark.parametrize("kind", ["polysignal", "two-nodes", "reference"])
async def test_aiortc_peer_and_peerjs_browser_exchange_data(kind: str):
    """OFFER/ANSWER/CANDIDATE payloads pass unchanged both ways; "raw" data crosses both ways.

    ``two-nodes``: the browser and the Python peer sit on two polysignal nodes of one backend
    bus. ``reference``: the original ``peer`` 1.0.2 (the harness's own check).
    """
    chromium_ready()
    browser_id = "browser-" + secrets.token_hex(4)
    python_id = "python-" + secrets.token_hex(4)
    connection_id = "dc_" + secrets.token_hex(6)
    rtc = RtcPeer()
    with loopback_only():
        async with (
            peerjs_servers(kind) as (browser_base, python_base),
            node_script("peerjs_aiortc_peer.mjs", browser_base, browser_id) as proc,
            aiohttp.ClientSession() as http,
        ):
            ready = await json_line(proc, 30 * UNIT)
            assert ready["ready"] is True, ready

            url = python_base.replace("http", "ws", 1) + "/peerjs"
            query = {"key": "peerjs", "id": python_id, "token": secrets.token_hex(8)}
            ws = await http.ws_connect(url, params=query)
            client = PeerJsClient(ws, python_id)
            reader = asyncio.create_task(client.read_all())
            try:
                await client.next_of("OPEN")
                assert client.frames[0]["type"] == "OPEN", client.frames

                description, candidates = await rtc.offer()
                offer = {
                    "sdp": description,
                    "type": "data",
                    "connectionId": connection_id,
                    "label": "chat",
                    "reliable": True,
                    "serialization": "raw",
                    "metadata": {"from": "python", "n": [1, 2.5, None, "é"]},
                    "browser": "aiortc",
                }
                await client.send({"type": "OFFER", "dst": browser_id, "payload": offer})
                sent_candidates = [
                    {"candidate": c, "type": "data", "connectionId": connection_id}
                    for c in candidates
                ]
                for payload in sent_candidates:
                    await client.send({"type": "CANDIDATE", "dst": browser_id, "payload": payload})

                answer = await client.next_of("ANSWER")
                assert answer["src"] == browser_id
                assert answer["payload"]["connectionId"] == connection_id
                await rtc.accept(answer["payload"]["sdp"])

                async def add_browser_candidates() -> None:
                    while True:
                        frame = await client.next_of("CANDIDATE", 30 * UNIT)
                        await rtc.add_candidate(frame["payload"]["candidate"])

                adder = asyncio.create_task(add_browser_candidates())
                hello = echo = "(timed out)"  # on a time-out, the browser's state is shown
                try:
                    await rtc.wait_open()
                    hello = await rtc.receive(20 * UNIT)
                    rtc.send("hello from python")
                    echo = hello
                    while echo == "hello from browser":  # repeated until it hears from us
                        echo = await rtc.receive(20 * UNIT)
                except TimeoutError:
                    pass
                finally:
                    adder.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await adder

                assert proc.stdin is not None
                proc.stdin.write(b"done\n")
                await proc.stdin.drain()
                result = await json_line(proc, 15 * UNIT)
                assert "error" not in result, result
                state = {k: result.get(k) for k in ("connections", "received", "events", "logs")}
                assert (hello, echo) == ("hello from browser", "echo: hello from python"), state
                assert result["ending"] == "done"

                # Everything the browser sent reached the Python peer, in order (the last
                # candidates may still be on the way).
                sent = [f for f in result["framesOut"] if f.get("type") != "HEARTBEAT"]
                await until(lambda: len(client.frames) >= len(sent) + 1, 5 * UNIT)
            finally:
                await ws.close()
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                await rtc.close()

    # The browser got the OFFER and the candidates exactly as Python sent them.
    offers = of_type(result["framesIn"], "OFFER")
    assert len(offers) == 1, result["framesIn"]
    assert set(offers[0]) <= FRAME_KEYS, offers[0]
    assert offers[0]["src"] == python_id
    assert offers[0].get("dst", browser_id) == browser_id
    assert offers[0]["payload"] == offer
    got_candidates = [f["payload"] for f in of_type(result["framesIn"], "CANDIDATE")]
    assert got_candidates == sent_candidates
    assert all(f["src"] == python_id for f in of_type(result["framesIn"], "CANDIDATE"))

    # Python got the browser's ANSWER and candidates exactly as the browser sent them.
    for kind_ in ("ANSWER", "CANDIDATE"):
        browser_sent = [f["payload"] for f in of_type(result["framesOut"], kind_)]
        python_got = [f["payload"] for f in of_type(client.frames, kind_)]
        assert browser_sent, f"the browser sent no {kind_}"
        assert python_got == browser_sent, kind_
        assert all(f["src"] == browser_id for f in of_type(client.frames, kind_))
        assert all(f["dst"] == python_id for f in of_type(result["framesOut"], kind_))

    # The browser's DataConnection took the offer's options.
    assert result["connections"] == [
        {
            "peer": python_id,
            "connectionId": connection_id,
            "label": "chat",
            "serialization": "raw",
            "reliable": True,
            "metadata": offer["metadata"],
        }
    ]
    assert result["received"] == ["hello from python"]
