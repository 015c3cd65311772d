"""The bus on one Redis against a Redis Cluster of 3 primaries (S20): what one cross-node
publish costs each Redis, so the scaling claim rests on per-shard cost, not on this machine's
wall clock.

Two polysignal backends in this process (node A publishes, node B is subscribed to every topic)
exchange ``--messages`` publishes of ``--size`` bytes round-robin over ``--topics`` topics,
first through one redis-server, then through a fresh 3-primary cluster
(``BACKEND=redis+cluster://``, sharded pub/sub). For each Redis process it reads its CPU time
(``/proc/<pid>/stat``, user + system) and its command counts (``INFO commandstats``) before and
after, and reports per shard: publishes handled, Redis CPU microseconds per publish, and the
share of all publishes. Every Redis listens on 127.0.0.1 only and is stopped by its PID.

    .venv/bin/python bench/shards.py [--messages 20000] [--topics 1000] [--size 1000] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from polysignal.backends import create_backend
from polysignal.config import Settings

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def publishes(port: int) -> int:
    stats = redis.Redis(port=port).info("commandstats")
    return sum(
        int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_publish", "cmdstat_spublish")
    )


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready within {timeout}s")


@contextmanager
def redis_servers(count: int, cluster: bool) -> Iterator[list[tuple[int, int]]]:
    """``count`` redis-server processes on free loopback ports: [(port, pid)]; with ``cluster``,
    made a cluster of ``count`` primaries."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (Debian's redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="polysignal-shards-"))
    procs: list[subprocess.Popen[bytes]] = []
    servers: list[tuple[int, int]] = []
    try:
        for n in range(count):
            port = free_port()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(tmp)]  # fmt: skip
            if cluster:
                args += ["--cluster-enabled", "yes",
                         "--cluster-config-file", str(tmp / f"nodes-{n}.conf")]  # fmt: skip
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            servers.append((port, proc.pid))
            wait_until(lambda p=port: redis.Redis(port=p).ping(), 30, f"redis on {port}")
        if cluster:
            subprocess.run(
                ["redis-cli", "--cluster", "create",
                 *(f"127.0.0.1:{port}" for port, _ in servers), "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for port, _ in servers:
                wait_until(
                    lambda p=port: redis.Redis(port=p).cluster("info")["cluster_state"] == "ok",
                    20,
                    f"cluster state on {port}",
                )
        yield servers
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def exchange(url: str, messages: int, topics: int, size: int) -> float:
    """Node A publishes ``messages`` frames to node B over ``url``; the seconds it took."""
    a = create_backend(Settings.of(backend_url=url, node_id="bench-a"))
    b = create_backend(Settings.of(backend_url=url, node_id="bench-b"))
    received = 0
    done = asyncio.Event()

    def got(topic: str, frame: bytes) -> None:
        nonlocal received
        received += 1
        if received == messages:
            done.set()

    b.on_topic_message(got)
    await a.start()
    await b.start()
    try:
        for _ in range(200):  # connected within 10 s
            if a.ready and b.ready:
                break
            await asyncio.sleep(0.05)
        names = [f"topic-{n}" for n in range(topics)]
        for name in names:
            b.local_count_changed(name, 1)
        await b.sync()
        frame = b"x" * size
        started = time.perf_counter()
        for n in range(messages):
            await a.publish(names[n % topics], frame)
            if n % 5000 == 4999:  # keep the subscriber's Redis output buffer small
                for _ in range(2000):  # at most 20 s
                    if received >= n - 5000:
                        break
                    await asyncio.sleep(0.01)
        try:
            await asyncio.wait_for(done.wait(), 60)
        except TimeoutError:
            dropped = getattr(a, "dropped_publishes", "?")
            raise RuntimeError(f"{received} of {messages} arrived ({dropped} dropped)") from None
        return time.perf_counter() - started
    finally:
        await a.close()
        await b.close()


def measure(label: str, count: int, cluster: bool, args: argparse.Namespace) -> dict[str, Any]:
    with redis_servers(count, cluster) as servers:
        if cluster:
            url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p, _ in servers) + "/"
        else:
            url = f"redis://127.0.0.1:{servers[0][0]}/0"
        before = [(cpu_seconds(pid), publishes(port)) for port, pid in servers]
        seconds = asyncio.run(exchange(url, args.messages, args.topics, args.size))
        after = [(cpu_seconds(pid), publishes(port)) for port, pid in servers]
    shards = []
    for (cpu0, pub0), (cpu1, pub1) in zip(before, after, strict=True):
        handled = pub1 - pub0
        cpu = cpu1 - cpu0
        shards.append(
            {
                "publishes": handled,
                "share": handled / args.messages,
                "cpu_seconds": round(cpu, 3),
                "cpu_us_per_publish": round(cpu / handled * 1e6, 2) if handled else None,
            }
        )
    return {"label": label, "seconds": round(seconds, 3), "shards": shards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not 0 < args.messages <= 1_000_000 or not 0 < args.topics <= 100_000:
        raise SystemExit("--messages 1..1,000,000 and --topics 1..100,000")
    runs = [measure("1 Redis", 1, False, args), measure("cluster, 3 primaries", 3, True, args)]
    print(f"S20: {args.messages} publishes of {args.size} bytes over {args.topics} topics\n")
    print("| bus | shard | publishes | share | Redis CPU s | Redis CPU us per publish |")
    print("|---|---|---:|---:|---:|---:|")
    for run in runs:
        for n, shard in enumerate(run["shards"]):
            print(
                f"| {run['label']} | {n + 1} | {shard['publishes']} | {shard['share']:.1%} | "
                f"{shard['cpu_seconds']} | {shard['cpu_us_per_publish']} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "runs": runs}))


if __name__ == "__main__":
    sys.exit(main())
