"""One WebSocket peer and its single write path (STYLE.md habit 2).

Writes never await: frames go to the transport, and a peer whose unsent bytes pass
``send_buffer_bytes`` is closed with 1013 instead of growing memory, so fan-out never waits on the
slowest peer (DESIGN.md §4, slow consumers).

The connections of one event loop share a ``WriteBatch``: the frames a peer is sent during one
loop iteration go out as one ``transport.write`` at its end. Profiling the fan-out benchmark
(bench/README.md) showed one ``send()`` system call per subscriber per publish as the largest cost;
under load a peer receives several publishes per iteration, and batching turns them into one call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from contextlib import suppress
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from polysignal.core.errors import CloseCode
from polysignal.core.limits import TokenBucket
from polysignal.server.frames import OP_BINARY, OP_TEXT, build_frame

log = logging.getLogger("polysignal.server")

_ids = itertools.count(1)


PING_FRAME = b"\x89\x00"
"""An empty WebSocket ping (RFC 6455 §5.5.2), the same bytes for every peer."""


class WebSocket(web.WebSocketResponse):
    """aiohttp's WebSocketResponse with polysignal's liveness and close reasons.

    Pings are answered here and any frame, pong included, marks the peer ``alive``; the node's
    one ping sweep (``Node``) pings every peer each ``PING_INTERVAL`` and closes those that stayed
    silent since the last sweep, as y-webrtc's server does. One sweep per node instead of a timer
    per connection keeps idle connections smaller (bench/README.md, S3).
    """

    alive = True

    async def receive(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 (aiohttp API)
        while True:
            msg = await super().receive(timeout)
            self.alive = True
            if msg.type is WSMsgType.PING:
                with suppress(ConnectionError, RuntimeError):
                    await self.pong(msg.data)
            elif msg.type is not WSMsgType.PONG:
                return msg

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == CloseCode.MESSAGE_TOO_BIG and not message:
            message = b"Message too large"
        return await super().close(code=code, message=message, drain=drain)


WRITE_THROUGH_BYTES = 16 * 1024
"""Held bytes that are written at once instead of at the end of the iteration: such a write is
worth its system call alone, and the transport's buffer (which the slow-consumer limit and the
relay's backpressure watch) then grows with big volumes as it would without batching."""


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


_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteBatch] = (
    weakref.WeakKeyDictionary()
)


def loop_batch() -> WriteBatch:
    """The running loop's WriteBatch (one per loop, so in-process test nodes stay apart)."""
    loop = asyncio.get_running_loop()
    batch = _batches.get(loop)
    if batch is None:
        batch = _batches[loop] = WriteBatch()
    return batch


class Connection:
    """A prepared WebSocket with its rate limiter and bounded output."""

    __slots__ = (
        "__weakref__",
        "_batch",
        "_bucket",
        "_close_task",
        "_last_rate_error",
        "_pending",
        "_pending_bytes",
        "address",
        "closing",
        "id",
        "max_buffer",
        "protocol",
        "state",
        "transport",
        "ws",
    )

    def __init__(
        self,
        ws: WebSocket,
        transport: asyncio.Transport,
        *,
        address: str,
        protocol: str,
        max_buffer: int,
        rate: float,
        burst: int,
        batch: WriteBatch | None = None,
    ) -> None:
        self.id = next(_ids)
        self.ws = ws
        self.transport = transport
        self.address = address
        self.protocol = protocol
        self.max_buffer = max_buffer
        self.closing = False
        self._bucket = TokenBucket(rate, burst, time.monotonic())
        self._last_rate_error = 0.0
        self._close_task: asyncio.Task[None] | None = None
        self._batch = batch if batch is not None else loop_batch()
        self._pending: list[bytes] | None = None
        self._pending_bytes = 0
        # Free slot for the protocol handler's per-connection state.
        self.state: Any = None

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {self.protocol} {self.address}>"

    # --- output ---
    def send_frame(self, frame: bytes) -> bool:
        """Write a prebuilt frame (see ``frames.build_frame``); False if the peer is gone."""
        if self.closing:
            return False
        if self.transport.is_closing():
            self.closing = True
            return False
        pending = self._pending
        if pending is None:
            if len(frame) >= WRITE_THROUGH_BYTES:
                return self._write(frame)
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
        # Frames queued before ``close()`` still go out; after the closing frame (aiohttp
        # answers a client's close at once) nothing may be sent (RFC 6455 §5.5.1).
        if self.transport.is_closing() or self.ws.closed:
            return
        self._write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _write(self, data: bytes) -> bool:
        transport = self.transport
        transport.write(data)
        if transport.get_write_buffer_size() > self.max_buffer:
            log.warning("%r is not reading: %d bytes unsent, closing", self, self.max_buffer)
            self.close(CloseCode.TRY_AGAIN_LATER, "send buffer full", grace=1.0)
            return False
        return True

    def send_text(self, payload: bytes | str) -> bool:
        data = payload.encode() if isinstance(payload, str) else payload
        return self.send_frame(build_frame(data, OP_TEXT))

    def send_binary(self, payload: bytes) -> bool:
        return self.send_frame(build_frame(payload, OP_BINARY))

    # --- input limits ---
    def allow_message(self) -> bool:
        """Take one token from the connection's rate bucket."""
        return self._bucket.allow(time.monotonic())

    def should_report_rate_limit(self, every: float = 1.0) -> bool:
        """True at most once per ``every`` seconds, so a flood gets one error, not one per frame."""
        now = time.monotonic()
        if now - self._last_rate_error >= every:
            self._last_rate_error = now
            return True
        return False

    # --- closing ---
    def close(self, code: int = CloseCode.NORMAL, reason: str = "", grace: float = 5.0) -> None:
        """Start closing with ``code``; idempotent; after ``grace`` seconds the socket is cut."""
        if self._close_task is not None:
            return
        self.closing = True
        self._close_task = asyncio.get_running_loop().create_task(
            self._close(code, reason.encode()[:123], grace)
        )

    async def _close(self, code: int, reason: bytes, grace: float) -> None:
        try:
            async with asyncio.timeout(grace):
                await self.ws.close(code=code, message=reason)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            if not self.transport.is_closing():
                self.transport.abort()

    async def wait_closed(self) -> None:
        if self._close_task is not None:
            with suppress(Exception):
                await self._close_task
