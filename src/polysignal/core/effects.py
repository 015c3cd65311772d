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


@dataclass(frozen=True, slots=True)
class Fault:
    """Asking the cluster failed with ``error`` (``what`` says what could not be done): the hub
    reports it under ``key``, once per interval per key."""

    key: str
    what: str
    error: Exception


# --- what a rule asks of the cluster's store while it runs ---
# Where a rule needs an answer before it can go on, it is a generator that yields these (and its
# own requests) and is sent each answer; ``polysignal/drive.py`` runs one.


@dataclass(frozen=True, slots=True)
class ClaimOp:
    """Claim ``key`` with ``token`` for the TTL if it is free (or ``token``'s already); answered
    True when it is ``token``'s."""

    key: str
    token: str


@dataclass(frozen=True, slots=True)
class LookupOp:
    """Who holds ``key``; answered with the holder (``node_id``, ``token``) or None."""

    key: str


@dataclass(frozen=True, slots=True)
class ReleaseOp:
    """Release ``key`` if ``token`` holds it; answered True or False."""

    key: str
    token: str
