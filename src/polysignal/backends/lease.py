"""Leases: this node's cluster-wide claims, held once for every protocol that needs one.

A lease makes one key (a Signal-Fire id, a relay peer id, a rooms room name) this node's in the
whole cluster, with an owner token, for ``ID_LEASE_TTL`` seconds at a time:

* ``claim`` claims a free key (or one this token already holds, a takeover by its owner);
  ``take`` also takes a key another holder has, releasing that holder's claim and telling it
  (``evict``) so its node drops the socket that held it;
* every lease of the node is renewed every third of the TTL, in one round; a lease that the
  backend lost (it expired) is claimed again, and one that another holder has taken meanwhile is
  lost: ``on_lost`` tells its owner;
* ``release`` gives a key back; ``close`` stops the renewals (the backend drops the node's claims
  when it closes).

While the backend is unreachable a claim is held *here* only (``Lease.held`` is False); so is one
the backend does not answer within ``answer_within`` seconds, when the caller gives that bound
(Signal-Fire: a new client's welcome must not wait for a hung Redis), until the answer comes.

When the backend comes back, what happens is the backend's rule (docs/redis.md, "Faults";
``Cluster``): the leases that were held are claimed again before the node counts as ready, and new
claims wait until every node had the time to do the same, so none of them can be taken meanwhile.
A lease found taken then is lost (``on_lost``), never overwritten. Then, when the backend is
ready, the leases held here only are claimed: each as it was made, by ``claim`` (lost if another
holder has it) or by ``take`` (which evicts that holder, as a newer socket replaces an older one).

The rules are core/lease.py's, without I/O: the schedule, each lease's state, what each answer
means, and the steps of a renewal and a take, as generators of what they ask of the backend.
Here are the tasks, the waits and the backend calls that carry them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from polysignal.backends.base import Backend, Claim
from polysignal.core.effects import ClaimOp, LookupOp, ReleaseOp
from polysignal.core.errors import BackendUnavailable
from polysignal.core.lease import (
    MIN_TTL,
    TAKE_ATTEMPTS,
    EvictOp,
    LeaseBook,
    LeaseState,
    Op,
    RenewalSchedule,
    RenewOp,
    Verdict,
    check_ttl,
)
from polysignal.drive import drive

__all__ = ["MIN_TTL", "PROMPT_ANSWER", "TAKE_ATTEMPTS", "Evict", "Lease", "Leases", "LostHandler"]

log = logging.getLogger("polysignal.lease")

LostHandler = Callable[[Claim | None], None]
"""Told the holder that took a lease over (None: nobody holds it now, and it could not be had)."""
Evict = Callable[[Claim], Awaitable[None]]
"""Tells ``holder``'s node that its claim is gone (``take``)."""

T = TypeVar("T")

PROMPT_ANSWER = 0.2
"""Seconds a claim that must be answered promptly (``claim(answer_within=...)``) waits for the
backend before it is held here only, and claimed cluster-wide once the backend answers."""


@dataclass(eq=False)
class Lease(LeaseState):
    """One claimed key (``LeaseState``), with whom to tell when it is lost."""

    on_lost: LostHandler | None = None
    evict: Evict | None = field(default=None, repr=False)
    """Set for a lease made by ``take``: claimed again the same way."""
    pending: asyncio.Task[Any] | None = field(default=None, repr=False)
    """The claim still on its way after ``answer_within``."""

    @property
    def answering(self) -> bool:
        return self.pending is not None

    @property
    def taking(self) -> bool:
        return self.evict is not None


class Leases:
    """The leases of one node, renewed together."""

    def __init__(self, backend: Backend, ttl: float) -> None:
        self.ttl = check_ttl(ttl)
        self.backend = backend
        self._leases: LeaseBook[Lease] = LeaseBook()
        self._renewer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        backend.on_ready(self._wake.set)
        backend.on_claim_lost(self._claim_lost)

    def __len__(self) -> int:
        return len(self._leases)

    def get(self, key: str) -> Lease | None:
        return self._leases.get(key)

    # --- claiming ---
    async def claim(
        self,
        key: str,
        token: str | None = None,
        *,
        on_lost: LostHandler | None = None,
        keep_while_unavailable: bool = True,
        answer_within: float | None = None,
    ) -> Lease | None:
        """Claim ``key``; None when another holder has it. While the backend is away the lease
        is kept here and claimed once it returns (``held`` False until then); with
        ``keep_while_unavailable`` False, BackendUnavailable is raised instead. With
        ``answer_within``, a backend that has not answered by then does not hold the caller up:
        the lease is kept here meanwhile, and if the answer is that another holder has the key,
        ``on_lost`` tells its owner."""
        lease = Lease(key, token or secrets.token_urlsafe(12), on_lost=on_lost)
        attempt: Awaitable[bool] = self.backend.claim(key, lease.token, self.ttl)
        if answer_within is not None:
            attempt = asyncio.ensure_future(attempt)
            try:
                done, _ = await asyncio.wait((attempt,), timeout=answer_within)
            except asyncio.CancelledError:
                attempt.cancel()  # nobody will hold what it claims
                raise
            if not done:
                lease.pending = asyncio.get_running_loop().create_task(self._answer(lease, attempt))
                self._keep(lease)
                return lease
        try:
            lease.held = await attempt
        except BackendUnavailable as exc:
            if not keep_while_unavailable:
                raise
            log.debug("lease %s kept here until the backend returns (%s)", key, exc)
        else:
            if not lease.held:
                return None
        self._keep(lease)
        return lease

    async def _answer(self, lease: Lease, attempt: asyncio.Future[bool]) -> None:
        """The late answer to a claim already served here (``claim(answer_within=...)``)."""
        try:
            ok = await attempt
        except asyncio.CancelledError:
            attempt.cancel()  # the leases are closing
            raise
        except BackendUnavailable as exc:
            log.debug("lease %s kept here until the backend returns (%s)", lease.key, exc)
            lease.pending = None
            self._wake.set()  # the next round (or the backend's return) claims it
            return
        finally:
            lease.pending = None
        match lease.answered(ok):
            case Verdict.GIVE_BACK:  # given back while the claim was on its way
                with contextlib.suppress(BackendUnavailable):
                    await self.backend.release(lease.key, lease.token)
            case Verdict.LOST:
                try:
                    holder = await self.backend.lookup(lease.key)
                except BackendUnavailable:
                    holder = None
                self._lose(lease, holder)
            case _:
                pass  # held now, or given back and not had: nothing to do

    async def take(
        self,
        key: str,
        evict: Evict,
        token: str | None = None,
        *,
        on_lost: LostHandler | None = None,
        attempts: int = TAKE_ATTEMPTS,
    ) -> Lease:
        """Claim ``key``, taking it from whoever holds it: their claim is released and
        ``evict(holder)`` tells their node. Gives up after ``attempts`` races and keeps the
        lease here only (``held`` False), to be taken by the next renewal round."""
        lease = Lease(key, token or secrets.token_urlsafe(12), on_lost=on_lost, evict=evict)
        try:
            lease.held = await self._drive(lease, lease.take(attempts))
            if not lease.held:
                log.warning("lease %s: taking it over kept failing; holding it here", key)
        except BackendUnavailable as exc:
            log.debug("lease %s kept here until the backend returns (%s)", key, exc)
        self._keep(lease)
        return lease

    async def _drive(self, lease: Lease, rule: Generator[Op, Any, T]) -> T:
        """Answer what ``lease``'s ``rule`` asks of the backend until it has its result."""
        return await drive(rule, functools.partial(self._perform, lease))

    async def _perform(self, lease: Lease, op: Op) -> Any:
        match op:
            case ClaimOp(key, token):
                return await self.backend.claim(key, token, self.ttl)
            case RenewOp(key, token):
                return await self.backend.renew(key, token, self.ttl)
            case LookupOp(key):
                return await self.backend.lookup(key)
            case ReleaseOp(key, token):
                return await self.backend.release(key, token)
            case EvictOp(holder):
                assert lease.evict is not None  # only a take evicts
                await lease.evict(holder)
        return None

    async def release(self, lease: Lease) -> None:
        """Give ``lease`` back (only the claim its token holds; nothing else is touched)."""
        if self._leases.release(lease):
            with contextlib.suppress(BackendUnavailable):
                await self.backend.release(lease.key, lease.token)

    def forget(self, lease: Lease) -> None:
        """Stop renewing ``lease`` without releasing it (another node holds it on from here)."""
        self._leases.forget(lease)

    def _keep(self, lease: Lease) -> None:
        self._leases.keep(lease)
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    def _lose(self, lease: Lease, holder: Claim | None) -> None:
        """Another holder has ``lease``'s key: stop holding it and tell its owner."""
        self._leases.lose(lease)
        log.warning("lease %s is held by another holder now; giving it up", lease.key)
        if lease.on_lost is not None:
            lease.on_lost(holder)

    def _claim_lost(self, key: str, token: str, holder: Claim | None) -> None:
        """The backend came back and found this claim held by another holder
        (``Backend.on_claim_lost``; it has logged it)."""
        lease = self._leases.claim_lost(key, token)
        if lease is not None and lease.on_lost is not None:
            lease.on_lost(holder)

    # --- renewing ---
    async def _renew_forever(self) -> None:
        loop = asyncio.get_running_loop()
        schedule = RenewalSchedule(self.ttl, loop.time())
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(schedule.due):
                    await self._wake.wait()
            self._wake.clear()
            # Else woken: the backend is back, or a claim failed.
            full = schedule.start(loop.time())
            try:
                await self.renew_all(held=full)
            except BackendUnavailable as exc:
                # The backend warns about its outage itself; the next round, or its return,
                # claims them.
                log.debug("leases not renewed: %s", exc)

    async def renew_all(self, *, held: bool = True) -> None:
        """One round: renew every lease (with ``held`` False: claim only those held here only),
        claim again those the backend lost, claim those held here only (one made by ``take`` is
        taken, as it was made), and tell the owners of those another holder has taken. Raises
        BackendUnavailable if the backend is away."""
        for lease in self._leases:
            match await self._drive(lease, lease.renewal(full=held)):
                case Verdict.REGAINED:
                    log.debug("lease %s claimed again", lease.key)
                case Verdict.LOST:
                    self._lose(lease, await self.backend.lookup(lease.key))
                case _:
                    pass  # skipped, held as it was, or released while it was claimed

    async def close(self) -> None:
        """Stop renewing (the leases stay claimed until the backend's close or their TTL)."""
        for lease in self._leases:
            if lease.pending is not None:
                lease.pending.cancel()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
