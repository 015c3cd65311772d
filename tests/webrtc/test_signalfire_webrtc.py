"""Two real WebRTC peers (aiortc) connect through Signal-Fire with polysignal's Python client."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest

from polysignal.client.signalfire import connect
from signalfire_rtc import call

from rtc import exchange_and_close, loopback_only
from support import two_nodes_on_one_bus

pytestmark = pytest.mark.timeout(60)


async def test_two_aiortc_peers_through_signal_fire(server):
    """On one node: the caller offers the subprotocol on `/`, the callee uses `/signal-fire`."""
    with loopback_only():
        async with (
            await connect(server.ws_url + "/") as caller,
            await connect(server.ws_url + "/signal-fire", subprotocol=None) as callee,
        ):
            assert caller.configuration is None
            await exchange_and_close(*await call(caller, callee))
            assert caller.late_errors == [] and callee.late_errors == []


async def test_two_aiortc_peers_on_two_nodes_of_one_bus():
    """The caller and callee sit on different nodes sharing a backend bus."""
    with loopback_only():
        async with two_nodes_on_one_bus(ice_servers=()) as (n1, n2), AsyncExitStack() as stack:
            caller = await stack.enter_async_context(await connect(n1.ws_url + "/"))
            callee = await stack.enter_async_context(await connect(n2.ws_url + "/"))
            assert caller.configuration == {"iceServers": []}
            await exchange_and_close(*await call(caller, callee))
