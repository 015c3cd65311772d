"""Serving the Signal-Fire protocol (PROTOCOLS.md §3, DESIGN.md §5).

Routing (§3.2): a WebSocket offering ``Signal-Fire@3`` or ``Signal-Fire@2`` on any path, or any
WebSocket on ``SIGNALFIRE_PATH`` (browsers refuse to offer a subprotocol containing ``@``). The
offered subprotocol is echoed: aiohttp compares offers as plain strings, so the non-RFC-6455
token passes through unchanged.

Ids (§3.3): each connection gets a nanoid, claimed cluster-wide in the backend under
``signalfire:<id>`` with a lease of ``ID_LEASE_TTL`` seconds that this node renews while the
socket is open, and releases when it closes (afterwards the id is ``Peer Not Found``). A relay to
an id on another node goes through the backend's direct delivery to the node holding the claim.

Order (§3.4): every accepted request is acked before its relay is written; a relay that turns
out to be undeliverable after the ack (the target's socket closed, its node is gone) gets a
second reply ``Peer Offline``, as the original's registry errors arrive after ``ok:true``.

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

import orjson
from aiohttp import WSMsgType, hdrs, web

from polysignal.backends.base import BackendUnavailable
from polysignal.core.errors import CloseCode
from polysignal.core.signalfire import PendingSessions
from polysignal.logs import elide
from polysignal.protocols import signalfire as proto
from polysignal.protocols.signalfire import Cmd, ErrorText, TargetState
from polysignal.server.connection import Connection
from polysignal.server.node import Node

log = logging.getLogger("polysignal.signalfire")

CLAIM_PREFIX = "signalfire:"
RELAY_KIND = "signalfire"
"""Direct message: a relayed frame for a peer connected to the receiving node."""
UNDELIVERABLE_KIND = "signalfire-undeliverable"
"""Direct message back to the requester's node: the relay found no open socket."""
CLIENT_SCRIPT = Path(__file__).resolve().parent.parent / "static" / "client" / "signal-fire.js"
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

    @property
    def key(self) -> str:
        return CLAIM_PREFIX + self.id


class SignalFireHub:
    """This node's Signal-Fire peers, pending sessions, and relays to and from other nodes."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self.backend = node.backend
        self.peers: dict[str, Peer] = {}
        self.pending: PendingSessions[asyncio.TimerHandle] = PendingSessions()
        self.ttl = max(1, self.settings.id_lease_ttl)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self.backend.on_direct(RELAY_KIND, self._on_relay)
        self.backend.on_direct(UNDELIVERABLE_KIND, self._on_undeliverable)

    # --- lifecycle ---
    async def start(self, app: web.Application) -> None:
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
    def matches(self, request: web.Request) -> bool:
        """Signal-Fire by subprotocol on any path, or any WebSocket on the configured path."""
        if request.path == self.settings.signalfire_path:
            return True
        for header in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ()):
            for offered in header.split(","):
                if offered.strip() in proto.SUBPROTOCOLS:
                    return True
        return False

    # --- one connection ---
    async def handle(self, request: web.Request) -> web.StreamResponse:
        async with self.node.websocket(
            request, "signalfire", subprotocols=proto.SUBPROTOCOLS
        ) as conn:
            legacy = conn.ws.ws_protocol == proto.LEGACY_SUBPROTOCOL
            peer = await self._register(conn, legacy)
            if peer is None:
                conn.close(CloseCode.TRY_AGAIN_LATER, "no free id")
                await conn.wait_closed()
                return conn.ws
            try:
                conn.send_text(proto.encode_welcome(peer.id, self.settings.ice_servers))
                async for msg in conn.ws:
                    # ws@7 hands Luce binary frames as Buffers, which JSON.parse reads as text.
                    if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                        await self._on_frame(peer, msg.data)
                    elif msg.type is WSMsgType.ERROR:
                        log.debug("%r: %s", conn, conn.ws.exception())
                    if conn.closing:
                        break
                # Returning before the close handshake ends would let aiohttp close with 1000.
                await conn.wait_closed()
            finally:
                await self._unregister(peer)
            return conn.ws

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

    async def _on_frame(self, peer: Peer, data: str | bytes) -> None:
        conn = peer.conn
        allowed = conn.allow_message()
        try:
            parsed = proto.decode(data)
        except proto.CloseRequest as exc:
            log.debug("%r: closing 4400 %s on %s", conn, exc.message, elide(data))
            conn.close(exc.close_code, exc.message)
            return
        if isinstance(parsed, proto.Ignored):
            # §3.4: unknown commands get no reply at all.
            log.debug("%r: ignored cmd %r", conn, parsed.cmd)
            return
        if not allowed:
            if conn.should_report_rate_limit():
                log.warning("%r over the rate limit; refusing requests", conn)
            conn.send_text(proto.encode_error(parsed.id, ErrorText.RATE_LIMITED))
            return
        try:
            await self._request(peer, parsed)
        except Exception:
            log.exception("%r: error handling %s", conn, parsed.cmd)
            conn.send_text(proto.encode_error(parsed.id, ErrorText.INTERNAL))

    async def _request(self, peer: Peer, request: proto.Request) -> None:
        conn = peer.conn
        node_id: str | None = None
        error = proto.precheck(request, peer.id)
        if error is None:
            try:
                state, node_id = await self._locate(request.target)
            except BackendUnavailable as exc:
                # Not a bug: the registry of other nodes' ids is unreachable for now.
                log.warning("%r: cannot look up %s (%s)", conn, request.target, exc)
                conn.send_text(proto.encode_error(request.id, ErrorText.INTERNAL))
                return
            error = proto.postcheck(request, state, legacy=peer.legacy)
        if error is not None:
            log.debug("%r %s: %s", conn, request.cmd, error)
            conn.send_text(proto.encode_error(request.id, error))
            return
        target: str = request.target
        # The ack goes out first (§3.4): a reply from the target can never overtake it.
        conn.send_text(proto.encode_ack(request.id))
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
            delivered = self._deliver_local(target, message)
        else:
            delivered = await self._send_remote(
                node_id, target, message, requester=peer.id, request_id=request.id
            )
        if not delivered:
            if request.cmd is Cmd.SESSION_START:
                self._settle(peer.id, target)
            conn.send_text(proto.encode_error(request.id, ErrorText.PEER_OFFLINE))

    async def _locate(self, target: Any) -> tuple[TargetState, str | None]:
        """The target's state, and the node holding it when that is another node."""
        if not proto.is_id(target):
            return TargetState.NOT_FOUND, None  # no id of that shape was ever handed out
        local = self.peers.get(target)
        if local is not None:
            return (TargetState.OFFLINE if local.conn.closing else TargetState.ONLINE), None
        claim = await self.backend.lookup(CLAIM_PREFIX + target)
        if claim is None or claim.node_id == self.node.node_id:
            return TargetState.NOT_FOUND, None
        return TargetState.ONLINE, claim.node_id

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
        envelope = {"to": target, "message": message, "from": requester, "req": request_id}
        try:
            return await self.backend.send_direct(node_id, RELAY_KIND, orjson.dumps(envelope))
        except Exception as exc:
            log.warning("cannot relay %s to node %s (%s)", message["cmd"], node_id, exc)
            return False

    async def _on_relay(self, origin_node: str, payload: bytes) -> None:
        """A relay from a peer on another node to one of ours."""
        try:
            envelope = orjson.loads(payload)
            target, message = envelope["to"], envelope["message"]
            if not isinstance(target, str) or not isinstance(message, dict):
                raise TypeError("bad envelope")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("dropped a malformed relay from node %s (%s)", origin_node, exc)
            return
        if self._deliver_local(target, message):
            return
        requester, request_id = envelope.get("from"), envelope.get("req")
        if isinstance(requester, str) and request_id is not None:
            notice = {
                "to": requester,
                "req": request_id,
                "cmd": message.get("cmd"),
                "target": target,
            }
            try:
                await self.backend.send_direct(
                    origin_node, UNDELIVERABLE_KIND, orjson.dumps(notice)
                )
            except Exception as exc:
                log.warning("cannot report an undeliverable relay to %s (%s)", origin_node, exc)

    async def _on_undeliverable(self, origin_node: str, payload: bytes) -> None:
        """Our peer's relay reached a node where the target had no open socket any more."""
        try:
            notice = orjson.loads(payload)
            requester, request_id = notice["to"], notice["req"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("dropped a malformed notice from node %s (%s)", origin_node, exc)
            return
        if not isinstance(requester, str):
            return
        if notice.get("cmd") == Cmd.SESSION_START and isinstance(notice.get("target"), str):
            self._settle(requester, notice["target"])
        peer = self.peers.get(requester)
        if peer is not None:
            peer.conn.send_text(proto.encode_error(request_id, ErrorText.PEER_OFFLINE))

    # --- session timer ---
    def _start_timer(self, initiator: str, target: str) -> None:
        timeout = self.settings.session_timeout
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


HUB_KEY = web.AppKey("signalfire", SignalFireHub)


async def _client_script(request: web.Request) -> web.StreamResponse:
    """The browser client, an ES module with no build step."""
    return web.FileResponse(
        CLIENT_SCRIPT,
        headers={
            hdrs.CONTENT_TYPE: "text/javascript; charset=utf-8",
            hdrs.CACHE_CONTROL: "no-cache",
        },
    )


def setup(app: web.Application, node: Node) -> SignalFireHub:
    """Register the Signal-Fire WebSocket matcher and the browser client's route."""
    hub = app[HUB_KEY] = SignalFireHub(node)
    node.add_ws_route(hub.matches, hub.handle)
    app.router.add_get(CLIENT_SCRIPT_PATH, _client_script)
    app.on_startup.append(hub.start)
    node.shutdown_hooks.append(hub.stop)
    return hub
