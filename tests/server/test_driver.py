"""The driver (server/driver.py): order, waiting handlers, the error mapping and the rate limit,
with a protocol of the test's own behind a real front door and real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from polysignal.backends.memory import MemoryBackend
from polysignal.core.errors import Answer, BackendUnavailable, ClientError, Close, Reply
from polysignal.server.app import add_health_routes, http_app
from polysignal.server.connection import Connection
from polysignal.server.driver import Driver, Handler, Handshake, Result
from polysignal.server.node import Node
from polysignal.server.runner import NodeServer

from rawws import close, frame, upgraded
from support import UNIT, node_settings, until

pytestmark = pytest.mark.timeout(30)


class Recorder(Handler):
    """Records every call; ``gate`` makes messages starting with "wait" wait for it."""

    protocol = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.gate = asyncio.Event()
        self.open_gate: asyncio.Event | None = None
        self.fail_with: Exception | None = None
        self.answers: list[Exception] = []
        self.reports: list[bool] = []
        self.answer_fails = False

    def on_open(self, conn: Connection, request: Handshake) -> Result:
        self.calls.append(("open", request.path))
        if self.open_gate is not None:
            return self._open_later(self.open_gate)
        return None

    async def _open_later(self, gate: asyncio.Event) -> None:
        await gate.wait()
        self.calls.append(("opened", None))

    def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
        if data == b"raise":
            assert self.fail_with is not None
            raise self.fail_with
        if data.startswith(b"wait"):
            return self._later(conn, data)
        self.calls.append(("message", data))
        conn.send_text(b"echo " + data)
        return None

    async def _later(self, conn: Connection, data: bytes) -> None:
        self.calls.append(("waiting", data))
        await self.gate.wait()
        if data == b"wait-raise":
            raise RuntimeError("failed after waiting")
        self.calls.append(("message", data))
        conn.send_text(b"echo " + data)

    def on_close(self, conn: Connection) -> Result:
        self.calls.append(("close", None))
        return None

    def answer(self, conn: Connection, error: Exception) -> Answer:
        self.answers.append(error)
        if self.answer_fails:
            raise ValueError("answer broke")
        if isinstance(error, ClientError):
            return Reply(b"client error: " + error.message.encode())
        return Reply(b"generic")

    def rate_limited(self, conn: Connection, data: bytes, binary: bool, report: bool) -> Answer:
        self.reports.append(report)
        return Reply(b"slow down") if report else None


@contextlib.asynccontextmanager
async def serving(handler: Handler, **settings: Any) -> AsyncIterator[tuple[NodeServer, Node]]:
    node = Node(node_settings(**settings), MemoryBackend("driver-test"))
    node.fallback = Driver(handler, node)
    app = http_app(node)
    add_health_routes(app)
    server = NodeServer(app)
    await server.start("127.0.0.1", 0)
    try:
        yield server, node
    finally:
        await server.stop()


async def text(raw) -> bytes:
    opcode, payload = await raw.frame()
    assert opcode == 0x1
    return payload


async def test_messages_are_handled_in_order_while_a_handler_waits():
    handler = Recorder()
    async with serving(handler) as (server, node):
        raw = await upgraded(server.port, "/any")
        raw.send(frame(b"wait-1") + frame(b"two") + frame(b"three"))
        await until(lambda: ("waiting", b"wait-1") in handler.calls)
        (conn,) = node.connections
        assert conn.busy and not conn.transport.is_reading()  # later frames wait, reads pause
        assert ("message", b"two") not in handler.calls
        handler.gate.set()
        assert [await text(raw) for _ in range(3)] == [b"echo wait-1", b"echo two", b"echo three"]
        assert [c for c in handler.calls if c[0] == "message"] == [
            ("message", b"wait-1"),
            ("message", b"two"),
            ("message", b"three"),
        ]
        assert not conn.busy and conn.transport.is_reading()


async def test_a_close_waits_for_the_handler_that_is_running():
    handler = Recorder()
    async with serving(handler) as (server, _):
        raw = await upgraded(server.port)
        raw.send(frame(b"wait-1") + frame(b"after"))
        await until(lambda: ("waiting", b"wait-1") in handler.calls)
        raw.writer.transport.abort()  # gone while its handler waits
        await asyncio.sleep(0.1 * UNIT)
        assert ("close", None) not in handler.calls
        handler.gate.set()
        await until(lambda: ("close", None) in handler.calls)
        # What the client sent before it vanished is still handled, then the close.
        assert handler.calls[-3:] == [
            ("message", b"wait-1"),
            ("message", b"after"),
            ("close", None),
        ]


async def test_messages_sent_while_on_open_waits_are_handled_after_it():
    handler = Recorder()
    handler.open_gate = asyncio.Event()
    async with serving(handler) as (server, _):
        raw = await upgraded(server.port, "/room")
        raw.send(frame(b"first"))
        await asyncio.sleep(0.1 * UNIT)
        assert handler.calls == [("open", "/room")]
        handler.open_gate.set()
        assert await text(raw) == b"echo first"
        assert handler.calls == [("open", "/room"), ("opened", None), ("message", b"first")]


async def test_a_client_error_is_answered_the_protocols_way_and_logged_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="polysignal.recorder")
    handler = Recorder()
    handler.fail_with = ClientError("bad thing")
    async with serving(handler) as (server, _):
        raw = await upgraded(server.port)
        raw.send(frame(b"raise"))
        assert await text(raw) == b"client error: bad thing"
        assert handler.answers == [handler.fail_with]
    records = [r for r in caplog.records if r.name == "polysignal.recorder"]
    assert [r.levelname for r in records if "bad thing" in r.getMessage()] == ["DEBUG"]


async def test_an_unavailable_backend_is_a_warning_once_per_interval(caplog):
    handler = Recorder()
    handler.fail_with = BackendUnavailable("redis is away")
    async with serving(handler) as (server, _):
        raw = await upgraded(server.port)
        raw.send(frame(b"raise") * 3)
        assert [await text(raw) for _ in range(3)] == [b"generic"] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "the cluster is unavailable (redis is away)" in warnings[0].getMessage()
    assert warnings[0].exc_info is None


async def test_a_bug_is_logged_once_with_its_traceback_and_answered_generically(caplog):
    handler = Recorder()
    handler.fail_with = RuntimeError("a bug")
    async with serving(handler) as (server, _):
        raw = await upgraded(server.port)
        raw.send(frame(b"raise") * 3)
        assert [await text(raw) for _ in range(3)] == [b"generic"] * 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # the same fault again within the interval is held back
    assert errors[0].exc_info is not None and errors[0].exc_info[1] is handler.fail_with


async def test_a_bug_after_a_wait_is_answered_too():
    handler = Recorder()
    handler.gate.set()
    async with serving(handler) as (server, _):
        raw = await upgraded(server.port)
        raw.send(frame(b"wait-raise") + frame(b"next"))
        assert await text(raw) == b"generic"
        assert await text(raw) == b"echo next"
        assert isinstance(handler.answers[0], RuntimeError)


async def test_an_answer_that_fails_closes_with_1011(caplog):
    handler = Recorder()
    handler.fail_with = ClientError("x")
    handler.answer_fails = True
    async with serving(handler) as (server, _):
        raw = await upgraded(server.port)
        raw.send(frame(b"raise"))
        assert await raw.close_frame() == (1011, "internal error")
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


async def test_the_rate_limit_reports_once_per_second_and_drops_the_excess():
    handler = Recorder()
    async with serving(handler, rate_limit=1.0, rate_burst=2) as (server, _):
        raw = await upgraded(server.port)
        raw.send(b"".join(frame(b"m%d" % i) for i in range(5)))
        got = [await text(raw) for _ in range(3)]
        assert got == [b"echo m0", b"echo m1", b"slow down"]
        await until(lambda: len(handler.reports) == 3)
        assert handler.reports == [True, False, False]
        assert [c[1] for c in handler.calls if c[0] == "message"] == [b"m0", b"m1"]


async def test_the_default_answers_close_with_the_errors_code():
    """A handler that does not say how it answers: a ClientError closes with its code."""

    class Plain(Handler):
        def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
            raise ClientError("no")

    async with serving(Plain()) as (server, _):
        raw = await upgraded(server.port)
        raw.send(frame(b"x"))
        assert await raw.close_frame() == (1008, "no")
        raw.send(close(1008))
        assert await raw.eof() == b""


def test_default_answers_of_a_handler():
    plain = Handler()
    conn: Any = None
    assert plain.answer(conn, ClientError("bad")) == Close(1008, "bad")
    assert plain.answer(conn, RuntimeError()) == Close(1011, "internal error")
    assert plain.rate_limited(conn, b"", False, True) == Close(1008, "rate limit exceeded")
    assert plain.on_open(conn, Handshake("/")) is None
    assert plain.on_message(conn, b"", False) is None
    assert plain.on_close(conn) is None
    assert plain.accept(Handshake("/")) is None
