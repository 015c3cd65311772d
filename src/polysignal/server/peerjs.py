"""Serving the PeerJS protocol (docs/protocols/peerjs.md).

Routing: any WebSocket on ``{PEERJS_PATH}peerjs`` (``/peerjs`` by default). The plain HTTP
routes under ``PEERJS_PATH`` (``GET {path}``, ``{path}{key}/id``, ``{path}{key}/peers``) are
aiohttp's, in ``server/app.py``; they ask this hub for ids and the allowed origin.

The protocol's rules are ``core.peerjs.PeerJsNode``'s: the hub feeds it the driver's callbacks,
direct messages from other nodes and its timer, and carries out the effects it returns, in
order. Writes and closes happen at once, so a message to a local client needs no task; the first
effect that must wait (a claim, a lookup, a send to another node, a release) turns the rest into
a coroutine, which the driver runs while it holds the connection's later messages. Work no
connection waits for runs in ``Background`` (``server/executor.py``).

Ids are claimed with this hub's ``Leases`` under ``peerjs:<id>``, with the digest of the
client's token and the node's id as the owner token: the same client on another node takes its
claim over at once, evicting its older socket. A claim held with another token is asked about:
by this node's machine if the holder is here, else by a probe to the holder's node. A holder
that is stale (``holder_live``) or whose node does not receive the probe is taken over
(``Leases.take``: its claim is released and its node told to close its socket); a live one
answers ID-TAKEN. A probe its node does not answer within ``PROBE_TIMEOUT`` counts as live: a
slow node keeps its clients.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable
from functools import partial
from operator import attrgetter
from typing import cast

from polysignal.backends.base import Backend, Claim
from polysignal.backends.lease import PROMPT_ANSWER, Leases
from polysignal.config import PeerJsSettings
from polysignal.core.effects import Close, Send, ToNode
from polysignal.core.errors import Answer, BackendUnavailable, ClientError
from polysignal.core.peerjs import (
    CLAIM_PREFIX,
    EVICT_KIND,
    PROBE_KIND,
    PROBED_KIND,
    RELAY_KIND,
    Effect,
    Effects,
    Lookup,
    PeerJsNode,
    Release,
)
from polysignal.core.peerjs import Claim as ClaimId
from polysignal.logs import Throttle, more
from polysignal.protocols import peerjs as proto
from polysignal.server.connection import Connection
from polysignal.server.driver import Handler, Handshake, Result
from polysignal.server.executor import Background, DeadlineTimer

log = logging.getLogger("polysignal.peerjs")

PROBE_TIMEOUT = 2.0
"""Seconds a claim waits for the holder's node to say whether the holder is live."""
PEERS_LIMIT = 100_000
"""Most ids ``GET {path}{key}/peers`` lists."""
CLAIM_ATTEMPTS = 3
"""Rounds of claim and look up when the holder keeps going away in between."""


def mount(path: str) -> str:
    """``PEERJS_PATH`` as a prefix ending in ``/``: the client appends ``peerjs`` and
    ``{key}/id`` to it."""
    return path.rstrip("/") + "/"


class PeerJsHub(Handler):
    """This node's PeerJS: a ``PeerJsNode`` and what carries out its effects."""

    protocol = "peerjs"

    def __init__(
        self, settings: PeerJsSettings, backend: Backend, node_id: str, *, id_lease_ttl: float
    ) -> None:
        self.settings = settings
        self.prefix = mount(settings.peerjs_path)
        self.ws_path = self.prefix + proto.WS_PATH
        self.backend = backend
        self.machine = PeerJsNode(
            node_id,
            key=settings.peerjs_key,
            concurrent_limit=settings.peerjs_concurrent_limit,
            alive_timeout=settings.peerjs_alive_timeout,
            expire_timeout=settings.peerjs_expire_timeout,
            stale_after=settings.peerjs_stale_after,
            queue_messages=settings.peerjs_queue_messages,
            queue_bytes=settings.peerjs_queue_bytes,
            queue_node_bytes=settings.peerjs_queue_node_bytes,
            is_closing=attrgetter("closing"),
        )
        self.leases = Leases(backend, id_lease_ttl)
        self.background = Background(log)
        self.timer = DeadlineTimer(self.machine.next_deadline, self._fire, self.background)
        self._throttle = Throttle()
        self._asks = itertools.count(1)
        self._probes: dict[int, asyncio.Future[bool]] = {}
        backend.on_direct(RELAY_KIND, self._on_relay)
        backend.on_direct(PROBE_KIND, self._on_probe)
        backend.on_direct(PROBED_KIND, self._on_probed)
        backend.on_direct(EVICT_KIND, self._on_evict)

    # --- lifecycle ---
    async def stop(self) -> None:
        """Stop the timer, the work still running and the lease renewals (the backend then drops
        this node's claims)."""
        self.timer.cancel()
        await self.background.stop()
        await self.leases.close()
        self.machine.clear()

    # --- routing ---
    def matches(self, request: Handshake) -> bool:
        """Any WebSocket on ``{PEERJS_PATH}peerjs``."""
        return request.decoded_path == self.ws_path

    def claimed_id(self, request: Handshake) -> str | None:
        """The id the client asks for (``?id=``); none when it asks for none."""
        return proto.parse_query(request.query).id or None

    # --- the driver's callbacks ---
    def on_open(self, conn: Connection, request: Handshake) -> Result:
        # The id the client asks for, in its log lines (the claim confirms it).
        conn.peer_id = proto.parse_query(request.query).id[: proto.MAX_PARAMETER_LENGTH] or None
        return self._feed(self.machine.on_open(conn, request.query, self.timer.now()))

    def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
        # ws hands the original binary frames as Buffers, which JSON.parse reads as text.
        return self._feed(self.machine.on_message(conn, data, self.timer.now()))

    def on_close(self, conn: Connection) -> Result:
        return self._feed(self.machine.on_close(conn))

    def typed_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        received = self.machine.received
        return {str(kind).lower(): received.get(kind, 0) for kind in proto.MessageType}, {}

    def held(self) -> dict[str, int]:
        return {"ids": self.machine.held()}

    def answer(self, conn: Connection, error: Exception) -> Answer:
        """Bad input is answered by the machine itself; what reaches here is a fault of the
        server: the client hears an ERROR and the socket stays open."""
        if isinstance(error, ClientError):
            return super().answer(conn, error)
        conn.send_text(proto.encode_error("Internal server error"))
        return None

    def rate_limited(self, conn: Connection, data: bytes, binary: bool, report: bool) -> Answer:
        self._feed(self.machine.on_rate_limited(conn, report))
        return None

    # --- from other nodes, the timer and the leases ---
    def _on_relay(self, origin_node: str, payload: bytes) -> Awaitable[None] | None:
        """A frame from a client on another node for one of ours (a malformed one raises, and
        the backend drops it with a warning)."""
        return self._feed(self.machine.on_relay(origin_node, payload, self.timer.now()))

    async def _on_probe(self, origin_node: str, payload: bytes) -> None:
        """Another node asks whether our holder of an id still blocks it."""
        holder = proto.decode_holder(payload)
        live = self.machine.holder_live(holder.id, holder.token, self.timer.now())
        answer = proto.encode_probe_answer(holder.ask, live)
        try:
            await self.backend.send_direct(origin_node, PROBED_KIND, answer)
        except BackendUnavailable as exc:
            log.debug("cannot answer a probe of node %s (%s)", origin_node, exc)

    def _on_probed(self, origin_node: str, payload: bytes) -> None:
        ask, live = proto.decode_probe_answer(payload)
        waiting = self._probes.get(ask)
        if waiting is not None and not waiting.done():
            waiting.set_result(live)

    def _on_evict(self, origin_node: str, payload: bytes) -> Awaitable[None] | None:
        """Another node took one of our holders' ids over."""
        return self._feed(self.machine.on_evict(proto.decode_holder(payload)))

    def _fire(self, now: float) -> Result:
        return self._feed(self.machine.on_timer(now))

    def _lost(self, peer_id: str, token: str, holder: Claim | None) -> None:
        """Another holder took the lease of ``peer_id`` over (``Leases`` renewal)."""
        self.background.run(self._feed(self.machine.on_id_lost(peer_id, token)))

    # --- carrying effects out ---
    def _feed(self, effects: Effects) -> Result:
        """Carry ``effects`` out: at once up to the first that must wait, the rest in the
        coroutine returned. Then, if the machine's next deadline may be sooner, re-arm the
        timer for it."""
        result = None
        if effects:
            first = effects[0]
            if len(effects) == 1 and type(first) is Send:  # a relay: the busiest path
                cast(Connection, first.conn).send_text(first.payload)
            else:
                result = self._apply(effects)
        self._rearm()
        return result

    def _rearm(self) -> None:
        machine = self.machine
        if machine.sooner:
            machine.sooner = False
            self.timer.arm()

    def _apply(self, effects: Effects) -> Result:
        for index, effect in enumerate(effects):
            if type(effect) is Send or type(effect) is Close:
                self._at_once(effect)
            else:
                return self._wait(effects[index:])
        return None

    @staticmethod
    def _at_once(effect: Effect) -> None:
        if isinstance(effect, Send):
            cast(Connection, effect.conn).send_text(effect.payload)
        elif isinstance(effect, Close):
            conn = cast(Connection, effect.conn)
            log.debug("%r: closing with %d %s", conn, effect.code, effect.reason)
            conn.close(effect.code, effect.reason)

    async def _wait(self, effects: Effects) -> None:
        queue: deque[Effect] = deque(effects)
        while queue:
            effect = queue.popleft()
            follow: Effects = ()
            if isinstance(effect, ToNode):
                follow = await self._to_node(effect)
            elif isinstance(effect, Lookup):
                follow = await self._lookup(effect)
            elif isinstance(effect, ClaimId):
                follow = self.machine.on_claimed(effect, await self._claim(effect))
            elif isinstance(effect, Release):
                await self._release(effect)
            else:
                self._at_once(effect)
            if follow:
                queue.extendleft(reversed(follow))
            self._rearm()

    # --- claims ---
    def _lease_token(self, token: str) -> str:
        """The owner token of a claim: the client's token digest and this node, so the same
        client on another node takes its claim over (and its older socket here is evicted)."""
        return f"{token}:{self.machine.node_id}"

    async def _claim(self, effect: ClaimId) -> bool:
        """Claim the id; a holder with another token is asked about and taken over if stale,
        one with the same token (the same client on another node) at once. True when the id
        is the client's."""
        cast(Connection, effect.conn).peer_id = effect.peer_id
        key = effect.key
        token = self._lease_token(effect.token)
        on_lost = partial(self._lost, effect.peer_id, effect.token)
        for _ in range(CLAIM_ATTEMPTS):
            lease = await self.leases.claim(
                key, token, on_lost=on_lost, answer_within=PROMPT_ANSWER
            )
            if lease is not None:
                return True
            try:
                holder = await self.backend.lookup(key)
            except BackendUnavailable as exc:
                self._cluster_fault("lookup", f"cannot look up {effect.peer_id}", exc)
                return False
            if holder is None:
                continue  # released in between
            same = _digest(holder) == effect.token
            if not same and await self._holder_live(effect.peer_id, holder):
                return False
            evict = partial(self._evict, effect.peer_id)
            await self.leases.take(key, evict, token, on_lost=on_lost)
            log.debug("id %s taken over from a stale holder on %s", effect.peer_id, holder.node_id)
            return True
        return False

    async def _holder_live(self, peer_id: str, holder: Claim) -> bool:
        """Whether ``holder`` of ``peer_id`` still blocks it: asked of this node's machine, or
        of the holder's node (a node the probe cannot reach is gone: not live)."""
        if holder.node_id == self.machine.node_id:
            return self.machine.holder_live(peer_id, _digest(holder), self.timer.now())
        ask = next(self._asks)
        waiting: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._probes[ask] = waiting
        try:
            probe = proto.encode_holder(proto.Holder(peer_id, _digest(holder), ask))
            try:
                sent = await self.backend.send_direct(holder.node_id, PROBE_KIND, probe)
            except BackendUnavailable:
                return True  # cannot tell: the holder keeps its id
            if not sent:
                return False
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    return await waiting
            except TimeoutError:
                return True
        finally:
            del self._probes[ask]

    async def _evict(self, peer_id: str, holder: Claim) -> None:
        """``Leases.take`` released ``holder``'s claim: its socket closes."""
        evicted = proto.Holder(peer_id, _digest(holder))
        if holder.node_id == self.machine.node_id:
            await self._run(self.machine.on_evict(evicted))
            return
        try:
            await self.backend.send_direct(holder.node_id, EVICT_KIND, proto.encode_holder(evicted))
        except BackendUnavailable as exc:
            log.debug("cannot tell node %s of its lost id %s (%s)", holder.node_id, peer_id, exc)

    async def _run(self, effects: Effects) -> None:
        result = self._feed(effects)
        if result is not None:
            await result

    async def _release(self, effect: Release) -> None:
        lease = self.leases.get(effect.key)
        if lease is None or lease.token != self._lease_token(effect.token):
            return
        try:
            await self.leases.release(lease)
        except Exception as exc:
            held = self._throttle.allow(("release", type(exc)))  # every id, while Redis is away
            if held is not None:
                log.warning(
                    "cannot release id %s (%s); its lease will expire%s",
                    effect.peer_id,
                    exc,
                    more(held),
                )

    # --- lookups and other nodes ---
    async def _lookup(self, effect: Lookup) -> Effects:
        now = self.timer.now
        try:
            claim = await self.backend.lookup(effect.key)
        except Exception as exc:
            self._cluster_fault("lookup", f"cannot look up {effect.target}", exc)
            return self.machine.on_lookup_failed(effect, now())
        return self.machine.on_lookup(effect, None if claim is None else claim.node_id, now())

    async def _to_node(self, effect: ToNode) -> Effects:
        try:
            sent = await self.backend.send_direct(effect.node, effect.kind, effect.payload)
        except Exception as exc:
            self._cluster_fault("send", f"cannot send {effect.kind} to node {effect.node}", exc)
            sent = False
        return () if sent else self.machine.on_undelivered(effect)

    def _cluster_fault(self, key: str, what: str, exc: Exception) -> None:
        """Asking the cluster failed: a WARNING while its backend is away, else an ERROR (a
        bug); each at most once per interval per ``key``."""
        held = self._throttle.allow((key, isinstance(exc, BackendUnavailable)))
        if held is None:
            return
        if isinstance(exc, BackendUnavailable):
            log.warning("%s (%s)%s", what, exc, more(held))
        else:
            log.error("%s%s", what, more(held), exc_info=exc)

    # --- HTTP ---
    async def peers(self) -> list[str]:
        """Every connected id of the cluster: this node's, and every id claimed elsewhere."""
        ids = dict.fromkeys(self.machine.ids())
        try:
            claimed = await self.backend.claimed(CLAIM_PREFIX, PEERS_LIMIT)
        except BackendUnavailable as exc:
            self._cluster_fault("peers", "cannot list the cluster's ids", exc)
            claimed = []
        ids.update(dict.fromkeys(key[len(CLAIM_PREFIX) :] for key in claimed))
        return list(ids)[:PEERS_LIMIT]

    def new_id(self) -> str:
        """An id no client of this node holds (as the original's ``generateClientId``)."""
        for _ in range(8):
            peer_id = proto.new_id()
            if peer_id not in self.machine:
                return peer_id
        return proto.new_id()  # pragma: no cover - eight UUID collisions in a row

    def allowed_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` for a request from ``origin``, as the ``cors``
        package of the original: the origin echoed when any origin is allowed
        (``PEERJS_CORS_ORIGINS`` empty) or it is on the list; else none."""
        allowed = self.settings.peerjs_cors_origins
        if origin and (not allowed or origin in allowed):
            return origin
        return None


def _digest(holder: Claim) -> str:
    """The client's token digest in a claim's owner token (``PeerJsHub._lease_token``)."""
    return holder.token.partition(":")[0]
