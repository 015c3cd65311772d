"""Signal-Fire's rules for one node, as a state machine (docs/protocols/signal-fire.md).

``SignalFireNode`` holds this node's peers (id -> connection handle, legacy flag, whether its id
is claimed), the sessions its peers started, and the routing of every request, with no event
loop, no clock and no I/O. The server's hub (``server/signalfire.py``) feeds it events and
carries out the effects each returns, in their order (``core/effects.py``); what the hub learns
by carrying one out (a claim's answer, a lookup's, a write that failed) comes back as an event.

=========================================  =================================================
event                                      effects it may return
=========================================  =================================================
``on_open(conn, legacy, ice_servers)``     ``Claim`` an id for the new peer
``on_claimed(claim, ok)``                  ``Send`` welcome; or ``Claim`` another id, or
                                           ``Close`` 1013 ``no free id`` after
                                           ``CLAIM_ATTEMPTS`` collisions
``on_message(conn, data, now)``            ``Send`` an error; or ``Send`` the ack then
                                           ``Relay`` to a local peer; or ``Lookup`` (target
                                           not here); ``Close`` 4400
``on_rate_limited(conn, data)``            ``Send`` ``Too Many Requests``; ``Close`` 4400
``on_lookup(lookup, node, now)``           ``Send`` an error; or ``Send`` the ack then
                                           ``ToNode`` (the relay); for a server notice
                                           ``ToNode``
``on_lookup_failed(lookup)``               ``Send`` ``Internal Server Error``
``on_undelivered(effect)``                 ``Send`` ``Peer Offline`` after the ack, or
                                           ``ToNode`` the requester's node to say so
``on_relay(node, payload)``                ``Relay``/``Send`` to a local peer; or ``ToNode``
                                           back: undeliverable
``on_undeliverable(payload)``              ``Send`` ``Peer Offline``
``on_timer(now)``                          ``session-timeout`` to both sides: ``Send``,
                                           ``Lookup``
``on_id_lost(peer_id)``                    ``Close`` 1013 ``id taken over``
``on_close(conn)``                         ``session-cancel`` to the targets of its pending
                                           sessions (``Send``, ``Lookup``), ``Release``
``on_lookup_error(lookup, error)``         ``Fault``, then as ``on_lookup_failed``
``on_send_error(effect, error)``           ``Fault``, then as ``on_undelivered``
=========================================  =================================================

Order of a request's checks, as the original's (docs/protocols/signal-fire.md, "Errors"): its
frame (``protocols/signalfire.py`` ``decode``: close 4400), target present and not yourself
(``precheck``), where the target is (not an id: not found; a local peer: online, or offline while
its socket closes; else ``Lookup``), then the target's state and the payload (``postcheck``).
The ack is always the first effect of an accepted request, before its relay.

Time: the caller passes ``now`` (seconds of a monotonic clock) with the events that may start a
session's timer; ``next_deadline()`` says when ``on_timer(now)`` is next due, and a session times
out at exactly ``start + session_timeout``. ``session_timeout`` 0 keeps no timer at all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from polysignal.core.effects import Close, Conn, Fault, Send, ToNode
from polysignal.core.errors import CloseCode
from polysignal.protocols import signalfire as proto
from polysignal.protocols.signalfire import Cmd, ErrorText, MessageId, Request, TargetState

CLAIM_PREFIX = "signalfire:"
"""Each peer's id is claimed cluster-wide under ``signalfire:<id>``."""
RELAY_KIND = "signalfire"
"""Direct message: a relayed frame for a peer connected to the receiving node."""
UNDELIVERABLE_KIND = "signalfire-undeliverable"
"""Direct message back to the requester's node: the relay found no open socket."""
CLAIM_ATTEMPTS = 3
"""Ids tried for one connection before it is refused (1013 ``no free id``)."""

_ANSWERS = frozenset({Cmd.SESSION_ACCEPT.value, Cmd.SESSION_REJECT.value})


def claim_key(peer_id: str) -> str:
    """The backend key of ``peer_id``'s claim."""
    return CLAIM_PREFIX + peer_id


def serves(path: str, offered: Iterable[str], configured: str) -> bool:
    """Whether an upgrade on ``path`` offering the subprotocols ``offered`` is Signal-Fire's:
    any WebSocket on the ``configured`` path (``SIGNALFIRE_PATH``: browsers refuse to offer a
    subprotocol containing ``@``), or one offering Signal-Fire on any path."""
    if path == configured:
        return True
    return any(subprotocol in proto.SUBPROTOCOLS for subprotocol in offered)


# --- the effects of Signal-Fire's own (the others are core/effects.py's) -------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """Claim the new peer's id ``peer_id`` (on ``conn``) cluster-wide, with a lease, and answer
    with ``on_claimed(claim, ok)``: ok is False only when another holder has the id (an id that
    cannot be claimed while the backend is away, or not promptly, is served here and claimed once
    it answers; if another holder turns out to have it, ``on_id_lost`` follows)."""

    conn: Conn
    peer_id: str

    @property
    def key(self) -> str:
        return CLAIM_PREFIX + self.peer_id


@dataclass(frozen=True, slots=True)
class Release:
    """Give the claim of ``peer_id`` back: its socket closed (afterwards it is Peer Not Found)."""

    peer_id: str

    @property
    def key(self) -> str:
        return CLAIM_PREFIX + self.peer_id


@dataclass(frozen=True, slots=True)
class Lookup:
    """Ask the cluster which node holds ``target``'s claim, and answer with
    ``on_lookup(lookup, node, now)`` (``node`` None: nobody holds it), or with
    ``on_lookup_failed(lookup)`` when the cluster cannot be asked. It is made for ``request`` of
    the local peer on ``conn``, or for ``notice``, a message the server makes (a session's
    timeout or cancel)."""

    target: str
    conn: Conn | None = None
    request: Request | None = None
    notice: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return CLAIM_PREFIX + self.target


@dataclass(frozen=True, slots=True)
class Relay:
    """Write ``payload``, the relay of request ``request_id`` from ``origin`` to ``target``, to
    the local peer on ``conn``. When it cannot be written (its socket closed meanwhile) answer
    with ``on_undelivered(relay)``, and the requester hears ``Peer Offline`` after its ack:
    here, or through its node ``node`` when the request came from another node."""

    conn: Conn
    payload: bytes
    target: str
    origin: str
    cmd: str
    request_id: MessageId
    node: str | None = None


Effect = Send | Close | ToNode | Claim | Release | Lookup | Relay | Fault
Effects = Sequence[Effect]


# --- pending sessions ----------------------------------------------------------------------------


class PendingSessions:
    """Sessions started and not answered yet: (initiator, target) -> deadline.

    A ``session-start`` from A to B is pending until B accepts or rejects it, A cancels it or
    leaves, or its deadline passes. The table lives on the node of the initiator, which sees
    every event of the session. Every session has the same ``timeout`` and ``now`` never goes
    back (a ``now`` earlier than one seen before counts as that one), so the order the sessions
    were (re)started in is the order they fall due: the next deadline is the first entry's.
    ``timeout`` 0 (or less) keeps nothing.
    """

    __slots__ = ("_by_initiator", "_due", "_now", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._due: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._by_initiator: dict[str, set[str]] = {}
        self._now = float("-inf")

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, pair: object) -> bool:
        return pair in self._due

    def start(self, initiator: str, target: str, now: float) -> None:
        """Record a pending session due at ``now + timeout``; a repeated start restarts it."""
        if self.timeout <= 0:
            return
        if now > self._now:
            self._now = now
        pair = (initiator, target)
        self._due.pop(pair, None)
        self._due[pair] = self._now + self.timeout
        self._by_initiator.setdefault(initiator, set()).add(target)

    def settle(self, initiator: str, target: str) -> bool:
        """The session was answered or cancelled: forget it (False if it was not pending)."""
        if self._due.pop((initiator, target), None) is None:
            return False
        self._unindex(initiator, target)
        return True

    def drop_initiator(self, initiator: str) -> list[str]:
        """The initiator left: forget its sessions and return their targets."""
        targets = self._by_initiator.pop(initiator, set())
        for target in targets:
            del self._due[(initiator, target)]
        return sorted(targets)

    def next_deadline(self) -> float | None:
        due = self._due
        if not due:
            return None
        return next(iter(due.values()))

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Forget the sessions due at ``now`` or before it, and return them in their order."""
        if now > self._now:
            self._now = now
        now = self._now
        due = self._due
        expired: list[tuple[str, str]] = []
        while due:
            pair, deadline = next(iter(due.items()))
            if deadline > now:
                break
            due.popitem(last=False)
            self._unindex(*pair)
            expired.append(pair)
        return expired

    def clear(self) -> None:
        self._due.clear()
        self._by_initiator.clear()

    def _unindex(self, initiator: str, target: str) -> None:
        targets = self._by_initiator.get(initiator)
        if targets is not None:
            targets.discard(target)
            if not targets:
                del self._by_initiator[initiator]


# --- the machine ---------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Peer:
    """One local client: its id, its connection, whether it speaks Signal-Fire@2, whether its id
    is claimed (False while the claim is on its way, and once the id is lost)."""

    id: str
    conn: Conn
    legacy: bool
    attempts: int
    claimed: bool = False
    request: MessageId | None = None  # the request being handled, for ``request_of``
    # Its welcome's ICE servers when they are its own (TURN credentials); else the node's.
    ice_servers: tuple[dict[str, Any], ...] | None = None


def _never_closing(conn: Conn) -> bool:
    return False


class SignalFireNode:
    """The Signal-Fire peers, sessions and routing of one node (see the module docstring).

    ``is_closing(conn)`` tells whether a local connection's socket is closing: a registered id
    whose socket is closing is ``Peer Offline`` (the one thing about a connection that is not an
    event here: a socket starts closing in many places of the server). ``new_id`` makes the ids.
    """

    def __init__(
        self,
        node_id: str,
        *,
        session_timeout: float = 30.0,
        ice_servers: tuple[dict[str, Any], ...] | None = None,
        is_closing: Callable[[Conn], bool] = _never_closing,
        new_id: Callable[[], str] = proto.new_id,
    ) -> None:
        self.node_id = node_id
        self.ice_servers = ice_servers
        self.sessions = PendingSessions(session_timeout)
        self._is_closing = is_closing
        self._new_id = new_id
        self._peers: dict[str, _Peer] = {}
        self._by_conn: dict[Conn, _Peer] = {}
        # Decoded requests by their ``cmd`` (``/metrics``; counted here, where it is known).
        self.received: dict[str, int] = {}

    # --- queries ---
    def held(self) -> int:
        """The ids held by this node's peers (``/metrics``)."""
        return len(self._peers)

    def next_deadline(self) -> float | None:
        """When ``on_timer`` is next due (None: no session is pending)."""
        due = self.sessions._due
        return next(iter(due.values())) if due else None

    def request_of(self, conn: Conn) -> MessageId | None:
        """The id of the request ``conn``'s peer sent last: what an unexpected fault answers."""
        peer = self._by_conn.get(conn)
        return None if peer is None else peer.request

    # --- connections ---
    def on_open(
        self, conn: Conn, legacy: bool, ice_servers: tuple[dict[str, Any], ...] | None = None
    ) -> Effects:
        """A client connected (``legacy``: it speaks Signal-Fire@2): pick and claim its id.
        ``ice_servers``, when given, are its welcome's (TURN credentials made for it at its
        opening by the hub, which reads the clock); else the node's ``ice_servers``."""
        return self._next_id(conn, legacy, 0, ice_servers)

    def on_claimed(self, claim: Claim, ok: bool) -> Effects:
        """The answer to ``claim``: welcome the peer, or try another id."""
        peer = self._by_conn.get(claim.conn)
        if peer is None or peer.id != claim.peer_id:
            # Gone meanwhile: a claim made for nobody is given back.
            return (Release(claim.peer_id),) if ok else ()
        if ok:
            peer.claimed = True
            ice = self.ice_servers if peer.ice_servers is None else peer.ice_servers
            return (Send(peer.conn, proto.encode_welcome(peer.id, ice)),)
        self._forget(peer)
        return self._next_id(peer.conn, peer.legacy, peer.attempts, peer.ice_servers)

    def _next_id(
        self,
        conn: Conn,
        legacy: bool,
        attempts: int,
        ice_servers: tuple[dict[str, Any], ...] | None = None,
    ) -> Effects:
        while attempts < CLAIM_ATTEMPTS:
            attempts += 1
            peer_id = self._new_id()
            if peer_id in self._peers:
                continue
            # Known here before its claim exists, so the claim never points at nothing here.
            peer = _Peer(peer_id, conn, legacy, attempts, ice_servers=ice_servers)
            self._peers[peer_id] = peer
            self._by_conn[conn] = peer
            return (Claim(conn, peer_id),)
        return (Close(conn, CloseCode.TRY_AGAIN_LATER, "no free id"),)

    def on_id_lost(self, peer_id: str) -> Effects:
        """Another holder took ``peer_id``'s claim over: its socket closes."""
        peer = self._peers.get(peer_id)
        if peer is None or not peer.claimed:
            return ()
        peer.claimed = False
        return (Close(peer.conn, CloseCode.TRY_AGAIN_LATER, "id taken over"),)

    def on_close(self, conn: Conn) -> Effects:
        """``conn``'s socket is gone: forget its peer, cancel the sessions it started (each
        target gets ``session-cancel``), and give its id back."""
        peer = self._by_conn.get(conn)
        if peer is None:
            return ()
        self._forget(peer)
        effects: list[Effect] = []
        for target in self.sessions.drop_initiator(peer.id):
            effects.extend(self._notice(target, Cmd.SESSION_CANCEL, peer.id))
        if peer.claimed:
            effects.append(Release(peer.id))
        return tuple(effects)

    def clear(self) -> None:
        """The node stops: forget every pending session (the backend drops the claims)."""
        self.sessions.clear()

    def _forget(self, peer: _Peer) -> None:
        if self._by_conn.get(peer.conn) is peer:
            del self._by_conn[peer.conn]
        if self._peers.get(peer.id) is peer:
            del self._peers[peer.id]

    # --- requests ---
    def on_message(self, conn: Conn, data: bytes, now: float) -> Effects:
        """One frame from ``conn``'s client (binary frames are read as JSON text too)."""
        try:
            parsed = proto.decode(data)
        except proto.CloseRequest as exc:
            return (Close(conn, exc.close_code, exc.message),)
        if isinstance(parsed, proto.Ignored):
            return ()  # unknown commands get no reply at all
        received = self.received
        received[parsed.cmd] = received.get(parsed.cmd, 0) + 1
        peer = self._by_conn.get(conn)
        if peer is None or not peer.claimed:
            return ()  # not welcomed, or its id is lost: it is closing
        peer.request = parsed.id
        error = proto.precheck(parsed, peer.id)
        if error is not None:
            return (Send(conn, proto.encode_error(parsed.id, error)),)
        target = parsed.target
        if not proto.is_id(target):
            # No id of that shape was ever handed out.
            return self._answer(peer, parsed, TargetState.NOT_FOUND, None, now)
        local = self._peers.get(target)
        if local is None:
            return (Lookup(target, conn, parsed),)
        if self._is_closing(local.conn):
            return self._answer(peer, parsed, TargetState.OFFLINE, None, now)
        return self._answer(peer, parsed, TargetState.ONLINE, local, now)

    def on_rate_limited(self, conn: Conn, data: bytes) -> Effects:
        """A frame over ``conn``'s rate limit: a request is refused, not relayed."""
        try:
            parsed = proto.decode(data)
        except proto.CloseRequest as exc:
            return (Close(conn, exc.close_code, exc.message),)
        if isinstance(parsed, proto.Ignored):
            return ()
        return (Send(conn, proto.encode_error(parsed.id, ErrorText.RATE_LIMITED)),)

    def on_lookup(self, lookup: Lookup, node: str | None, now: float) -> Effects:
        """The cluster's answer to ``lookup``: ``node`` holds the target's claim (None: nobody;
        this node itself, while the target is not connected here, counts as nobody)."""
        if node == self.node_id:
            node = None
        request = lookup.request
        if request is None:
            if node is None or lookup.notice is None:
                return ()
            relay = proto.RemoteRelay(lookup.target, lookup.notice)
            return (ToNode(node, RELAY_KIND, proto.encode_remote_relay(relay)),)
        peer = self._by_conn.get(lookup.conn)
        if peer is None:
            return ()
        state = TargetState.NOT_FOUND if node is None else TargetState.ONLINE
        return self._answer(peer, request, state, node, now)

    def on_lookup_failed(self, lookup: Lookup) -> Effects:
        """The cluster could not be asked (its backend is away): the request is answered
        ``Internal Server Error``, before any ack; a server notice is dropped."""
        if lookup.request is None or lookup.conn is None:
            return ()
        return (Send(lookup.conn, proto.encode_error(lookup.request.id, ErrorText.INTERNAL)),)

    def on_lookup_error(self, lookup: Lookup, error: Exception) -> Effects:
        """Asking the cluster for ``lookup`` failed with ``error``: reported, then answered as
        ``on_lookup_failed``."""
        fault = Fault("lookup", f"cannot look up {lookup.target}", error)
        return (fault, *self.on_lookup_failed(lookup))

    def _answer(
        self,
        peer: _Peer,
        request: Request,
        state: TargetState,
        where: _Peer | str | None,
        now: float,
    ) -> Effects:
        """The checks after the target's lookup, then the ack and the relay: to the local peer
        ``where``, or to the node named ``where``."""
        error = proto.postcheck(request, state, legacy=peer.legacy)
        if error is not None:
            return (Send(peer.conn, proto.encode_error(request.id, error)),)
        target: str = request.target
        # The timer starts before the relay leaves: an answer may come back before the send to
        # another node has even been confirmed.
        cmd = request.cmd
        if cmd is Cmd.SESSION_START:
            self.sessions.start(peer.id, target, now)
        elif cmd is Cmd.SESSION_CANCEL:
            self.sessions.settle(peer.id, target)
        message = proto.relayed(request, peer.id)
        ack = Send(peer.conn, proto.encode_ack(request.id))
        if isinstance(where, _Peer):
            return (ack, self._deliver(where, message, peer.id, request.id, None))
        assert where is not None
        relay = proto.RemoteRelay(target, message, peer.id, request.id)
        return (ack, ToNode(where, RELAY_KIND, proto.encode_remote_relay(relay)))

    def _deliver(
        self,
        peer: _Peer,
        message: dict[str, Any],
        requester: str | None,
        request_id: MessageId | None,
        node: str | None,
    ) -> Effect:
        """``message`` for the local ``peer``: a Relay when someone is to hear of a failure."""
        cmd = message.get("cmd")
        if cmd in _ANSWERS:
            origin = message.get("origin")
            if isinstance(origin, str):
                # The target of this relay started the session: it is answered.
                self.sessions.settle(peer.id, origin)
        payload = proto.encode(message)
        if requester is None or request_id is None:
            return Send(peer.conn, payload)
        return Relay(peer.conn, payload, peer.id, requester, str(cmd), request_id, node)

    # --- what comes back ---
    def on_undelivered(self, effect: Relay | ToNode) -> Effects:
        """``effect`` could not be carried out: the relay's socket closed meanwhile, or the node
        it was for cannot be reached. The requester hears ``Peer Offline`` after its ack."""
        if isinstance(effect, Relay):
            if effect.node is None:
                return self._offline(effect.origin, effect.request_id, effect.cmd, effect.target)
            notice = proto.Undeliverable(
                effect.origin, effect.request_id, effect.cmd, effect.target
            )
            return (ToNode(effect.node, UNDELIVERABLE_KIND, proto.encode_undeliverable(notice)),)
        if effect.kind != RELAY_KIND:
            return ()  # a notice back to another node: nobody here to tell
        relay = proto.decode_remote_relay(effect.payload)
        if relay.requester is None or relay.request_id is None:
            return ()  # a server notice: dropped
        return self._offline(relay.requester, relay.request_id, relay.message.get("cmd"), relay.to)

    def on_send_error(self, effect: ToNode, error: Exception) -> Effects:
        """Handing ``effect`` to its node failed with ``error``: reported, then as
        ``on_undelivered``."""
        fault = Fault("send", f"cannot send {effect.kind} to node {effect.node}", error)
        return (fault, *self.on_undelivered(effect))

    def on_relay(self, node: str, payload: bytes) -> Effects:
        """A relay from a peer on ``node`` for one of ours (``MalformedFrame`` if it is not
        one). No open socket for it here: the requester's node is told."""
        relay = proto.decode_remote_relay(payload)
        requester, request_id = relay.requester, relay.request_id
        if request_id is None:
            requester = None  # nothing to report to: a server notice
        peer = self._peers.get(relay.to)
        if peer is not None and not self._is_closing(peer.conn):
            return (self._deliver(peer, relay.message, requester, request_id, node),)
        if requester is None:
            return ()
        notice = proto.Undeliverable(requester, request_id, relay.message.get("cmd"), relay.to)
        return (ToNode(node, UNDELIVERABLE_KIND, proto.encode_undeliverable(notice)),)

    def on_undeliverable(self, payload: bytes) -> Effects:
        """Another node found no open socket for our peer's relay (``MalformedFrame`` if it is
        not such a notice)."""
        notice = proto.decode_undeliverable(payload)
        return self._offline(notice.to, notice.request_id, notice.cmd, notice.target)

    def _offline(self, requester: str, request_id: Any, cmd: Any, target: Any) -> Effects:
        if cmd == Cmd.SESSION_START and isinstance(target, str):
            self.sessions.settle(requester, target)  # the session never arrived
        peer = self._peers.get(requester)
        if peer is None:
            return ()
        return (Send(peer.conn, proto.encode_error(request_id, ErrorText.PEER_OFFLINE)),)

    # --- the session timer ---
    def on_timer(self, now: float) -> Effects:
        """Sessions unanswered at their deadline end: both sides get ``session-timeout``, each
        with the other side as ``origin``."""
        effects: list[Effect] = []
        for initiator, target in self.sessions.expire(now):
            effects.extend(self._notice(initiator, Cmd.SESSION_TIMEOUT, target))
            effects.extend(self._notice(target, Cmd.SESSION_TIMEOUT, initiator))
        return tuple(effects)

    def _notice(self, to: str, cmd: Cmd, origin: str) -> Effects:
        """A message the server makes about ``origin``'s session, for ``to`` wherever it is."""
        message = proto.notice(cmd, origin)
        peer = self._peers.get(to)
        if peer is None:
            return (Lookup(to, notice=message),)
        if self._is_closing(peer.conn):
            return ()
        return (Send(peer.conn, proto.encode(message)),)
