"""One exception tree for everything a client can get wrong, with its close code.

Protocol handlers catch ``ClientError`` and answer in the protocol's own way (an error frame,
``ok:false``, an error event); ``close_code`` is used where the protocol has no error frame or
the fault ends the connection. Anything else that escapes a handler is a bug: it is logged with a
traceback and answered generically.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes used by polysignal (RFC 6455 §7.4 and the protocols' own)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    # Application range (4000-4999), as Luce/Signal-Fire uses them.
    BAD_REQUEST = 4400
    SERVER_ERROR = 4500


class ClientError(Exception):
    """Something a client sent is not acceptable; ``str(exc)`` is safe to send back."""

    close_code: CloseCode = CloseCode.POLICY_VIOLATION

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedFrame(ClientError):
    """The frame is not valid JSON/msgpack, or not the shape the protocol needs."""

    close_code = CloseCode.UNSUPPORTED_DATA


class UnknownCommand(ClientError):
    """The frame's type/cmd is not one the protocol knows."""


class LimitExceeded(ClientError):
    """A configured limit (topics, length, rate, size) was exceeded."""


class FrameTooLarge(LimitExceeded):
    close_code = CloseCode.MESSAGE_TOO_BIG
