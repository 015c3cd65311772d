"""Streams without I/O: one end's queue, batches and credit window, and the messages the two
ends exchange (``backends/stream.py`` sends them, waits for credit and room, and keeps the
timers).

A stream carries frames (opcode and payload) from a connection on one node to one on another,
over direct delivery, in three messages (msgpack arrays):

* ``stream.data`` ``[to, sender, [opcode, payload, opcode, payload, ...]]``: a batch of frames
  for stream ``to`` from stream ``sender``;
* ``stream.ack`` ``[to, size]``: the other end's client has read ``size`` bytes of stream
  ``to``'s data: that much credit comes back;
* ``stream.close`` ``[to]``: the other end is gone.

Messages need no sequence numbers: one node's direct messages to another arrive in the order
they were sent, and each end sends its data one batch at a time. What is still counted here:
at most ``window`` bytes sent and not acknowledged, at most ``outbox_bytes`` queued before the
writer is asked to wait, at most ``batch_bytes`` per message unless one frame is larger.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any

import msgpack

from polysignal.core.errors import MalformedFrame

DATA = "stream.data"
ACK = "stream.ack"
CLOSE = "stream.close"

BATCH_BYTES = 64 * 1024
"""Most payload bytes per data message, unless one frame is larger."""
INVALID = "invalid stream message"
"""The error of every message that is not one of the three."""

Frame = tuple[int, bytes]
"""(opcode, payload)"""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """The bounds every stream of one ``Streams`` keeps (the module docstring); 0
    ``outbox_bytes``: the writer never waits for room."""

    window: int
    outbox_bytes: int
    batch_bytes: int = BATCH_BYTES

    @classmethod
    def of(cls, window: int, outbox_bytes: int, batch_bytes: int = BATCH_BYTES) -> StreamLimits:
        """The limits asked for, with a window of at least one batch."""
        return cls(max(window, batch_bytes), outbox_bytes, batch_bytes)


class StreamState:
    """The sending bookkeeping of one end of a stream: the frames queued, the bytes on their
    way not yet acknowledged (``unacked``), and whether it is closing or ended."""

    __slots__ = ("_frames", "closing", "ended", "queued", "unacked")

    def __init__(self) -> None:
        self._frames: deque[Frame] = deque()
        self.queued = 0
        """Bytes queued, not sent yet."""
        self.unacked = 0
        """Bytes sent, not yet acknowledged by the receiving node."""
        self.closing = False
        self.ended = False

    def push(self, opcode: int, data: bytes, limits: StreamLimits) -> bool | None:
        """Queue one frame for the other end. Answers None when it was dropped (the stream is
        ended or closing), else whether more than ``outbox_bytes`` are queued now: then the
        writer waits for room."""
        # Not an enum: this runs per frame, and reading an enum member costs many times a bool.
        if self.ended or self.closing:
            return None
        self._frames.append((opcode, data))
        self.queued += len(data)
        return limits.outbox_bytes != 0 and self.queued > limits.outbox_bytes

    def start_closing(self) -> bool:
        """The local connection is gone; True when the stream starts closing now (then what is
        queued is sent, and the other end told)."""
        if self.ended or self.closing:
            return False
        self.closing = True
        return True

    @property
    def sending(self) -> bool:
        """Frames are queued and the stream is not ended: the next batch is due."""
        return bool(self._frames) and not self.ended

    def next_batch(self, limits: StreamLimits) -> tuple[list[Frame], int, bool]:
        """The next data message's frames (at least one, then as many as fit in
        ``batch_bytes``), their size, and whether the queue is at most half of
        ``outbox_bytes`` now (a writer waiting for room may go on). Only while ``sending``."""
        frames, most = self._frames, limits.batch_bytes
        frame = frames.popleft()
        batch = [frame]
        size = len(frame[1])
        while frames and size + len(frames[0][1]) <= most:
            frame = frames.popleft()
            batch.append(frame)
            size += len(frame[1])
        self.queued -= size
        return batch, size, self.queued <= limits.outbox_bytes // 2

    def blocked(self, size: int, limits: StreamLimits) -> bool:
        """Sending ``size`` more bytes now would pass the window: wait for acknowledgements
        (the first batch on its way always goes, however large)."""
        return bool(self.unacked) and self.unacked + size > limits.window and not self.ended

    def sent(self, size: int) -> None:
        """``size`` bytes are on their way."""
        self.unacked += size

    def acknowledged(self, size: int) -> None:
        """The other end's client read ``size`` bytes: that much credit comes back."""
        self.unacked = max(0, self.unacked - size)

    def finish(self) -> bool:
        """Everything queued is sent; True when the stream was closing: it is ended now, and
        the other end is to be told."""
        if not self.closing or self.ended:
            return False
        self.ended = True
        return True

    def end(self) -> bool:
        """End this side: nothing more is sent; False when it already was."""
        if self.ended:
            return False
        self.ended = True
        self._frames.clear()
        self.queued = 0
        return True


# --- messages ---


def pack(value: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def unpack(payload: bytes, size: int) -> list[Any]:
    """A message's array of ``size`` items; raises ``MalformedFrame``."""
    try:
        value = msgpack.unpackb(payload, raw=False)
    except Exception:  # msgpack raises many types for bad input; none is ours
        raise MalformedFrame(INVALID) from None
    if not isinstance(value, list) or len(value) != size:
        raise MalformedFrame(INVALID)
    return value


def data_message(to: str, sender: str, frames: list[Frame]) -> bytes:
    return pack([to, sender, list(chain.from_iterable(frames))])


def ack_message(to: str, size: int) -> bytes:
    return pack([to, size])


def close_message(to: str) -> bytes:
    return pack([to])


@dataclass(frozen=True, slots=True)
class Data:
    """A received data message; ``size``: the bytes to acknowledge once the client has read
    them."""

    to: str
    sender: str
    frames: list[Frame]
    size: int


def parse_data(payload: bytes) -> Data:
    to, sender, flat = unpack(payload, 3)
    if not isinstance(to, str) or not isinstance(sender, str) or not isinstance(flat, list):
        raise MalformedFrame(INVALID)
    if len(flat) % 2:
        raise MalformedFrame(INVALID)
    opcodes, payloads = flat[::2], flat[1::2]
    # Checked by map, not a generator: this is per frame.
    if not all(map(isinstance, opcodes, repeat(int))):
        raise MalformedFrame(INVALID)
    if not all(map(isinstance, payloads, repeat(bytes))):
        raise MalformedFrame(INVALID)
    return Data(to, sender, list(zip(opcodes, payloads, strict=True)), sum(map(len, payloads)))


def parse_ack(payload: bytes) -> tuple[str, int]:
    """(stream, size acknowledged)"""
    to, size = unpack(payload, 2)
    if not isinstance(to, str) or not isinstance(size, int) or size < 0:
        raise MalformedFrame(INVALID)
    return to, size


def parse_close(payload: bytes) -> str:
    """The stream closed by the other end."""
    (to,) = unpack(payload, 1)
    if not isinstance(to, str):
        raise MalformedFrame(INVALID)
    return to
