"""One WebSocket peer after the upgrade: framing on the transport, and its single write path.

A ``Connection`` is the transport's protocol once the front door (``server/frontdoor.py``) has
answered the upgrade. It is callback-driven: bytes arrive in ``data_received``, are cut into
messages by ``protocols/websocket.py``, and each data message goes to the connection's
``Driver`` (``server/driver.py``), which hands it to the protocol. An idle connection holds no
task, no timer and no buffer: only the small object below, with ``__slots__``.

Writes never await: frames go to the transport, and a peer whose unsent bytes pass
``send_buffer_bytes`` is closed with 1013 instead of growing memory, so fan-out never waits on the
slowest peer (docs/performance.md, slow consumers).

The connections of one node share a ``WriteBatch``: the frames a peer is sent during one
event-loop iteration go out as one ``transport.write`` at its end. Profiling the fan-out benchmark
(docs/performance.md) showed one ``send()`` system call per subscriber per publish as the largest
cost; under load a peer receives several publishes per iteration, and batching turns them into
one call.

Closing follows RFC 6455 §7: the side that closes first sends a close frame and waits (at most
``grace`` seconds) for the other's; the server then closes TCP. A framing error closes with its
code (1002, 1007, 1009); the bytes of the offending frame are skipped without being buffered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

from polysignal.core.errors import CloseCode
from polysignal.core.limits import TokenBucket
from polysignal.logs import more
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
    from polysignal.core.auth import Identity
    from polysignal.server.driver import Driver

log = logging.getLogger("polysignal.server")

_ids = itertools.count(1)

WRITE_THROUGH_BYTES = 16 * 1024
"""Held bytes that are written at once instead of at the end of the iteration: such a write is
worth its system call alone, and the transport's buffer (which the slow-consumer limit and the
relay's backpressure watch) then grows with big volumes as it would without batching."""

FAIL_GRACE = 2.0
"""Seconds a connection that broke the framing rules gets to answer the close frame."""

_EMPTY_CLOSE = build_frame(b"", OP_CLOSE)

NO_STATUS = 1005
"""The close code of a close frame that carried none (RFC 6455 §7.4.1)."""


class WriteBatch:
    """The connections sent frames during this event-loop iteration; flushed at its end."""

    __slots__ = ("_dirty", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[Connection] = []
        self._scheduled = False

    def add(self, conn: Connection) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn.flush()
            except Exception:  # one broken transport must not hold back the others' frames
                log.exception("%r: flushing its frames failed", conn)


class Connection(TokenBucket, asyncio.Protocol):
    """A WebSocket peer: its transport, its framing state, its bounded output. It is its own
    rate limiter (one object per peer, not two)."""

    __slots__ = (
        "_batch",
        "_buf",
        "_drained",
        "_fragments",
        "_held",
        "_last_rate_report",
        "_need",
        "_pending",
        "_pending_bytes",
        "_sent_close",
        "_skip",
        "_timer",
        "_write_paused",
        "address",
        "alive",
        "busy",
        "close_code",
        "closing",
        "driver",
        "id",
        "identity",
        "lost",
        "max_buffer",
        "max_frame",
        "peer_id",
        "started",
        "state",
        "transport",
    )

    def __init__(
        self,
        driver: Driver,
        transport: asyncio.Transport,
        address: str,
        max_frame: int,
        max_buffer: int,
        rate: float,
        burst: int,
        batch: WriteBatch,
    ) -> None:
        self.id = next(_ids)
        self.driver = driver
        self.transport = transport
        self.address = address
        self.max_frame = max_frame
        self.max_buffer = max_buffer
        self.closing = False  # no more frames are accepted for sending or handled on receipt
        self.lost = False  # the transport is gone
        self.alive = True  # any bytes since the node's last ping sweep
        self.busy = False  # a handler coroutine of this connection is running (driver.py)
        self.started = now = time.monotonic()
        TokenBucket.__init__(self, rate, burst, now)
        # The protocol's id of its peer once known (a hub sets it), for the log lines.
        self.peer_id: str | None = None
        # The close code of its closing handshake: the one sent first, by either side.
        self.close_code: int | None = None
        self._last_rate_report = 0.0
        self._batch = batch
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0
        self._buf: bytearray | None = None  # an incomplete frame
        self._need = 0  # bytes ``_buf`` must reach before it is worth parsing again
        self._skip = 0  # bytes of a refused frame still to drop
        self._fragments: Fragments | None = None
        self._held: Any = None  # messages waiting while ``busy`` (driver.py)
        self._sent_close = False
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False  # the transport's buffer is above its high-water mark
        self._drained: asyncio.Future[None] | None = None  # someone waits for it to drain
        # Free slot for the protocol handler's per-connection state.
        self.state: Any = None
        # Who the client is, when its protocol requires authentication (server/auth.py).
        self.identity: Identity | None = None

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {self.driver.protocol} {self.address}>"

    @property
    def protocol(self) -> str:
        return self.driver.protocol

    def log_extra(self) -> dict[str, Any]:
        """The context of a log line about this connection (``extra=``): its id (a counter per
        node process), protocol, remote address and the protocol's peer id (None until known)."""
        return {
            "conn_id": self.id,
            "protocol": self.driver.protocol,
            "remote": self.address,
            "peer_id": self.peer_id,
        }

    # --- input ---
    def data_received(self, chunk: bytes) -> None:
        self.alive = True
        self.driver.bytes_in += len(chunk)
        if self._skip:
            if len(chunk) <= self._skip:
                self._skip -= len(chunk)
                return
            chunk = chunk[self._skip :]
            self._skip = 0
        data: bytes | bytearray = chunk
        buf = self._buf
        if buf is not None:
            buf += chunk
            if len(buf) < self._need:
                return
            data = buf  # read in place: each payload is copied out of it once
            self._buf = None
        messages, used, self._fragments, error, need = read_messages(
            data, self.max_frame, self._fragments
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
            self._skip = max(0, used - len(data))
            self._fail(error)
        elif used < len(data):
            self._buf = bytearray(data[used:])
            self._need = need

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def _close_received(self, payload: bytes) -> None:
        self.closing = True
        if self._sent_close:  # the peer's answer to our close: the server closes TCP (§7.1.1)
            self.transport.close()
            return
        try:
            code, _ = parse_close(payload)
        except FrameError as exc:
            reply = close_frame(exc.close_code, exc.message)
            self.close_code = exc.close_code
        else:
            reply = _EMPTY_CLOSE if code is None else close_frame(code)
            self.close_code = NO_STATUS if code is None else code
        self.flush()  # frames queued before the peer's close still go out, then the answer
        self._sent_close = True
        self.transport.write(reply)
        self.transport.close()

    def _fail(self, error: FrameError) -> None:
        """The peer broke the framing rules: close with the error's code, ignore its data."""
        log.debug("%r: %s; closing with %d", self, error.message, error.close_code)
        self._buf = None
        self._fragments = None
        if self._sent_close:
            self.transport.close()
        else:
            self.close(error.close_code, error.message, grace=FAIL_GRACE)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.lost:
            return
        self.lost = True
        self.closing = True
        self._pending = None
        self._buf = None
        self._fragments = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.resume_writing()  # nobody waits for a drain that cannot come
        self.driver.closed(self)

    # --- flow control (asyncio.Protocol) ---
    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drained = self._drained
        if drained is not None:
            self._drained = None
            if not drained.done():
                drained.set_result(None)

    async def drained(self) -> None:
        """Wait until the transport's buffer is below its low-water mark, if it went above the
        high-water mark: a writer that waits here is slowed to its reader's pace instead of
        filling the send buffer (and being cut at it). Bound the wait with a timeout."""
        if self.transport.get_protocol() is not self:
            # A WebSocket served through aiohttp's protocol (a kept-alive connection): the
            # transport tells aiohttp, not us, when its buffer drains. Polled, only while behind.
            low = self.transport.get_write_buffer_limits()[0]
            while not self.lost and self.unsent_bytes() > low:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return
        if not self._write_paused or self.lost:
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)

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

    def _write(self, data: bytes, frames: int) -> bool:
        """Write ``data``, ``frames`` whole frames, and count them (``/metrics``): per write,
        not per frame, so a batch of frames costs one count."""
        self.transport.write(data)
        driver = self.driver
        driver.frames_out += frames
        driver.bytes_out += len(data)
        return self._check_buffer()

    def _check_buffer(self) -> bool:
        """Cut a peer that does not read (1013) once its unsent bytes pass the limit."""
        if self.transport.get_write_buffer_size() > self.max_buffer:
            self.driver.slow_cuts += 1
            held = self.driver.throttle.allow("not reading")  # a slow fan-out cuts many at once
            if held is not None:
                log.warning(
                    "%r is not reading: %d bytes unsent, closing%s",
                    self,
                    self.max_buffer,
                    more(held),
                )
            self.close(CloseCode.TRY_AGAIN_LATER, "send buffer full", grace=1.0)
            return False
        return True

    def send_message(self, payload: bytes, opcode: int = OP_TEXT) -> bool:
        """Write one message; a large one as its header and payload, without joining them."""
        if len(payload) < WRITE_THROUGH_BYTES:
            return self.send_frame(build_frame(payload, opcode))
        if self.closing:
            return False
        transport = self.transport
        if transport.is_closing():
            self.closing = True
            return False
        self.flush()
        header = frame_header(len(payload), opcode)
        transport.writelines((header, payload))
        driver = self.driver
        driver.frames_out += 1
        driver.bytes_out += len(header) + len(payload)
        return self._check_buffer()

    def send_text(self, payload: bytes | str) -> bool:
        data = payload.encode() if isinstance(payload, str) else payload
        return self.send_frame(build_frame(data, OP_TEXT))

    def send_binary(self, payload: bytes) -> bool:
        return self.send_frame(build_frame(payload, OP_BINARY))

    @property
    def writing_paused(self) -> bool:
        """The transport holds more unsent bytes than its high-water mark."""
        if self.transport.get_protocol() is not self:
            return self.unsent_bytes() > self.transport.get_write_buffer_limits()[1]
        return self._write_paused

    def unsent_bytes(self) -> int:
        """Bytes written for this peer that its transport has not sent yet."""
        return self.transport.get_write_buffer_size()

    # --- input limits ---
    def allow_message(self) -> bool:
        """Take one token from the connection's rate bucket."""
        return self.allow(time.monotonic())

    def set_rate_limit(self, rate: float, burst: int) -> None:
        """Replace the connection's rate limit (``rate`` 0: none)."""
        TokenBucket.__init__(self, rate, burst, time.monotonic())

    def should_report_rate_limit(self, every: float = 1.0) -> bool:
        """True at most once per ``every`` seconds, so a flood gets one error, not one per frame."""
        now = time.monotonic()
        if now - self._last_rate_report >= every:
            self._last_rate_report = now
            return True
        return False

    # --- closing ---
    def close(self, code: int = CloseCode.NORMAL, reason: str = "", grace: float = 5.0) -> None:
        """Start the closing handshake with ``code``; idempotent. Frames queued before it still
        go out; after ``grace`` seconds without the peer's answer the socket is cut."""
        if self._sent_close or self.lost:
            return
        self.closing = True
        self.flush()
        self._sent_close = True
        if self.close_code is None:
            self.close_code = code
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(close_frame(code, reason))
        self._timer = asyncio.get_running_loop().call_later(grace, transport.abort)

    def abort(self) -> None:
        """Cut the connection at once, without a closing handshake."""
        self.closing = True
        if not self.transport.is_closing():
            self.transport.abort()
