"""Signal-Fire WebRTC helpers shared by the single-node and multi-node tests: two aiortc peers
negotiate through polysignal's Python client."""

from __future__ import annotations

import asyncio

from polysignal.client.signalfire import Client, Cmd, Outcome

from rtc import RtcPeer
from support import UNIT


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
