"""Serving the rooms protocol of wrtc-signal on socket.io (docs/protocols/rooms.md).

* ``/socket.io/``: python-socketio's ``AsyncServer`` on the same aiohttp app, socket.io v4
  defaults (ping 25 s / timeout 20 s). With a Redis backend it uses python-socketio's
  ``AsyncRedisManager`` on the same Redis, so events addressed to a socket id or a room reach
  the node holding that socket.
* ``POST /app``: app tokens (docs/protocols/rooms.md, "POST /app"); ``GET /demo``: the browser
  demo with a local socket.io client.

Cluster model. A room lives on its **owner's node**: that node holds the room's member list (in
join order, with each member's node and ``socket.data``) and its pending join requests, and
claims the room's name cluster-wide through the backend (``claim`` with a TTL lease it renews),
so existence checks and creation are atomic across nodes. Other nodes with members keep a copy
(snapshots pushed on every change) to check relays locally. Node-to-node messages go through the
backend's direct delivery; events to clients go through socket.io (and its Redis manager).

Owner leaving: ownership passes to the member who joined earliest; pending join requests are
delivered again to the new owner. The room closes when its last member leaves.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import engineio.packet
import orjson
import socketio
from aiohttp import web
from engineio.async_drivers.aiohttp import WebSocket as EngineIoWebSocket

from polysignal.core.errors import BackendUnavailable, CloseCode
from polysignal.core.limits import TokenBucket
from polysignal.logs import elide
from polysignal.protocols import rooms as proto
from polysignal.protocols.rooms import MISSING, ClientEvent, ClusterMessage, ClusterOp, ServerEvent
from polysignal.server.node import Node

log = logging.getLogger("polysignal.rooms")

STATIC = Path(__file__).resolve().parent.parent / "static"
DEMO_DIR = STATIC / "demo"
VENDOR_CLIENT = STATIC / "vendor" / "socket.io.min.js"

DIRECT_KIND = "rooms"
CLAIM_PREFIX = "rooms/room/"
MAX_HOPS = 3

# Development defaults for ROOMS_DEV=1 when APP_SECRET/APP_PASS are unset; printed at start.
DEV_SECRET = "polysignal-dev-secret"
DEV_PASS = "polysignal-dev-pass"

Handler = Callable[["Peer", ClientEvent, Any], Awaitable[None]]


class _RedisManagerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """python-socketio's Redis manager logs a lost Redis connection as ERROR; by the logging
    policy that is a degraded backend, a WARNING."""

    def error(self, msg: object, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("extra", None)
        self.warning(msg, *args, **kwargs)


def room_key(room: str) -> str:
    """The socket.io room of a rooms-protocol room. Prefixed so that no room name can collide
    with a socket id (every socket is in a room named by its id; in the original a room named
    after a socket id got that socket's events: docs/protocols/rooms.md, "What differs from
    wrtc-signal")."""
    return "room:" + room


@dataclass
class Peer:
    """One connected socket on this node."""

    sid: str
    address: str
    bucket: TokenBucket
    data: dict[str, Any] = field(default_factory=dict)  # socket.data: {} or {"peerinfo": ...}
    rooms: dict[str, None] = field(default_factory=dict)  # rooms it is a member of, in order
    # Rooms it asked to join, to withdraw the requests when it leaves; the oldest are forgotten
    # past the limit (a forgotten request stays pending at its owner: harmless, it admits no one
    # once the socket is gone).
    requested: dict[str, None] = field(default_factory=dict)
    last_error: float = 0.0


@dataclass
class RoomView:
    """A room as this node knows it; ``authority`` on the owner's node, a copy elsewhere."""

    name: str
    token: str
    owner: str
    version: int
    members: dict[str, proto.Member]
    pending: dict[str, proto.Pending] = field(default_factory=dict)
    authority: bool = False

    def snapshot(self, *, with_pending: bool = False) -> proto.Snapshot:
        return proto.Snapshot(
            room=self.name,
            token=self.token,
            owner=self.owner,
            version=self.version,
            members=tuple(self.members.items()),
            pending=tuple(self.pending.items()) if with_pending else (),
        )

    @classmethod
    def from_snapshot(cls, snap: proto.Snapshot, *, authority: bool) -> RoomView:
        return cls(
            name=snap.room,
            token=snap.token,
            owner=snap.owner,
            version=snap.version,
            members=dict(snap.members),
            pending=dict(snap.pending),
            authority=authority,
        )


class Server(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server, answering a malformed socket.io packet as socket.io does (the
    connection is closed) without logging it as a server error, and cutting off a client that
    does not read (engine.io's own send queue has no bound: docs/architecture.md, slow
    consumers)."""

    max_queued = 1024
    websockets: _OpenWebSockets

    async def _send_packet(self, eio_sid: str, pkt: Any) -> None:
        if not await self._overflowing(eio_sid):
            await super()._send_packet(eio_sid, pkt)

    async def _send_eio_packet(self, eio_sid: str, eio_pkt: Any) -> None:
        if not await self._overflowing(eio_sid):
            await super()._send_eio_packet(eio_sid, eio_pkt)

    async def _overflowing(self, eio_sid: str) -> bool:
        """True (and the client is cut off) when its queue is full; nothing is sent then."""
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or socket.queue.qsize() < self.max_queued:
            return False
        if not (socket.closing or socket.closed):
            log.warning(
                "socket.io client %s is not reading: %d packets waiting, closing",
                eio_sid,
                socket.queue.qsize(),
            )
            self.websockets.cut(socket)
            await socket.close(wait=False, abort=True)
        return True

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        try:
            await super()._handle_eio_message(eio_sid, data)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            log.debug("malformed socket.io packet from %s: %s; closing", eio_sid, exc)
            self._binary_packet.pop(eio_sid, None)
            await self.eio.disconnect(eio_sid)


class _OpenWebSockets:
    """The engine.io WebSockets of this node that are still being served."""

    def __init__(self) -> None:
        self.sockets: set[_GuardedWebSocket] = set()
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, ws: _GuardedWebSocket) -> None:
        self.sockets.add(ws)
        self.idle.clear()

    def discard(self, ws: _GuardedWebSocket) -> None:
        self.sockets.discard(ws)
        if not self.sockets:
            self.idle.set()

    def cut(self, socket: Any) -> None:
        """Abort the TCP connection of engine.io socket ``socket`` (its writer may be stuck)."""
        for ws in self.sockets:
            if getattr(ws.handler, "__self__", None) is socket:
                ws.abort()


class _GuardedWebSocket(EngineIoWebSocket):  # type: ignore[misc]
    """engine.io's aiohttp WebSocket, closing with 1003 on a frame that is not an engine.io
    packet (engine.io would let the decode error escape into aiohttp as a server error), and
    known to the hub while open so a graceful stop can close it with 1001."""

    async def __call__(self, environ: dict[str, Any]) -> Any:
        registry: _OpenWebSockets = self.server.polysignal_websockets
        registry.add(self)
        try:
            return await super().__call__(environ)
        finally:
            registry.discard(self)

    async def close_going_away(self, grace: float) -> None:
        """Close with 1001; cut the connection if the client does not answer within ``grace``."""
        sock = self._sock
        if sock is None or sock.closed:
            return
        try:
            async with asyncio.timeout(grace):
                await sock.close(code=CloseCode.GOING_AWAY, message=b"server shutting down")
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        environ = getattr(self, "environ", None)
        request = environ.get("aiohttp.request") if environ is not None else None
        transport = request.transport if request is not None else None
        if transport is not None and not transport.is_closing():
            transport.abort()

    async def wait(self) -> Any:
        data = await super().wait()
        try:
            kind = engineio.packet.Packet(encoded_packet=data).packet_type
            if not 0 <= kind < len(engineio.packet.packet_names):
                raise ValueError(f"unknown packet type {kind}")
        except (ValueError, IndexError, binascii.Error) as exc:
            log.debug("malformed engine.io packet: %s; closing", exc)
            await self._sock.close(
                code=CloseCode.UNSUPPORTED_DATA, message=b"malformed engine.io packet"
            )
            raise OSError("malformed engine.io packet") from None
        return data


class RoomsHub:
    """The rooms protocol on one node: sockets, rooms, and the messages between nodes."""

    def __init__(self, node: Node, secret: str, password: str) -> None:
        self.node = node
        self.settings = node.settings
        self.secret = secret.encode()
        self.password = password
        self.limits = proto.Limits(
            max_payload_bytes=self.settings.rooms.max_payload_bytes,
            max_room_length=self.settings.rooms.rooms_max_name_length,
        )
        self.lease = float(max(self.settings.server.id_lease_ttl, 1))
        self.peers: dict[str, Peer] = {}
        self.views: dict[str, RoomView] = {}
        self.local: dict[str, set[str]] = {}  # room -> this node's member sids
        self._renewer: asyncio.Task[None] | None = None
        manager: socketio.AsyncManager | None = None
        if self.settings.backend_scheme != "memory":
            manager = socketio.AsyncRedisManager(
                self.settings.server.backend_url,
                channel=f"{self.settings.redis.signal_channel}:socketio",
                logger=_RedisManagerLog(log, {}),
            )
        self.sio = Server(
            client_manager=manager,
            async_mode="aiohttp",
            # Events of one socket are handled in order (SDP before its ICE candidates).
            async_handlers=False,
            cors_allowed_origins="*",
            max_http_buffer_size=self.settings.limits.max_frame_bytes,
            logger=False,
            engineio_logger=False,
        )
        self.sio.eio._async = {**self.sio.eio._async, "websocket": _GuardedWebSocket}
        self.websockets = _OpenWebSockets()
        self.sio.eio.polysignal_websockets = self.websockets
        self.sio.websockets = self.websockets
        self.sio.max_queued = max(64, self.settings.limits.send_buffer_bytes // 1024)
        self.sio.on("connect", self.on_connect)
        self.sio.on("disconnect", self.on_disconnect)
        self.sio.on("*", self.on_event)
        node.backend.on_direct(DIRECT_KIND, self.on_cluster)
        self.handlers: dict[ClientEvent, Handler] = {
            ClientEvent.AUTH_REQUEST: self.auth_request,
            ClientEvent.ROOM_CREATE_REQUEST: self.create_room,
            ClientEvent.ROOM_JOIN_REQUEST: self.join_request,
            ClientEvent.ROOM_JOIN_ACCEPT: self.join_accept,
            ClientEvent.ROOM_JOIN_REJECT: self.join_reject,
            ClientEvent.RELAY_SESSION_DESCRIPTION: self.relay,
            ClientEvent.RELAY_ICE_CANDIDATE: self.relay,
        }

    # --- lifecycle ---
    async def start(self) -> None:
        if not self.sio.manager_initialized:
            # Subscribe to the Redis manager's channel now, not at the first connection.
            self.sio.manager_initialized = True
            self.sio.manager.initialize()
        self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())

    async def stop(self) -> None:
        """Close every socket.io connection (clients reconnect elsewhere), then stop the tasks.

        WebSockets are closed with 1001, as every protocol's (docs/architecture.md, graceful
        shutdown): socket.io clients see a transport close and reconnect, to another node behind
        a load balancer. Their ``disconnect`` handlers (leaves, owner handovers) run while the
        backend is still up.
        """
        grace = self.settings.server.shutdown_timeout
        open_ws = list(self.websockets.sockets)
        await asyncio.gather(*(ws.close_going_away(grace) for ws in open_ws))
        for socket in list(self.sio.eio.sockets.values()):
            if not socket.upgraded:  # long-polling clients get a CLOSE packet on their next poll
                await socket.close(wait=False)
        # The WebSockets' own tasks run the disconnect handlers; let them finish (bounded).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.websockets.idle.wait(), grace)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.sio.shutdown()
        thread = getattr(self.sio.manager, "thread", None)
        if isinstance(thread, asyncio.Task):
            thread.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await thread
        redis = getattr(self.sio.manager, "redis", None)
        if redis is not None:
            with contextlib.suppress(Exception):
                await redis.aclose()

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            for view in [v for v in self.views.values() if v.authority]:
                try:
                    key = CLAIM_PREFIX + view.name
                    backend = self.node.backend
                    if not await backend.renew(
                        key, view.token, self.lease
                    ) and not await backend.claim(key, view.token, self.lease):
                        log.warning("room %r: its name was claimed by another node", view.name)
                except Exception:
                    log.warning("room %r: lease renewal failed", view.name, exc_info=True)

    # --- output ---
    async def emit(self, event: ServerEvent, data: dict[str, Any], to: str, **kw: Any) -> None:
        await self.sio.emit(event.value, data, to=to, **kw)

    async def error(self, peer: Peer, message: str, event: str | None, payload: Any) -> None:
        await self.emit(ServerEvent.ERROR, proto.error_body(message, event, payload), peer.sid)

    # --- connection ---
    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any) -> None:
        if self.node.stopping:
            raise socketio.exceptions.ConnectionRefusedError("server shutting down")
        token = auth.get("token") if isinstance(auth, dict) else None
        if token is None:
            raise socketio.exceptions.ConnectionRefusedError(proto.TOKEN_REQUIRED)
        if not proto.verify_handshake(token, self.secret, time.time()):
            # The original never answers here and leaves the client hanging
            # (docs/protocols/rooms.md, "Errors and limits").
            raise socketio.exceptions.ConnectionRefusedError(proto.TOKEN_NOT_VALID)
        request = environ.get("aiohttp.request")
        address = (request.remote if request is not None else None) or "unknown"
        if not self.node.addresses.acquire(address):
            log.warning("refused %s: %d connections from it", address, self.node.addresses.limit)
            raise socketio.exceptions.ConnectionRefusedError(
                "too many connections from this address"
            )
        limits = self.settings.limits
        bucket = TokenBucket(limits.rate_limit, limits.rate_burst, time.monotonic())
        self.peers[sid] = Peer(sid, address, bucket)
        log.debug("socket %s connected from %s", sid, address)

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        peer = self.peers.pop(sid, None)
        if peer is None:
            return
        self.node.addresses.release(peer.address)
        log.debug("socket %s gone (%s)", sid, reason)
        for room in list(peer.rooms):
            try:
                await self._leave(peer, room)
            except BackendUnavailable as exc:
                log.warning("socket %s: leave of room %r not sent to its owner: %s", sid, room, exc)
            except Exception:
                log.exception("socket %s: leaving room %r failed", sid, room)
        for room in [r for r in peer.requested if r not in peer.rooms]:
            try:
                await self._to_owner(ClusterMessage(ClusterOp.LEAVE, room, sid=sid))
            except BackendUnavailable as exc:
                log.warning("socket %s: request for room %r not withdrawn: %s", sid, room, exc)
            except Exception:
                log.exception("socket %s: withdrawing its request for room %r failed", sid, room)

    async def _leave(self, peer: Peer, room: str) -> None:
        """Leaving is disconnecting: the others in the room get ``room-user-leave``
        (docs/protocols/rooms.md, "Leaving")."""
        await self.emit(
            ServerEvent.ROOM_USER_LEAVE,
            proto.body(room=room, peer_id=peer.sid, peerinfo=proto.peerinfo_of(peer.data)),
            room_key(room),
            skip_sid=peer.sid,
        )
        self._forget_local(room, peer.sid)
        view = self.views.get(room)
        if view is not None and view.authority:
            await self._member_left(view, peer.sid)
        else:
            await self._to_owner(ClusterMessage(ClusterOp.LEAVE, room, sid=peer.sid))

    def _forget_local(self, room: str, sid: str) -> None:
        members = self.local.get(room)
        if members is not None:
            members.discard(sid)
            if not members:
                del self.local[room]
                view = self.views.get(room)
                if view is not None and not view.authority:
                    del self.views[room]

    # --- events ---
    async def on_event(self, event: Any, sid: str, *args: Any) -> None:
        """Every client event: rate limit, auth (docs/protocols/rooms.md, "Tokens"), validation,
        then its handler."""
        peer = self.peers.get(sid)
        if peer is None:
            return
        data = args[0] if args else None
        name = event if isinstance(event, str) else repr(event)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("socket %s: %s %s", sid, name[:64], _elided(data))
        if not peer.bucket.allow(time.monotonic()):
            now = time.monotonic()
            if now - peer.last_error >= 1.0:
                peer.last_error = now
                await self.error(
                    peer,
                    f"rate limit exceeded ({peer.bucket.rate:g} events/s); events dropped",
                    name,
                    MISSING,
                )
            return
        try:
            kind = ClientEvent(event)
        except ValueError:
            await self.error(peer, f"unknown event {name[:64]!r}", name[:64], MISSING)
            return
        if kind is not ClientEvent.AUTH_REQUEST:
            auth = data.get("auth") if isinstance(data, dict) else None
            if not proto.verify_session(auth, self.secret, sid, time.time()):
                await self.emit(ServerEvent.UNAUTHORIZED, {"message": proto.TOKEN_NOT_VALID}, sid)
                return
        try:
            await self.handlers[kind](peer, kind, data)
        except proto.BadEvent as exc:
            log.debug("socket %s: %s: %s", sid, kind, exc.message)
            await self._reject(peer, kind, exc.message, exc.payload)
        except BackendUnavailable as exc:
            # Not a bug: the cluster's shared state is unreachable for now; nothing happened.
            log.warning("socket %s: %s not handled: %s", sid, kind, exc)
            await self._reject(peer, kind, proto.BACKEND_DOWN, proto.payload_of(data))
        except Exception:
            log.exception("socket %s: error handling %s", sid, kind)
            await self.error(peer, "internal error", kind, proto.payload_of(data))

    async def _reject(self, peer: Peer, kind: ClientEvent, message: str, payload: Any) -> None:
        """Bad input answered with the event's own reject where the protocol has one."""
        reject = {
            ClientEvent.AUTH_REQUEST: ServerEvent.AUTH_REJECT,
            ClientEvent.ROOM_CREATE_REQUEST: ServerEvent.ROOM_CREATE_REJECT,
            ClientEvent.ROOM_JOIN_REQUEST: ServerEvent.ROOM_JOIN_REJECT,
        }.get(kind)
        if reject is None:
            await self.error(peer, message, kind, payload)
        else:
            await self.emit(reject, proto.body(message=message, payload=payload), peer.sid)

    async def auth_request(self, peer: Peer, kind: ClientEvent, data: Any) -> None:
        cmd = proto.parse_auth_request(data, self.limits)
        token_data = proto.verify_token(cmd.token, self.secret)
        if token_data is None:
            raise proto.BadEvent(proto.TOKEN_NOT_VALID, cmd.payload)
        if cmd.peerinfo is not MISSING:
            peer.data = {"peerinfo": cmd.peerinfo}
        exp = int(time.time()) + self.settings.rooms.token_lifetime
        token = proto.session_token(token_data["app"], peer.sid, exp, self.secret)
        await self.emit(
            ServerEvent.AUTH_ACCEPT, proto.body(payload=cmd.payload, token=token), peer.sid
        )

    async def create_room(self, peer: Peer, kind: ClientEvent, data: Any) -> None:
        cmd = proto.parse_create(data, self.limits)
        name = cmd.room if cmd.room is not None else str(uuid.uuid4())
        self._check_room_count(peer, cmd.payload)
        token = uuid.uuid4().hex
        if name in peer.rooms or not await self.node.backend.claim(
            CLAIM_PREFIX + name, token, self.lease
        ):
            raise proto.BadEvent(proto.ROOM_TAKEN, cmd.payload)
        if peer.sid not in self.peers:  # gone while the claim was in flight
            await self.node.backend.release(CLAIM_PREFIX + name, token)
            return
        member = proto.Member(self.node.node_id, peer.data)
        self.views[name] = RoomView(name, token, peer.sid, 1, {peer.sid: member}, authority=True)
        self._add_local(peer, name)
        await self.sio.enter_room(peer.sid, room_key(name))
        await self.emit(
            ServerEvent.ROOM_CREATE_ACCEPT, proto.body(room=name, payload=cmd.payload), peer.sid
        )

    def _check_room_count(self, peer: Peer, payload: Any) -> None:
        limit = self.settings.rooms.rooms_max_per_socket
        if len(peer.rooms) >= limit:
            raise proto.BadEvent(f"too many rooms for one socket (limit {limit})", payload)

    def _add_local(self, peer: Peer, room: str) -> None:
        peer.rooms[room] = None
        peer.requested.pop(room, None)
        self.local.setdefault(room, set()).add(peer.sid)

    async def join_request(self, peer: Peer, kind: ClientEvent, data: Any) -> None:
        cmd = proto.parse_join(data, self.limits)
        if cmd.room in peer.rooms:
            raise proto.BadEvent(proto.ALREADY_IN_ROOM, cmd.payload)
        self._check_room_count(peer, cmd.payload)
        msg = ClusterMessage(
            ClusterOp.JOIN_REQUEST,
            cmd.room,
            sid=peer.sid,
            node=self.node.node_id,
            data=peer.data,
            payload=cmd.payload,
        )
        peer.requested[cmd.room] = None
        if len(peer.requested) > self.settings.rooms.rooms_max_per_socket:
            del peer.requested[next(iter(peer.requested))]
        if not await self._to_owner(msg):
            peer.requested.pop(cmd.room, None)
            raise proto.BadEvent(proto.ROOM_NOT_FOUND, cmd.payload)

    def _owned_view(self, peer: Peer, cmd: proto.Answer) -> RoomView:
        """The room if ``peer`` owns it here (only the owner answers, unlike in the original:
        docs/protocols/rooms.md, "What differs from wrtc-signal")."""
        view = self.views.get(cmd.room)
        if view is None or not view.authority or view.owner != peer.sid:
            raise proto.BadEvent(proto.NOT_OWNER, cmd.payload)
        return view

    async def join_accept(self, peer: Peer, kind: ClientEvent, data: Any) -> None:
        cmd = proto.parse_answer(kind, data, self.limits)
        view = self._owned_view(peer, cmd)
        pending = view.pending.pop(cmd.peer_id, None)
        if pending is None:
            raise proto.BadEvent(proto.NO_PENDING_REQUEST, cmd.payload)
        view.members[cmd.peer_id] = proto.Member(pending.node, pending.data)
        view.version += 1
        admit = ClusterMessage(
            ClusterOp.ADMIT,
            view.name,
            sid=cmd.peer_id,
            node=self.node.node_id,
            payload=cmd.payload,
            snapshot=view.snapshot(),
        )
        if not await self._to_node(pending.node, admit):
            await self._member_left(view, cmd.peer_id)
            return
        await self._push_snapshot(view, skip=pending.node)

    async def join_reject(self, peer: Peer, kind: ClientEvent, data: Any) -> None:
        cmd = proto.parse_answer(kind, data, self.limits)
        view = self._owned_view(peer, cmd)
        if view.pending.pop(cmd.peer_id, None) is None:
            raise proto.BadEvent(proto.NO_PENDING_REQUEST, cmd.payload)
        await self.emit(
            ServerEvent.ROOM_JOIN_REJECT,
            proto.body(
                room=cmd.room,
                peer_id=cmd.peer_id,
                message=proto.OWNER_REJECTED,
                payload=cmd.payload,
            ),
            cmd.peer_id,
        )

    async def relay(self, peer: Peer, kind: ClientEvent, data: Any) -> None:
        cmd = proto.parse_relay(kind, data, self.limits)
        view = self.views.get(cmd.room)
        # Only between members of one room (the original relayed to any socket id:
        # docs/protocols/rooms.md, "Errors and limits").
        if cmd.room not in peer.rooms or view is None or cmd.to not in view.members:
            raise proto.BadEvent(proto.NOT_SHARING_ROOM, cmd.payload)
        if kind is ClientEvent.RELAY_SESSION_DESCRIPTION:
            out, fields = ServerEvent.SESSION_DESCRIPTION, {"session_description": cmd.body}
        else:
            out, fields = ServerEvent.ICE_CANDIDATE, {"ice_candidate": cmd.body}
        # The original's fields, plus the sender's peerinfo (the README's promise).
        await self.emit(
            out,
            proto.body(
                peer_id=peer.sid,
                **fields,
                room=cmd.room,
                payload=cmd.payload,
                peerinfo=proto.peerinfo_of(peer.data),
            ),
            cmd.to,
        )

    # --- between nodes ---
    async def _to_node(self, node_id: str, msg: ClusterMessage) -> bool:
        if node_id == self.node.node_id:
            await self._handle_cluster(msg)
            return True
        return await self.node.backend.send_direct(node_id, DIRECT_KIND, proto.encode_cluster(msg))

    async def _to_owner(self, msg: ClusterMessage) -> bool:
        """Send ``msg`` to the node holding ``msg.room``; False if the room does not exist."""
        claim = await self.node.backend.lookup(CLAIM_PREFIX + msg.room)
        if claim is None:
            return False
        return await self._to_node(claim.node_id, msg)

    async def on_cluster(self, origin: str, raw: bytes) -> None:
        # A malformed message (MalformedFrame) is dropped with a warning by the backend.
        await self._handle_cluster(proto.decode_cluster(raw))

    async def _handle_cluster(self, msg: ClusterMessage) -> None:
        match msg.op:
            case ClusterOp.JOIN_REQUEST:
                await self._on_join_request(msg)
            case ClusterOp.ADMIT:
                await self._on_admit(msg)
            case ClusterOp.LEAVE:
                await self._on_leave(msg)
            case ClusterOp.SNAPSHOT:
                self._on_snapshot(msg)
            case ClusterOp.HANDOVER:
                await self._on_handover(msg)

    async def _forward(self, msg: ClusterMessage) -> bool:
        """A message for a room this node no longer owns: pass it to the current owner's node."""
        if msg.hops >= MAX_HOPS:
            return False
        claim = await self.node.backend.lookup(CLAIM_PREFIX + msg.room)
        if claim is None or claim.node_id == self.node.node_id:
            return False
        forwarded = ClusterMessage(
            msg.op, msg.room, msg.sid, msg.node, msg.data, msg.payload, msg.snapshot, msg.hops + 1
        )
        return await self._to_node(claim.node_id, forwarded)

    async def _on_join_request(self, msg: ClusterMessage) -> None:
        view = self.views.get(msg.room)
        if view is None or not view.authority:
            if not await self._forward(msg):
                await self.emit(
                    ServerEvent.ROOM_JOIN_REJECT,
                    proto.body(message=proto.ROOM_NOT_FOUND, payload=msg.payload),
                    msg.sid,
                )
            return
        if msg.sid in view.members:
            return
        if (
            len(view.pending) >= self.settings.rooms.rooms_max_pending
            and msg.sid not in view.pending
        ):
            await self.emit(
                ServerEvent.ROOM_JOIN_REJECT,
                proto.body(
                    message="too many pending join requests for this room", payload=msg.payload
                ),
                msg.sid,
            )
            return
        view.pending[msg.sid] = proto.Pending(msg.node, msg.data, msg.payload)
        await self._ask_owner(view, msg.sid, view.pending[msg.sid])

    async def _ask_owner(self, view: RoomView, sid: str, pending: proto.Pending) -> None:
        await self.emit(
            ServerEvent.ROOM_JOIN_REQUEST,
            proto.body(
                room=view.name,
                peer_id=sid,
                payload=pending.payload,
                peerinfo=proto.peerinfo_of(pending.data),
            ),
            view.owner,
        )

    async def _on_admit(self, msg: ClusterMessage) -> None:
        """The owner accepted ``msg.sid``, which is on this node (the original's ``/cluster``
        ``room-join-accept``): join it, tell it who is there, tell them it came."""
        snap = msg.snapshot
        if snap is None:
            return
        peer = self.peers.get(msg.sid)
        if peer is None or len(peer.rooms) >= self.settings.rooms.rooms_max_per_socket:
            await self._to_node(msg.node, ClusterMessage(ClusterOp.LEAVE, msg.room, sid=msg.sid))
            if peer is not None:  # accepted into more rooms than it may hold, all at once
                limit = self.settings.rooms.rooms_max_per_socket
                await self.emit(
                    ServerEvent.ROOM_JOIN_REJECT,
                    proto.body(
                        room=msg.room,
                        peer_id=peer.sid,
                        message=f"too many rooms for one socket (limit {limit})",
                        payload=msg.payload,
                    ),
                    peer.sid,
                )
            return
        self._install(snap)
        self._add_local(peer, msg.room)
        await self.sio.enter_room(peer.sid, room_key(msg.room))
        members = dict(snap.members)
        await self.emit(
            ServerEvent.ROOM_JOIN_ACCEPT,
            proto.body(
                room=msg.room,
                peer_id=peer.sid,
                peers=[sid for sid in members if sid != peer.sid],
                peersinfo={sid: member.data for sid, member in members.items()},
                payload=msg.payload,
            ),
            peer.sid,
        )
        await self.emit(
            ServerEvent.ROOM_USER_JOIN,
            proto.body(
                room=msg.room,
                peer_id=peer.sid,
                payload=msg.payload,
                peerinfo=proto.peerinfo_of(peer.data),
            ),
            room_key(msg.room),
            skip_sid=peer.sid,
        )

    def _install(self, snap: proto.Snapshot) -> None:
        """Keep a newer copy of a room this node has (or is getting) members of."""
        view = self.views.get(snap.room)
        if view is not None and (view.authority or view.version >= snap.version):
            return
        self.views[snap.room] = RoomView.from_snapshot(snap, authority=False)

    def _on_snapshot(self, msg: ClusterMessage) -> None:
        if msg.snapshot is not None and msg.room in self.local:
            self._install(msg.snapshot)

    async def _on_leave(self, msg: ClusterMessage) -> None:
        view = self.views.get(msg.room)
        if view is None or not view.authority:
            await self._forward(msg)
            return
        await self._member_left(view, msg.sid)

    async def _member_left(self, view: RoomView, sid: str) -> None:
        """On the owner's node: ``sid`` left (or gave up its request); hand over or close."""
        view.pending.pop(sid, None)
        if sid not in view.members:
            return
        del view.members[sid]
        view.version += 1
        if not view.members:
            del self.views[view.name]
            await self.node.backend.release(CLAIM_PREFIX + view.name, view.token)
            return
        if view.owner == sid:
            view.owner = next(iter(view.members))
            new_node = view.members[view.owner].node
            log.debug("room %r: ownership passes to %s", view.name, view.owner)
            if new_node != self.node.node_id:
                view.authority = False
                handover = ClusterMessage(
                    ClusterOp.HANDOVER, view.name, snapshot=view.snapshot(with_pending=True)
                )
                view.pending.clear()
                if view.name not in self.local:
                    del self.views[view.name]
                await self._to_node(new_node, handover)
                await self._push_snapshot(view, skip=new_node)
                return
            for pending_sid, pending in list(view.pending.items()):
                await self._ask_owner(view, pending_sid, pending)
        await self._push_snapshot(view)

    async def _on_handover(self, msg: ClusterMessage) -> None:
        snap = msg.snapshot
        if snap is None:
            return
        view = RoomView.from_snapshot(snap, authority=True)
        self.views[view.name] = view
        if not await self.node.backend.claim(CLAIM_PREFIX + view.name, view.token, self.lease):
            log.warning("room %r: could not take over its name", view.name)
        if view.owner not in self.peers:  # the new owner left while the room was on its way
            await self._member_left(view, view.owner)
            return
        for sid, pending in list(view.pending.items()):
            await self._ask_owner(view, sid, pending)

    async def _push_snapshot(self, view: RoomView, skip: str | None = None) -> None:
        nodes = {m.node for m in view.members.values()} - {self.node.node_id, skip}
        if not nodes:
            return
        raw = proto.encode_cluster(
            ClusterMessage(ClusterOp.SNAPSHOT, view.name, snapshot=view.snapshot())
        )
        for node_id in nodes:
            if node_id is not None:
                await self.node.backend.send_direct(node_id, DIRECT_KIND, raw)

    # --- HTTP ---
    async def post_app(self, request: web.Request) -> web.Response:
        """``POST /app`` (form or JSON): ``app`` and ``password`` -> an app token
        (docs/protocols/rooms.md, "POST /app")."""
        form: Any
        try:
            if request.content_type == "application/json":
                form = await request.json(loads=orjson.loads)
            else:
                form = await request.post()
        except (ValueError, UnicodeDecodeError):
            return _api_error(400, "Request body is not valid JSON or form data")
        if not isinstance(form, dict) and not hasattr(form, "get"):
            return _api_error(400, "Request body must be an object")
        password = form.get("password")
        if not isinstance(password, str) or not _same(password, self.password):
            return _api_error(401, proto.UNAUTHORIZED_HTTP)
        app = form.get("app")
        if not isinstance(app, str) or not app:
            return _api_error(400, proto.APP_REQUIRED)
        token = proto.app_token(app, self.secret)
        return web.json_response({"status": 200, "error": None, "response": {"token": token}})

    async def demo_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(DEMO_DIR / "index.html")

    async def demo_config(self, request: web.Request) -> web.Response:
        """The demo's ICE configuration, from ``ICE_SERVERS`` (none: host candidates only)."""
        return web.json_response({"iceServers": list(self.settings.server.ice_servers or ())})

    async def vendor_client(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(VENDOR_CLIENT)


def _elided(data: Any) -> str:
    try:
        return elide(orjson.dumps(data, default=repr))
    except TypeError:  # nested deeper than orjson goes
        return "<unsized>"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _api_error(status: int, message: str) -> web.Response:
    """The original's ``ErrorHandler`` body: ``{status, error, response: false}``."""
    return web.json_response({"status": status, "error": message, "response": False}, status=status)


def secrets_for(node: Node) -> tuple[str, str] | None:
    """APP_SECRET and APP_PASS, the printed development defaults under ROOMS_DEV, or None."""
    settings = node.settings
    secret, password = settings.rooms.app_secret.reveal(), settings.rooms.app_pass.reveal()
    if secret and password:
        return secret, password
    if not settings.rooms.rooms_dev:
        return None
    log.warning(
        "ROOMS_DEV=1: rooms protocol running with DEVELOPMENT secrets (APP_SECRET=%s, "
        "APP_PASS=%s) where unset; anyone can mint tokens. Never use this in production.",
        "<set>" if secret else DEV_SECRET,
        "<set>" if password else DEV_PASS,
    )
    return secret or DEV_SECRET, password or DEV_PASS


ROOMS_KEY = web.AppKey("rooms", RoomsHub)


def setup(app: web.Application, node: Node) -> RoomsHub | None:
    """Mount ``/socket.io/``, ``POST /app`` and ``/demo``; off without secrets
    (docs/protocols/rooms.md)."""
    secrets = secrets_for(node)
    if secrets is None:
        log.warning(
            "rooms protocol (socket.io, POST /app, /demo) NOT started: APP_SECRET and APP_PASS "
            "are unset. Set both to enable it, or ROOMS_DEV=1 for development secrets. "
            "The other protocols keep running."
        )
        return None
    hub = RoomsHub(node, *secrets)
    app[ROOMS_KEY] = hub
    hub.sio.attach(app, socketio_path="socket.io")
    node.http_prefixes += ("/socket.io/",)  # its WebSockets too stay with aiohttp
    app.router.add_post("/app", hub.post_app)
    app.router.add_get("/demo", hub.demo_page)
    app.router.add_get("/demo/config.json", hub.demo_config)
    app.router.add_static("/demo/", DEMO_DIR, show_index=False)
    app.router.add_get("/vendor/socket.io.min.js", hub.vendor_client)

    async def _start(_: web.Application) -> None:
        await hub.start()

    app.on_startup.append(_start)
    node.shutdown_hooks.append(hub.stop)
    return hub
