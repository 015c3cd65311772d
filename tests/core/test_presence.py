"""Presence without I/O (core/presence.py): notices, timing, this node's counts and what the
writes ask of the bus and store in which order, and the cache of the other nodes' counts."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polysignal.core.presence import (
    CACHE_MAX,
    SWEEP_BATCH,
    AnnounceOp,
    Key,
    MalformedNotice,
    Notice,
    PresenceState,
    PresenceTiming,
    ReadCountsOp,
    Remote,
    SubscribeOp,
    UnsubscribeOp,
    WriteCountsOp,
    notice,
    notice_prefix,
    parse_notice,
    stopped_notice,
)

ROOM: Key = ("topics", "room")
HALL: Key = ("rooms", "hall")


def channel(namespace: str, topic: str) -> bytes:
    return f"c:{namespace}:{topic}".encode()


def count_key(namespace: str, topic: str) -> str:
    return f"k:{namespace}:{topic}"


def state(cache_ttl: float = 2.0, cache_max: int = CACHE_MAX) -> PresenceState:
    return PresenceState(
        "a", channel_of=channel, count_key=count_key, cache_ttl=cache_ttl, cache_max=cache_max
    )


def drive(steps: Generator[Any, Any, Any], answer: Callable[[Any], Any] = lambda op: None):
    """Run ``steps`` to its end (or on, after an op already taken, which gets None), answering
    each op with ``answer(op)``: (ops, result)."""
    ops: list[Any] = []
    reply: Any = None
    while True:
        try:
            op = steps.send(reply)
        except StopIteration as stop:
            return ops, stop.value
        ops.append(op)
        reply = answer(op)


def reads(counts: dict[str, dict[str, int]], now: float = 10.0) -> Callable[[Any], Any]:
    """Answer ReadCountsOp from ``counts`` (count key -> node -> count) at ``now``."""

    def answer(op: Any) -> Any:
        if isinstance(op, ReadCountsOp):
            return [dict(counts.get(name, {})) for name in op.names], now
        return None

    return answer


# --- notices ---


def test_a_notice_is_json_node_namespace_topic_count():
    assert notice("a", ROOM, 3) == b'["a","topics","room",3]'
    assert stopped_notice("a") == b'["a",null,null,0]'
    assert notice_prefix("a") == b'["a",'


@given(st.text(), st.text(), st.text(), st.integers(min_value=0, max_value=2**62))
def test_any_notice_parses_back_and_starts_with_its_nodes_prefix(node, namespace, topic, count):
    data = notice(node, (namespace, topic), count)
    assert parse_notice(data) == Notice(node, (namespace, topic), count)
    assert data.startswith(notice_prefix(node))


def test_a_stop_notice_parses_to_no_topic():
    assert parse_notice(stopped_notice("a")) == Notice("a", None, 0)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"{", "presence notice is not JSON"),
        (b'{"a": 1}', "presence notice is not [node, namespace, topic, count]"),
        (b'["a", "n", "t"]', "presence notice is not [node, namespace, topic, count]"),
        (b'["a", "n", "t", 1, 2]', "presence notice is not [node, namespace, topic, count]"),
        (b'[1, "n", "t", 1]', "presence notice's node is not a string"),
        (b'["a", "n", "t", "1"]', "presence notice's count is not a count"),
        (b'["a", "n", "t", 1.0]', "presence notice's count is not a count"),
        (b'["a", "n", "t", -1]', "presence notice's count is not a count"),
        (b'["a", null, "t", 0]', "presence notice's namespace or topic is not a string"),
        (b'["a", "n", null, 0]', "presence notice's namespace or topic is not a string"),
        (b'["a", "n", 5, 0]', "presence notice's namespace or topic is not a string"),
        (b'["a", 5, "t", 0]', "presence notice's namespace or topic is not a string"),
    ],
)
def test_every_malformed_notice_is_refused_with_what_is_wrong(data, error):
    with pytest.raises(MalformedNotice) as caught:
        parse_notice(data)
    assert str(caught.value) == error


def test_a_count_of_zero_parses():
    assert parse_notice(b'["b","n","t",0]') == Notice("b", ("n", "t"), 0)


# --- timing ---


def test_timing_keeps_what_was_asked_when_it_makes_sense():
    timing = PresenceTiming.of(90, 10.0, 2.0, lossless=False)
    assert timing == PresenceTiming(90, 10.0, 2.0, 10.0)
    assert not timing.adjusted


def test_a_refresh_not_below_the_ttl_becomes_three_per_ttl():
    timing = PresenceTiming.of(3, 3.0, 2.0, lossless=False)
    assert timing.refresh == 1.0 and timing.asked == 3.0 and timing.adjusted
    just_under = PresenceTiming.of(3, 2.999, 2.0, lossless=False)
    assert just_under.refresh == 2.999 and not just_under.adjusted


def test_timing_has_floors_and_a_lossless_bus_needs_no_cache_expiry():
    timing = PresenceTiming.of(0, 0.0, 2.0, lossless=True)
    assert timing.ttl == 1 and timing.asked == 0.05 and timing.refresh == 0.05
    assert timing.cache_ttl == math.inf


# --- this node's counts ---


def test_a_new_topic_is_subscribed_read_then_announced_and_written():
    presence = state()
    assert presence.set_local(ROOM, 2) is True
    assert presence.dirty == {ROOM: None}
    ops, _ = drive(presence.write(), reads({"k:topics:room": {"b": 3, "a": 9}}))
    assert ops == [
        SubscribeOp([b"c:topics:room"]),
        ReadCountsOp(["k:topics:room"]),
        AnnounceOp([b'["a","topics","room",2]']),
        WriteCountsOp({"k:topics:room": 2}),
    ]
    assert presence.channels == {b"c:topics:room": ROOM}
    assert presence.cache == {ROOM: Remote({"b": 3}, 12.0)}  # this node's own count left out
    assert presence.asserted == {ROOM} and presence.dirty == {}


def test_a_change_of_a_subscribed_topic_is_only_announced_and_written():
    presence = state()
    presence.set_local(ROOM, 2)
    drive(presence.write(), reads({}))
    presence.set_local(ROOM, 5)
    ops, _ = drive(presence.write())
    assert ops == [AnnounceOp([b'["a","topics","room",5]']), WriteCountsOp({"k:topics:room": 5})]


def test_a_cached_topic_is_not_read_again_when_subscribed():
    presence = state()
    presence.store(ROOM, {"b": 1}, 0.0)
    presence.set_local(ROOM, 1)
    ops, _ = drive(presence.write())
    assert [type(op) for op in ops] == [SubscribeOp, AnnounceOp, WriteCountsOp]


def test_a_topic_left_is_announced_as_zero_deleted_and_unsubscribed():
    presence = state()
    presence.set_local(ROOM, 2)
    drive(presence.write(), reads({}))
    assert presence.set_local(ROOM, 0) is True
    ops, _ = drive(presence.write())
    assert ops == [
        AnnounceOp([b'["a","topics","room",0]']),
        WriteCountsOp({"k:topics:room": 0}),
        UnsubscribeOp([b"c:topics:room"]),
    ]
    assert presence.channels == {} and presence.asserted == set() and presence.local == {}


def test_a_topic_joined_and_left_before_any_write_costs_nothing():
    presence = state()
    presence.set_local(ROOM, 1)
    presence.early[ROOM] = {"b": 1}
    assert presence.set_local(ROOM, 0) is False
    assert presence.dirty == {} and presence.early == {} and presence.local == {}
    ops, _ = drive(presence.write())
    assert ops == []


def test_leaving_a_topic_still_asserted_but_not_subscribed_is_written():
    presence = state()
    presence.set_local(ROOM, 1)
    drive(presence.write(), reads({}))
    presence.disconnected()
    assert presence.set_local(ROOM, 0) is True
    ops, _ = drive(presence.write())
    assert ops == [AnnounceOp([b'["a","topics","room",0]']), WriteCountsOp({"k:topics:room": 0})]


def test_leaving_a_topic_subscribed_but_not_yet_asserted_unsubscribes_it():
    presence = state()
    presence.set_local(ROOM, 1)
    steps = presence.write()
    assert steps.send(None) == SubscribeOp([b"c:topics:room"])
    assert presence.set_local(ROOM, 0) is True  # left while the subscribe was on its way
    ops, _ = drive(steps, reads({}))
    assert ops == [ReadCountsOp(["k:topics:room"]), UnsubscribeOp([b"c:topics:room"])]
    assert presence.dirty == {ROOM: None}
    ops, _ = drive(presence.write())
    assert ops == []


def test_a_topic_that_became_active_during_the_subscribe_waits_for_the_next_round():
    presence = state()
    presence.set_local(HALL, 1)
    drive(presence.write(), reads({}))
    presence.disconnected()  # HALL is asserted, no longer subscribed
    presence.set_local(HALL, 0)
    presence.set_local(ROOM, 1)
    steps = presence.write()
    assert steps.send(None) == SubscribeOp([b"c:topics:room"])
    presence.set_local(HALL, 4)  # back while the subscribe was on its way
    ops, _ = drive(steps, reads({}))
    assert ops == [
        ReadCountsOp(["k:topics:room"]),
        AnnounceOp([b'["a","topics","room",1]']),
        WriteCountsOp({"k:topics:room": 1}),
    ]
    assert presence.dirty == {HALL: None}
    ops, _ = drive(presence.write(), reads({}))
    assert ops[0] == SubscribeOp([b"c:rooms:hall"])
    assert ops[-1] == WriteCountsOp({"k:rooms:hall": 4})


def test_asserting_all_writes_every_subscribed_count_and_deletes_the_stale_ones():
    presence = state()
    presence.set_local(ROOM, 2)
    presence.set_local(HALL, 1)
    drive(presence.write(), reads({}))
    presence.asserted.add(("topics", "old"))  # its count is in the store, the topic is gone
    presence.asserted.add(("topics", "pending"))
    presence.dirty[("topics", "pending")] = None  # its zero is the writer's to announce
    presence.set_local(("topics", "new"), 3)  # not subscribed yet: the writer's
    ops, _ = drive(presence.assert_all(announce=True))
    assert ops == [
        AnnounceOp([b'["a","topics","room",2]', b'["a","rooms","hall",1]']),
        WriteCountsOp({"k:topics:room": 2, "k:rooms:hall": 1, "k:topics:old": 0}),
    ]
    assert presence.asserted == {ROOM, HALL, ("topics", "pending")}
    assert list(presence.dirty) == [("topics", "pending"), ("topics", "new")]


def test_the_refresh_writes_without_notices_and_always_marks_the_node_alive():
    presence = state()
    ops, _ = drive(presence.assert_all(announce=False))
    assert ops == [AnnounceOp([]), WriteCountsOp({})]
    presence.set_local(ROOM, 2)
    drive(presence.write(), reads({}))
    ops, _ = drive(presence.assert_all(announce=False))
    assert ops == [AnnounceOp([]), WriteCountsOp({"k:topics:room": 2})]


def test_the_keys_removed_at_a_stop_are_the_asserted_and_the_active_ones():
    presence = state()
    presence.set_local(ROOM, 1)
    drive(presence.write(), reads({}))
    presence.set_local(ROOM, 0)
    presence.set_local(HALL, 2)
    assert sorted(presence.node_keys()) == ["k:rooms:hall", "k:topics:room"]
    presence.removed()
    assert presence.asserted == set()


# --- the connection ---


def test_a_new_connection_subscribes_every_active_topic_and_forgets_the_cache():
    presence = state()
    presence.set_local(ROOM, 1)
    presence.set_local(HALL, 2)
    presence.store(ROOM, {"b": 1}, 0.0)
    assert presence.connected() == [b"c:topics:room", b"c:rooms:hall"]
    assert presence.channels == {b"c:topics:room": ROOM, b"c:rooms:hall": HALL}
    presence.clear_cache()
    assert presence.cache == {}


def test_a_lost_connection_forgets_its_state_but_not_this_nodes_counts():
    presence = state()
    presence.set_local(ROOM, 1)
    drive(presence.write(), reads({}))
    presence.patches[HALL] = {"b": 1}
    presence.early[ROOM] = {"b": 2}
    presence.disconnected()
    assert presence.channels == {} and presence.cache == {}
    assert presence.patches == {} and presence.early == {}
    assert presence.local == {ROOM: 1} and presence.asserted == {ROOM}


# --- notices of the other nodes ---


def cached(presence: PresenceState, key: Key, counts: dict[str, int]) -> None:
    presence.cache[key] = Remote(dict(counts), 100.0)


def test_a_notice_patches_the_cached_count():
    presence = state()
    cached(presence, ROOM, {"b": 1})
    presence.on_notice(notice("b", ROOM, 4))
    presence.on_notice(notice("c", ROOM, 1))
    assert presence.cache[ROOM].counts == {"b": 4, "c": 1}
    assert presence.cache[ROOM].total == 5
    presence.on_notice(notice("b", ROOM, 0))
    assert presence.cache[ROOM].counts == {"c": 1}


def test_this_nodes_own_notices_teach_nothing():
    presence = state()
    cached(presence, ROOM, {})
    presence.on_notice(notice("a", ROOM, 4))
    presence.on_notice(b'[ "a","topics","room",4]')  # its own, differently spelled
    presence.on_notice(b'["a",' + b"anything")  # not even parsed
    assert presence.cache[ROOM].counts == {}


def test_a_stopped_node_is_dropped_everywhere():
    presence = state()
    cached(presence, ROOM, {"b": 1, "c": 2})
    cached(presence, HALL, {"b": 3})
    presence.patches[("topics", "x")] = {"c": 1}
    presence.on_notice(stopped_notice("b"))
    assert presence.cache[ROOM].counts == {"c": 2} and presence.cache[HALL].counts == {}
    assert presence.patches == {("topics", "x"): {"c": 1, "b": 0}}


def test_a_notice_crossing_a_read_is_kept_for_it():
    presence = state()
    presence.patches[ROOM] = {}
    presence.on_notice(notice("b", ROOM, 2))
    assert presence.patches[ROOM] == {"b": 2} and presence.early == {}


def test_a_notice_for_a_local_topic_not_read_yet_waits_for_its_first_read():
    presence = state()
    presence.set_local(ROOM, 1)
    presence.on_notice(notice("b", ROOM, 2))
    assert presence.early == {ROOM: {"b": 2}}
    presence.on_notice(notice("c", HALL, 2))  # not local, not cached: nothing to learn
    assert presence.early == {ROOM: {"b": 2}} and presence.cache == {}


def test_a_malformed_notice_raises():
    with pytest.raises(MalformedNotice, match=r"^presence notice is not JSON$"):
        state().on_notice(b"nope")


# --- reads ---


def test_a_sweep_reads_in_batches_of_sweep_batch():
    presence = state()
    keys = [("topics", f"t{i}") for i in range(SWEEP_BATCH + 1)]
    ops, _ = drive(presence.read(keys), reads({}))
    assert [len(op.names) for op in ops] == [SWEEP_BATCH, 1]
    assert SWEEP_BATCH == 256
    assert ops[1] == ReadCountsOp([f"k:topics:t{SWEEP_BATCH}"])
    assert len(presence.cache) == SWEEP_BATCH + 1 and presence.patches == {}


def test_a_read_leaves_the_topics_with_a_read_in_flight_to_it():
    presence = state()
    presence.patches[ROOM] = {}
    ops, _ = drive(presence.read([ROOM, HALL]), reads({}))
    assert ops == [ReadCountsOp(["k:rooms:hall"])]
    ops, _ = drive(presence.read([ROOM]), reads({}))
    assert ops == [] and presence.patches == {ROOM: {}}


def test_notices_before_and_during_a_read_are_applied_on_top_of_it():
    presence = state()
    presence.set_local(ROOM, 1)
    presence.on_notice(notice("b", ROOM, 7))  # early: before the read
    steps = presence.read([ROOM])
    assert steps.send(None) == ReadCountsOp(["k:topics:room"])
    assert presence.patches == {ROOM: {"b": 7}} and presence.early == {}
    presence.on_notice(notice("c", ROOM, 0))  # during the read
    presence.on_notice(notice("d", ROOM, 1))
    with pytest.raises(StopIteration):
        steps.send(([{"b": 1, "c": 5}], 50.0))
    assert presence.cache[ROOM] == Remote({"b": 7, "d": 1}, 52.0)
    assert presence.patches == {}


def test_a_failed_read_drops_what_it_kept_and_raises():
    presence = state()
    steps = presence.read([ROOM, HALL])
    steps.send(None)
    assert presence.patches == {ROOM: {}, HALL: {}}
    with pytest.raises(ConnectionError, match=r"^gone$"):
        steps.throw(ConnectionError("gone"))
    assert presence.patches == {} and presence.cache == {}


def test_one_topics_read_takes_the_early_notices_and_answers_its_entry():
    presence = state(cache_ttl=1.5)
    presence.early[ROOM] = {"b": 2, "c": 0}
    ops, entry = drive(presence.read_one(ROOM), reads({"k:topics:room": {"c": 1}}, now=3.0))
    assert ops == [ReadCountsOp(["k:topics:room"])]
    assert entry == Remote({"b": 2}, 4.5) and presence.cache[ROOM] is entry
    assert presence.patches == {} and presence.early == {}


def test_one_topics_read_shares_the_notices_kept_for_a_read_in_flight():
    presence = state()
    presence.patches[ROOM] = {"c": 3}
    steps = presence.read_one(ROOM)
    steps.send(None)
    assert presence.patches == {ROOM: {"c": 3}}
    with pytest.raises(StopIteration) as stop:
        steps.send(([{"b": 1}], 0.0))
    assert stop.value.value == Remote({"b": 1, "c": 3}, 2.0)


def test_one_topics_failed_read_drops_what_it_kept():
    presence = state()
    steps = presence.read_one(ROOM)
    steps.send(None)
    with pytest.raises(ValueError, match="not enough values"):
        steps.send(([], 0.0))  # an answer of the wrong shape fails the read
    assert presence.patches == {}
    steps = presence.read_one(ROOM)
    steps.send(None)
    with pytest.raises(ConnectionError):
        steps.throw(ConnectionError())
    assert presence.patches == {}


# --- the cache ---


def test_a_read_without_a_read_in_flight_takes_the_early_notices():
    presence = state()
    presence.early[ROOM] = {"b": 2, "c": 0}
    entry = presence.store(ROOM, {"c": 1, "d": 1}, 0.0)
    assert entry.counts == {"b": 2, "d": 1}
    assert presence.early == {}


def test_the_cache_holds_cache_max_topics_then_drops_the_expired_ones_first():
    presence = state(cache_ttl=10.0, cache_max=3)
    presence.store(("t", "1"), {}, 0.0)  # expires at 10
    presence.store(("t", "2"), {}, 5.0)  # expires at 15
    presence.store(("t", "3"), {}, 0.0)  # expires at 10
    assert list(presence.cache) == [("t", "1"), ("t", "2"), ("t", "3")]
    presence.store(("t", "2"), {"b": 1}, 6.0)  # at the limit, an entry already cached
    assert len(presence.cache) == 3
    presence.store(("t", "4"), {}, 10.0)  # one more: the expired ones go
    assert list(presence.cache) == [("t", "2"), ("t", "4")]


def test_the_cache_drops_the_oldest_when_none_has_expired():
    presence = state(cache_ttl=10.0, cache_max=2)
    presence.store(("t", "1"), {}, 0.0)
    presence.store(("t", "2"), {}, 0.0)
    presence.store(("t", "3"), {}, 9.0)
    assert list(presence.cache) == [("t", "2"), ("t", "3")]
    assert CACHE_MAX == 65536


def test_nobody_else_needs_a_fresh_entry_with_no_counts():
    presence = state()
    assert presence.nobody_else(ROOM, 0.0) is False
    presence.cache[ROOM] = Remote({}, 10.0)
    assert presence.nobody_else(ROOM, 9.99) is True
    assert presence.nobody_else(ROOM, 10.0) is False  # expired
    presence.cache[ROOM] = Remote({"b": 1}, 10.0)
    assert presence.nobody_else(ROOM, 0.0) is False
