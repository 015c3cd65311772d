"""PeerJS's state machine (core/peerjs.py) without sockets, tasks or a clock.

Every transition is an event in and effects out (docs/protocols/peerjs.md); time is the ``now``
each test passes, and the hub's part (claims, lookups, other nodes) is played by the test.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from polysignal.core.effects import Close, Send, ToNode
from polysignal.core.errors import MalformedFrame
from polysignal.core.peerjs import (
    QUEUE_RECHECK,
    RELAY_KIND,
    Claim,
    Effect,
    Lookup,
    PeerJsNode,
    Release,
    claim_key,
)
from polysignal.protocols import peerjs as proto
from polysignal.protocols.peerjs import MessageType

OPEN = {"type": "OPEN"}


class Conn:
    """A connection handle as the hub would pass one: it may be closing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closing = False

    def __repr__(self) -> str:
        return f"<Conn {self.name}>"


def machine(**options: Any) -> PeerJsNode:
    return PeerJsNode("node-1", is_closing=lambda conn: conn.closing, **options)


def query(peer_id: str, token: str = "t", key: str = "peerjs") -> str:
    return f"key={key}&id={peer_id}&token={token}&version=1.5.4"


def sent(effects: Any, conn: Any = None) -> list[Any]:
    """The messages of the Send effects (to ``conn`` only, if given), decoded."""
    return [
        orjson.loads(e.payload)
        for e in effects
        if isinstance(e, Send) and (conn is None or e.conn is conn)
    ]


def join(node: PeerJsNode, peer_id: str, token: str = "t", now: float = 0.0) -> Conn:
    """A client that opened and whose claim succeeded."""
    conn = Conn(peer_id)
    (claim,) = node.on_open(conn, query(peer_id, token), now)
    assert isinstance(claim, Claim) and claim.peer_id == peer_id and claim.conn is conn
    assert sent(node.on_claimed(claim, True)) == [OPEN]
    return conn


def msg(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def error(text: str) -> dict[str, Any]:
    return {"type": "ERROR", "payload": {"msg": text}}


# --- opening ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "text"),
    [
        ("id=a&token=t", "No id, token, or key supplied to websocket server"),
        ("key=peerjs&token=t", "No id, token, or key supplied to websocket server"),
        ("key=peerjs&id=a", "No id, token, or key supplied to websocket server"),
        ("key=nope&id=a&token=t", "Invalid key provided"),
        ("key=peerjs&id=" + "a" * 257 + "&token=t", "id, token or key longer than 256 characters"),
    ],
)
def test_bad_parameters_get_the_error_then_a_close(q, text):
    node, conn = machine(), Conn("c")
    effects = node.on_open(conn, q, 0.0)
    assert effects == (Send(conn, proto.encode_error(text)), Close(conn, 1000))
    assert "a" not in node


def test_the_key_is_a_setting():
    node = machine(key="secret")
    assert isinstance(node.on_open(Conn("c"), query("a", key="secret"), 0.0)[0], Claim)


def test_concurrent_limit_at_its_exact_boundary():
    node = machine(concurrent_limit=2)
    join(node, "a")
    second = Conn("b")
    assert isinstance(node.on_open(second, query("b"), 0.0)[0], Claim)  # pending counts too
    third = Conn("c")
    assert sent(node.on_open(third, query("c"), 0.0)) == [
        error("Server has reached its concurrent user limit")
    ]
    # A re-attach is not a new client: the limit does not apply.
    again = Conn("a2")
    assert sent(node.on_open(again, query("a"), 0.0)) == [OPEN]


def test_claim_refused_is_id_taken_and_a_claim_for_nobody_is_given_back():
    node, conn = machine(), Conn("a")
    (claim,) = node.on_open(conn, query("a"), 0.0)
    assert node.on_claimed(claim, False) == (Send(conn, proto.ID_TAKEN_FRAME), Close(conn, 1000))
    assert "a" not in node and node.ids() == []
    assert node.on_claimed(claim, True) == (Release("a", claim.token),)
    assert node.on_claimed(claim, False) == ()
    assert claim.key == claim_key("a") == "peerjs:a"


def test_same_id_and_token_re_attaches_with_open_and_closes_the_older_socket():
    node = machine()
    old = join(node, "a")
    new = Conn("a-new")
    effects = node.on_open(new, query("a"), 1.0)
    assert effects[0] == Close(old, 1000, "replaced by a newer connection")
    assert sent(effects, new) == [OPEN]
    assert node.on_close(old) == ()  # the older socket's close changes nothing
    assert node.ids() == ["a"]
    assert node.on_close(new) == (Release("a", proto.token_digest("a", "t")),)


def test_re_attach_while_the_claim_is_on_its_way_waits_for_its_answer():
    node = machine()
    first = Conn("first")
    (claim,) = node.on_open(first, query("a"), 0.0)
    second = Conn("second")
    assert node.on_open(second, query("a"), 0.0) == [
        Close(first, 1000, "replaced by a newer connection")
    ]
    assert node.on_claimed(claim, True) == [Send(second, proto.OPEN_FRAME)]


def test_another_token_while_the_holder_is_live_is_id_taken():
    node = machine(stale_after=10.0)
    holder = join(node, "a")
    other = Conn("other")
    assert node.on_open(other, query("a", "x"), 9.99) == (
        Send(other, proto.ID_TAKEN_FRAME),
        Close(other, 1000),
    )
    assert node.holder_live("a", proto.token_digest("a", "t"), 9.99)
    assert not node.holder_live("a", proto.token_digest("a", "x"), 1.0)
    assert not node.holder_live("b", "whatever", 1.0)
    assert node.on_message(holder, msg(type="HEARTBEAT"), 9.0) == ()
    assert node.holder_live("a", proto.token_digest("a", "t"), 18.99)


@pytest.mark.parametrize("why", ["silent", "closing"])
def test_a_ghost_holder_does_not_block_its_id(why):
    """Silent for stale_after (two heartbeats), or its socket closing: taken over at once."""
    node = machine(stale_after=10.0)
    ghost = join(node, "a")
    now = 10.0
    if why == "closing":
        ghost.closing = True
        now = 1.0
    new = Conn("new")
    effects = node.on_open(new, query("a", "x"), now)
    token = proto.token_digest("a", "x")
    assert effects == [
        Close(ghost, 1000, "id taken over"),
        Release("a", proto.token_digest("a", "t")),
        Claim(new, "a", token),
    ]
    assert node.on_close(ghost) == ()
    assert sent(node.on_claimed(effects[-1], True)) == [OPEN]
    assert node.holder_live("a", token, now)


def test_a_pending_ghost_is_closed_without_a_release():
    node = machine(stale_after=10.0)
    ghost = Conn("ghost")
    node.on_open(ghost, query("a"), 0.0)
    new = Conn("new")
    effects = node.on_open(new, query("a", "x"), 10.0)
    assert effects[0] == Close(ghost, 1000, "id taken over")
    assert isinstance(effects[1], Claim)


def test_evicted_or_lost_ids_close_their_socket():
    node = machine()
    a, b = join(node, "a"), join(node, "b")
    token_a = proto.token_digest("a", "t")
    assert node.on_evict(proto.Holder("a", "other-token")) == ()
    assert node.on_evict(proto.Holder("a", token_a)) == (
        Close(a, 1000, "id taken over"),
        Release("a", token_a),
    )
    assert node.on_id_lost("b", proto.token_digest("b", "t"))[0] == Close(b, 1000, "id taken over")
    assert node.on_id_lost("b", "any") == ()
    assert node.ids() == []


def test_close_of_an_unknown_connection_is_nothing():
    assert machine().on_close(Conn("x")) == ()


# --- messages ---------------------------------------------------------------------------------


def test_relay_to_a_local_peer_stamps_src():
    node = machine()
    a, b = join(node, "a"), join(node, "b")
    effects = node.on_message(a, msg(type="OFFER", dst="b", src="forged", payload={"s": 1}), 1.0)
    assert effects == (Send(b, b'{"type":"OFFER","src":"a","dst":"b","payload":{"s":1}}'),)
    # To itself, as the original.
    assert sent(node.on_message(a, msg(type="CANDIDATE", dst="a"), 1.0), a) == [
        {"type": "CANDIDATE", "src": "a", "dst": "a"}
    ]


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        (b"nope", "Invalid message: not JSON"),
        (b"[1]", "Invalid message: expected a JSON object"),
        (b'{"type":"PING"}', "Unknown message type: PING"),
        (b'{"type":"OFFER"}', "Invalid message: dst is missing"),
        (b'{"type":"OFFER","dst":3}', "Invalid message: dst must be a string"),
    ],
)
def test_bad_input_is_answered_with_an_error_and_the_socket_stays(frame, text):
    node = machine()
    a = join(node, "a")
    assert node.on_message(a, frame, 1.0) == (Send(a, proto.encode_error(text)),)
    assert node.ids() == ["a"]


def test_messages_before_open_or_after_close_are_ignored():
    node = machine()
    pending = Conn("p")
    node.on_open(pending, query("p"), 0.0)
    assert node.on_message(pending, msg(type="OFFER", dst="x"), 0.0) == ()
    assert node.on_message(Conn("stranger"), msg(type="HEARTBEAT"), 0.0) == ()
    assert node.on_rate_limited(pending, True) == ()


def test_rate_limited_frames_are_reported_once_per_report():
    node = machine()
    a = join(node, "a")
    assert node.on_rate_limited(a, True) == (Send(a, proto.encode_error("Too many messages")),)
    assert node.on_rate_limited(a, False) == ()


def test_leave_without_dst_ends_the_session():
    node = machine()
    a = join(node, "a")
    token = proto.token_digest("a", "t")
    assert node.on_message(a, msg(type="LEAVE"), 1.0) == (
        Close(a, 1000, "left"),
        Release("a", token),
    )
    assert node.ids() == [] and node.on_close(a) == ()


def test_a_closing_target_answers_leave_and_notices_to_it_are_dropped():
    node = machine()
    a, b = join(node, "a"), join(node, "b")
    b.closing = True
    assert sent(node.on_message(a, msg(type="OFFER", dst="b"), 1.0)) == [
        {"type": "LEAVE", "src": "b", "dst": "a"}
    ]
    assert node.on_message(a, msg(type="LEAVE", dst="b"), 1.0) == ()
    assert node.on_message(a, msg(type="EXPIRE", dst="b"), 1.0) == ()
    # The LEAVE for a sender elsewhere is looked up; for a closing one, dropped, not bounced.
    (lookup,) = node.on_relay("node-2", msg(type="OFFER", src="z", dst="b"), 1.0)
    assert lookup == Lookup("z", b'{"type":"LEAVE","src":"b","dst":"z"}', MessageType.LEAVE, "b")
    a.closing = True
    assert node.on_relay("node-2", msg(type="OFFER", src="a", dst="b"), 1.0) == ()


def test_a_peer_elsewhere_is_looked_up_and_relayed_to_its_node():
    node = machine()
    a = join(node, "a")
    (lookup,) = node.on_message(a, msg(type="ANSWER", dst="far", payload=1), 1.0)
    frame = b'{"type":"ANSWER","src":"a","dst":"far","payload":1}'
    assert lookup == Lookup("far", frame, MessageType.ANSWER, "a")
    assert lookup.key == "peerjs:far"
    assert node.on_lookup(lookup, "node-2", 1.0) == (ToNode("node-2", RELAY_KIND, frame),)
    # Arrived here meanwhile: delivered here.
    far = join(node, "far")
    assert node.on_lookup(lookup, "node-2", 1.0) == (Send(far, frame),)


def test_relays_from_other_nodes_are_delivered_or_queued():
    node = machine()
    b = join(node, "b")
    frame = b'{"type":"OFFER","src":"x","dst":"b"}'
    assert node.on_relay("node-2", frame, 1.0) == (Send(b, frame),)
    assert node.on_relay("node-2", b'{"type":"OFFER","src":"x","dst":"c"}', 1.0) == ()
    assert node.queued("c") == 1
    with pytest.raises(MalformedFrame):
        node.on_relay("node-2", b"nope", 1.0)


def test_an_undelivered_relay_expires_for_its_sender():
    node = machine()
    a = join(node, "a")
    frame = b'{"type":"OFFER","src":"a","dst":"far"}'
    assert sent(node.on_undelivered(ToNode("node-2", RELAY_KIND, frame))) == [
        {"type": "EXPIRE", "src": "far", "dst": "a"}
    ]
    leave = b'{"type":"LEAVE","src":"a","dst":"far"}'
    assert node.on_undelivered(ToNode("node-2", RELAY_KIND, leave)) == ()
    assert node.on_undelivered(ToNode("node-2", "peerjs-probed", b"{}")) == ()
    assert a


# --- queues and expiry ------------------------------------------------------------------------


def offline(
    node: PeerJsNode, conn: Conn, dst: str, now: float, **fields: Any
) -> tuple[Effect, ...]:
    """Send a message to ``dst``, which the cluster says is connected nowhere."""
    fields.setdefault("type", "OFFER")
    (lookup,) = node.on_message(conn, msg(dst=dst, **fields), now)
    assert isinstance(lookup, Lookup)
    return tuple(node.on_lookup(lookup, None, now))


def test_messages_for_an_offline_id_are_queued_and_delivered_after_open():
    node = machine()
    a = join(node, "a")
    assert offline(node, a, "b", 1.0, payload=1) == ()
    assert offline(node, a, "b", 1.1, type="CANDIDATE", payload=2) == ()
    assert offline(node, a, "b", 1.2, type="LEAVE") == ()  # never queued
    assert offline(node, a, "b", 1.2, type="EXPIRE") == ()
    assert node.queued("b") == 2
    conn = Conn("b")
    (claim,) = node.on_open(conn, query("b"), 2.0)
    assert [m["payload"] for m in sent(node.on_claimed(claim, True))[1:]] == [1, 2]
    assert node.queued("b") == 0 and node.queued_bytes == 0


def test_a_queue_also_waits_for_a_client_whose_claim_is_on_its_way():
    node = machine()
    a = join(node, "a")
    conn = Conn("b")
    (claim,) = node.on_open(conn, query("b"), 1.0)
    assert node.on_message(a, msg(type="OFFER", dst="b"), 1.0) == ()
    assert sent(node.on_claimed(claim, True)) == [OPEN, {"type": "OFFER", "src": "a", "dst": "b"}]


def test_unread_queues_expire_once_per_sender_at_exactly_expire_timeout():
    node = machine(expire_timeout=5.0)
    a, c = join(node, "a"), join(node, "c")
    offline(node, a, "b", 1.0)
    offline(node, a, "b", 1.5)
    offline(node, c, "b", 2.0)
    offline(node, a, "z", 3.0)
    assert node.next_deadline() == 1.0 + QUEUE_RECHECK  # the first check comes first
    lookups = node.on_timer(1.0 + QUEUE_RECHECK)
    assert lookups == [Lookup("b")]
    assert all(sent(node.on_timer(t)) == [] for t in (5.99,))
    effects = node.on_timer(6.0)
    assert sent(effects) == [
        {"type": "EXPIRE", "src": "b", "dst": "a"},
        {"type": "EXPIRE", "src": "b", "dst": "c"},
    ]
    assert node.queued("b") == 0 and node.queued("z") == 1
    assert sent(node.on_timer(8.0)) == [{"type": "EXPIRE", "src": "z", "dst": "a"}]
    assert node.queued_bytes == 0


def test_an_expire_for_a_sender_elsewhere_is_looked_up_and_dropped_if_nowhere():
    node = machine(expire_timeout=5.0)
    frame = b'{"type":"OFFER","src":"far","dst":"b"}'
    node.on_relay("node-2", frame, 0.0)
    (lookup,) = [e for e in node.on_timer(5.0) if isinstance(e, Lookup) and e.frame]
    assert lookup.type is MessageType.EXPIRE and lookup.target == "far"
    assert node.on_lookup(lookup, "node-2", 5.0) == (
        ToNode("node-2", RELAY_KIND, b'{"type":"EXPIRE","src":"b","dst":"far"}'),
    )
    assert node.on_lookup(lookup, None, 5.0) == ()
    assert node.on_lookup_failed(lookup, 5.0) == ()


def test_a_queue_whose_id_appears_on_another_node_is_handed_there():
    node = machine()
    a = join(node, "a")
    offline(node, a, "b", 1.0, payload=1)
    offline(node, a, "b", 1.1, payload=2)
    (check,) = node.on_timer(1.0 + QUEUE_RECHECK)
    assert check == Lookup("b") and check.frame is None
    assert node.on_lookup(check, None, 1.5) == ()
    assert node.on_lookup(check, "node-1", 1.5) == ()  # this node counts as nobody
    assert node.next_deadline() == 1.0 + 2 * QUEUE_RECHECK
    effects = node.on_lookup(check, "node-2", 1.6)
    assert [e.node for e in effects] == ["node-2", "node-2"]
    assert [orjson.loads(e.payload)["payload"] for e in effects] == [1, 2]
    assert node.queued("b") == 0 and node.on_lookup(check, "node-2", 1.7) == ()


def test_queue_bounds_at_their_exact_boundaries():
    frame_size = len(b'{"type":"OFFER","src":"a","dst":"b","payload":1}')
    node = machine(queue_messages=2, queue_bytes=10 * frame_size)
    a = join(node, "a")
    assert offline(node, a, "b", 1.0, payload=1) == ()
    assert offline(node, a, "b", 1.0, payload=2) == ()
    over = [{"type": "EXPIRE", "src": "b", "dst": "a"}]
    assert sent(offline(node, a, "b", 1.0, payload=3)) == over  # the third: EXPIRE at once
    assert node.queued("b") == 2

    node = machine(queue_bytes=2 * frame_size)
    a = join(node, "a")
    assert offline(node, a, "b", 1.0, payload=1) == ()
    assert offline(node, a, "b", 1.0, payload=2) == ()  # exactly queue_bytes
    assert sent(offline(node, a, "b", 1.0, payload=3)) == over

    node = machine(queue_node_bytes=2 * frame_size)
    a = join(node, "a")
    assert offline(node, a, "b", 1.0, payload=1) == ()
    assert offline(node, a, "c", 1.0, payload=2) == ()
    assert node.queued_bytes == 2 * frame_size
    assert sent(offline(node, a, "d", 1.0, payload=3)) == [
        {"type": "EXPIRE", "src": "d", "dst": "a"}
    ]


def test_silent_clients_are_closed_at_exactly_alive_timeout_and_their_queue_goes():
    node = machine(alive_timeout=60.0)
    a = join(node, "a", now=0.0)
    b = join(node, "b", now=0.0)
    token = proto.token_digest("a", "t")
    node.on_message(b, msg(type="HEARTBEAT"), 30.0)
    assert node.next_deadline() == 60.0
    assert node.on_timer(59.99) == []
    assert node.on_timer(60.0) == [Close(a, 1000, "alive timeout"), Release("a", token)]
    assert node.ids() == ["b"] and node.next_deadline() == 90.0
    assert node.on_timer(90.0)[0] == Close(b, 1000, "alive timeout")
    assert node.next_deadline() is None


def test_a_silent_pending_client_is_closed_and_what_waited_for_it_goes():
    node = machine(alive_timeout=60.0, expire_timeout=100.0)
    pending = Conn("p")
    node.on_open(pending, query("p"), 0.0)
    node.on_relay("node-2", b'{"type":"OFFER","src":"x","dst":"p"}', 1.0)
    assert node.queued("p") == 1
    effects = [e for e in node.on_timer(60.0) if not isinstance(e, Lookup)]
    assert effects == [Close(pending, 1000, "alive timeout")]
    assert node.queued("p") == 0 and node.queued_bytes == 0


def test_alive_timeout_zero_keeps_no_timer():
    node = machine(alive_timeout=0.0)
    join(node, "a")
    assert node.next_deadline() is None and node.on_timer(1e9) == []


def test_clear_forgets_every_queue():
    node = machine()
    a = join(node, "a")
    offline(node, a, "b", 1.0)
    node.clear()
    assert (
        node.queued("b") == 0
        and node.queued_bytes == 0
        and node.on_timer(100.0)
        == [
            Close(a, 1000, "alive timeout"),
            Release("a", proto.token_digest("a", "t")),
        ]
    )


def test_sooner_is_raised_only_when_the_next_deadline_may_come_sooner():
    """The hub re-arms its timer only on ``sooner``: a new client or a new queue raise it; a
    relay, which only moves its sender's deadline later, and a second message for a queue that
    exists do not."""
    node = machine(alive_timeout=60.0, expire_timeout=5.0)
    a = join(node, "a", now=0.0)
    assert node.sooner and node.next_deadline() == 60.0
    node.sooner = False
    b = join(node, "b", now=1.0)
    assert node.sooner
    node.sooner = False
    node.on_message(a, msg(type="OFFER", dst="b", payload=1), 2.0)
    assert not node.sooner and node.next_deadline() == 61.0  # b's, now the oldest
    assert offline(node, b, "c", 3.0, payload=1) == ()
    assert node.sooner and node.next_deadline() == 3.0 + min(QUEUE_RECHECK, 5.0)
    node.sooner = False
    assert offline(node, b, "c", 3.1, payload=2) == ()
    assert not node.sooner
