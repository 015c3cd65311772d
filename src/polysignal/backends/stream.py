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

A stream holds a task only while it has something to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable
from typing import Any, Protocol

import msgpack

from polysignal.backends.base import Backend
from polysignal.core.errors import BackendUnavailable, MalformedFrame

log = logging.getLogger("polysignal.stream")

DATA = "stream.data"
ACK = "stream.ack"
CLOSE = "stream.close"

Frame = tuple[int, bytes]


class StreamSink(Protocol):
    """The local end of a stream: where the frames from the other node go."""

    def deliver(self, frames: list[Frame]) -> Awaitable[None] | None:
        """Write ``frames`` to the local client; what is returned completes once the client has
        read them (None: at once). The sender's credit comes back then."""

    def ended(self, reason: str) -> None:
        """The stream is over: the other end closed, or its node cannot be reached."""


class Stream:
    """This node's end of one stream: frames out to ``peer`` on ``node``, frames in to ``sink``."""

    __slots__ = (
        "_acked",
        "_closing",
        "_outbox",
        "_outbox_bytes",
        "_pump",
        "_room",
        "_streams",
        "ended",
        "id",
        "node",
        "peer",
        "sink",
        "unacked",
    )

    def __init__(self, streams: Streams, stream_id: str, node: str, peer: str, sink: StreamSink):
        self._streams = streams
        self.id = stream_id
        self.node = node
        self.peer = peer
        self.sink = sink
        self.unacked = 0  # bytes sent, not yet acknowledged by the receiving node
        self.ended = False
        self._outbox: deque[Frame] = deque()
        self._outbox_bytes = 0
        self._closing = False
        self._pump: asyncio.Task[None] | None = None
        self._acked: asyncio.Event | None = None
        self._room: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<Stream {self.id} -> {self.peer}@{self.node}>"

    # --- sending ---
    def send(self, opcode: int, data: bytes) -> Awaitable[None] | None:
        """Queue one frame for the other end. Returns something to await (before reading more
        from the client) while more than ``outbox_bytes`` are queued; None otherwise."""
        if self.ended or self._closing:
            return None
        self._outbox.append((opcode, data))
        self._outbox_bytes += len(data)
        self._start_pump()
        limit = self._streams.outbox_bytes
        if limit and self._outbox_bytes > limit:
            return self._wait_for_room()
        return None

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
        if self.ended or self._closing:
            return
        self._closing = True
        self._start_pump()

    def _start_pump(self) -> None:
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._run())
            self._streams._tasks.add(self._pump)

    async def _run(self) -> None:
        streams = self._streams
        try:
            while self._outbox and not self.ended:
                batch: list[Frame] = []
                size = 0
                while self._outbox and (
                    not batch or size + len(self._outbox[0][1]) <= streams.batch_bytes
                ):
                    frame = self._outbox.popleft()
                    batch.append(frame)
                    size += len(frame[1])
                self._outbox_bytes -= size
                if self._room is not None and self._outbox_bytes <= streams.outbox_bytes // 2:
                    self._room.set()
                await self._wait_for_credit(size)
                self.unacked += size
                message = _pack([self.peer, self.id, [item for f in batch for item in f]])
                if not await streams.backend.send_direct(self.node, DATA, message):
                    raise BackendUnavailable(f"node {self.node} is gone")
            if self._closing and not self.ended:
                self.ended = True
                streams._forget(self)
                await streams.backend.send_direct(self.node, CLOSE, _pack([self.peer]))
        except BackendUnavailable as exc:
            log.debug("%r: %s", self, exc)
            self._end("the peer's node is unreachable")
        finally:
            if self._pump is not None:
                streams._tasks.discard(self._pump)
            self._pump = None
            if self._room is not None:
                self._room.set()  # never leave a reader waiting for a pump that stopped
            if self._outbox and not self.ended:
                self._start_pump()  # frames queued while the last send was on its way

    async def _wait_for_credit(self, size: int) -> None:
        window = self._streams.window
        while self.unacked and self.unacked + size > window and not self.ended:
            acked = self._acked = self._acked or asyncio.Event()
            acked.clear()
            try:
                async with asyncio.timeout(self._streams.wait_timeout):
                    await acked.wait()
            except TimeoutError:
                raise BackendUnavailable("the peer's client stopped reading") from None

    def _acknowledged(self, size: int) -> None:
        self.unacked = max(0, self.unacked - size)
        if self._acked is not None:
            self._acked.set()

    def _end(self, reason: str) -> None:
        """End on this side: nothing more is sent or delivered; the sink is told."""
        if self.ended:
            return
        self.ended = True
        self._outbox.clear()
        self._outbox_bytes = 0
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
        batch_bytes: int = 64 * 1024,
    ) -> None:
        self.backend = backend
        self.window = max(window, batch_bytes)
        self.outbox_bytes = outbox_bytes
        self.wait_timeout = wait_timeout
        self.batch_bytes = batch_bytes
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
        to, sender, flat = _unpack(payload, 3)
        if not isinstance(to, str) or not isinstance(sender, str) or not isinstance(flat, list):
            raise MalformedFrame("invalid stream message")
        if len(flat) % 2:
            raise MalformedFrame("invalid stream message")
        frames = list(zip(flat[::2], flat[1::2], strict=True))
        if not all(isinstance(op, int) and isinstance(data, bytes) for op, data in frames):
            raise MalformedFrame("invalid stream message")
        stream = self._streams.get(to)
        if stream is None or stream.ended:
            return  # closed meanwhile: its close tells the sender
        size = sum(len(data) for _, data in frames)
        read = stream.sink.deliver(frames)
        task = asyncio.get_running_loop().create_task(
            self._ack_when_read(read, origin, sender, size)
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
            await self.backend.send_direct(node, ACK, _pack([sender, size]))

    def _on_ack(self, origin: str, payload: bytes) -> None:
        to, size = _unpack(payload, 2)
        if not isinstance(to, str) or not isinstance(size, int) or size < 0:
            raise MalformedFrame("invalid stream message")
        stream = self._streams.get(to)
        if stream is not None:
            stream._acknowledged(size)

    def _on_close(self, origin: str, payload: bytes) -> None:
        (to,) = _unpack(payload, 1)
        if not isinstance(to, str):
            raise MalformedFrame("invalid stream message")
        stream = self._streams.get(to)
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


def _pack(value: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _unpack(payload: bytes, size: int) -> list[Any]:
    try:
        value = msgpack.unpackb(payload, raw=False)
    except Exception:  # msgpack raises many types for bad input; none is ours
        raise MalformedFrame("invalid stream message") from None
    if not isinstance(value, list) or len(value) != size:
        raise MalformedFrame("invalid stream message")
    return value
