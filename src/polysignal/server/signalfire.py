"""Serving the Signal-Fire protocol (docs/protocols/signal-fire.md).

Routing: a WebSocket offering ``Signal-Fire@3`` or ``Signal-Fire@2`` on any path, or any
WebSocket on ``SIGNALFIRE_PATH`` (browsers refuse to offer a subprotocol containing ``@``). The
offered subprotocol is echoed as the client wrote it (the front door does not hold subprotocols
to RFC 6455's token grammar).

The protocol's rules are ``core.signalfire.SignalFireNode``'s: the hub feeds it the driver's
callbacks, direct messages from other nodes and its timer, and carries out the effects it
returns, in order. Writes and closes happen at once, so a request to a local peer needs no task;
the first effect that must wait (a claim, a lookup, a send to another node, a release) turns the
rest into a coroutine, which the driver runs while it holds the connection's later messages.
Work no connection waits for runs in ``Background`` (``server/executor.py``).

What carrying an effect out tells (a claim's answer, a lookup's, a write or send that failed)
goes back to the machine as an event; what a failure means, and what is reported of it (a
``Fault``), is the machine's to say. Ids are claimed with this hub's ``Leases`` under
``signalfire:<id>``: renewed while the socket is open, released when it closes; a lease another
holder took over closes its socket with 1013 ``id taken over``. A claim the backend does not
answer within ``PROMPT_ANSWER`` is served on this node meanwhile, so a hung Redis does not hold
the welcome up. One ``DeadlineTimer`` stands for the machine's ``next_deadline()``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any, cast

from polysignal.backends.base import Backend, Claim
from polysignal.backends.lease import PROMPT_ANSWER, Leases
from polysignal.config import SignalFireSettings
from polysignal.core.effects import Close, Fault, Send, ToNode
from polysignal.core.errors import Answer, BackendUnavailable, CloseCode
from polysignal.core.signalfire import (
    RELAY_KIND,
    UNDELIVERABLE_KIND,
    Effect,
    Effects,
    Lookup,
    Relay,
    Release,
    SignalFireNode,
    serves,
)
from polysignal.core.signalfire import Claim as ClaimId
from polysignal.logs import Throttle, more
from polysignal.protocols import signalfire as proto
from polysignal.server.connection import Connection
from polysignal.server.driver import Handler, Handshake, Result
from polysignal.server.executor import Background, DeadlineTimer

log = logging.getLogger("polysignal.signalfire")

CLIENT_SCRIPT = Path(__file__).resolve().parent.parent / "static" / "client" / "signal-fire.js"
"""The browser client, an ES module with no build step, served at ``CLIENT_SCRIPT_PATH``."""
CLIENT_SCRIPT_PATH = "/client/signal-fire.js"


class SignalFireHub(Handler):
    """This node's Signal-Fire: a ``SignalFireNode`` and what carries out its effects."""

    protocol = "signalfire"
    subprotocols = proto.SUBPROTOCOLS

    def __init__(
        self,
        settings: SignalFireSettings,
        backend: Backend,
        node_id: str,
        *,
        id_lease_ttl: float,
        ice_servers: tuple[dict[str, Any], ...] | None = None,
        ice_at_open: Callable[[str | None], tuple[dict[str, Any], ...]] | None = None,
    ) -> None:
        self.path = settings.signalfire_path
        # Each welcome's own ICE servers, made as its connection opens for a user (TURN
        # credentials: ``server/turn.py``); None: every welcome carries ``ice_servers``.
        self.ice_at_open = ice_at_open
        self.backend = backend
        self.machine = SignalFireNode(
            node_id,
            session_timeout=settings.session_timeout,
            ice_servers=ice_servers,
            is_closing=attrgetter("closing"),
        )
        self.leases = Leases(backend, id_lease_ttl)
        self.background = Background(log)
        self.timer = DeadlineTimer(self.machine.next_deadline, self._fire, self.background)
        self._throttle = Throttle()
        backend.on_direct(RELAY_KIND, self._on_relay)
        backend.on_direct(UNDELIVERABLE_KIND, self._on_undeliverable)

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
        """Signal-Fire by subprotocol on any path, or any WebSocket on the configured path."""
        return serves(request.decoded_path, request.offered, self.path)

    # --- the driver's callbacks ---
    def on_open(self, conn: Connection, request: Handshake) -> Result:
        legacy = request.subprotocol == proto.LEGACY_SUBPROTOCOL
        # The TURN user: None (a random id) until authentication names one.
        user = conn.identity.sub if conn.identity is not None else None
        ice = None if self.ice_at_open is None else self.ice_at_open(user)
        return self._feed(self.machine.on_open(conn, legacy, ice))

    def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
        # ws@7 hands Luce binary frames as Buffers, which JSON.parse reads as text: binary
        # frames are read as JSON too.
        return self._feed(self.machine.on_message(conn, data, self.timer.now()))

    def on_close(self, conn: Connection) -> Result:
        return self._feed(self.machine.on_close(conn))

    def typed_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        received = self.machine.received
        return {str(kind): received.get(kind, 0) for kind in sorted(proto.REQUESTS)}, {}

    def held(self) -> dict[str, int]:
        return {"ids": self.machine.held()}

    def answer(self, conn: Connection, error: Exception) -> Answer:
        return proto.answer(error, self.machine.request_of(conn))

    def rate_limited(self, conn: Connection, data: bytes, binary: bool, report: bool) -> Answer:
        self.background.run(self._feed(self.machine.on_rate_limited(conn, data)))
        return None

    # --- from other nodes, and from the timer and the leases ---
    def _on_relay(self, origin_node: str, payload: bytes) -> Awaitable[None] | None:
        """A relay from a peer on another node to one of ours (a malformed one raises, and the
        backend drops it with a warning)."""
        return self._feed(self.machine.on_relay(origin_node, payload))

    def _on_undeliverable(self, origin_node: str, payload: bytes) -> Awaitable[None] | None:
        """Our peer's relay reached a node where the target had no open socket any more."""
        return self._feed(self.machine.on_undeliverable(payload))

    def _fire(self, now: float) -> Result:
        return self._feed(self.machine.on_timer(now))

    def _lost(self, peer_id: str, holder: Claim | None) -> None:
        """Another holder took the lease of ``peer_id`` over (``Leases`` renewal)."""
        self.background.run(self._feed(self.machine.on_id_lost(peer_id)))

    # --- carrying effects out ---
    def _feed(self, effects: Effects) -> Result:
        """Carry ``effects`` out: at once up to the first that must wait, the rest in the
        coroutine returned. Then make the timer stand for the machine's next deadline."""
        result = self._apply(effects) if effects else None
        self.timer.arm()
        return result

    def _apply(self, effects: Effects) -> Result:
        for index, effect in enumerate(effects):
            if type(effect) is Send:
                cast(Connection, effect.conn).send_text(effect.payload)
            elif type(effect) is Relay:
                if not cast(Connection, effect.conn).send_text(effect.payload):
                    follow = self.machine.on_undelivered(effect)
                    return self._apply([*follow, *effects[index + 1 :]])
            elif type(effect) is Close:
                self._at_once(effect)
            else:
                return self._wait(effects[index:])
        return None

    def _at_once(self, effect: Effect) -> Effects:
        """Carry out an effect that needs no wait (a write, a close, a report of a fault);
        returns the machine's answer to a failed write."""
        if isinstance(effect, Send):
            cast(Connection, effect.conn).send_text(effect.payload)
        elif isinstance(effect, Relay):
            if not cast(Connection, effect.conn).send_text(effect.payload):
                return self.machine.on_undelivered(effect)
        elif isinstance(effect, Close):
            conn = cast(Connection, effect.conn)
            # 1013 is this node's doing (no free id, id taken over); 4400 the client's.
            level = logging.WARNING if effect.code == CloseCode.TRY_AGAIN_LATER else logging.DEBUG
            log.log(level, "%r: closing with %d %s", conn, effect.code, effect.reason)
            conn.close(effect.code, effect.reason)
        elif isinstance(effect, Fault):
            self._cluster_fault(effect.key, effect.what, effect.error)
        return ()

    async def _wait(self, effects: Effects) -> None:
        queue: deque[Effect] = deque(effects)
        while queue:
            effect = queue.popleft()
            if isinstance(effect, ToNode):
                follow = await self._to_node(effect)
            elif isinstance(effect, Lookup):
                follow = await self._lookup(effect)
            elif isinstance(effect, ClaimId):
                follow = await self._claim(effect)
            elif isinstance(effect, Release):
                follow = await self._release(effect)
            else:
                follow = self._at_once(effect)
            if follow:
                queue.extendleft(reversed(follow))
            self.timer.arm()

    async def _claim(self, effect: ClaimId) -> Effects:
        # The welcome never waits long for the cluster: a claim Redis does not answer promptly
        # is served here meanwhile (backends/lease.py).
        cast(Connection, effect.conn).peer_id = effect.peer_id  # for its log lines
        lease = await self.leases.claim(
            effect.key, on_lost=partial(self._lost, effect.peer_id), answer_within=PROMPT_ANSWER
        )
        if lease is None:
            log.debug("id %s is taken; trying another", effect.peer_id)
        return self.machine.on_claimed(effect, lease is not None)

    async def _release(self, effect: Release) -> Effects:
        lease = self.leases.get(effect.key)
        if lease is not None:
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
        return ()

    async def _lookup(self, effect: Lookup) -> Effects:
        try:
            claim = await self.backend.lookup(effect.key)
        except Exception as exc:
            return self.machine.on_lookup_error(effect, exc)
        return self.machine.on_lookup(
            effect, None if claim is None else claim.node_id, self.timer.now()
        )

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
