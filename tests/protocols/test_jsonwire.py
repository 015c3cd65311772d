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


def nested(levels: int, inner: str = "1") -> str:
    """``levels`` arrays and objects, alternating, around ``inner``."""
    text = inner
    for level in range(levels):
        text = f"[{text}]" if level % 2 else f'{{"k":{text}}}'
    return text


@pytest.mark.parametrize("loads", [jsonwire.loads, jsonwire._std_loads])
def test_nesting_is_bounded_at_its_exact_limit(loads):
    assert jsonwire.too_deep(loads(nested(jsonwire.MAX_DEPTH)), jsonwire.MAX_DEPTH - 1)
    for levels in (jsonwire.MAX_DEPTH + 1, 300, 5000):
        with pytest.raises(jsonwire.TooDeep) as exc:
            loads(nested(levels))
        assert str(exc.value) == "nested deeper than 64 levels"


@pytest.mark.parametrize("loads", [jsonwire.loads, jsonwire._std_loads])
def test_brackets_inside_strings_are_not_nesting(loads):
    inner = '"' + "[{" * 200 + '\\"]"'
    assert loads(nested(3, inner)) == {"k": [{"k": "[{" * 200 + '"]'}]}


def test_what_decodes_encodes_again():
    value = jsonwire.loads(nested(jsonwire.MAX_DEPTH))
    assert jsonwire.loads(jsonwire.dumps(value)) == value
    assert jsonwire.loads(jsonwire._std_dumps(value)) == value


def test_depth_of_decoded_values():
    assert not jsonwire.too_deep(1)
    assert not jsonwire.too_deep([])
    assert jsonwire.too_deep([[]], 1)
    assert not jsonwire.too_deep([[]], 2)
    assert jsonwire.too_deep({"a": [1, {"b": {}}]}, 2)
    assert not jsonwire.too_deep({"a": [1, {"b": {}}]}, 4)
    jsonwire.check_depth([[[]]], 3)  # too small to be deep: not even looked at
    deepest = jsonwire.loads(nested(jsonwire.MAX_DEPTH))
    jsonwire.check_depth(deepest, 200)
    with pytest.raises(jsonwire.TooDeep):
        jsonwire.check_depth([deepest], 200)


# --- the depth guard of the standard-library path, on the text itself ---

D = jsonwire.MAX_DEPTH


@pytest.mark.parametrize("as_bytes", [False, True])
def test_the_text_guard_allows_exactly_max_depth(as_bytes):
    text = "[" * D + "]" * D
    jsonwire._guard_std(text.encode() if as_bytes else text)  # at the limit: no error
    deeper = "[" * (D + 1) + "]" * (D + 1)
    with pytest.raises(jsonwire.TooDeep) as caught:
        jsonwire._guard_std(deeper.encode() if as_bytes else deeper)
    assert str(caught.value) == f"nested deeper than {D} levels"


def test_the_text_guard_counts_objects_and_closes():
    jsonwire._guard_std('{"a":' * D + "1" + "}" * D)
    with pytest.raises(jsonwire.TooDeep):
        jsonwire._guard_std('{"a":' * (D + 1) + "1" + "}" * (D + 1))
    # Closed levels are left: many shallow siblings are no depth at all.
    jsonwire._guard_std("[" + "[]," * (D + 5) + "[]]")
    jsonwire._guard_std("[" * D + "]" * D + "[" * D + "]" * D)
    with pytest.raises(jsonwire.TooDeep):
        jsonwire._guard_std("{" * D + "}" + "[" * 2)  # one closed, two more opened: D + 1


def test_the_text_guard_skips_brackets_inside_strings():
    inside = '"' + "[" * (D + 5) + '"'
    jsonwire._guard_std("[" * D + inside + "]" * D)
    escaped = '"\\"' + "[" * (D + 5) + '"'  # an escaped quote does not end the string
    jsonwire._guard_std("[" + escaped + "]")
    backslash = '"\\\\"'  # an escaped backslash does: the brackets after it count
    with pytest.raises(jsonwire.TooDeep):
        jsonwire._guard_std("[" + backslash + "," + "[" * D + "]" * D + "]")
    with pytest.raises(jsonwire.TooDeep):
        jsonwire._guard_std('["x",' + "[" * D + "]" * D + "]")  # a string that ended


def test_the_text_guard_counts_brackets_only_and_reads_any_bytes():
    jsonwire._guard_std("[" + "X" * (D + 5) + "]")  # no other character opens a level
    jsonwire._guard_std("[" * D + "X]" * D)  # nor closes one: D levels still
    with pytest.raises(jsonwire.TooDeep):  # bytes that are not UTF-8 are no error of its own
        jsonwire._guard_std(b"\xff" + b"[" * (D + 1))
