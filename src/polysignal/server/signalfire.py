"""Serving the Signal-Fire protocol (docs/protocols/signal-fire.md).

Routing: a WebSocket offering ``Signal-Fire@3`` or ``Signal-Fire@2`` on any path, or any
WebSocket on ``SIGNALFIRE_PATH`` (browsers refuse to offer a subprotocol containing ``@``). The
offered subprotocol is echoed as the client wrote it (the front door does not hold subprotocols
to RFC 6455's token grammar).

Ids: each connection gets a nanoid, claimed cluster-wide in the backend under
``signalfire:<id>`` with a lease of ``ID_LEASE_TTL`` seconds that this node renews while the
socket is open, and releases when it closes (afterwards the id is ``Peer Not Found``). A relay to
an id on another node goes through the backend's direct delivery to the node holding the claim.

Order: every accepted request is acked before its relay is written; a relay that turns out to be
undeliverable after the ack (the target's socket closed, its node is gone) gets a second reply
``Peer Offline``, as the original's registry errors arrive after ``ok:true``.

Session timer (polysignal's addition): a ``session-start`` not accepted, rejected or cancelled
within ``SESSION_TIMEOUT`` seconds sends ``session-timeout`` to both sides. The initiator's
node runs the timer (``core.signalfire.PendingSessions``). An initiator that disconnects with
sessions still pending has them cancelled: each target gets ``session-cancel``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from polysignal.core.errors import Answer, CloseCode, Reply
from polysignal.core.signalfire import PendingSessions
from polysignal.protocols import signalfire as proto
from polysignal.protocols.signalfire import Cmd, ErrorText, TargetState
from polysignal.server.connection import Connection
from polysignal.server.driver import Handler, Handshake, Result
from polysignal.server.node import Node

log = logging.getLogger("polysignal.signalfire")

CLAIM_PREFIX = "signalfire:"
RELAY_KIND = "signalfire"
"""Direct message: a relayed frame for a peer connected to the receiving node."""
UNDELIVERABLE_KIND = "signalfire-undeliverable"
"""Direct message back to the requester's node: the relay found no open socket."""
CLIENT_SCRIPT = Path(__file__).resolve().parent.parent / "static" / "client" / "signal-fire.js"
"""The browser client, an ES module with no build step, served at ``CLIENT_SCRIPT_PATH``."""
CLIENT_SCRIPT_PATH = "/client/signal-fire.js"
CLAIM_ATTEMPTS = 3


@dataclass(eq=False, slots=True)
class Peer:
    """One connected Signal-Fire client: its id, the owner token of its claim, its socket."""

    id: str
    token: str
    conn: Connection
    legacy: bool
    claimed: bool = False
    request: proto.MessageId | None = None  # the request being handled, for its error reply

    @property
    def key(self) -> str:
        return CLAIM_PREFIX + self.id


class SignalFireHub(Handler):
    """This node's Signal-Fire peers, pending sessions, and relays to and from other nodes."""

    protocol = "signalfire"
    subprotocols = proto.SUBPROTOCOLS

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self.backend = node.backend
        self.peers: dict[str, Peer] = {}
        self.pending: PendingSessions[asyncio.TimerHandle] = PendingSessions()
        self.ttl = max(1, self.settings.server.id_lease_ttl)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self.backend.on_direct(RELAY_KIND, self._on_relay)
        self.backend.on_direct(UNDELIVERABLE_KIND, self._on_undeliverable)

    # --- lifecycle ---
    async def start(self) -> None:
        self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def stop(self) -> None:
        """Stop renewing leases and every session timer (the backend then drops our claims)."""
        tasks = [*self._tasks, *([self._renewer] if self._renewer else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for handle in self.pending.clear():
            handle.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- routing ---
    def matches(self, request: Handshake) -> bool:
        """Signal-Fire by subprotocol on any path, or any WebSocket on the configured path."""
        path = request.path
        if "%" in path:
            path = unquote(path)
        if path == self.settings.signalfire.signalfire_path:
            return True
        return any(offered in proto.SUBPROTOCOLS for offered in request.offered)

    # --- the driver's callbacks ---
    def on_open(self, conn: Connection, request: Handshake) -> Result:
        return self._open(conn, request.subprotocol == proto.LEGACY_SUBPROTOCOL)

    async def _open(self, conn: Connection, legacy: bool) -> None:
        peer = await self._register(conn, legacy)
        if peer is None:
            conn.close(CloseCode.TRY_AGAIN_LATER, "no free id")
            return
        conn.state = peer
        conn.send_text(proto.encode_welcome(peer.id, self.settings.server.ice_servers))

    def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
        # ws@7 hands Luce binary frames as Buffers, which JSON.parse reads as text: binary
        # frames are read as JSON too.
        peer: Peer | None = conn.state
        parsed = proto.decode(data)  # CloseRequest: closed with 4400 by ``answer``
        if isinstance(parsed, proto.Ignored):
            # Unknown commands get no reply at all (docs/protocols/signal-fire.md).
            return None
        if peer is None:
            return None  # its id claim failed and it is closing
        peer.request = parsed.id
        return self._request(peer, parsed)

    def on_close(self, conn: Connection) -> Result:
        peer: Peer | None = conn.state
        return None if peer is None else self._unregister(peer)

    def answer(self, conn: Connection, error: Exception) -> Answer:
        peer: Peer | None = conn.state
        return proto.answer(error, None if peer is None else peer.request)

    def rate_limited(self, conn: Connection, data: bytes, binary: bool, report: bool) -> Answer:
        parsed = proto.decode(data)
        if isinstance(parsed, proto.Ignored):
            return None
        return Reply(proto.encode_error(parsed.id, ErrorText.RATE_LIMITED))

    async def _register(self, conn: Connection, legacy: bool) -> Peer | None:
        """Pick an id and claim it cluster-wide; None if every attempt collided."""
        token = secrets.token_urlsafe(16)
        for _ in range(CLAIM_ATTEMPTS):
            peer = Peer(proto.new_id(), token, conn, legacy)
            if peer.id in self.peers:
                continue
            # Known locally before the claim exists, so the claim never points at nothing here.
            self.peers[peer.id] = peer
            try:
                peer.claimed = await self.backend.claim(peer.key, token, self.ttl)
            except Exception as exc:
                # Backend down: serve the peer locally; the renew loop claims the id later.
                log.warning("cannot claim id %s (%s); serving it locally for now", peer.id, exc)
                return peer
            except BaseException:
                del self.peers[peer.id]
                raise
            if peer.claimed:
                log.debug("%r is %s", conn, peer.id)
                return peer
            del self.peers[peer.id]
        log.warning("%r: %d id claims collided; refusing", conn, CLAIM_ATTEMPTS)
        return None

    async def _unregister(self, peer: Peer) -> None:
        if self.peers.get(peer.id) is peer:
            del self.peers[peer.id]
        for target, handle in self.pending.drop_initiator(peer.id):
            handle.cancel()
            await self._route(target, proto.notice(Cmd.SESSION_CANCEL, peer.id))
        try:
            await self.backend.release(peer.key, peer.token)
        except Exception as exc:
            log.warning("cannot release id %s (%s); its lease will expire", peer.id, exc)

    def _request(self, peer: Peer, request: proto.Request) -> Result:
        """Check, ack and relay one request; a coroutine only when the target must be looked
        up in the cluster or the relay goes to another node."""
        error = proto.precheck(request, peer.id)
        if error is not None:
            self._refuse(peer, request, error)
            return None
        located = self._locate_here(request.target)
        if located is None:
            return self._request_elsewhere(peer, request)
        return self._relay(peer, request, located, None)

    async def _request_elsewhere(self, peer: Peer, request: proto.Request) -> None:
        # BackendUnavailable (the registry of other nodes' ids is unreachable for now) is
        # answered by ``answer``, before any ack.
        claim = await self.backend.lookup(CLAIM_PREFIX + request.target)
        if claim is None or claim.node_id == self.node.node_id:
            state, node_id = TargetState.NOT_FOUND, None
        else:
            state, node_id = TargetState.ONLINE, claim.node_id
        relayed = self._relay(peer, request, state, node_id)
        if relayed is not None:
            await relayed

    def _refuse(self, peer: Peer, request: proto.Request, error: ErrorText) -> None:
        log.debug("%r %s: %s", peer.conn, request.cmd, error)
        peer.conn.send_text(proto.encode_error(request.id, error))

    def _relay(
        self, peer: Peer, request: proto.Request, state: TargetState, node_id: str | None
    ) -> Result:
        """Ack ``request`` and relay it to its target (on ``node_id``, or here)."""
        error = proto.postcheck(request, state, legacy=peer.legacy)
        if error is not None:
            self._refuse(peer, request, error)
            return None
        target: str = request.target
        # The ack goes out first: a reply from the target can never overtake it.
        peer.conn.send_text(proto.encode_ack(request.id))
        # The timer starts before the relay leaves: an answer may come back before the send
        # to another node has even been confirmed.
        match request.cmd:
            case Cmd.SESSION_START:
                self._start_timer(peer.id, target)
            case Cmd.SESSION_CANCEL:
                self._settle(peer.id, target)
            case _:
                pass
        message = proto.relayed(request, peer.id)
        if node_id is None:
            self._relayed(peer, request, self._deliver_local(target, message))
            return None
        return self._relay_remote(peer, request, node_id, message)

    async def _relay_remote(
        self, peer: Peer, request: proto.Request, node_id: str, message: dict[str, Any]
    ) -> None:
        delivered = await self._send_remote(
            node_id, request.target, message, requester=peer.id, request_id=request.id
        )
        self._relayed(peer, request, delivered)

    def _relayed(self, peer: Peer, request: proto.Request, delivered: bool) -> None:
        if not delivered:
            if request.cmd is Cmd.SESSION_START:
                self._settle(peer.id, request.target)
            peer.conn.send_text(proto.encode_error(request.id, ErrorText.PEER_OFFLINE))

    def _locate_here(self, target: Any) -> TargetState | None:
        """The target's state when this node knows it (None: look it up in the cluster)."""
        if not proto.is_id(target):
            return TargetState.NOT_FOUND  # no id of that shape was ever handed out
        local = self.peers.get(target)
        if local is None:
            return None
        return TargetState.OFFLINE if local.conn.closing else TargetState.ONLINE

    # --- delivery ---
    def _deliver_local(self, target: str, message: dict[str, Any]) -> bool:
        """Write ``message`` to the local peer ``target``; False when it has no open socket."""
        peer = self.peers.get(target)
        if peer is None or peer.conn.closing:
            return False
        origin = message.get("origin")
        if message.get("cmd") in (Cmd.SESSION_ACCEPT, Cmd.SESSION_REJECT) and isinstance(
            origin, str
        ):
            # The target of this relay started the session: it is answered.
            self._settle(target, origin)
        return peer.conn.send_text(proto.encode(message))

    async def _route(self, target: str, message: dict[str, Any]) -> bool:
        """Deliver a server-made message to ``target`` wherever it is; False if it is gone."""
        if target in self.peers:
            return self._deliver_local(target, message)
        try:
            claim = await self.backend.lookup(CLAIM_PREFIX + target)
        except Exception as exc:
            log.warning("cannot look up %s (%s); %s not delivered", target, exc, message["cmd"])
            return False
        if claim is None or claim.node_id == self.node.node_id:
            return False
        return await self._send_remote(claim.node_id, target, message)

    async def _send_remote(
        self,
        node_id: str,
        target: str,
        message: dict[str, Any],
        *,
        requester: str | None = None,
        request_id: proto.MessageId | None = None,
    ) -> bool:
        relay = proto.RemoteRelay(target, message, requester, request_id)
        try:
            return await self.backend.send_direct(
                node_id, RELAY_KIND, proto.encode_remote_relay(relay)
            )
        except Exception as exc:
            log.warning("cannot relay %s to node %s (%s)", message["cmd"], node_id, exc)
            return False

    async def _on_relay(self, origin_node: str, payload: bytes) -> None:
        """A relay from a peer on another node to one of ours (a malformed one is dropped with
        a warning by the backend)."""
        relay = proto.decode_remote_relay(payload)
        if self._deliver_local(relay.to, relay.message):
            return
        if relay.requester is not None and relay.request_id is not None:
            notice = proto.Undeliverable(
                relay.requester, relay.request_id, relay.message.get("cmd"), relay.to
            )
            try:
                await self.backend.send_direct(
                    origin_node, UNDELIVERABLE_KIND, proto.encode_undeliverable(notice)
                )
            except Exception as exc:
                log.warning("cannot report an undeliverable relay to %s (%s)", origin_node, exc)

    def _on_undeliverable(self, origin_node: str, payload: bytes) -> None:
        """Our peer's relay reached a node where the target had no open socket any more."""
        notice = proto.decode_undeliverable(payload)
        if notice.cmd == Cmd.SESSION_START and isinstance(notice.target, str):
            self._settle(notice.to, notice.target)
        peer = self.peers.get(notice.to)
        if peer is not None:
            peer.conn.send_text(proto.encode_error(notice.request_id, ErrorText.PEER_OFFLINE))

    # --- session timer ---
    def _start_timer(self, initiator: str, target: str) -> None:
        timeout = self.settings.signalfire.session_timeout
        if timeout <= 0:
            return  # SESSION_TIMEOUT=0: no server-side timer, as in the original
        handle = asyncio.get_running_loop().call_later(timeout, self._timeout, initiator, target)
        previous = self.pending.start(initiator, target, handle)
        if previous is not None:
            previous.cancel()

    def _settle(self, initiator: str, target: str) -> None:
        handle = self.pending.settle(initiator, target)
        if handle is not None:
            handle.cancel()

    def _timeout(self, initiator: str, target: str) -> None:
        if self.pending.settle(initiator, target) is None:
            return
        log.debug("session %s -> %s timed out", initiator, target)
        self._deliver_local(initiator, proto.notice(Cmd.SESSION_TIMEOUT, target))
        self._spawn(self._route(target, proto.notice(Cmd.SESSION_TIMEOUT, initiator)))

    # --- id leases ---
    async def _renew_loop(self) -> None:
        """Renew every local id's lease well before it expires; re-claim ids the backend lost."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            for peer in list(self.peers.values()):
                if peer.conn.closing or self.peers.get(peer.id) is not peer:
                    continue
                try:
                    ok = peer.claimed and await self.backend.renew(peer.key, peer.token, self.ttl)
                    if not ok:
                        ok = await self.backend.claim(peer.key, peer.token, self.ttl)
                except Exception as exc:
                    log.warning("cannot renew id leases (%s); retrying in %gs", exc, self.ttl / 3)
                    break
                peer.claimed = ok
                if not ok:
                    log.warning("id %s is claimed elsewhere; closing %r", peer.id, peer.conn)
                    peer.conn.close(CloseCode.TRY_AGAIN_LATER, "id taken over")
