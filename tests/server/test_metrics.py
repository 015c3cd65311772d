"""``/metrics``, ``/stats`` and the connection log lines (docs/operations/metrics.md), on real
server processes with real clients: each scrape is compared with the one before the traffic,
and the counts must have moved by exactly what the clients sent and received."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import UNIT, NodeProcess, free_port, node_settings, receive_json, running_server

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a labelled series not exported yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples that changed, by how much (gauges and timestamps left out)."""
    skip = ("polysignal_start_time_seconds", "polysignal_info")
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if after[key] != before.get(key, 0.0) and key[0] not in skip
    }


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(url + "/metrics") as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return parse(await response.text())


@pytest.fixture
def node() -> Iterator[NodeProcess]:
    """A node process on the memory backend, without pings (their bytes would be counted)."""
    proc = NodeProcess({"PING_INTERVAL": "0", "LOG_LEVEL": "INFO"})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def frame_size(payload: bytes, masked: bool) -> int:
    """Bytes of one WebSocket frame carrying ``payload`` (RFC 6455 §5.2)."""
    n = len(payload)
    header = 2 if n < 126 else 4 if n < 65536 else 10
    return header + (4 if masked else 0) + n


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


async def wait_open(session: aiohttp.ClientSession, url: str, protocol: str, count: int) -> Samples:
    """Scrape until ``protocol`` has ``count`` open connections (a close is seen a moment after
    the client's); the last scrape."""
    samples: Samples = {}
    for _ in range(int(40 * UNIT)):
        samples = await scrape(session, url)
        if value(samples, "polysignal_connections_open", protocol=protocol) == count:
            return samples
        await asyncio.sleep(0.05)
    raise AssertionError(f"{protocol} open connections never reached {count}")


async def test_topics_traffic_moves_the_counts_by_exactly_its_amounts(node, session):
    before = await scrape(session, node.url)
    a = await session.ws_connect(node.ws_url + "/room")
    b = await session.ws_connect(node.ws_url + "/room")
    sent_by_clients: list[bytes] = []
    received: list[bytes] = []

    async def send(ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
        data = orjson.dumps(message)
        sent_by_clients.append(data)
        await ws.send_str(data.decode())

    await send(a, {"type": "subscribe", "topics": ["t"]})
    await send(b, {"type": "subscribe", "topics": ["t"]})
    await send(a, {"type": "ping"})
    msg = await a.receive(timeout=2 * UNIT)
    received.append(msg.data.encode())
    assert orjson.loads(msg.data) == {"type": "pong"}
    for i in range(3):
        await send(a, {"type": "publish", "topic": "t", "data": i})
        msg = await b.receive(timeout=2 * UNIT)
        received.append(msg.data.encode())
        assert orjson.loads(msg.data)["data"] == i
    await send(a, {"type": "nonsense"})  # answered with an error frame: a client error
    msg = await a.receive(timeout=2 * UNIT)
    received.append(msg.data.encode())
    assert orjson.loads(msg.data)["type"] == "error"
    await a.close()
    await b.close()
    after = await wait_open(session, node.url, "topics", 0)
    close_frame = 8  # masked, with code 1000 and no reason
    assert delta(before, after) == {
        key("polysignal_connections_total", protocol="topics"): 2,
        key("polysignal_messages_received_total", protocol="topics", type="subscribe"): 2,
        key("polysignal_messages_received_total", protocol="topics", type="ping"): 1,
        key("polysignal_messages_received_total", protocol="topics", type="publish"): 3,
        key("polysignal_messages_received_total", protocol="topics", type="other"): 1,
        key("polysignal_messages_sent_total", protocol="topics", type="pong"): 1,
        key("polysignal_messages_sent_total", protocol="topics", type="publish"): 3,
        key("polysignal_messages_sent_total", protocol="topics", type="other"): 1,
        key("polysignal_received_bytes_total", protocol="topics"): sum(
            frame_size(data, masked=True) for data in sent_by_clients
        )
        + 2 * close_frame,
        key("polysignal_sent_bytes_total", protocol="topics"): sum(
            frame_size(data, masked=False) for data in received
        ),
        key("polysignal_errors_total", protocol="topics", kind="client"): 1,
        key("polysignal_closes_total", protocol="topics", code="1000"): 2,
    }
    assert value(after, "polysignal_topics") == 0
    assert value(after, "polysignal_backend_up", backend="memory") == 1


async def test_gauges_are_read_from_the_hubs_when_scraped(node, session):
    a = await session.ws_connect(node.ws_url + "/x")
    await a.send_str('{"type":"subscribe","topics":["one","two"]}')
    pipe_a = await session.ws_connect(node.ws_url + "/connection/alice/bob/doc")
    pipe_b = await session.ws_connect(node.ws_url + "/connection/bob/alice/doc")
    intro = await session.ws_connect(node.ws_url + "/introduction/carol")
    for _ in range(int(40 * UNIT)):
        samples = await scrape(session, node.url)
        if value(samples, "polysignal_topics") == 2 and value(samples, "polysignal_relay_pipes"):
            break
        await asyncio.sleep(0.05)
    assert value(samples, "polysignal_topics") == 2
    assert value(samples, "polysignal_relay_pipes") == 2
    assert value(samples, "polysignal_ids", protocol="relay") == 1
    assert value(samples, "polysignal_connections_open", protocol="relay") == 3
    assert value(samples, "polysignal_connections_open", protocol="topics") == 1
    for ws in (a, pipe_a, pipe_b, intro):
        await ws.close()
    samples = await wait_open(session, node.url, "relay", 0)
    assert value(samples, "polysignal_relay_pipes") == 0
    assert value(samples, "polysignal_ids", protocol="relay") == 0


async def test_a_relay_pipe_counts_its_frames(node, session):
    a = await session.ws_connect(node.ws_url + "/connection/a1/b1/doc")
    b = await session.ws_connect(node.ws_url + "/connection/b1/a1/doc")
    await wait_open(session, node.url, "relay", 2)
    before = await scrape(session, node.url)
    frames = [bytes([i]) * (100 + i) for i in range(5)]
    for data in frames:
        await a.send_bytes(data)
    for data in frames:
        msg = await b.receive(timeout=2 * UNIT)
        assert msg.data == data
    after = await scrape(session, node.url)
    assert delta(before, after) == {
        key("polysignal_messages_received_total", protocol="relay", type="pipe"): 5,
        key("polysignal_messages_sent_total", protocol="relay", type="other"): 5,
        key("polysignal_received_bytes_total", protocol="relay"): sum(
            frame_size(d, masked=True) for d in frames
        ),
        key("polysignal_sent_bytes_total", protocol="relay"): sum(
            frame_size(d, masked=False) for d in frames
        ),
    }
    await a.close()
    await b.close()


async def test_a_signal_fire_session_counts_its_requests(node, session):
    before = await scrape(session, node.url)
    a = await session.ws_connect(node.ws_url + "/signal-fire")
    b = await session.ws_connect(node.ws_url + "/signal-fire")
    received = 0
    welcome_a = await receive_json(a)
    welcome_b = await receive_json(b)
    received += 2
    await a.send_str(
        orjson.dumps(
            {"id": "1", "cmd": "session-start", "target": welcome_b["data"]["id"]}
        ).decode()
    )
    reply = await receive_json(a)
    assert reply["id"] == "1" and reply["ok"] is True
    start = await receive_json(b)
    assert start["cmd"] == "session-start"
    received += 2
    await b.send_str(
        orjson.dumps(
            {"id": "2", "cmd": "session-accept", "target": welcome_a["data"]["id"]}
        ).decode()
    )
    reply = await receive_json(b)
    assert reply["id"] == "2" and reply["ok"] is True
    accept = await receive_json(a)
    assert accept["cmd"] == "session-accept"
    received += 2
    during = await scrape(session, node.url)
    assert value(during, "polysignal_ids", protocol="signalfire") == 2
    await a.close()
    await b.close()
    after = await wait_open(session, node.url, "signalfire", 0)
    moved = delta(before, after)
    assert {k: v for k, v in moved.items() if "bytes" not in k[0]} == {
        key("polysignal_connections_total", protocol="signalfire"): 2,
        key("polysignal_messages_received_total", protocol="signalfire", type="session-start"): 1,
        key("polysignal_messages_received_total", protocol="signalfire", type="session-accept"): 1,
        key("polysignal_messages_sent_total", protocol="signalfire", type="other"): received,
        key("polysignal_closes_total", protocol="signalfire", code="1000"): 2,
    }
    assert value(after, "polysignal_ids", protocol="signalfire") == 0


async def test_metrics_allow_refuses_other_addresses(session):
    """A client from 127.0.0.2 (a second loopback address) outside ``METRICS_ALLOW``: 403."""
    proc = NodeProcess({"METRICS_ALLOW": "127.0.0.1/32"})
    proc.start()
    try:
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with (
            aiohttp.ClientSession(connector=connector) as other,
            other.get(proc.url + "/metrics") as response,
        ):
            assert response.status == 403
            assert await response.text() == "Forbidden: not in METRICS_ALLOW\n"
        await scrape(session, proc.url)  # 127.0.0.1 is allowed
    finally:
        proc.stop()


async def test_metrics_port_serves_the_same_numbers(session):
    port = free_port()
    proc = NodeProcess({"METRICS_PORT": str(port)})
    proc.start()
    try:
        ws = await session.ws_connect(proc.ws_url + "/t")
        side = await wait_open(session, f"http://127.0.0.1:{port}", "topics", 1)
        assert value(side, "polysignal_connections_total", protocol="topics") == 1
        await ws.close()
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def stats_node(env: dict[str, str]) -> AsyncIterator[NodeProcess]:
    proc = NodeProcess(env)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def test_stats_without_a_token_answers_loopback_only(session):
    async with stats_node({"TRUSTED_PROXIES": "127.0.0.1/32"}) as proc:
        ws = await session.ws_connect(proc.ws_url + "/t")
        await ws.send_str('{"type":"subscribe","topics":["a","b","c"]}')
        body: dict[str, Any] = {}
        for _ in range(int(40 * UNIT)):
            async with session.get(proc.url + "/stats") as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                body = await response.json()
            if body["topics"] == 3:
                break
            await asyncio.sleep(0.05)
        uptime = body.pop("uptime_seconds")
        assert isinstance(uptime, float) and uptime >= 0
        assert body == {
            "node": proc.node_id,
            "version": body["version"],
            "connections": {"signalfire": 0, "peerjs": 0, "relay": 0, "topics": 1},
            "topics": 3,
            "rooms": None,
            "ids": {"signalfire": 0, "peerjs": 0, "relay": 0},
            "relay_pipes": 0,
            "backend": {
                "scheme": "memory",
                "up": True,
                "reconnects": 0,
                "dropped_publishes": 0,
                "outbox_entries": 0,
            },
        }
        # A client a trusted proxy forwards from elsewhere is not loopback.
        headers = {"X-Forwarded-For": "203.0.113.9"}
        async with session.get(proc.url + "/stats", headers=headers) as response:
            assert response.status == 403
            assert await response.text() == (
                "Forbidden: /stats answers loopback only (ADMIN_TOKEN is unset)\n"
            )
        await ws.close()


async def test_stats_with_a_token_asks_for_it(session):
    async with stats_node({"ADMIN_TOKEN": "s3cret-token"}) as proc:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            async with session.get(proc.url + "/stats", headers=headers) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == 'Bearer realm="polysignal"'
                assert await response.text() == (
                    "Unauthorized: send Authorization: Bearer <ADMIN_TOKEN>\n"
                )
        headers = {"Authorization": "Bearer s3cret-token"}
        async with session.get(proc.url + "/stats", headers=headers) as response:
            assert response.status == 200
            body = await response.json()
        assert body["node"] == proc.node_id
        assert body["connections"]["topics"] == 0
        assert "s3cret-token" not in proc.log()


async def test_connection_lines_carry_their_context(caplog):
    """One INFO line when a WebSocket opens and one when it closes, with the agreed fields."""
    caplog.set_level(logging.INFO, logger="polysignal")
    async with running_server(node_settings(log_level="INFO")) as srv:
        ws = await srv.ws("/introduction/dana")
        await ws.close()
        for _ in range(int(40 * UNIT)):
            if any(
                "closed" in r.getMessage() for r in caplog.records if r.name == "polysignal.relay"
            ):
                break
            await asyncio.sleep(0.05)
    lines = [r for r in caplog.records if r.name == "polysignal.relay"]
    opened, closed = lines[0], lines[-1]
    conn_id = opened.conn_id  # type: ignore[attr-defined]
    assert opened.levelno == closed.levelno == logging.INFO
    assert opened.getMessage() == (
        f"<Connection #{conn_id} relay 127.0.0.1> open on /introduction/dana"
    )
    assert closed.getMessage().startswith(
        f"<Connection #{conn_id} relay 127.0.0.1> closed (code 1000) after "
    )
    for record in (opened, closed):
        assert {
            "conn_id": record.conn_id,  # type: ignore[attr-defined]
            "protocol": record.protocol,  # type: ignore[attr-defined]
            "remote": record.remote,  # type: ignore[attr-defined]
            "peer_id": record.peer_id,  # type: ignore[attr-defined]
        } == {"conn_id": conn_id, "protocol": "relay", "remote": "127.0.0.1", "peer_id": "dana"}


async def test_the_dashboard_and_the_docs_use_the_exported_names(node, session):
    """Every metric the Grafana dashboard queries is exported, and every exported family is
    documented."""
    text = await (await session.get(node.url + "/metrics")).text()
    # Family names: a counter's without ``_total``, a histogram's without its suffixes.
    families = {family.name for family in text_string_to_metric_families(text)}
    dashboard = (ROOT / "deploy" / "grafana-dashboard.json").read_text()
    queried = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for name in re.findall(r"polysignal_[a-z_]+", dashboard)
    }
    assert len(queried) > 10, queried
    assert queried <= families, queried - families
    docs = (ROOT / "docs" / "operations" / "metrics.md").read_text()
    undocumented = {name for name in families if f"`{name}" not in docs}
    assert not undocumented, undocumented
