"""Two real WebRTC peers (aiortc) connect through Signal-Fire with polysignal's Python client."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from polysignal.backends import MemoryBackend, MemoryBus
from polysignal.client.signalfire import Client, Cmd, Outcome, connect

from rtc import RtcPeer, loopback_only
from support import UNIT, node_settings, running_server

pytestmark = pytest.mark.timeout(60)


async def call(caller: Client, callee: Client) -> tuple[RtcPeer, RtcPeer]:
    """The caller starts a session; the callee accepts; offer, answer and trickled candidates
    cross as ``offer``/``answer``/``ice``; returns both peers with their data channel open."""
    a, b = RtcPeer(), RtcPeer()
    async with asyncio.timeout(20 * UNIT):
        session = await caller.create_session(callee.id)
        incoming = await callee.next_session()
        assert incoming.origin == caller.id
        await incoming.accept()
        assert (await session.outcome()).kind is Outcome.ACCEPTED

        offer, a_candidates = await a.offer()
        await caller.send_offer(callee.id, offer)
        for candidate in a_candidates:
            await caller.send_ice(callee.id, candidate)

        got = await callee.next_signal(caller.id)
        assert got.cmd is Cmd.OFFER and got.origin == caller.id
        answer, b_candidates = await b.answer(got.data["offer"])
        for _ in a_candidates:
            ice = await callee.next_signal(caller.id)
            assert ice.cmd is Cmd.ICE
            await b.add_candidate(ice.data["candidate"])
        await callee.send_answer(caller.id, answer)
        for candidate in b_candidates:
            await callee.send_ice(caller.id, candidate)

        got = await caller.next_signal(callee.id)
        assert got.cmd is Cmd.ANSWER
        await a.accept(got.data["answer"])
        for _ in b_candidates:
            await a.add_candidate((await caller.next_signal(callee.id)).data["candidate"])
        await asyncio.gather(a.wait_open(), b.wait_open())
    return a, b


async def exchange(a: RtcPeer, b: RtcPeer) -> None:
    a.send("hello from a")
    assert await b.receive() == "hello from a"
    b.send("hello from b")
    assert await a.receive() == "hello from b"
    await a.close()
    await b.close()


async def test_two_aiortc_peers_through_signal_fire(server):
    """On one node: the caller offers the subprotocol on `/`, the callee uses `/signal-fire`."""
    with loopback_only():
        async with (
            await connect(server.ws_url + "/") as caller,
            await connect(server.ws_url + "/signal-fire", subprotocol=None) as callee,
        ):
            assert caller.configuration is None
            await exchange(*await call(caller, callee))
            assert caller.late_errors == [] and callee.late_errors == []


async def test_two_aiortc_peers_on_two_nodes_of_one_bus():
    """The caller and callee sit on different nodes sharing a backend bus."""
    bus = MemoryBus()
    settings = {"ice_servers": ()}
    with loopback_only():
        async with AsyncExitStack() as stack:
            n1, n2 = [
                await stack.enter_async_context(
                    running_server(node_settings(node_id=n, **settings), MemoryBackend(n, bus))
                )
                for n in ("node-1", "node-2")
            ]
            caller = await stack.enter_async_context(await connect(n1.ws_url + "/"))
            callee = await stack.enter_async_context(await connect(n2.ws_url + "/"))
            assert caller.configuration == {"iceServers": []}
            await exchange(*await call(caller, callee))
