"""Signal-Fire's state machine (core/signalfire.py) without sockets, tasks or a clock.

Every transition is an event in and effects out (docs/protocols/signal-fire.md); time is the
``now`` each test passes. The first tests look at one machine's effects one by one; the
``Cluster`` below carries effects out between two machines the way the server's hub does (claims
in a dict, direct messages handed to the other machine), for the flows that cross nodes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from polysignal.core.effects import Close, Send, ToNode
from polysignal.core.errors import MalformedFrame
from polysignal.core.signalfire import (
    CLAIM_ATTEMPTS,
    CLAIM_PREFIX,
    RELAY_KIND,
    UNDELIVERABLE_KIND,
    Claim,
    Effect,
    Lookup,
    PendingSessions,
    Relay,
    Release,
    SignalFireNode,
    claim_key,
)
from polysignal.protocols import signalfire as proto

T = 30.0  # SESSION_TIMEOUT of these tests
OFFER = {"offer": {"type": "offer", "sdp": "v=0"}}
ANSWER = {"answer": {"type": "answer", "sdp": "v=0"}}
CANDIDATE = {"candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}}
NOWHERE = "Z" * 21  # an id of the right shape that nobody holds


class Conn:
    """A connection handle as the hub would pass one: it may be closing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closing = False

    def __repr__(self) -> str:
        return f"<Conn {self.name}>"


def ids() -> Iterator[str]:
    """Ids of the right shape, one letter each: AAAA..., BBBB..., ..."""
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXY":
        yield letter * 21


def machine(node_id: str = "node-1", timeout: float = T, **kwargs: Any) -> SignalFireNode:
    fresh = ids()
    kwargs.setdefault("new_id", lambda: next(fresh))
    return SignalFireNode(
        node_id, session_timeout=timeout, is_closing=lambda conn: conn.closing, **kwargs
    )


def join(m: SignalFireNode, name: str, legacy: bool = False) -> tuple[Conn, str]:
    """Open a connection and claim its id: (its handle, its id)."""
    conn = Conn(name)
    (claim,) = m.on_open(conn, legacy)
    assert isinstance(claim, Claim) and claim.conn is conn
    (welcome,) = m.on_claimed(claim, True)
    assert isinstance(welcome, Send) and welcome.conn is conn
    assert json(welcome)["data"] == {"id": claim.peer_id}
    return conn, claim.peer_id


def frame(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def request(cmd: str, target: Any = None, data: Any = None, rid: Any = "r1") -> bytes:
    fields: dict[str, Any] = {"id": rid, "cmd": cmd}
    if target is not None:
        fields["target"] = target
    if data is not None:
        fields["data"] = data
    return frame(**fields)


def json(effect: Effect) -> Any:
    assert isinstance(effect, Send | Relay | ToNode), effect
    return orjson.loads(effect.payload)


def ack(conn: Conn, rid: Any = "r1") -> Send:
    return Send(conn, orjson.dumps({"id": rid, "ok": True}))


def error(conn: Conn, message: str, rid: Any = "r1") -> Send:
    return Send(conn, orjson.dumps({"id": rid, "ok": False, "data": {"message": message}}))


def relayed(effect: Effect, cmd: str, origin: str) -> dict[str, Any]:
    """The relayed message, checked for a fresh id, ``cmd``, ``origin`` and no ``target``."""
    message = json(effect)
    assert proto.is_id(message["id"]) and message["cmd"] == cmd and message["origin"] == origin
    assert "target" not in message
    return message


# --- ids and claims -------------------------------------------------------------------------------


def test_a_new_connection_claims_its_id_and_is_welcomed_once_claimed():
    m = machine(ice_servers=({"urls": "stun:127.0.0.1"},))
    conn = Conn("a")
    assert m.on_open(conn, False) == (Claim(conn, "A" * 21),)
    assert Claim(conn, "A" * 21).key == "signalfire:" + "A" * 21 == claim_key("A" * 21)
    (welcome,) = m.on_claimed(Claim(conn, "A" * 21), True)
    message = json(welcome)
    assert welcome.conn is conn and message["cmd"] == "welcome" and proto.is_id(message["id"])
    assert message["data"] == {
        "id": "A" * 21,
        "configuration": {"iceServers": [{"urls": "stun:127.0.0.1"}]},
    }


def test_a_taken_id_is_replaced_and_after_three_the_connection_is_refused():
    m = machine()
    conn = Conn("a")
    assert m.on_open(conn, False) == (Claim(conn, "A" * 21),)
    assert m.on_claimed(Claim(conn, "A" * 21), False) == (Claim(conn, "B" * 21),)
    assert m.on_claimed(Claim(conn, "B" * 21), False) == (Claim(conn, "C" * 21),)
    assert CLAIM_ATTEMPTS == 3
    assert m.on_claimed(Claim(conn, "C" * 21), False) == (Close(conn, 1013, "no free id"),)
    # Nothing is left of it: no messages handled, nothing to release when it closes.
    assert m.on_message(conn, request("session-start", "B" * 21), 0.0) == ()
    assert m.on_close(conn) == ()


def test_an_id_already_used_here_counts_as_an_attempt():
    repeated = iter(["A" * 21, "A" * 21, "A" * 21, "A" * 21])
    m = machine(new_id=lambda: next(repeated))
    a = Conn("a")
    assert m.on_open(a, False) == (Claim(a, "A" * 21),)
    m.on_claimed(Claim(a, "A" * 21), True)
    b = Conn("b")
    assert m.on_open(b, False) == (Close(b, 1013, "no free id"),)


def test_a_claim_answered_after_its_connection_left_is_given_back():
    m = machine()
    conn = Conn("a")
    (claim,) = m.on_open(conn, False)
    assert m.on_close(conn) == ()  # not claimed yet: nothing to release
    assert m.on_claimed(claim, True) == (Release("A" * 21),)
    assert m.on_claimed(claim, False) == ()


def test_requests_before_the_welcome_are_not_handled():
    m = machine()
    _, b_id = join(m, "b")
    conn = Conn("a")
    m.on_open(conn, False)
    assert m.on_message(conn, request("session-start", b_id), 0.0) == ()
    assert m.on_message(Conn("stranger"), request("session-start", b_id), 0.0) == ()


def test_closing_releases_the_id_and_it_is_not_found_afterwards():
    m = machine()
    a, _ = join(m, "a")
    b, b_id = join(m, "b")
    assert m.on_close(b) == (Release(b_id),) and Release(b_id).key == CLAIM_PREFIX + b_id
    assert m.on_close(b) == ()  # once
    # Not local any more: asked of the cluster, which has released it.
    (lookup,) = m.on_message(a, request("session-start", b_id), 0.0)
    assert lookup == Lookup(b_id, a, lookup.request) and lookup.key == CLAIM_PREFIX + b_id
    assert m.on_lookup(lookup, None, 0.0) == (error(a, "Peer Not Found"),)


def test_an_id_lost_to_another_holder_closes_its_socket_and_is_not_released():
    m = machine()
    a, a_id = join(m, "a")
    b, b_id = join(m, "b")
    assert m.on_id_lost(b_id) == (Close(b, 1013, "id taken over"),)
    assert m.on_id_lost(b_id) == ()  # once
    assert m.on_id_lost(NOWHERE) == ()
    b.closing = True  # the hub carried the close out
    assert m.on_message(a, request("session-start", b_id), 0.0) == (error(a, "Peer Offline"),)
    assert m.on_message(b, request("session-start", a_id), 0.0) == ()  # b is not served any more
    assert m.on_close(b) == ()  # the lease is gone already: no Release


# --- the checks of a request, in their order ------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "Bad Request"),
        (b"[1,2]", "Bad Request"),
        (b'{"id":{"a":1},"cmd":"offer"}', "Bad Request"),
        (b'{"id":true,"cmd":"offer"}', "Bad Request"),
        (b'{"cmd":"offer"}', "Missing message ID"),
        (b'{"id":"","cmd":"offer"}', "Missing message ID"),
        (b'{"id":0,"cmd":"offer"}', "Missing message ID"),
    ],
)
def test_frames_that_close_4400(data, reason):
    m = machine()
    a, _ = join(m, "a")
    assert m.on_message(a, data, 0.0) == (Close(a, 4400, reason),)
    assert m.on_rate_limited(a, data) == (Close(a, 4400, reason),)


@pytest.mark.parametrize("cmd", ["dance", "session-timeout", "welcome", None, 5])
def test_unknown_commands_get_nothing(cmd):
    m = machine()
    a, _ = join(m, "a")
    _, b_id = join(m, "b")
    fields = {"id": "x", "target": b_id} | ({} if cmd is None else {"cmd": cmd})
    assert m.on_message(a, frame(**fields), 0.0) == ()
    assert m.on_rate_limited(a, frame(**fields)) == ()


def test_every_error_in_the_originals_order():
    m = machine()
    a, a_id = join(m, "a")
    _, b_id = join(m, "b")
    c, c_id = join(m, "c")
    c.closing = True
    cases = [
        # target missing comes first, then yourself, then the target's state, then the payload
        (request("offer"), "Missing Target"),
        (request("offer", ""), "Missing Target"),
        (request("offer", 0), "Missing Target"),
        (request("offer", a_id), "Can't Send to Yourself"),
        (request("offer", "../etc"), "Peer Not Found"),
        (request("offer", 12345), "Peer Not Found"),
        (request("offer", {"id": b_id}), "Peer Not Found"),
        (request("offer", c_id), "Peer Offline"),
        (request("offer", b_id), "Missing Offer"),
        (request("offer", b_id, ANSWER), "Missing Offer"),
        (request("offer", b_id, {"sdp": "v=0"}), "Missing Offer"),
        (request("answer", b_id, OFFER), "Missing Answer"),
        (request("ice", b_id, {}), "Missing ICE Candidate"),
        (request("ice", b_id, "text"), "Missing ICE Candidate"),
        (request("session-start", c_id), "Peer Offline"),
    ]
    for data, message in cases:
        assert m.on_message(a, data, 0.0) == (error(a, message),), data
    # Nothing was relayed and no session started for a refused request.
    assert m.next_deadline() is None


def test_numeric_request_ids_are_echoed():
    m = machine()
    a, _ = join(m, "a")
    _, b_id = join(m, "b")
    effects = m.on_message(a, request("session-accept", b_id, rid=42), 0.0)
    assert effects[0] == ack(a, 42)
    assert m.on_message(a, request("offer", b_id, rid=7.5), 0.0) == (
        error(a, "Missing Offer", 7.5),
    )


def test_over_the_rate_limit_a_request_is_refused_not_relayed():
    m = machine()
    a, _ = join(m, "a")
    _, b_id = join(m, "b")
    assert m.on_rate_limited(a, request("offer", b_id, OFFER, "r9")) == (
        error(a, "Too Many Requests", "r9"),
    )
    assert m.request_of(a) is None  # refused before it was handled


def test_request_of_names_the_request_being_handled():
    m = machine()
    a, _ = join(m, "a")
    _, b_id = join(m, "b")
    assert m.request_of(a) is None
    m.on_message(a, request("offer", b_id, OFFER, "r5"), 0.0)
    assert m.request_of(a) == "r5"
    assert m.request_of(Conn("stranger")) is None


# --- relays on one node ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "data"), [("offer", OFFER), ("answer", ANSWER), ("ice", CANDIDATE)]
)
def test_a_local_relay_is_acked_first_and_carries_the_whole_data(cmd, data):
    m = machine()
    a, a_id = join(m, "a")
    b, b_id = join(m, "b")
    sent = {**data, "extra": [1, 2]}
    effects = m.on_message(a, request(cmd, b_id, sent), 0.0)
    assert len(effects) == 2 and effects[0] == ack(a)
    relay = effects[1]
    assert isinstance(relay, Relay) and relay.conn is b
    assert (relay.target, relay.origin, relay.cmd, relay.request_id, relay.node) == (
        b_id,
        a_id,
        cmd,
        "r1",
        None,
    )
    assert relayed(relay, cmd, a_id)["data"] == sent


def test_session_commands_relay_without_data_but_a_rejects_reason():
    m = machine()
    a, a_id = join(m, "a")
    b, b_id = join(m, "b")
    _, start = m.on_message(a, request("session-start", b_id, {"dropped": True}), 0.0)
    assert set(relayed(start, "session-start", a_id)) == {"id", "cmd", "origin"}
    _, reject = m.on_message(b, request("session-reject", a_id, {"message": "busy", "x": 1}), 0.0)
    assert relayed(reject, "session-reject", b_id)["data"] == {"message": "busy"}
    _, reject = m.on_message(b, request("session-reject", a_id, {"message": 5}), 0.0)
    assert "data" not in relayed(reject, "session-reject", b_id)


def test_legacy_connections_may_send_sdp():
    m = machine()
    a, a_id = join(m, "a", legacy=True)
    b, b_id = join(m, "b")
    _, offer = m.on_message(a, request("offer", b_id, {"sdp": "v=0"}), 0.0)
    assert relayed(offer, "offer", a_id)["data"] == {"sdp": "v=0"}
    assert m.on_message(b, request("answer", a_id, {"sdp": "v=0"}), 0.0) == (
        error(b, "Missing Answer"),
    )
    assert m.on_message(a, request("ice", b_id, {"sdp": "v=0"}), 0.0) == (
        error(a, "Missing ICE Candidate"),
    )


def test_a_local_relay_that_cannot_be_written_answers_peer_offline_after_the_ack():
    m = machine()
    a, _ = join(m, "a")
    _, b_id = join(m, "b")
    effects = m.on_message(a, request("session-start", b_id, rid="s1"), 100.0)
    assert effects[0] == ack(a, "s1") and m.next_deadline() == 100.0 + T
    assert m.on_undelivered(effects[1]) == (error(a, "Peer Offline", "s1"),)
    assert m.next_deadline() is None  # the session never arrived: no timer


# --- relays across nodes --------------------------------------------------------------------------


def test_a_target_not_here_is_looked_up_then_relayed_to_its_node():
    m = machine("node-1")
    a, a_id = join(m, "a")
    (lookup,) = m.on_message(a, request("session-start", NOWHERE, rid="s1"), 100.0)
    assert isinstance(lookup, Lookup) and (lookup.target, lookup.conn) == (NOWHERE, a)
    assert lookup.request is not None and lookup.notice is None
    assert m.next_deadline() is None  # nothing acked yet
    ack_, to_node = m.on_lookup(lookup, "node-2", 100.0)
    assert ack_ == ack(a, "s1") and m.next_deadline() == 100.0 + T
    assert isinstance(to_node, ToNode) and (to_node.node, to_node.kind) == ("node-2", RELAY_KIND)
    remote = proto.decode_remote_relay(to_node.payload)
    assert (remote.to, remote.requester, remote.request_id) == (NOWHERE, a_id, "s1")
    assert remote.message["cmd"] == "session-start" and remote.message["origin"] == a_id


def test_lookups_not_found_here_unavailable_and_payload_checked_after():
    m = machine("node-1")
    a, _ = join(m, "a")
    (lookup,) = m.on_message(a, request("offer", NOWHERE), 0.0)  # no payload: checked later
    assert m.on_lookup(lookup, None, 0.0) == (error(a, "Peer Not Found"),)
    # Claimed by this very node but not connected here (closed just now): not found.
    assert m.on_lookup(lookup, "node-1", 0.0) == (error(a, "Peer Not Found"),)
    assert m.on_lookup(lookup, "node-2", 0.0) == (error(a, "Missing Offer"),)
    assert m.on_lookup_failed(lookup) == (error(a, "Internal Server Error"),)
    # A requester that left meanwhile is answered nothing.
    m.on_close(a)
    assert m.on_lookup(lookup, "node-2", 0.0) == ()


def test_a_relay_from_another_node_reaches_its_peer_or_goes_back_undeliverable():
    m = machine("node-2")
    b, b_id = join(m, "b")
    message = {"id": "m1", "cmd": "offer", "origin": "A" * 21, "data": OFFER}
    payload = proto.encode_remote_relay(proto.RemoteRelay(b_id, message, "A" * 21, "r1"))
    (relay,) = m.on_relay("node-1", payload)
    assert isinstance(relay, Relay) and relay.conn is b and json(relay) == message
    assert (relay.node, relay.origin, relay.request_id) == ("node-1", "A" * 21, "r1")
    # It could not be written after all: the requester's node is told.
    (back,) = m.on_undelivered(relay)
    assert isinstance(back, ToNode) and (back.node, back.kind) == ("node-1", UNDELIVERABLE_KIND)
    assert proto.decode_undeliverable(back.payload) == proto.Undeliverable(
        "A" * 21, "r1", "offer", b_id
    )
    # Closing, or not here at all: undeliverable at once.
    b.closing = True
    assert m.on_relay("node-1", payload) == (back,)
    gone = proto.encode_remote_relay(proto.RemoteRelay(NOWHERE, message, "A" * 21, "r1"))
    (back,) = m.on_relay("node-1", gone)
    assert proto.decode_undeliverable(back.payload).target == NOWHERE


def test_a_server_notice_from_another_node_is_a_plain_send_and_never_reported():
    m = machine("node-2")
    b, b_id = join(m, "b")
    notice = proto.notice(proto.Cmd.SESSION_TIMEOUT, "A" * 21)
    payload = proto.encode_remote_relay(proto.RemoteRelay(b_id, notice))
    assert m.on_relay("node-1", payload) == (Send(b, orjson.dumps(notice)),)
    b.closing = True
    assert m.on_relay("node-1", payload) == ()
    # A requester without a request id cannot be answered either.
    half = proto.encode_remote_relay(proto.RemoteRelay(NOWHERE, notice, "A" * 21, None))
    assert m.on_relay("node-1", half) == ()


def test_peer_offline_when_the_relay_comes_back_or_its_node_cannot_be_reached():
    m = machine("node-1")
    a, a_id = join(m, "a")
    (lookup,) = m.on_message(a, request("session-start", NOWHERE, rid="s1"), 0.0)
    _, to_node = m.on_lookup(lookup, "node-2", 0.0)
    back = proto.encode_undeliverable(proto.Undeliverable(a_id, "s1", "session-start", NOWHERE))
    assert m.on_undeliverable(back) == (error(a, "Peer Offline", "s1"),)
    assert m.next_deadline() is None
    # The same when the send to node-2 failed (the hub reports the ToNode it could not send).
    m.on_lookup(lookup, "node-2", 0.0)
    assert m.next_deadline() == T
    assert m.on_undelivered(to_node) == (error(a, "Peer Offline", "s1"),)
    assert m.next_deadline() is None
    # For a requester that left, or a notice, nobody is told.
    m.on_close(a)
    assert m.on_undeliverable(back) == ()
    notice = ToNode("node-2", RELAY_KIND, proto.encode_remote_relay(proto.RemoteRelay("x", {})))
    assert m.on_undelivered(notice) == ()
    assert m.on_undelivered(ToNode("node-2", UNDELIVERABLE_KIND, back)) == ()


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"to":5,"message":{}}'])
def test_malformed_messages_from_other_nodes_raise(payload):
    m = machine()
    with pytest.raises(MalformedFrame):
        m.on_relay("node-2", payload)
    with pytest.raises(MalformedFrame):
        m.on_undeliverable(payload)


# --- sessions and the timer -----------------------------------------------------------------------


def test_an_unanswered_session_times_out_at_its_deadline_not_a_moment_before():
    m = machine()
    a, a_id = join(m, "a")
    b, b_id = join(m, "b")
    m.on_message(a, request("session-start", b_id), 100.0)
    assert m.next_deadline() == 130.0
    assert m.on_timer(math.nextafter(130.0, 0.0)) == ()
    to_a, to_b = m.on_timer(130.0)
    assert to_a.conn is a and relayed(to_a, "session-timeout", b_id)
    assert to_b.conn is b and relayed(to_b, "session-timeout", a_id)
    assert json(to_a)["id"] != json(to_b)["id"]
    assert m.next_deadline() is None and len(m.sessions) == 0
    assert m.on_timer(1000.0) == ()


@pytest.mark.parametrize("answer", ["session-accept", "session-reject"])
def test_an_answered_session_does_not_time_out(answer):
    m = machine()
    a, a_id = join(m, "a")
    b, b_id = join(m, "b")
    m.on_message(a, request("session-start", b_id), 0.0)
    assert m.on_message(b, request(answer, a_id), 1.0)[0] == ack(b)
    assert m.next_deadline() is None
    assert m.on_timer(T) == ()


def test_a_cancelled_session_does_not_time_out_and_the_target_hears_of_it():
    m = machine()
    a, a_id = join(m, "a")
    b, b_id = join(m, "b")
    m.on_message(a, request("session-start", b_id), 0.0)
    effects = m.on_message(a, request("session-cancel", b_id), 1.0)
    assert effects[0] == ack(a) and effects[1].conn is b
    relayed(effects[1], "session-cancel", a_id)
    assert m.next_deadline() is None


def test_a_repeated_start_restarts_the_timer():
    m = machine()
    a, _ = join(m, "a")
    b, b_id = join(m, "b")
    c, c_id = join(m, "c")
    m.on_message(a, request("session-start", b_id), 0.0)
    m.on_message(a, request("session-start", c_id), 2.0)
    m.on_message(a, request("session-start", b_id), 5.0)  # again: now due at 35
    assert len(m.sessions) == 2 and m.next_deadline() == 32.0
    assert m.on_timer(30.0) == ()
    assert [e.conn for e in m.on_timer(32.0)] == [a, c]
    assert m.next_deadline() == 35.0
    assert [e.conn for e in m.on_timer(35.0)] == [a, b]


def test_sessions_fall_due_in_order_even_if_now_goes_back():
    m = machine()
    a, _ = join(m, "a")
    b, b_id = join(m, "b")
    c, c_id = join(m, "c")
    m.on_message(a, request("session-start", b_id), 10.0)
    m.on_message(a, request("session-start", c_id), 4.0)  # an earlier now counts as 10
    assert m.next_deadline() == 40.0
    assert [e.conn for e in m.on_timer(40.0)] == [a, b, a, c]


def test_session_timeout_zero_keeps_no_timer():
    m = machine(timeout=0)
    a, _ = join(m, "a")
    _, b_id = join(m, "b")
    assert m.on_message(a, request("session-start", b_id), 0.0)[0] == ack(a)
    assert m.next_deadline() is None and len(m.sessions) == 0
    assert m.on_timer(1e9) == ()


def test_an_initiator_that_leaves_cancels_its_pending_sessions():
    m = machine()
    a, a_id = join(m, "a")
    b, b_id = join(m, "b")
    c, c_id = join(m, "c")
    m.on_message(a, request("session-start", c_id), 0.0)
    m.on_message(a, request("session-start", b_id), 0.0)
    m.on_message(a, request("session-start", NOWHERE), 0.0)  # looked up: not started
    m.on_message(b, request("session-start", c_id), 0.0)
    to_b, to_c, release = m.on_close(a)
    assert to_b.conn is b and to_c.conn is c
    relayed(to_b, "session-cancel", a_id)
    relayed(to_c, "session-cancel", a_id)
    assert release == Release(a_id)
    assert len(m.sessions) == 1 and m.next_deadline() == T  # b's own session goes on


def test_a_pending_sessions_target_elsewhere_hears_of_its_end_through_a_lookup():
    m = machine("node-1")
    a, _ = join(m, "a")
    (lookup,) = m.on_message(a, request("session-start", NOWHERE), 0.0)
    m.on_lookup(lookup, "node-2", 0.0)
    to_a, find = m.on_timer(T)
    assert to_a.conn is a and relayed(to_a, "session-timeout", NOWHERE)
    assert isinstance(find, Lookup) and find.target == NOWHERE and find.request is None
    assert find.notice is not None and find.notice["cmd"] == "session-timeout"
    (to_node,) = m.on_lookup(find, "node-2", T)
    remote = proto.decode_remote_relay(to_node.payload)
    assert remote == proto.RemoteRelay(NOWHERE, find.notice)
    # Gone, or the cluster away: the notice is dropped.
    assert m.on_lookup(find, None, T) == ()
    assert m.on_lookup(find, "node-1", T) == ()
    assert m.on_lookup_failed(find) == ()


def test_a_target_closing_or_gone_misses_its_notice_and_the_initiator_still_hears():
    m = machine()
    a, _ = join(m, "a")
    b, b_id = join(m, "b")
    c, c_id = join(m, "c")
    m.on_message(a, request("session-start", b_id), 0.0)
    m.on_message(a, request("session-start", c_id), 0.0)
    b.closing = True
    m.on_close(c)
    to_a_about_b, to_a_about_c, find_c = m.on_timer(T)
    assert relayed(to_a_about_b, "session-timeout", b_id) and to_a_about_b.conn is a
    assert relayed(to_a_about_c, "session-timeout", c_id) and to_a_about_c.conn is a
    assert isinstance(find_c, Lookup) and find_c.target == c_id


def test_clear_forgets_every_session():
    m = machine()
    a, _ = join(m, "a")
    _, b_id = join(m, "b")
    m.on_message(a, request("session-start", b_id), 0.0)
    m.clear()
    assert m.next_deadline() is None and m.on_timer(T) == ()


# --- two nodes ------------------------------------------------------------------------------------


class Cluster:
    """Machines of several nodes, with effects carried out as the hub does: claims in a dict,
    ``ToNode`` handed to the other machine, writes recorded per connection."""

    def __init__(self, *names: str, timeout: float = T) -> None:
        fresh = ids()
        self.claims: dict[str, str] = {}
        self.nodes = {
            name: SignalFireNode(
                name,
                session_timeout=timeout,
                is_closing=lambda conn: conn.closing,
                new_id=lambda: next(fresh),
            )
            for name in names
        }
        self.received: dict[Conn, list[dict[str, Any]]] = {}
        self.now = 0.0

    def join(self, node: str, name: str) -> tuple[Conn, str]:
        conn = Conn(name)
        self.received[conn] = []
        self.run(node, self.nodes[node].on_open(conn, False))
        welcome = self.received[conn].pop(0)
        return conn, welcome["data"]["id"]

    def send(self, node: str, conn: Conn, data: bytes) -> None:
        self.run(node, self.nodes[node].on_message(conn, data, self.now))

    def close(self, node: str, conn: Conn) -> None:
        conn.closing = True
        self.run(node, self.nodes[node].on_close(conn))

    def tick(self, now: float) -> None:
        self.now = now
        for name, m in self.nodes.items():
            self.run(name, m.on_timer(now))

    def take(self, conn: Conn) -> list[dict[str, Any]]:
        got, self.received[conn] = self.received[conn], []
        return got

    def run(self, node: str, effects: Any) -> None:
        m = self.nodes[node]
        queue: deque[Effect] = deque(effects)
        while queue:
            effect = queue.popleft()
            follow: Any = ()
            if isinstance(effect, Send | Relay):
                if effect.conn.closing:
                    follow = m.on_undelivered(effect) if isinstance(effect, Relay) else ()
                else:
                    self.received[effect.conn].append(orjson.loads(effect.payload))
            elif isinstance(effect, Close):
                effect.conn.closing = True
            elif isinstance(effect, Claim):
                ok = self.claims.setdefault(effect.key, node) == node
                follow = m.on_claimed(effect, ok)
            elif isinstance(effect, Release):
                self.claims.pop(effect.key, None)
            elif isinstance(effect, Lookup):
                follow = m.on_lookup(effect, self.claims.get(effect.key), self.now)
            elif isinstance(effect, ToNode):
                other = self.nodes.get(effect.node)
                if other is None:
                    follow = m.on_undelivered(effect)
                elif effect.kind == RELAY_KIND:
                    self.run(effect.node, other.on_relay(node, effect.payload))
                else:
                    self.run(effect.node, other.on_undeliverable(effect.payload))
            queue.extendleft(reversed(list(follow)))


def test_a_session_across_nodes_start_accept_and_relays_in_order():
    cluster = Cluster("node-1", "node-2")
    a, a_id = cluster.join("node-1", "a")
    b, b_id = cluster.join("node-2", "b")
    cluster.send("node-1", a, request("session-start", b_id, rid="s1"))
    assert cluster.take(a) == [{"id": "s1", "ok": True}]
    (start,) = cluster.take(b)
    assert (start["cmd"], start["origin"]) == ("session-start", a_id)
    assert cluster.nodes["node-1"].next_deadline() == T  # the initiator's node runs the timer
    assert cluster.nodes["node-2"].next_deadline() is None
    cluster.now = 1.0
    cluster.send("node-2", b, request("session-accept", a_id, rid="k1"))
    assert cluster.take(b) == [{"id": "k1", "ok": True}]
    assert [m["cmd"] for m in cluster.take(a)] == ["session-accept"]
    assert cluster.nodes["node-1"].next_deadline() is None  # answered, on a's node
    for i in range(5):
        cluster.send("node-1", a, request("ice", b_id, {"candidate": {"n": i}}, rid=f"i{i}"))
    assert [m["data"] for m in cluster.take(b)] == [{"candidate": {"n": i}} for i in range(5)]
    cluster.tick(100.0)
    assert cluster.take(a) == [{"id": f"i{i}", "ok": True} for i in range(5)]
    assert cluster.take(b) == []


def test_timeout_and_reject_across_nodes_reach_both_sides():
    cluster = Cluster("node-1", "node-2")
    a, a_id = cluster.join("node-1", "a")
    b, b_id = cluster.join("node-2", "b")
    cluster.send("node-1", a, request("session-start", b_id))
    cluster.take(a), cluster.take(b)
    cluster.tick(math.nextafter(T, 0.0))
    assert cluster.take(a) == cluster.take(b) == []
    cluster.tick(T)
    (to_a,), (to_b,) = cluster.take(a), cluster.take(b)
    assert (to_a["cmd"], to_a["origin"]) == ("session-timeout", b_id)
    assert (to_b["cmd"], to_b["origin"]) == ("session-timeout", a_id)
    cluster.send("node-1", a, request("session-start", b_id))
    cluster.take(a), cluster.take(b)
    cluster.send("node-2", b, request("session-reject", a_id, {"message": "busy"}))
    (reject,) = cluster.take(a)
    assert reject["data"] == {"message": "busy"} and reject["origin"] == b_id
    assert cluster.nodes["node-1"].next_deadline() is None


def test_an_initiator_leaving_cancels_across_nodes_and_its_id_is_released():
    cluster = Cluster("node-1", "node-2")
    a, a_id = cluster.join("node-1", "a")
    b, b_id = cluster.join("node-2", "b")
    cluster.send("node-1", a, request("session-start", b_id))
    cluster.take(b)
    cluster.close("node-1", a)
    (cancel,) = cluster.take(b)
    assert (cancel["cmd"], cancel["origin"]) == ("session-cancel", a_id)
    assert claim_key(a_id) not in cluster.claims and claim_key(b_id) in cluster.claims
    cluster.send("node-2", b, request("offer", a_id, OFFER, rid="o1"))
    assert cluster.take(b) == [{"id": "o1", "ok": False, "data": {"message": "Peer Not Found"}}]


def test_a_target_that_closed_after_the_lookup_gets_an_ack_then_peer_offline():
    cluster = Cluster("node-1", "node-2")
    a, _ = cluster.join("node-1", "a")
    b, b_id = cluster.join("node-2", "b")
    b.closing = True  # its socket is closing on node-2, its claim still stands
    cluster.send("node-1", a, request("session-start", b_id, rid="s1"))
    assert cluster.take(a) == [
        {"id": "s1", "ok": True},
        {"id": "s1", "ok": False, "data": {"message": "Peer Offline"}},
    ]
    assert cluster.nodes["node-1"].next_deadline() is None


def test_a_claim_of_a_node_that_is_gone_gets_an_ack_then_peer_offline():
    cluster = Cluster("node-1")
    a, _ = cluster.join("node-1", "a")
    cluster.claims[claim_key(NOWHERE)] = "node-killed"
    cluster.send("node-1", a, request("session-start", NOWHERE, rid="s1"))
    assert cluster.take(a) == [
        {"id": "s1", "ok": True},
        {"id": "s1", "ok": False, "data": {"message": "Peer Offline"}},
    ]
    assert cluster.nodes["node-1"].next_deadline() is None


def test_ids_taken_on_another_node_are_replaced():
    cluster = Cluster("node-1", "node-2")
    cluster.claims[claim_key("A" * 21)] = "node-2"
    _, a_id = cluster.join("node-1", "a")
    assert a_id == "B" * 21 and cluster.claims[claim_key(a_id)] == "node-1"


# --- the table of pending sessions ----------------------------------------------------------------


def test_pending_sessions_rules():
    table = PendingSessions(10.0)
    table.start("a", "b", 0.0)
    table.start("a", "c", 1.0)
    table.start("x", "b", 2.0)
    table.start("a", "b", 3.0)  # restart: due at 13, after the others
    assert len(table) == 3 and ("a", "b") in table and ("b", "a") not in table
    assert table.next_deadline() == 11.0
    assert table.expire(10.999) == []
    assert table.expire(12.0) == [("a", "c"), ("x", "b")]
    assert table.next_deadline() == 13.0
    assert table.settle("a", "b") is True and table.settle("a", "b") is False
    assert table.next_deadline() is None and table.expire(100.0) == []
    table.start("a", "c", 100.0)
    table.start("a", "b", 100.0)
    assert table.drop_initiator("a") == ["b", "c"] and table.drop_initiator("a") == []
    table.start("x", "y", 100.0)
    table.clear()
    assert len(table) == 0 and table.next_deadline() is None


def test_pending_sessions_with_no_timeout_keep_nothing():
    table = PendingSessions(0)
    table.start("a", "b", 0.0)
    assert len(table) == 0 and table.next_deadline() is None and not table.settle("a", "b")
