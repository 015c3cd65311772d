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
