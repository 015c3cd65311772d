"""The rooms protocol's state machine (core/rooms.py): every transition, bound and handover,
through events and effects, with no socket, no event loop and no clock.

``Net`` plays the rest of the world for one or more machines: it carries their ``ToNode``
messages between them (in order, through a queue, as a bus would), answers ``ClaimName`` and
``ToOwner`` from one claims table, and records what each node emitted to its sockets.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from polysignal.core import rooms as core
from polysignal.core.effects import ToNode
from polysignal.protocols import rooms as proto
from polysignal.protocols.rooms import MISSING, ClientEvent, ClusterMessage, ClusterOp, ServerEvent

CREATE = ClientEvent.ROOM_CREATE_REQUEST
JOIN = ClientEvent.ROOM_JOIN_REQUEST
ACCEPT = ClientEvent.ROOM_JOIN_ACCEPT
REFUSE = ClientEvent.ROOM_JOIN_REJECT
SDP = ClientEvent.RELAY_SESSION_DESCRIPTION
ICE = ClientEvent.RELAY_ICE_CANDIDATE


def ids(prefix: str = "id") -> Any:
    counter = itertools.count(1)
    return lambda: f"{prefix}-{next(counter)}"


def machine(node: str = "A", **limits: int) -> core.RoomsMachine:
    return core.RoomsMachine(node, core.RoomLimits(**limits), new_id=ids(f"{node}id"))


def cmd(sid: str, kind: ClientEvent, command: core.Command) -> core.ClientCommand:
    return core.ClientCommand(sid, kind, command)


def create(sid: str, room: str | None, payload: Any = MISSING) -> core.ClientCommand:
    return cmd(sid, CREATE, proto.CreateRoom(room, payload))


def join(sid: str, room: str, payload: Any = MISSING) -> core.ClientCommand:
    return cmd(sid, JOIN, proto.JoinRoom(room, payload))


def accept(sid: str, room: str, peer: str, payload: Any = MISSING) -> core.ClientCommand:
    return cmd(sid, ACCEPT, proto.Answer(room, peer, payload))


def refuse(sid: str, room: str, peer: str, payload: Any = MISSING) -> core.ClientCommand:
    return cmd(sid, REFUSE, proto.Answer(room, peer, payload))


def ice(sid: str, to: str, room: str, body: Any = None, payload: Any = MISSING) -> Any:
    return cmd(sid, ICE, proto.Relay(to, room, body if body is not None else {"c": 1}, payload))


def emit(event: ServerEvent, to: str, **fields: Any) -> core.Emit:
    return core.Emit(event, proto.body(**fields), (to,))


def decoded(effect: core.Effect) -> ClusterMessage:
    assert isinstance(effect, ToNode) and effect.kind == core.DIRECT_KIND
    return proto.decode_cluster(effect.payload)


@dataclass
class Net:
    """Machines on one simulated bus, with one claims table."""

    machines: dict[str, core.RoomsMachine]
    claims: dict[str, tuple[str, str]] = field(default_factory=dict)  # room -> (node, token)
    emitted: list[tuple[str, core.Emit]] = field(default_factory=list)
    messages: list[tuple[str, str, ClusterMessage]] = field(default_factory=list)  # from, to
    warnings: list[str] = field(default_factory=list)
    handed_off: list[tuple[str, str]] = field(default_factory=list)
    down: set[str] = field(default_factory=set)
    queue: deque[tuple[str, core.Event]] = field(default_factory=deque)

    @classmethod
    def of(cls, *nodes: str, **limits: int) -> Net:
        return cls({node: machine(node, **limits) for node in nodes})

    def connect(self, node: str, sid: str, peerinfo: Any = MISSING) -> str:
        self.feed(node, core.Connected(sid))
        self.feed(node, core.Authenticated(sid, peerinfo))
        return sid

    def feed(self, node: str, event: core.Event) -> None:
        self.queue.append((node, event))
        self.drain()

    def drain(self) -> None:
        """Deliver everything on its way, in order."""
        while self.queue:
            at, event = self.queue.popleft()
            for effect in self.machines[at].handle(event):
                self.carry(at, effect)

    def carry(self, node: str, effect: core.Effect) -> None:
        match effect:
            case core.Emit():
                self.emitted.append((node, effect))
            case ToNode():
                msg = decoded(effect)
                self.messages.append((node, effect.node, msg))
                if effect.node in self.down or effect.node not in self.machines:
                    self.queue.append((node, core.Undeliverable(msg)))
                else:
                    self.queue.append((effect.node, core.FromNode(node, msg)))
            case core.ToOwner():
                msg = effect.message
                holder = self.claims.get(msg.room)
                if holder is None or (msg.token and msg.token != holder[1]):
                    self.queue.append((node, core.Undeliverable(msg)))
                    return
                msg = replace(msg, token=holder[1])
                if holder[0] != node:
                    self.messages.append((node, holder[0], msg))
                self.queue.append((holder[0], core.FromNode(node, msg)))
            case core.ClaimName():
                holder = self.claims.get(effect.room)
                if holder is None or holder[1] == effect.token:
                    self.claims[effect.room] = (node, effect.token)
                    result = core.ClaimResult.CLAIMED
                else:
                    result = core.ClaimResult.TAKEN
                self.queue.append((node, core.ClaimAnswer(effect.room, effect.token, result)))
            case core.ReleaseName():
                if self.claims.get(effect.room, ("", ""))[1] == effect.token:
                    del self.claims[effect.room]
            case core.HandOffName():
                self.handed_off.append((node, effect.room))
            case core.Warn():
                self.warnings.append(effect.message)

    def got(self, sid: str, event: ServerEvent | None = None) -> list[dict[str, Any]]:
        """The bodies ``sid`` received (of ``event``), and forget them."""
        bodies = [
            e.body for _, e in self.emitted if sid in e.to and (event is None or e.event is event)
        ]
        self.emitted = [
            (n, replace(e, to=tuple(s for s in e.to if s != sid)))
            if event is None or e.event is event
            else (n, e)
            for n, e in self.emitted
        ]
        self.emitted = [(n, e) for n, e in self.emitted if e.to]
        return bodies

    def one(self, sid: str, event: ServerEvent) -> dict[str, Any]:
        bodies = self.got(sid, event)
        assert len(bodies) == 1, (sid, event, bodies)
        return bodies[0]

    def silent(self, *sids: str) -> None:
        left = [(n, e) for n, e in self.emitted if set(e.to) & set(sids)]
        assert not left, left

    def room_of(self, node: str, sid: str, room: str, payload: Any = MISSING) -> None:
        """``sid`` on ``node`` creates ``room``."""
        self.feed(node, create(sid, room, payload))
        assert self.one(sid, ServerEvent.ROOM_CREATE_ACCEPT)["room"] == room

    def admit(self, owner_node: str, owner: str, node: str, sid: str, room: str) -> dict[str, Any]:
        """``sid`` on ``node`` asks to join ``room``; ``owner`` accepts; returns its accept."""
        self.feed(node, join(sid, room))
        assert self.one(owner, ServerEvent.ROOM_JOIN_REQUEST)["peer_id"] == sid
        self.feed(owner_node, accept(owner, room, sid))
        return self.one(sid, ServerEvent.ROOM_JOIN_ACCEPT)


# --- one machine, effect by effect -------------------------------------------------------------


def test_create_claims_the_name_then_accepts():
    m = machine()
    m.handle(core.Connected("s"))
    assert m.handle(create("s", "r", {"p": 1})) == [core.ClaimName("r", "Aid-1")]
    assert m.owns("r") is False  # not before the claim is answered
    answer = core.ClaimAnswer("r", "Aid-1", core.ClaimResult.CLAIMED)
    assert m.handle(answer) == [
        emit(ServerEvent.ROOM_CREATE_ACCEPT, "s", room="r", payload={"p": 1})
    ]
    assert m.owns("r") and m.rooms_of("s") == ("r",)
    snap = m.room("r")
    assert snap is not None
    assert (snap.owner, snap.version, snap.token) == ("s", 1, "Aid-1")
    assert snap.members == (("s", proto.Member("A", {})),)


def test_create_without_a_name_uses_a_new_id():
    m = machine()
    m.handle(core.Connected("s"))
    assert m.handle(create("s", None)) == [core.ClaimName("Aid-1", "Aid-2")]


@pytest.mark.parametrize(
    ("result", "effects"),
    [
        (
            core.ClaimResult.TAKEN,
            [
                core.Emit(
                    ServerEvent.ROOM_CREATE_REJECT,
                    {"message": proto.ROOM_TAKEN, "payload": 1},
                    ("s",),
                )
            ],
        ),
        (
            core.ClaimResult.UNREACHABLE,
            [
                core.ReleaseName("r", "Aid-1"),
                core.Emit(
                    ServerEvent.ROOM_CREATE_REJECT,
                    {"message": proto.BACKEND_DOWN, "payload": 1},
                    ("s",),
                ),
            ],
        ),
    ],
)
def test_create_refused_when_the_claim_fails(result, effects):
    m = machine()
    m.handle(core.Connected("s"))
    m.handle(create("s", "r", 1))
    assert m.handle(core.ClaimAnswer("r", "Aid-1", result)) == effects
    assert m.room("r") is None and m.rooms_of("s") == ()


def test_a_creator_gone_before_the_claim_is_answered_gives_the_name_back():
    m = machine()
    m.handle(core.Connected("s"))
    m.handle(create("s", "r"))
    assert m.handle(core.Disconnected("s")) == []
    claimed = core.ClaimAnswer("r", "Aid-1", core.ClaimResult.CLAIMED)
    assert m.handle(claimed) == [core.ReleaseName("r", "Aid-1")]
    assert m.room("r") is None


def test_a_name_with_members_here_is_taken_without_asking_the_cluster():
    net = Net.of("A")
    a, b = net.connect("A", "a"), net.connect("A", "b")
    net.room_of("A", a, "r")
    assert net.machines["A"].handle(create(b, "r")) == [
        core.Emit(ServerEvent.ROOM_CREATE_REJECT, {"message": proto.ROOM_TAKEN}, (b,))
    ]


def test_room_names_are_bounded():
    m = machine(name_length=3)
    m.handle(core.Connected("s"))
    for command in (create("s", "long"), join("s", "long")):
        (effect,) = m.handle(command)
        assert isinstance(effect, core.Emit)
        assert "'room' is longer than 3 characters" in effect.body["message"]


def test_rooms_per_socket_count_rooms_joined_and_being_created():
    net = Net.of("A", rooms_per_socket=2)
    a, b = net.connect("A", "a"), net.connect("A", "b")
    net.room_of("A", b, "b1")
    net.room_of("A", a, "a1")
    m = net.machines["A"]
    assert m.handle(create(a, "a2")) == [core.ClaimName("a2", "Aid-3")]  # still on its way
    for command in (create(a, "a3"), join(a, "b1")):
        (effect,) = m.handle(command)
        assert isinstance(effect, core.Emit)
        assert effect.body["message"] == "too many rooms for one socket (limit 2)"


def test_auth_sets_the_socket_data_and_missing_peerinfo_keeps_it():
    net = Net.of("A")
    net.connect("A", "o", {"name": "owner"})
    net.feed("A", core.Authenticated("o"))  # no peerinfo: the data stays
    net.room_of("A", "o", "r")
    snap = net.machines["A"].room("r")
    assert snap is not None and dict(snap.members)["o"].data == {"peerinfo": {"name": "owner"}}


def test_commands_of_unknown_sockets_are_ignored():
    m = machine()
    assert m.handle(create("ghost", "r")) == []
    assert m.handle(core.Disconnected("ghost")) == []


def test_reject_maps_each_event_to_its_answer():
    assert core.reject("s", JOIN, "m", 3) == core.Emit(
        ServerEvent.ROOM_JOIN_REJECT, {"message": "m", "payload": 3}, ("s",)
    )
    assert core.reject("s", ClientEvent.AUTH_REQUEST, "m").event is ServerEvent.AUTH_REJECT
    assert core.reject("s", ACCEPT, "m", 3) == core.Emit(
        ServerEvent.ERROR, {"message": "m", "event": "room-join-accept", "payload": 3}, ("s",)
    )
    assert core.reject("s", "whatever", "m").body == {"message": "m", "event": "whatever"}


# --- joining, on one node ------------------------------------------------------------------------


def test_whole_join_on_one_node_needs_no_other_node():
    net = Net.of("A")
    o = net.connect("A", "o", {"name": "owner"})
    j = net.connect("A", "j", {"name": "joiner"})
    net.room_of("A", o, "r")
    net.feed("A", join(j, "r", "hi"))
    assert net.one(o, ServerEvent.ROOM_JOIN_REQUEST) == {
        "room": "r",
        "peer_id": j,
        "payload": "hi",
        "peerinfo": {"name": "joiner"},
    }
    assert net.machines["A"].requested_by(j) == ("r",)
    net.feed("A", accept(o, "r", j, 2))
    assert net.one(j, ServerEvent.ROOM_JOIN_ACCEPT) == {
        "room": "r",
        "peer_id": j,
        "peers": [o],
        "peersinfo": {o: {"peerinfo": {"name": "owner"}}, j: {"peerinfo": {"name": "joiner"}}},
        "payload": 2,
    }
    assert net.one(o, ServerEvent.ROOM_USER_JOIN) == {
        "room": "r",
        "peer_id": j,
        "payload": 2,
        "peerinfo": {"name": "joiner"},
    }
    assert net.messages == []  # one node: nothing on the bus
    assert net.machines["A"].rooms_of(j) == ("r",) and net.machines["A"].requested_by(j) == ()
    snap = net.machines["A"].room("r")
    assert snap is not None and [s for s, _ in snap.members] == [o, j] and snap.version == 2


@pytest.mark.parametrize("unreachable", [False, True])
def test_join_of_a_room_nobody_holds_is_refused(unreachable):
    m = machine()
    m.handle(core.Connected("s"))
    (effect,) = m.handle(join("s", "nowhere", "p"))
    assert isinstance(effect, core.ToOwner) and effect.message.op is ClusterOp.JOIN_REQUEST
    message = proto.BACKEND_DOWN if unreachable else proto.ROOM_NOT_FOUND
    assert m.handle(core.Undeliverable(effect.message, unreachable)) == [
        core.Emit(ServerEvent.ROOM_JOIN_REJECT, {"message": message, "payload": "p"}, ("s",))
    ]
    assert m.requested_by("s") == ()


def test_already_member_cannot_ask_again():
    net = Net.of("A")
    o, j = net.connect("A", "o"), net.connect("A", "j")
    net.room_of("A", o, "r")
    net.admit("A", o, "A", j, "r")
    for sid in (o, j):
        net.feed("A", join(sid, "r"))
        assert net.one(sid, ServerEvent.ROOM_JOIN_REJECT)["message"] == proto.ALREADY_IN_ROOM


def test_pending_requests_per_room_are_bounded():
    net = Net.of("A", pending_per_room=1)
    o, x, y = net.connect("A", "o"), net.connect("A", "x"), net.connect("A", "y")
    net.room_of("A", o, "r")
    net.feed("A", join(x, "r"))
    net.feed("A", join(y, "r", 5))
    assert net.one(y, ServerEvent.ROOM_JOIN_REJECT) == {
        "message": core.TOO_MANY_PENDING,
        "payload": 5,
    }
    net.feed("A", join(x, "r"))  # asking again is not one more
    assert len(net.got(o, ServerEvent.ROOM_JOIN_REQUEST)) == 2
    net.silent(x)


def test_pending_requests_per_socket_are_bounded_at_the_limit():
    """``pending_per_socket`` requests wait at once; the next is refused on the socket's own
    node with the join's reject, and asking again for a room already asked for is not one
    more (docs/protocols/rooms.md, "Errors and limits")."""
    m = machine(pending_per_socket=2)
    m.handle(core.Connected("s"))
    for room in ("r1", "r2"):  # on their way to the rooms' nodes
        (effect,) = m.handle(join("s", room))
        assert isinstance(effect, core.ToOwner) and effect.message.room == room
    assert m.handle(join("s", "r3", {"n": 3})) == [
        core.Emit(
            ServerEvent.ROOM_JOIN_REJECT,
            {
                "message": "too many pending join requests for one socket (limit 2)",
                "payload": {"n": 3},
            },
            ("s",),
        )
    ]
    (again,) = m.handle(join("s", "r1"))
    assert isinstance(again, core.ToOwner) and again.message.room == "r1"
    assert m.requested_by("s") == ("r1", "r2")
    withdrawals = m.handle(core.Disconnected("s"))
    assert [(e.message.op, e.message.room) for e in withdrawals if isinstance(e, core.ToOwner)] == [
        (ClusterOp.WITHDRAW, "r1"),
        (ClusterOp.WITHDRAW, "r2"),
    ]
    assert len(withdrawals) == 2


@pytest.mark.parametrize("requester_node", ["A", "B"])
def test_an_answered_request_frees_its_place(requester_node):
    """A refusal, by the owner or because the room closed, ends the request on the requester's
    node, wherever it is: the socket may ask for another room."""
    net = Net.of("A", "B", pending_per_socket=1)
    o1, o2, o3 = net.connect("A", "o1"), net.connect("A", "o2"), net.connect("A", "o3")
    q = net.connect(requester_node, "q")
    for owner, room in ((o1, "r1"), (o2, "r2"), (o3, "r3")):
        net.room_of("A", owner, room)
    net.feed(requester_node, join(q, "r1"))
    net.got(o1)
    net.feed(requester_node, join(q, "r2", 2))
    assert net.one(q, ServerEvent.ROOM_JOIN_REJECT)["message"] == core.too_many_requests(1)
    net.feed("A", refuse(o1, "r1", q))
    assert net.one(q, ServerEvent.ROOM_JOIN_REJECT)["message"] == proto.OWNER_REJECTED
    assert net.machines[requester_node].requested_by(q) == ()
    net.feed(requester_node, join(q, "r2"))
    assert net.one(o2, ServerEvent.ROOM_JOIN_REQUEST)["peer_id"] == q
    net.feed("A", core.Disconnected(o2))  # its last member: the room closes
    assert net.one(q, ServerEvent.ROOM_JOIN_REJECT) == {"message": proto.ROOM_NOT_FOUND}
    assert net.machines[requester_node].requested_by(q) == ()
    net.feed(requester_node, join(q, "r3"))
    assert net.one(o3, ServerEvent.ROOM_JOIN_REQUEST)["peer_id"] == q


def test_withdrawals_reach_the_owner_on_another_node_and_after_a_handover():
    """A requester on C asks for rooms on A: its disconnect withdraws each request where it
    waits now, on A, or on B where one room went with its owner's leaving; no owner is asked
    again for it, on any later handover either."""
    net = Net.of("A", "B", "C")
    o, second, third = net.connect("A", "o"), net.connect("B", "second"), net.connect("A", "t")
    stay = net.connect("A", "stay")
    q = net.connect("C", "q")
    net.room_of("A", o, "moving")
    net.admit("A", o, "B", second, "moving")
    net.admit("A", o, "A", third, "moving")
    net.room_of("A", stay, "staying")
    net.feed("C", join(q, "moving"))
    net.feed("C", join(q, "staying"))
    net.got(o), net.got(stay)
    net.feed("A", core.Disconnected(o))  # "moving" goes to B, with q's request
    assert net.one(second, ServerEvent.ROOM_JOIN_REQUEST)["peer_id"] == q
    net.got(second), net.got(third)
    net.feed("C", core.Disconnected(q))
    for node, room in (("B", "moving"), ("A", "staying")):
        snap = net.machines[node].room(room)
        assert snap is not None and snap.pending == (), (node, room)
    net.feed("B", accept(second, "moving", q))
    assert net.one(second, ServerEvent.ERROR)["message"] == proto.NO_PENDING_REQUEST
    net.feed("B", core.Disconnected(second))  # "moving" goes back to A: nothing pending
    assert net.machines["A"].owns("moving")
    assert net.one(third, ServerEvent.ROOM_USER_LEAVE)["peer_id"] == second
    net.silent(third)


def test_a_withdrawal_crossing_a_handover_follows_the_room():
    """The requester goes while its request travels to the new owner's node: the name's lookup
    still answers the old node (the new one has not claimed it yet). The old node passes the
    withdrawal straight to the new one, after the handover, so the request is withdrawn there
    (the new owner was asked once, as the handover arrived)."""
    net = Net.of("A", "B", "C")
    o, second, q = net.connect("A", "o"), net.connect("B", "second"), net.connect("C", "q")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", second, "r")
    net.feed("C", join(q, "r"))
    net.got(o), net.got(second)
    token = net.claims["r"][1]
    handover = net.machines["A"].handle(core.Disconnected(o))  # on its way to B, not there yet
    (withdraw,) = net.machines["C"].handle(core.Disconnected(q))
    assert isinstance(withdraw, core.ToOwner) and withdraw.message.op is ClusterOp.WITHDRAW
    msg = replace(withdraw.message, token=token)  # the lookup answers A
    passed_on: list[core.Effect] = []
    for _ in range(core.MAX_HOPS + 1):
        effects = net.machines["A"].handle(core.FromNode("C", msg))
        if len(effects) != 1 or not isinstance(effects[0], core.ToOwner):
            passed_on = effects
            break
        msg = replace(effects[0].message, token=token)  # and still A: B has not claimed it
    assert passed_on, "the withdrawal was dropped"
    for effect in [*handover, *passed_on]:  # A's messages reach B in the order A sent them
        net.carry("A", effect)
    net.drain()
    assert net.claims["r"] == ("B", token)
    snap = net.machines["B"].room("r")
    assert snap is not None and snap.pending == ()
    net.got(second)
    net.feed("B", accept(second, "r", q))
    assert net.one(second, ServerEvent.ERROR)["message"] == proto.NO_PENDING_REQUEST


def test_handed_over_rooms_are_remembered_a_bounded_number(monkeypatch):
    """The node a room went from passes its messages straight on to the node it went to, for
    the last ``MOVED_REMEMBERED`` rooms it handed over; older ones by a lookup of the name."""
    monkeypatch.setattr(core, "MOVED_REMEMBERED", 2)
    net = Net.of("A", "B")
    tokens = {}
    for n in (1, 2, 3):
        owner, member = net.connect("A", f"o{n}"), net.connect("B", f"m{n}")
        net.room_of("A", owner, f"r{n}")
        net.admit("A", owner, "B", member, f"r{n}")
        tokens[n] = net.claims[f"r{n}"][1]
        net.feed("A", core.Disconnected(owner))
    a = net.machines["A"]
    for n in (1, 2, 3):
        withdraw = ClusterMessage(ClusterOp.WITHDRAW, f"r{n}", sid="q", token=tokens[n])
        (effect,) = a.handle(core.FromNode("C", withdraw))
        if n == 1:
            assert effect == core.ToOwner(replace(withdraw, hops=1))
        else:
            assert isinstance(effect, ToNode) and effect.node == "B"
            assert decoded(effect) == replace(withdraw, hops=1)
    # a join request for a room that moved follows it too
    join_request = ClusterMessage(ClusterOp.JOIN_REQUEST, "r3", sid="q", node="C", payload=1)
    (effect,) = a.handle(core.FromNode("C", join_request))
    assert isinstance(effect, ToNode) and effect.node == "B"
    assert decoded(effect) == replace(join_request, hops=1, token=tokens[3])


def test_an_undeliverable_handover_refuses_the_requests_it_carried():
    net = Net.of("A", "B")
    o, second, q = net.connect("A", "o"), net.connect("B", "second"), net.connect("A", "q")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", second, "r")
    net.feed("A", join(q, "r", 1))
    net.got(o)
    net.down.add("B")
    net.feed("A", core.Disconnected(o))
    assert net.one(q, ServerEvent.ROOM_JOIN_REJECT) == {
        "message": proto.ROOM_NOT_FOUND,
        "payload": 1,
    }
    assert net.machines["A"].requested_by(q) == ()


@pytest.mark.parametrize("kind", [ACCEPT, REFUSE])
def test_only_the_owner_answers_and_only_pending_requests(kind):
    net = Net.of("A")
    o, member, asker, bystander = (net.connect("A", s) for s in ("o", "m", "q", "b"))
    net.room_of("A", o, "r")
    net.admit("A", o, "A", member, "r")
    net.got(o)
    net.feed("A", join(asker, "r"))
    net.got(o)
    for intruder in (member, asker):
        net.feed("A", cmd(intruder, kind, proto.Answer("r", asker, 7)))
        assert net.one(intruder, ServerEvent.ERROR) == {
            "message": proto.NOT_OWNER,
            "event": kind.value,
            "payload": 7,
        }
    net.feed("A", cmd(o, kind, proto.Answer("r", bystander)))
    assert net.one(o, ServerEvent.ERROR)["message"] == proto.NO_PENDING_REQUEST
    net.silent(asker, bystander, member)


def test_owner_refuses_a_request():
    net = Net.of("A")
    o, j = net.connect("A", "o"), net.connect("A", "j")
    net.room_of("A", o, "r")
    net.feed("A", join(j, "r"))
    net.got(o)
    net.feed("A", refuse(o, "r", j, 1))
    assert net.one(j, ServerEvent.ROOM_JOIN_REJECT) == {
        "room": "r",
        "peer_id": j,
        "message": proto.OWNER_REJECTED,
        "payload": 1,
    }
    net.feed("A", ice(j, o, "r"))
    assert net.one(j, ServerEvent.ERROR)["message"] == proto.NOT_SHARING_ROOM
    net.feed("A", accept(o, "r", j))  # answered already
    assert net.one(o, ServerEvent.ERROR)["message"] == proto.NO_PENDING_REQUEST


# --- relays ------------------------------------------------------------------------------------


def test_relays_only_between_members_of_one_room():
    net = Net.of("A")
    a, b, c = net.connect("A", "a", "pa"), net.connect("A", "b"), net.connect("A", "c")
    net.room_of("A", a, "ab")
    net.admit("A", a, "A", b, "ab")
    net.room_of("A", c, "c")
    net.got(a)
    offer = {"type": "offer", "sdp": "v=0"}
    net.feed("A", cmd(a, SDP, proto.Relay(b, "ab", offer, 4)))
    assert net.one(b, ServerEvent.SESSION_DESCRIPTION) == {
        "peer_id": a,
        "session_description": offer,
        "room": "ab",
        "payload": 4,
        "peerinfo": "pa",
    }
    net.feed("A", ice(b, a, "ab", {"candidate": "x"}))
    assert net.one(a, ServerEvent.ICE_CANDIDATE) == {
        "peer_id": b,
        "ice_candidate": {"candidate": "x"},
        "room": "ab",
    }
    for sender, to, room in [(c, a, "c"), (c, a, "ab"), (b, c, "ab"), (a, b, "nope")]:
        net.feed("A", ice(sender, to, room, payload=9))
        assert net.one(sender, ServerEvent.ERROR) == {
            "message": proto.NOT_SHARING_ROOM,
            "event": "relay-ice-candidate",
            "payload": 9,
        }
    net.silent(a, b, c)


# --- leaving -----------------------------------------------------------------------------------


def test_a_member_leaving_is_announced_and_the_last_closes_the_room():
    net = Net.of("A")
    o, j, k = net.connect("A", "o"), net.connect("A", "j", "pj"), net.connect("A", "k")
    net.room_of("A", o, "r")
    net.admit("A", o, "A", j, "r")
    net.admit("A", o, "A", k, "r")
    net.got(o), net.got(j)
    net.feed("A", core.Disconnected(j))
    leave = {"room": "r", "peer_id": j, "peerinfo": "pj"}
    assert net.one(o, ServerEvent.ROOM_USER_LEAVE) == leave
    assert net.one(k, ServerEvent.ROOM_USER_LEAVE) == leave
    net.feed("A", core.Disconnected(k))
    net.feed("A", core.Disconnected(o))
    assert net.machines["A"].room("r") is None and "r" not in net.claims


def test_requests_of_a_vanished_socket_are_withdrawn():
    net = Net.of("A")
    o, j = net.connect("A", "o"), net.connect("A", "j")
    net.room_of("A", o, "r")
    net.feed("A", join(j, "r"))
    net.got(o)
    net.feed("A", core.Disconnected(j))
    snap = net.machines["A"].room("r")
    assert snap is not None and snap.pending == ()
    net.feed("A", accept(o, "r", j))
    assert net.one(o, ServerEvent.ERROR)["message"] == proto.NO_PENDING_REQUEST
    net.silent(o)


def test_owner_leaving_on_one_node_hands_the_room_to_the_earliest_member():
    net = Net.of("A")
    o, second, third, late = (net.connect("A", s) for s in ("o", "second", "third", "late"))
    net.room_of("A", o, "r")
    net.admit("A", o, "A", second, "r")
    net.admit("A", o, "A", third, "r")
    net.feed("A", join(late, "r"))
    net.got(o), net.got(second), net.got(third)
    net.feed("A", core.Disconnected(o))
    assert net.one(second, ServerEvent.ROOM_USER_LEAVE)["peer_id"] == o
    assert net.one(second, ServerEvent.ROOM_JOIN_REQUEST)["peer_id"] == late  # asked again
    assert net.got(third, ServerEvent.ROOM_JOIN_REQUEST) == []
    assert net.machines["A"].owns("r") and net.claims["r"] == ("A", "Aid-1")
    net.feed("A", accept(third, "r", late))
    assert net.one(third, ServerEvent.ERROR)["message"] == proto.NOT_OWNER
    net.feed("A", accept(second, "r", late))
    assert net.one(late, ServerEvent.ROOM_JOIN_ACCEPT)["peers"] == [second, third]


# --- many nodes --------------------------------------------------------------------------------


def test_an_event_between_two_nodes_reaches_no_third():
    """Members on A and B: everything they do crosses only between A and B; C gets nothing."""
    net = Net.of("A", "B", "C")
    a, b = net.connect("A", "a"), net.connect("B", "b")
    net.connect("C", "c")  # a socket on C, in no room with them
    net.room_of("A", a, "r")
    net.admit("A", a, "B", b, "r")
    assert net.one(a, ServerEvent.ROOM_USER_JOIN)["peer_id"] == b
    for _ in range(3):
        net.feed("A", ice(a, b, "r"))
        net.feed("B", ice(b, a, "r"))
    assert len(net.got(b, ServerEvent.ICE_CANDIDATE)) == 3
    assert len(net.got(a, ServerEvent.ICE_CANDIDATE)) == 3
    net.feed("B", core.Disconnected(b))
    assert net.one(a, ServerEvent.ROOM_USER_LEAVE)["peer_id"] == b
    assert [m for m in net.messages if "C" in m[:2]] == []
    # each relay is one message to the other node, nothing else
    relays = [m for m in net.messages if m[2].event is ServerEvent.ICE_CANDIDATE]
    assert [(f, t) for f, t, _ in relays] == [("A", "B"), ("B", "A")] * 3


def test_a_room_event_goes_once_to_each_node_with_members():
    net = Net.of("A", "B", "C")
    o = net.connect("A", "o")
    net.room_of("A", o, "r")
    b1, b2, c1 = net.connect("B", "b1"), net.connect("B", "b2"), net.connect("C", "c1")
    for node, sid in (("B", b1), ("B", b2), ("C", c1)):
        net.admit("A", o, node, sid, "r")
    net.emitted.clear()
    net.messages.clear()
    net.feed("A", core.Disconnected(o))
    leaves = [(f, t, m.to) for f, t, m in net.messages if m.op is ClusterOp.EMIT]
    assert leaves == [("A", "B", (b1, b2)), ("A", "C", (c1,))]
    for sid in (b1, b2, c1):
        assert net.one(sid, ServerEvent.ROOM_USER_LEAVE)["peer_id"] == o


def test_members_on_other_nodes_hold_the_room_and_newer_snapshots():
    net = Net.of("A", "B")
    o, j, k = net.connect("A", "o"), net.connect("B", "j"), net.connect("A", "k")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", j, "r")
    copy = net.machines["B"].room("r")
    assert copy is not None and [s for s, _ in copy.members] == [o, j] and copy.version == 2
    assert not net.machines["B"].owns("r")
    net.admit("A", o, "A", k, "r")  # B learns of k by a snapshot
    copy = net.machines["B"].room("r")
    assert copy is not None and [s for s, _ in copy.members] == [o, j, k]
    old = replace(copy, version=1, members=copy.members[:1])
    stale = ClusterMessage(ClusterOp.SNAPSHOT, "r", token=copy.token, snapshot=old)
    net.feed("B", core.FromNode("A", stale))
    assert net.machines["B"].room("r") == copy  # an older snapshot changes nothing
    net.feed("B", core.FromNode("A", replace(stale, room="elsewhere")))
    assert net.machines["B"].room("elsewhere") is None  # none of its sockets is there
    net.feed("B", ice(j, k, "r"))  # checked on B, from its copy
    assert net.one(k, ServerEvent.ICE_CANDIDATE)["peer_id"] == j
    net.feed("B", core.Disconnected(j))
    assert net.machines["B"].room("r") is None  # no member left on B: the copy goes


def test_a_leave_tells_the_members_the_leaving_node_did_not_know():
    net = Net.of("A", "B")
    o, j = net.connect("A", "o"), net.connect("B", "j")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", j, "r")
    late = net.connect("A", "late")
    net.admit("A", o, "A", late, "r")
    net.got(o), net.got(j), net.got(late)
    leave = ClusterMessage(ClusterOp.LEAVE, "r", sid=j, token="Aid-1", to=(o,))
    net.feed("A", core.FromNode("B", leave))  # B had told o only
    assert net.got(o) == []
    assert net.one(late, ServerEvent.ROOM_USER_LEAVE) == {"room": "r", "peer_id": j}


def test_ownership_passes_to_a_member_on_another_node():
    net = Net.of("A", "B")
    o, second = net.connect("A", "o"), net.connect("B", "second")
    third, late = net.connect("A", "third"), net.connect("A", "late")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", second, "r")
    net.admit("A", o, "A", third, "r")
    net.feed("A", join(late, "r", "p"))
    net.got(o), net.got(second), net.got(third)
    token = net.claims["r"][1]
    net.feed("A", core.Disconnected(o))
    assert net.one(third, ServerEvent.ROOM_USER_LEAVE)["peer_id"] == o
    assert net.one(second, ServerEvent.ROOM_USER_LEAVE)["peer_id"] == o
    # the room, with its pending request, moved to B: same token, claimed there
    assert net.handed_off == [("A", "r")]
    assert net.claims["r"] == ("B", token)
    assert net.machines["B"].owns("r") and not net.machines["A"].owns("r")
    assert net.one(second, ServerEvent.ROOM_JOIN_REQUEST) == {
        "room": "r",
        "peer_id": late,
        "payload": "p",
    }
    net.feed("A", accept(third, "r", late))
    assert net.one(third, ServerEvent.ERROR)["message"] == proto.NOT_OWNER
    net.feed("B", accept(second, "r", late))
    assert net.one(late, ServerEvent.ROOM_JOIN_ACCEPT)["peers"] == [second, third]
    assert net.one(third, ServerEvent.ROOM_USER_JOIN)["peer_id"] == late
    # A's copy follows B's snapshots
    copy = net.machines["A"].room("r")
    assert copy is not None and copy.owner == second and not net.machines["A"].owns("r")


def test_a_new_owner_gone_while_the_room_travels_passes_it_on():
    net = Net.of("A", "B")
    o, second, third = net.connect("A", "o"), net.connect("B", "second"), net.connect("A", "t")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", second, "r")
    net.admit("A", o, "A", third, "r")
    # second is gone on B before the handover arrives there
    net.machines["B"].handle(core.Disconnected(second))
    net.feed("A", core.Disconnected(o))
    assert net.machines["A"].owns("r") and net.claims["r"][0] == "A"  # and back to A
    snap = net.machines["A"].room("r")
    assert snap is not None and snap.owner == third and [s for s, _ in snap.members] == [third]


def test_join_requests_follow_the_room_to_its_new_node():
    net = Net.of("A", "B", "C")
    o, second, asker = net.connect("A", "o"), net.connect("B", "second"), net.connect("C", "q")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", second, "r")
    net.feed("A", core.Disconnected(o))
    net.got(second)
    net.feed("C", join(asker, "r", 1))  # by a lookup of the name's holder: B now
    assert net.one(second, ServerEvent.ROOM_JOIN_REQUEST)["peer_id"] == asker


def test_a_message_for_a_room_that_moved_is_passed_on_a_bounded_number_of_times():
    m = machine("A")
    msg = ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="q", node="C", payload=1)
    (effect,) = m.handle(core.FromNode("C", msg))
    assert isinstance(effect, core.ToOwner) and effect.message.hops == 1
    last = replace(msg, hops=core.MAX_HOPS)
    (effect,) = m.handle(core.FromNode("C", last))
    assert decoded(effect) == ClusterMessage(
        ClusterOp.EMIT,
        "r",
        event=ServerEvent.ROOM_JOIN_REJECT,
        body={"message": proto.ROOM_NOT_FOUND, "payload": 1},
        to=("q",),
    )
    assert isinstance(effect, ToNode) and effect.node == "C"
    leave = ClusterMessage(ClusterOp.LEAVE, "r", sid="q", token="t", hops=core.MAX_HOPS)
    assert m.handle(core.FromNode("C", leave)) == []  # dropped
    assert m.handle(core.FromNode("C", replace(leave, hops=0))) == [
        core.ToOwner(replace(leave, hops=1))
    ]


def test_a_message_for_another_instance_of_the_room_is_not_applied():
    net = Net.of("A", "B")
    o, j = net.connect("A", "o"), net.connect("B", "j")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", j, "r")
    stale = ClusterMessage(ClusterOp.LEAVE, "r", sid=j, token="an-older-room")
    effects = net.machines["A"].handle(core.FromNode("B", stale))
    assert effects == [core.ToOwner(replace(stale, hops=1))]
    snap = net.machines["A"].room("r")
    assert snap is not None and j in dict(snap.members)


def test_an_accept_whose_joiner_node_is_gone_removes_the_joiner():
    net = Net.of("A", "B")
    o, j = net.connect("A", "o"), net.connect("B", "j")
    net.room_of("A", o, "r")
    net.feed("B", join(j, "r"))
    net.got(o)
    net.down.add("B")
    net.feed("A", accept(o, "r", j))
    snap = net.machines["A"].room("r")
    assert snap is not None and [s for s, _ in snap.members] == [o] and snap.version == 3
    assert net.got(o) == []  # it never showed as a member: no leave


def test_an_accept_past_the_joiners_room_limit_is_refused_on_its_node():
    net = Net.of("A", "B", rooms_per_socket=1)
    o1, o2, j = net.connect("A", "o1"), net.connect("A", "o2"), net.connect("B", "j")
    net.room_of("A", o1, "r1")
    net.room_of("A", o2, "r2")
    net.feed("B", join(j, "r1"))
    net.feed("B", join(j, "r2", "x"))
    net.got(o1), net.got(o2)
    net.feed("A", accept(o1, "r1", j))
    assert net.one(j, ServerEvent.ROOM_JOIN_ACCEPT)["room"] == "r1"
    net.feed("A", accept(o2, "r2", j, "x"))
    assert net.one(j, ServerEvent.ROOM_JOIN_REJECT) == {
        "room": "r2",
        "peer_id": j,
        "message": "too many rooms for one socket (limit 1)",
        "payload": "x",
    }
    assert net.got(o2) == []  # no join, no leave
    snap = net.machines["A"].room("r2")
    assert snap is not None and [s for s, _ in snap.members] == [o2]
    assert net.machines["B"].rooms_of(j) == ("r1",)


def test_emits_from_other_nodes_reach_only_local_sockets_still_there():
    m = machine("B")
    m.handle(core.Connected("here"))
    msg = ClusterMessage(
        ClusterOp.EMIT, "r", event=ServerEvent.ICE_CANDIDATE, body={"x": 1}, to=("here", "gone")
    )
    assert m.handle(core.FromNode("A", msg)) == [
        core.Emit(ServerEvent.ICE_CANDIDATE, {"x": 1}, ("here",))
    ]
    assert m.handle(core.FromNode("A", replace(msg, to=("gone",)))) == []


# --- the room's name ---------------------------------------------------------------------------


def test_a_name_lost_at_renewal_is_not_taken_back_and_the_owner_learns_it():
    net = Net.of("A", "B")
    o, j, asker = net.connect("A", "o"), net.connect("B", "j"), net.connect("B", "q")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", j, "r")
    net.feed("B", join(asker, "r", 3))
    net.got(o), net.got(j)
    token = net.claims["r"][1]
    net.claims["r"] = ("B", "another-room")  # e.g. Redis restarted empty and B created "r"
    net.feed("A", core.NameLost("r", token))
    assert net.one(o, ServerEvent.ERROR) == {"message": proto.NAME_LOST.format(room="r")}
    assert net.one(asker, ServerEvent.ROOM_JOIN_REJECT) == {
        "message": proto.ROOM_NOT_FOUND,
        "payload": 3,
    }
    assert net.claims["r"] == ("B", "another-room")  # not overwritten
    assert not net.machines["A"].owns("r")
    # the members keep their room among themselves
    net.feed("B", ice(j, o, "r"))
    assert net.one(o, ServerEvent.ICE_CANDIDATE)["peer_id"] == j
    # a NameLost for another instance, or a second one, changes nothing
    assert net.machines["A"].handle(core.NameLost("r", "other")) == []
    assert net.machines["A"].handle(core.NameLost("r", token)) == []
    # closing it leaves the other room's name alone
    net.feed("B", core.Disconnected(j))
    net.feed("A", core.Disconnected(o))
    assert net.claims["r"] == ("B", "another-room")


def test_a_handed_over_room_whose_name_is_taken_warns_and_tells_its_new_owner():
    net = Net.of("A", "B")
    o, second = net.connect("A", "o"), net.connect("B", "second")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", second, "r")
    net.got(second)
    net.claims["r"] = ("C", "someone-else")
    net.feed("A", core.Disconnected(o))
    assert net.warnings == ["room 'r': its name is held by another room now"]
    assert net.one(second, ServerEvent.ERROR)["message"] == proto.NAME_LOST.format(room="r")


# --- races and odd messages --------------------------------------------------------------------


def test_a_name_claimed_while_a_room_of_it_came_here_is_given_back():
    m = machine("B")
    m.handle(core.Connected("s"))
    m.handle(core.Connected("t"))
    (claim,) = m.handle(create("s", "r"))
    assert isinstance(claim, core.ClaimName)
    snap = proto.Snapshot(
        "r", "other", "o", 2, (("o", proto.Member("A", {})), ("t", proto.Member("B", {})))
    )
    admit = ClusterMessage(ClusterOp.ADMIT, "r", sid="t", node="A", snapshot=snap, token="other")
    m.handle(core.FromNode("A", admit))  # t joined a room "r" living on A meanwhile
    answer = core.ClaimAnswer("r", claim.token, core.ClaimResult.CLAIMED)
    assert m.handle(answer) == [
        core.ReleaseName("r", claim.token),
        core.Emit(ServerEvent.ROOM_CREATE_REJECT, {"message": proto.ROOM_TAKEN}, ("s",)),
    ]
    assert m.rooms_of("s") == () and m.rooms_of("t") == ("r",)


def test_a_request_is_withdrawn_straight_to_the_owners_node_known_from_a_copy():
    net = Net.of("A", "B")
    o, member, asker = net.connect("A", "o"), net.connect("B", "m"), net.connect("B", "q")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", member, "r")
    net.feed("B", join(asker, "r"))
    net.got(o)
    net.messages.clear()
    net.feed("B", core.Disconnected(asker))
    ((frm, to, msg),) = net.messages
    assert (frm, to, msg.op, msg.sid, msg.token) == ("B", "A", ClusterOp.WITHDRAW, asker, "Aid-1")
    snap = net.machines["A"].room("r")
    assert snap is not None and snap.pending == ()
    net.silent(o, member)


def test_an_accept_for_a_socket_gone_meanwhile_is_withdrawn_quietly():
    net = Net.of("A", "B")
    o, j = net.connect("A", "o"), net.connect("B", "j")
    net.room_of("A", o, "r")
    net.feed("B", join(j, "r"))
    net.got(o)
    net.machines["B"].handle(core.Disconnected(j))  # its withdrawal is still on its way
    net.feed("A", accept(o, "r", j))
    snap = net.machines["A"].room("r")
    assert snap is not None and [s for s, _ in snap.members] == [o]
    assert net.emitted == []


def test_a_join_request_passed_on_too_often_is_refused_to_a_local_requester():
    m = machine("A")
    m.handle(core.Connected("q"))
    (effect,) = m.handle(join("q", "r", 1))
    assert isinstance(effect, core.ToOwner) and m.requested_by("q") == ("r",)
    msg = replace(effect.message, hops=core.MAX_HOPS)
    assert m.handle(core.FromNode("A", msg)) == [
        core.Emit(
            ServerEvent.ROOM_JOIN_REJECT, {"message": proto.ROOM_NOT_FOUND, "payload": 1}, ("q",)
        )
    ]
    assert m.requested_by("q") == ()


def test_a_handover_onto_another_room_of_that_name_is_dropped_with_a_warning():
    net = Net.of("B")
    net.connect("B", "s")
    net.room_of("B", "s", "r")
    snap = proto.Snapshot("r", "theirs", "x", 3, (("x", proto.Member("B", {})),))
    handover = ClusterMessage(ClusterOp.HANDOVER, "r", token="theirs", snapshot=snap)
    assert net.machines["B"].handle(core.FromNode("A", handover)) == [
        core.Warn("room 'r': handover dropped, another room of that name")
    ]
    room = net.machines["B"].room("r")
    assert room is not None and room.token == "Bid-1"


@pytest.mark.parametrize("op", [ClusterOp.ADMIT, ClusterOp.HANDOVER, ClusterOp.SNAPSHOT])
def test_messages_without_their_room_change_nothing(op):
    m = machine("B")
    m.handle(core.Connected("s"))
    assert m.handle(core.FromNode("A", ClusterMessage(op, "r", sid="s", node="A"))) == []
    assert m.room("r") is None


@pytest.mark.parametrize("op", [op for op in ClusterOp if op is not ClusterOp.JOIN_REQUEST])
def test_undeliverable_messages_for_rooms_not_here_change_nothing(op):
    m = machine("A")
    assert m.handle(core.Undeliverable(ClusterMessage(op, "r", sid="s", node="B"))) == []


def test_an_undeliverable_join_request_of_another_node_is_refused_there():
    m = machine("A")
    msg = ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="q", node="B", hops=1)
    (effect,) = m.handle(core.Undeliverable(msg, unreachable=True))
    assert isinstance(effect, ToNode) and effect.node == "B"
    assert decoded(effect).body == {"message": proto.BACKEND_DOWN}


# --- every effect, exactly ---------------------------------------------------------------------


def readable(effects: list[core.Effect]) -> list[Any]:
    """``effects`` with each ``ToNode`` as (node, the message it carries), to compare whole."""
    return [(e.node, decoded(e)) if isinstance(e, ToNode) else e for e in effects]


def owned(m: core.RoomsMachine, owner: str, room: str, peerinfo: Any = MISSING) -> str:
    """``owner``, a new socket of ``m``, creates ``room``; returns the room's token."""
    m.handle(core.Connected(owner))
    m.handle(core.Authenticated(owner, peerinfo))
    (claim,) = m.handle(create(owner, room))
    assert isinstance(claim, core.ClaimName)
    m.handle(core.ClaimAnswer(room, claim.token, core.ClaimResult.CLAIMED))
    return claim.token


def member(node: str, peerinfo: Any = MISSING) -> proto.Member:
    return proto.Member(node, {} if peerinfo is MISSING else {"peerinfo": peerinfo})


def admitted(m: core.RoomsMachine, sid: str, snap: proto.Snapshot, peerinfo: Any = MISSING) -> None:
    """``sid``, a socket of ``m`` (connected here if new), is admitted into ``snap.room`` (a
    copy, owned elsewhere)."""
    m.handle(core.Connected(sid))  # a socket it knows stays as it is
    m.handle(core.Authenticated(sid, peerinfo))
    owner_node = dict(snap.members)[snap.owner].node if snap.owner in dict(snap.members) else "A"
    admit = ClusterMessage(
        ClusterOp.ADMIT, snap.room, sid=sid, node=owner_node, snapshot=snap, token=snap.token
    )
    effects = m.handle(core.FromNode(owner_node, admit))
    assert core.Emit(ServerEvent.ROOM_JOIN_ACCEPT, effects[0].body, (sid,)) == effects[0]


def leave_body(sid: str, peerinfo: Any = MISSING, room: str = "r") -> dict[str, Any]:
    return proto.body(room=room, peer_id=sid, peerinfo=peerinfo)


def test_a_member_leaving_a_copy_tells_the_others_the_owners_node_does_not():
    """On a node holding a copy: the leaver's local room-mates hear it at once, each other node
    without the owner once, and the owner's node gets the leave naming who was told."""
    m = machine("B")
    snap = proto.Snapshot(
        "r",
        "T",
        "o",
        5,
        (
            ("o", member("A")),
            ("a2", member("A")),
            ("j", member("B", "pj")),
            ("b2", member("B")),
            ("c", member("C")),
        ),
    )
    admitted(m, "j", snap, "pj")
    admitted(m, "b2", snap)
    assert readable(m.handle(core.Disconnected("j"))) == [
        core.Emit(ServerEvent.ROOM_USER_LEAVE, leave_body("j", "pj"), ("b2",)),
        (
            "C",
            ClusterMessage(
                ClusterOp.EMIT,
                "r",
                event=ServerEvent.ROOM_USER_LEAVE,
                body=leave_body("j", "pj"),
                to=("c",),
            ),
        ),
        (
            "A",
            ClusterMessage(
                ClusterOp.LEAVE, "r", sid="j", data={"peerinfo": "pj"}, token="T", to=("b2", "c")
            ),
        ),
    ]
    assert m.rooms_of("j") == () and m.room("r") is not None  # b2 is still in it here
    assert m.held() == (1, 1)
    without_j = replace(snap, version=6, members=tuple(x for x in snap.members if x[0] != "j"))
    update = ClusterMessage(ClusterOp.SNAPSHOT, "r", token="T", snapshot=without_j)
    assert m.handle(core.FromNode("A", update)) == []
    assert m.room("r") == without_j
    assert readable(m.handle(core.Disconnected("b2"))) == [
        (
            "C",
            ClusterMessage(
                ClusterOp.EMIT,
                "r",
                event=ServerEvent.ROOM_USER_LEAVE,
                body=leave_body("b2"),
                to=("c",),
            ),
        ),
        ("A", ClusterMessage(ClusterOp.LEAVE, "r", sid="b2", token="T", to=("c",))),
    ]
    assert m.room("r") is None and m.held() == (0, 0)  # no member left here: the copy goes


def test_a_leave_from_a_copy_whose_owner_is_unknown_goes_by_the_name():
    m = machine("B")
    snap = proto.Snapshot("r", "T", "gone", 4, (("j", member("B")), ("c", member("C"))))
    admitted(m, "j", snap)
    assert m.handle(core.Disconnected("j")) == [
        ToNode(
            "C",
            core.DIRECT_KIND,
            proto.encode_cluster(
                ClusterMessage(
                    ClusterOp.EMIT,
                    "r",
                    event=ServerEvent.ROOM_USER_LEAVE,
                    body=leave_body("j"),
                    to=("c",),
                )
            ),
        ),
        core.ToOwner(ClusterMessage(ClusterOp.LEAVE, "r", sid="j", token="T", to=("c",))),
    ]


def test_a_leave_names_the_leavers_current_peerinfo():
    """The peerinfo a socket has when it leaves is the one its room-mates hear, on its owner's
    node and through a leave from another node."""
    net = Net.of("A", "B")
    o, j, k = net.connect("A", "o"), net.connect("A", "j", "old"), net.connect("B", "k", "old")
    net.room_of("A", o, "r")
    net.admit("A", o, "A", j, "r")
    net.admit("A", o, "B", k, "r")
    net.got(o), net.got(j), net.got(k)
    net.feed("A", core.Authenticated(j, "new"))
    net.feed("A", core.Disconnected(j))
    assert net.one(o, ServerEvent.ROOM_USER_LEAVE) == leave_body(j, "new")
    assert net.one(k, ServerEvent.ROOM_USER_LEAVE) == leave_body(j, "new")
    net.feed("B", core.Authenticated(k, "newer"))
    net.feed("B", core.Disconnected(k))
    assert net.one(o, ServerEvent.ROOM_USER_LEAVE) == leave_body(k, "newer")
    net.silent(o)


def test_a_join_request_goes_straight_to_a_known_owner():
    m = machine("A")
    owned(m, "o", "r")
    m.handle(core.Connected("j"))
    assert m.handle(join("j", "r", 1)) == [
        emit(ServerEvent.ROOM_JOIN_REQUEST, "o", room="r", peer_id="j", payload=1)
    ]
    assert m.room("r") == proto.Snapshot(
        "r", "Aid-1", "o", 1, (("o", member("A")),), (("j", proto.Pending("A", {}, 1)),)
    )
    b = machine("B")
    snap = proto.Snapshot("r", "T", "o", 3, (("o", member("A")), ("m", member("B"))))
    admitted(b, "m", snap)
    b.handle(core.Connected("q"))
    assert readable(b.handle(join("q", "r"))) == [
        ("A", ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="q", node="B", token="T"))
    ]


def test_a_requester_gone_withdraws_where_its_request_waits():
    m = machine("A")
    owned(m, "o", "r")
    m.handle(core.Connected("j"))
    m.handle(join("j", "r"))
    assert m.handle(core.Disconnected("j")) == []  # its owner's node is this one
    room = m.room("r")
    assert room is not None and room.pending == ()
    b = machine("B")
    snap = proto.Snapshot("r", "T", "o", 3, (("o", member("A")), ("m", member("B"))))
    admitted(b, "m", snap)
    b.handle(core.Connected("q"))
    b.handle(join("q", "r"))
    assert readable(b.handle(core.Disconnected("q"))) == [
        ("A", ClusterMessage(ClusterOp.WITHDRAW, "r", sid="q", token="T"))
    ]


def test_unknown_sockets_and_rooms_have_nothing():
    m = machine()
    assert m.rooms_of("ghost") == () and m.requested_by("ghost") == ()
    assert m.room("nope") is None and m.owns("nope") is False
    assert m.handle(core.NameLost("nope", "t")) == []
    assert m.handle(core.Authenticated("ghost", "p")) == []
    assert m.held() == (0, 0)


def test_a_name_lost_for_another_instance_changes_nothing():
    m = machine()
    token = owned(m, "o", "r")
    assert m.handle(core.NameLost("r", "other")) == []
    assert m.owns("r") is True
    assert m.handle(core.NameLost("r", token)) == [
        core.Emit(ServerEvent.ERROR, {"message": proto.NAME_LOST.format(room="r")}, ("o",))
    ]
    assert m.owns("r") is False


def test_a_name_lost_refuses_pending_requests_wherever_they_are():
    m = machine("A")
    token = owned(m, "o", "r")
    m.handle(core.FromNode("C", ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="q", node="C")))
    assert readable(m.handle(core.NameLost("r", token))) == [
        (
            "C",
            ClusterMessage(
                ClusterOp.EMIT,
                "r",
                event=ServerEvent.ROOM_JOIN_REJECT,
                body={"message": proto.ROOM_NOT_FOUND},
                to=("q",),
            ),
        ),
        core.Emit(ServerEvent.ERROR, {"message": proto.NAME_LOST.format(room="r")}, ("o",)),
    ]


def test_a_reject_for_a_plain_event_name_is_an_error_naming_it():
    """The hub's answers to floods and unknown events name the event as the client sent it."""
    assert core.reject("s", "room-join-request", "m") == core.Emit(
        ServerEvent.ERROR, {"message": "m", "event": "room-join-request"}, ("s",)
    )


@pytest.mark.parametrize("kind", [CREATE, JOIN])
def test_room_names_are_bounded_at_their_exact_length(kind):
    m = machine(name_length=3)
    m.handle(core.Connected("s"))
    command = proto.CreateRoom("abcd", 7) if kind is CREATE else proto.JoinRoom("abcd", 7)
    assert m.handle(cmd("s", kind, command)) == [
        core.reject("s", kind, f"{kind.value}: 'room' is longer than 3 characters", 7)
    ]
    (accepted,) = m.handle(cmd("s", kind, replace(command, room="abc")))
    if kind is CREATE:
        assert accepted == core.ClaimName("abc", "Aid-1")
    else:
        assert accepted == core.ToOwner(
            ClusterMessage(ClusterOp.JOIN_REQUEST, "abc", sid="s", node="A", payload=7)
        )
    event = ServerEvent.ROOM_CREATE_REJECT if kind is CREATE else ServerEvent.ROOM_JOIN_REJECT
    assert core.reject("s", kind, "x", 7) == core.Emit(
        event, {"message": "x", "payload": 7}, ("s",)
    )


def test_the_room_limit_counts_creates_on_their_way_and_answers_with_the_payload():
    m = machine(rooms_per_socket=2)
    m.handle(core.Connected("s"))
    assert m.handle(create("s", "r1")) == [core.ClaimName("r1", "Aid-1")]
    assert m.handle(create("s", "r2")) == [core.ClaimName("r2", "Aid-2")]
    too_many = "too many rooms for one socket (limit 2)"
    assert m.handle(create("s", "r3", 5)) == [
        core.Emit(ServerEvent.ROOM_CREATE_REJECT, {"message": too_many, "payload": 5}, ("s",))
    ]
    assert m.handle(join("s", "r4", 6)) == [
        core.Emit(ServerEvent.ROOM_JOIN_REJECT, {"message": too_many, "payload": 6}, ("s",))
    ]
    m.handle(core.ClaimAnswer("r1", "Aid-1", core.ClaimResult.TAKEN))  # one place frees
    assert m.handle(create("s", "r3")) == [core.ClaimName("r3", "Aid-3")]


def test_refusals_of_creates_and_joins_echo_the_payload():
    m = machine()
    owned(m, "o", "r")
    assert m.handle(create("o", "r", 1)) == [
        core.Emit(
            ServerEvent.ROOM_CREATE_REJECT, {"message": proto.ROOM_TAKEN, "payload": 1}, ("o",)
        )
    ]
    assert m.handle(join("o", "r", 2)) == [
        core.Emit(
            ServerEvent.ROOM_JOIN_REJECT, {"message": proto.ALREADY_IN_ROOM, "payload": 2}, ("o",)
        )
    ]
    # a name that came to be used here while its claim was on its way
    m.handle(core.Connected("s"))
    (claim,) = m.handle(create("s", "late", 3))
    assert isinstance(claim, core.ClaimName)
    admitted(m, "t", proto.Snapshot("late", "T", "x", 2, (("x", member("B")), ("t", member("A")))))
    assert m.handle(core.ClaimAnswer("late", claim.token, core.ClaimResult.CLAIMED)) == [
        core.ReleaseName("late", claim.token),
        core.Emit(
            ServerEvent.ROOM_CREATE_REJECT, {"message": proto.ROOM_TAKEN, "payload": 3}, ("s",)
        ),
    ]


@pytest.mark.parametrize("kind", [ACCEPT, REFUSE])
def test_answers_to_no_request_or_an_unknown_room_are_errors_with_the_payload(kind):
    m = machine()
    owned(m, "o", "r")
    assert m.handle(cmd("o", kind, proto.Answer("r", "nobody", 4))) == [
        core.Emit(
            ServerEvent.ERROR,
            {"message": proto.NO_PENDING_REQUEST, "event": kind.value, "payload": 4},
            ("o",),
        )
    ]
    assert m.handle(cmd("o", kind, proto.Answer("nope", "nobody", 5))) == [
        core.Emit(
            ServerEvent.ERROR,
            {"message": proto.NOT_OWNER, "event": kind.value, "payload": 5},
            ("o",),
        )
    ]


def test_an_accept_admits_on_the_joiners_node_and_updates_the_others():
    m = machine("A")
    token = owned(m, "o", "r")
    m.handle(core.FromNode("C", ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="c", node="C")))
    m.handle(accept("o", "r", "c"))
    m.handle(core.FromNode("B", ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="b", node="B")))
    members = (("o", member("A")), ("c", member("C")), ("b", member("B")))
    snap = proto.Snapshot("r", token, "o", 3, members)
    assert readable(m.handle(accept("o", "r", "b", 9))) == [
        (
            "B",
            ClusterMessage(
                ClusterOp.ADMIT, "r", sid="b", node="A", payload=9, snapshot=snap, token=token
            ),
        ),
        ("C", ClusterMessage(ClusterOp.SNAPSHOT, "r", token=token, snapshot=snap)),
    ]


def test_snapshots_sent_carry_no_pending_requests():
    m = machine("A")
    token = owned(m, "o", "r")
    m.handle(core.FromNode("C", ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="c", node="C")))
    m.handle(core.FromNode("B", ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="b", node="B")))
    (admit,) = m.handle(accept("o", "r", "c"))
    snap = proto.Snapshot("r", token, "o", 2, (("o", member("A")), ("c", member("C"))))
    assert readable([admit]) == [
        ("C", ClusterMessage(ClusterOp.ADMIT, "r", sid="c", node="A", snapshot=snap, token=token))
    ]
    room = m.room("r")
    assert room is not None and room.pending == (("b", proto.Pending("B", {})),)


def test_a_member_leaving_the_owners_node_updates_the_copies():
    m = machine("A")
    token = owned(m, "o", "r")
    m.handle(core.Connected("a2"))
    m.handle(join("a2", "r"))
    m.handle(accept("o", "r", "a2"))
    m.handle(core.FromNode("C", ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="c", node="C")))
    m.handle(accept("o", "r", "c"))
    snap = proto.Snapshot("r", token, "o", 4, (("o", member("A")), ("c", member("C"))))
    assert readable(m.handle(core.Disconnected("a2"))) == [
        core.Emit(ServerEvent.ROOM_USER_LEAVE, leave_body("a2"), ("o",)),
        (
            "C",
            ClusterMessage(
                ClusterOp.EMIT,
                "r",
                event=ServerEvent.ROOM_USER_LEAVE,
                body=leave_body("a2"),
                to=("c",),
            ),
        ),
        ("C", ClusterMessage(ClusterOp.SNAPSHOT, "r", token=token, snapshot=snap)),
    ]


def test_an_owner_leaving_hands_over_here_and_updates_the_copies():
    m = machine("A")
    token = owned(m, "o", "r")
    m.handle(core.Connected("a2"))
    m.handle(join("a2", "r"))
    m.handle(accept("o", "r", "a2"))
    m.handle(core.FromNode("C", ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="c", node="C")))
    m.handle(accept("o", "r", "c"))
    snap = proto.Snapshot("r", token, "a2", 4, (("a2", member("A")), ("c", member("C"))))
    effects = readable(m.handle(core.Disconnected("o")))
    assert effects[-1] == ("C", ClusterMessage(ClusterOp.SNAPSHOT, "r", token=token, snapshot=snap))
    assert m.owns("r") is True


def test_an_owner_leaving_hands_over_to_another_node():
    m = machine("A")
    token = owned(m, "o", "r")
    for sid, node in (("b", "B"), ("c", "C")):
        m.handle(
            core.FromNode(node, ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid=sid, node=node))
        )
        m.handle(accept("o", "r", sid))
    m.handle(
        core.FromNode(
            "D", ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="d", node="D", payload=1)
        )
    )
    members = (("b", member("B")), ("c", member("C")))
    pending = (("d", proto.Pending("D", {}, 1)),)
    handed = proto.Snapshot("r", token, "b", 4, members, pending)
    assert readable(m.handle(core.Disconnected("o"))) == [
        (
            "B",
            ClusterMessage(
                ClusterOp.EMIT,
                "r",
                event=ServerEvent.ROOM_USER_LEAVE,
                body=leave_body("o"),
                to=("b",),
            ),
        ),
        (
            "C",
            ClusterMessage(
                ClusterOp.EMIT,
                "r",
                event=ServerEvent.ROOM_USER_LEAVE,
                body=leave_body("o"),
                to=("c",),
            ),
        ),
        core.HandOffName("r", token),
        ("B", ClusterMessage(ClusterOp.HANDOVER, "r", token=token, snapshot=handed)),
        (
            "C",
            ClusterMessage(
                ClusterOp.SNAPSHOT, "r", token=token, snapshot=replace(handed, pending=())
            ),
        ),
    ]
    assert m.room("r") is None and m.owns("r") is False and m.held() == (0, 0)


def test_a_copy_is_never_the_room_itself():
    net = Net.of("A", "B")
    o, second, third = net.connect("A", "o"), net.connect("B", "second"), net.connect("A", "t")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", second, "r")
    net.admit("A", o, "A", third, "r")
    assert net.machines["B"].owns("r") is False
    net.feed("A", core.Disconnected(o))
    assert net.machines["A"].owns("r") is False and net.machines["B"].owns("r") is True


def test_a_room_that_came_back_is_no_longer_passed_on_to_where_it_was():
    net = Net.of("A", "B")
    o, b, a2 = net.connect("A", "o"), net.connect("B", "b"), net.connect("A", "a2")
    net.room_of("A", o, "r")
    net.admit("A", o, "B", b, "r")
    net.admit("A", o, "A", a2, "r")
    net.feed("A", core.Disconnected(o))  # to B
    net.feed("B", core.Disconnected(b))  # and back to A
    assert net.machines["A"].owns("r")
    net.feed("A", core.Disconnected(a2))  # closed
    assert "r" not in net.claims
    request = ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="q", node="C")
    assert net.machines["A"].handle(core.FromNode("C", request)) == [
        core.ToOwner(replace(request, hops=1))
    ]


def test_a_join_request_passed_on_drops_the_token_of_the_instance_it_missed():
    m = machine("A")
    request = ClusterMessage(ClusterOp.JOIN_REQUEST, "r", sid="q", node="C", token="old")
    assert m.handle(core.FromNode("C", request)) == [
        core.ToOwner(replace(request, hops=1, token=""))
    ]


def test_a_join_reject_from_another_node_ends_the_request_here():
    m = machine("B")
    m.handle(core.Connected("q"))
    m.handle(join("q", "r"))
    reject_msg = ClusterMessage(
        ClusterOp.EMIT,
        "r",
        event=ServerEvent.ROOM_JOIN_REJECT,
        body={"message": proto.OWNER_REJECTED},
        to=("q",),
    )
    expected = [core.Emit(ServerEvent.ROOM_JOIN_REJECT, {"message": proto.OWNER_REJECTED}, ("q",))]
    assert m.handle(core.FromNode("A", reject_msg)) == expected
    assert m.requested_by("q") == ()
    assert m.handle(core.FromNode("A", reject_msg)) == expected  # again: nothing to end


def test_a_snapshot_without_its_room_changes_a_copy_not():
    m = machine("B")
    snap = proto.Snapshot("r", "T", "o", 3, (("o", member("A")), ("m", member("B"))))
    admitted(m, "m", snap)
    empty = ClusterMessage(ClusterOp.SNAPSHOT, "r", token="T")
    assert m.handle(core.FromNode("A", empty)) == []
    assert m.room("r") == snap


def test_an_admit_past_the_room_limit_withdraws_with_the_rooms_token():
    m = machine("B", rooms_per_socket=1)
    m.handle(core.Connected("j"))
    m.handle(join("j", "r1"))
    m.handle(join("j", "r2"))
    assert m.requested_by("j") == ("r1", "r2")
    first = proto.Snapshot("r1", "T1", "o", 2, (("o", member("A")), ("j", member("B"))))
    admitted(m, "j", first)
    assert m.requested_by("j") == ("r2",)
    snap = proto.Snapshot("r2", "T2", "o", 2, (("o", member("A")), ("j", member("B"))))
    admit = ClusterMessage(ClusterOp.ADMIT, "r2", sid="j", node="A", snapshot=snap, token="T2")
    body = {"room": "r2", "peer_id": "j", "message": core.too_many_rooms(1)}
    assert readable(m.handle(core.FromNode("A", admit))) == [
        ("A", ClusterMessage(ClusterOp.WITHDRAW, "r2", sid="j", token="T2")),
        core.Emit(ServerEvent.ROOM_JOIN_REJECT, body, ("j",)),
    ]
    assert m.requested_by("j") == ()
    # an admit it never asked for, past the limit too
    other = replace(admit, room="r3", snapshot=replace(snap, room="r3"))
    assert readable(m.handle(core.FromNode("A", other))) == [
        ("A", ClusterMessage(ClusterOp.WITHDRAW, "r3", sid="j", token="T2")),
        core.Emit(ServerEvent.ROOM_JOIN_REJECT, {**body, "room": "r3"}, ("j",)),
    ]


def test_an_undeliverable_admit_drops_the_joiner_and_updates_the_copies():
    net = Net.of("A", "B", "C")
    o, c, j = net.connect("A", "o"), net.connect("C", "c"), net.connect("B", "j")
    net.room_of("A", o, "r")
    net.admit("A", o, "C", c, "r")
    net.feed("B", join(j, "r"))
    net.got(o), net.got(c)
    net.down.add("B")
    net.messages.clear()
    net.feed("A", accept(o, "r", j))
    snapshots = [m.snapshot for f, t, m in net.messages if t == "C"]
    assert [(s.version, [sid for sid, _ in s.members]) for s in snapshots if s] == [
        (3, [o, c, j]),
        (4, [o, c]),
    ]
    net.silent(o, c)


def test_a_relay_to_another_node_names_its_room():
    net = Net.of("A", "B")
    a, b = net.connect("A", "a"), net.connect("B", "b")
    net.room_of("A", a, "r")
    net.admit("A", a, "B", b, "r")
    net.messages.clear()
    net.feed("A", ice(a, b, "r"))
    assert net.messages == [
        (
            "A",
            "B",
            ClusterMessage(
                ClusterOp.EMIT,
                "r",
                event=ServerEvent.ICE_CANDIDATE,
                body={"peer_id": a, "ice_candidate": {"c": 1}, "room": "r"},
                to=(b,),
            ),
        )
    ]


def test_an_admit_tells_the_members_on_other_nodes_their_room():
    m = machine("B")
    m.handle(core.Connected("j"))
    m.handle(core.Authenticated("j", "pj"))
    m.handle(join("j", "r"))
    snap = proto.Snapshot(
        "r", "T", "o", 3, (("o", member("A")), ("c", member("C")), ("j", member("B", "pj")))
    )
    admit = ClusterMessage(
        ClusterOp.ADMIT, "r", sid="j", node="A", payload=2, snapshot=snap, token="T"
    )
    accepted = {
        "room": "r",
        "peer_id": "j",
        "peers": ["o", "c"],
        "peersinfo": {"o": {}, "c": {}, "j": {"peerinfo": "pj"}},
        "payload": 2,
    }
    joined = {"room": "r", "peer_id": "j", "payload": 2, "peerinfo": "pj"}
    assert readable(m.handle(core.FromNode("A", admit))) == [
        core.Emit(ServerEvent.ROOM_JOIN_ACCEPT, accepted, ("j",)),
        (
            "A",
            ClusterMessage(
                ClusterOp.EMIT, "r", event=ServerEvent.ROOM_USER_JOIN, body=joined, to=("o",)
            ),
        ),
        (
            "C",
            ClusterMessage(
                ClusterOp.EMIT, "r", event=ServerEvent.ROOM_USER_JOIN, body=joined, to=("c",)
            ),
        ),
    ]
    assert m.rooms_of("j") == ("r",) and m.requested_by("j") == () and m.room("r") == snap


def test_a_room_handed_over_again_is_remembered_as_the_latest(monkeypatch):
    monkeypatch.setattr(core, "MOVED_REMEMBERED", 2)
    net = Net.of("A", "B")

    def hand_over(room: str, n: int) -> None:
        owner, other = net.connect("A", f"o{n}"), net.connect("B", f"m{n}")
        net.room_of("A", owner, room)
        net.admit("A", owner, "B", other, room)
        net.feed("A", core.Disconnected(owner))
        assert net.claims[room][0] == "B"

    hand_over("r1", 1)
    net.feed("B", core.Disconnected("m1"))  # r1 closes on B...
    hand_over("r2", 2)
    hand_over("r1", 3)  # ...and a new r1 goes from A to B: the latest handed over
    hand_over("r3", 4)  # r2 is forgotten, not r1
    a = net.machines["A"]
    for room, passed_on in (("r1", True), ("r2", False), ("r3", True)):
        request = ClusterMessage(ClusterOp.JOIN_REQUEST, room, sid="q", node="C")
        (effect,) = a.handle(core.FromNode("C", request))
        assert isinstance(effect, ToNode) is passed_on, room
