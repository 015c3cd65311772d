"""The driver's decisions with no I/O (core/dispatch.py): the order of a busy connection's
messages and close, the error ladder, the counters and how an answer is carried out."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest

from polysignal.core.dispatch import (
    ABNORMAL,
    INTERNAL_ERROR,
    Dispatch,
    ErrorKind,
    close_answer,
    error_kind,
    place,
)
from polysignal.core.errors import (
    BackendUnavailable,
    ClientError,
    Close,
    CloseCode,
    FrameTooLarge,
    Reply,
)
from polysignal.core.websocket import CLOSE_GRACE, Session
from polysignal.protocols.websocket import OP_BINARY, FrameError, build_frame, close_frame


class Wire:
    def is_closing(self) -> bool:
        return False


class Batch:
    def add(self, session: Session) -> None:
        pass


class Peer(Session):
    """A session whose writes are a list."""

    def __init__(self, driver: Dispatch[Any]) -> None:
        self.effects: list[tuple[Any, ...]] = []
        super().__init__(driver, Wire(), Batch(), 1024, 4096, 0.0, 1, 0.0)

    def _write(self, data: bytes, frames: int) -> bool:
        self.effects.append(("write", data))
        return True

    def _write_close(self, frame: bytes, grace: float) -> None:
        self.effects.append(("close", frame, grace))


class Recorder(Dispatch[Any]):
    """Records what it is asked to do; a message in ``waits`` makes its connection busy, as a
    handler that returned a coroutine would."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []
        self.waits: set[bytes] = set()

    def handle(self, conn: Any, data: bytes, binary: bool) -> None:
        self.calls.append(("message", data, binary))
        if data in self.waits:
            conn.busy = True

    def close_now(self, conn: Any) -> None:
        self.calls.append(("close",))

    def resume(self, conn: Any) -> None:
        self.calls.append(("resume",))


@pytest.fixture
def driver() -> Recorder:
    return Recorder()


@pytest.fixture
def conn(driver: Recorder) -> Peer:
    return Peer(driver)


def test_every_counter_starts_at_zero(driver):
    assert (
        driver.opened,
        driver.closed_count,
        driver.messages_in,
        driver.frames_out,
        driver.control_out,
        driver.bytes_in,
        driver.bytes_out,
        driver.rate_limited_count,
        driver.slow_cuts,
    ) == (0,) * 9
    assert driver.errors == {"client": 0, "backend": 0, "internal": 0}
    assert [type(key) for key in driver.errors] == [str, str, str]  # plain keys for /metrics
    assert driver.close_codes == {}


# --- order ---


def test_a_message_of_an_idle_connection_is_handled_at_once(driver, conn):
    driver.message(conn, b"a", False)
    driver.message(conn, b"b", True)
    assert driver.calls == [("message", b"a", False), ("message", b"b", True)]
    assert (driver.messages_in, conn.held) == (2, None)


def test_messages_of_a_busy_connection_are_held_in_order(driver, conn):
    conn.busy = True
    driver.message(conn, b"a", False)
    driver.message(conn, b"b", True)
    assert driver.calls == []
    assert conn.held == deque([(b"a", False), (b"b", True)])
    assert driver.messages_in == 2


def test_the_end_of_an_idle_connection_runs_on_close_at_once(driver, conn):
    driver.ended(conn)
    assert driver.calls == [("close",)]
    assert conn.held is None


def test_the_end_of_a_busy_connection_waits_behind_its_messages(driver, conn):
    conn.busy = True
    driver.message(conn, b"a", False)
    driver.ended(conn)
    assert driver.calls == []
    driver.finished(conn)
    assert driver.calls == [("message", b"a", False), ("close",), ("resume",)]
    assert (conn.busy, conn.held) == (False, None)


def test_finishing_what_did_not_wait_changes_nothing(driver, conn):
    conn.hold((b"a", False))
    driver.finished(conn)
    assert driver.calls == []
    assert conn.held == deque([(b"a", False)])


def test_a_held_message_that_waits_stops_the_drain_until_it_ends(driver, conn):
    driver.waits = {b"b"}
    conn.busy = True
    for data in (b"a", b"b", b"c"):
        driver.message(conn, data, False)
    driver.ended(conn)
    driver.finished(conn)
    assert driver.calls == [("message", b"a", False), ("message", b"b", False)]
    assert conn.busy is True
    assert conn.held == deque([(b"c", False), None])
    driver.finished(conn)
    assert driver.calls[2:] == [("message", b"c", False), ("close",), ("resume",)]
    assert (conn.busy, conn.held) == (False, None)


def test_nothing_held_after_the_end_is_handled(driver, conn):
    conn.busy = True
    conn.hold(None)
    conn.hold((b"late", False))
    driver.finished(conn)
    assert driver.calls == [("close",), ("resume",)]
    assert conn.held is None


def test_a_busy_connection_with_nothing_held_resumes_reading(driver, conn):
    conn.busy = True
    driver.finished(conn)
    assert driver.calls == [("resume",)]
    assert conn.busy is False


def test_close_codes_are_counted_and_a_missing_one_is_abnormal(driver):
    assert driver.count_close(1000) == 1000
    assert driver.count_close(None) == ABNORMAL == 1006
    assert driver.count_close(1000) == 1000
    assert driver.close_codes == {1000: 2, None: 1}
    assert driver.closed_count == 3


# --- the error ladder ---


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ClientError("bad"), ErrorKind.CLIENT),
        (FrameTooLarge("big"), ErrorKind.CLIENT),
        (FrameError(CloseCode.PROTOCOL_ERROR, "x"), ErrorKind.CLIENT),
        (BackendUnavailable("away"), ErrorKind.BACKEND),
        (ConnectionError("not the backend's"), ErrorKind.INTERNAL),
        (RuntimeError("bug"), ErrorKind.INTERNAL),
    ],
)
def test_each_error_has_its_kind_and_counter(driver, error, kind):
    assert error_kind(error) is kind
    assert driver.count_error(error) is kind
    assert driver.errors == {"client": 0, "backend": 0, "internal": 0, kind.value: 1}


def test_error_kinds_are_the_counters_keys():
    assert [kind.value for kind in ErrorKind] == ["client", "backend", "internal"]


@pytest.mark.parametrize(
    ("error", "answer"),
    [
        (ClientError("bad"), Close(1008, "bad")),
        (FrameTooLarge("too big"), Close(1009, "too big")),
        (BackendUnavailable("away"), Close(1011, "internal error")),
        (RuntimeError("secret detail"), Close(1011, "internal error")),
    ],
)
def test_the_default_answer_closes_with_the_clients_code_or_1011(error, answer):
    assert close_answer(error) == answer


def test_the_internal_error_answer():
    assert Close(1011, "internal error") == INTERNAL_ERROR


def _raise_deep() -> None:
    raise ValueError("deep")


def test_the_place_of_an_error_is_its_innermost_frame():
    try:
        _raise_deep()
    except ValueError as exc:
        error = exc
    line = _raise_deep.__code__.co_firstlineno + 1
    assert place(error) == ("ValueError", __file__, line)


def test_an_error_never_raised_has_no_place():
    assert place(KeyError("k")) == ("KeyError", "", 0)


# --- answers ---


def test_no_answer_does_nothing(conn):
    Dispatch.apply(conn, None)
    conn.flush()
    assert conn.effects == []


def test_a_reply_is_sent_as_text_or_binary(conn):
    Dispatch.apply(conn, Reply(b"text"))
    Dispatch.apply(conn, Reply(b"\x00", binary=True))
    conn.flush()
    assert conn.effects == [("write", build_frame(b"text") + build_frame(b"\x00", OP_BINARY))]


def test_a_close_answer_closes(conn):
    Dispatch.apply(conn, Close(4000, "bye"))
    assert conn.effects == [("close", close_frame(4000, "bye"), CLOSE_GRACE)]
    assert conn.close_code == 4000


@pytest.mark.parametrize("method", ["handle", "close_now", "resume"])
def test_the_handlers_calls_are_the_subclass_s(method):
    args = (None, b"", False) if method == "handle" else (None,)
    with pytest.raises(NotImplementedError):
        getattr(Dispatch(), method)(*args)
