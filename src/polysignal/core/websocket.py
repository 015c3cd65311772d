"""One WebSocket peer after the upgrade, with no I/O: RFC 6455's state and the write path's rules.

A ``Session`` is what a connection must remember between two reads and two writes, and what it
decides from it:

* input: the incomplete frame of the last read (``_buf``, kept until ``_need`` bytes make it
  worth parsing again), the message still being fragmented (``_fragments``), and the bytes of a
  refused frame still to drop (``_skip``: a frame over the size limit is refused from its header,
  its payload is never buffered). Each data message goes to the driver in order
  (``core/dispatch.py``); a ping is answered with a pong carrying its payload;
* the closing handshake (RFC 6455 §7): the side that closes first sends a close frame and waits
  for the other's; a peer's close is answered with its own code (an empty one with an empty
  close, a malformed one with the fault: 1002 or 1007), and the server then ends TCP (§7.1.1).
  A framing error closes with its code (1002, 1007, 1009). ``close_code`` is the code of the
  handshake, whichever side sent it first; after a close frame nothing more is sent (§5.5.1);
* output: the frames sent during one event-loop iteration are held and go out as one write at
  its end; a frame that is large alone, or that brings the held bytes to ``WRITE_THROUGH_BYTES``,
  goes out at once. A peer whose unsent bytes pass ``max_buffer`` is cut with 1013, so fan-out
  never waits on the slowest peer (docs/performance.md, slow consumers);
* its message rate: the session is its own token bucket, and reports an excess at most once per
  interval;
* what waits while a handler coroutine of it runs (``busy``, ``held``), in the order
  ``core/dispatch.py`` decides.

The server's ``Connection`` (``server/connection.py``) is a ``Session``: it inherits this class,
as it inherits the token bucket, so that each peer costs one small object with ``__slots__``, and
the per-frame paths (``receive_data``, ``send_frame``, ``flush``) make no call more than their
work needs. What is I/O, the subclass does, in the methods at the end of the class: write bytes,
arm the close timer, end TCP. The one thing a session asks its transport is whether it is
closing, before each send: a transport can start closing (a reset, an EOF) before its
``connection_lost`` tells anyone. A session never reads a clock: the caller passes ``now``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from polysignal.core.errors import CloseCode
from polysignal.core.limits import TokenBucket
from polysignal.protocols.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Fragments,
    FrameError,
    build_frame,
    close_frame,
    frame_header,
    parse_close,
    read_messages,
)

if TYPE_CHECKING:
    from polysignal.core.dispatch import Dispatch, Held

WRITE_THROUGH_BYTES = 16 * 1024
"""Held bytes that are written at once instead of at the end of the iteration: such a write is
worth its system call alone, and the transport's buffer (which the slow-consumer limit and the
relay's backpressure watch) then grows with big volumes as it would without batching."""

FAIL_GRACE = 2.0
"""Seconds a connection that broke the framing rules gets to answer the close frame."""

SLOW_GRACE = 1.0
"""Seconds a peer cut for not reading gets to answer the close frame."""

CLOSE_GRACE = 5.0
"""Seconds the peer gets to answer a close frame by default; then the socket is cut."""

NO_STATUS = 1005
"""The close code of a close frame that carried none (RFC 6455 §7.4.1)."""

SEND_BUFFER_FULL = "send buffer full"
"""The reason of the 1013 close of a peer that does not read."""

RATE_REPORT_INTERVAL = 1.0
"""Seconds between two reports of a connection's excess over its rate limit."""

EMPTY_CLOSE = build_frame(b"", OP_CLOSE)
"""The answer to a close frame that carried no code."""


def answer_close(payload: bytes) -> tuple[int, bytes]:
    """The close code a peer's close frame (its ``payload``) ends the handshake with, and the
    close frame that answers it: the same code (§5.5.1); for an empty close, ``NO_STATUS`` and an
    empty close; for a malformed one, the fault's code with its message as the reason."""
    try:
        code, _ = parse_close(payload)
    except FrameError as exc:
        return exc.close_code, close_frame(exc.close_code, exc.message)
    if code is None:
        return NO_STATUS, EMPTY_CLOSE
    return code, close_frame(code)


class Transport(Protocol):
    """What a session asks of its transport: whether it still takes bytes."""

    def is_closing(self) -> bool: ...


class Batch(Protocol):
    """Where a session with held frames waits for the end of the event-loop iteration, when the
    batch calls its ``flush`` (``server/connection.py``, ``WriteBatch``)."""

    def add(self, session: Session) -> None: ...


class Session(TokenBucket):
    """One WebSocket peer's protocol state and decisions; a subclass carries out the writes.

    It is its own rate limiter (one object per peer, not two).
    """

    __slots__ = (
        "_batch",
        "_buf",
        "_fragments",
        "_last_rate_report",
        "_need",
        "_pending",
        "_pending_bytes",
        "_sent_close",
        "_skip",
        "alive",
        "busy",
        "close_code",
        "closing",
        "driver",
        "held",
        "lost",
        "max_buffer",
        "max_frame",
        "transport",
    )

    def __init__(
        self,
        driver: Dispatch[Any],
        transport: Transport,
        batch: Batch,
        max_frame: int,
        max_buffer: int,
        rate: float,
        burst: int,
        now: float,
    ) -> None:
        TokenBucket.__init__(self, rate, burst, now)
        self.driver = driver
        self.transport = transport
        self.max_frame = max_frame
        self.max_buffer = max_buffer
        self.closing = False  # no more frames are accepted for sending or handled on receipt
        self.lost = False  # the transport is gone
        self.alive = True  # any bytes since the node's last ping sweep
        self.busy = False  # a handler coroutine of this connection is running (driver.py)
        # The close code of its closing handshake: the one sent first, by either side.
        self.close_code: int | None = None
        self.held: deque[Held] | None = None  # messages waiting while ``busy``
        self._last_rate_report = 0.0
        self._batch = batch
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0
        self._buf: bytearray | None = None  # an incomplete frame
        self._need = 0  # bytes ``_buf`` must reach before it is worth parsing again
        self._skip = 0  # bytes of a refused frame still to drop
        self._fragments: Fragments | None = None
        self._sent_close = False

    # --- input ---
    def receive_data(self, data: bytes) -> None:
        """Read ``data``: each data message goes to the driver, in order, unless the session is
        closing; a ping is answered; a close frame is answered and ends the reading; a framing
        error closes with its code."""
        self.alive = True
        self.driver.bytes_in += len(data)
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip :]
            self._skip = 0
        frames: bytes | bytearray = data
        buf = self._buf
        if buf is not None:
            buf += data
            if len(buf) < self._need:
                return
            frames = buf  # read in place: each payload is copied out of it once
            self._buf = None
        messages, used, self._fragments, error, need = read_messages(
            frames, self.max_frame, self._fragments
        )
        for opcode, payload in messages:
            if opcode <= OP_BINARY:
                if not self.closing:
                    self.driver.message(self, payload, opcode == OP_BINARY)
            elif opcode == OP_PING:
                self.driver.control_out += 1
                self.send_frame(build_frame(payload, OP_PONG))
            elif opcode == OP_CLOSE:
                self._close_received(payload)
                return
            if self.lost:
                return
        if error is not None:
            self._skip = max(0, used - len(frames))
            self._fail(error)
        elif used < len(frames):
            self._buf = bytearray(frames[used:])
            self._need = need

    def _close_received(self, payload: bytes) -> None:
        self.closing = True
        if self._sent_close:  # the peer's answer to our close: the server closes TCP (§7.1.1)
            self._end()
            return
        self.close_code, reply = answer_close(payload)
        self.flush()  # frames queued before the peer's close still go out, then the answer
        if self._sent_close:  # that flush cut a peer that does not read: its close went out
            self._end()
            return
        self._sent_close = True
        self._end(reply)

    def _fail(self, error: FrameError) -> None:
        """The peer broke the framing rules: close with the error's code, ignore its data (the
        incomplete frame went to the parser already)."""
        self._fragments = None
        if self._sent_close:
            self._end()
        else:
            self.close(error.close_code, error.message, grace=FAIL_GRACE)

    def transport_gone(self) -> bool:
        """The transport is gone: nothing more is read or sent. False if it already was."""
        if self.lost:
            return False
        self.lost = True
        self.closing = True
        self._pending = None
        self._buf = None
        self._fragments = None
        return True

    # --- output ---
    def send_frame(self, frame: bytes) -> bool:
        """Write a prebuilt frame (see ``build_frame``); False if the peer is gone or closing."""
        if self.closing:
            return False
        if self.transport.is_closing():
            self.closing = True
            return False
        pending = self._pending
        if pending is None:
            if len(frame) >= WRITE_THROUGH_BYTES:
                return self._write(frame, 1)
            self._pending = [frame]
            self._pending_bytes = len(frame)
            self._batch.add(self)
        else:
            pending.append(frame)
            self._pending_bytes += len(frame)
            if self._pending_bytes >= WRITE_THROUGH_BYTES:
                self.flush()
        return True

    def flush(self) -> None:
        """Write the frames held since the last flush, in order, as one write."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        # After the closing frame nothing may be sent (RFC 6455 §5.5.1).
        if self._sent_close or self.transport.is_closing():
            return
        self._write(pending[0] if len(pending) == 1 else b"".join(pending), len(pending))

    def send_message(self, payload: bytes, opcode: int = OP_TEXT) -> bool:
        """Write one message; a large one as its header and payload, without joining them."""
        if len(payload) < WRITE_THROUGH_BYTES:
            return self.send_frame(build_frame(payload, opcode))
        if self.closing:
            return False
        if self.transport.is_closing():
            self.closing = True
            return False
        self.flush()
        return self._write_parts(frame_header(len(payload), opcode), payload)

    def send_text(self, payload: bytes | str) -> bool:
        data = payload.encode() if isinstance(payload, str) else payload
        return self.send_frame(build_frame(data, OP_TEXT))

    def send_binary(self, payload: bytes) -> bool:
        return self.send_frame(build_frame(payload, OP_BINARY))

    def _wrote(self, size: int, frames: int, unsent: int) -> bool:
        """Count a write of ``frames`` whole frames, ``size`` bytes (``/metrics``: per write,
        not per frame, so a batch of frames costs one count); with ``unsent`` bytes now in the
        transport's buffer, cut a peer that does not read (1013): False then."""
        driver = self.driver
        driver.frames_out += frames
        driver.bytes_out += size
        if unsent <= self.max_buffer:
            return True
        driver.slow_cuts += 1
        self._not_reading()
        self.close(CloseCode.TRY_AGAIN_LATER, SEND_BUFFER_FULL, grace=SLOW_GRACE)
        return False

    # --- input limits ---
    def should_report_rate_limit(self, now: float, every: float = RATE_REPORT_INTERVAL) -> bool:
        """True at most once per ``every`` seconds, so a flood gets one error, not one per frame."""
        if now - self._last_rate_report >= every:
            self._last_rate_report = now
            return True
        return False

    def hold(self, item: Held) -> None:
        """Keep ``item`` (a data message, or None for the transport's end) until the handler
        that is running ends (``core/dispatch.py``)."""
        held = self.held
        if held is None:
            held = self.held = deque()
        held.append(item)

    # --- closing ---
    def close(
        self, code: int = CloseCode.NORMAL, reason: str = "", grace: float = CLOSE_GRACE
    ) -> None:
        """Start the closing handshake with ``code``; idempotent. Frames queued before it still
        go out; after ``grace`` seconds without the peer's answer the socket is cut."""
        if self._sent_close or self.lost:
            return
        self.closing = True
        self.flush()
        if self._sent_close:  # that flush cut a peer that does not read, with its own close
            return
        self._sent_close = True
        if self.close_code is None:
            self.close_code = code
        self._write_close(close_frame(code, reason), grace)

    # --- what the subclass does: the I/O ---
    def _write(self, data: bytes, frames: int) -> bool:
        """Write ``data`` (``frames`` whole frames) now; return what ``_wrote`` says of it."""
        raise NotImplementedError

    def _write_parts(self, header: bytes, payload: bytes) -> bool:
        """Write one frame as its ``header`` and ``payload``; return what ``_wrote`` says."""
        raise NotImplementedError

    def _write_close(self, frame: bytes, grace: float) -> None:
        """Write the close ``frame`` unless the transport is closing; cut the socket if the
        peer has not answered within ``grace`` seconds."""
        raise NotImplementedError

    def _end(self, last: bytes = b"") -> None:
        """Write ``last`` (a close frame answering the peer's), then end TCP."""
        raise NotImplementedError

    def _not_reading(self) -> None:
        """Tell the operator that the peer is being cut for not reading."""
        raise NotImplementedError
