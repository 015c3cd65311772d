"""What the driver decides, with no I/O: the order of a connection's messages, and the ladder
from an exception to its kind and answer.

The server's ``Driver`` (``server/driver.py``) runs one protocol's handler for each of its
connections; it is a ``Dispatch``, as a connection is a ``Session`` (``core/websocket.py``), and
adds what is I/O: the handler's calls, their tasks, the log lines, the socket's reads.

* Order: while a handler coroutine of a connection runs, the connection is ``busy``: its later
  messages, and the end of its transport, are held in order and handled once the coroutine ends,
  until one makes it busy again. What the client sent before it went away is still handled, then
  the close.
* The error ladder: a ``ClientError`` is the client's fault, a ``BackendUnavailable`` a degraded
  cluster, anything else a bug; each kind has its counter (``/metrics``) and its log line, and a
  bug its place (type and innermost frame) as the key of its log throttle. By default a client's
  fault closes with its own code and message, anything else with 1011 and nothing more.
* The numbers of a protocol for ``/metrics`` (``server/metrics.py``): plain integers the session
  and the driver add to on the paths they already take, read only when scraped.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Generic, TypeVar

from polysignal.core.errors import Answer, BackendUnavailable, ClientError, Close, CloseCode, Reply

if TYPE_CHECKING:
    from polysignal.core.websocket import Session

Held = tuple[bytes, bool] | None
"""What waits while a connection is busy: a data message (payload, binary), or None for the end
of its transport."""

ABNORMAL = 1006
"""The close code of a connection that ended without a closing handshake (RFC 6455 §7.1.5)."""

INTERNAL_ERROR = Close(CloseCode.INTERNAL_ERROR, "internal error")
"""The answer to a bug: its details stay in the log."""


class ErrorKind(StrEnum):
    """Whose fault an exception escaping a handler is; the key of its ``/metrics`` counter."""

    CLIENT = "client"
    """Something the client sent (DEBUG, answered the protocol's way)."""
    BACKEND = "backend"
    """The cluster's backing service is unavailable (WARNING, at most once per interval)."""
    INTERNAL = "internal"
    """A bug (ERROR with a traceback, at most once per interval per place)."""


def error_kind(error: BaseException) -> ErrorKind:
    if isinstance(error, ClientError):
        return ErrorKind.CLIENT
    if isinstance(error, BackendUnavailable):
        return ErrorKind.BACKEND
    return ErrorKind.INTERNAL


def close_answer(error: Exception) -> Close:
    """The default answer to ``error``: a client's fault closes with its own code and message,
    anything else with 1011."""
    if isinstance(error, ClientError):
        return Close(error.close_code, error.message)
    return INTERNAL_ERROR


def place(error: BaseException) -> tuple[str, str, int]:
    """Where ``error`` was raised: its type and innermost frame, the key of its log throttle."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(error).__name__, "", 0
    return type(error).__name__, tb.tb_frame.f_code.co_filename, tb.tb_lineno


S = TypeVar("S", bound="Session")


class Dispatch(Generic[S]):
    """The order in which one protocol's connections are handled, and its counters; a subclass
    handles a message, runs ``on_close`` and resumes reading (the methods at the end)."""

    def __init__(self) -> None:
        # Counters, read at scrape time (server/metrics.py); the session adds to some.
        self.opened = 0
        self.closed_count = 0
        self.messages_in = 0
        self.frames_out = 0  # every frame written, pings and pongs included
        self.control_out = 0  # of those, pings and pongs
        self.bytes_in = 0
        self.bytes_out = 0
        self.rate_limited_count = 0
        self.slow_cuts = 0
        self.errors: dict[str, int] = {kind.value: 0 for kind in ErrorKind}
        self.close_codes: dict[int | None, int] = {}

    def message(self, conn: S, data: bytes, binary: bool) -> None:
        """One data message from ``conn``'s client: handled now, or after the ones before it."""
        self.messages_in += 1
        if conn.busy:
            conn.hold((data, binary))
            return
        self.handle(conn, data, binary)

    def count_close(self, code: int | None) -> int:
        """Count a connection's end with ``code`` (None: without a closing handshake); the code
        for its log line (``ABNORMAL`` for None)."""
        self.closed_count += 1
        codes = self.close_codes
        codes[code] = codes.get(code, 0) + 1
        return ABNORMAL if code is None else code

    def ended(self, conn: S) -> None:
        """``conn``'s transport is gone: run its ``on_close`` now, or after the messages held
        before it."""
        if conn.busy:
            conn.hold(None)
        else:
            self.close_now(conn)

    def finished(self, conn: S) -> None:
        """The handler coroutine that made ``conn`` busy has ended: handle what was held, in
        order, until one makes it busy again; once all is done, read from it again."""
        if not conn.busy:
            return
        conn.busy = False
        held = conn.held
        while held and not conn.busy:
            item = held.popleft()
            if item is None:
                held.clear()
                self.close_now(conn)
            else:  # sent before any close: handled, even when the transport is gone since
                data, binary = item
                self.handle(conn, data, binary)
        if not conn.busy:
            conn.held = None
            self.resume(conn)

    def count_error(self, error: BaseException) -> ErrorKind:
        """Count ``error`` by its kind, which says how it is logged."""
        kind = error_kind(error)
        self.errors[kind] += 1
        return kind

    @staticmethod
    def apply(conn: Session, answer: Answer) -> None:
        """Carry out a protocol's answer: send its reply, or close."""
        if answer is None:
            return
        if isinstance(answer, Reply):
            if answer.binary:
                conn.send_binary(answer.payload)
            else:
                conn.send_text(answer.payload)
        else:
            conn.close(answer.code, answer.reason)

    # --- what the subclass does: the handler's calls and the socket's reads ---
    def handle(self, conn: S, data: bytes, binary: bool) -> None:
        """Hand one data message of ``conn`` to the protocol."""
        raise NotImplementedError

    def close_now(self, conn: S) -> None:
        """Run the protocol's ``on_close`` for ``conn``."""
        raise NotImplementedError

    def resume(self, conn: S) -> None:
        """Read from ``conn`` again, unless its transport is gone."""
        raise NotImplementedError
