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

Ids are claimed with this hub's ``Leases`` as ``core.peerjs.PeerJsNode.claim`` decides: the
claim runs as a generator of the machine's, and the hub performs each operation it yields (a
claim, a look up, a probe of another node, a takeover) and sends the answer back. What a failed
look up or send means, and what is reported of it (a ``Fault``), is the machine's to say too.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable
from functools import partial
from operator import attrgetter
from typing import Any, cast

from polysignal.backends.base import Backend, Claim
from polysignal.backends.lease import PROMPT_ANSWER, Leases, LostHandler
from polysignal.config import PeerJsSettings
from polysignal.core.effects import Close, Fault, Send, ToNode
from polysignal.core.errors import Answer, BackendUnavailable, ClientError
from polysignal.core.peerjs import (
    CLAIM_PREFIX,
    EVICT_KIND,
    PEERS_LIMIT,
    PROBE_KIND,
    PROBED_KIND,
    RELAY_KIND,
    ClaimOp,
    Effect,
    Effects,
    Lookup,
    Notify,
    Op,
    PeerJsNode,
    ProbeOp,
    Release,
    TakeOp,
    Work,
    allowed_origin,
    mount,
)
from polysignal.core.peerjs import Claim as ClaimId
from polysignal.drive import drive
from polysignal.logs import Throttle, more
from polysignal.protocols import peerjs as proto
from polysignal.server.connection import Connection
from polysignal.server.driver import Handler, Handshake, Result
from polysignal.server.executor import Background, DeadlineTimer

log = logging.getLogger("polysignal.peerjs")


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

    def _on_probe(self, origin_node: str, payload: bytes) -> Awaitable[None] | None:
        """Another node asks whether our holder of an id still blocks it."""
        return self._feed(self.machine.on_probe(origin_node, payload, self.timer.now()))

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

    def _at_once(self, effect: Effect) -> None:
        if isinstance(effect, Send):
            cast(Connection, effect.conn).send_text(effect.payload)
        elif isinstance(effect, Close):
            conn = cast(Connection, effect.conn)
            log.debug("%r: closing with %d %s", conn, effect.code, effect.reason)
            conn.close(effect.code, effect.reason)
        elif isinstance(effect, Fault):
            self._cluster_fault(effect.key, effect.what, effect.error)

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
                follow = await self._drive(self.machine.claim(effect, self.timer.now()))
            elif isinstance(effect, Release):
                await self._release(effect)
            elif isinstance(effect, Notify):
                await self._notify(effect)
            else:
                self._at_once(effect)
            if follow:
                queue.extendleft(reversed(follow))
            self._rearm()

    async def _run(self, effects: Effects) -> None:
        result = self._feed(effects)
        if result is not None:
            await result

    # --- claims ---
    async def _drive(self, work: Work) -> Effects:
        """Answer a claim's operations until it returns its effects; a failure of one is
        thrown into it (what it means is the machine's to say)."""
        return await drive(work, self._perform, Exception)

    async def _perform(self, op: Op) -> Any:
        match op:
            case ClaimOp(claim, owner):
                lease = await self.leases.claim(
                    claim.key, owner, on_lost=self._on_lost(claim), answer_within=PROMPT_ANSWER
                )
                return lease is not None
            case Lookup():
                return await self.backend.lookup(op.key)
            case ProbeOp():
                return await self._probe(op)
            case TakeOp(claim, owner, node):
                evict = partial(self._evict, claim.peer_id)
                await self.leases.take(claim.key, evict, owner, on_lost=self._on_lost(claim))
                log.debug("id %s taken over from a stale holder on %s", claim.peer_id, node)
        return None

    def _on_lost(self, claim: ClaimId) -> LostHandler:
        return partial(self._lost, claim.peer_id, claim.token)

    async def _probe(self, op: ProbeOp) -> bool | None:
        """Send the probe and wait (``op.within``) for its answer; None when no node got it."""
        waiting: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._probes[op.ask] = waiting
        try:
            if not await self.backend.send_direct(op.node, PROBE_KIND, op.payload):
                return None
            async with asyncio.timeout(op.within):
                return await waiting
        finally:
            del self._probes[op.ask]

    async def _evict(self, peer_id: str, holder: Claim) -> None:
        """``Leases.take`` released ``holder``'s claim: its socket closes."""
        await self._run(self.machine.on_taken_over(peer_id, holder.node_id, holder.token))

    async def _notify(self, effect: Notify) -> None:
        try:
            await self.backend.send_direct(effect.node, effect.kind, effect.payload)
        except BackendUnavailable as exc:
            log.debug("%s (%s)", effect.what, exc)

    async def _release(self, effect: Release) -> None:
        """Give the id back, if this client's claim still holds it here."""
        lease = self.leases.get(effect.key)
        if lease is None or lease.token != self.machine.lease_owner(effect.token):
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
            return self.machine.on_lookup_error(effect, exc, now())
        return self.machine.on_lookup(effect, None if claim is None else claim.node_id, now())

    async def _to_node(self, effect: ToNode) -> Effects:
        try:
            sent = await self.backend.send_direct(effect.node, effect.kind, effect.payload)
        except Exception as exc:
            return self.machine.on_send_error(effect, exc)
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
        try:
            claimed = await self.backend.claimed(CLAIM_PREFIX, PEERS_LIMIT)
        except BackendUnavailable as exc:
            self._cluster_fault("peers", "cannot list the cluster's ids", exc)
            claimed = []
        return self.machine.peers(claimed)

    def new_id(self) -> str:
        """An id no client of this node holds."""
        return self.machine.new_id()

    def allowed_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` for a request from ``origin``
        (``PEERJS_CORS_ORIGINS``; ``core.peerjs.allowed_origin``)."""
        return allowed_origin(origin, self.settings.peerjs_cors_origins)
