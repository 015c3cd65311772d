"""Streams: ordered, flow-controlled byte streams to a connection on another node.

A relay pipe whose two sockets are on different nodes is two streams, one each way. A stream
carries frames (opcode and payload, so text and binary keep their type) from a local connection
to one on another node, over the backend's direct delivery:

* in order: one sender at a time per stream, batching what queued meanwhile (at most
  ``batch_bytes`` per message unless one frame is larger);
* with a credit window: at most ``window`` bytes may be on their way, not yet acknowledged by
  the receiving node, which acknowledges them once its client has read them (``StreamSink.deliver``
  returns when it has). A slow reader on one node slows the writer on the other instead of being
  cut off;
* bounded on the sending side too: ``send`` returns something to wait for once more than
  ``outbox_bytes`` are queued, and the caller stops reading its client meanwhile;
* ended at both ends together: ``close`` sends what is queued, then tells the other end; a
  message the other node cannot take (it is gone), or a window that stays full for
  ``wait_timeout`` seconds, ends the stream on this side (``StreamSink.ended``).

A stream holds a task only while it has something to send. Its queue, batches, window and
messages are core/stream.py's, without I/O; here are the sending, the waiting and the timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Protocol

from polysignal.backends.base import Backend
from polysignal.core.errors import BackendUnavailable
from polysignal.core.stream import (
    ACK,
    BATCH_BYTES,
    CLOSE,
    DATA,
    Frame,
    StreamLimits,
    StreamState,
    ack_message,
    close_message,
    data_message,
    parse_ack,
    parse_close,
    parse_data,
)

__all__ = ["ACK", "CLOSE", "DATA", "Frame", "Stream", "StreamSink", "Streams"]

log = logging.getLogger("polysignal.stream")


class StreamSink(Protocol):
    """The local end of a stream: where the frames from the other node go."""

    def deliver(self, frames: list[Frame]) -> Awaitable[None] | None:
        """Write ``frames`` to the local client; what is returned completes once the client has
        read them (None: at once). The sender's credit comes back then."""

    def ended(self, reason: str) -> None:
        """The stream is over: the other end closed, or its node cannot be reached."""


class Stream(StreamState):
    """This node's end of one stream: frames out to ``peer`` on ``node``, frames in to ``sink``
    (its queue and window: ``StreamState``)."""

    __slots__ = ("_acked", "_pump", "_room", "_streams", "id", "node", "peer", "sink")

    def __init__(self, streams: Streams, stream_id: str, node: str, peer: str, sink: StreamSink):
        super().__init__()
        self._streams = streams
        self.id = stream_id
        self.node = node
        self.peer = peer
        self.sink = sink
        self._pump: asyncio.Task[None] | None = None
        self._acked: asyncio.Event | None = None
        self._room: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<Stream {self.id} -> {self.peer}@{self.node}>"

    # --- sending ---
    def send(self, opcode: int, data: bytes) -> Awaitable[None] | None:
        """Queue one frame for the other end. Returns something to await (before reading more
        from the client) while more than ``outbox_bytes`` are queued; None otherwise."""
        full = self.push(opcode, data, self._streams.limits)
        if full is None:
            return None
        self._start_pump()
        return self._wait_for_room() if full else None

    async def _wait_for_room(self) -> None:
        room = self._room = self._room or asyncio.Event()
        room.clear()
        try:
            async with asyncio.timeout(self._streams.wait_timeout):
                await room.wait()
        except TimeoutError:
            self._end("the peer's node is too slow")

    def close(self) -> None:
        """The local connection is gone: send what is queued, then tell the other end."""
        if self.start_closing():
            self._start_pump()

    def _start_pump(self) -> None:
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run())
            self._streams._tasks.add(self._pump)

    async def _run(self) -> None:
        streams = self._streams
        limits = streams.limits
        try:
            while self.sending:
                frames, size, room = self.next_batch(limits)
                if room and self._room is not None:
                    self._room.set()
                await self._wait_for_credit(size)
                self.sent(size)
                message = data_message(self.peer, self.id, frames)
                if not await streams.backend.send_direct(self.node, DATA, message):
                    raise BackendUnavailable(f"node {self.node} is gone")
            if self.finish():
                streams._forget(self)
                await streams.backend.send_direct(self.node, CLOSE, close_message(self.peer))
        except BackendUnavailable as exc:
            log.debug("%r: %s", self, exc)
            self._end("the peer's node is unreachable")
        finally:
            if self._pump is not None:
                streams._tasks.discard(self._pump)
            self._pump = None
            if self._room is not None:
                self._room.set()  # never leave a reader waiting for a pump that stopped
            if self.sending:
                self._start_pump()  # frames queued while the last send was on its way

    async def _wait_for_credit(self, size: int) -> None:
        limits = self._streams.limits
        while self.blocked(size, limits):
            acked = self._acked = self._acked or asyncio.Event()
            acked.clear()
            try:
                async with asyncio.timeout(self._streams.wait_timeout):
                    await acked.wait()
            except TimeoutError:
                raise BackendUnavailable("the peer's client stopped reading") from None

    def _acknowledged(self, size: int) -> None:
        self.acknowledged(size)
        if self._acked is not None:
            self._acked.set()

    def _end(self, reason: str) -> None:
        """End on this side: nothing more is sent or delivered; the sink is told."""
        if not self.end():
            return
        self._streams._forget(self)
        if self._acked is not None:
            self._acked.set()
        self.sink.ended(reason)


class Streams:
    """The streams of this node's connections; one set per protocol that uses them."""

    def __init__(
        self,
        backend: Backend,
        *,
        window: int,
        outbox_bytes: int,
        wait_timeout: float,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        self.backend = backend
        self.limits = StreamLimits.of(window, outbox_bytes, batch_bytes)
        self.wait_timeout = wait_timeout
        self._streams: dict[str, Stream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        backend.on_direct(DATA, self._on_data)
        backend.on_direct(ACK, self._on_ack)
        backend.on_direct(CLOSE, self._on_close)

    def open(self, stream_id: str, node: str, peer: str, sink: StreamSink) -> Stream:
        """This node's end ``stream_id`` of a stream to ``peer`` on ``node``."""
        stream = Stream(self, stream_id, node, peer, sink)
        self._streams[stream_id] = stream
        return stream

    def get(self, stream_id: str) -> Stream | None:
        return self._streams.get(stream_id)

    def discard(self, stream: Stream) -> None:
        """Drop a stream that never carried anything (the pipe it was opened for did not come
        about), without telling either end."""
        stream.ended = True
        self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]

    # --- from other nodes ---
    def _on_data(self, origin: str, payload: bytes) -> None:
        message = parse_data(payload)
        stream = self._streams.get(message.to)
        if stream is None or stream.ended:
            return  # closed meanwhile: its close tells the sender
        read = stream.sink.deliver(message.frames)
        task = asyncio.get_running_loop().create_task(
            self._ack_when_read(read, origin, message.sender, message.size)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ack_when_read(
        self, read: Awaitable[None] | None, node: str, sender: str, size: int
    ) -> None:
        if read is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.wait_timeout):
                    await read
        with contextlib.suppress(BackendUnavailable):
            await self.backend.send_direct(node, ACK, ack_message(sender, size))

    def _on_ack(self, origin: str, payload: bytes) -> None:
        to, size = parse_ack(payload)
        stream = self._streams.get(to)
        if stream is not None:
            stream._acknowledged(size)

    def _on_close(self, origin: str, payload: bytes) -> None:
        stream = self._streams.get(parse_close(payload))
        if stream is not None:
            stream._end("peer closed")

    async def close(self) -> None:
        """Stop every stream's sending (node shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
