"""The layers stay as drawn: core/ and protocols/ free of I/O; protocol handlers on the driver,
never on aiohttp."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import ROOT

SRC = ROOT / "src" / "polysignal"
FORBIDDEN = {"asyncio", "aiohttp", "redis", "socketio", "engineio", "uvloop", "socket", "boto3"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


PURE_FILES = sorted((SRC / "core").rglob("*.py")) + sorted((SRC / "protocols").rglob("*.py"))


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_pure_layers_import_no_io(path):
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"


def test_the_check_sees_a_forbidden_import(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("import asyncio\nfrom redis.asyncio import Redis\n")
    assert imported_roots(sample) & FORBIDDEN == {"asyncio", "redis"}


DRIVER_FILES = [
    SRC / "server" / name
    for name in (
        "connection.py",
        "driver.py",
        "topics.py",
        "relay.py",
        "signalfire.py",
        "peerjs.py",
    )
]
"""The connection, the driver and every protocol handler on it: aiohttp only serves plain HTTP
(and socket.io) behind the front door."""


@pytest.mark.parametrize("path", DRIVER_FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_protocol_handler_imports_aiohttp(path):
    bad = imported_roots(path) & {"aiohttp", "socketio", "engineio"}
    assert not bad, f"{path.relative_to(SRC)} imports {sorted(bad)}"
