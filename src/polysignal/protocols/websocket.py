"""WebSocket (RFC 6455) with no I/O: the opening handshake, frames in, frames out.

The server's connections (``server/connection.py``) feed the bytes they read to
``read_messages`` and write what ``build_frame`` and ``close_frame`` make. Everything here is
a pure function of its arguments, so every rule can be tested, and fuzzed, without a socket:

* frames from a client must be masked (§5.1); no extension is negotiated, so every RSV bit must
  be 0 (§5.2); opcodes 3-7 and 11-15 are reserved (§5.2); control frames are final and carry at
  most 125 bytes (§5.5); each of those faults closes with 1002;
* a data message may be fragmented, with control frames between its fragments (§5.4); a
  continuation without a message to continue, or a new message before the last one ended, is
  1002;
* a message (one frame, or all fragments together) larger than the connection's limit is 1009,
  refused from the frame header, before its payload is read;
* a text message, or a close reason, that is not UTF-8 is 1007 (§8.1);
* a close frame's payload is empty, or a valid status code and a UTF-8 reason (§5.5.1, §7.4).

Server frames are never masked and polysignal negotiates no compression, so one prebuilt frame
is valid on every connection: fan-out builds a frame once and writes the same bytes to every
recipient.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from polysignal.core.errors import ClientError, CloseCode

try:  # the C implementation; websockets falls back to Python the same way
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the wheel ships the extension on every platform we run
    from websockets.utils import apply_mask

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_KNOWN_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
_ZERO_MASK = b"\x00\x00\x00\x00"
MAX_CONTROL_PAYLOAD = 125

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""The key suffix of RFC 6455 §1.3."""

TOO_LARGE = "Message too large"
"""The reason of every 1009 close (Flow-Like's words, which its clients show)."""


class FrameError(ClientError):
    """The peer broke the framing rules: close with ``close_code`` and ``message`` (§7.1.7)."""

    def __init__(self, code: CloseCode, message: str) -> None:
        super().__init__(message)
        self.close_code = code


# --- frames out ---------------------------------------------------------------------------------

_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack


def frame_header(length: int, opcode: int = OP_TEXT) -> bytes:
    """The header of one final, unmasked frame of ``length`` payload bytes."""
    first = 0x80 | opcode
    if length < 126:
        return _LEN1(first, length)
    if length < 65536:
        return _LEN2(first, 126, length)
    return _LEN3(first, 127, length)


def build_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, unmasked frame carrying ``payload``."""
    return frame_header(len(payload), opcode) + payload


@functools.lru_cache(maxsize=64)
def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and ``reason`` cut to fit a control frame (§5.5)."""
    data = reason.encode()[: MAX_CONTROL_PAYLOAD - 2]
    while True:  # never cut a UTF-8 sequence in two
        try:
            data.decode()
            break
        except UnicodeDecodeError:
            data = data[:-1]
    return build_frame(code.to_bytes(2, "big") + data, OP_CLOSE)


PING_FRAME = build_frame(b"", OP_PING)
"""An empty ping, the same bytes for every peer."""


# --- frames in ----------------------------------------------------------------------------------


class Fragments:
    """A data message whose later fragments have not arrived yet."""

    __slots__ = ("opcode", "parts", "size")

    def __init__(self, opcode: int, first: bytes) -> None:
        self.opcode = opcode
        self.parts = [first]
        self.size = len(first)


Message = tuple[int, bytes]
"""(opcode, payload): a whole data message (text or binary) or one control frame."""


def read_messages(
    data: bytes | bytearray, max_size: int, fragments: Fragments | None = None
) -> tuple[list[Message], int, Fragments | None, FrameError | None, int]:
    """Read what ``data`` holds: ``(messages, used, fragments, error, need)``.

    ``messages`` are the complete messages and control frames, in order; ``fragments`` is the
    message still being fragmented (pass it to the next call). Without an error, ``used`` bytes
    of ``data`` were read and the rest starts an incomplete frame: call again with it and more
    bytes once there are at least ``need`` of them. ``error`` is the first rule broken; the
    messages before it are valid, and ``used`` is then where the offending frame ends (past the
    end of ``data`` when its payload has not all arrived: skip that many bytes more).

    Text messages are checked to be UTF-8 here; control frames are returned as they came
    (``parse_close`` reads a close frame). Payloads are ``bytes``, copied once out of ``data``.
    """
    messages: list[Message] = []
    size = len(data)
    pos = 0
    while True:
        if size - pos < 2:
            return messages, pos, fragments, None, 2
        first = data[pos]
        second = data[pos + 1]
        opcode = first & 0x0F
        length = second & 0x7F
        head = pos + 2
        if length == 126:
            head = pos + 4
            if size < head:
                return messages, pos, fragments, None, 4
            length = (data[pos + 2] << 8) | data[pos + 3]
        elif length == 127:
            head = pos + 10
            if size < head:
                return messages, pos, fragments, None, 10
            length = int.from_bytes(data[pos + 2 : head], "big")
        masked = second & 0x80
        start = head + 4 if masked else head
        end = start + length
        # Most frames are final, masked text or binary frames within the limit: they skip the
        # rule checks, which the others go through one by one.
        if not (masked and (first == 0x81 or first == 0x82) and length <= max_size):
            error = _check_header(first, masked, opcode, length, max_size)
            if (
                error is None
                and opcode == OP_CONTINUATION
                and fragments is not None
                and fragments.size + length > max_size
            ):
                error = FrameError(CloseCode.MESSAGE_TOO_BIG, TOO_LARGE)
            if error is not None:
                return messages, end, fragments, error, 0
        if end > size:
            return messages, pos, fragments, None, end - pos
        if isinstance(data, bytes):  # slices are copies already
            payload = data[start:end]
            mask = data[head:start]
            if mask != _ZERO_MASK:
                payload = apply_mask(payload, mask)
        else:  # a frame gathered from several reads: copied out of the buffer once
            view = memoryview(data)
            mask = bytes(view[head:start])
            if mask == _ZERO_MASK:
                payload = bytes(view[start:end])
            else:
                payload = apply_mask(view[start:end], mask)
        pos = end
        if opcode >= OP_CLOSE:
            messages.append((opcode, payload))
            continue
        fin = first & 0x80
        if opcode == OP_CONTINUATION:
            if fragments is None:
                error = FrameError(
                    CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue"
                )
                return messages, pos, None, error, 0
            fragments.size += length
            fragments.parts.append(payload)
            if not fin:
                continue
            opcode = fragments.opcode
            payload = b"".join(fragments.parts)
            fragments = None
        elif fragments is not None:
            error = FrameError(CloseCode.PROTOCOL_ERROR, "expected a continuation frame")
            return messages, pos, fragments, error, 0
        elif not fin:
            fragments = Fragments(opcode, payload)
            continue
        if opcode == OP_TEXT and not payload.isascii():
            try:
                payload.decode()
            except UnicodeDecodeError:
                error = FrameError(CloseCode.INVALID_DATA, "invalid UTF-8 in a text message")
                return messages, pos, fragments, error, 0
        messages.append((opcode, payload))


def _check_header(
    first: int, masked: int, opcode: int, length: int, max_size: int
) -> FrameError | None:
    """The first rule a frame header breaks, in the order of RFC 6455 §5.2."""
    if first & 0x70:
        return FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits must be 0")
    if opcode not in _KNOWN_OPCODES:
        return FrameError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode}")
    if not masked:
        return FrameError(CloseCode.PROTOCOL_ERROR, "frames from a client must be masked")
    if opcode >= OP_CLOSE:
        if not first & 0x80:
            return FrameError(CloseCode.PROTOCOL_ERROR, "control frames must not be fragmented")
        if length > MAX_CONTROL_PAYLOAD:
            return FrameError(CloseCode.PROTOCOL_ERROR, "control frame longer than 125 bytes")
    elif length > max_size:
        if length >> 63:
            return FrameError(CloseCode.PROTOCOL_ERROR, "frame length over 2^63")
        return FrameError(CloseCode.MESSAGE_TOO_BIG, TOO_LARGE)
    return None


_VALID_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
)
"""RFC 6455 §7.4.1 and the IANA registry; 1004-1006 and 1015 must never be sent."""


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """The status code (None when absent) and reason of a close frame; FrameError if invalid."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if code not in _VALID_CLOSE_CODES and not 3000 <= code <= 4999:
        raise FrameError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(CloseCode.INVALID_DATA, "invalid UTF-8 in a close reason") from None
    return code, reason


# --- the opening handshake (§4.2) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeError(Exception):
    """A WebSocket upgrade request the server refuses with an HTTP status before upgrading."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (§4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def check_handshake(http_version: str, version: str | None, key: str | None) -> str:
    """The client's key, once the request is a valid WebSocket upgrade; else HandshakeError.

    The caller has already seen ``Upgrade: websocket`` and ``Connection: upgrade`` on a GET.
    """
    if http_version != "1.1":
        raise HandshakeError(400, "a WebSocket upgrade needs HTTP/1.1")
    if version is None or version.strip() != "13":
        raise HandshakeError(
            426,
            "unsupported Sec-WebSocket-Version; this server speaks 13",
            (("Sec-WebSocket-Version", "13"),),
        )
    if key is None:
        raise HandshakeError(400, "missing Sec-WebSocket-Key")
    key = key.strip()
    try:
        raw = binascii.a2b_base64(key.encode(), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "invalid Sec-WebSocket-Key")
    return key


def offered_subprotocols(values: Iterable[str]) -> list[str]:
    """The subprotocols a client offers, in its order, from its Sec-WebSocket-Protocol headers.

    Not restricted to RFC 6455 tokens: Signal-Fire clients offer ``Signal-Fire@3``.
    """
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def choose_subprotocol(offered: Iterable[str], supported: Collection[str]) -> str | None:
    """The first subprotocol the client offers that the server supports, if any."""
    for name in offered:
        if name in supported:
            return name
    return None


_SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: "
)


def switching_protocols(key: str, subprotocol: str | None = None) -> bytes:
    """The 101 response accepting ``key``, echoing ``subprotocol`` when one was chosen."""
    response = _SWITCHING + accept_key(key).encode()
    if subprotocol is not None:
        response += b"\r\nSec-WebSocket-Protocol: " + subprotocol.encode("latin-1")
    return response + b"\r\n\r\n"


def scan_upgrade(
    headers: list[tuple[bytes, bytes]],
) -> tuple[bool, str | None, str | None, list[str]]:
    """Whether a request (its headers, names in lower case) asks for a WebSocket
    (``Upgrade: websocket`` and ``Connection: upgrade``), its ``Sec-WebSocket-Version`` and
    ``-Key``, and the subprotocols it offers (from every ``Sec-WebSocket-Protocol`` header)."""
    single = dict(headers)
    if len(single) == len(headers):  # no header repeated: the usual case, looked up in C
        upgrade = single.get(b"upgrade", b"")
        connection = single.get(b"connection", b"")
        protocol = single.get(b"sec-websocket-protocol")
        protocols = [] if protocol is None else [protocol]
    else:
        upgrade = b",".join(v for k, v in headers if k == b"upgrade")
        connection = b",".join(v for k, v in headers if k == b"connection")
        protocols = [v for k, v in headers if k == b"sec-websocket-protocol"]
    key = single.get(b"sec-websocket-key")
    version = single.get(b"sec-websocket-version")
    return (
        b"websocket" in upgrade.lower() and b"upgrade" in connection.lower(),
        None if version is None else version.decode("latin-1"),
        None if key is None else key.decode("latin-1"),
        offered_subprotocols(p.decode("latin-1") for p in protocols) if protocols else [],
    )


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def http_error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete plain-text HTTP/1.1 error response that closes the connection."""
    body = (message + "\n").encode()
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
    head += "Content-Type: text/plain; charset=utf-8\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    for name, value in headers:
        head += f"{name}: {value}\r\n"
    return head.encode("latin-1") + b"\r\n" + body
