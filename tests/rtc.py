"""Real WebRTC peers (aiortc) for end-to-end signaling tests.

Each protocol's test carries these peers' offer, answer and ICE candidates through polysignal in
that protocol's own messages, then checks that a data-channel message crosses. Candidates are
taken out of the SDP and sent one by one, as trickle-ICE clients (y-webrtc's simple-peer,
browsers) do, so the ICE relay path is exercised too.

ICE gathering is limited to 127.0.0.1 (``loopback_only``): test traffic stays on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import aioice.ice
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from support import UNIT


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Make aioice gather host candidates on 127.0.0.1 only (it skips loopback by default)."""
    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original


def split_candidates(sdp: str) -> tuple[str, list[dict[str, Any]]]:
    """SDP without its ``a=candidate`` lines, and those candidates as RTCIceCandidateInit dicts."""
    lines = sdp.splitlines()
    kept: list[str] = []
    candidates: list[dict[str, Any]] = []
    mid: str | None = None
    mline = -1
    for line in lines:
        if line.startswith("m="):
            mline += 1
        elif line.startswith("a=mid:"):
            mid = line[len("a=mid:") :]
        if line.startswith("a=candidate:"):
            candidates.append(
                {"candidate": line[2:], "sdpMid": mid, "sdpMLineIndex": max(mline, 0)}
            )
        elif line != "a=end-of-candidates":
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", candidates


class RtcPeer:
    """One aiortc RTCPeerConnection with a data channel named ``chat``."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel: RTCDataChannel | None = None
        self.opened = asyncio.Event()
        self.messages: asyncio.Queue[str] = asyncio.Queue()

        @self.pc.on("datachannel")
        def _on_datachannel(channel: RTCDataChannel) -> None:
            self._attach(channel)

    def _attach(self, channel: RTCDataChannel) -> None:
        self.channel = channel

        @channel.on("open")
        def _on_open() -> None:
            self.opened.set()

        @channel.on("message")
        def _on_message(message: Any) -> None:
            self.messages.put_nowait(message if isinstance(message, str) else message.decode())

        if channel.readyState == "open":
            self.opened.set()

    async def offer(self) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """Create the data channel and an offer; return (description, candidates)."""
        self._attach(self.pc.createDataChannel("chat"))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self._local()

    async def answer(self, offer: dict[str, str]) -> tuple[dict[str, str], list[dict[str, Any]]]:
        await self.pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], offer["type"]))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self._local()

    async def accept(self, answer: dict[str, str]) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))

    async def add_candidate(self, init: dict[str, Any]) -> None:
        text = init["candidate"]
        if text.startswith("candidate:"):
            text = text.split(":", 1)[1]
        candidate = candidate_from_sdp(text)
        candidate.sdpMid = init.get("sdpMid")
        candidate.sdpMLineIndex = init.get("sdpMLineIndex")
        await self.pc.addIceCandidate(candidate)

    def _local(self) -> tuple[dict[str, str], list[dict[str, Any]]]:
        desc = self.pc.localDescription
        sdp, candidates = split_candidates(desc.sdp)
        assert candidates, "aiortc gathered no ICE candidate"
        return {"type": desc.type, "sdp": sdp}, candidates

    async def wait_open(self, timeout: float = 15 * UNIT) -> None:
        await asyncio.wait_for(self.opened.wait(), timeout)

    def send(self, text: str) -> None:
        assert self.channel is not None
        self.channel.send(text)

    async def receive(self, timeout: float = 10 * UNIT) -> str:
        return await asyncio.wait_for(self.messages.get(), timeout)

    async def close(self) -> None:
        await self.pc.close()


async def exchange_and_close(a: RtcPeer, b: RtcPeer) -> None:
    """A data-channel message crosses both ways between two connected peers; then both close."""
    a.send("hello from a")
    assert await b.receive() == "hello from a"
    b.send("hello from b")
    assert await a.receive() == "hello from b"
    await a.close()
    await b.close()
