"""JSON for wire frames: orjson when it is installed, else the standard library.

The server always has orjson (a dependency). The AWS Lambda zip of the serverless shape is pure
Python so it runs on any Lambda architecture and Python runtime (docs/serverless.md); there the
standard library stands in. Both paths reject what orjson rejects and that JavaScript peers could
not read back: invalid UTF-8, ``NaN``/``Infinity`` and numbers that overflow to infinity.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any


class DecodeError(ValueError):
    """The input is not a JSON document both JSON implementations accept."""


def _std_loads(data: str | bytes) -> Any:
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray | memoryview) else data
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise DecodeError(str(exc)) from None


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
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(str(exc)) from None

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
