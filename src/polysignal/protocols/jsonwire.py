"""JSON for wire frames: orjson when it is installed, else the standard library.

The server always has orjson (a dependency). The AWS Lambda zip of the serverless shape is pure
Python so it runs on any Lambda architecture and Python runtime (docs/serverless.md); there the
standard library stands in. Both paths reject what orjson rejects and that JavaScript peers could
not read back: invalid UTF-8, ``NaN``/``Infinity`` and numbers that overflow to infinity.

Nesting is bounded at decode, the same everywhere (``MAX_DEPTH``): a value nested deeper is
refused with ``TooDeep`` before any protocol acts on it. Without the bound a client could send
what the decoder accepts but the encoder cannot write back (orjson encodes at most 254 levels),
failing only after the server had acknowledged the message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 64
"""How deeply arrays and objects (msgpack arrays and maps) may nest in a client's message."""


class DecodeError(ValueError):
    """The input is not a JSON document both JSON implementations accept."""


class TooDeep(DecodeError):
    """A value nested deeper than ``MAX_DEPTH`` levels."""

    def __init__(self) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels")


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value``'s lists and dicts nest deeper than ``limit`` (the top one is level 1)."""
    if type(value) is not dict and type(value) is not list:
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        for child in item.values() if type(item) is dict else item:
            if type(child) is dict or type(child) is list:
                stack.append((child, level + 1))
    return False


def check_depth(value: Any, size: int) -> None:
    """Raise TooDeep if ``value`` (decoded from ``size`` bytes) nests too deep. A document of
    at most ``MAX_DEPTH`` bytes cannot, so small messages cost nothing."""
    if size > MAX_DEPTH and too_deep(value):
        raise TooDeep


def _brackets(data: str | bytes) -> int:
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def _std_loads(data: str | bytes) -> Any:
    if _brackets(data) > MAX_DEPTH:
        _guard_std(data)
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray | memoryview) else data
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise DecodeError(str(exc)) from None


def _guard_std(data: str | bytes) -> None:
    """Raise TooDeep if the JSON text ``data`` nests deeper than ``MAX_DEPTH`` (measured on the
    text: the standard library's parser recurses, so it runs before it)."""
    level = 0
    in_string = escaped = False
    for char in data.decode("utf-8", "replace") if isinstance(data, bytes) else data:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            level += 1
            if level > MAX_DEPTH:
                raise TooDeep
        elif char in "]}":
            level -= 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is infinity when parsed as double")
    return value


def _std_dumps(value: Any) -> bytes:
    # ASCII escapes keep the output valid UTF-8 even for a lone surrogate the parser let in.
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")


loads: Callable[[str | bytes], Any]
dumps: Callable[[Any], bytes]

try:
    import orjson
except ImportError:  # pragma: no cover - exercised by the Lambda zip test in a subprocess
    loads, dumps = _std_loads, _std_dumps
else:

    def _orjson_loads(data: str | bytes) -> Any:
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            if _brackets(data) > MAX_DEPTH:
                _guard_std(data)  # past orjson's own depth limit: too deep for us too
            raise DecodeError(str(exc)) from None
        if _brackets(data) > MAX_DEPTH and too_deep(value):
            raise TooDeep
        return value

    loads, dumps = _orjson_loads, orjson.dumps


def type_name(value: object) -> str:
    """How error messages name the type of a decoded wire value: "a number", "null", ..."""
    match value:
        case None:
            return "null"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case str():
            return "a string"
        case list() | tuple():
            return "a list"
        case dict():
            return "an object"
        case bytes() | bytearray():
            return "binary"
    return type(value).__name__


def clip(text: str, limit: int = 40) -> str:
    """``text`` shortened for an error message, so a client cannot make the server echo a blob."""
    return text if len(text) <= limit else text[:limit] + "…"
