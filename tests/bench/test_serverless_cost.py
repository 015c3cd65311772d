"""bench/serverless_cost.py's counts, exactly: if the serverless handler changes what it asks of
DynamoDB or API Gateway, the cost model (docs/serverless.md, "Cost") fails here and must be
looked at again. In-process moto (``mock_aws``): no sockets, no AWS."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serverless_cost.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_serverless_cost", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


cost = _load()


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    figures: dict[str, Any] = cost.measure()
    return figures


def test_subscribe_batches_25_per_call(results: dict[str, Any]) -> None:
    poly = results["subscribe-30"]["polysignal"]
    # 30 topics: one BatchWriteItem of 25 and one of 5, after the gs1 Query of the TTL check.
    assert poly["operations"] == {"BatchWriteItem": 2, "Query": 1}
    assert poly["baseWriteUnits"] == 30 and poly["indexWriteUnits"] == 30
    assert poly["readUnits"] == 0.5
    original = results["subscribe-30"]["original"]
    assert original["operations"] == {"PutItem": 30}
    assert original["writeUnits"] == 60
    one = results["subscribe-1"]["polysignal"]
    assert one["operations"] == {"BatchWriteItem": 1, "Query": 1}
    assert one["writeUnits"] == 2


@pytest.mark.parametrize("n", [1, 10, 100])
def test_publish(results: dict[str, Any], n: int) -> None:
    poly = results[f"publish-{n}"]["polysignal"]
    # gs1 (the sender's own TTLs) + the topic's subscribers; one post per other subscriber.
    assert poly["operations"] == {"Query": 2}
    assert poly["posts"] == n
    assert poly["apiGatewayMessages"] == n + 1
    assert poly["writeUnits"] == 0
    assert poly["lambdaInvocations"] == 1
    original = results[f"publish-{n}"]["original"]
    # One Query; the post goes to every subscriber, the sender too (y-webrtc server.js's way).
    assert original["operations"] == {"Query": 1}
    assert original["posts"] == n + 1
    assert original["apiGatewayMessages"] == n + 2


def test_publish_reads(results: dict[str, Any]) -> None:
    # Strongly consistent Query on the table: 1 RRU per 4 KB; gs1: 0.5.
    assert results["publish-10"]["polysignal"]["readUnits"] == 1.5
    assert results["publish-100"]["polysignal"]["readUnits"] == 2.5
    assert results["publish-100"]["original"]["readUnits"] == 1.0


def test_ping_and_ttl_refresh(results: dict[str, Any]) -> None:
    assert results["ping"]["polysignal"]["operations"] == {"Query": 1}
    assert results["ping"]["original"]["operations"] == {}
    refresh = results["ping-refresh"]["polysignal"]
    assert refresh["operations"] == {"Query": 1, "UpdateItem": 1}
    assert refresh["writeUnits"] == 2  # the item and its gs1 entry


def test_disconnect(results: dict[str, Any]) -> None:
    assert results["disconnect-30"]["polysignal"]["operations"] == {
        "BatchWriteItem": 2,
        "Query": 1,
    }
    assert results["disconnect-30"]["original"]["operations"] == {"DeleteItem": 30, "Query": 1}
    for design in ("polysignal", "original"):
        assert results["disconnect-30"][design]["writeUnits"] == 60
        assert results["connect"][design]["dynamodbCalls"] == 0
        assert results["unsubscribe-1"][design]["writeUnits"] == 2


def test_markdown_has_every_action(results: dict[str, Any]) -> None:
    text = cost.markdown(results)
    for action in cost.ACTIONS:
        assert action.label in text
