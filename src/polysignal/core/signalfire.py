"""Pending Signal-Fire sessions: the rules of polysignal's session timer.

A ``session-start`` from initiator A to target B is pending until B accepts or rejects it, A
cancels it, or the timer fires (then both get ``session-timeout``). The table lives on the node
of the initiator, which sees every event of the session: A's own start and cancel requests, and
B's accept or reject when they are delivered to A. Each entry carries an opaque handle (the
server's timer), which the table hands back whenever the entry goes away so it can be cancelled.
The timer's behaviour on the wire: docs/protocols/signal-fire.md, "Sessions and the timer".
"""

from __future__ import annotations

from typing import Generic, TypeVar

H = TypeVar("H")


class PendingSessions(Generic[H]):
    """(initiator, target) -> handle, indexed by initiator for O(own sessions) cleanup."""

    __slots__ = ("_by_initiator", "_pending")

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], H] = {}
        self._by_initiator: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, pair: object) -> bool:
        return pair in self._pending

    def start(self, initiator: str, target: str, handle: H) -> H | None:
        """Record a pending session; a repeated start replaces (and returns) the old handle."""
        previous = self._pending.get((initiator, target))
        self._pending[(initiator, target)] = handle
        self._by_initiator.setdefault(initiator, set()).add(target)
        return previous

    def settle(self, initiator: str, target: str) -> H | None:
        """The session was answered, cancelled or timed out: forget it and return its handle."""
        handle = self._pending.pop((initiator, target), None)
        if handle is None:
            return None
        targets = self._by_initiator.get(initiator)
        if targets is not None:
            targets.discard(target)
            if not targets:
                del self._by_initiator[initiator]
        return handle

    def drop_initiator(self, initiator: str) -> list[tuple[str, H]]:
        """The initiator left: forget its sessions; returns (target, handle) for each."""
        targets = self._by_initiator.pop(initiator, set())
        return [(target, self._pending.pop((initiator, target))) for target in sorted(targets)]

    def clear(self) -> list[H]:
        """Forget every pending session (node shutdown); returns their handles."""
        handles = list(self._pending.values())
        self._pending.clear()
        self._by_initiator.clear()
        return handles
