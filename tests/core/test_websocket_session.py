"""A WebSocket session with no I/O (core/websocket.py), driven by bytes: what reaches the driver,
what is written, when, and how the closing handshake ends."""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

import pytest

from polysignal.core.dispatch import Dispatch
from polysignal.core.websocket import (
    CLOSE_GRACE,
    EMPTY_CLOSE,
    FAIL_GRACE,
    NO_STATUS,
    SLOW_GRACE,
    WRITE_THROUGH_BYTES,
    Session,
    answer_close,
)
from polysignal.protocols.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    TOO_LARGE,
    build_frame,
    close_frame,
    frame_header,
)

from rawws import frame

W = WRITE_THROUGH_BYTES


class Wire:
    """The transport, as a session sees it: only whether it is closing."""

    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class Batch:
    """Records the sessions that asked to be flushed at the end of the iteration."""

    def __init__(self) -> None:
        self.added: list[Session] = []

    def add(self, session: Session) -> None:
        self.added.append(session)


class Driver(Dispatch[Any]):
    """Records each data message; ``then`` runs after one, as a handler's effect would."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[bytes, bool]] = []
        self.then: Any = None

    def handle(self, conn: Any, data: bytes, binary: bool) -> None:
        self.messages.append((data, binary))
        if self.then is not None:
            self.then(conn)


class Peer(Session):
    """A session whose I/O is a list of effects; ``unsent`` is the transport's buffer."""

    def __init__(self, max_frame: int = 1024, max_buffer: int = 4096) -> None:
        self.effects: list[tuple[Any, ...]] = []
        self.unsent = 0
        self.wire = Wire()
        self.batch = Batch()
        self.recorder = Driver()
        super().__init__(self.recorder, self.wire, self.batch, max_frame, max_buffer, 0.0, 1, 0.0)

    def _write(self, data: bytes, frames: int) -> bool:
        self.effects.append(("write", data))
        return self._wrote(len(data), frames, self.unsent)

    def _write_parts(self, header: bytes, payload: bytes) -> bool:
        self.effects.append(("writelines", header, payload))
        return self._wrote(len(header) + len(payload), 1, self.unsent)

    def _write_close(self, frame: bytes, grace: float) -> None:
        self.effects.append(("close", frame, grace))

    def _end(self, last: bytes = b"") -> None:
        self.effects.append(("end", last))

    def _not_reading(self) -> None:
        self.effects.append(("not reading",))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return frame(struct.pack("!H", code) + reason, OP_CLOSE)


# --- input ---


def test_a_new_session_is_open_and_idle():
    peer = Peer()
    assert (peer.closing, peer.lost, peer.alive, peer.busy) == (False, False, True, False)
    assert (peer.close_code, peer.held, peer.max_frame, peer.max_buffer) == (None, None, 1024, 4096)


def test_data_messages_reach_the_driver_in_order_and_are_counted():
    peer = Peer()
    peer.alive = False
    data = frame(b"one") + frame(b"\x00\xff", OP_BINARY) + frame(b"three")
    peer.receive_data(data)
    assert peer.recorder.messages == [(b"one", False), (b"\x00\xff", True), (b"three", False)]
    assert peer.recorder.bytes_in == len(data)
    assert peer.alive is True
    assert peer.effects == []


def test_a_frame_split_at_every_byte_is_read_once_whole():
    peer = Peer()
    data = frame(b"x" * 300)
    for index in range(len(data) - 1):
        peer.receive_data(data[index : index + 1])
        assert peer.recorder.messages == []
    peer.receive_data(data[-1:])
    assert peer.recorder.messages == [(b"x" * 300, False)]
    peer.receive_data(frame(b"again"))  # nothing of the first frame is read twice
    assert peer.recorder.messages == [(b"x" * 300, False), (b"again", False)]
    assert peer.recorder.bytes_in == len(data) + 11


def test_a_partial_header_waits_for_the_bytes_it_needs():
    peer = Peer()
    data = frame(b"y" * 200) + frame(b"next")
    peer.receive_data(data[:3])  # two bytes of header and one of the 16-bit length
    peer.receive_data(data[3:8])
    assert peer.recorder.messages == []
    peer.receive_data(data[8:])
    assert peer.recorder.messages == [(b"y" * 200, False), (b"next", False)]


def test_fragments_across_chunk_boundaries_make_one_message():
    peer = Peer()
    data = (
        frame(b"he", fin=False)
        + frame(b"ll", OP_CONTINUATION, fin=False)
        + frame(b"o", OP_CONTINUATION)
    )
    peer.receive_data(data[:9])
    peer.receive_data(data[9:15])
    assert peer.recorder.messages == []
    peer.receive_data(data[15:])
    assert peer.recorder.messages == [(b"hello", False)]


def test_a_ping_between_fragments_is_answered_and_the_message_follows():
    peer = Peer()
    peer.receive_data(
        frame(b"{", fin=False) + frame(b"abc", OP_PING) + frame(b"}", OP_CONTINUATION)
    )
    assert peer.recorder.messages == [(b"{}", False)]
    assert peer.recorder.control_out == 1
    assert peer.batch.added == [peer]
    peer.flush()
    assert peer.effects == [("write", build_frame(b"abc", OP_PONG))]
    assert (peer.recorder.frames_out, peer.recorder.bytes_out) == (1, 5)


def test_a_pong_from_the_peer_is_ignored():
    peer = Peer()
    peer.receive_data(frame(b"unsolicited", OP_PONG) + frame(b"m"))
    assert peer.recorder.messages == [(b"m", False)]
    assert (peer.recorder.control_out, peer.batch.added, peer.effects) == (0, [], [])


def test_reading_stops_when_a_message_ends_the_transport():
    peer = Peer()
    peer.recorder.then = lambda conn: conn.transport_gone()
    peer.receive_data(frame(b"first") + frame(b"p", OP_PING) + close_payload(1000))
    assert peer.recorder.messages == [(b"first", False)]
    assert (peer.lost, peer.recorder.control_out, peer.effects) == (True, 0, [])


# --- a refused frame ---


def test_an_oversize_frame_is_refused_from_its_header_and_its_bytes_skipped_across_chunks():
    peer = Peer(max_frame=16)
    big = frame(b"x" * 17)  # 2 + 4 + 17 bytes
    refused = [("close", close_frame(1009, TOO_LARGE), FAIL_GRACE)]
    peer.receive_data(big[:6])
    assert peer.effects == refused
    assert peer.close_code == 1009
    peer.receive_data(big[6:16])  # 10 of the 17 bytes to skip
    peer.receive_data(big[16:])  # exactly the 7 left: nothing is read
    peer.receive_data(frame(b"ok"))  # read as a frame: not handled, since closing
    assert (peer.recorder.messages, peer.effects) == ([], refused)
    peer.receive_data(close_payload(1009))  # the peer's answer
    assert peer.effects == [*refused, ("end", b"")]


def test_the_bytes_after_a_skipped_frame_in_the_same_chunk_are_read():
    peer = Peer(max_frame=16)
    big = frame(b"x" * 17)
    after = frame(b"ok")
    refused = [("close", close_frame(1009, TOO_LARGE), FAIL_GRACE)]
    peer.receive_data(big[:6])
    peer.receive_data(big[6:] + after[:1])  # one byte past the skip: kept
    peer.receive_data(after[1:])
    assert (peer.recorder.messages, peer.effects) == ([], refused)
    peer.receive_data(close_payload(1009))
    assert peer.effects == [*refused, ("end", b"")]


def test_an_oversize_frame_whose_payload_came_with_it_skips_nothing_more():
    peer = Peer(max_frame=16)
    peer.receive_data(frame(b"x" * 17) + frame(b"ok"))
    peer.receive_data(frame(b"ok"))
    assert peer.effects == [("close", close_frame(1009, TOO_LARGE), FAIL_GRACE)]
    peer.receive_data(close_payload(1000))
    assert peer.effects == [("close", close_frame(1009, TOO_LARGE), FAIL_GRACE), ("end", b"")]


# --- framing errors ---


@pytest.mark.parametrize(
    ("bad", "code", "reason"),
    [
        (frame(b"x", mask=None), 1002, "frames from a client must be masked"),
        (frame(b"x", rsv=4), 1002, "reserved bits must be 0"),
        (frame(b"x", OP_CONTINUATION), 1002, "continuation frame without a message to continue"),
        (frame(b"\xc3\x28"), 1007, "invalid UTF-8 in a text message"),
    ],
)
def test_a_framing_error_closes_with_its_code_after_the_messages_before_it(bad, code, reason):
    peer = Peer()
    peer.receive_data(frame(b"ok") + bad + frame(b"after"))
    assert peer.recorder.messages == [(b"ok", False)]
    assert peer.effects == [("close", close_frame(code, reason), FAIL_GRACE)]
    assert (peer.close_code, peer.closing) == (code, True)


def test_a_framing_error_drops_the_fragments_and_the_incomplete_frame():
    peer = Peer()
    peer.receive_data(frame(b"{", fin=False) + frame(b"{", fin=False))
    assert peer.effects == [("close", close_frame(1002, "expected a continuation frame"), 2.0)]
    peer.receive_data(frame(b"}", OP_CONTINUATION))  # nothing left to continue
    assert peer.recorder.messages == []
    assert peer.effects[1:] == [("end", b"")]  # a second error, after our close: TCP ends


def test_a_framing_error_after_our_close_ends_tcp():
    peer = Peer()
    peer.close(4001, "bye")
    peer.receive_data(frame(b"x", mask=None))
    assert peer.effects == [("close", close_frame(4001, "bye"), CLOSE_GRACE), ("end", b"")]
    assert peer.close_code == 4001


# --- the closing handshake ---


def test_nothing_after_the_peers_close_is_read():
    peer = Peer()
    peer.receive_data(close_payload(1000) + frame(b"p", OP_PING) + frame(b"x", mask=None))
    assert peer.effects == [("end", close_frame(1000))]
    assert peer.recorder.control_out == 0


def test_the_peers_close_is_answered_with_its_code_after_the_held_frames():
    peer = Peer()
    assert peer.send_text(b"last words")
    peer.receive_data(close_payload(4000, b"done here") + frame(b"after"))
    assert peer.effects == [
        ("write", build_frame(b"last words")),
        ("end", close_frame(4000)),
    ]
    assert (peer.close_code, peer.closing) == (4000, True)
    assert peer.recorder.messages == []


def test_an_empty_close_is_answered_with_an_empty_close_and_no_status():
    peer = Peer()
    peer.receive_data(frame(b"", OP_CLOSE))
    assert peer.effects == [("end", b"\x88\x00")]
    assert peer.close_code == NO_STATUS == 1005


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b"\x03", 1002, "close frame with a 1-byte payload"),
        (struct.pack("!H", 1005), 1002, "invalid close code 1005"),
        (struct.pack("!H", 999), 1002, "invalid close code 999"),
        (struct.pack("!H", 1000) + b"\xff", 1007, "invalid UTF-8 in a close reason"),
    ],
)
def test_a_malformed_close_is_answered_with_the_fault(payload, code, reason):
    peer = Peer()
    peer.receive_data(frame(payload, OP_CLOSE))
    assert peer.effects == [("end", close_frame(code, reason))]
    assert peer.close_code == code


def test_nothing_is_sent_after_the_answer_to_the_peers_close():
    peer = Peer()
    peer.receive_data(close_payload(1000))
    peer.close(1001)
    assert peer.send_frame(build_frame(b"late")) is False
    assert peer.effects == [("end", close_frame(1000))]
    assert peer.close_code == 1000


def test_our_close_waits_for_the_peers_answer_then_tcp_ends():
    peer = Peer()
    assert peer.send_text(b"queued")
    peer.close(4001, "bye")
    assert peer.effects == [
        ("write", build_frame(b"queued")),
        ("close", close_frame(4001, "bye"), CLOSE_GRACE),
    ]
    assert (peer.close_code, peer.closing) == (4001, True)
    peer.receive_data(frame(b"data after our close") + frame(b"p", OP_PING))
    assert peer.recorder.messages == []
    assert peer.batch.added == [peer]  # the queued frame's batch; no pong is held
    peer.receive_data(close_payload(1000))
    assert peer.effects[2:] == [("end", b"")]
    assert peer.close_code == 4001  # the code of the side that closed first


def test_close_defaults_to_1000_and_is_idempotent():
    peer = Peer()
    peer.close()
    peer.close(4000, "again")
    assert peer.effects == [("close", close_frame(1000), 5.0)]
    assert peer.close_code == 1000


def test_close_after_the_transport_is_gone_does_nothing():
    peer = Peer()
    assert peer.transport_gone() is True
    peer.close(1000)
    assert peer.effects == []
    assert peer.close_code is None


def test_writes_after_close_are_refused():
    peer = Peer()
    peer.close()
    assert peer.send_frame(build_frame(b"x")) is False
    assert peer.send_text("x") is False
    assert peer.send_binary(b"x") is False
    assert peer.send_message(b"x") is False
    assert peer.send_message(b"x" * W) is False
    assert peer.effects == [("close", close_frame(1000), CLOSE_GRACE)]
    assert peer.batch.added == []


# --- the transport's end ---


def test_the_transport_goes_once_and_frees_what_the_session_held():
    peer = Peer()
    assert peer.send_text(b"never sent")
    peer.receive_data(frame(b"{", fin=False) + frame(b"}", OP_CONTINUATION)[:3])
    assert peer.transport_gone() is True
    assert (peer.lost, peer.closing) == (True, True)
    assert (peer._pending, peer._buf, peer._fragments) == (None, None, None)
    assert peer.transport_gone() is False
    peer.flush()
    assert peer.effects == []


def test_a_closing_transport_refuses_sends_and_closes_the_session():
    peer = Peer()
    peer.wire.closing = True
    assert peer.send_frame(build_frame(b"x")) is False
    assert peer.closing is True
    peer.receive_data(frame(b"not handled"))
    assert peer.recorder.messages == []


def test_a_closing_transport_refuses_a_large_message():
    peer = Peer()
    peer.wire.closing = True
    assert peer.send_message(b"x" * W) is False
    assert (peer.closing, peer.effects) == (True, [])


def test_held_frames_are_dropped_when_the_transport_closed_meanwhile():
    peer = Peer()
    assert peer.send_text(b"a")
    peer.wire.closing = True
    peer.flush()
    assert peer.effects == []
    peer.wire.closing = False
    assert peer.send_text(b"b")  # a new batch
    assert peer.batch.added == [peer, peer]


# --- batching ---


def test_a_frame_one_byte_under_the_threshold_is_held_for_the_batch():
    peer = Peer(max_buffer=10 * W)
    data = b"x" * (W - 1)
    assert peer.send_frame(data) is True
    assert (peer.effects, peer.batch.added) == ([], [peer])
    peer.flush()
    assert peer.effects == [("write", data)]
    assert peer.effects[0][1] is data  # one frame: written as it is, not copied
    assert (peer.recorder.frames_out, peer.recorder.bytes_out) == (1, W - 1)


def test_a_frame_of_the_threshold_is_written_at_once():
    peer = Peer(max_buffer=10 * W)
    data = b"x" * W
    assert peer.send_frame(data) is True
    assert (peer.effects, peer.batch.added) == ([("write", data)], [])
    assert (peer.recorder.frames_out, peer.recorder.bytes_out) == (1, W)


def test_held_frames_one_byte_under_the_threshold_wait_for_the_batch():
    peer = Peer(max_buffer=10 * W)
    assert peer.send_frame(b"a" * 100)
    assert peer.send_frame(b"b" * 200)
    assert peer.send_frame(b"c" * (W - 301))
    assert peer.effects == []
    assert peer.batch.added == [peer]  # once per batch
    peer.flush()
    assert peer.effects == [("write", b"a" * 100 + b"b" * 200 + b"c" * (W - 301))]
    assert (peer.recorder.frames_out, peer.recorder.bytes_out) == (3, W - 1)
    peer.flush()  # nothing held: nothing written
    assert len(peer.effects) == 1


def test_held_frames_reaching_the_threshold_are_written_at_once():
    peer = Peer(max_buffer=10 * W)
    assert peer.send_frame(b"a" * 100)
    assert peer.send_frame(b"b" * (W - 100))
    assert peer.effects == [("write", b"a" * 100 + b"b" * (W - 100))]
    assert (peer.recorder.frames_out, peer.recorder.bytes_out) == (2, W)
    assert peer.send_frame(b"c")  # the next frame starts a new batch
    assert peer.batch.added == [peer, peer]


def test_a_small_message_is_framed_and_held():
    peer = Peer()
    assert peer.send_message(b"m" * (W - 1), OP_BINARY) is True
    peer.flush()
    assert peer.effects == [("write", build_frame(b"m" * (W - 1), OP_BINARY))]


def test_a_large_message_goes_out_as_header_and_payload_after_the_held_frames():
    peer = Peer(max_buffer=10 * W)
    payload = b"m" * W
    assert peer.send_text("held")
    assert peer.send_message(payload) is True
    header = frame_header(W, OP_TEXT)
    assert peer.effects == [("write", build_frame(b"held")), ("writelines", header, payload)]
    assert peer.effects[1][2] is payload
    assert (peer.recorder.frames_out, peer.recorder.bytes_out) == (2, 6 + len(header) + W)


def test_send_text_takes_str_or_bytes_and_send_binary_bytes():
    peer = Peer()
    assert peer.send_text("é") and peer.send_text(b"b") and peer.send_binary(b"\x00")
    peer.flush()
    expected = build_frame("é".encode()) + build_frame(b"b") + build_frame(b"\x00", OP_BINARY)
    assert peer.effects == [("write", expected)]


# --- slow consumers ---


def test_a_peer_at_the_buffer_limit_is_kept():
    peer = Peer(max_buffer=100)
    peer.unsent = 100
    assert peer.send_frame(b"x" * W) is True
    assert peer.effects == [("write", b"x" * W)]
    assert (peer.closing, peer.recorder.slow_cuts) == (False, 0)


def test_a_peer_one_byte_over_the_buffer_limit_is_cut_with_1013():
    peer = Peer(max_buffer=100)
    peer.unsent = 101
    assert peer.send_frame(b"x" * W) is False
    assert peer.effects == [
        ("write", b"x" * W),
        ("not reading",),
        ("close", close_frame(1013, "send buffer full"), SLOW_GRACE),
    ]
    assert (peer.close_code, peer.recorder.slow_cuts) == (1013, 1)
    assert SLOW_GRACE == 1.0


def test_a_large_message_to_a_peer_over_the_limit_cuts_it():
    peer = Peer(max_buffer=100)
    peer.unsent = 101
    assert peer.send_message(b"x" * W) is False
    assert peer.effects[1:] == [
        ("not reading",),
        ("close", close_frame(1013, "send buffer full"), 1.0),
    ]


def test_a_cut_while_answering_the_peers_close_keeps_the_peers_code():
    peer = Peer(max_buffer=100)
    assert peer.send_text(b"held")
    peer.unsent = 101
    peer.receive_data(close_payload(4000))
    assert (peer.close_code, peer.recorder.slow_cuts) == (4000, 1)
    assert peer.effects == [  # one close frame only: the cut's
        ("write", build_frame(b"held")),
        ("not reading",),
        ("close", close_frame(1013, "send buffer full"), SLOW_GRACE),
        ("end", b""),
    ]


def test_a_cut_while_closing_sends_one_close_frame():
    peer = Peer(max_buffer=100)
    assert peer.send_text(b"held")
    peer.unsent = 101
    peer.close(1000, "bye")
    assert (peer.close_code, peer.recorder.slow_cuts) == (1013, 1)
    assert peer.effects == [
        ("write", build_frame(b"held")),
        ("not reading",),
        ("close", close_frame(1013, "send buffer full"), SLOW_GRACE),
    ]


# --- the rate limit and held messages ---


def test_the_session_is_its_own_rate_limiter():
    session = Session(Driver(), Wire(), Batch(), 1024, 1024, 1.0, 2, 10.0)
    assert (session.rate, session.burst) == (1.0, 2)
    assert [session.allow(10.0) for _ in range(3)] == [True, True, False]
    assert session.allow(11.0) is True


def test_a_rate_excess_is_reported_once_per_interval_at_its_exact_boundary():
    peer = Peer()
    assert peer.should_report_rate_limit(1.0) is True
    assert peer.should_report_rate_limit(1.999) is False
    assert peer.should_report_rate_limit(2.0) is True
    assert peer.should_report_rate_limit(2.4, every=0.5) is False
    assert peer.should_report_rate_limit(2.5, every=0.5) is True


def test_the_first_rate_report_waits_an_interval_from_zero():
    assert Peer().should_report_rate_limit(0.999) is False


def test_held_items_keep_their_order():
    peer = Peer()
    peer.hold((b"a", False))
    peer.hold((b"b", True))
    peer.hold(None)
    assert peer.held == deque([(b"a", False), (b"b", True), None])


# --- pure answers ---


@pytest.mark.parametrize(
    ("payload", "answer"),
    [
        (b"", (1005, EMPTY_CLOSE)),
        (struct.pack("!H", 1000), (1000, close_frame(1000))),
        (struct.pack("!H", 4999) + b"reason", (4999, close_frame(4999))),
        (b"\x03", (1002, close_frame(1002, "close frame with a 1-byte payload"))),
        (
            struct.pack("!H", 1000) + b"\xff",
            (1007, close_frame(1007, "invalid UTF-8 in a close reason")),
        ),
    ],
)
def test_answer_close(payload, answer):
    assert answer_close(payload) == answer


def test_empty_close_is_an_empty_close_frame():
    assert EMPTY_CLOSE == build_frame(b"", OP_CLOSE) == b"\x88\x00"


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("_write", (b"", 1)),
        ("_write_parts", (b"", b"")),
        ("_write_close", (b"", 1.0)),
        ("_end", ()),
        ("_not_reading", ()),
    ],
)
def test_the_io_is_the_subclass_s(method, args):
    session = Session(Driver(), Wire(), Batch(), 1024, 1024, 0.0, 1, 0.0)
    with pytest.raises(NotImplementedError):
        getattr(session, method)(*args)
