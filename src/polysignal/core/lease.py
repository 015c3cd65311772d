"""Leases without I/O: the schedule of one node's renewal rounds, the state of each lease, and
what each answer of the backend means for it (``backends/lease.py`` makes the backend calls,
runs the rounds and keeps the tasks; docs/redis.md, "Claims when Redis comes back").

A lease is one key claimed cluster-wide with an owner token for a TTL, renewed every third of
it. In each round, a lease the backend holds is renewed; one it lost (it expired) is claimed
again, never taken; one held here only (the backend was away) is claimed, or taken if it was
made by a take. A claim refused means another holder has the key: the lease is lost, and its
owner told.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from polysignal.core.effects import ClaimOp, LookupOp, ReleaseOp

MIN_TTL = 1.0
"""Seconds: a lease is renewed every third of its TTL, and a round must have time to run."""
TAKE_ATTEMPTS = 4
"""Rounds of claim, look up, release and evict a take tries before it holds the lease here."""


def check_ttl(ttl: float) -> float:
    """``ttl`` as a lease TTL; raises ValueError below ``MIN_TTL``."""
    if ttl < MIN_TTL:
        raise ValueError(f"a lease TTL must be at least {MIN_TTL:g} s, not {ttl:g}")
    return float(ttl)


class Step(Enum):
    """What a renewal round does for one lease."""

    SKIP = "skip"
    """Released, its first claim still on its way, or held while only the leases held here
    only are claimed."""
    RENEW = "renew"
    """Held by the backend: renew it (claim it again if the backend lost it)."""
    CLAIM = "claim"
    """Held here only: claim it (lost if another holder has it)."""
    TAKE = "take"
    """Held here only and made by a take: take it again, evicting whoever has it."""


class Verdict(Enum):
    """What an answer of the backend to a lease's claim means."""

    HELD = "held"
    """It is this lease's, as it was."""
    REGAINED = "regained"
    """It is this lease's again (it was held here only, or lost by the backend)."""
    GONE = "gone"
    """The lease was released while the claim was on its way, and the claim failed: nothing
    to do."""
    GIVE_BACK = "give back"
    """The lease was released while the claim was on its way, and the claim succeeded:
    release it in the backend."""
    LOST = "lost"
    """Another holder has the key: the lease is lost; look the holder up and tell the owner."""


# --- what a lease asks of the backend ---


@dataclass(frozen=True, slots=True)
class RenewOp:
    """Extend ``key``'s claim by the TTL if ``token`` holds it; answered True if it did."""

    key: str
    token: str


@dataclass(frozen=True, slots=True)
class EvictOp:
    """Tell ``holder``'s node that its claim is gone (it was taken over); answered None."""

    holder: Any


Op = ClaimOp | RenewOp | LookupOp | ReleaseOp | EvictOp
"""What a lease's rule asks of the backend, one at a time: the rules below are generators that
yield each and are sent its answer (a failure of the backend ends them, raised by the caller)."""


@dataclass(eq=False)
class LeaseState:
    """One claimed key. ``held``: claimed cluster-wide (False while the backend is away)."""

    key: str
    token: str
    held: bool = False
    released: bool = field(default=False, repr=False)

    @property
    def answering(self) -> bool:
        """Its first claim is still on its way (after ``answer_within``)."""
        return False

    @property
    def taking(self) -> bool:
        """It was made by a take: it is claimed again the same way."""
        return False

    def step(self, full: bool) -> Step:
        """What a round does for it: a ``full`` round renews every lease, another (the backend
        is back, or a claim failed) claims only those held here only."""
        if self.released or self.answering or (self.held and not full):
            return Step.SKIP
        if self.held:
            return Step.RENEW
        return Step.TAKE if self.taking else Step.CLAIM

    def renewal(self, full: bool) -> Generator[Op, Any, Verdict | None]:
        """Its part of a round (``step``): None when skipped, else what the backend's answer
        means. A lease the backend lost is claimed again, never taken from whoever has it
        since (a newer socket elsewhere that took it, say)."""
        step = self.step(full)
        if step is Step.SKIP:
            return None
        if step is Step.RENEW:
            if (yield RenewOp(self.key, self.token)):
                return Verdict.HELD
            ok = yield ClaimOp(self.key, self.token)
        elif step is Step.TAKE:
            ok = yield from self.take(TAKE_ATTEMPTS)  # held here only: taken as it was made
        else:
            ok = yield ClaimOp(self.key, self.token)
        return self.claimed(bool(ok))

    def take(self, attempts: int) -> Generator[Op, Any, bool]:
        """Claim the key, releasing whoever holds it and evicting them; False after
        ``attempts`` races with other claimers."""
        for _ in range(attempts):
            if (yield ClaimOp(self.key, self.token)):
                return True
            holder = yield LookupOp(self.key)
            if holder is None:
                continue  # released in between
            yield ReleaseOp(self.key, holder.token)
            yield EvictOp(holder)
        return False

    def claimed(self, ok: bool) -> Verdict:
        """The backend answered a round's claim (or take) of it: ``ok``, it is this lease's."""
        if ok:
            verdict = Verdict.HELD if self.held else Verdict.REGAINED
            self.held = True
            return verdict
        return Verdict.GONE if self.released else Verdict.LOST

    def answered(self, ok: bool) -> Verdict:
        """The late answer to its first claim, made while it was already served here."""
        if self.released:
            return Verdict.GIVE_BACK if ok else Verdict.GONE
        if ok:
            self.held = True
            return Verdict.REGAINED
        return Verdict.LOST


L = TypeVar("L", bound=LeaseState)


class LeaseBook(Generic[L]):
    """The leases of one node, by key: at most one per key, the newest."""

    __slots__ = ("_leases",)

    def __init__(self) -> None:
        self._leases: dict[str, L] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __iter__(self) -> Iterator[L]:
        """A snapshot: the leases as they are now, whatever happens to them meanwhile."""
        return iter(list(self._leases.values()))

    def get(self, key: str) -> L | None:
        return self._leases.get(key)

    def keep(self, lease: L) -> None:
        """Renew ``lease`` from now on; one kept before for the same key is released (the key
        claimed again here: the newer lease counts)."""
        previous = self._leases.get(lease.key)
        if previous is not None and previous is not lease:
            previous.released = True
        self._leases[lease.key] = lease

    def forget(self, lease: L) -> None:
        """Stop renewing ``lease`` (without releasing it in the backend)."""
        lease.released = True
        if self._leases.get(lease.key) is lease:
            del self._leases[lease.key]

    def release(self, lease: L) -> bool:
        """Give ``lease`` back; True when the backend holds it, to release there."""
        if lease.released:
            return False
        self.forget(lease)
        if not lease.held:
            return False
        lease.held = False
        return True

    def lose(self, lease: L) -> None:
        """Another holder has ``lease``'s key: it is not held, nor renewed, any more."""
        lease.held = False
        self.forget(lease)

    def claim_lost(self, key: str, token: str) -> L | None:
        """The backend came back and found ``key`` held by another holder; the lease that held
        it with ``token`` is lost (returned, for its owner to be told), if it is still kept."""
        lease = self._leases.get(key)
        if lease is None or lease.token != token or lease.released:
            return None
        self.lose(lease)
        return lease


class RenewalSchedule:
    """When the rounds run: a full one every third of the TTL; between them, a round may be
    woken early (the backend is back, or a claim failed), which does not move the next full
    one."""

    __slots__ = ("due", "every")

    def __init__(self, ttl: float, now: float) -> None:
        self.every = ttl / 3
        self.due = now + self.every
        """When the next full round is due."""

    def start(self, now: float) -> bool:
        """A round starts at ``now``; True for a full one (then the next is due a third of the
        TTL later), False for one woken early."""
        if now < self.due:
            return False
        self.due = now + self.every
        return True
