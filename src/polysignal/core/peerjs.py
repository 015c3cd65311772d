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
``claim(claim, now)``                      a generator (below): ``on_claimed``'s effects
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
``on_lookup_error(lookup, error, now)``    ``Fault``, then as ``on_lookup_failed``
``on_send_error(effect, error)``           ``Fault``, then as ``on_undelivered``
``on_probe(node, payload, now)``           ``Notify`` the node whether its holder is live
``on_taken_over(peer_id, node, owner)``    ``Close`` the holder here, or ``Notify`` its node
``on_evict`` / ``on_id_lost``              ``Close`` the holder, ``Release``
``on_close(conn)``                         ``Release`` its id
=========================================  =================================================

Claims: each client's id is claimed cluster-wide under ``peerjs:<id>`` with the lease owner
token ``<token digest>:<node id>`` (``lease_owner``), so the same client on another node takes
its claim over at once, evicting its older socket.

A claim runs as a generator, as the relay's rendezvous does (``core/relay.py``): ``claim``
yields what it needs of the hub (``ClaimOp``, ``Lookup``, ``ProbeOp``, ``TakeOp``), is sent each
answer (a failure thrown in), and returns ``on_claimed``'s effects. A claim held with another
token is asked about: by this machine if the holder is here, else by a probe to the holder's
node. A holder that is stale (``holder_live``) or whose node does not receive the probe is taken
over; a live one answers ID-TAKEN. A probe its node does not answer within ``PROBE_TIMEOUT``
counts as live: a slow node keeps its clients.

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
import itertools
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from polysignal.core.effects import Close, Conn, Fault, Send, ToNode
from polysignal.core.errors import BackendUnavailable, CloseCode
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
CLAIM_ATTEMPTS = 3
"""Rounds of claim and look up when the holder keeps going away in between."""
PROBE_TIMEOUT = 2.0
"""Seconds a claim waits for the holder's node to say whether the holder is live."""
PEERS_LIMIT = 100_000
"""Most ids ``GET {path}{key}/peers`` lists."""
NEW_ID_ATTEMPTS = 8
"""Random ids drawn for ``GET {path}{key}/id`` until one is not held here."""


def claim_key(peer_id: str) -> str:
    """The backend key of ``peer_id``'s claim."""
    return CLAIM_PREFIX + peer_id


def owner_digest(owner: str) -> str:
    """The client's token digest in a claim's owner token (``PeerJsNode.lease_owner``)."""
    return owner.partition(":")[0]


def mount(path: str) -> str:
    """``PEERJS_PATH`` as a prefix ending in ``/``: the client appends ``peerjs`` and
    ``{key}/id`` to it."""
    return path.rstrip("/") + "/"


def allowed_origin(origin: str | None, allowed: Sequence[str]) -> str | None:
    """The ``Access-Control-Allow-Origin`` for a request from ``origin``, as the ``cors``
    package of the original: the origin echoed when any origin is allowed (``allowed`` empty)
    or it is on the list; else none."""
    if origin and (not allowed or origin in allowed):
        return origin
    return None


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


@dataclass(frozen=True, slots=True)
class Notify:
    """Hand ``payload`` to ``node``'s handler of ``kind``, and wait for nothing: a failure is
    noted (``what`` says what could not be done) and changes nothing here."""

    node: str
    kind: str
    payload: bytes
    what: str


Effect = Send | Close | ToNode | Claim | Release | Lookup | Notify | Fault
Effects = Sequence[Effect]


# --- what a claim asks of the hub while it runs (each answer is sent back into it) -------------


@dataclass(frozen=True, slots=True)
class ClaimOp:
    """Claim ``claim``'s id as ``owner`` if it is free (or ``owner``'s already); answered True
    or False. The hub holds it as a lease, renewed until released (one the backend does not
    answer promptly is held here meanwhile: backends/lease.py)."""

    claim: Claim
    owner: str


@dataclass(frozen=True, slots=True)
class ProbeOp:
    """Hand ``payload`` (a ``PROBE_KIND`` direct message: is your holder live?) to ``node`` and
    wait up to ``within`` seconds for its answer to ``ask``: answered with that answer, or None
    when no node received it. ``TimeoutError`` (no answer in time) and ``BackendUnavailable``
    are thrown in."""

    node: str
    ask: int
    payload: bytes
    within: float


@dataclass(frozen=True, slots=True)
class TakeOp:
    """Take ``claim``'s id over, as ``owner``, from its holder on ``node``: the holder's claim
    is released and ``on_taken_over`` says how its socket closes."""

    claim: Claim
    owner: str
    node: str


Op = ClaimOp | Lookup | ProbeOp | TakeOp
"""What a claim asks of the hub; a ``Lookup`` is answered with the holder of its key (its
``node_id`` and owner ``token``) or None."""
Work = Generator[Op, Any, Effects]
"""A claim in progress: it yields what it needs of the hub and is sent each answer (a failure
thrown in); it returns the effects that follow (``on_claimed``'s)."""


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
        new_id: Callable[[], str] = proto.new_id,
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
        self._new_id = new_id
        self._asks = itertools.count(1)  # the numbers of this node's probes
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

    def new_id(self) -> str:
        """An id no client of this node holds (as the original's ``generateClientId``)."""
        for _ in range(NEW_ID_ATTEMPTS):
            peer_id = self._new_id()
            if peer_id not in self._clients:
                return peer_id
        return self._new_id()  # random UUIDs never collide that often: taken as it comes

    def peers(self, claimed: Iterable[str]) -> list[str]:
        """Every connected id of the cluster: this node's, then those of the ``claimed`` keys
        (the cluster's claims), each once, at most ``PEERS_LIMIT``."""
        ids = dict.fromkeys(self.ids())
        ids.update(dict.fromkeys(key[len(CLAIM_PREFIX) :] for key in claimed))
        return list(ids)[:PEERS_LIMIT]

    def lease_owner(self, token: str) -> str:
        """The owner token of a claim by the client with token digest ``token``: the digest
        and this node, so the same client on another node takes its claim over (and its older
        socket here is evicted)."""
        return f"{token}:{self.node_id}"

    # --- claims ---
    def claim(self, claim: Claim, now: float) -> Work:
        """Claim ``claim``'s id cluster-wide (see the module docstring), a holder with another
        token asked about at ``now``; returns ``on_claimed``'s effects."""
        owner = self.lease_owner(claim.token)
        for _ in range(CLAIM_ATTEMPTS):
            if (yield ClaimOp(claim, owner)):
                return self.on_claimed(claim, True)
            try:
                holder = yield Lookup(claim.peer_id)
            except BackendUnavailable as exc:
                fault = Fault("lookup", f"cannot look up {claim.peer_id}", exc)
                return (fault, *self.on_claimed(claim, False))
            if holder is None:
                continue  # released in between
            token = owner_digest(holder.token)
            if token != claim.token and (
                yield from self._blocks(claim.peer_id, holder.node_id, token, now)
            ):
                return self.on_claimed(claim, False)
            yield TakeOp(claim, owner, holder.node_id)
            return self.on_claimed(claim, True)
        return self.on_claimed(claim, False)

    def _blocks(self, peer_id: str, node: str, token: str, now: float) -> Generator[Op, Any, bool]:
        """Whether the holder of ``peer_id`` on ``node`` with ``token`` still blocks it: asked
        of this machine, or of its node (a node the probe reaches nowhere is gone: so is the
        holder)."""
        if node == self.node_id:
            return self.holder_live(peer_id, token, now)
        ask = next(self._asks)
        probe = proto.encode_holder(proto.Holder(peer_id, token, ask))
        try:
            live = yield ProbeOp(node, ask, probe, PROBE_TIMEOUT)
        except (BackendUnavailable, TimeoutError):
            return True  # cannot tell: the holder keeps its id
        if live is None:
            return False  # no node received the probe: gone, and its holder with it
        return bool(live)

    def on_probe(self, node: str, payload: bytes, now: float) -> Effects:
        """``node`` asks whether our holder of an id still blocks it (``MalformedFrame`` if
        ``payload`` is not such a question): it is told."""
        holder = proto.decode_holder(payload)
        live = self.holder_live(holder.id, holder.token, now)
        answer = proto.encode_probe_answer(holder.ask, live)
        return (Notify(node, PROBED_KIND, answer, f"cannot answer a probe of node {node}"),)

    def on_taken_over(self, peer_id: str, node: str, owner: str) -> Effects:
        """This node took ``peer_id``'s claim over from ``owner`` on ``node`` (whose claim is
        released already): the holder's socket closes, here or on its node."""
        evicted = proto.Holder(peer_id, owner_digest(owner))
        if node == self.node_id:
            return self.on_evict(evicted)
        what = f"cannot tell node {node} of its lost id {peer_id}"
        return (Notify(node, EVICT_KIND, proto.encode_holder(evicted), what),)

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

    def on_lookup_error(self, lookup: Lookup, error: Exception, now: float) -> Effects:
        """Asking the cluster for ``lookup`` failed with ``error``: reported, then as
        ``on_lookup_failed``."""
        fault = Fault("lookup", f"cannot look up {lookup.target}", error)
        return (fault, *self.on_lookup_failed(lookup, now))

    def on_relay(self, node: str, payload: bytes, now: float) -> Effects:
        """A frame from a client on ``node`` for one of ours (``MalformedFrame`` if it is not
        one); queued here if its target is not connected."""
        relayed = proto.decode_relayed(payload)
        return self._here(relayed.type, relayed.src, relayed.dst, relayed.frame, now)

    def on_send_error(self, effect: ToNode, error: Exception) -> Effects:
        """Handing ``effect`` to its node failed with ``error``: reported, then as
        ``on_undelivered``."""
        fault = Fault("send", f"cannot send {effect.kind} to node {effect.node}", error)
        return (fault, *self.on_undelivered(effect))

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
