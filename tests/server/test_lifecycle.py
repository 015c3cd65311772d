"""Process lifecycle: the CLI entry point, graceful SIGTERM, liveness pings, log policy."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import aiohttp
import pytest

from support import UNIT, NodeProcess, node_settings, receive_json, running_server

pytestmark = pytest.mark.timeout(60)


async def test_sigterm_closes_peers_with_1001_and_exits_cleanly():
    node = NodeProcess({"BACKEND": "memory://"}).start()
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(node.ws_url + "/")
            await ws.send_str('{"type":"ping"}')
            assert await receive_json(ws) == {"type": "pong"}
            node.send_signal(signal.SIGTERM)
            msg = await ws.receive(timeout=5 * UNIT)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
            assert msg.extra == "server shutting down"
        assert node.proc is not None
        code = await asyncio.to_thread(node.proc.wait, 10 * UNIT)
        assert code == 0
        log = node.log()
        assert "listening on" in log and "shutting down" in log and "stopped" in log
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", node.port), timeout=1).close()
    finally:
        node.stop()


def test_configuration_error_exits_2_naming_the_variable():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "polysignal", "serve"],
        env={"PATH": "", "PORT": "not-a-port"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "PORT" in proc.stderr and "configuration error" in proc.stderr


async def test_peer_that_does_not_answer_pings_is_closed():
    interval = 0.3 * UNIT
    async with running_server(node_settings(ping_interval=interval)) as srv:
        silent = await srv.session.ws_connect(srv.ws_url + "/", autoping=False)
        srv.clients.append(silent)
        live = await srv.ws()
        texts: asyncio.Queue[str] = asyncio.Queue()

        async def read_live() -> None:
            # Reading is what makes the aiohttp client answer pings.
            async for msg in live:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    texts.put_nowait(msg.data)

        reader = asyncio.create_task(read_live())
        closed = False
        for _ in range(40):
            msg = await silent.receive(timeout=3 * UNIT)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                closed = True
                break
            assert msg.type is aiohttp.WSMsgType.PING  # pings arrive, we never answer
        assert closed
        # A peer that answers pings stays connected, past the time a silent one is closed in.
        await asyncio.sleep(2 * interval)
        await live.send_str('{"type":"ping"}')
        assert await asyncio.wait_for(texts.get(), 3 * UNIT) == '{"type":"pong"}'
        await live.close()
        await reader


async def test_debug_log_elides_payloads(caplog):
    caplog.set_level(logging.DEBUG, logger="polysignal")
    async with running_server() as srv:
        ws = await srv.ws()
        await ws.send_str('{"type":"publish","topic":"t","data":"TOP-SECRET-SDP"}')
        await ws.send_str("not json TOP-SECRET-SDP")
        assert (await receive_json(ws))["type"] == "error"
    text = caplog.text
    assert "message <54 bytes>" in text and "message <23 bytes>" in text
    assert "TOP-SECRET-SDP" not in text
