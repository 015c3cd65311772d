"""The one read path of every WebSocket protocol: dispatch, rate limit, errors, logging.

A protocol plugs in as a ``Handler``: a set of callbacks that the ``Driver`` calls for each of its
connections.

* ``on_open(conn, request)`` once the upgrade is answered, ``on_message(conn, data, binary)`` for
  each data message (text is valid UTF-8), ``on_close(conn)`` once, after the transport is gone.
  Each does what it can at once and returns None, or returns a coroutine when it must wait (for
  the backend, say): the driver runs that in a task, and meanwhile the connection is ``busy``:
  its later messages, and its close, wait their turn in order, and its transport stops reading,
  so a client cannot queue unbounded work behind a slow handler. The common paths (a publish
  whose count is known, a piped frame, a Signal-Fire relay to a local peer) never wait.
* ``answer(conn, error)``: how the protocol answers an exception (``protocols/<p>.py`` says:
  an error frame, an ``ok:false`` reply, or a close code).
* ``rate_limited(conn, data, binary, report)``: how it answers a message over the connection's
  rate limit (``report`` is True at most once per second per connection).
* ``accept(request)``, optional: run before the upgrade is answered; raising
  ``HandshakeError`` refuses it with an HTTP status.

The driver is the one place that maps an exception to its answer and its log line:
``ClientError`` is the client's fault (DEBUG); ``BackendUnavailable`` is a degraded cluster
(WARNING, at most once per interval); anything else is a bug (ERROR with a traceback, at most
once per interval per place) answered generically. No handler writes its own read loop or its
own error ladder.

The ``Driver`` is a ``Dispatch`` (``core/dispatch.py``), which decides the order of a busy
connection's messages, the kind of an exception and the answer's effect, and keeps the protocol's
numbers for ``/metrics``. What is left here runs the handler's callbacks and their tasks, pauses
and resumes a busy connection's reads, and writes the log lines: a connection's opening and
closing at INFO, with its context (``Connection.log_extra``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from polysignal.core.auth import Identity
from polysignal.core.dispatch import INTERNAL_ERROR, Dispatch, ErrorKind, close_answer, place
from polysignal.core.errors import Answer, ClientError, Close
from polysignal.logs import Throttle, elide, more
from polysignal.server.connection import Connection

if TYPE_CHECKING:
    from polysignal.server.node import Node

Result = Awaitable[None] | None
"""What a callback returns: None when it is done, else a coroutine to run."""

OPEN_LINE = "%r open on %s"
CLOSE_LINE = "%r closed (code %s) after %.3fs"
"""The INFO lines of a connection's opening and closing (with ``Connection.log_extra``)."""


@dataclass(slots=True)
class Handshake:
    """The WebSocket upgrade request, as a protocol sees it."""

    path: str
    """The path as sent, still percent-encoded."""
    query: str = ""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    """Every header in order: the name in lower case, the value as sent."""
    address: str = "unknown"
    offered: list[str] = field(default_factory=list)
    """The subprotocols the client offers, in its order."""
    subprotocol: str | None = None
    """The subprotocol the server echoes, once chosen."""
    state: Any = None
    """What a protocol's ``accept`` hook leaves for its ``on_open``."""
    token: str | None = None
    """The token of a ``/token/<token>/`` path prefix, which the path no longer holds."""
    identity: Identity | None = None
    """Who the client is, when its protocol requires authentication (server/auth.py)."""

    @property
    def decoded_path(self) -> str:
        """The path with its percent-escapes decoded (what a route compares)."""
        return unquote(self.path) if "%" in self.path else self.path

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        key = name.encode()
        for found, value in self.headers:
            if found == key:
                return value.decode("latin-1")
        return None

    def header_values(self, name: str) -> list[str]:
        key = name.encode()
        return [value.decode("latin-1") for found, value in self.headers if found == key]


class Handler:
    """A WebSocket protocol, as the driver calls it. Subclasses override what they need."""

    protocol = "websocket"
    """Its name in logs."""
    subprotocols: tuple[str, ...] = ()
    """Subprotocols it speaks; the first one a client offers is echoed."""

    def accept(self, request: Handshake) -> Result:
        """Before the upgrade is answered; raise HandshakeError to refuse it."""
        return None

    def claimed_id(self, request: Handshake) -> str | None:
        """The peer id the connection asks to hold (checked against its token's ``ids`` when
        the protocol requires authentication); None when the client names none."""
        return None

    def on_open(self, conn: Connection, request: Handshake) -> Result:
        return None

    def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
        return None

    def on_close(self, conn: Connection) -> Result:
        return None

    def answer(self, conn: Connection, error: Exception) -> Answer:
        """How the protocol answers ``error`` (a ClientError, BackendUnavailable or a bug)."""
        return close_answer(error)

    def rate_limited(self, conn: Connection, data: bytes, binary: bool, report: bool) -> Answer:
        return Close(1008, "rate limit exceeded")

    def held(self) -> dict[str, int]:
        """What the protocol holds on this node now (``topics``, ``ids``, ...), for
        ``/metrics`` and ``/stats``; read at scrape time."""
        return {}

    def typed_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Messages received and sent so far by kind, for the kinds the protocol tells apart
        (a small fixed set); ``/metrics`` counts the rest of the driver's totals as
        ``other``. Read at scrape time only."""
        return {}, {}


class Driver(Dispatch[Connection]):
    """Runs one protocol's ``Handler`` for every connection of that protocol on a node."""

    def __init__(self, handler: Handler, node: Node, *, max_frame: int | None = None) -> None:
        super().__init__()
        settings = node.settings
        self.handler = handler
        self.node = node
        self.protocol = handler.protocol
        self.max_frame = max_frame or settings.limits.max_frame_bytes
        self.log = logging.getLogger(f"polysignal.{handler.protocol}")
        self.throttle = Throttle()

    # --- lifecycle ---
    def connect(self, transport: asyncio.Transport, request: Handshake) -> Connection:
        """Make ``transport`` (already upgraded) a connection of this protocol and open it."""
        node = self.node
        settings = node.settings
        conn = Connection(
            self,
            transport,
            request.address,
            self.max_frame,
            settings.limits.send_buffer_bytes,
            settings.limits.rate_limit,
            settings.limits.rate_burst,
            node.batch,
        )
        if request.identity is not None:
            conn.identity = request.identity
        node.opened(conn)
        self.opened += 1
        self._run(conn, self._call(conn, self.handler.on_open, conn, request))
        log = self.log
        if log.isEnabledFor(logging.INFO):
            # After ``on_open``: a protocol that knows its peer's id at once has set it.
            log.info(OPEN_LINE, conn, request.path[:200], extra=conn.log_extra())
        return conn

    def closed(self, conn: Connection) -> None:
        """The transport of ``conn`` is gone (called once, by the connection)."""
        self.node.forgot(conn)
        code = self.count_close(conn.close_code)
        log = self.log
        if log.isEnabledFor(logging.INFO):
            log.info(
                CLOSE_LINE, conn, code, time.monotonic() - conn.started, extra=conn.log_extra()
            )
        self.ended(conn)

    # --- messages ---
    def handle(self, conn: Connection, data: bytes, binary: bool) -> None:
        log = self.log
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%r message %s", conn, elide(data))
        now = time.monotonic()
        if not conn.allow(now):
            self.rate_limited_count += 1
            report = conn.should_report_rate_limit(now)
            if report:
                held = self.throttle.allow("rate")
                if held is not None:
                    log.warning("%r is over the rate limit%s", conn, more(held))
            try:
                self.apply(conn, self.handler.rate_limited(conn, data, binary, report))
            except Exception as exc:
                self.fail(conn, exc)
            return
        try:
            result = self.handler.on_message(conn, data, binary)
        except Exception as exc:
            self.fail(conn, exc)
            return
        if result is not None:
            self._run(conn, result)

    def close_now(self, conn: Connection) -> None:
        self._run(conn, self._call(conn, self.handler.on_close, conn))

    def _call(self, conn: Connection, callback: Any, *args: Any) -> Result:
        try:
            result: Result = callback(*args)
        except Exception as exc:
            self.fail(conn, exc)
            return None
        return result

    # --- running what a callback returned ---
    def _run(self, conn: Connection, result: Result) -> None:
        """Run the coroutine a callback returned, holding ``conn``'s later messages meanwhile."""
        if result is None:
            return
        task = _start(self._finish(conn, result))
        if task.done():  # finished without waiting (eager start, Python >= 3.12)
            return
        conn.busy = True
        if not conn.lost:
            conn.transport.pause_reading()
        self.node.track(task)

    async def _finish(self, conn: Connection, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception as exc:
            self.fail(conn, exc)
        self.finished(conn)

    def resume(self, conn: Connection) -> None:
        if not conn.lost:
            conn.transport.resume_reading()

    # --- errors ---
    def fail(self, conn: Connection, error: Exception) -> None:
        """Log ``error`` by its kind and answer it the protocol's way."""
        log = self.log
        kind = self.count_error(error)
        if kind is ErrorKind.CLIENT:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%r: %s", conn, cast(ClientError, error).message)
        elif kind is ErrorKind.BACKEND:
            held = self.throttle.allow("backend")
            if held is not None:
                log.warning("%r: the cluster is unavailable (%s)%s", conn, error, more(held))
        else:
            held = self.throttle.allow(place(error))
            if held is not None:
                log.error("%r: unexpected error%s", conn, more(held), exc_info=error)
        try:
            answer = self.handler.answer(conn, error)
        except Exception:
            log.exception("%r: answering an error failed", conn)
            answer = INTERNAL_ERROR
        self.apply(conn, answer)


def _start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A task for ``coro``, run at once up to its first wait where Python can (3.12 and newer),
    so work that never waits costs no trip through the event loop."""
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, loop=loop, eager_start=True)
    return loop.create_task(coro)
