"""polysignal's TURN credentials against a real coturn (``use-auth-secret``, two secrets).

Credentials come from a running polysignal (``GET /turn-credentials``, the Signal-Fire welcome)
or from ``core/turn.py`` directly for the ones no server would hand out (expired, forged). A TURN
Allocate is done with aioice's TURN client; the WebRTC tests make every ICE candidate a relay
one, so their data channel can only cross through coturn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aioice.ice
import aioice.stun
import aioice.turn
import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription

from coturn import FIRST_SECRET, SECOND_SECRET, Coturn
from polysignal.client.signalfire import connect
from polysignal.config import Secret
from polysignal.core.turn import TurnIssuer
from polysignal.server.turn import TURN_PATH

from support import UNIT, RunningServer, chromium_ready, node_settings, run_node, running_server

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def polysignal(coturn: Coturn, *secrets: str) -> AsyncIterator[RunningServer]:
    """A polysignal node handing out credentials for ``coturn``, signed with ``secrets[0]``."""
    settings = node_settings(
        turn_secret=tuple(Secret(s) for s in secrets or (FIRST_SECRET, SECOND_SECRET)),
        turn_uris=(coturn.uri,),
        turn_ttl=600,
    )
    async with running_server(settings) as srv:
        yield srv


async def fetch_credentials(srv: RunningServer) -> dict[str, Any]:
    async with srv.session.get(srv.url + TURN_PATH) as resp:
        assert resp.status == 200, await resp.text()
        document: dict[str, Any] = await resp.json()
        return document


class _Closing(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.lost = asyncio.Event()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


async def allocate(coturn: Coturn, username: str, password: str) -> tuple[str, int]:
    """A TURN Allocate on ``coturn`` with these credentials: the relayed address it got (the
    allocation is deleted again), or ``aioice.stun.TransactionFailed`` with coturn's error."""
    transport, protocol = await asyncio.wait_for(
        aioice.turn.create_turn_endpoint(
            _Closing, coturn.address, username=username, password=password, lifetime=60
        ),
        10 * UNIT,
    )
    relayed: tuple[str, int] = transport.get_extra_info("sockname")
    transport.close()  # deletes the allocation; then the protocol is told
    await asyncio.wait_for(protocol.lost.wait(), 5 * UNIT)
    return relayed


async def refused(coturn: Coturn, username: str, password: str) -> tuple[int, str]:
    """coturn's error code and reason for an Allocate with these credentials."""
    with pytest.raises(aioice.stun.TransactionFailed) as failure:
        await allocate(coturn, username, password)
    code, reason = failure.value.response.attributes["ERROR-CODE"]
    return int(code), str(reason)


# --- Allocate: valid, expired, forged, rotated ---------------------------------------------------


async def test_credentials_from_the_route_allocate(coturn: Coturn):
    async with polysignal(coturn) as srv:
        document = await fetch_credentials(srv)
    assert document["uris"] == [coturn.uri]
    host, port = await allocate(coturn, document["username"], document["password"])
    assert host == "127.0.0.1" and port > 0


async def test_credentials_from_the_signalfire_welcome_allocate(coturn: Coturn):
    async with polysignal(coturn) as srv:
        client = await connect(srv.ws_url + "/signal-fire", session=srv.session)
        await client.close()
    assert client.configuration is not None
    (entry,) = client.configuration["iceServers"]
    assert entry["urls"] == [coturn.uri]
    host, _ = await allocate(coturn, entry["username"], entry["credential"])
    assert host == "127.0.0.1"


async def test_expired_credential_is_refused(coturn: Coturn):
    issuer = TurnIssuer((FIRST_SECRET,), (coturn.uri,), 60)
    expired = issuer.issue("late", time.time() - 120)  # expired a minute ago
    assert expired.expires < time.time()
    assert await refused(coturn, expired.username, expired.password) == (401, "Unauthorized")
    # The same recipe a moment later allocates: only the expiry was wrong.
    fresh = issuer.issue("late", time.time())
    await allocate(coturn, fresh.username, fresh.password)


async def test_forged_credential_is_refused(coturn: Coturn):
    forged = TurnIssuer(("not-the-secret",), (coturn.uri,), 600).issue("mallory", time.time())
    assert await refused(coturn, forged.username, forged.password) == (401, "Unauthorized")
    # A real username with the password of another one.
    good = TurnIssuer((FIRST_SECRET,), (coturn.uri,), 600).issue("alice", time.time())
    other = TurnIssuer((FIRST_SECRET,), (coturn.uri,), 600).issue("bob", time.time())
    assert await refused(coturn, good.username, other.password) == (401, "Unauthorized")


async def test_rotation_second_secret_allocates_while_both_are_configured(coturn: Coturn):
    """coturn holds both secrets; polysignal signs with the new one put first in TURN_SECRET."""
    assert coturn.secrets == (FIRST_SECRET, SECOND_SECRET)
    async with polysignal(coturn, SECOND_SECRET, FIRST_SECRET) as srv:
        document = await fetch_credentials(srv)
    name = document["username"]
    expires, _, user = name.partition(":")
    by_second = TurnIssuer((SECOND_SECRET,), (coturn.uri,), 600).issue(user, int(expires) - 600)
    assert (by_second.username, by_second.password) == (name, document["password"])
    await allocate(coturn, name, document["password"])
    # And the old one still works for credentials handed out before the switch.
    old = TurnIssuer((FIRST_SECRET,), (coturn.uri,), 600).issue("before", time.time())
    await allocate(coturn, old.username, old.password)


# --- WebRTC through coturn only ------------------------------------------------------------------


@contextlib.contextmanager
def no_host_candidates() -> Iterator[None]:
    """aioice gathers no host candidate: the relay (coturn's) is a peer's only candidate, and
    no pair can bypass the TURN server (aiortc has no ``iceTransportPolicy``)."""
    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: []
    try:
        yield
    finally:
        aioice.ice.get_host_addresses = original


def relay_only(description: RTCSessionDescription) -> RTCSessionDescription:
    """The description with only its relay candidates (there should be no other)."""
    lines = [
        line
        for line in description.sdp.splitlines()
        if not line.startswith("a=candidate:") or " typ relay" in line
    ]
    assert any(" typ relay" in line for line in lines), description.sdp
    return RTCSessionDescription("\r\n".join(lines) + "\r\n", description.type)


def peer(document: dict[str, Any]) -> RTCPeerConnection:
    servers = [
        RTCIceServer(urls=s["urls"], username=s["username"], credential=s["credential"])
        for s in document["iceServers"]
    ]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


def nominated_types(pc: RTCPeerConnection) -> tuple[str, str]:
    """The candidate types (local, remote) of the pair ICE nominated for ``pc``'s data."""
    assert pc.sctp is not None
    connection = pc.sctp.transport.transport._connection  # aioice's Connection
    (pair,) = connection._nominated.values()
    return pair.local_candidate.type, pair.remote_candidate.type


async def test_two_aiortc_peers_connect_through_coturn_only(coturn: Coturn):
    async with polysignal(coturn) as srv:
        docs = [await fetch_credentials(srv), await fetch_credentials(srv)]
    assert docs[0]["username"] != docs[1]["username"]
    with no_host_candidates():
        a, b = peer(docs[0]), peer(docs[1])
        try:
            opened = asyncio.Event()
            received: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            channel = a.createDataChannel("chat")
            channel.on("open", opened.set)

            @b.on("datachannel")
            def _on_channel(incoming: Any) -> None:
                incoming.on("message", lambda m: received.done() or received.set_result(m))

            await a.setLocalDescription(await a.createOffer())
            await b.setRemoteDescription(relay_only(a.localDescription))
            await b.setLocalDescription(await b.createAnswer())
            await a.setRemoteDescription(relay_only(b.localDescription))
            await asyncio.wait_for(opened.wait(), 20 * UNIT)
            channel.send("hello through coturn")
            assert await asyncio.wait_for(received, 10 * UNIT) == "hello through coturn"
            assert nominated_types(a) == ("relay", "relay")
            assert nominated_types(b) == ("relay", "relay")
        finally:
            await a.close()
            await b.close()


@pytest.mark.browser
@pytest.mark.node
@pytest.mark.slow
async def test_two_chromium_pages_with_relay_policy_connect_through_coturn(coturn: Coturn):
    """The Signal-Fire browser client, given ``iceTransportPolicy: 'relay'``, gets its TURN
    credentials from the welcome; the selected pair on both sides is relay to relay."""
    chromium_ready()
    async with polysignal(coturn) as srv:
        result = await run_node("turn_browser.mjs", srv.url, timeout=45 * UNIT)
    assert "error" not in result, result
    assert result["receivedByB"] == "hello through TURN"
    assert result["reply"] == "echo: hello through TURN"
    for side in ("a", "b"):
        assert result[side]["policy"] == "relay"
        assert result[side]["urls"] == [[coturn.uri]]
        pair = result[side]["pair"]
        assert pair["state"] == "succeeded", pair
        assert (pair["local"], pair["remote"]) == ("relay", "relay"), pair
        assert set(result[side]["gathered"]) == {"relay"}
