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


def statements(path: Path) -> int:
    """Statements of logic in ``path``: every statement but docstrings."""
    count = 0
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.stmt):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring (or another bare constant, which is no logic either)
        count += 1
    return count


def layer_sizes() -> dict[str, int]:
    """Statements of logic per layer (each folder of the package)."""
    return {
        folder.name: sum(statements(path) for path in folder.rglob("*.py"))
        for folder in sorted(SRC.iterdir())
        if folder.is_dir() and any(folder.glob("*.py"))
    }


def test_core_is_the_largest_layer():
    """The protocols' rules and the cluster's semantics live in core/, without I/O; the layers
    that do I/O carry out its decisions and stay smaller (docs/architecture.md, "Layers")."""
    sizes = layer_sizes()
    largest = max(sizes, key=sizes.__getitem__)
    assert largest == "core", f"statements per layer: {sizes}"


def test_statements_leave_out_docstrings(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text('"""Doc."""\n\ndef f(x):\n    """Doc."""\n    if x:\n        return 1\n')
    assert statements(sample) == 3  # def, if, return
