"""Server-side WebSocket frames built once and written as bytes (RFC 6455 §5.2).

Fan-out builds one frame per publish and writes the same bytes to every recipient's transport,
instead of framing the payload again for each peer. Server frames are never masked, and
polysignal negotiates no compression, so a prebuilt frame is valid on every connection.
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_BINARY = 0x2

_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack


def build_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, unmasked frame carrying ``payload``."""
    first = 0x80 | opcode
    length = len(payload)
    if length < 126:
        return _LEN1(first, length) + payload
    if length < 65536:
        return _LEN2(first, 126, length) + payload
    return _LEN3(first, 127, length) + payload
