"""The cluster bus without I/O (core/bus.py): the origin envelope, the outbox and its bounds,
the publish latency histogram and the reconnect schedule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polysignal.core.bus import (
    BACKOFF_BASE,
    LATENCY_BUCKETS,
    MAX_BATCH,
    OUTBOX_MAX_ITEMS,
    PUBLISH_SAMPLE,
    SYNC_KIND,
    Backoff,
    Direct,
    Envelope,
    LatencyHistogram,
    MalformedEnvelope,
    Outbox,
    Outgoing,
    Retry,
    head,
    split_head,
)

TEXT = st.text(max_size=40)
KEY = ("topics", "room")

# --- the envelope ---


def test_a_field_is_its_byte_length_a_colon_and_its_utf8():
    assert head("") == b"0:"
    assert head("node-1") == b"6:node-1"
    assert head("é") == b"2:\xc3\xa9"


def test_split_head_answers_the_field_and_the_offset_after_it():
    assert split_head(b"3:abcrest") == ("abc", 5)
    assert split_head(b"1:a2:bc", 3) == ("bc", 7)
    assert split_head(b"0:") == ("", 2)


@pytest.mark.parametrize(
    ("data", "start", "error"),
    [
        (b"", 0, "no field length at byte 0"),
        (b"abc", 0, "no field length at byte 0"),
        (b"1:a", 3, "no field length at byte 3"),
        (b"12345678901:x", 0, "no field length at byte 0"),
        (b":x", 0, "field length b'' at byte 0 is not a number"),
        (b"-1:x", 0, "field length b'-1' at byte 0 is not a number"),
        (b" 1:x", 0, "field length b' 1' at byte 0 is not a number"),
        (b"1_0:x", 0, "field length b'1_0' at byte 0 is not a number"),
        (b"5:abc", 0, "field at byte 0 is 2 bytes short"),
        (b"xx4:abc", 2, "field at byte 2 is 1 bytes short"),
        (b"1:\xff", 0, "field at byte 0 is not UTF-8"),
    ],
)
def test_every_broken_field_is_refused_with_what_is_wrong(data, start, error):
    with pytest.raises(MalformedEnvelope) as caught:
        split_head(data, start)
    assert str(caught.value) == error


def test_a_field_length_of_ten_digits_is_read_and_eleven_are_refused():
    with pytest.raises(MalformedEnvelope, match=r"^field at byte 0 is 1234567888 bytes short$"):
        split_head(b"1234567890:" + b"x" * 2)
    with pytest.raises(MalformedEnvelope, match=r"^no field length at byte 0$"):
        split_head(b"12345678901:" + b"x" * 2)


def test_a_field_that_ends_exactly_at_the_end_is_whole():
    assert split_head(b"3:abc") == ("abc", 5)


@given(TEXT, st.binary(max_size=40))
def test_any_text_comes_back_from_its_field(text, rest):
    data = head(text) + rest
    assert split_head(data) == (text, len(head(text)))


def test_a_node_puts_its_origin_on_direct_messages_and_sync_markers():
    envelope = Envelope("a")
    assert envelope.origin == b"1:a"
    assert envelope.direct("kind", b"payload") == b"1:a4:kindpayload"
    assert envelope.sync_marker("7") == b"1:a15:polysignal.sync7"


def test_a_topic_message_gives_its_frame_and_an_echo_nothing():
    envelope = Envelope("a")
    assert envelope.topic_frame(b"1:bframe") == b"frame"
    assert envelope.topic_frame(b"1:aframe") is None
    assert envelope.topic_frame(b"2:abframe") == b"frame"  # node "ab" is not node "a"
    assert envelope.topic_frame(b"1:b") == b""
    assert envelope.topic_frame(b"1:\xffframe") == b"frame"  # only the framing is checked


def test_a_topic_message_without_an_origin_is_refused():
    with pytest.raises(MalformedEnvelope, match=r"^no field length at byte 0$"):
        Envelope("a").topic_frame(b"frame")
    with pytest.raises(MalformedEnvelope, match=r"^field at byte 0 is 5 bytes short$"):
        Envelope("a").topic_frame(b"9:bcde")


@given(TEXT, TEXT, st.binary(max_size=40))
def test_another_nodes_topic_frame_is_never_taken_for_an_echo(own, other, frame):
    envelope = Envelope(own)
    expected = None if own == other else frame
    assert envelope.topic_frame(head(other) + frame) == expected


def test_a_direct_message_opens_into_origin_kind_and_payload():
    assert Envelope("a").open_direct(b"1:b4:kindrest") == Direct("b", "kind", b"rest")
    assert Envelope("a").open_direct(b"1:b0:") == Direct("b", "", b"")


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"1:b", "no field length at byte 3"),
        (b"1:b4:ki", "field at byte 3 is 2 bytes short"),
        (b"x", "no field length at byte 0"),
        (b"1:b2:\xff\xfe", "field at byte 3 is not UTF-8"),
    ],
)
def test_a_broken_direct_message_is_refused(data, error):
    with pytest.raises(MalformedEnvelope) as caught:
        Envelope("a").open_direct(data)
    assert str(caught.value) == error


@given(TEXT, TEXT, st.binary(max_size=40))
def test_any_direct_message_opens_as_it_was_made(origin, kind, payload):
    data = Envelope(origin).direct(kind, payload)
    assert Envelope("x").open_direct(data) == Direct(origin, kind, payload)


def test_only_this_nodes_own_sync_marker_has_a_token():
    envelope = Envelope("a")
    assert envelope.sync_token(envelope.open_direct(envelope.sync_marker("12"))) == "12"
    assert envelope.sync_token(Direct("b", SYNC_KIND, b"12")) is None
    assert envelope.sync_token(Direct("a", "stream.data", b"12")) is None
    with pytest.raises(MalformedEnvelope, match=r"^sync token is not UTF-8$"):
        envelope.sync_token(Direct("a", SYNC_KIND, b"\xff"))


# --- the outbox ---


class Clock:
    """A fake monotonic clock that counts its reads."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def nobody(topic: tuple[str, str], now: float) -> bool:
    return False


def test_the_outbox_is_full_at_exactly_max_items_entries():
    outbox: Outbox[str] = Outbox(1 << 20, Clock(), max_items=4)
    assert [outbox.put(Outgoing(b"c", b"x")) for _ in range(3)] == [False, False, False]
    assert outbox.put(Outgoing(b"c", b"x")) is True
    assert outbox.put(Outgoing(b"c", b"x")) is True
    assert len(outbox) == 5 and outbox.size == 5


def test_the_outbox_is_full_at_exactly_max_bytes():
    outbox: Outbox[str] = Outbox(100, Clock())
    assert outbox.put(Outgoing(b"c", b"x" * 99)) is False
    assert outbox.put(Outgoing(b"c", b"x")) is True
    assert outbox.size == 100


def test_the_outbox_defaults_and_bounds():
    outbox: Outbox[str] = Outbox(0, Clock())
    assert outbox.max_bytes == 1 and outbox.max_items == OUTBOX_MAX_ITEMS == 65536
    assert outbox.put(Outgoing(None, b"")) is False  # a marker weighs nothing
    assert outbox.put(Outgoing(b"c", b"x")) is True


def test_room_returns_below_half_of_both_marks():
    outbox: Outbox[str] = Outbox(100, Clock(), max_items=4)
    assert outbox.has_room
    outbox.put(Outgoing(b"c", b"x" * 49))
    assert outbox.has_room  # 1 entry, 49 bytes: below 2 and 50
    outbox.put(Outgoing(b"c", b""))
    assert not outbox.has_room  # 2 entries: half of 4
    outbox: Outbox[str] = Outbox(100, Clock(), max_items=4)
    outbox.put(Outgoing(b"c", b"x" * 50))
    assert not outbox.has_room  # 50 bytes: half of 100


def test_one_publish_in_publish_sample_reads_the_clock():
    clock = Clock(7.0)
    outbox: Outbox[str] = Outbox(1 << 20, clock)
    for _ in range(PUBLISH_SAMPLE - 1):
        outbox.publish(b"c", b"f", KEY)
    assert clock.reads == 0
    outbox.publish(b"c", b"f", KEY)
    assert clock.reads == 1
    batch = outbox.take(0.0, b"1:a", nobody)
    assert batch.sampled == [7.0]
    assert batch.payloads == [b"1:af"] * PUBLISH_SAMPLE
    assert PUBLISH_SAMPLE == 16


def test_publish_answers_whether_the_outbox_is_full():
    outbox: Outbox[str] = Outbox(3, Clock())
    assert outbox.publish(b"c", b"ab", KEY) is False
    assert outbox.publish(b"c", b"c", KEY) is True


def test_a_batch_carries_what_another_node_can_receive_with_the_origin_on_topic_frames():
    outbox: Outbox[str] = Outbox(1 << 20, Clock())
    asked: list[tuple[tuple[str, str], float]] = []

    def alone(topic: tuple[str, str], now: float) -> bool:
        asked.append((topic, now))
        return topic == ("topics", "lonely")

    outbox.put(Outgoing(b"t1", b"frame", None, KEY))
    outbox.put(Outgoing(b"t2", b"skipped", "skipped-waiter", ("topics", "lonely")))
    outbox.put(Outgoing(None, b"", "marker"))
    outbox.put(Outgoing(b"d", b"1:a1:kp", "direct"))
    outbox.put(Outgoing(b"t3", b"unsampled", None, ("topics", "lonely"), 5.0))
    batch = outbox.take(42.0, b"1:a", alone)
    assert batch.channels == [b"t1", b"d"]
    assert batch.payloads == [b"1:aframe", b"1:a1:kp"]
    assert batch.waiting == [("skipped-waiter", -1), ("marker", None), ("direct", 1)]
    assert batch.sampled == []
    assert batch.size == 5 + 7 + 0 + 7 + 9
    assert asked == [(KEY, 42.0), (("topics", "lonely"), 42.0), (("topics", "lonely"), 42.0)]
    assert len(outbox) == 0
    assert outbox.size == 28  # counted until the bus has them


def test_a_batch_takes_at_most_max_batch_entries_in_order():
    outbox: Outbox[str] = Outbox(1 << 20, Clock())
    for i in range(MAX_BATCH + 1):
        outbox.put(Outgoing(b"c", b"%d" % i))
    batch = outbox.take(0.0, b"", nobody)
    assert len(batch.channels) == MAX_BATCH == 1024
    assert batch.payloads[0] == b"0" and batch.payloads[-1] == b"1023"
    assert len(outbox) == 1
    assert outbox.take(0.0, b"", nobody).payloads == [b"1024"]


def test_written_counts_the_latency_frees_the_bytes_and_answers_each_waiter():
    clock = Clock(10.0)
    outbox: Outbox[str] = Outbox(1 << 20, clock)
    outbox.put(Outgoing(b"t", b"abc", "first", KEY, 9.75))
    outbox.put(Outgoing(b"t", b"x", "gone", KEY))
    outbox.put(Outgoing(b"d", b"yy", "got"))
    outbox.put(Outgoing(None, b"", "marker"))
    outbox.put(Outgoing(b"t", b"z", "left-out", ("topics", "lonely")))
    batch = outbox.take(0.0, b"", lambda topic, now: topic != KEY)
    outbox.put(Outgoing(b"t", b"later"))
    assert outbox.size == 3 + 1 + 2 + 1 + 5
    answers = outbox.written(batch, [1, 0, 2])
    assert answers == [
        ("first", True),  # one subscriber got it
        ("gone", False),
        ("got", True),
        ("marker", None),
        ("left-out", False),
    ]
    assert outbox.latency.count == 1 and outbox.latency.total == 0.25
    assert clock.reads == 1
    assert outbox.size == 5  # "later" is still queued


def test_written_reads_no_clock_without_a_sampled_publish():
    clock = Clock()
    outbox: Outbox[str] = Outbox(1 << 20, clock)
    outbox.put(Outgoing(b"t", b"abc"))
    outbox.written(outbox.take(0.0, b"", nobody), [1])
    assert clock.reads == 0 and outbox.latency.count == 0 and outbox.size == 0


def test_clear_drops_the_publishes_and_hands_back_the_waiters():
    outbox: Outbox[str] = Outbox(1 << 20, Clock())
    outbox.put(Outgoing(b"t", b"abc", None, KEY))
    outbox.put(Outgoing(None, b"", "marker"))
    outbox.put(Outgoing(b"d", b"xy", "direct"))
    outbox.put(Outgoing(b"d", b"sync"))
    assert outbox.clear() == (2, [("marker", True), ("direct", False)])
    assert len(outbox) == 0 and outbox.size == 0 and outbox.dropped == 2
    assert outbox.clear() == (0, [])
    assert outbox.dropped == 2


def test_a_dropped_publish_is_reported_once_per_outage():
    outbox: Outbox[str] = Outbox(1 << 20, Clock())
    assert [outbox.drop(), outbox.drop(), outbox.drop()] == [True, False, False]
    outbox.reconnected()
    assert [outbox.drop(), outbox.drop()] == [True, False]
    assert outbox.dropped == 5


# --- the latency histogram ---


def test_the_buckets_are_the_ones_metrics_exports():
    assert LATENCY_BUCKETS == (
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5
    )  # fmt: skip


def test_a_duration_counts_in_the_first_bucket_it_fits_at_most():
    histogram = LatencyHistogram()
    assert histogram.bounds == LATENCY_BUCKETS and len(histogram.counts) == 15
    histogram.observe(0.0)
    histogram.observe(0.0001)  # exactly the first bound
    histogram.observe(0.00010001)
    histogram.observe(2.5)
    histogram.observe(2.6)  # above every bound
    assert histogram.counts == [2, 1] + [0] * 11 + [1, 1]
    assert histogram.count == 5
    assert histogram.total == pytest.approx(5.10020001)


def test_a_histogram_takes_its_own_bounds():
    histogram = LatencyHistogram((1.0, 2.0))
    histogram.observe(1.5)
    assert histogram.counts == [0, 1, 0]


# --- reconnecting ---


def test_the_backoff_doubles_up_to_its_cap():
    backoff = Backoff(0.5, lambda low, high: high)
    delays = [backoff.next().delay for _ in range(5)]
    assert delays == [0.2, 0.4, 0.5, 0.5, 0.5]
    assert BACKOFF_BASE == 0.2


def test_the_backoff_is_jittered_down_to_half():
    asked: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        asked.append((low, high))
        return low

    backoff = Backoff(10.0, uniform)
    assert [backoff.next().delay for _ in range(3)] == [0.1, 0.2, 0.4]
    assert asked == [(0.5, 1.0)] * 3


def test_retries_1_2_3_5_9_17_are_logged_loudly():
    backoff = Backoff(1.0, lambda low, high: high)
    retries = [backoff.next() for _ in range(17)]
    assert [r.number for r in retries if r.loud] == [1, 2, 3, 5, 9, 17]
    assert retries[0] == Retry(1, 0.2, True)
    assert retries[3] == Retry(4, 1.0, False)


def test_a_reset_starts_from_the_base_again_and_the_cap_is_at_least_the_base():
    backoff = Backoff(0.1, lambda low, high: high)
    assert backoff.cap == BACKOFF_BASE
    backoff.next()
    backoff.next()
    assert backoff.attempt == 2
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next() == Retry(1, 0.2, True)


def test_a_long_outage_stays_at_the_cap():
    backoff = Backoff(3.0, lambda low, high: high)
    backoff.attempt = 10**6
    assert backoff.next().delay == 3.0


def test_the_doubling_stops_at_two_to_the_thirtieth():
    backoff = Backoff(1e12, lambda low, high: high)
    backoff.attempt = 10**6
    assert backoff.next().delay == BACKOFF_BASE * 2**30
