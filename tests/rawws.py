"""A WebSocket client made of raw bytes, for tests that must say exactly what goes on the wire.

Client libraries smooth over what a server must refuse (unmasked frames, reserved bits, bad
close codes, a trickled request), so the conformance tests build every byte themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from support import UNIT

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MASK = b"\x37\xfa\x21\x3d"


def request(
    path: str = "/",
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    headers: dict[str, str] | None = None,
    extra: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> bytes:
    """An upgrade request; ``headers`` replace the defaults (a None value drops one)."""
    base: dict[str, str | None] = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    base.update(headers or {})
    lines = [f"{method} {path} {version}"]
    lines += [f"{name}: {value}" for name, value in base.items() if value is not None]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def frame(
    payload: bytes,
    opcode: int = 0x1,
    *,
    fin: bool = True,
    mask: bytes | None = MASK,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """A client frame as raw bytes, masked with ``mask`` (None: unmasked, which is invalid)."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    bit = 0x80 if mask is not None else 0
    if size < 126:
        head = bytes([first, bit | size])
    elif size < 65536:
        head = bytes([first, bit | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([first, bit | 127]) + size.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close(code: int | None = 1000, reason: bytes = b"") -> bytes:
    payload = b"" if code is None else code.to_bytes(2, "big") + reason
    return frame(payload, 0x8)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Raw:
    """One raw TCP connection to a server."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, timeout: float = 3 * UNIT) -> Response:
        """The HTTP response head, and the body its Content-Length announces."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(size), timeout) if size else b""
        return Response(status, headers, body)

    async def frame(self, timeout: float = 3 * UNIT) -> tuple[int, bytes]:
        """The next server frame (unmasked): (opcode, payload)."""
        head = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self.reader.readexactly(8), "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        return head[0] & 0x0F, payload

    async def close_frame(self, timeout: float = 3 * UNIT) -> tuple[int, str]:
        """Read frames until a close frame: its code and reason."""
        while True:
            opcode, payload = await self.frame(timeout)
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big"), payload[2:].decode()

    async def eof(self, timeout: float = 3 * UNIT) -> bytes:
        """Everything until the server closes the connection (fails if it does not in time)."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def connect(port: int) -> Raw:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return Raw(reader, writer)


async def upgraded(port: int, path: str = "/", **kwargs: object) -> Raw:
    """A connection whose upgrade to WebSocket was answered 101."""
    raw = await connect(port)
    raw.send(request(path, **kwargs))  # type: ignore[arg-type]
    response = await raw.response()
    assert response.status == 101, response
    return raw
