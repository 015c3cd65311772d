"""The relay's rules without I/O (docs/protocols/relay.md): introductions, hold buffers, and
the node's machine driven event by event, its rendezvous answered by a scripted cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import orjson
import pytest

from polysignal.core.effects import Close, Presence, Publish, Send, ToNode
from polysignal.core.errors import BackendUnavailable, CloseCode, LimitExceeded
from polysignal.core.relay import (
    FRAME_COST,
    LINGER_PER_ADDRESS,
    PEER_CLOSED,
    REPLACED_PEER,
    REPLACED_PIPE,
    ApplyOp,
    ClaimOp,
    Directory,
    DocumentLimitExceeded,
    DropLease,
    EncodingMismatch,
    EndState,
    HoldBuffer,
    Introduction,
    LookupOp,
    MatchOp,
    PipeToken,
    RelayNode,
    ReleaseOp,
    Rendezvous,
    SendFrames,
    SettleOp,
    StreamClose,
    StreamOpen,
    StreamSend,
    TakeLease,
    peer_claim_key,
    pipe_claim_key,
)
from polysignal.protocols.relay import (
    NAMESPACE,
    Announce,
    Direct,
    Encoding,
    EndRef,
    Generation,
    Introduce,
    decode,
    encode_announce,
    encode_end,
    encode_introduce,
    encode_introduction,
)


def test_join_introduces_both_sides_with_the_full_common_list_in_the_joiners_order():
    d = Directory()
    assert d.join("bob", ["k2", "k1", "k3"]) == (["k2", "k1", "k3"], [], [])
    added, removed, intros = d.join("alice", ["k1", "k2", "other"])
    assert added == ["k1", "k2", "other"] and removed == []
    assert intros == [
        Introduction("alice", "bob", ("k1", "k2")),
        Introduction("bob", "alice", ("k1", "k2")),
    ]


def test_a_join_that_adds_nothing_introduces_nobody():
    """Only what a Join adds introduces (the originals re-introduced on every Join)."""
    d = Directory()
    d.join("a", ["k"])
    d.join("b", ["k"])
    assert d.join("a", ["k"]) == ([], [], [])
    # An unrelated document does not re-introduce the peers it already shares one with...
    assert d.join("a", ["z"]) == (["z"], [], [])
    # ...and one they share introduces them with everything they share, in the joiner's order.
    d.join("b", ["z"])
    assert d.join("a", ["k", "z", "w"]) == (["w"], [], [])
    d.join("b", ["w"])
    assert d.join("a", ["w"]) == ([], [], [])
    d.leave("a", ["z"])
    assert d.join("a", ["z"])[2] == [
        Introduction("a", "b", ("k", "w", "z")),
        Introduction("b", "a", ("k", "w", "z")),
    ]


def test_every_sharing_peer_is_introduced_once():
    d = Directory()
    d.join("b", ["k1", "k2"])
    d.join("c", ["k2"])
    _, _, intros = d.join("a", ["k1", "k2"])
    assert [(i.to, i.peer, i.documents) for i in intros] == [
        ("a", "b", ("k1", "k2")),
        ("b", "a", ("k1", "k2")),
        ("a", "c", ("k2",)),
        ("c", "a", ("k2",)),
    ]


def test_join_applies_leave_after_join():
    d = Directory()
    d.join("a", ["k1", "k2"])
    assert d.join("a", ["k3"], leave=["k1", "k3"]) == ([], ["k1"], [])
    assert d.documents_of("a") == ("k2",)


def test_leave_sends_nothing_and_stops_introductions():
    d = Directory()
    d.join("a", ["k"])
    assert d.leave("a", ["k", "never-joined"]) == ["k"]
    assert "a" not in d and d.count("k") == 0
    assert d.join("b", ["k"])[2] == []
    assert d.leave("nobody", ["k"]) == []


def test_remove_forgets_the_peer_everywhere():
    d = Directory()
    d.join("a", ["k1", "k2"])
    d.join("b", ["k1"])
    assert sorted(d.remove("a")) == ["k1", "k2"]
    assert d.count("k1") == 1 and d.count("k2") == 0
    assert d.join("c", ["k1", "k2"])[2] == [
        Introduction("c", "b", ("k1",)),
        Introduction("b", "c", ("k1",)),
    ]
    assert d.remove("a") == []


def test_document_limit_refuses_without_changing_anything():
    d = Directory(max_documents=2)
    d.join("a", ["k1", "k2"])
    with pytest.raises(DocumentLimitExceeded, match="at most 2 document ids"):
        d.join("a", ["k3"])
    assert d.documents_of("a") == ("k1", "k2")
    assert d.join("a", ["k3"], leave=["k1"])[0] == ["k3"]  # leaving makes room in the same frame


def test_remote_join_introduces_each_local_peer_once_through_its_first_joined_document():
    d = Directory()
    d.join("b", ["k2", "k1"])
    d.join("c", ["k2"])
    joined = ("k1", "k2")
    documents = ("k0", "k1", "k2")
    # The announcement arrives once per joined document this node has peers for.
    via_k1 = d.remote_introductions("alice", joined, documents, "k1")
    via_k2 = d.remote_introductions("alice", joined, documents, "k2")
    assert via_k1 == [Introduction("b", "alice", ("k1", "k2"))]
    assert via_k2 == [Introduction("c", "alice", ("k2",))]
    assert d.remote_introductions("b", joined, documents, "k2") == [
        Introduction("c", "b", ("k2",))
    ]  # never to itself
    assert d.remote_introductions("alice", joined, documents, "unheld") == []


def test_common_keeps_the_given_order():
    d = Directory()
    d.join("a", ["x", "y", "z"])
    assert d.common("a", ["z", "q", "x"]) == ("z", "x")
    assert d.common("nobody", ["x"]) == ()


def test_hold_buffer_counts_each_frame_as_its_payload_plus_frame_cost():
    limit = 10 + 2 * FRAME_COST
    buf = HoldBuffer(limit=limit)
    assert buf.add(1, b"12345") == 5 + FRAME_COST
    assert buf.add(2, b"67890") == 5 + FRAME_COST  # exactly the limit
    with pytest.raises(LimitExceeded) as full:
        buf.add(1, b"")  # even an empty frame counts
    assert full.value.message == (
        f"relay buffer full: more than {limit} bytes held before the peer connected"
    )
    assert buf.take() == ([(1, b"12345"), (2, b"67890")], limit)
    assert buf.size == 0 and buf.frames == []
    unbounded = HoldBuffer(limit=0)
    unbounded.add(1, b"x" * 1000)
    assert unbounded.size == 1000 + FRAME_COST


def test_pipe_claim_key_is_shared_by_both_directions_and_unambiguous():
    assert pipe_claim_key("a", "b", "k") == pipe_claim_key("b", "a", "k")
    assert pipe_claim_key("a", "b", "k") != pipe_claim_key("a", "b", "k2")
    assert pipe_claim_key("a:b", "c", "k") != pipe_claim_key("a", "b:c", "k")
    assert peer_claim_key("a") != peer_claim_key("b")


def test_pipe_token_round_trip_and_garbage():
    token = PipeToken("alice", "end-1")
    assert PipeToken.decode(token.encode()) == token
    assert PipeToken.decode("not json") is None
    assert PipeToken.decode('["only one"]') is None
    assert PipeToken.decode("[1, 2]") is None


# --- the machine: events in, effects out ---------------------------------------------------------

JSON, MSGPACK = Encoding.JSON, Encoding.MSGPACK


@dataclass(frozen=True)
class Holder:
    node_id: str
    token: str


class Cluster:
    """Answers a rendezvous' questions as the cluster would: one claim per key."""

    def __init__(self, node: str = "n1", match: bool = True) -> None:
        self.node = node
        self.claims: dict[str, Holder] = {}
        self.match = match
        self.ops: list[Any] = []
        self.down = False

    def answer(self, op: Any) -> Any:
        self.ops.append(op)
        if self.down and isinstance(op, (ClaimOp, LookupOp, ReleaseOp, MatchOp)):
            raise BackendUnavailable("redis connection lost")
        match op:
            case ClaimOp(key, token):
                if key in self.claims:
                    return False
                self.claims[key] = Holder(self.node, token)
                return True
            case LookupOp(key):
                return self.claims.get(key)
            case ReleaseOp(key, token):
                if key in self.claims and self.claims[key].token == token:
                    del self.claims[key]
                    return True
                return False
            case MatchOp():
                return self.match
        return None  # SettleOp, ApplyOp

    def run(self, rendezvous: Rendezvous) -> list[Any]:
        """Drive ``rendezvous`` to its end; its effects."""
        return self.finish(rendezvous, None)

    def finish(self, rendezvous: Rendezvous, op: Any) -> list[Any]:
        """Drive ``rendezvous`` on from its request ``op`` (None: from its start) to its end."""
        try:
            op = next(rendezvous) if op is None else op
            while True:
                try:
                    answer = self.answer(op)
                except BackendUnavailable as exc:
                    op = rendezvous.throw(exc)
                else:
                    op = rendezvous.send(answer)
        except StopIteration as stop:
            return list(stop.value)


def joined(node: RelayNode, conn: str, peer: str, *docs: str, encoding: Encoding = JSON) -> Any:
    sock, _ = node.peer_opened(conn, peer, f"t-{conn}")
    frame: str | bytes
    if encoding is MSGPACK:
        frame = msgpack.packb({"type": "Join", "documentIds": list(docs)})
    else:
        frame = orjson.dumps({"type": "Join", "documentIds": list(docs)}).decode()
    return sock, node.peer_message(sock, decode(frame, encoding), encoding)


def test_a_peer_socket_takes_its_id_lease():
    node = RelayNode("n1")
    sock, effects = node.peer_opened("c1", "alice", "tok")
    assert effects == [TakeLease(peer_claim_key("alice"), "tok", "alice")]
    assert (sock.conn, sock.peer, sock.token) == ("c1", "alice", "tok")


def test_join_introduces_in_each_recipients_generation_and_announces():
    node = RelayNode("n1")
    _, first = joined(node, "c1", "v2", "doc")
    announce = encode_announce(Announce("n1", "v2", ("doc",), ("doc",)))
    assert first == [Presence("doc", 1, NAMESPACE), Publish("doc", announce, NAMESPACE)]
    _, second = joined(node, "c2", "v4", "doc", encoding=MSGPACK)
    assert second == [
        Presence("doc", 2, NAMESPACE),
        Send("c2", encode_introduction(Generation.V4, "v2", ("doc",)), binary=True),
        Send("c1", encode_introduction(Generation.V2, "v4", ("doc",)), binary=False),
        Publish("doc", encode_announce(Announce("n1", "v4", ("doc",), ("doc",))), NAMESPACE),
    ]


def test_only_what_a_join_adds_is_announced_and_a_join_adding_nothing_does_nothing():
    node = RelayNode("n1")
    sock, _ = joined(node, "c1", "a", "k1")
    again = decode('{"type":"Join","documentIds":["k1"]}', JSON)
    assert node.peer_message(sock, again, JSON) == []
    more = decode('{"type":"Join","documentIds":["k1","k2","k3"]}', JSON)
    announce = encode_announce(Announce("n1", "a", ("k2", "k3"), ("k1", "k2", "k3")))
    assert node.peer_message(sock, more, JSON) == [
        Presence("k2", 1, NAMESPACE),
        Presence("k3", 1, NAMESPACE),
        Publish("k2", announce, NAMESPACE),
        Publish("k3", announce, NAMESPACE),
    ]


def test_the_encoding_is_checked_before_a_frame_is_decoded():
    node = RelayNode("n1")
    sock, _ = node.peer_opened("c1", "a", "t")
    node.expect_encoding(sock, MSGPACK)  # nothing decoded yet: either is fine
    node.expect_encoding(sock, JSON)
    node.peer_message(sock, decode('{"type":"Heartbeat"}', JSON), JSON)
    node.expect_encoding(sock, JSON)
    with pytest.raises(EncodingMismatch, match="this connection speaks JSON text frames"):
        node.expect_encoding(sock, MSGPACK)


def test_a_frame_in_the_other_encoding_is_refused():
    node = RelayNode("n1")
    sock, _ = joined(node, "c1", "a", "doc")
    frame = decode(msgpack.packb({"type": "Join", "documentIds": ["x"]}), MSGPACK)
    with pytest.raises(EncodingMismatch) as exc:
        node.peer_message(sock, frame, MSGPACK)
    assert exc.value.message == "this connection speaks JSON text frames"
    assert exc.value.close_code == CloseCode.UNSUPPORTED_DATA
    binary, _ = joined(node, "c2", "b", "doc", encoding=MSGPACK)
    with pytest.raises(EncodingMismatch) as exc:
        node.peer_message(binary, decode('{"type":"Join","documentIds":[]}', JSON), JSON)
    assert exc.value.message == "this connection speaks msgpack binary frames"


def test_leave_and_heartbeat():
    node = RelayNode("n1")
    sock, _ = joined(node, "c1", "a", "k1", "k2")
    leave = decode('{"type":"Leave","documentIds":["k1"]}', JSON)
    assert node.peer_message(sock, leave, JSON) == [Presence("k1", 0, NAMESPACE)]
    assert node.peer_message(sock, decode('{"type":"Heartbeat"}', JSON), JSON) == []
    assert node.directory.documents_of("a") == ("k2",)


def test_a_newer_socket_replaces_the_older_here():
    node = RelayNode("n1")
    old, _ = joined(node, "c1", "a", "doc")
    new, effects = node.peer_opened("c2", "a", "t-new")
    assert effects == [
        Presence("doc", 0, NAMESPACE),
        Close("c1", 1000, REPLACED_PEER),
        TakeLease(peer_claim_key("a"), "t-new", "a"),
    ]
    # The old socket's frames and close no longer touch the peer.
    assert node.peer_message(old, decode('{"type":"Join","documentIds":["x"]}', JSON), JSON) == []
    assert node.peer_closed(old) == [DropLease(peer_claim_key("a"), "t-c1")]
    assert node.peers["a"] is new


def test_closing_the_current_socket_drops_its_documents_and_lease():
    node = RelayNode("n1")
    sock, _ = joined(node, "c1", "a", "k1", "k2")
    assert node.peer_closed(sock) == [
        Presence("k1", 0, NAMESPACE),
        Presence("k2", 0, NAMESPACE),
        DropLease(peer_claim_key("a"), "t-c1"),
    ]
    assert "a" not in node.peers and "a" not in node.directory


def test_eviction_closes_only_the_socket_holding_that_token():
    node = RelayNode("n1")
    joined(node, "c1", "a", "doc")
    assert node.evicted("a", "another token") == []
    assert node.evicted("nobody", "t-c1") == []
    assert node.evicted("a", "t-c1") == [
        Presence("doc", 0, NAMESPACE),
        Close("c1", 1000, REPLACED_PEER),
    ]
    assert node.evicted("a", "t-c1") == []


def test_an_announce_from_another_node_introduces_both_ways():
    node = RelayNode("n1")
    joined(node, "c1", "local", "k1", "k2", encoding=MSGPACK)
    msg = Announce("n2", "remote", ("k2",), ("k2", "k1", "k9"))
    # The common documents in the joiner's order, as for a local Join.
    assert node.announced("k2", msg) == [
        Send("c1", encode_introduction(Generation.V4, "remote", ("k2", "k1")), binary=True),
        ToNode(
            "n2",
            Direct.INTRODUCE,
            encode_introduce(Introduce("remote", "local", ("k2", "k1"))),
        ),
    ]
    assert node.announced("k2", Announce("n1", "remote", ("k2",), ("k2",))) == []


def test_an_introduction_from_another_node_uses_the_common_documents():
    node = RelayNode("n1")
    joined(node, "c1", "local", "k1", "k2")
    assert node.introduced(Introduce("local", "remote", ("k2", "k3"))) == [
        Send("c1", encode_introduction(Generation.V2, "remote", ("k2",)))
    ]
    assert node.introduced(Introduce("local", "remote", ("k3",))) == []
    assert node.introduced(Introduce("gone", "remote", ("k1",))) == []


def test_the_first_of_a_pair_holds_and_the_second_is_piped_with_the_held_frames():
    node, cluster = RelayNode("n1", wait_timeout=5), Cluster()
    first = node.end_opened("c1", "e1", "a", "b", "k")
    assert cluster.run(node.rendezvous(first, now=100.0)) == []
    assert first.state is EndState.HOLDING and first.deadline == 105.0
    assert cluster.claims[first.claim_key] == Holder("n1", first.token)
    assert node.end_frame(first, 1, b"one") == []
    assert node.end_frame(first, 2, b"\x02") == []
    second = node.end_opened("c2", "e2", "b", "a", "k")
    effects = cluster.run(node.rendezvous(second, now=101.0))
    # Returned with nothing to wait for first, so no frame of the now piped `first` can
    # overtake them; the frames go out at once (SendFrames), whatever the reader's pace.
    assert effects == [
        SendFrames("c2", ((1, b"one"), (2, b"\x02"))),
        DropLease(first.claim_key, first.token),
    ]
    assert not any(isinstance(op, ReleaseOp) for op in cluster.ops)  # DropLease releases it
    assert first.partner is second and second.partner is first
    assert node.next_deadline() is None
    assert node.end_frame(second, 1, b"back") == [Send("c1", b"back", binary=False)]
    assert node.end_frame(first, 2, b"fwd") == [Send("c2", b"fwd", binary=True)]
    assert node.end_closed(first, 0.0) == [Close("c2", 1000, PEER_CLOSED)]
    assert node.end_closed(second, 0.0) == []


def test_a_duplicate_request_here_replaces_the_held_one():
    node, cluster = RelayNode("n1"), Cluster()
    old = node.end_opened("c1", "e1", "a", "b", "k")
    cluster.run(node.rendezvous(old, 0.0))
    new = node.end_opened("c2", "e2", "a", "b", "k")
    assert cluster.run(node.rendezvous(new, 0.0)) == []
    evict = (DropLease(old.claim_key, old.token, forget=True), Close("c1", 1000, REPLACED_PIPE))
    assert ApplyOp(evict) in cluster.ops and SettleOp("e1") in cluster.ops
    assert old.state is EndState.CLOSED and new.state is EndState.HOLDING
    assert cluster.claims[new.claim_key].token == new.token


def test_a_duplicate_request_elsewhere_evicts_through_the_holders_node():
    node, cluster = RelayNode("n1"), Cluster()
    token = PipeToken("a", "far").encode()
    cluster.claims[pipe_claim_key("a", "b", "k")] = Holder("n2", token)
    end = node.end_opened("c1", "e1", "a", "b", "k")
    assert cluster.run(node.rendezvous(end, 0.0)) == []
    ref = encode_end(EndRef("far", reason=REPLACED_PIPE))
    assert ApplyOp((ToNode("n2", Direct.EVICT_PIPE, ref),)) in cluster.ops
    assert end.state is EndState.HOLDING


def test_a_reciprocal_held_elsewhere_is_matched_over_a_stream():
    node, cluster = RelayNode("n1"), Cluster()
    cluster.claims[pipe_claim_key("a", "b", "k")] = Holder("n2", PipeToken("b", "far").encode())
    end = node.end_opened("c1", "e1", "a", "b", "k")
    assert cluster.run(node.rendezvous(end, 0.0)) == []
    assert MatchOp("n2", "far", "e1") in cluster.ops
    assert end.state is EndState.PIPED and end.remote == ("n2", "far")
    assert node.end_frame(end, 2, b"x") == [StreamSend("e1", 2, b"x")]
    assert node.end_closed(end, 0.0) == [StreamClose("e1")]
    assert node.end_closed(end, 0.0) == []  # once
    other = node.end_opened("c2", "e2", "a", "b", "k2")
    cluster.claims[other.claim_key] = Holder("n2", PipeToken("b", "far2").encode())
    cluster.run(node.rendezvous(other, 0.0))
    assert node.stream_ended("e2", "peer closed") == [Close("c2", 1000, "peer closed")]
    assert node.end_closed(other, 0.0) == []


def test_a_refused_match_retries_and_gives_up_after_its_attempts():
    node, cluster = RelayNode("n1", attempts=3), Cluster(match=False)
    key = pipe_claim_key("a", "b", "k")

    class Sticky(dict[str, Holder]):
        """A holder on n2 that comes back as soon as it is released."""

        def __delitem__(self, k: str) -> None:
            pass

    cluster.claims = Sticky({key: Holder("n2", PipeToken("b", "far").encode())})
    end = node.end_opened("c1", "e1", "a", "b", "k")
    assert cluster.run(node.rendezvous(end, 0.0)) == [
        Close("c1", 1013, "could not pair this connection request")
    ]
    assert sum(isinstance(op, MatchOp) for op in cluster.ops) == 3


def test_a_garbage_or_stale_holder_is_released_and_the_claim_retried():
    node, cluster = RelayNode("n1"), Cluster()
    key = pipe_claim_key("a", "b", "k")
    cluster.claims[key] = Holder("n2", "not a token")
    end = node.end_opened("c1", "e1", "a", "b", "k")
    assert cluster.run(node.rendezvous(end, 0.0)) == []
    assert ReleaseOp(key, "not a token") in cluster.ops
    assert end.state is EndState.HOLDING
    stale = node.end_opened("c2", "gone", "b", "a", "x")
    node.end_closed(stale, 0.0)
    cluster.claims[pipe_claim_key("a", "b", "x")] = Holder("n1", PipeToken("b", "gone").encode())
    other = node.end_opened("c3", "e3", "a", "b", "x")
    assert cluster.run(node.rendezvous(other, 0.0)) == []
    assert other.state is EndState.HOLDING


def test_without_the_cluster_pairs_form_on_this_node():
    node, cluster = RelayNode("n1"), Cluster()
    cluster.down = True
    first = node.end_opened("c1", "e1", "a", "b", "k")
    assert cluster.run(node.rendezvous(first, 0.0)) == []
    assert first.state is EndState.HOLDING
    dup = node.end_opened("c2", "e2", "a", "b", "k")
    assert cluster.run(node.rendezvous(dup, 0.0)) == [
        DropLease(first.claim_key, first.token, forget=True),
        Close("c1", 1000, REPLACED_PIPE),
    ]
    node.end_frame(dup, 1, b"held")
    other = node.end_opened("c3", "e3", "b", "a", "k")
    assert cluster.run(node.rendezvous(other, 0.0)) == [
        SendFrames("c3", ((1, b"held"),)),
        DropLease(dup.claim_key, dup.token),
    ]


def test_an_end_closed_during_its_rendezvous_holds_nothing():
    node, cluster = RelayNode("n1"), Cluster()
    end = node.end_opened("c1", "e1", "a", "b", "k")
    rendezvous = node.rendezvous(end, 0.0)
    op = next(rendezvous)
    assert isinstance(op, ClaimOp)
    assert node.end_closed(end, 0.0) == []
    with pytest.raises(StopIteration) as stop:
        rendezvous.send(cluster.answer(op))
    assert stop.value.value == [DropLease(end.claim_key, end.token)]
    assert node.next_deadline() is None


def test_match_pipes_a_held_end_and_sends_its_frames_first():
    node, cluster = RelayNode("n1"), Cluster()
    end = node.end_opened("c1", "e1", "a", "b", "k")
    cluster.run(node.rendezvous(end, 0.0))
    node.end_frame(end, 1, b"first")
    assert cluster.run(node.match("n2", "e1", "far")) == [
        StreamOpen("e1", "n2", "far"),
        StreamSend("e1", 1, b"first"),
        ToNode("n2", Direct.MATCHED, encode_end(EndRef("far", "e1"))),
        DropLease(end.claim_key, end.token),
    ]
    assert end.remote == ("n2", "far")
    assert node.end_closed(end, 0.0) == [StreamClose("e1")]
    no = [ToNode("n2", Direct.NO_MATCH, encode_end(EndRef("far")))]
    assert cluster.run(node.match("n2", "e1", "far")) == no
    assert cluster.run(node.match("n2", "unknown", "far")) == no


def test_the_hold_buffer_limit_closes_at_its_exact_boundary():
    limit = 10 + 2 * FRAME_COST
    node, cluster = RelayNode("n1", buffer_bytes=limit, linger=5), Cluster()
    end = node.end_opened("c1", "e1", "a", "b", "k", "10.0.0.1")
    cluster.run(node.rendezvous(end, 0.0))
    assert node.end_frame(end, 2, b"x" * 10) == []
    assert node.end_frame(end, 2, b"") == []  # exactly the limit
    assert node.held == {"10.0.0.1": limit}
    assert node.end_frame(end, 2, b"") == [
        Close(
            "c1", 1008, f"relay buffer full: more than {limit} bytes held before the peer connected"
        )
    ]
    # Closed by the machine: its frames do not linger, and the address holds nothing any more.
    assert node.end_closed(end, 1.0) == [DropLease(end.claim_key, end.token)]
    assert node.held == {} and node.lingering == {} and node.ends == {}


def test_the_wait_timeout_fires_at_its_deadline_and_not_before():
    node, cluster = RelayNode("n1", wait_timeout=0.5), Cluster()
    assert node.next_deadline() is None
    end = node.end_opened("c1", "e1", "a", "b", "k")
    cluster.run(node.rendezvous(end, 10.0))
    assert node.next_deadline() == 10.5
    assert node.on_timer(10.499) == []
    assert node.on_timer(10.5) == [Close("c1", 1013, "no peer connected within 0.5 s")]
    assert node.on_timer(11.0) == []  # once
    assert node.end_closed(end, 0.0) == [DropLease(end.claim_key, end.token)]


def test_no_wait_timeout_sets_no_deadline():
    node, cluster = RelayNode("n1"), Cluster()
    end = node.end_opened("c1", "e1", "a", "b", "k")
    cluster.run(node.rendezvous(end, 10.0))
    assert end.deadline is None and node.next_deadline() is None


def test_a_stream_lost_to_its_node_going_away_closes_with_1013():
    node = RelayNode("n1")
    node.end_opened("c1", "e1", "a", "b", "k")
    assert node.stream_ended("e1", "node gone") == [
        Close("c1", 1013, "the peer's node is unreachable")
    ]
    assert node.stream_ended("unknown", "peer closed") == []


def test_a_frame_on_a_closed_end_closes_it():
    node = RelayNode("n1")
    end = node.end_opened("c1", "e1", "a", "b", "k")
    node.end_closed(end, 0.0)
    assert node.end_frame(end, 1, b"late") == [Close("c1", 1000)]
    assert node.evict_end("e1", REPLACED_PIPE) == []


def test_a_claim_released_between_claim_and_lookup_is_claimed_again():
    node, cluster = RelayNode("n1"), Cluster()
    key = pipe_claim_key("a", "b", "k")
    cluster.claims[key] = Holder("n2", PipeToken("b", "far").encode())
    end = node.end_opened("c1", "e1", "a", "b", "k")
    rendezvous = node.rendezvous(end, 0.0)
    assert next(rendezvous) == ClaimOp(key, end.token)
    assert rendezvous.send(False) == LookupOp(key)
    assert rendezvous.send(None) == ClaimOp(key, end.token)  # gone in between
    with pytest.raises(StopIteration) as stop:
        rendezvous.send(True)
    assert stop.value.value == [] and end.state is EndState.HOLDING


def test_an_end_closed_while_its_match_was_on_its_way_closes_its_stream():
    node = RelayNode("n1")
    end = node.end_opened("c1", "e1", "a", "b", "k")
    rendezvous = node.rendezvous(end, 0.0)
    next(rendezvous)
    rendezvous.send(False)
    assert rendezvous.send(Holder("n2", PipeToken("b", "far").encode())) == MatchOp(
        "n2", "far", "e1"
    )
    node.end_closed(end, 0.0)
    with pytest.raises(StopIteration) as stop:
        rendezvous.send(True)
    assert stop.value.value == [StreamClose("e1")]  # the claim is n2's: nothing to release


def test_an_end_closed_before_its_rendezvous_does_nothing():
    node, cluster = RelayNode("n1"), Cluster()
    end = node.end_opened("c1", "e1", "a", "b", "k")
    node.end_closed(end, 0.0)
    assert cluster.run(node.rendezvous(end, 0.0)) == []
    assert cluster.ops == [] and cluster.claims == {}
    cluster.down = True
    assert cluster.run(node.rendezvous(end, 0.0)) == []
    assert node.holding == {}


def test_a_match_for_an_end_still_in_its_rendezvous_waits_for_it_to_hold():
    node, cluster = RelayNode("n1"), Cluster()
    end = node.end_opened("c1", "e1", "a", "b", "k")
    match = node.match("n2", "e1", "far")
    assert next(match) == SettleOp("e1")
    cluster.run(node.rendezvous(end, 0.0))  # it holds meanwhile
    with pytest.raises(StopIteration) as stop:
        match.send(None)
    assert stop.value.value[0] == StreamOpen("e1", "n2", "far")


# --- held bytes per address, and frames a closing holder leaves behind -------------------------


def held_end(
    node: RelayNode, cluster: Cluster, n: int, address: str, a: str = "a", key: str = ""
) -> Any:
    end = node.end_opened(f"c{n}", f"e{n}", a, "b", key or f"k{n}", address)
    cluster.run(node.rendezvous(end, 0.0))
    assert end.state is EndState.HOLDING
    return end


def test_what_one_address_holds_is_bounded_at_its_exact_boundary():
    cost = 100 + FRAME_COST
    node, cluster = (
        RelayNode("n1", buffer_bytes=10 * cost, address_buffer_bytes=3 * cost),
        Cluster(),
    )
    ends = [held_end(node, cluster, n, "10.0.0.1") for n in range(3)]
    other = held_end(node, cluster, 9, "10.0.0.2")
    for end in ends:
        assert node.end_frame(end, 2, b"x" * 100) == []
    assert node.held == {"10.0.0.1": 3 * cost}  # exactly the budget
    refused = [
        Close("c0", 1008, f"relay buffer full: more than {3 * cost} bytes held for this address")
    ]
    assert node.end_frame(ends[0], 2, b"") == refused
    assert ends[0].buffer.size == cost  # the refused frame changed nothing
    assert node.end_frame(other, 2, b"x" * 100) == []  # another address has its own budget
    # Every way a hold ends gives its bytes back: its socket closing (here, closed by the limit)...
    node.end_closed(ends[0], 1.0)
    assert node.held == {"10.0.0.1": 2 * cost, "10.0.0.2": cost}
    # ...a duplicate request replacing it...
    dup = node.end_opened("c5", "e5", "a", "b", "k1", "10.0.0.1")
    cluster.run(node.rendezvous(dup, 0.0))
    assert node.held["10.0.0.1"] == cost
    # ...its peer arriving here, or on another node.
    peer = node.end_opened("c6", "e6", "b", "a", "k2", "10.0.0.3")
    assert cluster.run(node.rendezvous(peer, 0.0))[0] == SendFrames("c6", ((2, b"x" * 100),))
    assert cluster.run(node.match("n2", "e9", "far"))[1] == StreamSend("e9", 2, b"x" * 100)
    assert node.held == {}


def test_a_holder_that_closes_with_frames_lingers_for_a_reciprocal_on_its_way_here():
    """Its client saw the other socket open, sent and closed: the other side still gets the
    frames, then `peer closed`, though its rendezvous ran after the close (as on Redis)."""
    node, cluster = RelayNode("n1", wait_timeout=60, linger=5), Cluster()
    holder = held_end(node, cluster, 1, "10.0.0.1", key="k")
    arrival = node.end_opened("c2", "e2", "b", "a", "k", "10.0.0.2")
    rendezvous = node.rendezvous(arrival, 10.0)
    claim = next(rendezvous)
    assert claim == ClaimOp(arrival.claim_key, arrival.token)  # on its way...
    node.end_frame(holder, 1, b"last words")
    assert node.end_closed(holder, 10.0) == []  # lingers: keeps its claim and frames
    assert node.next_deadline() == 15.0 and node.lingering == {"10.0.0.1": 1}
    effects = cluster.finish(rendezvous, claim)
    assert effects == [
        SendFrames("c2", ((1, b"last words"),)),
        Close("c2", 1000, PEER_CLOSED),
        DropLease(holder.claim_key, holder.token),
    ]
    assert node.ends == {"e2": arrival} and node.holding == {}
    assert node.held == {} and node.lingering == {} and node.next_deadline() is None
    assert node.end_closed(arrival, 11.0) == []


def test_a_lingering_holder_matched_from_another_node_ends_its_stream_after_the_frames():
    node, cluster = RelayNode("n1", linger=5), Cluster()
    holder = held_end(node, cluster, 1, "10.0.0.1")
    node.end_frame(holder, 2, b"\x00\x01")
    node.end_closed(holder, 0.0)
    assert cluster.run(node.match("n2", "e1", "far")) == [
        StreamOpen("e1", "n2", "far"),
        StreamSend("e1", 2, b"\x00\x01"),
        ToNode("n2", Direct.MATCHED, encode_end(EndRef("far", "e1"))),
        DropLease(holder.claim_key, holder.token),
        StreamClose("e1"),
    ]
    assert node.ends == {} and node.held == {} and node.lingering == {}
    assert node.stream_ended("e1", PEER_CLOSED) == []
    assert node.end_closed(holder, 1.0) == []  # its stream is closed already


def test_a_lingering_holder_is_forgotten_when_its_linger_ends():
    node, cluster = RelayNode("n1", wait_timeout=60, linger=5), Cluster()
    holder = held_end(node, cluster, 1, "10.0.0.1")
    node.end_frame(holder, 1, b"x")
    assert node.end_closed(holder, 100.0) == []  # its wait ends at 60: the earlier deadline
    assert node.end_closed(holder, 100.0) == []  # counted once
    assert node.next_deadline() == 60.0
    assert node.on_timer(59.9) == []
    assert node.on_timer(60.0) == [DropLease(holder.claim_key, holder.token)]
    assert node.ends == {} and node.held == {} and node.lingering == {}
    assert node.next_deadline() is None


def test_only_a_holder_its_client_closed_with_frames_lingers_and_at_most_so_many_per_address():
    node, cluster = RelayNode("n1", wait_timeout=1, linger=5), Cluster()
    empty = held_end(node, cluster, 1, "10.0.0.1")
    assert node.end_closed(empty, 0.0) == [DropLease(empty.claim_key, empty.token)]
    timed_out = held_end(node, cluster, 2, "10.0.0.1")
    node.end_frame(timed_out, 1, b"x")
    assert node.on_timer(1.0) == [Close("c2", 1013, "no peer connected within 1 s")]
    assert node.end_closed(timed_out, 1.0) == [DropLease(timed_out.claim_key, timed_out.token)]
    for n in range(10, 10 + LINGER_PER_ADDRESS + 1):
        end = held_end(node, cluster, n, "10.0.0.1")
        node.end_frame(end, 1, b"x")
        effects = node.end_closed(end, 2.0)
        assert effects == (
            [] if n < 10 + LINGER_PER_ADDRESS else [DropLease(end.claim_key, end.token)]
        )
    assert node.lingering == {"10.0.0.1": LINGER_PER_ADDRESS}
    assert node.held == {"10.0.0.1": LINGER_PER_ADDRESS * (1 + FRAME_COST)}
    assert len(node.on_timer(7.0)) == LINGER_PER_ADDRESS  # all forgotten in time
    assert node.lingering == {} and node.held == {} and node.holding == {}
    # Without a linger, nothing ever lingers.
    plain = RelayNode("n2")
    end = held_end(plain, Cluster("n2"), 1, "10.0.0.1")
    plain.end_frame(end, 1, b"x")
    assert plain.end_closed(end, 0.0) == [DropLease(end.claim_key, end.token)]


def test_a_duplicate_request_replaces_a_lingering_holder_without_closing_anything():
    node, cluster = RelayNode("n1", linger=5), Cluster()
    holder = held_end(node, cluster, 1, "10.0.0.1", key="k")
    node.end_frame(holder, 1, b"x")
    node.end_closed(holder, 0.0)
    assert node.evict_end("e1", REPLACED_PIPE) == [
        DropLease(holder.claim_key, holder.token, forget=True)
    ]
    assert node.ends == {} and node.held == {} and node.lingering == {}
    assert node.end_closed(holder, 0.0) == []  # nothing more, whatever comes late


# --- exact names, defaults and bookkeeping -------------------------------------------------------


def test_claim_keys_are_namespaced_json():
    assert peer_claim_key('a"b') == 'relay:peer:"a\\"b"'
    assert pipe_claim_key("b", "a", "k") == 'relay:pipe:["k","a","b"]'


def test_the_directory_takes_what_it_does_not_hold_in_stride():
    d = Directory()
    assert d.join("a", [], leave=["never"]) == ([], [], [])
    assert "a" not in d and d.documents_of("a") == ()
    assert d.join("a", ["k"], leave=["never"]) == (["k"], [], [])
    assert d.introductions("a", ["nobody-holds-this"]) == []
    assert d.introductions("nobody", ["k"]) == []
    d.join("b", ["k"])
    # an announcement through a document the join did not add introduces nobody
    assert d.remote_introductions("z", ("other",), ("k",), "k") == []


def test_a_node_bounds_the_documents_of_each_peer():
    node = RelayNode("n1", max_documents=2)
    sock, _ = joined(node, "c1", "a", "k1", "k2")
    with pytest.raises(DocumentLimitExceeded) as refused:
        node.peer_message(sock, decode('{"type":"Join","documentIds":["k3"]}', JSON), JSON)
    assert refused.value.message == "a peer may join at most 2 document ids"
    assert node.directory.documents_of("a") == ("k1", "k2")


def test_a_v1_join_leaves_what_it_names_to_leave():
    node = RelayNode("n1")
    sock, _ = node.peer_opened("c1", "a", "t")
    node.peer_message(sock, decode('{"type":"Join","join":["k1","k2"]}', JSON), JSON)
    frame = decode('{"type":"Join","join":["k3"],"leave":["k1"]}', JSON)
    announce = encode_announce(Announce("n1", "a", ("k3",), ("k2", "k3")))
    assert node.peer_message(sock, frame, JSON) == [
        Presence("k3", 1, NAMESPACE),
        Presence("k1", 0, NAMESPACE),
        Publish("k3", announce, NAMESPACE),
    ]
    assert node.directory.documents_of("a") == ("k2", "k3")


def test_an_announce_introduces_every_local_peer_it_concerns():
    node = RelayNode("n1")
    joined(node, "c1", "p1", "k")
    joined(node, "c2", "p2", "k")
    msg = Announce("n2", "remote", ("k",), ("k",))
    assert node.announced("k", msg) == [
        Send("c1", encode_introduction(Generation.V2, "remote", ("k",))),
        ToNode("n2", Direct.INTRODUCE, encode_introduce(Introduce("remote", "p1", ("k",)))),
        Send("c2", encode_introduction(Generation.V2, "remote", ("k",))),
        ToNode("n2", Direct.INTRODUCE, encode_introduce(Introduce("remote", "p2", ("k",)))),
    ]


def test_a_rendezvous_gives_up_after_four_attempts_by_default():
    node, cluster = RelayNode("n1"), Cluster(match=False)
    key = pipe_claim_key("a", "b", "k")
    far = Holder("n2", PipeToken("b", "far").encode())

    class Sticky(dict[str, Holder]):
        def __delitem__(self, k: str) -> None:
            pass

    cluster.claims = Sticky({key: far})
    end = node.end_opened("c1", "e1", "a", "b", "k")
    assert cluster.run(node.rendezvous(end, 0.0)) == [
        Close("c1", 1013, "could not pair this connection request")
    ]
    attempt = [ClaimOp(key, end.token), LookupOp(key), MatchOp("n2", "far", "e1")]
    assert cluster.ops == [*attempt, ReleaseOp(key, far.token)] * 4


def test_a_stale_hold_here_settles_first_then_is_released():
    node, cluster = RelayNode("n1"), Cluster()
    key = pipe_claim_key("a", "b", "k")
    stale = node.end_opened("c0", "e0", "b", "a", "k")  # in its rendezvous, not holding
    token = PipeToken("b", "e0").encode()
    cluster.claims[key] = Holder("n1", token)
    end = node.end_opened("c1", "e1", "a", "b", "k")
    assert cluster.run(node.rendezvous(end, 0.0)) == []
    assert cluster.ops == [
        ClaimOp(key, end.token),
        LookupOp(key),
        SettleOp("e0"),
        ReleaseOp(key, token),
        ClaimOp(key, end.token),
    ]
    assert stale.state is EndState.RENDEZVOUS and end.state is EndState.HOLDING


def test_without_the_cluster_a_held_end_waits_its_timeout_too():
    node, cluster = RelayNode("n1", wait_timeout=2), Cluster()
    cluster.down = True
    first = node.end_opened("c1", "e1", "a", "b", "k")
    assert cluster.run(node.rendezvous(first, 10.0)) == []
    assert first.deadline == 12.0
    dup = node.end_opened("c2", "e2", "a", "b", "k")
    cluster.run(node.rendezvous(dup, 11.0))
    assert dup.deadline == 13.0 and node.next_deadline() == 13.0


def test_a_pair_with_nothing_held_is_piped_without_frames():
    node, cluster = RelayNode("n1"), Cluster()
    first = node.end_opened("c1", "e1", "a", "b", "k")
    cluster.run(node.rendezvous(first, 0.0))
    second = node.end_opened("c2", "e2", "b", "a", "k")
    assert cluster.run(node.rendezvous(second, 0.0)) == [DropLease(first.claim_key, first.token)]


def test_a_matched_end_pipes_its_frames_to_the_stream():
    node, cluster = RelayNode("n1"), Cluster()
    end = node.end_opened("c1", "e1", "a", "b", "k")
    cluster.run(node.rendezvous(end, 0.0))
    cluster.run(node.match("n2", "e1", "far"))
    assert end.state is EndState.PIPED
    assert node.end_frame(end, 1, b"on") == [StreamSend("e1", 1, b"on")]


def test_lingering_ends_are_counted_per_address_one_by_one():
    node, cluster = RelayNode("n1", linger=0.5), Cluster()
    first = held_end(node, cluster, 1, "10.0.0.1")
    second = held_end(node, cluster, 2, "10.0.0.1")
    for end in (first, second):
        node.end_frame(end, 1, b"x")
    assert node.end_closed(first, 10.0) == []  # lingers, though its linger is under a second
    assert node.end_closed(second, 10.2) == []
    assert node.lingering == {"10.0.0.1": 2}
    assert node.on_timer(10.5) == [DropLease(first.claim_key, first.token)]
    assert node.lingering == {"10.0.0.1": 1}
    assert node.held == {"10.0.0.1": 1 + FRAME_COST}
    assert node.on_timer(10.7) == [DropLease(second.claim_key, second.token)]
    assert node.lingering == {} and node.held == {}


def test_one_lingering_end_per_address_at_most(monkeypatch):
    monkeypatch.setattr("polysignal.core.relay.LINGER_PER_ADDRESS", 1)
    node, cluster = RelayNode("n1", linger=5), Cluster()
    first = held_end(node, cluster, 1, "10.0.0.1")
    second = held_end(node, cluster, 2, "10.0.0.1")
    for end in (first, second):
        node.end_frame(end, 1, b"x")
    assert node.end_closed(first, 0.0) == []
    assert node.end_closed(second, 0.0) == [DropLease(second.claim_key, second.token)]
    assert node.lingering == {"10.0.0.1": 1}
