"""Rate limiting and per-address connection counting; time is passed in, never read here."""

from __future__ import annotations


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
        self.refused = 0  # acquisitions refused so far (the per-address refusals metric)
        self._counts: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        count = self._counts.get(address, 0)
        if self.limit and count >= self.limit:
            self.refused += 1
            return False
        self._counts[address] = count + 1
        return True

    def release(self, address: str) -> None:
        left = self._counts.get(address, 0) - 1
        if left > 0:
            self._counts[address] = left
        else:
            self._counts.pop(address, None)

    def count(self, address: str) -> int:
        return self._counts.get(address, 0)
