"""Leases: this node's cluster-wide claims, held once for every protocol that needs one.

A lease makes one key (a Signal-Fire id, a relay peer id, a rooms room name) this node's in the
whole cluster, with an owner token, for ``ID_LEASE_TTL`` seconds at a time:

* ``claim`` claims a free key (or one this token already holds, a takeover by its owner);
  ``take`` also takes a key another holder has, releasing that holder's claim and telling it
  (``evict``) so its node drops the socket that held it;
* every lease of the node is renewed every third of the TTL, in one round; a lease that the
  backend lost (it expired during an outage, or Redis restarted empty) is claimed again, and one
  that another holder has taken meanwhile is lost: ``on_lost`` tells its owner;
* when the backend comes back after an outage every lease is re-asserted at once, not at the next
  round;
* ``release`` gives a key back; ``close`` stops the renewals (the backend drops the node's claims
  when it closes).

While the backend is unreachable a claim is held *here* only (``Lease.held`` is False) and is
claimed cluster-wide as soon as the backend is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from polysignal.backends.base import Backend, Claim
from polysignal.core.errors import BackendUnavailable

log = logging.getLogger("polysignal.lease")

LostHandler = Callable[[Claim | None], None]
"""Told the holder that took a lease over (None: nobody holds it now, and it could not be had)."""
Evict = Callable[[Claim], Awaitable[None]]
"""Tells ``holder``'s node that its claim is gone (``take``)."""

MIN_TTL = 1.0
"""Seconds: a lease is renewed every third of its TTL, and a round must have time to run."""


@dataclass(eq=False)
class Lease:
    """One claimed key. ``held``: claimed cluster-wide (False while the backend is away)."""

    key: str
    token: str
    on_lost: LostHandler | None = None
    held: bool = False
    released: bool = field(default=False, repr=False)


class Leases:
    """The leases of one node, renewed together."""

    def __init__(self, backend: Backend, ttl: float) -> None:
        if ttl < MIN_TTL:
            raise ValueError(f"a lease TTL must be at least {MIN_TTL:g} s, not {ttl:g}")
        self.backend = backend
        self.ttl = float(ttl)
        self._leases: dict[str, Lease] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        backend.on_ready(self._wake.set)

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
    ) -> Lease | None:
        """Claim ``key``; None when another holder has it. While the backend is away the lease
        is kept here and claimed once it returns (``held`` False until then); with
        ``keep_while_unavailable`` False, BackendUnavailable is raised instead."""
        lease = Lease(key, token or secrets.token_urlsafe(12), on_lost)
        try:
            lease.held = await self.backend.claim(key, lease.token, self.ttl)
        except BackendUnavailable as exc:
            if not keep_while_unavailable:
                raise
            log.debug("lease %s kept here until the backend returns (%s)", key, exc)
        else:
            if not lease.held:
                return None
        self._keep(lease)
        return lease

    async def take(
        self,
        key: str,
        evict: Evict,
        token: str | None = None,
        *,
        on_lost: LostHandler | None = None,
        attempts: int = 4,
    ) -> Lease:
        """Claim ``key``, taking it from whoever holds it: their claim is released and
        ``evict(holder)`` tells their node. Gives up after ``attempts`` races and keeps the
        lease here only (``held`` False), to be claimed by the next renewal round."""
        lease = Lease(key, token or secrets.token_urlsafe(12), on_lost)
        try:
            for _ in range(attempts):
                if await self.backend.claim(key, lease.token, self.ttl):
                    lease.held = True
                    break
                holder = await self.backend.lookup(key)
                if holder is None:
                    continue  # released in between
                await self.backend.release(key, holder.token)
                await evict(holder)
            else:
                log.warning("lease %s: taking it over kept failing; holding it here", key)
        except BackendUnavailable as exc:
            log.debug("lease %s kept here until the backend returns (%s)", key, exc)
        self._keep(lease)
        return lease

    async def release(self, lease: Lease) -> None:
        """Give ``lease`` back (only the claim its token holds; nothing else is touched)."""
        if lease.released:
            return
        lease.released = True
        if self._leases.get(lease.key) is lease:
            del self._leases[lease.key]
        if lease.held:
            lease.held = False
            with contextlib.suppress(BackendUnavailable):
                await self.backend.release(lease.key, lease.token)

    def forget(self, lease: Lease) -> None:
        """Stop renewing ``lease`` without releasing it (another node holds it on from here)."""
        lease.released = True
        if self._leases.get(lease.key) is lease:
            del self._leases[lease.key]

    def _keep(self, lease: Lease) -> None:
        previous = self._leases.get(lease.key)
        if previous is not None and previous is not lease:
            previous.released = True  # the same key claimed again here: the newer one counts
        self._leases[lease.key] = lease
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    # --- renewing ---
    async def _renew_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ttl / 3):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.renew_all()
            except BackendUnavailable as exc:
                # The backend warns about its outage itself; the next round, or its return,
                # re-asserts every lease.
                log.debug("leases not renewed: %s", exc)

    async def renew_all(self) -> None:
        """One round: renew every lease, claim again those the backend lost, and tell the owners
        of those another holder has taken. Raises BackendUnavailable if the backend is away."""
        for lease in list(self._leases.values()):
            if lease.released:
                continue
            if lease.held and await self.backend.renew(lease.key, lease.token, self.ttl):
                continue
            if await self.backend.claim(lease.key, lease.token, self.ttl):
                if not lease.held:
                    log.debug("lease %s claimed again", lease.key)
                lease.held = True
                continue
            if lease.released:  # released while the claim was on its way
                continue
            holder = await self.backend.lookup(lease.key)
            lease.held = False
            self.forget(lease)
            log.warning("lease %s is held by another holder now; giving it up", lease.key)
            if lease.on_lost is not None:
                lease.on_lost(holder)

    async def close(self) -> None:
        """Stop renewing (the leases stay claimed until the backend's close or their TTL)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
