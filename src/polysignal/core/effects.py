"""What a protocol's state machine asks of the server: effects.

The state machines of ``core/`` take events (a message from a client, one from another node, the
answer to a claim, the time) and return the effects that follow, in order; they hold no socket,
no task and no clock. The server's hub of each protocol carries the effects out and feeds what
comes back (a claim's answer, a timer firing) in as events. A machine's timers are one deadline:
``next_deadline()`` says when it wants ``on_timer(now)`` called next, as aioquic's connections do.

Local connections appear as opaque handles (``Conn``): whatever the hub passes in, it gets back.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

Conn = Hashable
"""A local connection, as the hub names it to its machine."""


@dataclass(frozen=True, slots=True)
class Send:
    """Write one message to a local connection."""

    conn: Conn
    payload: bytes
    binary: bool = False


@dataclass(frozen=True, slots=True)
class Close:
    """Close a local connection with ``code`` and ``reason``."""

    conn: Conn
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ToNode:
    """Hand ``payload`` to ``node``'s handler of ``kind`` (direct delivery)."""

    node: str
    kind: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``payload`` on ``topic`` of ``namespace`` to the other nodes with subscribers."""

    topic: str
    payload: bytes
    namespace: str


@dataclass(frozen=True, slots=True)
class Presence:
    """This node now has ``count`` local subscribers of ``topic`` in ``namespace``."""

    topic: str
    count: int
    namespace: str
