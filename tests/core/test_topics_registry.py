"""The topic registry and its reverse index, without an event loop."""

from __future__ import annotations

import pytest

from polysignal.core.topics import TopicLimitExceeded, TopicRegistry


def test_subscribe_returns_only_new_topics_and_counts_once():
    reg: TopicRegistry[str] = TopicRegistry()
    assert reg.subscribe("a", ["t", "u", "t"]) == ["t", "u"]
    assert reg.subscribe("a", ["t"]) == []
    assert reg.count("t") == 1
    assert reg.subscribe("b", ["t"]) == ["t"]
    assert reg.count("t") == 2
    assert reg.subscribers("t") == {"a", "b"}
    assert reg.topics_of("a") == {"t", "u"}


def test_unsubscribe_only_affects_held_topics():
    reg: TopicRegistry[str] = TopicRegistry()
    reg.subscribe("a", ["t"])
    assert reg.unsubscribe("a", ["t", "never"]) == ["t"]
    assert reg.unsubscribe("a", ["t"]) == []
    assert reg.unsubscribe("nobody", ["t"]) == []
    assert reg.count("t") == 0
    assert reg.topics() == [] and len(reg) == 0
    assert reg.topics_of("a") == frozenset()


def test_remove_cleans_reverse_index_and_empty_topics():
    reg: TopicRegistry[str] = TopicRegistry()
    reg.subscribe("a", ["t", "u"])
    reg.subscribe("b", ["u"])
    assert sorted(reg.remove("a")) == ["t", "u"]
    assert reg.remove("a") == []
    assert reg.topics() == ["u"]
    assert reg.subscribers("t") == frozenset()
    assert reg.subscribers("u") == {"b"}


def test_topic_limit_subscribes_what_fits_and_reports_the_rest():
    reg: TopicRegistry[str] = TopicRegistry(max_topics_per_subscriber=2)
    reg.subscribe("a", ["t"])
    with pytest.raises(TopicLimitExceeded) as info:
        reg.subscribe("a", ["u", "v", "w"])
    assert info.value.added == ["u"] and info.value.refused == 2
    assert "at most 2 topics" in info.value.message
    assert reg.topics_of("a") == {"t", "u"}
    # Holding the maximum, re-subscribing held topics is still fine.
    assert reg.subscribe("a", ["t", "u"]) == []


def test_limit_refusing_everything_leaves_no_empty_entry():
    reg: TopicRegistry[str] = TopicRegistry(max_topics_per_subscriber=1)
    reg.subscribe("a", ["t"])
    with pytest.raises(TopicLimitExceeded):
        reg.subscribe("a", ["u"])
    reg.remove("a")
    assert len(reg) == 0


def test_the_topics_of_one_address_are_bounded_together_at_the_exact_limit():
    reg: TopicRegistry[str] = TopicRegistry(max_topics_per_subscriber=3, max_topics_per_address=4)
    assert reg.subscribe("a1", ["t1", "t2", "t3"], "10.0.0.1") == ["t1", "t2", "t3"]
    assert reg.subscribe("a2", ["t1"], "10.0.0.1") == ["t1"]  # the 4th: accepted
    assert reg.held_by("10.0.0.1") == 4
    with pytest.raises(TopicLimitExceeded) as info:
        reg.subscribe("a2", ["t2", "t3"], "10.0.0.1")
    assert info.value.added == [] and info.value.refused == 2
    assert info.value.message == (
        "subscribe: 2 topic(s) refused, the connections of one address may hold at most 4 topics"
    )
    assert reg.subscribe("b1", ["t2", "t3"], "10.0.0.2") == ["t2", "t3"]  # another address
    assert reg.subscribe("a2", ["t1"], "10.0.0.1") == []  # held already: no cost
    assert reg.unsubscribe("a1", ["t1", "nope"]) == ["t1"]
    assert reg.held_by("10.0.0.1") == 3
    with pytest.raises(TopicLimitExceeded) as info:
        reg.subscribe("a2", ["t2", "t3"], "10.0.0.1")
    assert (info.value.added, info.value.refused) == (["t2"], 1)  # one slot had come back
    assert sorted(reg.remove("a1")) == ["t2", "t3"]
    assert reg.held_by("10.0.0.1") == 2
    assert sorted(reg.unsubscribe("a2", ["t1", "t2"])) == ["t1", "t2"]
    assert reg.held_by("10.0.0.1") == 0
    assert reg.subscribe("a3", ["x1", "x2", "x3"], "10.0.0.1") == ["x1", "x2", "x3"]


def test_the_per_connection_limit_is_named_first_when_both_are_reached():
    reg: TopicRegistry[str] = TopicRegistry(max_topics_per_subscriber=1, max_topics_per_address=1)
    reg.subscribe("a", ["t1"], "x")
    with pytest.raises(TopicLimitExceeded) as info:
        reg.subscribe("a", ["t2"], "x")
    assert info.value.message.endswith("a connection may hold at most 1 topics")


def test_without_an_address_only_the_connection_limit_applies():
    reg: TopicRegistry[str] = TopicRegistry(max_topics_per_subscriber=0, max_topics_per_address=1)
    assert reg.subscribe("a", ["t1", "t2"]) == ["t1", "t2"]
    assert reg.held_by("") == 0
