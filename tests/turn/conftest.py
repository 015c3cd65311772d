"""The TURN tests' coturn (tests/coturn.py): one ``turnserver`` for the session. Missing coturn
skips with the reason (a failure in CI, POLYSIGNAL_REQUIRE_ALL=1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coturn import Coturn, turnserver_binary

from support import require


@pytest.fixture(scope="session")
def coturn() -> Iterator[Coturn]:
    """One coturn for every TURN test, with both secrets configured."""
    binary = turnserver_binary()
    require(binary is not None, "no coturn: `apt-get install coturn` (scripts/test does)")
    assert binary is not None
    server = Coturn(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
