"""One WebSocket peer after the upgrade: its transport, and the I/O of its single write path.

A ``Connection`` is the transport's protocol once the front door (``server/frontdoor.py``) has
answered the upgrade. It is a ``Session`` (``core/websocket.py``), which holds RFC 6455's state
and makes every decision: bytes arrive in ``data_received`` (the session's ``receive_data``),
each data message goes to the connection's ``Driver`` (``server/driver.py``), which hands it to
the protocol. What is left here is the transport's side: writes, the close timer, the end of TCP,
and the flow control of a writer that waits for a slow reader. An idle connection holds no task,
no timer and no buffer: only the small object below, with ``__slots__``.

Writes never await: frames go to the transport, and a peer whose unsent bytes pass
``send_buffer_bytes`` is closed with 1013 instead of growing memory, so fan-out never waits on the
slowest peer (docs/performance.md, slow consumers).

The connections of one node share a ``WriteBatch``: the frames a peer is sent during one
event-loop iteration go out as one ``transport.write`` at its end. Profiling the fan-out benchmark
(docs/performance.md) showed one ``send()`` system call per subscriber per publish as the largest
cost; under load a peer receives several publishes per iteration, and batching turns them into
one call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

from polysignal.core.limits import TokenBucket
from polysignal.core.websocket import Session
from polysignal.logs import more
from polysignal.protocols.websocket import FrameError

if TYPE_CHECKING:
    from polysignal.core.auth import Identity
    from polysignal.server.driver import Driver

log = logging.getLogger("polysignal.server")

_ids = itertools.count(1)


class WriteBatch:
    """The connections sent frames during this event-loop iteration; flushed at its end."""

    __slots__ = ("_dirty", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[Session] = []
        self._scheduled = False

    def add(self, session: Session) -> None:
        self._dirty.append(session)
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


class Connection(Session, asyncio.Protocol):
    """A WebSocket peer: a ``Session`` on its transport. It is its own rate limiter and its own
    protocol state (one object per peer, not three)."""

    __slots__ = (
        "_drained",
        "_timer",
        "_write_paused",
        "address",
        "id",
        "identity",
        "peer_id",
        "started",
        "state",
    )

    driver: Driver
    transport: asyncio.Transport

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
        self.address = address
        self.started = now = time.monotonic()
        Session.__init__(self, driver, transport, batch, max_frame, max_buffer, rate, burst, now)
        # The protocol's id of its peer once known (a hub sets it), for the log lines.
        self.peer_id: str | None = None
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
    data_received = Session.receive_data

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def _fail(self, error: FrameError) -> None:
        log.debug("%r: %s; closing with %d", self, error.message, error.close_code)
        Session._fail(self, error)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.transport_gone():
            return
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

    @property
    def writing_paused(self) -> bool:
        """The transport holds more unsent bytes than its high-water mark."""
        if self.transport.get_protocol() is not self:
            return self.unsent_bytes() > self.transport.get_write_buffer_limits()[1]
        return self._write_paused

    def unsent_bytes(self) -> int:
        """Bytes written for this peer that its transport has not sent yet."""
        return self.transport.get_write_buffer_size()

    # --- output: the session's writes ---
    def _write(self, data: bytes, frames: int) -> bool:
        transport = self.transport
        transport.write(data)
        return self._wrote(len(data), frames, transport.get_write_buffer_size())

    def _write_parts(self, header: bytes, payload: bytes) -> bool:
        transport = self.transport
        transport.writelines((header, payload))
        return self._wrote(len(header) + len(payload), 1, transport.get_write_buffer_size())

    def _not_reading(self) -> None:
        held = self.driver.throttle.allow("not reading")  # a slow fan-out cuts many at once
        if held is not None:
            log.warning(
                "%r is not reading: %d bytes unsent, closing%s", self, self.max_buffer, more(held)
            )

    # --- input limits ---
    def set_rate_limit(self, rate: float, burst: int) -> None:
        """Replace the connection's rate limit (``rate`` 0: none)."""
        TokenBucket.__init__(self, rate, burst, time.monotonic())

    # --- closing ---
    def _write_close(self, frame: bytes, grace: float) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(frame)
        self._timer = asyncio.get_running_loop().call_later(grace, transport.abort)

    def _end(self, last: bytes = b"") -> None:
        if last:
            self.transport.write(last)
        self.transport.close()

    def abort(self) -> None:
        """Cut the connection at once, without a closing handshake."""
        self.closing = True
        if not self.transport.is_closing():
            self.transport.abort()
