"""Introduction rules and hold buffers of the relay, without I/O (docs/protocols/relay.md)."""

from __future__ import annotations

import pytest

from polysignal.core.errors import LimitExceeded
from polysignal.core.relay import (
    Directory,
    DocumentLimitExceeded,
    HoldBuffer,
    Introduction,
    PipeToken,
    peer_claim_key,
    pipe_claim_key,
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


def test_every_join_repeats_the_introductions_even_when_it_adds_nothing():
    d = Directory()
    d.join("a", ["k"])
    d.join("b", ["k"])
    assert d.join("a", ["k"]) == (
        [],
        [],
        [Introduction("a", "b", ("k",)), Introduction("b", "a", ("k",))],
    )
    # Joining an unrelated document also re-introduces the peers it already shares one with.
    _, _, intros = d.join("a", ["z"])
    assert intros == [Introduction("a", "b", ("k",)), Introduction("b", "a", ("k",))]


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


def test_hold_buffer_is_bounded_in_bytes():
    buf = HoldBuffer(limit=10)
    buf.add(1, b"12345")
    buf.add(2, b"67890")
    with pytest.raises(LimitExceeded, match="more than 10 bytes"):
        buf.add(1, b"x")
    assert buf.take() == [(1, b"12345"), (2, b"67890")]
    assert buf.size == 0 and buf.frames == []
    unbounded = HoldBuffer(limit=0)
    unbounded.add(1, b"x" * 1000)
    assert unbounded.size == 1000


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
