"""The topics protocol's decode/encode, without an event loop (docs/protocols/topics.md)."""

from __future__ import annotations

import orjson
import pytest

from polysignal.core.errors import ClientError, MalformedFrame, UnknownCommand
from polysignal.protocols import topics as proto


def test_subscribe_and_unsubscribe_keep_string_topics_in_order():
    cmd = proto.decode('{"type":"subscribe","topics":["a","b"]}')
    assert cmd == proto.Subscribe(("a", "b"))
    assert proto.decode('{"type":"unsubscribe","topics":[]}') == proto.Unsubscribe(())


def test_non_string_topics_are_skipped_and_reported():
    cmd = proto.decode('{"type":"subscribe","topics":["a",1,null,"",{"x":1},["y"],true]}')
    assert isinstance(cmd, proto.Subscribe)
    assert cmd.topics == ("a",)
    assert cmd.problems == (
        "topics[1] is a number, not a string",
        "topics[2] is null, not a string",
        "topics[3] is empty",
        "topics[4] is an object, not a string",
        "topics[5] is a list, not a string",
        "topics[6] is a boolean, not a string",
    )
    err = orjson.loads(proto.skipped_entries_error("subscribe", cmd.problems))
    assert err["type"] == "error" and err["message"].startswith("subscribe: skipped topics[1]")


def test_topic_length_limit():
    limits = proto.TopicLimits(max_topic_length=3)
    cmd = proto.decode('{"type":"subscribe","topics":["abc","abcd"]}', limits)
    assert isinstance(cmd, proto.Subscribe)
    assert cmd.topics == ("abc",) and "longer than 3" in cmd.problems[0]
    with pytest.raises(ClientError, match="longer than 3"):
        proto.decode('{"type":"publish","topic":"abcd"}', limits)


def test_publish_keeps_the_whole_object():
    frame = '{"type":"publish","topic":"t","data":{"k":[1,2]},"messageId":"m"}'
    cmd = proto.decode(frame)
    assert cmd == proto.Publish(
        "t", {"type": "publish", "topic": "t", "data": {"k": [1, 2]}, "messageId": "m"}
    )


def test_publish_data_may_be_any_json_including_encrypted_strings():
    cmd = proto.decode('{"type":"publish","topic":"t","data":"QUVTLUdDTQ=="}')
    assert isinstance(cmd, proto.Publish) and cmd.message["data"] == "QUVTLUdDTQ=="


def test_ping():
    assert proto.decode(b'{"type":"ping"}') == proto.Ping()
    assert orjson.loads(proto.PONG) == {"type": "pong"}


def test_encode_publish_adds_and_overwrites_server_fields():
    out = orjson.loads(
        proto.encode_publish(
            {"type": "publish", "topic": "t", "clients": 99, "_origin": "x", "extra": 1},
            clients=4,
            origin="node-1",
        )
    )
    assert out == {"type": "publish", "topic": "t", "clients": 4, "_origin": "node-1", "extra": 1}


@pytest.mark.parametrize(
    ("frame", "error", "needle"),
    [
        ("", MalformedFrame, "invalid JSON"),
        ("{", MalformedFrame, "invalid JSON"),
        ("\xff", MalformedFrame, "invalid JSON"),
        ("null", MalformedFrame, "got null"),
        ("42", MalformedFrame, "got a number"),
        ("[]", MalformedFrame, "got a list"),
        ('{"topics":[]}', MalformedFrame, "missing 'type'"),
        ('{"type":null}', MalformedFrame, "missing 'type'"),
        ('{"type":["subscribe"]}', MalformedFrame, "'type' must be a string, got a list"),
        ('{"type":"SUBSCRIBE"}', UnknownCommand, "unknown type 'SUBSCRIBE'"),
        ('{"type":"' + "z" * 100 + '"}', UnknownCommand, "…"),
        ('{"type":"subscribe","topics":{"a":1}}', MalformedFrame, "must be a list, got an object"),
        ('{"type":"unsubscribe"}', MalformedFrame, "unsubscribe: missing 'topics'"),
        ('{"type":"publish"}', MalformedFrame, "publish: missing 'topic'"),
        ('{"type":"publish","topic":""}', MalformedFrame, "publish: missing 'topic'"),
        ('{"type":"publish","topic":7}', MalformedFrame, "'topic' must be a string, got a number"),
    ],
)
def test_bad_frames_raise_client_errors_naming_the_problem(frame, error, needle):
    with pytest.raises(error) as info:
        proto.decode(frame)
    assert needle in info.value.message
    # Every bad input is reportable as an error frame.
    assert orjson.loads(proto.encode_error(info.value.message))["type"] == "error"


def test_deeply_nested_json_is_a_client_error_not_a_crash():
    with pytest.raises(ClientError):
        proto.decode("[" * 100_000 + "]" * 100_000)


def _deep(levels: int) -> str:
    return '{"type":"publish","topic":"t","data":' + "[" * (levels - 1) + "]" * (levels - 1) + "}"


def test_nesting_is_bounded_at_decode():
    assert isinstance(proto.decode(_deep(64)), proto.Publish)
    with pytest.raises(MalformedFrame) as exc:
        proto.decode(_deep(65))
    assert exc.value.message == "JSON nested deeper than 64 levels"
