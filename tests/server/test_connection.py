"""RFC 6455 on a live connection (server/connection.py), driven by raw bytes.

Every case sends exactly the bytes named, over a real socket, to the topics protocol (which
answers ``{"type":"ping"}`` with a pong, so a test can see that a message got through).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polysignal.config import Secret

from rawws import close, frame, upgraded
from support import UNIT, node_settings, running_server, topic_subscribers, until, until_true

pytestmark = pytest.mark.timeout(60)

PING_JSON = b'{"type":"ping"}'
PONG = (0x1, b'{"type":"pong"}')


async def _none_subscribed(server) -> bool:
    return await topic_subscribers(server, "t") == 0


async def subscribed(server, raw) -> None:
    raw.send(frame(b'{"type":"subscribe","topics":["t"]}') + frame(PING_JSON))
    assert await raw.frame() == PONG  # handled in order: the subscribe is too


@pytest.mark.parametrize(
    ("bad", "code", "reason"),
    [
        (frame(PING_JSON, mask=None), 1002, "frames from a client must be masked"),
        (frame(PING_JSON, rsv=4), 1002, "reserved bits must be 0"),
        (frame(PING_JSON, 0x3), 1002, "unknown opcode 3"),
        (frame(b"x", 0x0), 1002, "continuation frame without a message to continue"),
        (frame(b"p" * 126, 0x9), 1002, "control frame longer than 125 bytes"),
        (frame(b"", 0x9, fin=False), 1002, "control frames must not be fragmented"),
        (frame(b"\xc3\x28"), 1007, "invalid UTF-8 in a text message"),
        (frame(b"{", fin=False) + frame(b"}"), 1002, "expected a continuation frame"),
    ],
)
async def test_a_framing_fault_closes_with_its_code_and_the_client_can_answer(
    server, bad, code, reason
):
    raw = await upgraded(server.port)
    raw.send(bad)
    assert await raw.close_frame() == (code, reason)
    raw.send(close(code))  # the client answers the close: the server then closes TCP
    assert await raw.eof() == b""
    await until(lambda: not server.node.connections)


async def test_a_message_of_exactly_the_frame_limit_is_handled():
    async with running_server(node_settings(max_frame_bytes=1024)) as srv:
        raw = await upgraded(srv.port)
        pad = 1024 - len(b'{"type":"ping","pad":""}')
        message = b'{"type":"ping","pad":"' + b"x" * pad + b'"}'
        assert len(message) == 1024
        raw.send(frame(message))
        assert await raw.frame() == PONG


async def test_a_message_one_byte_over_the_limit_closes_1009_from_its_header():
    """The refusal needs only the header: the payload is never sent here, yet 1009 arrives."""
    async with running_server(node_settings(max_frame_bytes=1024)) as srv:
        raw = await upgraded(srv.port)
        raw.send(frame(b"x" * 1025)[:8])
        assert await raw.close_frame() == (1009, "Message too large")
        raw.send(b"x" * 1025)  # the rest of the refused frame is skipped...
        raw.send(close(1000))  # ...and the close after it is read
        assert await raw.eof() == b""


async def test_fragments_of_exactly_the_limit_pass_and_one_more_byte_closes_1009():
    async with running_server(node_settings(max_frame_bytes=1024)) as srv:
        raw = await upgraded(srv.port)
        pad = 1024 - len(b'{"type":"ping","pad":""}')
        message = b'{"type":"ping","pad":"' + b"x" * pad + b'"}'
        raw.send(frame(message[:500], fin=False) + frame(message[500:], 0x0))
        assert await raw.frame() == PONG
        raw.send(frame(message[:500], fin=False) + frame(message[500:] + b" ", 0x0))
        assert await raw.close_frame() == (1009, "Message too large")


async def test_a_fragmented_message_with_a_ping_between_its_fragments(server):
    raw = await upgraded(server.port)
    raw.send(frame(b'{"type":', fin=False) + frame(b"abc", 0x9) + frame(b'"ping"}', 0x0))
    assert await raw.frame() == (0xA, b"abc")  # the ping is answered at once
    assert await raw.frame() == PONG  # then the message it interrupted


async def test_a_ping_is_answered_with_its_payload(server):
    raw = await upgraded(server.port)
    raw.send(frame(b"\x00\xffhello", 0x9))
    assert await raw.frame() == (0xA, b"\x00\xffhello")


async def test_a_pong_is_accepted_silently(server):
    raw = await upgraded(server.port)
    raw.send(frame(b"unsolicited", 0xA) + frame(PING_JSON))
    assert await raw.frame() == PONG


async def test_the_clients_close_is_echoed_and_tcp_closed(server):
    raw = await upgraded(server.port)
    await subscribed(server, raw)
    raw.send(close(4000, b"done here"))
    assert await raw.close_frame() == (4000, "")
    assert await raw.eof() == b""
    await until_true(lambda: _none_subscribed(server))


async def test_an_empty_close_is_answered_with_an_empty_close(server):
    raw = await upgraded(server.port)
    raw.send(close(None))
    opcode, payload = await raw.frame()
    assert (opcode, payload) == (0x8, b"")
    assert await raw.eof() == b""


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b"\x03", 1002, "close frame with a 1-byte payload"),
        (struct.pack("!H", 1005), 1002, "invalid close code 1005"),
        (struct.pack("!H", 999), 1002, "invalid close code 999"),
        (struct.pack("!H", 1000) + b"\xff", 1007, "invalid UTF-8 in a close reason"),
    ],
)
async def test_an_invalid_close_is_answered_with_the_fault(server, payload, code, reason):
    raw = await upgraded(server.port)
    raw.send(frame(payload, 0x8))
    assert await raw.close_frame() == (code, reason)
    assert await raw.eof() == b""


async def test_a_server_close_waits_for_the_clients_answer(server):
    raw = await upgraded(server.port)
    await subscribed(server, raw)
    (conn,) = server.node.connections
    conn.close(4001, "bye")
    assert await raw.close_frame() == (4001, "bye")
    raw.send(frame(PING_JSON))  # data after the server's close is not handled
    raw.send(close(4001))
    assert await raw.eof() == b""  # the server closes TCP once answered
    await until(lambda: conn.lost)


async def test_a_client_that_never_answers_the_close_is_cut_after_the_grace(server):
    raw = await upgraded(server.port)
    await subscribed(server, raw)
    (conn,) = server.node.connections
    conn.close(1000, "", grace=0.3 * UNIT)
    assert await raw.close_frame() == (1000, "")
    assert await raw.eof(timeout=3 * UNIT) == b""
    await until(lambda: not server.node.connections)


async def test_an_abrupt_disconnect_cleans_up(server):
    raw = await upgraded(server.port)
    await subscribed(server, raw)
    sock = raw.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.writer.transport.abort()  # RST, no close frame
    await until(lambda: not server.node.connections)
    assert server.node.addresses.count("127.0.0.1") == 0


async def test_a_frame_split_at_every_byte_is_read_once_whole(server):
    raw = await upgraded(server.port)
    data = frame(b'{"type":"ping","pad":"' + b"y" * 300 + b'"}')
    for index in range(len(data)):
        raw.send(data[index : index + 1])
        await raw.writer.drain()
    assert await raw.frame() == PONG


async def test_no_error_is_logged_for_anything_a_client_sends(server, caplog):
    caplog.set_level(logging.WARNING, logger="polysignal")
    raw = await upgraded(server.port)
    raw.send(frame(b"\xff\xfe\xfd", 0x2) + frame(b"not json") + frame(PING_JSON, rsv=1))
    await raw.close_frame()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- any bytes, on a real socket ---

FUZZ = settings(
    max_examples=int(os.environ.get("POLYSIGNAL_FUZZ_SOCKET_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.builds(frame, st.binary(max_size=300), st.sampled_from([0, 1, 2, 8, 9, 10, 3])),
            st.builds(
                frame,
                st.binary(max_size=40),
                st.integers(0, 15),
                fin=st.booleans(),
                rsv=st.integers(0, 7),
            ),
        ),
        max_size=6,
    )
)
def test_any_bytes_end_in_messages_or_a_clean_close(chunks):
    """Whatever follows the upgrade, the server answers or closes within a bound, keeps serving
    others, and logs nothing above INFO."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("polysignal")
    logger.addHandler(handler)
    try:
        asyncio.run(_fuzz_once(chunks))
    finally:
        logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]


async def _fuzz_once(chunks: list[bytes]) -> None:
    # The rooms secrets are set so that a node starts without any warning.
    settings = node_settings(max_frame_bytes=256, app_secret=Secret("s"), app_pass=Secret("p"))
    async with running_server(settings) as srv:
        raw = await upgraded(srv.port)
        for chunk in chunks:
            raw.send(chunk)
            await raw.writer.drain()
        raw.writer.write_eof()  # the client is done: the server must end the connection
        await raw.eof(timeout=5 * UNIT)
        await until(lambda: not srv.node.connections, timeout=5 * UNIT)
        other = await upgraded(srv.port)
        other.send(frame(PING_JSON))
        assert await other.frame() == PONG
        other.send(close(1000))
        assert await other.close_frame() == (1000, "")
