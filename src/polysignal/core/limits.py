"""Rate limiting and per-address connection counting; time is passed in, never read here."""

from __future__ import annotations

import math
from collections import deque


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


class FailureWindow:
    """Failures per client address over a sliding window of ``window`` seconds: at ``limit`` of
    them the address waits until the oldest leaves the window (``limit`` 0: never counted).
    Memory stays bounded: at most ``limit`` times per address, and addresses whose failures all
    left the window are dropped once per window."""

    __slots__ = ("_by_address", "_swept", "limit", "window")

    def __init__(self, limit: int, window: float, now: float) -> None:
        self.limit = limit
        self.window = window
        self._by_address: dict[str, deque[float]] = {}
        self._swept = now

    def __len__(self) -> int:
        """The addresses with failures still held."""
        return len(self._by_address)

    def retry_after(self, address: str, now: float) -> int | None:
        """Whole seconds (at least 1) until ``address`` may try again; None when it may now."""
        if not self.limit:
            return None
        times = self._recent(address, now)
        if len(times) < self.limit:
            return None
        return max(1, math.ceil(times[0] + self.window - now))

    def record(self, address: str, now: float) -> int:
        """One failure of ``address``: how many it now has within the window (0: not counted)."""
        if not self.limit:
            return 0
        self._sweep(now)
        times = self._by_address.setdefault(address, deque())
        times.append(now)
        return len(times)

    def _recent(self, address: str, now: float) -> deque[float]:
        times = self._by_address.get(address)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._by_address[address]
        return times

    def _sweep(self, now: float) -> None:
        if now - self._swept < self.window:
            return
        self._swept = now
        for address in [a for a, t in self._by_address.items() if t[-1] <= now - self.window]:
            del self._by_address[address]
