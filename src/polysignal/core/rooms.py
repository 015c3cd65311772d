"""The rooms protocol's rules on one node, as a state machine (docs/protocols/rooms.md).

``RoomsMachine.handle(event)`` takes what happened and returns what must follow, in order; it
holds no socket, no task and no clock (docs/architecture.md, "Layers"). The hub
(``server/rooms.py``) feeds it:

* ``Connected`` / ``Authenticated`` / ``Disconnected``: a socket of this node came, gave its
  ``peerinfo``, went (leaving is disconnecting);
* ``ClientCommand``: a validated client command (``protocols/rooms.py``) of a local socket;
* ``FromNode``: a message from another node (or from this one, through a lookup);
* ``ClaimAnswer`` / ``NameLost``: what became of a claim of a room name;
* ``Undeliverable``: a message that could not reach its node (or whose room has no holder);

and carries out what comes back: ``Emit`` to local sockets, ``ToNode`` (direct delivery to one
node, ``core/effects.py``), ``ToOwner`` (to whichever node holds a room's name), ``ClaimName`` /
``ReleaseName`` / ``HandOffName`` for the room's lease, and ``Warn`` (one log line).

The model (docs/protocols/rooms.md, "Many nodes"): a room lives on its **owner's node**, which
holds its members (join order, each member's node and socket data), its pending join requests and
its name's claim. Every other node with members keeps a copy (``Snapshot``, pushed on every
change) to check relays and address its members. An event for a socket goes to that socket's
node only; an event for a room goes once to each node that has members in it.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

from polysignal.core.effects import ToNode
from polysignal.core.limits import TokenBucket
from polysignal.protocols import rooms as proto
from polysignal.protocols.rooms import (
    MISSING,
    ClientEvent,
    ClusterMessage,
    ClusterOp,
    Maybe,
    ServerEvent,
)

if TYPE_CHECKING:
    from polysignal.core.auth import Identity

DIRECT_KIND: Final = "rooms"
"""The backend's direct-delivery kind of rooms messages."""

MAX_HOPS: Final = 3
"""How often a message that reached a node no longer owning its room is passed on."""

MOVED_REMEMBERED: Final = 1024
"""How many rooms handed over to another node a node remembers, to pass their messages on
straight to the new node (``RoomsMachine._forward``)."""


@dataclass(frozen=True, slots=True)
class RoomLimits:
    """The limits the machine holds sockets and rooms to (docs/protocols/rooms.md)."""

    rooms_per_socket: int = 256
    pending_per_room: int = 1024
    pending_per_socket: int = 16
    name_length: int = 512


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """Socket ``sid`` of this node passed the handshake."""

    sid: str


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Socket ``sid`` got its session token; ``peerinfo`` (unless MISSING) becomes its data."""

    sid: str
    peerinfo: Maybe = MISSING


Command = proto.CreateRoom | proto.JoinRoom | proto.Answer | proto.Relay


@dataclass(frozen=True, slots=True)
class ClientCommand:
    """A validated command of local socket ``sid`` (``kind`` tells accept from reject and the
    two relays apart)."""

    sid: str
    kind: ClientEvent
    command: Command


@dataclass(frozen=True, slots=True)
class Disconnected:
    """Socket ``sid`` of this node is gone (cleanly or not)."""

    sid: str


@dataclass(frozen=True, slots=True)
class FromNode:
    """``message`` from node ``origin``."""

    origin: str
    message: ClusterMessage


class ClaimResult(Enum):
    CLAIMED = "claimed"
    TAKEN = "taken"  # another holder has the name
    UNREACHABLE = "unreachable"  # the cluster's shared state is away; held here only


@dataclass(frozen=True, slots=True)
class ClaimAnswer:
    """What came of ``ClaimName(room, token)``."""

    room: str
    token: str
    result: ClaimResult


@dataclass(frozen=True, slots=True)
class NameLost:
    """The claim of ``room`` made with ``token`` was found held by another holder at renewal."""

    room: str
    token: str


@dataclass(frozen=True, slots=True)
class Undeliverable:
    """``message`` (of a ``ToNode`` or ``ToOwner``) did not get through: its node is not on the
    bus, its room has no holder (``unreachable`` False), or the cluster's shared state is away
    (``unreachable`` True)."""

    message: ClusterMessage
    unreachable: bool = False


Event = (
    Connected
    | Authenticated
    | ClientCommand
    | Disconnected
    | FromNode
    | ClaimAnswer
    | NameLost
    | Undeliverable
)


# --- effects ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Emit:
    """Emit ``event`` with ``body`` to each of the local sockets ``to``."""

    event: ServerEvent
    body: dict[str, Any]
    to: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ToOwner:
    """Send ``message`` to the node holding the name of ``message.room``, with the claim's token
    as ``message.token``; ``Undeliverable`` if nobody holds it, or another instance of the room
    does (a ``message.token`` that is not the claim's)."""

    message: ClusterMessage


@dataclass(frozen=True, slots=True)
class ClaimName:
    """Claim ``room``'s name with ``token`` cluster-wide, renewed while held; ``ClaimAnswer``
    follows, and ``NameLost`` if another holder has it at a renewal."""

    room: str
    token: str


@dataclass(frozen=True, slots=True)
class ReleaseName:
    """Give the name back, if ``token`` still holds it."""

    room: str
    token: str


@dataclass(frozen=True, slots=True)
class HandOffName:
    """Stop renewing the name without releasing it: another node claims it with ``token``."""

    room: str
    token: str


@dataclass(frozen=True, slots=True)
class Warn:
    """A WARNING line for the log (degraded service, not a bug)."""

    message: str


Effect = Emit | ToNode | ToOwner | ClaimName | ReleaseName | HandOffName | Warn

REJECT_EVENT: Final = {
    ClientEvent.AUTH_REQUEST: ServerEvent.AUTH_REJECT,
    ClientEvent.ROOM_CREATE_REQUEST: ServerEvent.ROOM_CREATE_REJECT,
    ClientEvent.ROOM_JOIN_REQUEST: ServerEvent.ROOM_JOIN_REJECT,
}


def reject(sid: str, kind: ClientEvent | str, message: str, payload: Maybe = MISSING) -> Emit:
    """Bad input answered with the event's own reject where the protocol has one, else with
    ``error`` naming the event (docs/protocols/rooms.md, "Errors and limits")."""
    event = REJECT_EVENT.get(kind) if isinstance(kind, ClientEvent) else None
    if event is None:
        return Emit(ServerEvent.ERROR, proto.error_body(message, str(kind), payload), (sid,))
    return Emit(event, proto.body(message=message, payload=payload), (sid,))


def too_many_rooms(limit: int) -> str:
    return f"too many rooms for one socket (limit {limit})"


TOO_MANY_PENDING: Final = "too many pending join requests for this room"


def too_many_requests(limit: int) -> str:
    return f"too many pending join requests for one socket (limit {limit})"


# --- state -----------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Socket:
    data: dict[str, Any] = field(default_factory=dict)  # {} or {"peerinfo": ...}
    rooms: dict[str, None] = field(default_factory=dict)  # member of, in join order
    # Rooms it asked to join and has no answer from (at most ``pending_per_socket``), to
    # withdraw the requests when it goes; never a room it is in.
    requested: dict[str, None] = field(default_factory=dict)
    creating: int = 0  # claims of new rooms on their way


@dataclass(eq=False, slots=True)
class _Room:
    """A room as this node knows it: the room itself on its owner's node (``authority``), a
    copy elsewhere. ``listed`` False: its name went to another room; it takes no more joins."""

    name: str
    token: str
    owner: str
    version: int
    members: dict[str, proto.Member]
    pending: dict[str, proto.Pending] = field(default_factory=dict)
    authority: bool = False
    listed: bool = True

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
    def of(cls, snap: proto.Snapshot, *, authority: bool) -> _Room:
        return cls(
            snap.room,
            snap.token,
            snap.owner,
            snap.version,
            dict(snap.members),
            dict(snap.pending),
            authority,
        )


@dataclass(frozen=True, slots=True)
class _Creating:
    sid: str
    room: str
    payload: Maybe


def _new_id() -> str:
    return str(uuid.uuid4())


class RoomsMachine:
    """The rooms protocol on node ``node_id``; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        limits: RoomLimits | None = None,
        new_id: Callable[[], str] = _new_id,
    ) -> None:
        self.node_id = node_id
        self.limits = limits or RoomLimits()
        self._new_id = new_id
        self._sockets: dict[str, _Socket] = {}
        self._rooms: dict[str, _Room] = {}
        self._local: dict[str, set[str]] = {}  # room -> this node's sockets in it
        self._creating: dict[str, _Creating] = {}  # claim token -> the create it answers
        # Rooms this node handed over: room -> (token, the node it went to), the latest last.
        self._moved: dict[str, tuple[str, str]] = {}

    # --- what the machine knows (for the hub's logs and for tests) ---
    def held(self) -> tuple[int, int]:
        """This node's sockets, and the rooms with at least one of them in (``/metrics``)."""
        return len(self._sockets), len(self._local)

    def rooms_of(self, sid: str) -> tuple[str, ...]:
        """The rooms local socket ``sid`` is in, in join order."""
        sock = self._sockets.get(sid)
        return tuple(sock.rooms) if sock is not None else ()

    def requested_by(self, sid: str) -> tuple[str, ...]:
        """The rooms local socket ``sid`` asked to join and is not in."""
        sock = self._sockets.get(sid)
        return tuple(r for r in sock.requested if r not in sock.rooms) if sock is not None else ()

    def room(self, name: str) -> proto.Snapshot | None:
        """Room ``name`` as this node knows it (pending requests only on its owner's node)."""
        room = self._rooms.get(name)
        return room.snapshot(with_pending=True) if room is not None else None

    def owns(self, name: str) -> bool:
        """True on the node where room ``name`` lives and while it holds the name."""
        room = self._rooms.get(name)
        return room is not None and room.authority and room.listed

    # --- events ---
    def handle(self, event: Event) -> list[Effect]:
        """The effects of ``event``, in the order they must be carried out."""
        out: list[Effect] = []
        match event:
            case ClientCommand():
                self._command(out, event)
            case FromNode():
                self._message(out, event.message)
            case Connected():
                self._sockets.setdefault(event.sid, _Socket())
            case Authenticated():
                sock = self._sockets.get(event.sid)
                if sock is not None and event.peerinfo is not MISSING:
                    sock.data = {"peerinfo": event.peerinfo}
            case Disconnected():
                self._disconnected(out, event.sid)
            case ClaimAnswer():
                self._claim_answer(out, event)
            case NameLost():
                room = self._rooms.get(event.room)
                if room is not None and room.token == event.token and room.authority:
                    self._name_lost(out, room)
            case Undeliverable():
                self._undeliverable(out, event)
        return out

    # --- output helpers ---
    def _deliver(
        self,
        out: list[Effect],
        room: str,
        event: ServerEvent,
        body: dict[str, Any],
        recipients: Iterable[tuple[str, str]],
    ) -> None:
        """``event`` to each (sid, node): one ``Emit`` for this node's sockets, one message to
        each other node with recipients (docs/protocols/rooms.md, "Many nodes")."""
        local: list[str] = []
        remote: dict[str, list[str]] = {}
        for sid, node in recipients:
            if node == self.node_id:
                if sid in self._sockets:
                    local.append(sid)
            else:
                remote.setdefault(node, []).append(sid)
        if local:
            if event is ServerEvent.ROOM_JOIN_REJECT:
                self._answered(room, local)
            out.append(Emit(event, body, tuple(local)))
        for node, sids in remote.items():
            msg = ClusterMessage(ClusterOp.EMIT, room, event=event, body=body, to=tuple(sids))
            out.append(ToNode(node, DIRECT_KIND, proto.encode_cluster(msg)))

    def _answered(self, room: str, sids: Iterable[str]) -> None:
        """The join requests of local sockets ``sids`` for ``room`` were refused: they no longer
        count against ``pending_per_socket`` nor need withdrawing."""
        for sid in sids:
            sock = self._sockets.get(sid)
            if sock is not None:
                sock.requested.pop(room, None)

    def _send(self, out: list[Effect], node: str, msg: ClusterMessage) -> None:
        """``msg`` to ``node``: handled right here when that is this node."""
        if node == self.node_id:
            self._message(out, msg)
        else:
            out.append(ToNode(node, DIRECT_KIND, proto.encode_cluster(msg)))

    def _push_snapshot(self, out: list[Effect], room: _Room, skip: str | None = None) -> None:
        """The owner's node tells every other node with members of the room's new state."""
        nodes = {m.node for m in room.members.values()} - {self.node_id, skip}
        if not nodes:
            return
        raw = proto.encode_cluster(
            ClusterMessage(
                ClusterOp.SNAPSHOT, room.name, token=room.token, snapshot=room.snapshot()
            )
        )
        for node in sorted(n for n in nodes if n is not None):
            out.append(ToNode(node, DIRECT_KIND, raw))

    def _ask_owner(self, out: list[Effect], room: _Room, sid: str, pending: proto.Pending) -> None:
        body = proto.body(
            room=room.name,
            peer_id=sid,
            payload=pending.payload,
            peerinfo=proto.peerinfo_of(pending.data),
        )
        if room.owner in self._sockets:
            out.append(Emit(ServerEvent.ROOM_JOIN_REQUEST, body, (room.owner,)))

    def _reject_join(
        self, out: list[Effect], room: str, sid: str, node: str, message: str, payload: Maybe
    ) -> None:
        """``room-join-reject`` to a requester, wherever it is."""
        body = proto.body(message=message, payload=payload)
        self._deliver(out, room, ServerEvent.ROOM_JOIN_REJECT, body, [(sid, node)])

    # --- client commands ---
    def _command(self, out: list[Effect], ev: ClientCommand) -> None:
        sock = self._sockets.get(ev.sid)
        if sock is None:
            return
        cmd = ev.command
        match cmd:
            case proto.CreateRoom():
                self._create(out, ev.sid, sock, ev.kind, cmd)
            case proto.JoinRoom():
                self._join(out, ev.sid, sock, ev.kind, cmd)
            case proto.Answer() if ev.kind is ClientEvent.ROOM_JOIN_ACCEPT:
                self._accept(out, ev.sid, ev.kind, cmd)
            case proto.Answer():
                self._refuse(out, ev.sid, ev.kind, cmd)
            case proto.Relay():
                self._relay(out, ev.sid, sock, ev.kind, cmd)

    def _room_count_ok(
        self, out: list[Effect], sid: str, sock: _Socket, kind: ClientEvent, payload: Maybe
    ) -> bool:
        limit = self.limits.rooms_per_socket
        if len(sock.rooms) + sock.creating >= limit:
            out.append(reject(sid, kind, too_many_rooms(limit), payload))
            return False
        return True

    def _name_ok(
        self, out: list[Effect], sid: str, kind: ClientEvent, name: str, payload: Maybe
    ) -> bool:
        limit = self.limits.name_length
        if len(name) > limit:
            out.append(
                reject(sid, kind, f"{kind}: 'room' is longer than {limit} characters", payload)
            )
            return False
        return True

    def _create(
        self, out: list[Effect], sid: str, sock: _Socket, kind: ClientEvent, cmd: proto.CreateRoom
    ) -> None:
        name = cmd.room if cmd.room is not None else self._new_id()
        if not self._name_ok(out, sid, kind, name, cmd.payload):
            return
        if not self._room_count_ok(out, sid, sock, kind, cmd.payload):
            return
        if name in self._rooms:  # a room of that name has members here: taken
            out.append(reject(sid, kind, proto.ROOM_TAKEN, cmd.payload))
            return
        token = self._new_id()
        self._creating[token] = _Creating(sid, name, cmd.payload)
        sock.creating += 1
        out.append(ClaimName(name, token))

    def _claim_answer(self, out: list[Effect], ev: ClaimAnswer) -> None:
        creating = self._creating.pop(ev.token, None)
        if creating is None:  # the claim of a room handed over to this node
            room = self._rooms.get(ev.room)
            if ev.result is ClaimResult.TAKEN and room is not None and room.token == ev.token:
                out.append(Warn(f"room {ev.room!r}: its name is held by another room now"))
                self._name_lost(out, room)
            return
        sid = creating.sid
        sock = self._sockets.get(sid)
        if sock is not None:
            sock.creating -= 1
        kind = ClientEvent.ROOM_CREATE_REQUEST
        if ev.result is ClaimResult.TAKEN:
            if sock is not None:
                out.append(reject(sid, kind, proto.ROOM_TAKEN, creating.payload))
            return
        if ev.result is ClaimResult.UNREACHABLE:  # nothing may be created unseen by the cluster
            out.append(ReleaseName(ev.room, ev.token))
            if sock is not None:
                out.append(reject(sid, kind, proto.BACKEND_DOWN, creating.payload))
            return
        if sock is None or ev.room in self._rooms:  # gone, or the name came to be used here
            out.append(ReleaseName(ev.room, ev.token))
            if sock is not None:
                out.append(reject(sid, kind, proto.ROOM_TAKEN, creating.payload))
            return
        member = proto.Member(self.node_id, sock.data)
        self._rooms[ev.room] = _Room(ev.room, ev.token, sid, 1, {sid: member}, authority=True)
        self._add_local(sid, sock, ev.room)
        body = proto.body(room=ev.room, payload=creating.payload)
        out.append(Emit(ServerEvent.ROOM_CREATE_ACCEPT, body, (sid,)))

    def _add_local(self, sid: str, sock: _Socket, room: str) -> None:
        sock.rooms[room] = None
        sock.requested.pop(room, None)
        self._local.setdefault(room, set()).add(sid)

    def _join(
        self, out: list[Effect], sid: str, sock: _Socket, kind: ClientEvent, cmd: proto.JoinRoom
    ) -> None:
        if not self._name_ok(out, sid, kind, cmd.room, cmd.payload):
            return
        if cmd.room in sock.rooms:
            out.append(reject(sid, kind, proto.ALREADY_IN_ROOM, cmd.payload))
            return
        if not self._room_count_ok(out, sid, sock, kind, cmd.payload):
            return
        limit = self.limits.pending_per_socket
        if cmd.room not in sock.requested and len(sock.requested) >= limit:
            # Asking again for a room already asked for is not one more.
            out.append(reject(sid, kind, too_many_requests(limit), cmd.payload))
            return
        sock.requested[cmd.room] = None
        msg = ClusterMessage(
            ClusterOp.JOIN_REQUEST,
            cmd.room,
            sid=sid,
            node=self.node_id,
            data=sock.data,
            payload=cmd.payload,
        )
        room = self._rooms.get(cmd.room)
        if room is not None and room.listed and room.owner in room.members:
            # Its owner's node is known here (this node, or from a snapshot); a stale one passes
            # the request on.
            owner_node = room.members[room.owner].node
            self._send(out, owner_node, replace(msg, token=room.token))
        else:
            out.append(ToOwner(msg))

    def _owned_by(
        self, out: list[Effect], sid: str, kind: ClientEvent, cmd: proto.Answer
    ) -> _Room | None:
        """The room if ``sid`` owns it here (only the owner answers, unlike in the original:
        docs/protocols/rooms.md, "What differs from wrtc-signal")."""
        room = self._rooms.get(cmd.room)
        if room is None or not room.authority or room.owner != sid:
            out.append(reject(sid, kind, proto.NOT_OWNER, cmd.payload))
            return None
        return room

    def _accept(self, out: list[Effect], sid: str, kind: ClientEvent, cmd: proto.Answer) -> None:
        room = self._owned_by(out, sid, kind, cmd)
        if room is None:
            return
        pending = room.pending.pop(cmd.peer_id, None)
        if pending is None:
            out.append(reject(sid, kind, proto.NO_PENDING_REQUEST, cmd.payload))
            return
        room.members[cmd.peer_id] = proto.Member(pending.node, pending.data)
        room.version += 1
        admit = ClusterMessage(
            ClusterOp.ADMIT,
            room.name,
            sid=cmd.peer_id,
            node=self.node_id,
            payload=cmd.payload,
            snapshot=room.snapshot(),
            token=room.token,
        )
        self._send(out, pending.node, admit)
        if self._rooms.get(room.name) is room and room.authority:
            self._push_snapshot(out, room, skip=pending.node)

    def _refuse(self, out: list[Effect], sid: str, kind: ClientEvent, cmd: proto.Answer) -> None:
        room = self._owned_by(out, sid, kind, cmd)
        if room is None:
            return
        pending = room.pending.pop(cmd.peer_id, None)
        if pending is None:
            out.append(reject(sid, kind, proto.NO_PENDING_REQUEST, cmd.payload))
            return
        body = proto.body(
            room=cmd.room, peer_id=cmd.peer_id, message=proto.OWNER_REJECTED, payload=cmd.payload
        )
        self._deliver(
            out, room.name, ServerEvent.ROOM_JOIN_REJECT, body, [(cmd.peer_id, pending.node)]
        )

    def _relay(
        self, out: list[Effect], sid: str, sock: _Socket, kind: ClientEvent, cmd: proto.Relay
    ) -> None:
        room = self._rooms.get(cmd.room)
        # Only between members of one room (the original relayed to any socket id:
        # docs/protocols/rooms.md, "Errors and limits").
        if cmd.room not in sock.rooms or room is None or cmd.to not in room.members:
            out.append(reject(sid, kind, proto.NOT_SHARING_ROOM, cmd.payload))
            return
        if kind is ClientEvent.RELAY_SESSION_DESCRIPTION:
            event, fields = ServerEvent.SESSION_DESCRIPTION, {"session_description": cmd.body}
        else:
            event, fields = ServerEvent.ICE_CANDIDATE, {"ice_candidate": cmd.body}
        # The original's fields, plus the sender's peerinfo (the README's promise).
        body = proto.body(
            peer_id=sid,
            **fields,
            room=cmd.room,
            payload=cmd.payload,
            peerinfo=proto.peerinfo_of(sock.data),
        )
        self._deliver(out, room.name, event, body, [(cmd.to, room.members[cmd.to].node)])

    # --- leaving ---
    def _disconnected(self, out: list[Effect], sid: str) -> None:
        sock = self._sockets.pop(sid, None)
        if sock is None:
            return
        # Its requests are withdrawn before it leaves its rooms: an owner's node that hears of
        # its leaving from this node has had the withdrawals sent to it first.
        for name in sock.requested:  # never a room it is in (joining forgets the request)
            withdraw = ClusterMessage(ClusterOp.WITHDRAW, name, sid=sid)
            room = self._rooms.get(name)
            if room is not None and room.authority:
                self._member_left(out, room, sid, None)
            elif room is not None and room.owner in room.members:
                self._send(out, room.members[room.owner].node, replace(withdraw, token=room.token))
            else:
                out.append(ToOwner(withdraw))
        for name in list(sock.rooms):
            self._leave(out, sid, sock, name)
        # A create still on its way finds the socket gone and releases the name.

    def _leave(self, out: list[Effect], sid: str, sock: _Socket, name: str) -> None:
        """Socket ``sid`` left room ``name``: the others get ``room-user-leave`` at once
        (docs/protocols/rooms.md, "Leaving"), the owner's node drops it."""
        self._forget_local(name, sid)
        room = self._rooms.get(name)
        if room is None:
            return
        if room.authority:
            self._member_left(out, room, sid, (), sock.data)
            return
        owner = room.members.get(room.owner)
        owner_node = owner.node if owner is not None else None
        # The members on the owner's node hear it from there: the leave goes there anyway.
        others = [(s, m.node) for s, m in room.members.items() if s != sid and m.node != owner_node]
        body = proto.body(room=name, peer_id=sid, peerinfo=proto.peerinfo_of(sock.data))
        self._deliver(out, name, ServerEvent.ROOM_USER_LEAVE, body, others)
        leave = ClusterMessage(
            ClusterOp.LEAVE,
            name,
            sid=sid,
            data=sock.data,
            token=room.token,
            to=tuple(s for s, _ in others),
        )
        if name not in self._local:
            del self._rooms[name]  # no member left here: the copy goes
        if owner_node is not None:
            self._send(out, owner_node, leave)
        else:
            out.append(ToOwner(leave))

    def _forget_local(self, name: str, sid: str) -> None:
        members = self._local.get(name)
        if members is None:
            return
        members.discard(sid)
        if not members:
            del self._local[name]

    def _member_left(
        self,
        out: list[Effect],
        room: _Room,
        sid: str,
        told: tuple[str, ...] | None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """On the owner's node: ``sid`` left (or gave up its request). The members not in
        ``told`` get ``room-user-leave`` (none when ``told`` is None: it never showed as a
        member). The room is handed over when its owner left, closed when its last member did."""
        room.pending.pop(sid, None)
        member = room.members.pop(sid, None)
        if member is None:
            return
        room.version += 1
        if told is not None:
            skip = set(told)
            rest = [(s, m.node) for s, m in room.members.items() if s not in skip]
            peerinfo = proto.peerinfo_of(data if data is not None else member.data)
            body = proto.body(room=room.name, peer_id=sid, peerinfo=peerinfo)
            self._deliver(out, room.name, ServerEvent.ROOM_USER_LEAVE, body, rest)
        if not room.members:
            del self._rooms[room.name]
            self._local.pop(room.name, None)
            out.append(ReleaseName(room.name, room.token))
            # Nobody is left to answer them (and their sockets may ask for other rooms).
            self._refuse_pending(out, room.name, room.pending)
            return
        if room.owner == sid:
            self._hand_over(out, room)
            return
        self._push_snapshot(out, room)

    def _hand_over(self, out: list[Effect], room: _Room) -> None:
        """The owner left: the member who joined earliest owns the room now, and join requests
        that were pending are delivered again to it (docs/protocols/rooms.md, "Leaving")."""
        room.owner = next(iter(room.members))
        new_node = room.members[room.owner].node
        if new_node == self.node_id:
            for sid, pending in room.pending.items():
                self._ask_owner(out, room, sid, pending)
            self._push_snapshot(out, room)
            return
        handover = ClusterMessage(
            ClusterOp.HANDOVER,
            room.name,
            token=room.token,
            snapshot=room.snapshot(with_pending=True),
        )
        room.authority = False
        room.pending.clear()
        if room.name not in self._local:
            del self._rooms[room.name]
        self._remember_moved(room.name, room.token, new_node)
        out.append(HandOffName(room.name, room.token))
        out.append(ToNode(new_node, DIRECT_KIND, proto.encode_cluster(handover)))
        self._push_snapshot(out, room, skip=new_node)

    def _name_lost(self, out: list[Effect], room: _Room) -> None:
        """Another room holds this room's name now. It is not taken back (that would overwrite
        the other room): this room keeps its members but takes no more joins; the requests that
        were pending are refused, and its owner is told."""
        if not room.authority or not room.listed:
            return
        room.listed = False
        self._refuse_pending(out, room.name, room.pending)
        room.pending.clear()
        if room.owner in self._sockets:
            message = proto.NAME_LOST.format(room=room.name)
            out.append(Emit(ServerEvent.ERROR, proto.error_body(message), (room.owner,)))

    def _refuse_pending(
        self, out: list[Effect], room: str, pending: dict[str, proto.Pending]
    ) -> None:
        """``room-join-reject`` "Room is not found." to every requester in ``pending``."""
        for sid, request in pending.items():
            self._reject_join(out, room, sid, request.node, proto.ROOM_NOT_FOUND, request.payload)

    def _remember_moved(self, room: str, token: str, node: str) -> None:
        self._moved.pop(room, None)
        self._moved[room] = (token, node)
        if len(self._moved) > MOVED_REMEMBERED:
            del self._moved[next(iter(self._moved))]

    # --- messages from other nodes ---
    def _message(self, out: list[Effect], msg: ClusterMessage) -> None:
        match msg.op:
            case ClusterOp.EMIT:
                to = tuple(sid for sid in msg.to if sid in self._sockets)
                if to and msg.event is ServerEvent.ROOM_JOIN_REJECT:
                    self._answered(msg.room, to)
                if to and msg.event is not None:
                    out.append(Emit(msg.event, msg.body, to))
            case ClusterOp.JOIN_REQUEST:
                self._on_join_request(out, msg)
            case ClusterOp.ADMIT:
                self._on_admit(out, msg)
            case ClusterOp.LEAVE | ClusterOp.WITHDRAW:
                self._on_leave(out, msg)
            case ClusterOp.SNAPSHOT:
                if msg.snapshot is not None and msg.room in self._local:
                    self._install(msg.snapshot)
            case ClusterOp.HANDOVER:
                self._on_handover(out, msg)

    def _owned(self, msg: ClusterMessage) -> _Room | None:
        """The room ``msg`` is for, if it lives here (and ``msg.token``, if any, is its own)."""
        room = self._rooms.get(msg.room)
        if room is None or not room.authority or (msg.token and msg.token != room.token):
            return None
        return room

    def _forward(self, out: list[Effect], msg: ClusterMessage) -> bool:
        """A message for a room this node does not own: pass it on, at most ``MAX_HOPS`` times.

        A room this node handed over goes straight to the node it went to: after the handover
        itself, on the same ordered way, so a requester's withdrawal that crossed the handover
        still finds its request there (a lookup of the name could still answer this node,
        until the new node has claimed it). Any other goes to the node holding the name."""
        if msg.hops >= MAX_HOPS:
            return False
        moved = self._moved.get(msg.room)
        if moved is not None and msg.token in ("", moved[0]) and moved[1] != self.node_id:
            token, node = moved
            forwarded = replace(msg, hops=msg.hops + 1, token=token)
            out.append(ToNode(node, DIRECT_KIND, proto.encode_cluster(forwarded)))
            return True
        out.append(ToOwner(replace(msg, hops=msg.hops + 1)))
        return True

    def _on_join_request(self, out: list[Effect], msg: ClusterMessage) -> None:
        room = self._owned(msg)
        if room is None or not room.listed:
            if not self._forward(out, replace(msg, token="")):
                self._join_failed(out, msg, proto.ROOM_NOT_FOUND)
            return
        if msg.sid in room.members:
            return
        pending_limit = self.limits.pending_per_room
        if len(room.pending) >= pending_limit and msg.sid not in room.pending:
            self._join_failed(out, msg, TOO_MANY_PENDING)
            return
        pending = proto.Pending(msg.node, msg.data, msg.payload)
        room.pending[msg.sid] = pending
        self._ask_owner(out, room, msg.sid, pending)

    def _join_failed(self, out: list[Effect], msg: ClusterMessage, message: str) -> None:
        self._reject_join(out, msg.room, msg.sid, msg.node, message, msg.payload)

    def _on_admit(self, out: list[Effect], msg: ClusterMessage) -> None:
        """The owner accepted ``msg.sid``, a socket of this node: it joins, learns who is there,
        and they learn it came."""
        snap = msg.snapshot
        if snap is None:
            return
        sid = msg.sid
        sock = self._sockets.get(sid)
        limit = self.limits.rooms_per_socket
        if sock is None or sid not in dict(snap.members) or len(sock.rooms) >= limit:
            refused = ClusterMessage(ClusterOp.WITHDRAW, msg.room, sid=sid, token=snap.token)
            self._send(out, msg.node, refused)
            if sock is not None:  # accepted into more rooms than it may hold, all at once
                sock.requested.pop(msg.room, None)
                body = proto.body(
                    room=msg.room,
                    peer_id=sid,
                    message=too_many_rooms(limit),
                    payload=msg.payload,
                )
                out.append(Emit(ServerEvent.ROOM_JOIN_REJECT, body, (sid,)))
            return
        self._install(snap)
        self._add_local(sid, sock, msg.room)
        members = dict(snap.members)
        accept = proto.body(
            room=msg.room,
            peer_id=sid,
            peers=[s for s in members if s != sid],
            peersinfo={s: member.data for s, member in members.items()},
            payload=msg.payload,
        )
        out.append(Emit(ServerEvent.ROOM_JOIN_ACCEPT, accept, (sid,)))
        joined = proto.body(
            room=msg.room, peer_id=sid, payload=msg.payload, peerinfo=proto.peerinfo_of(sock.data)
        )
        others = [(s, m.node) for s, m in members.items() if s != sid]
        self._deliver(out, msg.room, ServerEvent.ROOM_USER_JOIN, joined, others)

    def _install(self, snap: proto.Snapshot) -> None:
        """Keep a newer copy of a room this node has (or is getting) members of."""
        room = self._rooms.get(snap.room)
        if room is not None and (
            room.authority or (room.token == snap.token and room.version >= snap.version)
        ):
            return
        self._rooms[snap.room] = _Room.of(snap, authority=False)

    def _on_leave(self, out: list[Effect], msg: ClusterMessage) -> None:
        room = self._owned(msg)
        if room is None:
            self._forward(out, msg)
            return
        told = msg.to if msg.op is ClusterOp.LEAVE else None
        self._member_left(out, room, msg.sid, told, msg.data or None)

    def _on_handover(self, out: list[Effect], msg: ClusterMessage) -> None:
        snap = msg.snapshot
        if snap is None:
            return
        here = self._rooms.get(snap.room)
        if here is not None and here.authority:
            # Another room of that name lives here (one whose name was lost): the two cannot
            # share it. Never expected; the handed-over room is dropped, visibly.
            out.append(Warn(f"room {snap.room!r}: handover dropped, another room of that name"))
            return
        room = _Room.of(snap, authority=True)
        self._rooms[room.name] = room
        self._moved.pop(room.name, None)
        out.append(ClaimName(room.name, room.token))
        if room.owner not in self._sockets:  # the new owner left while the room was on its way
            self._member_left(out, room, room.owner, None)
            return
        for sid, pending in room.pending.items():
            self._ask_owner(out, room, sid, pending)

    def _undeliverable(self, out: list[Effect], ev: Undeliverable) -> None:
        msg = ev.message
        match msg.op:
            case ClusterOp.JOIN_REQUEST:
                message = proto.BACKEND_DOWN if ev.unreachable else proto.ROOM_NOT_FOUND
                self._join_failed(out, msg, message)
            case ClusterOp.ADMIT:  # the joiner's node is gone: so is the joiner
                room = self._owned(msg)
                if room is not None:
                    self._member_left(out, room, msg.sid, None)
            case ClusterOp.HANDOVER if msg.snapshot is not None:
                # The room has no owner's node now (docs/protocols/rooms.md, "Many nodes"):
                # nobody will answer its pending requests.
                self._refuse_pending(out, msg.room, dict(msg.snapshot.pending))
            case _:
                # A leave, copy or event for a node that is gone, or a handover that could not
                # be delivered (the room then has no owner's node: joins fail, members stay
                # connected, as when an owner's node dies: docs/protocols/rooms.md).
                pass


# --- the gate: what is checked of a socket before the machine sees its events ----------------

RATE_REPORT_INTERVAL: Final = 1.0
"""Seconds between two answers to a socket over its rate limit: a flood gets one error per
interval, not one per event."""

TOO_MANY_FAILURES: Final = "Too many wrong passwords from this address; retry later"
"""The error of ``POST /app`` from an address past ``APP_MAX_FAILURES`` (429)."""


@dataclass(eq=False, slots=True)
class Member:
    """What the gate keeps of one socket.io connection of this node (its rooms are the
    machine's)."""

    address: str
    bucket: TokenBucket
    last_error: float = float("-inf")  # when it was last told it is over its rate limit
    identity: Identity | None = None  # when ``AUTH`` names rooms


class Gate:
    """The rooms protocol's checks in front of its machine (docs/protocols/rooms.md, "Tokens"
    and "Errors and limits"): the handshake token of a connecting socket, then for each event
    the socket's rate limit, the event's name, the session token it carries, the shape of its
    data and the rooms its identity allows; ``auth-request`` is answered here. What passes goes
    to the machine, whose effects come back with the gate's own answers, in order.

    It holds no clock: every call is given the monotonic time (``now``, for the rate limit) and
    the wall-clock time (``wall``, for token expiry)."""

    def __init__(
        self,
        machine: RoomsMachine,
        secret: bytes,
        limits: proto.Limits,
        *,
        token_lifetime: int,
        rate: float = 0.0,
        burst: int = 1,
    ) -> None:
        self.machine = machine
        self.secret = secret
        self.limits = limits
        self.token_lifetime = token_lifetime
        self.rate = rate
        self.burst = burst
        self.members: dict[str, Member] = {}

    # --- sockets ---
    def refusal(self, auth: Any, wall: float) -> str | None:
        """Why a socket with handshake ``auth`` is refused (its message), or None to let it in.

        The original never answers a bad token and leaves the client hanging
        (docs/protocols/rooms.md, "Errors and limits"); this one refuses the connection."""
        token = auth.get("token") if isinstance(auth, dict) else None
        if token is None:
            return proto.TOKEN_REQUIRED
        if not proto.verify_handshake(token, self.secret, wall):
            return proto.TOKEN_NOT_VALID
        return None

    def connected(
        self, sid: str, address: str, now: float, identity: Identity | None = None
    ) -> Member:
        """Socket ``sid`` passed the handshake."""
        member = self.members[sid] = Member(
            address, TokenBucket(self.rate, self.burst, now), identity=identity
        )
        self.machine.handle(Connected(sid))
        return member

    def disconnected(self, sid: str) -> list[Effect] | None:
        """Socket ``sid`` went: the effects of its leaving, or None for a socket never let in."""
        if self.members.pop(sid, None) is None:
            return None
        return self.machine.handle(Disconnected(sid))

    # --- events ---
    def event(self, sid: str, event: Any, data: Any, now: float, wall: float) -> list[Effect]:
        """The effects of event ``event`` (any name, any data) from local socket ``sid``."""
        member = self.members.get(sid)
        if member is None:
            return []
        name = event if isinstance(event, str) else repr(event)
        if not member.bucket.allow(now):
            if now - member.last_error < RATE_REPORT_INTERVAL:
                return []
            member.last_error = now
            message = f"rate limit exceeded ({member.bucket.rate:g} events/s); events dropped"
            return [reject(sid, name, message)]
        try:
            kind = ClientEvent(event)
        except ValueError:
            return [reject(sid, name[:64], f"unknown event {name[:64]!r}")]
        try:
            if kind is ClientEvent.AUTH_REQUEST:
                return self._auth_request(sid, data, wall)
            auth = data.get("auth") if isinstance(data, dict) else None
            if not proto.verify_session(auth, self.secret, sid, wall):
                return [Emit(ServerEvent.UNAUTHORIZED, {"message": proto.TOKEN_NOT_VALID}, (sid,))]
            command = self._parse(kind, data)
            if member.identity is not None:
                check_room(member.identity, command)
            return self.machine.handle(ClientCommand(sid, kind, command))
        except proto.BadEvent as exc:
            return [reject(sid, kind, exc.message, exc.payload)]

    def _parse(self, kind: ClientEvent, data: Any) -> Command:
        limits = self.limits
        match kind:
            case ClientEvent.ROOM_CREATE_REQUEST:
                return proto.parse_create(data, limits)
            case ClientEvent.ROOM_JOIN_REQUEST:
                return proto.parse_join(data, limits)
            case ClientEvent.ROOM_JOIN_ACCEPT | ClientEvent.ROOM_JOIN_REJECT:
                return proto.parse_answer(kind, data, limits)
            case _:
                return proto.parse_relay(kind, data, limits)

    def _auth_request(self, sid: str, data: Any, wall: float) -> list[Effect]:
        """``auth-request``: an app token in, a session token for this socket out."""
        cmd = proto.parse_auth_request(data, self.limits)
        token_data = proto.verify_token(cmd.token, self.secret)
        if token_data is None:
            raise proto.BadEvent(proto.TOKEN_NOT_VALID, cmd.payload)
        self.machine.handle(Authenticated(sid, cmd.peerinfo))
        exp = int(wall) + self.token_lifetime
        token = proto.session_token(token_data["app"], sid, exp, self.secret)
        return [Emit(ServerEvent.AUTH_ACCEPT, proto.body(payload=cmd.payload, token=token), (sid,))]

    # --- POST /app ---
    def app_token(self, form: Any, password: str) -> tuple[int, dict[str, Any]]:
        """``POST /app``'s status and body for the decoded ``form`` (any JSON or form data),
        the server's app password given (docs/protocols/rooms.md, "POST /app"). A 401 is a
        wrong password, which the caller counts against the client's address."""
        if not isinstance(form, dict) and not hasattr(form, "get"):
            return api_error(400, "Request body must be an object")
        given = form.get("password")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), password.encode()):
            return api_error(401, proto.UNAUTHORIZED_HTTP)
        app = form.get("app")
        if not isinstance(app, str) or not app:
            return api_error(400, proto.APP_REQUIRED)
        return 200, {
            "status": 200,
            "error": None,
            "response": {"token": proto.app_token(app, self.secret)},
        }


def api_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """The original's ``ErrorHandler`` body: ``{status, error, response: false}``."""
    return status, {"status": status, "error": message, "response": False}


def check_room(identity: Identity, command: Command) -> None:
    """Refuse (``BadEvent``) a create or join of a room the socket's token does not allow."""
    if not isinstance(command, proto.CreateRoom | proto.JoinRoom):
        return
    if command.room is None:
        if identity.rooms is not None:
            raise proto.BadEvent("a room name is required by this token", command.payload)
    elif not identity.may_use_room(command.room):
        message = f"room {command.room[:100]!r} not allowed for this token"
        raise proto.BadEvent(message, command.payload)
