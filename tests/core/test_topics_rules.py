"""The topics protocol's subscription rules (core/topics.py ``TopicsRules``): which topics a
subscriber gets within its limits and its token, and the whole frames it is told, without
sockets."""

from __future__ import annotations

import orjson

from polysignal.core.auth import Identity
from polysignal.core.topics import TopicRegistry, TopicsRules
from polysignal.protocols import topics as proto


def rules(per_conn: int = 0, per_address: int = 0) -> TopicsRules[str]:
    return TopicsRules(TopicRegistry(per_conn, per_address))


def texts(frames: list[bytes]) -> list[str]:
    return [orjson.loads(frame)["message"] for frame in frames]


def test_subscribe_without_a_token_takes_every_topic() -> None:
    r = rules()
    assert r.subscribe("c1", proto.Subscribe(("a", "b"))) == ([], ["a", "b"])
    assert r.subscribe("c1", proto.Subscribe(("a", "c"))) == ([], ["c"])  # "a" held already
    assert r.registry.topics_of("c1") == {"a", "b", "c"}


def test_subscribe_keeps_to_the_tokens_topics_and_names_the_rest_first() -> None:
    r = rules(per_conn=1)
    token = Identity("alice", topics=("room-*",))
    cmd = proto.Subscribe(("room-1", "secret", "room-2"), problems=("entry 3 is not a string",))
    answers, added = r.subscribe("c1", cmd, "10.0.0.1", token)
    assert added == ["room-1"]
    assert texts(answers) == [
        "subscribe: topic 'secret' not allowed for this token",
        "subscribe: 1 topic(s) refused, a connection may hold at most 1 topics",
        "subscribe: skipped entry 3 is not a string",
    ]
    assert orjson.loads(answers[0]) == {
        "type": "error",
        "message": "subscribe: topic 'secret' not allowed for this token",
    }
    assert r.registry.held_by("10.0.0.1") == 1


def test_subscribe_up_to_the_address_limit_exactly() -> None:
    r = rules(per_address=2)
    assert r.subscribe("c1", proto.Subscribe(("a",)), "10.0.0.1") == ([], ["a"])
    assert r.subscribe("c2", proto.Subscribe(("b",)), "10.0.0.1") == ([], ["b"])  # the 2nd: in
    answers, added = r.subscribe("c3", proto.Subscribe(("c",)), "10.0.0.1")
    assert added == []
    assert texts(answers) == [
        "subscribe: 1 topic(s) refused, the connections of one address may hold at most 2 topics"
    ]


def test_a_token_allowing_every_topic_named_refuses_nothing() -> None:
    r = rules()
    token = Identity("bob", topics=("a", "b"))
    assert r.subscribe("c1", proto.Subscribe(("a", "b")), "", token) == ([], ["a", "b"])


def test_unsubscribe_leaves_held_topics_and_names_bad_entries() -> None:
    r = rules()
    r.subscribe("c1", proto.Subscribe(("a", "b")))
    assert r.unsubscribe("c1", proto.Unsubscribe(("a", "zzz"))) == ([], ["a"])
    answers, removed = r.unsubscribe("c1", proto.Unsubscribe(("b",), problems=("entry 2: 5",)))
    assert removed == ["b"]
    assert texts(answers) == ["unsubscribe: skipped entry 2: 5"]
    assert r.registry.topics_of("c1") == frozenset()


def test_publish_refusal() -> None:
    assert TopicsRules.publish_refusal(None, "any") is None
    assert TopicsRules.publish_refusal(Identity("a"), "any") is None  # no topics claim: all
    token = Identity("a", topics=("ok",))
    assert TopicsRules.publish_refusal(token, "ok") is None
    refusal = TopicsRules.publish_refusal(token, "no")
    assert refusal is not None
    assert orjson.loads(refusal) == {
        "type": "error",
        "message": "publish: topic 'no' not allowed for this token",
    }
