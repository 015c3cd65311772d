"""Repeated log lines, once per interval: ``Throttle`` and the suffix of a throttled line.

Standard library only, so every part of polysignal can use it, the Lambda handler included
(``serverless/package.py`` ships this module without the server's dependencies).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

__all__ = ["Throttle", "more"]


class Throttle:
    """Lets a repeated log line through once (``burst`` times) per ``interval`` seconds per key.

    Bad input from clients, and the same fault over and over, must not flood the log: the caller
    asks ``allow(key)`` before logging; it answers None while the key is held back, else the
    number of lines held back since the last one let through (for "... (N more)"). An interval
    starts with the first line let through; the ``burst`` lines of one interval pass, the rest
    are held back and counted in the first line of a later interval.
    """

    def __init__(
        self,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        burst: int = 1,
    ) -> None:
        self.interval = interval
        self.burst = burst
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}
        self._sent: dict[Hashable, int] = {}

    def allow(self, key: Hashable) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            sent = self._sent.get(key, 1)
            if sent < self.burst:
                self._sent[key] = sent + 1
                return 0
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        if self.burst > 1:
            self._sent[key] = 1
        return self._held.pop(key, 0)


def more(held: int) -> str:
    """The suffix of a throttled line: " (N more like it)" when lines were held back."""
    return f" ({held} more like it)" if held else ""
