"""One exception tree, and the answers a protocol gives to it.

* ``ClientError``: something a client sent is not acceptable. Each protocol says how it answers
  one (``protocols/<p>.py``, ``answer``): an error frame, an ``ok:false`` ack, or a close with
  ``close_code``.
* ``BackendUnavailable``: the cluster's backing service (Redis) cannot be reached right now; the
  operation did not happen. Degraded service, not a bug.
* Anything else that escapes a handler is a bug: logged with a traceback, answered generically.

The server's connection driver (``server/driver.py``) is the one place that maps an exception to
its answer; an ``Answer`` is a ``Reply`` (a frame to send, the connection stays open) or a
``Close`` (a close code and reason), or None (say nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class CloseCode(IntEnum):
    """WebSocket close codes used by polysignal (RFC 6455 §7.4 and the protocols' own)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    # Application range (4000-4999), as Luce/Signal-Fire uses them.
    BAD_REQUEST = 4400
    SERVER_ERROR = 4500


class PolysignalError(Exception):
    """The root of polysignal's own exceptions."""


class ClientError(PolysignalError):
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


class BackendUnavailable(PolysignalError, ConnectionError):
    """The backing service (Redis) cannot be reached right now; the operation did not happen."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer with a message carrying ``payload``; the connection stays open."""

    payload: bytes
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Close:
    """Answer by closing the connection with ``code`` and ``reason``."""

    code: int
    reason: str


Answer = Reply | Close | None
