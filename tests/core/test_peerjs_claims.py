"""What PeerJS's machine decides of the cluster (core/peerjs.py): the claim of an id (``claim``:
takeover, probe of the holder's node, the rounds it tries), each operation answered here as the
hub would; what a failed look up or send means; and the other decisions the hub used to make
(the owner token, a probe's answer, an eviction, ids, peers, CORS)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import orjson
import pytest

from polysignal.backends.base import Claim as Holding
from polysignal.core.effects import Close, Send, ToNode
from polysignal.core.errors import BackendUnavailable, MalformedFrame
from polysignal.core.peerjs import (
    CLAIM_ATTEMPTS,
    EVICT_KIND,
    NEW_ID_ATTEMPTS,
    PEERS_LIMIT,
    PROBE_TIMEOUT,
    PROBED_KIND,
    RELAY_KIND,
    Claim,
    ClaimOp,
    Fault,
    Lookup,
    Notify,
    PeerJsNode,
    ProbeOp,
    Release,
    TakeOp,
    allowed_origin,
    mount,
    owner_digest,
)
from polysignal.protocols import peerjs as proto
from polysignal.protocols.peerjs import MessageType

END = object()


class Conn:
    """A connection handle as the hub would pass one: it may be closing."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closing = False

    def __repr__(self) -> str:
        return f"<Conn {self.name}>"


def machine(**options: Any) -> PeerJsNode:
    return PeerJsNode("node-1", is_closing=lambda conn: conn.closing, **options)


def query(peer_id: str, token: str = "t") -> str:
    return f"key=peerjs&id={peer_id}&token={token}"


def opened(node: PeerJsNode, peer_id: str, token: str = "t", now: float = 0.0) -> Claim:
    """A client that opened: its claim, not answered yet."""
    (claim,) = node.on_open(Conn(peer_id), query(peer_id, token), now)
    assert isinstance(claim, Claim)
    return claim


def join(node: PeerJsNode, peer_id: str, token: str = "t", now: float = 0.0) -> Conn:
    """A client that opened and whose claim succeeded."""
    claim = opened(node, peer_id, token, now)
    assert node.on_claimed(claim, True) == [Send(claim.conn, proto.OPEN_FRAME)]
    return claim.conn  # type: ignore[return-value]


def run(work: Generator[Any, Any, Any], *answers: Any) -> tuple[list[Any], Any]:
    """Carry ``work`` out as the hub does, answering its operations with ``answers`` in order
    (an exception is thrown in): the operations it asked, and what it returned."""
    ops: list[Any] = []
    pending = iter(answers)
    answer: Any = None
    while True:
        try:
            op = work.throw(answer) if isinstance(answer, BaseException) else work.send(answer)
        except StopIteration as stop:
            assert next(pending, END) is END, "an answer was left over"
            return ops, stop.value
        ops.append(op)
        answer = next(pending)


def opens(claim: Claim) -> list[Any]:
    return [Send(claim.conn, proto.OPEN_FRAME)]


def taken(claim: Claim) -> tuple[Any, ...]:
    return (Send(claim.conn, proto.ID_TAKEN_FRAME), Close(claim.conn, 1000))


def owner(claim: Claim, node: str = "node-1") -> str:
    return f"{claim.token}:{node}"


# --- the claim of an id ---------------------------------------------------------------------------


def test_the_limits_of_a_claim():
    assert CLAIM_ATTEMPTS == 3
    assert PROBE_TIMEOUT == 2.0


def test_a_free_id_is_claimed_at_once():
    node = machine()
    claim = opened(node, "a")
    ops, effects = run(node.claim(claim, 0.0), True)
    assert ops == [ClaimOp(claim, owner(claim))]
    assert owner(claim) == node.lease_owner(claim.token) == f"{proto.token_digest('a', 't')}:node-1"
    assert effects == opens(claim)
    assert node.ids() == ["a"]


def test_a_holder_that_goes_away_each_round_is_tried_three_times():
    node = machine()
    claim = opened(node, "a")
    ops, effects = run(node.claim(claim, 0.0), False, None, False, None, False, None)
    assert ops == [ClaimOp(claim, owner(claim)), Lookup("a")] * CLAIM_ATTEMPTS
    assert effects == taken(claim)
    assert "a" not in node


def test_the_last_round_may_still_claim():
    node = machine()
    claim = opened(node, "a")
    ops, effects = run(node.claim(claim, 0.0), False, None, False, None, True)
    assert ops == [ClaimOp(claim, owner(claim)), Lookup("a")] * 2 + [ClaimOp(claim, owner(claim))]
    assert effects == opens(claim)


def test_a_cluster_that_cannot_be_asked_refuses_the_id_and_is_reported():
    node = machine()
    claim = opened(node, "a")
    away = BackendUnavailable("redis is away")
    ops, effects = run(node.claim(claim, 0.0), False, away)
    assert ops == [ClaimOp(claim, owner(claim)), Lookup("a")]
    assert effects == (Fault("lookup", "cannot look up a", away), *taken(claim))


def test_a_bug_in_the_look_up_is_not_swallowed():
    node = machine()
    claim = opened(node, "a")
    with pytest.raises(RuntimeError, match="bug"):
        run(node.claim(claim, 0.0), False, RuntimeError("bug"))


def test_the_same_client_on_another_node_is_taken_over_at_once():
    node = machine()
    claim = opened(node, "a")
    holder = Holding("node-2", f"{claim.token}:node-2")
    ops, effects = run(node.claim(claim, 0.0), False, holder, None)
    assert ops == [
        ClaimOp(claim, owner(claim)),
        Lookup("a"),
        TakeOp(claim, owner(claim), "node-2"),
    ]
    assert effects == opens(claim)


def test_a_holder_here_with_another_token_blocks_the_id_while_it_is_live():
    node = machine(stale_after=10.0)
    join(node, "a", "old", now=0.0)
    old = proto.token_digest("a", "old")
    # A claim with another token, made while the old holder still counts as live.
    claim = Claim(Conn("newer"), "a", proto.token_digest("a", "new"))
    holder = Holding("node-1", f"{old}:node-1")
    ops, effects = run(node.claim(claim, 9.999), False, holder)
    assert ops == [ClaimOp(claim, owner(claim)), Lookup("a")]
    assert effects == ()  # the claim was for nobody connected here
    # Ten seconds after its last frame, it is stale: taken over.
    ops, effects = run(node.claim(claim, 10.0), False, holder, None)
    assert ops[-1] == TakeOp(claim, owner(claim), "node-1")
    assert effects == (Release("a", claim.token),)  # made for nobody: given back


def test_a_holder_on_another_node_is_probed():
    node = machine()
    claim = opened(node, "a")
    holder = Holding("node-2", "other:node-2")
    probe = proto.encode_holder(proto.Holder("a", "other", 1))
    ops, effects = run(node.claim(claim, 0.0), False, holder, True)
    assert ops == [
        ClaimOp(claim, owner(claim)),
        Lookup("a"),
        ProbeOp("node-2", 1, probe, 2.0),
    ]
    assert effects == taken(claim)
    # Each probe has its own number.
    claim = opened(node, "b")
    ops, _ = run(node.claim(claim, 0.0), False, Holding("node-2", "x:node-2"), True)
    assert ops[-1] == ProbeOp("node-2", 2, proto.encode_holder(proto.Holder("b", "x", 2)), 2.0)


@pytest.mark.parametrize(
    ("answer", "taken_over"),
    [
        (True, False),  # live: it keeps its id
        (False, True),  # stale
        (None, True),  # its node is gone
        (TimeoutError(), False),  # no answer in time: a slow node keeps its clients
        (BackendUnavailable("away"), False),  # cannot tell
    ],
)
def test_what_a_probes_answer_means(answer, taken_over):
    node = machine()
    claim = opened(node, "a")
    holder = Holding("node-2", "other:node-2")
    answers = [False, holder, answer] + ([None] if taken_over else [])
    ops, effects = run(node.claim(claim, 0.0), *answers)
    if taken_over:
        assert ops[-1] == TakeOp(claim, owner(claim), "node-2")
        assert effects == opens(claim)
    else:
        assert len(ops) == 3 and isinstance(ops[-1], ProbeOp)
        assert effects == taken(claim)


def test_a_bug_in_the_probe_is_not_swallowed():
    node = machine()
    claim = opened(node, "a")
    with pytest.raises(RuntimeError, match="bug"):
        run(node.claim(claim, 0.0), False, Holding("node-2", "o:node-2"), RuntimeError("bug"))


def test_a_claim_whose_client_left_meanwhile_is_given_back():
    node = machine()
    claim = opened(node, "a")
    node.on_close(claim.conn)
    ops, effects = run(node.claim(claim, 0.0), True)
    assert ops == [ClaimOp(claim, owner(claim))]
    assert effects == (Release("a", claim.token),)


# --- a failed look up, a frame no node received -----------------------------------------------


def offer(node: PeerJsNode, src: Conn, dst: str) -> Lookup:
    (lookup,) = node.on_message(src, orjson.dumps({"type": "OFFER", "dst": dst, "payload": 1}), 0)
    assert isinstance(lookup, Lookup)
    return lookup


@pytest.mark.parametrize("error", [BackendUnavailable("away"), RuntimeError("bug")])
def test_a_look_up_that_fails_is_reported_and_the_message_waits(error):
    node = machine()
    a = join(node, "a")
    effects = node.on_lookup_error(offer(node, a, "b"), error, 0.0)
    assert effects == (Fault("lookup", "cannot look up b", error),)
    assert node.queued("b") == 1


def test_a_queue_check_that_fails_is_only_reported():
    node = machine()
    error = BackendUnavailable("away")
    assert node.on_lookup_error(Lookup("b"), error, 0.0) == (
        Fault("lookup", "cannot look up b", error),
    )


def relay_to(node: PeerJsNode, a: Conn) -> ToNode:
    lookup = offer(node, a, "b")
    assert lookup.frame is not None
    return ToNode("node-2", RELAY_KIND, lookup.frame)


@pytest.mark.parametrize("error", [BackendUnavailable("away"), RuntimeError("bug")])
def test_a_frame_that_could_not_be_sent_is_reported_and_expires(error):
    node = machine()
    a = join(node, "a")
    effects = node.on_send_error(relay_to(node, a), error)
    assert effects == (
        Fault("send", "cannot send peerjs to node node-2", error),
        Send(a, proto.encode_notice(MessageType.EXPIRE, "b", "a")),
    )


def test_a_notice_that_could_not_be_sent_is_only_reported():
    node = machine()
    error = BackendUnavailable("away")
    probe = ToNode("node-2", PROBED_KIND, b"{}")
    assert node.on_send_error(probe, error) == (
        Fault("send", "cannot send peerjs-probed to node node-2", error),
    )


# --- probes and evictions from other nodes ------------------------------------------------------


def test_a_probe_is_answered_whether_the_holder_is_live():
    node = machine(stale_after=10.0)
    join(node, "a", "t", now=0.0)
    digest = proto.token_digest("a", "t")
    probe = proto.encode_holder(proto.Holder("a", digest, 7))
    what = "cannot answer a probe of node node-2"
    assert node.on_probe("node-2", probe, 9.999) == (
        Notify("node-2", PROBED_KIND, proto.encode_probe_answer(7, True), what),
    )
    assert node.on_probe("node-2", probe, 10.0) == (
        Notify("node-2", PROBED_KIND, proto.encode_probe_answer(7, False), what),
    )
    other = proto.encode_holder(proto.Holder("a", "another digest", 8))
    assert node.on_probe("node-3", other, 0.0) == (
        Notify(
            "node-3",
            PROBED_KIND,
            proto.encode_probe_answer(8, False),
            "cannot answer a probe of node node-3",
        ),
    )
    with pytest.raises(MalformedFrame):
        node.on_probe("node-2", b"[]", 0.0)


def test_a_holder_taken_over_closes_here_or_is_told_to_its_node():
    node = machine()
    conn = join(node, "a", "t")
    digest = proto.token_digest("a", "t")
    assert node.on_taken_over("a", "node-2", f"{digest}:node-2") == (
        Notify(
            "node-2",
            EVICT_KIND,
            proto.encode_holder(proto.Holder("a", digest)),
            "cannot tell node node-2 of its lost id a",
        ),
    )
    assert "a" in node  # the holder was elsewhere
    assert node.on_taken_over("a", "node-1", f"{digest}:node-1") == (
        Close(conn, 1000, "id taken over"),
        Release("a", digest),
    )
    assert "a" not in node
    assert node.on_taken_over("a", "node-1", f"{digest}:node-1") == ()


def test_the_digest_of_an_owner_token():
    assert owner_digest("abc:node-1") == "abc"
    assert owner_digest("abc") == "abc"
    assert owner_digest("abc:node:1") == "abc"
    assert machine().lease_owner("abc") == "abc:node-1"


# --- ids, peers and CORS ----------------------------------------------------------------------


def drawn(*ids: str) -> tuple[PeerJsNode, list[str]]:
    """A machine whose random ids are ``ids`` in order, and the list of those drawn."""
    draws: list[str] = []
    source = iter(ids)

    def new_id() -> str:
        draws.append(next(source))
        return draws[-1]

    return machine(new_id=new_id), draws


def test_a_new_id_is_one_no_client_here_holds():
    node, draws = drawn("a", "a", "b")
    join(node, "a")
    assert node.new_id() == "b"
    assert draws == ["a", "a", "b"]


def test_new_ids_are_drawn_eight_times_then_taken_as_they_come():
    assert NEW_ID_ATTEMPTS == 8
    node, draws = drawn(*["a"] * 7, "free")
    join(node, "a")
    assert node.new_id() == "free"
    assert len(draws) == 8
    node, draws = drawn(*["a"] * 9)
    join(node, "a")
    assert node.new_id() == "a"
    assert len(draws) == 9


def test_peers_are_this_nodes_open_ids_then_the_clusters_each_once():
    node = machine()
    join(node, "a")
    join(node, "b")
    opened(node, "pending")  # not open yet: not listed from here
    assert node.peers(["peerjs:x", "peerjs:a", "peerjs:y"]) == ["a", "b", "x", "y"]
    assert node.peers([]) == ["a", "b"]


def test_peers_at_their_exact_limit():
    assert PEERS_LIMIT == 100_000
    node = machine()
    join(node, "a")
    claimed = [f"peerjs:{n}" for n in range(PEERS_LIMIT)]
    listed = node.peers(claimed)
    assert len(listed) == PEERS_LIMIT
    assert listed[:2] == ["a", "0"] and listed[-1] == str(PEERS_LIMIT - 2)
    assert len(node.peers(claimed[:-1])) == PEERS_LIMIT


def test_the_mount_path_ends_in_one_slash():
    assert mount("/") == "/"
    assert mount("") == "/"
    assert mount("/p") == "/p/"
    assert mount("/p/") == "/p/"
    assert mount("/p//") == "/p/"


def test_the_allowed_origin_as_the_cors_package():
    assert allowed_origin("https://a.example", ()) == "https://a.example"
    assert allowed_origin("https://a.example", ("https://a.example",)) == "https://a.example"
    assert allowed_origin("https://b.example", ("https://a.example",)) is None
    assert allowed_origin(None, ()) is None
    assert allowed_origin("", ()) is None
