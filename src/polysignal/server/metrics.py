"""``/metrics`` (Prometheus) and ``/stats`` (JSON) of a node, and of every worker of a
``--workers`` process group (docs/operations/metrics.md).

Nothing is counted for metrics alone: the connection, the driver, the hubs and the cluster keep
plain integer attributes on the paths they already take (``server/driver.py``), and the
gauges (topics, rooms, ids held, outbox depth) are read from the hubs when scraped. A scrape
takes a **snapshot** of those numbers, a small JSON-able dict, and ``SnapshotCollector`` turns
snapshots into Prometheus metric families; prometheus-client writes the exposition format.

Workers: each worker process is a node with its own numbers. When the parent sets
``POLYSIGNAL_METRICS_DIR`` (``server/workers.py``, a directory per run under its temp dir),
each worker writes its snapshot there (``<node id>.json``, replaced atomically) every
``PUBLISH_INTERVAL`` and whenever it is scraped; a scrape on any worker (the port is shared,
so the kernel picks one) reads every worker's file and exports each with a ``worker`` label
(the worker's node id). The other workers' numbers are at most ``PUBLISH_INTERVAL`` old. A file
whose process is gone is left out. prometheus-client's multiprocess mode is not used: it covers
its own Counter/Gauge objects, not custom collectors, and those would cost a call per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from polysignal import __version__

if TYPE_CHECKING:
    from polysignal.server.node import Node
    from polysignal.server.rooms import RoomsHub

log = logging.getLogger("polysignal.metrics")

DIR_ENV = "POLYSIGNAL_METRICS_DIR"
"""Set by the parent of ``--workers``: where its workers exchange their snapshots."""

PUBLISH_INTERVAL = 1.0
"""Seconds between a worker's snapshot files (when ``DIR_ENV`` is set)."""

CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 1015}
    | {4000, 4400, 4500, 4999}
)
"""Close codes exported by their number; any other (a client may send 3000-4999) is ``other``,
which keeps the label's values bounded."""

ABNORMAL = 1006
"""A connection that ended without a closing handshake (RFC 6455 §7.1.5)."""

Snapshot = dict[str, Any]


# --- taking a snapshot ---------------------------------------------------------------------------


def take_snapshot(node: Node, rooms: RoomsHub | None = None) -> Snapshot:
    """Every number ``/metrics`` and ``/stats`` show of this process, as plain JSON types."""
    protocols: dict[str, Any] = {}
    for driver in node.drivers():
        handler = driver.handler
        typed_in, typed_out = handler.typed_counts()
        messages_in = dict(typed_in)
        messages_in["other"] = max(0, driver.messages_in - sum(typed_in.values()))
        messages_out = dict(typed_out)
        data_out = driver.frames_out - driver.control_out
        messages_out["other"] = max(0, data_out - sum(typed_out.values()))
        closes: dict[str, int] = {}
        for code, count in driver.close_codes.items():
            code = ABNORMAL if code is None else code
            key = str(code) if code in CLOSE_CODES else "other"
            closes[key] = closes.get(key, 0) + count
        protocols[driver.protocol] = {
            "open": driver.opened - driver.closed_count,
            "opened": driver.opened,
            "messages_in": messages_in,
            "messages_out": messages_out,
            "bytes_in": driver.bytes_in,
            "bytes_out": driver.bytes_out,
            "errors": dict(driver.errors),
            "closes": closes,
            "rate_limited": driver.rate_limited_count,
            "slow_cuts": driver.slow_cuts,
            "held": handler.held(),
        }
    refused = node.addresses.refused
    rooms_held = None
    if rooms is not None:
        sockets, held = rooms.machine.held()
        rooms_held = {"open": sockets, "rooms": held}
        refused += rooms.sessions.refused
    backend = node.backend
    outbox = getattr(backend, "outbox", None)
    entries, outbox_bytes = outbox() if outbox is not None else (0, 0)
    latency = getattr(backend, "publish_latency", None)
    return {
        "node": node.node_id,
        "pid": os.getpid(),
        "started": node.started,
        "time": time.time(),
        "protocols": protocols,
        "rooms": rooms_held,
        "ip_refusals": refused,
        "auth_refusals": node.auth.refused,
        "backend": {
            "scheme": node.settings.backend_scheme,
            "up": bool(backend.ready),
            "reconnects": max(0, getattr(backend, "connects", 1) - 1),
            "dropped_publishes": getattr(backend, "dropped_publishes", 0),
            "outbox_entries": entries,
            "outbox_bytes": outbox_bytes,
            "latency": None
            if latency is None
            else {
                "bounds": list(latency.bounds),
                "counts": list(latency.counts),
                "sum": latency.total,
                "count": latency.count,
            },
        },
    }


# --- snapshots as Prometheus metrics -----------------------------------------------------------


class SnapshotCollector(Collector):
    """Metric families of the snapshots ``source`` returns at each scrape: ``(worker, snapshot)``
    pairs, ``worker`` None for a process that is not one of several workers."""

    def __init__(self, source: Callable[[], list[tuple[str | None, Snapshot]]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.source()))


def families(snapshots: list[tuple[str | None, Snapshot]]) -> list[Metric]:
    """The metric families of ``snapshots`` (see docs/operations/metrics.md for each)."""
    workers = any(worker is not None for worker, _ in snapshots)
    extra = ["worker"] if workers else []

    def counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=[*labels, *extra])

    def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=[*labels, *extra])

    info = gauge(
        "polysignal_info", "Always 1; the node id and version as labels.", ["node", "version"]
    )
    started = gauge("polysignal_start_time_seconds", "When the node started (Unix time).")
    conn_open = gauge("polysignal_connections_open", "Open connections.", ["protocol"])
    conn_total = counter("polysignal_connections", "Connections opened.", ["protocol"])
    msg_in = counter(
        "polysignal_messages_received", "Data messages received.", ["protocol", "type"]
    )
    msg_out = counter("polysignal_messages_sent", "Data messages sent.", ["protocol", "type"])
    bytes_in = counter(
        "polysignal_received_bytes", "WebSocket bytes received, framing included.", ["protocol"]
    )
    bytes_out = counter(
        "polysignal_sent_bytes", "WebSocket bytes written, framing included.", ["protocol"]
    )
    errors = counter(
        "polysignal_errors", "Errors answered, by kind (client, backend, internal).",
        ["protocol", "kind"],
    )  # fmt: skip
    closes = counter(
        "polysignal_closes", "Connections closed, by close code.", ["protocol", "code"]
    )
    rate = counter("polysignal_rate_limited", "Messages refused for the rate limit.", ["protocol"])
    slow = counter(
        "polysignal_slow_consumer_closes", "Peers closed with 1013 for not reading.", ["protocol"]
    )
    refused = counter(
        "polysignal_ip_refusals", "Connections refused 429 for the per-address limit."
    )
    auth = counter(
        "polysignal_auth_refusals",
        "Connections refused for authentication (401, 403, 503; AUTH).",
    )
    topics = gauge("polysignal_topics", "Topics with a subscriber on this node.")
    rooms = gauge("polysignal_rooms", "Rooms with a member on this node.")
    ids = gauge("polysignal_ids", "Peer ids held by this node's clients.", ["protocol"])
    pipes = gauge("polysignal_relay_pipes", "Relay pipe ends open on this node.")
    up = gauge("polysignal_backend_up", "1 while the backend is usable, else 0.", ["backend"])
    reconnects = counter(
        "polysignal_backend_reconnects", "Connections to the backend after the first."
    )
    dropped = counter(
        "polysignal_dropped_publishes", "Cross-node publishes dropped while the backend was away."
    )
    outbox = gauge("polysignal_outbox_entries", "Entries waiting to be written to the backend.")
    outbox_bytes = gauge("polysignal_outbox_bytes", "Bytes waiting to be written to the backend.")
    latency = HistogramMetricFamily(
        "polysignal_publish_latency_seconds",
        "Time from a publish to its write to the backend completing (one publish in 16).",
        labels=extra,
    )
    for worker, snap in snapshots:
        w = [worker] if worker is not None else []
        info.add_metric([snap["node"], __version__, *w], 1)
        started.add_metric(w, snap["started"])
        for protocol, p in snap["protocols"].items():
            conn_open.add_metric([protocol, *w], p["open"])
            conn_total.add_metric([protocol, *w], p["opened"])
            for kind, n in p["messages_in"].items():
                msg_in.add_metric([protocol, kind, *w], n)
            for kind, n in p["messages_out"].items():
                msg_out.add_metric([protocol, kind, *w], n)
            bytes_in.add_metric([protocol, *w], p["bytes_in"])
            bytes_out.add_metric([protocol, *w], p["bytes_out"])
            for kind, n in p["errors"].items():
                errors.add_metric([protocol, kind, *w], n)
            for code, n in p["closes"].items():
                closes.add_metric([protocol, code, *w], n)
            rate.add_metric([protocol, *w], p["rate_limited"])
            slow.add_metric([protocol, *w], p["slow_cuts"])
            held = p["held"]
            if "topics" in held:
                topics.add_metric(w, held["topics"])
            if "ids" in held:
                ids.add_metric([protocol, *w], held["ids"])
            if "pipes" in held:
                pipes.add_metric(w, held["pipes"])
        if snap["rooms"] is not None:
            conn_open.add_metric(["rooms", *w], snap["rooms"]["open"])
            rooms.add_metric(w, snap["rooms"]["rooms"])
        refused.add_metric(w, snap["ip_refusals"])
        auth.add_metric(w, snap.get("auth_refusals", 0))
        b = snap["backend"]
        up.add_metric([b["scheme"], *w], 1 if b["up"] else 0)
        reconnects.add_metric(w, b["reconnects"])
        dropped.add_metric(w, b["dropped_publishes"])
        outbox.add_metric(w, b["outbox_entries"])
        outbox_bytes.add_metric(w, b["outbox_bytes"])
        lat = b["latency"]
        if lat is not None:
            cumulative, buckets = 0, []
            for bound, n in zip([*lat["bounds"], float("inf")], lat["counts"], strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric(w, buckets, lat["sum"])
    return [
        info, started, conn_open, conn_total, msg_in, msg_out, bytes_in, bytes_out, errors,
        closes, rate, slow, refused, auth, topics, rooms, ids, pipes, up, reconnects, dropped,
        outbox, outbox_bytes, latency,
    ]  # fmt: skip


# --- /stats ---------------------------------------------------------------------------------------


def stats_of(snap: Snapshot) -> dict[str, Any]:
    """What ``/stats`` shows of one snapshot."""
    protocols = snap["protocols"]
    connections = {protocol: p["open"] for protocol, p in protocols.items()}
    ids = {protocol: p["held"]["ids"] for protocol, p in protocols.items() if "ids" in p["held"]}
    topics = sum(p["held"].get("topics", 0) for p in protocols.values())
    rooms = snap["rooms"]
    if rooms is not None:
        connections["rooms"] = rooms["open"]
    b = snap["backend"]
    return {
        "node": snap["node"],
        "uptime_seconds": round(snap["time"] - snap["started"], 3),
        "connections": connections,
        "topics": topics,
        "rooms": None if rooms is None else rooms["rooms"],
        "ids": ids,
        "relay_pipes": sum(p["held"].get("pipes", 0) for p in protocols.values()),
        "backend": {
            "scheme": b["scheme"],
            "up": b["up"],
            "reconnects": b["reconnects"],
            "dropped_publishes": b["dropped_publishes"],
            "outbox_entries": b["outbox_entries"],
        },
    }


# --- one process's metrics, and the workers' exchange --------------------------------------------


class Metrics:
    """The ``/metrics`` and ``/stats`` of one node process."""

    def __init__(self, node: Node, rooms: Callable[[], RoomsHub | None]) -> None:
        self.node = node
        self.rooms = rooms
        server = node.settings.server
        self.allow = tuple(ipaddress.ip_network(net) for net in server.metrics_allow)
        self.admin_token = server.admin_token.reveal().encode()
        shared = os.environ.get(DIR_ENV)
        self.directory = Path(shared) if shared else None
        self.file = (
            None
            if self.directory is None
            else self.directory / (re.sub(r"[^A-Za-z0-9._-]", "_", node.node_id) + ".json")
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(self.snapshots))
        self._task: asyncio.Task[None] | None = None

    def snapshot(self) -> Snapshot:
        return take_snapshot(self.node, self.rooms())

    def snapshots(self) -> list[tuple[str | None, Snapshot]]:
        """This process's snapshot, or, among workers, every live worker's (this one's fresh)."""
        own = self.snapshot()
        if self.directory is None:
            return [(None, own)]
        self._write(own)
        found: dict[str, Snapshot] = {own["node"]: own}
        with contextlib.suppress(OSError):
            for path in sorted(self.directory.glob("*.json")):
                if path == self.file:
                    continue
                try:
                    snap = orjson.loads(path.read_bytes())
                except (OSError, orjson.JSONDecodeError):
                    continue  # being replaced, or gone
                if _alive(snap.get("pid")) and snap.get("node") not in found:
                    found[snap["node"]] = snap
        return [(node_id, found[node_id]) for node_id in sorted(found)]

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- the workers' snapshot files ---
    def _write(self, snap: Snapshot) -> None:
        assert self.file is not None
        temporary = self.file.with_suffix(f".{os.getpid()}.tmp")
        try:
            temporary.write_bytes(orjson.dumps(snap))
            os.replace(temporary, self.file)
        except OSError as exc:
            log.debug("cannot write %s: %s", self.file, exc)

    async def _publish(self) -> None:
        while True:
            self._write(self.snapshot())
            await asyncio.sleep(PUBLISH_INTERVAL)

    def start(self) -> None:
        """Among workers: write this worker's snapshot file every ``PUBLISH_INTERVAL``."""
        if self.directory is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._publish())

    async def stop(self) -> None:
        """Stop writing this worker's file, and remove it: a stopped worker has no numbers."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.unlink()

    # --- access ---
    def allowed(self, request: web.BaseRequest) -> bool:
        """Whether the client's address is in ``METRICS_ALLOW``."""
        address = _address(request.remote)
        return address is not None and any(address in net for net in self.allow)

    def authorized(self, request: web.BaseRequest) -> web.Response | None:
        """None when ``request`` may read ``/stats``, else the refusal to answer."""
        if not self.admin_token:
            address = _address(request.remote)
            if address is not None and address.is_loopback:
                return None
            return _plain(403, "Forbidden: /stats answers loopback only (ADMIN_TOKEN is unset)")
        scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.admin_token
        ):
            return None
        response = _plain(401, "Unauthorized: send Authorization: Bearer <ADMIN_TOKEN>")
        response.headers[hdrs.WWW_AUTHENTICATE] = 'Bearer realm="polysignal"'
        return response

    # --- the routes ---
    async def metrics(self, request: web.Request) -> web.Response:
        if not self.allowed(request):
            return _plain(403, "Forbidden: not in METRICS_ALLOW")
        response = web.Response(body=self.render())
        response.headers[hdrs.CONTENT_TYPE] = CONTENT_TYPE_LATEST
        return response

    async def stats(self, request: web.Request) -> web.Response:
        refusal = self.authorized(request)
        if refusal is not None:
            return refusal
        snapshots = self.snapshots()
        own = self.node.node_id
        body: dict[str, Any] = stats_of(next(s for w, s in snapshots if w in (None, own)))
        body["version"] = __version__
        if len(snapshots) > 1 or snapshots[0][0] is not None:
            body["workers"] = [stats_of(snap) for _, snap in snapshots]
        return web.Response(
            body=orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n",
            content_type="application/json",
        )


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _address(remote: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not remote:
        return None
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain")
