"""One WebSocket peer and its single write path (STYLE.md habit 2).

Writes never await: frames go straight to the transport, and a peer whose unsent bytes pass
``send_buffer_bytes`` is closed with 1013 instead of growing memory, so fan-out never waits on the
slowest peer (DESIGN.md §4, slow consumers).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from contextlib import suppress
from typing import Any

from aiohttp import WSCloseCode, web

from polysignal.core.errors import CloseCode
from polysignal.core.limits import TokenBucket
from polysignal.server.frames import OP_BINARY, OP_TEXT, build_frame

log = logging.getLogger("polysignal.server")

_ids = itertools.count(1)


class WebSocket(web.WebSocketResponse):
    """aiohttp's WebSocketResponse, closing oversize frames with Flow-Like's reason text."""

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if code == CloseCode.MESSAGE_TOO_BIG and not message:
            message = b"Message too large"
        return await super().close(code=code, message=message, drain=drain)


class Connection:
    """A prepared WebSocket with its rate limiter and bounded output."""

    __slots__ = (
        "__weakref__",
        "_bucket",
        "_close_task",
        "_last_rate_error",
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
        # Free slot for the protocol handler's per-connection state.
        self.state: Any = None

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {self.protocol} {self.address}>"

    # --- output ---
    def send_frame(self, frame: bytes) -> bool:
        """Write a prebuilt frame (see ``frames.build_frame``); False if the peer is gone."""
        if self.closing:
            return False
        transport = self.transport
        if transport.is_closing():
            self.closing = True
            return False
        transport.write(frame)
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
