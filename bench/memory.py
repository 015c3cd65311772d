"""Where an idle topics connection's memory goes: bench/memory.py [--count N].

Serves polysignal in this process (uvloop, memory backend, the benchmark's settings), lets
``loadgen.mjs`` open ``count`` connections each subscribed to its own topic (S3's workload), and
reports per connection:

* the process's RSS growth (what S3 measures), with and without tracemalloc running;
* tracemalloc's growth, grouped by the source file that allocated it;
* the sizes of the objects one connection holds, read with ``sys.getsizeof``.

RSS minus tracemalloc is memory Python's allocator does not see: libuv's handle of each socket
and the allocator's own overhead. Every address is 127.0.0.1; the generator is stopped by its
PID; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))

from polysignal.config import Settings  # noqa: E402
from polysignal.server.app import TOPICS_KEY, create_app  # noqa: E402
from polysignal.server.runner import NodeServer, loop_factory  # noqa: E402

SETTINGS = {"max_connections_per_ip": 20000, "echo": True, "log_level": "WARNING"}


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def category(filename: str) -> str:
    """Which part of the stack an allocation belongs to, by the file that made it."""
    for part in ("core/topics.py", "backends/memory.py", "server/connection.py"):
        if filename.endswith(part):
            return "polysignal " + part
    if "/polysignal/" in filename:
        return "polysignal (other)"
    if "asyncio" in filename or "uvloop" in filename:
        return "event loop and transports (uvloop)"
    return "other: " + Path(filename).name


async def measure(count: int, trace: bool) -> dict[str, object]:
    app = create_app(Settings.of(host="127.0.0.1", port=0, **SETTINGS))
    server = NodeServer(app)
    port = await server.start("127.0.0.1", 0)
    gc.collect()
    if trace:
        tracemalloc.start(1)
        before_trace = tracemalloc.take_snapshot()
    before = rss()
    config = {
        "scenario": "idle",
        "count": count,
        "parallel": 200,
        "urls": [f"ws://127.0.0.1:{port}"],
        "maxSeconds": 120,
    }
    gen = await asyncio.create_subprocess_exec(
        "node",
        str(BENCH / "loadgen.mjs"),
        json.dumps(config),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert gen.stdout is not None and gen.stdin is not None
    try:
        async with asyncio.timeout(150):
            while (line := await gen.stdout.readline()) and line.strip() != b"READY":
                pass
        gc.collect()
        after = rss()
        open_count = len(server.node.connections)
        result: dict[str, object] = {
            "connections": open_count,
            "rss_per_connection": (after - before) / open_count,
        }
        if trace:
            after_trace = tracemalloc.take_snapshot()
            groups: Counter[str] = Counter()
            for stat in after_trace.compare_to(before_trace, "filename"):
                groups[category(stat.traceback[0].filename)] += stat.size_diff
            result["traced_per_connection"] = sum(groups.values()) / open_count
            result["traced_by_part"] = {k: v / open_count for k, v in groups.most_common()}
            result["objects"] = object_sizes(app, server)
            tracemalloc.stop()
        gen.stdin.write(b"done\n")
        await gen.stdin.drain()
        async with asyncio.timeout(30):
            await gen.wait()
    finally:
        if gen.returncode is None:
            gen.kill()
            await gen.wait()
        await server.stop()
    return result


def object_sizes(app: object, server: NodeServer) -> dict[str, int]:
    """The objects one idle, subscribed connection holds, by ``sys.getsizeof``."""
    conn = next(iter(server.node.connections))
    registry = app[TOPICS_KEY].registry  # type: ignore[index]
    (topic,) = registry.topics_of(conn)
    sizes = {
        "Connection object": sys.getsizeof(conn),
        "its floats (token bucket, last report)": sum(
            sys.getsizeof(getattr(conn, name)) for name in ("_tokens", "_last")
        ),
        "its address string": sys.getsizeof(conn.address),
        "transport (uvloop TCPTransport)": sys.getsizeof(conn.transport),
        "topic string": sys.getsizeof(topic),
        "topic -> subscribers set": sys.getsizeof(registry.subscribers(topic)),
        "connection -> topics set": sys.getsizeof(registry.topics_of(conn)),
    }
    connections = len(server.node.connections)
    sizes["share of node.connections (set)"] = sys.getsizeof(server.node.connections) // max(
        1, connections
    )
    sizes["share of the registry's two dicts"] = (
        sys.getsizeof(registry._subscribers) + sys.getsizeof(registry._topics)
    ) // max(1, connections)
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    plain = asyncio.Runner(loop_factory=loop_factory())
    with plain:
        untraced = plain.run(measure(args.count, trace=False))
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        traced = runner.run(measure(args.count, trace=True))
    print(f"{untraced['connections']} idle topics connections, each subscribed to its own topic")
    print(f"RSS per connection: {untraced['rss_per_connection'] / 1024:.2f} KiB")
    print(f"RSS per connection with tracemalloc on: {traced['rss_per_connection'] / 1024:.2f} KiB")
    print(f"traced by Python's allocator: {traced['traced_per_connection']:.0f} bytes")
    for part, size in traced["traced_by_part"].items():  # type: ignore[attr-defined]
        print(f"  {size:8.0f}  {part}")
    print("objects of one connection (sys.getsizeof, bytes):")
    for name, size in traced["objects"].items():  # type: ignore[attr-defined]
        print(f"  {size:8d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
