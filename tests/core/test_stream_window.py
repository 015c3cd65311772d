"""Streams without I/O (core/stream.py): the queue and its bound, batches, the credit window,
closing and ending, and the three messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polysignal.core.errors import MalformedFrame
from polysignal.core.stream import (
    ACK,
    BATCH_BYTES,
    CLOSE,
    DATA,
    INVALID,
    Data,
    StreamLimits,
    StreamState,
    ack_message,
    close_message,
    data_message,
    parse_ack,
    parse_close,
    parse_data,
)

LIMITS = StreamLimits.of(window=100, outbox_bytes=40, batch_bytes=20)


def test_the_window_is_at_least_one_batch():
    assert StreamLimits.of(100, 40, 20) == StreamLimits(100, 40, 20)
    assert StreamLimits.of(10, 40, 20).window == 20
    assert StreamLimits.of(10, 40).window == BATCH_BYTES == 64 * 1024
    assert (DATA, ACK, CLOSE) == ("stream.data", "stream.ack", "stream.close")


def test_a_frame_is_queued_and_full_past_outbox_bytes():
    stream = StreamState()
    assert stream.push(1, b"x" * 39, LIMITS) is False
    assert stream.push(2, b"x", LIMITS) is False  # exactly outbox_bytes
    assert stream.push(2, b"x", LIMITS) is True  # one more
    assert stream.queued == 41 and stream.sending


def test_an_outbox_bound_of_zero_never_asks_the_writer_to_wait():
    stream = StreamState()
    assert stream.push(2, b"x" * 10**6, StreamLimits.of(100, 0, 20)) is False


def test_nothing_is_queued_once_closing_or_ended():
    stream = StreamState()
    assert stream.start_closing() is True
    assert stream.push(1, b"x", LIMITS) is None
    ended = StreamState()
    ended.end()
    assert ended.push(1, b"x", LIMITS) is None
    assert stream.queued == 0 and ended.queued == 0


def test_a_batch_fills_up_to_batch_bytes():
    stream = StreamState()
    for size in (5, 15, 1):
        stream.push(2, b"x" * size, LIMITS)
    frames, size, _ = stream.next_batch(LIMITS)
    assert frames == [(2, b"x" * 5), (2, b"x" * 15)] and size == 20  # exactly batch_bytes
    frames, size, _ = stream.next_batch(LIMITS)
    assert frames == [(2, b"x")] and size == 1
    assert not stream.sending and stream.queued == 0


def test_a_frame_one_byte_past_the_batch_goes_in_the_next():
    stream = StreamState()
    stream.push(1, b"x" * 10, LIMITS)
    stream.push(1, b"y" * 11, LIMITS)
    assert stream.next_batch(LIMITS)[0] == [(1, b"x" * 10)]
    assert stream.next_batch(LIMITS)[0] == [(1, b"y" * 11)]


def test_a_frame_larger_than_a_batch_goes_alone():
    stream = StreamState()
    stream.push(2, b"x" * 50, LIMITS)
    stream.push(2, b"y", LIMITS)
    frames, size, _ = stream.next_batch(LIMITS)
    assert frames == [(2, b"x" * 50)] and size == 50
    assert stream.queued == 1


def test_room_returns_at_half_the_outbox_bound():
    stream = StreamState()
    for _ in range(3):
        stream.push(2, b"x" * 20, LIMITS)  # 60 queued
    assert stream.next_batch(LIMITS)[2] is False  # 40 left: above 20
    stream.push(2, b"x", LIMITS)
    assert stream.next_batch(LIMITS)[2] is False  # 21 left
    assert stream.next_batch(LIMITS)[2] is True  # 1 left
    assert stream.queued == 1
    exactly = StreamState()
    for _ in range(2):
        exactly.push(2, b"x" * 20, LIMITS)
    assert exactly.next_batch(LIMITS)[2] is True  # 20 left: exactly half


def test_the_window_blocks_once_more_would_pass_it():
    stream = StreamState()
    assert stream.blocked(1000, LIMITS) is False  # nothing on its way: the first batch goes
    stream.sent(60)
    assert stream.blocked(40, LIMITS) is False  # exactly the window
    assert stream.blocked(41, LIMITS) is True  # one more
    stream.acknowledged(1)
    assert stream.unacked == 59 and stream.blocked(41, LIMITS) is False
    stream.end()
    stream.sent(100)
    assert stream.blocked(100, LIMITS) is False  # ended: nothing to wait for


def test_an_acknowledgement_never_takes_the_count_below_zero():
    stream = StreamState()
    stream.sent(10)
    stream.acknowledged(25)
    assert stream.unacked == 0


def test_closing_starts_once_and_finishes_once_the_queue_is_sent():
    stream = StreamState()
    assert stream.finish() is False  # not closing
    stream.push(1, b"last", LIMITS)
    assert stream.start_closing() is True
    assert stream.start_closing() is False
    assert stream.sending  # what is queued still goes
    stream.next_batch(LIMITS)
    assert stream.finish() is True and stream.ended
    assert stream.finish() is False


def test_an_ended_stream_does_not_start_closing():
    stream = StreamState()
    stream.end()
    assert stream.start_closing() is False and not stream.closing


def test_ending_drops_the_queue_once():
    stream = StreamState()
    stream.push(1, b"abc", LIMITS)
    assert stream.end() is True
    assert stream.ended and stream.queued == 0 and not stream.sending
    assert stream.end() is False
    closing = StreamState()
    closing.start_closing()
    assert closing.end() is True and closing.finish() is False


# --- messages ---


FRAMES = st.lists(st.tuples(st.integers(0, 15), st.binary(max_size=30)), max_size=8)


@given(st.text(max_size=20), st.text(max_size=20), FRAMES)
def test_a_data_message_parses_back(to, sender, frames):
    message = parse_data(data_message(to, sender, frames))
    assert message == Data(to, sender, frames, sum(len(data) for _, data in frames))


@given(st.text(max_size=20), st.integers(0, 2**63 - 1))
def test_an_ack_parses_back(to, size):
    assert parse_ack(ack_message(to, size)) == (to, size)


@given(st.text(max_size=20))
def test_a_close_parses_back(to):
    assert parse_close(close_message(to)) == to


def test_the_messages_are_msgpack_arrays():
    assert data_message("x", "y", [(1, b"a")]) == b"\x93\xa1x\xa1y\x92\x01\xc4\x01a"
    assert ack_message("x", 5) == b"\x92\xa1x\x05"
    assert close_message("x") == b"\x91\xa1x"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        b"\x90",  # not three items
        b"\x93\x01\xa1y\x90",  # stream not a string
        b"\x93\xa1x\x01\x90",  # sender not a string
        b"\x93\xa1x\xa1y\x01",  # frames not a list
        b"\x93\xa1x\xa1y\x91\x01",  # an opcode without its payload
        b"\x93\xa1x\xa1y\x92\xa1a\xc4\x00",  # an opcode that is not a number
        b"\x93\xa1x\xa1y\x92\x01\xa1a",  # a payload that is not bytes
        b"\x81\xa1x\xa1y",  # a map
    ],
)
def test_a_malformed_data_message_is_refused(payload):
    with pytest.raises(MalformedFrame) as caught:
        parse_data(payload)
    assert str(caught.value) == INVALID == "invalid stream message"


@pytest.mark.parametrize(
    "payload",
    [b"\x92\xa1x\xa1y", b"\x92\x01\x02", b"\x92\xa1x\xff", b"\x91\xa1x", b"\xc1"],
)
def test_a_malformed_ack_is_refused(payload):
    with pytest.raises(MalformedFrame, match=r"^invalid stream message$"):
        parse_ack(payload)


def test_an_ack_of_zero_bytes_is_accepted():
    assert parse_ack(b"\x92\xa1x\x00") == ("x", 0)


@pytest.mark.parametrize("payload", [b"\x91\x01", b"\x90", b"\x92\xa1x\xa1y"])
def test_a_malformed_close_is_refused(payload):
    with pytest.raises(MalformedFrame, match=r"^invalid stream message$"):
        parse_close(payload)
