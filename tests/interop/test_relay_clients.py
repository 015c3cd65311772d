"""The published relay clients (Node) against polysignal: @localfirst/relay 4.2.2 and
cevitxe-signal-client 0.4.2 discover each other, get piped sockets and talk
(docs/protocols/relay.md).

On one node, and on two in-process nodes sharing a ``MemoryBus`` (the Redis variant with node
processes is in tests/multinode/test_relay_multinode.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from polysignal.backends.memory import MemoryBackend, MemoryBus

from support import RunningServer, node_ready, node_settings, run_node, running_server

pytestmark = [pytest.mark.timeout(60), pytest.mark.node]


def check_v4(result: dict[str, Any]) -> None:
    """Both clients got `peer-connect` for the document and each other's text and binary frame."""
    assert result["ok"], result
    for me, other in (("alice", "bob"), ("bob", "alice")):
        got = result[me]
        assert got["remote"] == other and got["doc"] == result["documentId"]
        assert got["got"] == [
            {"kind": "text", "value": f"hello from {other}"},
            {"kind": "binary", "value": "000102ff"},
        ]


def check_cevitxe(result: dict[str, Any]) -> None:
    """Both clients emitted `peer` for the key and read the other's message on that socket."""
    assert result["ok"], result
    for me, other in (("alice", "bob"), ("bob", "alice")):
        assert result[me] == {"remote": other, "key": result["key"], "got": f"hello from {other}"}


@contextlib.asynccontextmanager
async def two_nodes() -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    bus = MemoryBus()
    async with (
        running_server(node_settings(node_id="n1"), MemoryBackend("n1", bus)) as one,
        running_server(node_settings(node_id="n2"), MemoryBackend("n2", bus)) as two,
    ):
        yield one, two


async def test_localfirst_relay_4_clients_on_one_node(server):
    node_ready()
    check_v4(await run_node("relay_v4.mjs", server.ws_url, timeout=30))


async def test_cevitxe_signal_client_on_one_node(server):
    node_ready()
    check_cevitxe(await run_node("relay_cevitxe.mjs", server.ws_url, timeout=30))


async def test_localfirst_relay_4_clients_on_two_nodes():
    node_ready()
    async with two_nodes() as (one, two):
        check_v4(await run_node("relay_v4.mjs", one.ws_url, two.ws_url, timeout=30))


async def test_cevitxe_signal_client_on_two_nodes():
    node_ready()
    async with two_nodes() as (one, two):
        check_cevitxe(await run_node("relay_cevitxe.mjs", one.ws_url, two.ws_url, timeout=30))


async def test_localfirst_relay_malformed_input_cases(server):
    """@localfirst/relay's own server tests "should not crash when sent malformed data" (4.x) and
    "... malformed JSON" (3.6), with their steps and assertions (tests/js/relay_malformed.mjs):
    a valid Join after garbage still gets an Introduction (docs/protocols/relay.md, "Errors and
    limits")."""
    node_ready()
    result = await run_node("relay_malformed.mjs", server.ws_url, timeout=30)
    assert result["ok"], result
    data = result["cases"]["should not crash when sent malformed data"]
    assert data["message"] == {
        "type": "Introduction",
        "peerId": data["aliceId"],
        "documentIds": [data["documentId"]],
    }
    json = result["cases"]["should not crash when sent malformed JSON"]
    assert json["message"] == {
        "type": "Introduction",
        "userName": json["aliceId"],
        "documentIds": [json["documentId"]],
    }
