"""jsonwire: the standard-library fallback (used in the Lambda zip) agrees with orjson."""

from __future__ import annotations

import json

import orjson
import pytest

from polysignal.protocols import jsonwire


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"publish","topic":"t","data":{"a":[1,2.5,null,true,"\\u00e9"]}}',
        '{"x":"ü😀"}',
        b"[]",
        b'"plain"',
        b"-0.0",
        b"12345678901234",
    ],
)
def test_both_paths_decode_alike(data):
    assert jsonwire._std_loads(data) == orjson.loads(data) == jsonwire.loads(data)


@pytest.mark.parametrize(
    "data",
    [b"NaN", b"[Infinity]", b"[-Infinity]", b"[1e999]", b"\xff", b"{", b"", b"[1,]", "[" * 5000],
)
def test_both_paths_refuse_alike(data):
    with pytest.raises(jsonwire.DecodeError):
        jsonwire._std_loads(data)
    with pytest.raises(jsonwire.DecodeError):
        jsonwire.loads(data)


def test_fallback_output_is_compact_ascii_json_that_means_the_same():
    value = {"type": "publish", "data": "é😀", "n": [1, 2.5, None]}
    out = jsonwire._std_dumps(value)
    assert out == b'{"type":"publish","data":"\\u00e9\\ud83d\\ude00","n":[1,2.5,null]}'
    assert orjson.loads(out) == value == orjson.loads(jsonwire.dumps(value))


def test_fallback_never_emits_invalid_utf8_or_nan():
    # A lone surrogate the stdlib parser let in is written back as an escape, not raw bytes.
    lone = jsonwire._std_loads('"\\ud800"')
    assert jsonwire._std_dumps(lone) == b'"\\ud800"'
    with pytest.raises(ValueError):
        jsonwire._std_dumps(float("nan"))
    assert json.loads(jsonwire._std_dumps({"k": "v"})) == {"k": "v"}
