"""What one client address can make a node hold: bench/address_memory.py [--connections N].

Starts ``polysignal serve`` (memory backend, default settings unless overridden with ``--env
NAME=VALUE``) as a subprocess on a free loopback port, measures its RSS, then from 127.0.0.1 opens
``connections`` topics WebSockets that each subscribe to as many distinct topics of the longest
allowed name as the limits let them, and measures the RSS again. Prints the growth per address,
per connection and per accepted subscription as JSON. The server is stopped by its PID; every wait
is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def wait_ready(port: int, deadline: float) -> None:
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start")
            await asyncio.sleep(0.1)


async def fill(
    session: aiohttp.ClientSession, port: int, connections: int, length: int, per_connection: int
) -> dict[str, int]:
    """Open ``connections`` (kept open in ``session``), each subscribing as much as it may."""
    accepted = refused = opened = 0
    kept = []  # a socket nobody holds is collected, and closed
    for index in range(connections):
        try:
            ws = await session.ws_connect(f"ws://127.0.0.1:{port}/")
        except (aiohttp.ClientError, TimeoutError):
            break
        opened += 1
        kept.append(ws)
        topics = [f"{index}-{n}-".ljust(length, "x") for n in range(per_connection)]
        chunk = max(1, 60_000 // (length + 3))  # each subscribe within MAX_FRAME_BYTES
        for start in range(0, len(topics), chunk):
            batch = topics[start : start + chunk]
            await ws.send_str(json.dumps({"type": "subscribe", "topics": batch}))
            await ws.send_str('{"type":"ping"}')
            got = await ws.receive_json(timeout=10)
            if got.get("type") == "error":
                refused += int(got["message"].split()[1])
                await ws.receive_json(timeout=10)  # the pong
        accepted += per_connection
    fill.kept = kept  # type: ignore[attr-defined]
    return {"connections": opened, "subscriptions": accepted - refused, "refused": refused}


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = parser.parse_args()
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "WARNING"}
    env.update(item.split("=", 1) for item in args.env)
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "polysignal", "serve", env=env, cwd=ROOT, stdin=subprocess.DEVNULL
    )
    try:
        await wait_ready(port, time.monotonic() + 30)
        await asyncio.sleep(1)
        before = rss(server.pid)
        length = int(env.get("MAX_TOPIC_LENGTH", "512"))
        per_connection = int(env.get("MAX_TOPICS_PER_CONNECTION", "256"))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            stats = await fill(session, port, args.connections, length, per_connection)
            await asyncio.sleep(1)
            grown = rss(server.pid) - before
        print(
            json.dumps(
                {
                    **stats,
                    "rss_before_bytes": before,
                    "grown_bytes": grown,
                    "per_connection_bytes": grown // max(stats["connections"], 1),
                    "per_subscription_bytes": grown // max(stats["subscriptions"], 1),
                },
                indent=2,
            )
        )
    finally:
        server.terminate()
        try:
            await asyncio.wait_for(server.wait(), 10)
        except TimeoutError:
            server.kill()


if __name__ == "__main__":
    asyncio.run(main())
