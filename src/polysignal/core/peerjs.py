"""PeerJS's rules for one node, as a state machine (docs/protocols/peerjs.md).

``PeerJsNode`` holds this node's clients (id -> token digest, connection, when a frame last
came), the messages queued for ids that are not connected, and the routing of every message,
with no event loop, no clock and no I/O. The server's hub (``server/peerjs.py``) feeds it events
and carries out the effects each returns, in their order (``core/effects.py``); what it learns by
carrying one out (a claim's answer, a lookup's, a send to another node that failed) comes back as
an event.

=========================================  =================================================
event                                      effects it may return
=========================================  =================================================
``on_open(conn, query, now)``              ``Send`` ERROR or ID-TAKEN then ``Close``; or
                                           ``Claim`` the id (a ghost holder here is closed);
                                           or, for its own token, ``Send`` OPEN and the queue
``on_claimed(claim, ok)``                  ``Send`` OPEN and the queue; or ID-TAKEN, ``Close``
``on_message(conn, data, now)``            ``Send`` to a local peer, ``Lookup`` one elsewhere,
                                           queue it; ``Send`` ERROR for bad input
``on_lookup(lookup, node, now)``           ``ToNode`` (the relay); or queue it (``EXPIRE`` at
                                           once past a bound); a queue's messages ``ToNode``
``on_relay(node, payload, now)``           ``Send`` to a local peer, or queue it here
``on_undelivered(effect)``                 ``EXPIRE`` to the sender of a relay that found no
                                           node
``on_timer(now)``                          ``Close`` silent clients; ``EXPIRE`` for unread
                                           queues; ``Lookup`` the ids messages wait for
``on_evict`` / ``on_id_lost``              ``Close`` the holder, ``Release``
``on_close(conn)``                         ``Release`` its id
=========================================  =================================================

Liveness: every frame a client sends refreshes it (the client sends ``HEARTBEAT`` every 5 s). A
client silent for ``alive_timeout`` is closed. A client silent for ``stale_after`` (two
heartbeats missed), or whose socket is closing or gone, no longer blocks its id: a connection
with another token takes the id over at once (``holder_live``).

Queues: a message for an id connected nowhere waits on the node where it was found so; the
queue's ids are looked up every ``QUEUE_RECHECK`` seconds and its messages handed to the node
the id appears on. ``expire_timeout`` after a queue was started, whatever is still in it is
dropped and each of its senders gets one ``EXPIRE``. A message over the queue's bounds (count or
bytes for its id, bytes for the node) is not queued: its sender gets ``EXPIRE`` at once.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from polysignal.core.effects import Close, Conn, Send, ToNode
from polysignal.core.errors import CloseCode
from polysignal.protocols import peerjs as proto
from polysignal.protocols.peerjs import NOT_QUEUED, BadMessage, ErrorText, MessageType

CLAIM_PREFIX = "peerjs:"
"""Each client's id is claimed cluster-wide under ``peerjs:<id>``."""
RELAY_KIND = "peerjs"
"""Direct message: a relayed frame for a client connected to the receiving node."""
PROBE_KIND = "peerjs-probe"
"""Direct message: is the holder of this id (this token digest) alive on your node?"""
PROBED_KIND = "peerjs-probed"
"""Direct message: the answer to a probe."""
EVICT_KIND = "peerjs-evict"
"""Direct message: another node took this holder's id over; close its socket."""
QUEUE_RECHECK = 0.5
"""Seconds between two lookups of an id that messages are queued for."""


def claim_key(peer_id: str) -> str:
    """The backend key of ``peer_id``'s claim."""
    return CLAIM_PREFIX + peer_id


# --- the effects of PeerJS's own (the others are core/effects.py's) ----------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """Claim ``peer_id`` cluster-wide for ``conn``'s client with owner token ``token`` (the
    digest of its PeerJS token); a holder found stale is taken over. ``on_claimed`` answers."""

    conn: Conn
    peer_id: str
    token: str

    @property
    def key(self) -> str:
        return claim_key(self.peer_id)


@dataclass(frozen=True, slots=True)
class Release:
    """Give ``peer_id``'s claim back, if ``token`` still holds it here."""

    peer_id: str
    token: str

    @property
    def key(self) -> str:
        return claim_key(self.peer_id)


@dataclass(frozen=True, slots=True)
class Lookup:
    """Find the node holding ``target``'s claim; ``on_lookup`` answers. ``frame`` is the message
    of type ``type`` from ``src`` to deliver there (None: the check of ``target``'s queue)."""

    target: str
    frame: bytes | None = None
    type: MessageType | None = None
    src: str = ""

    @property
    def key(self) -> str:
        return claim_key(self.target)


Effect = Send | Close | ToNode | Claim | Release | Lookup
Effects = Sequence[Effect]


@dataclass(eq=False, slots=True)
class _Client:
    """One local client: its id, token digest, connection, the time of its last frame, and
    whether it was sent OPEN (False while its claim is on its way)."""

    id: str
    token: str
    conn: Conn
    seen: float
    open: bool = False


@dataclass(eq=False, slots=True)
class _Queue:
    """Frames waiting for one id, with their senders, from ``created`` on."""

    created: float
    frames: deque[tuple[str, bytes]] = field(default_factory=deque)
    size: int = 0


def _never_closing(conn: Conn) -> bool:
    return False


class PeerJsNode:
    """The PeerJS clients, queues and routing of one node (see the module docstring).

    ``is_closing(conn)`` tells whether a local connection's socket is closing or gone (a socket
    starts closing in many places of the server, so this is asked, not told).
    """

    def __init__(
        self,
        node_id: str,
        *,
        key: str = "peerjs",
        concurrent_limit: int = 5000,
        alive_timeout: float = 60.0,
        expire_timeout: float = 5.0,
        stale_after: float = 10.0,
        queue_messages: int = 64,
        queue_bytes: int = 256 * 1024,
        queue_node_bytes: int = 64 << 20,
        is_closing: Callable[[Conn], bool] = _never_closing,
    ) -> None:
        self.node_id = node_id
        self.key = key
        self.concurrent_limit = concurrent_limit
        self.alive_timeout = alive_timeout
        self.expire_timeout = expire_timeout
        self.stale_after = stale_after
        self.queue_messages = queue_messages
        self.queue_bytes = queue_bytes
        self.queue_node_bytes = queue_node_bytes
        self._is_closing = is_closing
        self._clients: dict[str, _Client] = {}
        self._by_conn: dict[Conn, _Client] = {}
        self._seen: dict[_Client, None] = {}  # by the time of their last frame, oldest first
        self._queues: dict[str, _Queue] = {}  # by creation, oldest first
        self._checks: dict[str, float] = {}  # id -> next lookup, soonest first
        self.queued_bytes = 0
        # Decoded frames by their ``type`` (``/metrics``; counted here, where it is known).
        self.received: dict[str, int] = {}
        # Set when an event may have made ``next_deadline`` sooner (a new client, a new queue);
        # the hub re-arms its timer then, and only then: a relayed message only moves its
        # sender's deadline later, so the busiest path never computes it.
        self.sooner = False

    # --- queries ---
    def next_deadline(self) -> float | None:
        """When ``on_timer`` is next due (None: nothing waits)."""
        due: list[float] = []
        if self._seen and self.alive_timeout > 0:
            due.append(next(iter(self._seen)).seen + self.alive_timeout)
        if self._queues:
            due.append(next(iter(self._queues.values())).created + self.expire_timeout)
        if self._checks:
            due.append(next(iter(self._checks.values())))
        return min(due) if due else None

    def ids(self) -> list[str]:
        """The ids of this node's clients that were sent OPEN."""
        return [peer_id for peer_id, client in self._clients.items() if client.open]

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._clients

    def held(self) -> int:
        """The ids held by this node's clients (``/metrics``)."""
        return len(self._clients)

    def queued(self, peer_id: str) -> int:
        """How many messages wait here for ``peer_id``."""
        queue = self._queues.get(peer_id)
        return 0 if queue is None else len(queue.frames)

    def holder_live(self, peer_id: str, token: str, now: float) -> bool:
        """Whether the client holding ``peer_id`` with ``token`` here still blocks the id: its
        socket is open and it sent a frame less than ``stale_after`` seconds ago."""
        client = self._clients.get(peer_id)
        return client is not None and client.token == token and self._live(client, now)

    def _live(self, client: _Client, now: float) -> bool:
        return not self._is_closing(client.conn) and now - client.seen < self.stale_after

    # --- connections ---
    def on_open(self, conn: Conn, query: str, now: float) -> Effects:
        """A WebSocket opened on the PeerJS path with ``query``: refuse it, re-attach its
        session, or claim its id."""
        params = proto.parse_query(query)
        error = proto.check_params(params, self.key)
        if error is not None:
            return self._refuse(conn, proto.encode_error(error))
        token = proto.token_digest(params.id, params.token)
        client = self._clients.get(params.id)
        effects: list[Effect] = []
        if client is not None:
            if hmac.compare_digest(client.token, token):
                return self._attach(client, conn, now)
            if self._live(client, now):
                return self._refuse(conn, proto.ID_TAKEN_FRAME)
            effects.extend(self._drop(client, "id taken over"))  # a ghost: its id is free
        elif len(self._clients) >= self.concurrent_limit:
            return self._refuse(conn, proto.encode_error(ErrorText.CONNECTION_LIMIT_EXCEED))
        client = _Client(params.id, token, conn, now)
        self._clients[client.id] = client
        self._by_conn[conn] = client
        self._seen[client] = None
        self.sooner = True
        effects.append(Claim(conn, client.id, token))
        return effects

    def on_claimed(self, claim: Claim, ok: bool) -> Effects:
        """The cluster's answer to ``claim``: the id is the client's (OPEN, then what was
        queued for it), or a live holder elsewhere has it (ID-TAKEN)."""
        client = self._clients.get(claim.peer_id)
        if client is None or client.token != claim.token:
            # Gone meanwhile: a claim made for nobody is given back.
            return (Release(claim.peer_id, claim.token),) if ok else ()
        if not ok:
            self._forget(client)
            return self._refuse(client.conn, proto.ID_TAKEN_FRAME)
        client.open = True
        return [Send(client.conn, proto.OPEN_FRAME), *self._flush(client.id, client.conn)]

    def on_close(self, conn: Conn) -> Effects:
        """``conn``'s socket is gone: its client is forgotten and its id given back."""
        client = self._by_conn.get(conn)
        if client is None:
            return ()
        self._forget(client)
        return (Release(client.id, client.token),) if client.open else ()

    def on_evict(self, holder: proto.Holder) -> Effects:
        """Another node took ``holder``'s id over (its holder was stale): its socket closes."""
        client = self._clients.get(holder.id)
        if client is None or client.token != holder.token:
            return ()
        return self._drop(client, "id taken over")

    def on_id_lost(self, peer_id: str, token: str) -> Effects:
        """The lease renewal found ``peer_id`` held by another holder: its socket closes."""
        return self.on_evict(proto.Holder(peer_id, token))

    def clear(self) -> None:
        """The node stops: forget every queue (the backend drops the claims)."""
        self._queues.clear()
        self._checks.clear()
        self.queued_bytes = 0

    def _attach(self, client: _Client, conn: Conn, now: float) -> Effects:
        """The same id with the same token: the session moves to ``conn`` (an older socket is
        closed) and, once claimed, is sent OPEN and what was queued."""
        effects: list[Effect] = []
        old = client.conn
        if old is not conn:
            self._by_conn.pop(old, None)
            effects.append(Close(old, CloseCode.NORMAL, "replaced by a newer connection"))
        client.conn = conn
        self._by_conn[conn] = client
        self._touch(client, now)
        if client.open:
            effects.append(Send(conn, proto.OPEN_FRAME))
            effects.extend(self._flush(client.id, conn))
        return effects

    def _refuse(self, conn: Conn, frame: bytes) -> Effects:
        return (Send(conn, frame), Close(conn, CloseCode.NORMAL))

    def _drop(self, client: _Client, reason: str) -> Effects:
        self._forget(client)
        close = Close(client.conn, CloseCode.NORMAL, reason)
        return (close, Release(client.id, client.token)) if client.open else (close,)

    def _forget(self, client: _Client) -> None:
        if self._clients.get(client.id) is client:
            del self._clients[client.id]
        if self._by_conn.get(client.conn) is client:
            del self._by_conn[client.conn]
        self._seen.pop(client, None)

    def _touch(self, client: _Client, now: float) -> None:
        client.seen = now
        seen = self._seen
        seen.pop(client, None)
        seen[client] = None  # the most recent goes last

    # --- messages ---
    def on_message(self, conn: Conn, data: bytes, now: float) -> Effects:
        """One frame from ``conn``'s client (binary frames are read as JSON text too)."""
        client = self._by_conn.get(conn)
        if client is None or not client.open:
            return ()  # its socket is closing
        self._touch(client, now)
        try:
            message = proto.decode(data)
        except BadMessage as exc:
            return (Send(conn, proto.encode_error(exc.message)),)
        received = self.received
        received[message.type] = received.get(message.type, 0) + 1
        if message.type is MessageType.HEARTBEAT:
            return ()
        dst = message.dst
        if dst is None:
            if message.type is MessageType.LEAVE:
                return self._drop(client, "left")  # the original forgets the id
            return (Send(conn, proto.encode_error(ErrorText.MISSING_DST)),)
        frame = proto.encode_relayed(message, client.id)
        return self._route(message.type, client.id, dst, frame, now)

    def on_rate_limited(self, conn: Conn, report: bool) -> Effects:
        """A frame over ``conn``'s rate limit is dropped; the client hears it once a second."""
        client = self._by_conn.get(conn)
        if not report or client is None or not client.open:
            return ()
        return (Send(conn, proto.encode_error(ErrorText.RATE_LIMITED)),)

    def _route(self, kind: MessageType, src: str, dst: str, frame: bytes, now: float) -> Effects:
        """``frame`` from ``src`` for ``dst``, wherever it is."""
        if dst in self._clients:
            return self._here(kind, src, dst, frame, now)
        return (Lookup(dst, frame, kind, src),)

    def _here(self, kind: MessageType, src: str, dst: str, frame: bytes, now: float) -> Effects:
        """``frame`` for ``dst``, which is connected nowhere else: delivered to it here, queued
        while it is not (yet) open, or, to a socket that is closing, answered with ``LEAVE`` as
        the original does."""
        target = self._clients.get(dst)
        if target is None or not target.open:
            return self._enqueue(kind, src, dst, frame, now)
        if self._is_closing(target.conn):
            if kind in NOT_QUEUED:
                return ()
            return self._notice(MessageType.LEAVE, dst, src)
        return (Send(target.conn, frame),)

    def _notice(self, kind: MessageType, src: str, dst: str) -> Effects:
        """``EXPIRE`` or ``LEAVE`` from ``src``, made by the server, for ``dst`` wherever it is
        (never queued, never answered)."""
        frame = proto.encode_notice(kind, src, dst)
        target = self._clients.get(dst)
        if target is None:
            return (Lookup(dst, frame, kind, src),)
        if not target.open or self._is_closing(target.conn):
            return ()
        return (Send(target.conn, frame),)

    def on_lookup(self, lookup: Lookup, node: str | None, now: float) -> Effects:
        """The cluster's answer to ``lookup``: ``node`` holds the target's claim (None: nobody;
        this node itself, while the target is not connected here, counts as nobody)."""
        if node == self.node_id:
            node = None
        target = lookup.target
        frame = lookup.frame
        if frame is None:  # a queue's check
            queue = self._queues.get(target)
            if queue is None or node is None:
                return ()
            self._discard(target)
            return [ToNode(node, RELAY_KIND, queued) for _, queued in queue.frames]
        assert lookup.type is not None
        if target in self._clients:  # connected here meanwhile
            return self._here(lookup.type, lookup.src, target, frame, now)
        if node is not None:
            return (ToNode(node, RELAY_KIND, frame),)
        return self._enqueue(lookup.type, lookup.src, target, frame, now)

    def on_lookup_failed(self, lookup: Lookup, now: float) -> Effects:
        """The cluster could not be asked (its backend is away): as if nobody held the id."""
        return self.on_lookup(lookup, None, now)

    def on_relay(self, node: str, payload: bytes, now: float) -> Effects:
        """A frame from a client on ``node`` for one of ours (``MalformedFrame`` if it is not
        one); queued here if its target is not connected."""
        relayed = proto.decode_relayed(payload)
        return self._here(relayed.type, relayed.src, relayed.dst, relayed.frame, now)

    def on_undelivered(self, effect: ToNode) -> Effects:
        """A relay could not be handed to its node (gone): its sender gets ``EXPIRE``."""
        if effect.kind != RELAY_KIND:
            return ()
        relayed = proto.decode_relayed(effect.payload)
        if relayed.type in NOT_QUEUED:
            return ()
        return self._notice(MessageType.EXPIRE, relayed.dst, relayed.src)

    # --- queues ---
    def _enqueue(self, kind: MessageType, src: str, dst: str, frame: bytes, now: float) -> Effects:
        if kind in NOT_QUEUED:
            return ()
        queue = self._queues.get(dst)
        count, size = (0, 0) if queue is None else (len(queue.frames), queue.size)
        cost = len(frame)
        if (
            count + 1 > self.queue_messages
            or size + cost > self.queue_bytes
            or self.queued_bytes + cost > self.queue_node_bytes
        ):
            return self._notice(MessageType.EXPIRE, dst, src)
        if queue is None:
            queue = self._queues[dst] = _Queue(now)
            self._checks[dst] = now + min(QUEUE_RECHECK, self.expire_timeout)
            self.sooner = True
        queue.frames.append((src, frame))
        queue.size += cost
        self.queued_bytes += cost
        return ()

    def _flush(self, peer_id: str, conn: Conn) -> Effects:
        queue = self._discard(peer_id)
        if queue is None:
            return ()
        return [Send(conn, frame) for _, frame in queue.frames]

    def _discard(self, peer_id: str) -> _Queue | None:
        queue = self._queues.pop(peer_id, None)
        if queue is not None:
            self._checks.pop(peer_id, None)
            self.queued_bytes -= queue.size
        return queue

    # --- the timer ---
    def on_timer(self, now: float) -> Effects:
        """Silent clients are closed; unread queues expire (one ``EXPIRE`` per sender); the ids
        messages wait for are looked up."""
        effects: list[Effect] = []
        seen = self._seen
        while seen and self.alive_timeout > 0:
            client = next(iter(seen))
            if client.seen + self.alive_timeout > now:
                break
            effects.extend(self._drop(client, "alive timeout"))
            self._discard(client.id)  # as the original: what waited for it goes too
        queues = self._queues
        while queues:
            dst, queue = next(iter(queues.items()))
            if queue.created + self.expire_timeout > now:
                break
            self._discard(dst)
            for src in dict.fromkeys(src for src, _ in queue.frames):
                effects.extend(self._notice(MessageType.EXPIRE, dst, src))
        checks = self._checks
        due = []
        for dst, at in checks.items():
            if at > now:
                break
            due.append(dst)
        for dst in due:
            del checks[dst]
            checks[dst] = now + QUEUE_RECHECK  # the soonest stay first
            effects.append(Lookup(dst))
        return effects
