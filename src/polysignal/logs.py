"""Logging policy (docs/architecture.md, "Logging").

* INFO: lifecycle (listening, backend connected, shutdown), one line each.
* DEBUG: per message, with payloads elided to their size.
* WARNING: degraded (backend down, peer cut off for not reading, limits hit repeatedly).
* ERROR: bugs only (an exception escaping a handler), with a traceback.

Loggers are named per layer and part: ``polysignal.server``, ``polysignal.topics``,
``polysignal.redis``, ``polysignal.presence``, ``polysignal.publish``, ``polysignal.relay``,
``polysignal.signalfire``, ``polysignal.rooms``, ``polysignal.serverless``,
``polysignal.workers``, ``polysignal.backend``. The part's name is
printed as the tag, e.g. ``[redis]``. Secrets and URL credentials never reach a log line.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable


class _TagFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.tag = record.name.rsplit(".", 1)[-1]
        return super().format(record)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _TagFormatter("%(asctime)s %(levelname)-7s [%(tag)s] %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger("polysignal")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # aiohttp's access log is per request; keep it off unless debugging.
    logging.getLogger("aiohttp.access").setLevel(
        logging.DEBUG if level == "DEBUG" else logging.WARNING
    )


def elide(payload: bytes | str) -> str:
    """How a payload appears in a DEBUG line: its size only."""
    return f"<{len(payload)} bytes>"


class Throttle:
    """Lets a repeated log line through once per ``interval`` seconds per key.

    Bad input from clients, and the same fault over and over, must not flood the log: the caller
    asks ``allow(key)`` before logging; it answers None while the key is held back, else the
    number of lines held back since the last one let through (for "... (N more)").
    """

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, key: Hashable) -> int | None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


def more(held: int) -> str:
    """The suffix of a throttled line: " (N more like it)" when lines were held back."""
    return f" ({held} more like it)" if held else ""
