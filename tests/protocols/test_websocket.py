"""WebSocket framing and handshake (protocols/websocket.py), byte by byte, with no socket."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polysignal.core.errors import CloseCode
from polysignal.protocols import websocket as ws
from polysignal.protocols.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    TOO_LARGE,
    FrameError,
    HandshakeError,
    accept_key,
    build_frame,
    check_handshake,
    choose_subprotocol,
    close_frame,
    offered_subprotocols,
    parse_close,
    read_messages,
    switching_protocols,
)

from rawws import frame as raw_frame

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def frame(payload: bytes, opcode: int = OP_TEXT, **kwargs: object) -> bytes:
    """A client frame (tests/rawws.py), masked with a key that changes every byte."""
    kwargs.setdefault("mask", b"\x01\x02\x03\x04")
    return raw_frame(payload, opcode, **kwargs)  # type: ignore[arg-type]


def read_all(data: bytes, max_size: int = 1024):
    messages, used, fragments, error, need = read_messages(data, max_size)
    return messages, used, fragments, error, need


def error_of(data: bytes, max_size: int = 1024) -> tuple[int, str]:
    _, _, _, error, _ = read_all(data, max_size)
    assert error is not None
    return error.close_code, error.message


# --- frames out ---


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_build_frame_uses_the_shortest_length_form(size, header):
    payload = b"x" * size
    assert build_frame(payload) == header + payload


def test_build_frame_binary_opcode():
    assert build_frame(b"\x00\xff", OP_BINARY) == b"\x82\x02\x00\xff"


def test_close_frame_carries_code_and_reason():
    assert close_frame(1009, "Message too large") == b"\x88\x13\x03\xf1Message too large"


def test_close_frame_reason_is_cut_to_fit_a_control_frame_without_splitting_utf8():
    data = close_frame(1000, "é" * 100)  # 200 bytes of UTF-8
    payload = data[2:]
    assert data[1] == len(payload) == 124  # 2 code bytes + 61 whole "é" (122 bytes)
    assert payload[2:].decode() == "é" * 61
    assert len(close_frame(1000, "x" * 200)) == 2 + 125


# --- frames in ---


def test_masked_text_frame_is_unmasked():
    messages, used, fragments, error, need = read_all(frame(b'{"type":"ping"}'))
    assert messages == [(OP_TEXT, b'{"type":"ping"}')]
    assert (used, fragments, error, need) == (21, None, None, 2)


def test_zero_mask_key_leaves_the_payload_as_sent():
    assert read_all(frame(b"abc", mask=b"\0\0\0\0"))[0] == [(OP_TEXT, b"abc")]


def test_several_frames_in_one_read_come_out_in_order():
    data = frame(b"one") + frame(b"\x00two", OP_BINARY) + frame(b"", OP_PING) + frame(b"3")
    messages, used, *_ = read_all(data)
    assert messages == [(OP_TEXT, b"one"), (OP_BINARY, b"\x00two"), (OP_PING, b""), (OP_TEXT, b"3")]
    assert used == len(data)


@pytest.mark.parametrize(
    ("partial", "need"),
    [
        (b"", 2),
        (b"\x81", 2),
        (b"\x81\xfe\x01", 4),  # 16-bit length not complete
        (b"\x81\xff\x00\x00\x00", 10),  # 64-bit length not complete
    ],
)
def test_an_incomplete_header_asks_for_the_header_size(partial, need):
    assert read_all(partial) == ([], 0, None, None, need)


def test_an_incomplete_payload_asks_for_the_whole_frame():
    whole = frame(b"x" * 300)
    messages, used, _, error, need = read_all(frame(b"ok") + whole[:100])
    assert messages == [(OP_TEXT, b"ok")]
    assert (used, error, need) == (8, None, len(whole))


def test_fragments_with_a_ping_between_them_make_one_message():
    data = (
        frame(b"hel", fin=False)
        + frame(b"", OP_PING)
        + frame(b"lo ", OP_CONTINUATION, fin=False)
        + frame(b"world", OP_CONTINUATION)
    )
    messages, used, fragments, error, _ = read_all(data)
    assert messages == [(OP_PING, b""), (OP_TEXT, b"hello world")]
    assert (used, fragments, error) == (len(data), None, None)


def test_fragments_carry_over_between_reads():
    first = frame(b"\x01\x02", OP_BINARY, fin=False)
    messages, used, fragments, error, _ = read_all(first)
    assert messages == [] and used == len(first) and error is None
    assert fragments is not None and fragments.size == 2
    messages, _, fragments, error, _ = read_messages(
        frame(b"\x03", OP_CONTINUATION), 1024, fragments
    )
    assert messages == [(OP_BINARY, b"\x01\x02\x03")] and fragments is None and error is None


@pytest.mark.parametrize(
    ("data", "code", "message"),
    [
        (frame(b"x", rsv=4), 1002, "reserved bits must be 0"),
        (frame(b"x", rsv=1), 1002, "reserved bits must be 0"),
        (frame(b"x", 0x3), 1002, "unknown opcode 3"),
        (frame(b"x", 0xB), 1002, "unknown opcode 11"),
        (frame(b"x", mask=None), 1002, "frames from a client must be masked"),
        (frame(b"", OP_PING, fin=False), 1002, "control frames must not be fragmented"),
        (frame(b"x" * 126, OP_PONG), 1002, "control frame longer than 125 bytes"),
        (frame(b"x", OP_CONTINUATION), 1002, "continuation frame without a message to continue"),
        (frame(b"a", fin=False) + frame(b"b"), 1002, "expected a continuation frame"),
        (frame(b"\xff\xfe"), 1007, "invalid UTF-8 in a text message"),
        (frame(b"", length=1 << 63), 1002, "frame length over 2^63"),
    ],
)
def test_each_framing_rule_fails_with_its_code(data, code, message):
    assert error_of(data) == (code, message)


def test_frames_before_an_error_are_kept():
    messages, _, _, error, _ = read_all(frame(b"good") + frame(b"x", rsv=2))
    assert messages == [(OP_TEXT, b"good")]
    assert error is not None and error.close_code == CloseCode.PROTOCOL_ERROR


def test_an_unmasked_frame_is_skipped_whole():
    bad = frame(b"abc", mask=None)
    assert read_all(bad + b"rest")[1] == len(bad)


def test_invalid_utf8_in_a_fragmented_text_message_is_found_once_it_is_whole():
    data = frame(b"\xe2\x82", fin=False) + frame(b"\xac", OP_CONTINUATION)  # the euro sign
    assert read_all(data)[0] == [(OP_TEXT, "€".encode())]
    bad = frame(b"\xe2\x82", fin=False) + frame(b"\x28", OP_CONTINUATION)
    assert error_of(bad) == (1007, "invalid UTF-8 in a text message")


def test_binary_messages_are_not_held_to_utf8():
    assert read_all(frame(b"\xff\xfe", OP_BINARY))[0] == [(OP_BINARY, b"\xff\xfe")]


def test_a_frame_of_exactly_the_limit_is_accepted():
    assert read_all(frame(b"x" * 100), max_size=100)[0] == [(OP_TEXT, b"x" * 100)]


def test_a_frame_one_byte_over_the_limit_is_refused_from_its_header():
    header = frame(b"x" * 101)[:8]  # only the header and mask have arrived
    messages, used, _, error, _ = read_all(header, max_size=100)
    assert messages == [] and error is not None
    assert (error.close_code, error.message) == (1009, TOO_LARGE)
    assert used == 2 + 4 + 101  # where the refused frame ends: its payload is skipped


def test_fragments_of_exactly_the_limit_are_accepted():
    data = frame(b"x" * 60, fin=False) + frame(b"y" * 40, OP_CONTINUATION)
    assert read_all(data, max_size=100)[0] == [(OP_TEXT, b"x" * 60 + b"y" * 40)]


def test_fragments_one_byte_over_the_limit_are_refused():
    data = frame(b"x" * 60, fin=False) + frame(b"y" * 41, OP_CONTINUATION)[:6]
    assert error_of(data, max_size=100) == (1009, TOO_LARGE)


def test_control_frames_do_not_count_against_the_limit():
    ping = frame(b"p" * 125, OP_PING)
    assert read_all(ping, max_size=10)[0] == [(OP_PING, b"p" * 125)]


# --- close frames ---


def test_an_empty_close_has_no_code():
    assert parse_close(b"") == (None, "")


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999]
)
def test_valid_close_codes(code):
    assert parse_close(code.to_bytes(2, "big") + b"bye") == (code, "bye")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_invalid_close_codes_are_protocol_errors(code):
    with pytest.raises(FrameError) as info:
        parse_close(code.to_bytes(2, "big"))
    assert (info.value.close_code, info.value.message) == (1002, f"invalid close code {code}")


def test_a_one_byte_close_payload_is_a_protocol_error():
    with pytest.raises(FrameError) as info:
        parse_close(b"\x03")
    assert (info.value.close_code, info.value.message) == (
        1002,
        "close frame with a 1-byte payload",
    )


def test_a_close_reason_must_be_utf8():
    with pytest.raises(FrameError) as info:
        parse_close(b"\x03\xe8\xff")
    assert (info.value.close_code, info.value.message) == (1007, "invalid UTF-8 in a close reason")


# --- the opening handshake ---


def test_accept_key_is_rfc_6455s_example():
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_switching_protocols_response():
    assert switching_protocols(KEY) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    assert switching_protocols(KEY, "Signal-Fire@3").endswith(
        b"\r\nSec-WebSocket-Protocol: Signal-Fire@3\r\n\r\n"
    )


def test_a_valid_handshake_gives_the_key():
    assert check_handshake("1.1", "13", f" {KEY} ") == KEY


@pytest.mark.parametrize(
    ("http_version", "version", "key", "status", "message"),
    [
        ("1.0", "13", KEY, 400, "a WebSocket upgrade needs HTTP/1.1"),
        ("1.1", None, KEY, 426, "unsupported Sec-WebSocket-Version; this server speaks 13"),
        ("1.1", "8", KEY, 426, "unsupported Sec-WebSocket-Version; this server speaks 13"),
        ("1.1", "13", None, 400, "missing Sec-WebSocket-Key"),
        ("1.1", "13", "not base64!", 400, "invalid Sec-WebSocket-Key"),
        ("1.1", "13", "AAAAAAAAAAAAAAAAAAAA", 400, "invalid Sec-WebSocket-Key"),  # 15 bytes
        ("1.1", "13", "AAAAAAAAAAAAAAAAAAAAAAAA", 400, "invalid Sec-WebSocket-Key"),  # 18 bytes
    ],
)
def test_a_bad_handshake_is_refused_with_its_status(http_version, version, key, status, message):
    with pytest.raises(HandshakeError) as info:
        check_handshake(http_version, version, key)
    assert (info.value.status, info.value.message) == (status, message)
    if status == 426:
        assert info.value.headers == (("Sec-WebSocket-Version", "13"),)


def test_subprotocols_are_offered_in_the_clients_order_and_not_held_to_tokens():
    offered = offered_subprotocols(["chat, Signal-Fire@3", " Signal-Fire@2 ,"])
    assert offered == ["chat", "Signal-Fire@3", "Signal-Fire@2"]
    assert choose_subprotocol(offered, ("Signal-Fire@2", "Signal-Fire@3")) == "Signal-Fire@3"
    assert choose_subprotocol(offered, ("other",)) is None
    assert choose_subprotocol([], ("Signal-Fire@3",)) is None


# --- property-based: any bytes, cut anywhere ---

FUZZ = settings(
    max_examples=int(os.environ.get("POLYSIGNAL_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


def feed(chunks: list[bytes], max_size: int):
    """Read ``chunks`` as a connection does: carry the unread rest and the fragments over."""
    messages = []
    rest = b""
    fragments = None
    for chunk in chunks:
        rest += chunk
        got, used, fragments, error, need = read_messages(rest, max_size, fragments)
        messages += got
        if error is not None:
            return messages, error
        assert need > 0  # always asks for more than nothing: no busy loop
        rest = rest[used:]
        assert len(rest) < need or not rest  # what is left is an incomplete frame
    return messages, None


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    edges = [0, *marks, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=8))
def test_any_bytes_cut_anywhere_give_messages_or_a_frame_error(data, points):
    messages, error = feed(cut(data, points), max_size=256)
    assert error is None or isinstance(error, FrameError)
    assert error is None or error.close_code in (1002, 1007, 1009)
    for opcode, payload in messages:
        assert opcode in (OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
        assert opcode >= OP_CLOSE or len(payload) <= 256


message = st.one_of(
    st.tuples(st.just(OP_TEXT), st.text(max_size=200).map(str.encode)),
    st.tuples(st.just(OP_BINARY), st.binary(max_size=200)),
    st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125)),
)


@st.composite
def streams(draw):
    """Valid client frames for a list of messages, data messages cut into fragments with
    control frames between them, each frame with its own mask; and the messages expected."""
    expected = draw(st.lists(message, max_size=8))
    out = b""
    for opcode, payload in expected:
        mask = draw(st.binary(min_size=4, max_size=4))
        if opcode >= OP_CLOSE:
            out += frame(payload, opcode, mask=mask)
            continue
        cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for index, piece in enumerate(pieces):
            first = index == 0
            last = index == len(pieces) - 1
            out += frame(piece, opcode if first else OP_CONTINUATION, fin=last, mask=mask)
    # Control frames between fragments come out before the message they interrupt; none are
    # put between fragments here, so the order is the order of the list.
    return out, expected


@FUZZ
@given(streams(), st.lists(st.integers(min_value=0), max_size=10))
def test_valid_streams_cut_anywhere_read_back_exactly(stream, points):
    data, expected = stream
    messages, error = feed(cut(data, points), max_size=1024)
    assert error is None
    assert messages == expected


# --- edges: each one a rule that a careless change would break ---


def test_a_complete_16_bit_header_asks_for_the_whole_frame():
    data = frame(b"x" * 200)
    assert read_all(data[:4]) == ([], 0, None, None, len(data))
    assert read_all(data[:3]) == ([], 0, None, None, 4)


def test_a_complete_64_bit_header_asks_for_the_whole_frame():
    data = frame(b"y" * 70000)
    assert read_all(data[:10], max_size=1 << 20) == ([], 0, None, None, len(data))
    assert read_all(data[:9], max_size=1 << 20) == ([], 0, None, None, 10)


def test_a_64_bit_length_frame_reads_back_exactly():
    payload = bytes(range(256)) * 300  # 76,800 bytes
    messages, used, _, error, _ = read_all(frame(payload, OP_BINARY), max_size=1 << 20)
    assert (messages, used, error) == ([(OP_BINARY, payload)], len(frame(payload, OP_BINARY)), None)


@pytest.mark.parametrize("mask", [b"\0\0\0\0", b"\x01\x02\x03\x04"])
def test_a_frame_gathered_in_a_bytearray_is_read_into_bytes(mask):
    data = bytearray(frame(b"one", mask=mask) + frame(b"\x00two", OP_BINARY, mask=mask))
    messages, used, fragments, error, need = read_messages(data, 1024)
    assert messages == [(OP_TEXT, b"one"), (OP_BINARY, b"\x00two")]
    assert all(type(payload) is bytes for _, payload in messages)
    assert (used, fragments, error, need) == (len(data), None, None, 2)


def test_a_close_between_fragments_is_a_control_frame():
    data = frame(b"ab", fin=False) + frame(b"\x03\xe8", OP_CLOSE) + frame(b"c", OP_CONTINUATION)
    assert read_all(data)[0] == [(OP_CLOSE, b"\x03\xe8"), (OP_TEXT, b"abc")]


def test_three_fragments_count_together_against_the_limit():
    data = (
        frame(b"x" * 40, fin=False)
        + frame(b"y" * 40, OP_CONTINUATION, fin=False)
        + frame(b"z" * 21, OP_CONTINUATION)
    )
    assert error_of(data, max_size=100) == (1009, TOO_LARGE)
    exact = data[: -len(frame(b"z" * 21, OP_CONTINUATION))] + frame(b"z" * 20, OP_CONTINUATION)
    assert read_all(exact, max_size=100)[0] == [(OP_TEXT, b"x" * 40 + b"y" * 40 + b"z" * 20)]


def test_a_first_fragment_of_exactly_the_limit_is_accepted():
    data = frame(b"x" * 100, fin=False) + frame(b"", OP_CONTINUATION)
    assert read_all(data, max_size=100)[0] == [(OP_TEXT, b"x" * 100)]
    assert error_of(frame(b"x" * 101, fin=False), max_size=100) == (1009, TOO_LARGE)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (frame(b"\x03\xe8", OP_CLOSE, fin=False), "control frames must not be fragmented"),
        (frame(b"\x03\xe8" + b"r" * 124, OP_CLOSE), "control frame longer than 125 bytes"),
    ],
)
def test_close_frames_are_control_frames(data, message):
    assert error_of(data) == (1002, message)


def test_an_error_asks_for_nothing_more():
    """After an error the reader is done: ``need`` is 0 whatever the error."""
    for data in (
        frame(b"x", rsv=1),
        frame(b"x", OP_CONTINUATION),
        frame(b"\xff"),
        frame(b"a", fin=False) + frame(b"b"),
    ):
        assert read_all(data)[4] == 0


def test_a_key_with_a_character_outside_base64_is_refused():
    with pytest.raises(HandshakeError) as info:
        check_handshake("1.1", "13", "dGhlIHNhbXBs!ZSBub25jZQ==")
    assert (info.value.status, info.value.message) == (400, "invalid Sec-WebSocket-Key")


def test_switching_protocols_with_a_subprotocol_is_the_whole_response():
    assert switching_protocols(KEY, "Signal-Fire@3") == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
        b"Sec-WebSocket-Protocol: Signal-Fire@3\r\n\r\n"
    )


def test_scan_upgrade_reads_single_headers():
    headers = [
        (b"host", b"x"),
        (b"upgrade", b"WebSocket"),
        (b"connection", b"keep-alive, Upgrade"),
        (b"sec-websocket-key", b"k=="),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"a, b"),
    ]
    assert ws.scan_upgrade(headers) == (True, "13", "k==", ["a", "b"])


def test_scan_upgrade_joins_repeated_headers():
    headers = [
        (b"connection", b"keep-alive"),
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-protocol", b"a"),
        (b"sec-websocket-protocol", b"b, c"),
    ]
    assert ws.scan_upgrade(headers) == (True, None, None, ["a", "b", "c"])


@pytest.mark.parametrize(
    "headers",
    [
        [(b"upgrade", b"websocket")],
        [(b"connection", b"upgrade")],
        [(b"upgrade", b"h2c"), (b"connection", b"upgrade")],
        [],
    ],
)
def test_scan_upgrade_without_both_headers_is_plain_http(headers):
    assert ws.scan_upgrade(headers) == (False, None, None, [])


def test_http_error_is_a_whole_closing_response():
    assert ws.http_error(429, "too many", (("Retry-After", "1"),)) == (
        b"HTTP/1.1 429 Too Many Requests\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 9\r\nConnection: close\r\n"
        b"Retry-After: 1\r\n\r\ntoo many\n"
    )
    assert ws.http_error(418, "x").startswith(b"HTTP/1.1 418 Error\r\n")
