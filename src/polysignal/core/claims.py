"""The claims a node holds in the cluster's store, without I/O: what it must claim again when the
store is reached again, what it must still release, and when new claims may be made after the
store came back empty (docs/redis.md, "Claims when Redis comes back").

``backends/cluster.py`` makes the store calls and waits: re-asserting the claims is a generator
that yields what it asks of the store (``ReclaimOp``, ``ReleaseOp``) and is sent each answer (a
failure of the store is thrown in). Keys are the claimed ids; ``name(key)`` is a claim's key in
the store, as the store's calls take it.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from polysignal.core.effects import ReleaseOp
from polysignal.core.errors import BackendUnavailable


class Reclaimed(Enum):
    """What became of one claim once the store answered the reconnect's batch (``rejoin``)."""

    KEPT = "kept"
    """Claimed again with its token: still this node's."""
    LOST = "lost"
    """Another holder has it now: it is theirs (never overwritten); its owner here is told."""
    RELEASE = "release"
    """Given up while the batch was on its way, and claimed again by it: release it now."""
    GONE = "gone"
    """Given up while the batch was on its way, and another holder has it: nothing to do."""


@dataclass(frozen=True, slots=True)
class ReclaimOp:
    """As one batch: claim each of ``claims`` again (store key -> (token, ttl)) and release each
    of ``releases`` (store key -> token) its token still holds. Answered with the holder of
    each claim another token holds now (store key -> holder, or None)."""

    claims: dict[str, tuple[str, float]]
    releases: dict[str, str]


Op = ReclaimOp | ReleaseOp


@dataclass(slots=True)
class Rejoined:
    """What re-asserting the claims came to: how many are this node's again, and those lost to
    another holder (key, token, holder as the store answered it)."""

    reclaimed: int = 0
    lost: list[tuple[str, str, Any]] = field(default_factory=list)


class ClaimLedger:
    """The claims this node holds (key -> (token, ttl)), those it gave up while the store was
    away (key -> token, released when it is back if still its), and the settling window."""

    __slots__ = ("held", "name", "settle_until", "unreleased")

    def __init__(self, name: Callable[[str], str]) -> None:
        self.name = name
        self.held: dict[str, tuple[str, float]] = {}
        self.unreleased: dict[str, str] = {}
        self.settle_until = 0.0
        """Until then (monotonic seconds), new claims and lookups wait."""

    def is_new(self, key: str, token: str) -> bool:
        """A claim ``key`` does not hold with ``token`` yet: it waits while the store settles."""
        held = self.held.get(key)
        return held is None or held[0] != token

    def claimed(self, key: str, token: str, ttl: float) -> None:
        """The store granted the claim."""
        self.held[key] = (token, ttl)
        self.unreleased.pop(key, None)

    def renew_failed(self, key: str) -> None:
        """The store no longer has ``key`` as this node's: not claimed again on reconnect."""
        self.held.pop(key, None)

    def releasing(self, key: str, token: str) -> bool:
        """``key`` is given back; True when ``token`` held it here (then it is forgotten)."""
        held = self.held.get(key)
        if held is None or held[0] != token:
            return False
        del self.held[key]
        return True

    def release_failed(self, key: str, token: str) -> None:
        """The store could not be reached to release ``key``: released when it is back, unless
        claimed again meanwhile."""
        self.unreleased[key] = token

    # --- reconnecting ---
    def settling(self, now: float, seconds: float) -> None:
        """The store answered that it settles for ``seconds`` more (0: it does not)."""
        self.settle_until = now + seconds

    def settle_wait(self, now: float) -> float:
        """Seconds a new claim or lookup still waits at ``now`` (0: none)."""
        return max(0.0, self.settle_until - now)

    def rejoin(self) -> Generator[Op, Any, Rejoined]:
        """On connect, before anything else may claim: every claim held, claimed again with its
        token, and what was given up meanwhile released, in one batch. A claim another holder
        has now stays theirs (it is lost here); one given up while the batch was on its way is
        released if the batch claimed it again."""
        result = Rejoined()
        if not self.held and not self.unreleased:
            return result
        held = dict(self.held)
        name = self.name
        releases = {name(key): token for key, token in self.unreleased.items()}
        self.unreleased.clear()
        taken = yield ReclaimOp({name(key): claim for key, claim in held.items()}, releases)
        for key, (token, _) in held.items():
            match self._rejoined(key, token, name(key) in taken):
                case Reclaimed.KEPT:
                    result.reclaimed += 1
                case Reclaimed.LOST:
                    result.lost.append((key, token, taken[name(key)]))
                case Reclaimed.RELEASE:
                    try:
                        yield ReleaseOp(name(key), token)
                    except BackendUnavailable:
                        self.unreleased[key] = token
                        raise
                case _:
                    pass  # gone: given up, and another holder has it
        return result

    def _rejoined(self, key: str, token: str, taken: bool) -> Reclaimed:
        """The store answered the batch for claim ``key`` (``token``); ``taken``: another
        holder has it. Decided per claim as each is handled, since a claim may be given up (or
        claimed anew) while the previous one is released."""
        current = self.held.get(key)
        if current is None or current[0] != token:
            return Reclaimed.GONE if taken else Reclaimed.RELEASE
        if taken:
            del self.held[key]
            return Reclaimed.LOST
        return Reclaimed.KEPT

    def node_claims(self) -> dict[str, str]:
        """Every claim this node may hold in the store (store key -> token), to release at a
        stop."""
        name = self.name
        claims = {name(key): token for key, token in self.unreleased.items()}
        claims.update({name(key): token for key, (token, _) in self.held.items()})
        return claims

    def removed(self) -> None:
        """The node stopped and released them all."""
        self.held.clear()
        self.unreleased.clear()
