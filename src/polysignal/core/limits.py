"""Rate limiting and per-address connection counting; time is passed in, never read here."""

from __future__ import annotations

from collections import Counter


class TokenBucket:
    """Allow ``rate`` events per second on average, ``burst`` at once.

    ``now`` is a monotonic time in seconds supplied by the caller, which keeps this testable
    without a clock.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._tokens = float(self.burst)
        self._last = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are enough; False means the event is over the limit."""
        if self.rate <= 0:
            return True
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False


class AddressCounter:
    """Open connections per client address, refusing past ``limit`` (0 = unlimited)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: Counter[str] = Counter()

    def acquire(self, address: str) -> bool:
        if self.limit and self._counts[address] >= self.limit:
            return False
        self._counts[address] += 1
        return True

    def release(self, address: str) -> None:
        left = self._counts[address] - 1
        if left > 0:
            self._counts[address] = left
        else:
            del self._counts[address]

    def count(self, address: str) -> int:
        return self._counts.get(address, 0)
