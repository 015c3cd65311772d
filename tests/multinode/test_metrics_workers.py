"""``/metrics`` and ``/stats`` under ``--workers 2`` (docs/operations/metrics.md): whichever
worker the kernel hands the scrape to, every worker's numbers are in it, each with its
``worker`` label, and they add up to exactly the traffic the clients made."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from support import UNIT, NodeProcess, receive_json

pytestmark = [pytest.mark.timeout(90), pytest.mark.redis, pytest.mark.slow]

Series = dict[tuple[str, str, str], float]
"""(name, protocol or type label, worker) -> value, for the series the test reads."""


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def per_worker(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> dict[str, float]:
    """``name``'s value for each worker, among the samples with ``labels``."""
    found: dict[str, float] = {}
    for (sample, sample_labels), number in samples.items():
        given = dict(sample_labels)
        if sample == name and all(given.get(k) == v for k, v in labels.items()):
            found[given["worker"]] = number
    return found


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_every_workers_counts_are_scraped_from_any_worker(redis_url, session):
    uid = uuid.uuid4().hex[:10]
    node_id = f"m{uid}"
    workers = {f"{node_id}-1", f"{node_id}-2"}
    node = NodeProcess(
        {
            "REDIS_URL": redis_url,
            "SIGNAL_CHANNEL": f"test:{uid}",
            "NODE_ID": node_id,
            "PING_INTERVAL": "0",
            "SHUTDOWN_TIMEOUT": "2",
        },
        args=["--workers", "2"],
    )

    async def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with session.get(node.url + "/metrics") as response:
            assert response.status == 200
            return parse(await response.text())

    async def scrape_until(check, what: str):  # type: ignore[no-untyped-def]
        for _ in range(int(100 * UNIT)):
            samples = await scrape()
            if check(samples):
                return samples
            await asyncio.sleep(0.05)
        raise AssertionError(f"never scraped {what}: {samples}")

    try:
        node.start()
        before = await scrape_until(
            lambda s: (
                set(per_worker(s, "polysignal_connections_total", protocol="topics")) == workers
            ),
            "both workers",
        )
        start = per_worker(before, "polysignal_connections_total", protocol="topics")
        clients: list[aiohttp.ClientWebSocketResponse] = []
        opened: dict[str, int] = {}
        # The kernel spreads connections over the workers: open them until both have some.
        for _ in range(60):
            ws = await session.ws_connect(node.ws_url + "/w")
            clients.append(ws)
            await ws.send_str(orjson.dumps({"type": "ping"}).decode())
            assert await receive_json(ws) == {"type": "pong"}
            now = await scrape_until(
                lambda s: (
                    sum(per_worker(s, "polysignal_messages_received_total", type="ping").values())
                    == len(clients)
                ),
                f"{len(clients)} pings",
            )
            total = per_worker(now, "polysignal_connections_total", protocol="topics")
            opened = {w: total[w] - start[w] for w in workers}
            if all(opened.values()):
                break
        assert all(opened.values()), opened
        assert sum(opened.values()) == len(clients)
        for ws in clients:
            await ws.close()

        def settled(s: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> bool:
            return per_worker(s, "polysignal_connections_open", protocol="topics") == {
                w: 0 for w in workers
            } and per_worker(s, "polysignal_closes_total", protocol="topics", code="1000") == {
                w: float(opened[w]) for w in workers
            }

        after = await scrape_until(settled, "every close")
        for w in workers:
            assert (
                per_worker(after, "polysignal_messages_received_total", type="ping")[w]
                - per_worker(before, "polysignal_messages_received_total", type="ping").get(w, 0)
                == opened[w]
            )
            assert (
                per_worker(after, "polysignal_messages_sent_total", type="pong")[w]
                - per_worker(before, "polysignal_messages_sent_total", type="pong").get(w, 0)
                == opened[w]
            )
        assert per_worker(after, "polysignal_backend_up", backend="redis") == {
            w: 1.0 for w in workers
        }
        # /stats lists both workers too.
        async with session.get(node.url + "/stats") as response:
            assert response.status == 200
            body = await response.json()
        assert {entry["node"] for entry in body["workers"]} == workers
        assert body["node"] in workers
    finally:
        node.stop()
