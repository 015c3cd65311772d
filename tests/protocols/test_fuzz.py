"""Every decoder of what clients send, fed arbitrary input (hypothesis).

Two properties hold for each: whatever arrives, the decoder either returns a message or raises a
``ClientError`` (the protocol then answers it its own way), never anything else; and what it
returns can be encoded again the way the server sends it on. Each run is bounded in examples and
time; hypothesis prints the failing example and how to reproduce it (its seed) on failure.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polysignal.core.errors import ClientError
from polysignal.protocols import jsonwire
from polysignal.protocols import relay as relay_proto
from polysignal.protocols import signalfire as sf_proto
from polysignal.protocols import topics as topics_proto

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values as clients could send them, nested past the limit now and then.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
deep = st.integers(min_value=1, max_value=300).map(lambda n: "[" * n + "]" * n)
deep_publish = deep.map(lambda d: '{"type":"publish","topic":"t","data":' + d + "}")
deep_offer = deep.map(lambda d: '{"id":1,"cmd":"offer","target":"x","data":' + d + "}")


def shaped(kinds: list[str], fields: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects that look like a protocol's messages: a known type, known fields, any values."""
    return st.fixed_dictionaries(
        {"type": st.sampled_from(kinds) | values},
        optional={name: strategy | values for name, strategy in fields.items()},
    )


def as_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return "{}"


# --- topics -----------------------------------------------------------------------------------

topic_messages = shaped(
    ["subscribe", "unsubscribe", "publish", "ping"],
    {
        "topics": st.lists(st.text(max_size=10) | values, max_size=4),
        "topic": st.text(max_size=10),
        "data": values,
    },
)


def check_topics(frame: str | bytes) -> None:
    try:
        command = topics_proto.decode(frame)
    except ClientError:
        return
    if isinstance(command, topics_proto.Publish):
        out = topics_proto.encode_publish(command.message, 3, "node")
        assert jsonwire.loads(out)["topic"] == command.topic


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200) | deep | deep_publish)
def test_topics_arbitrary_frames(frame):
    check_topics(frame)


@FUZZ
@given(topic_messages)
def test_topics_message_shaped_frames(message):
    check_topics(as_text(message))


# --- relay, in every generation --------------------------------------------------------------

relay_messages = shaped(
    ["Join", "Leave", "Heartbeat", "Heart"],
    {
        "documentIds": st.lists(st.text(max_size=10), max_size=4),
        "join": st.lists(st.text(max_size=10), max_size=4),
        "leave": st.lists(st.text(max_size=10), max_size=4),
    },
)


def check_relay(frame: str | bytes, encoding: relay_proto.Encoding) -> None:
    try:
        decoded = relay_proto.decode(frame, encoding)
    except ClientError:
        return
    command = decoded.command
    if isinstance(command, relay_proto.Join | relay_proto.Leave):
        for generation in relay_proto.Generation:
            out = relay_proto.encode_introduction(generation, "peer", command.document_ids)
            assert out  # JSON or msgpack bytes


@FUZZ
@given(st.text(max_size=200) | deep)
def test_relay_arbitrary_json_frames(frame):
    check_relay(frame, relay_proto.Encoding.JSON)


@FUZZ
@given(st.binary(max_size=200))
def test_relay_arbitrary_msgpack_frames(frame):
    check_relay(frame, relay_proto.Encoding.MSGPACK)


@FUZZ
@given(relay_messages)
def test_relay_message_shaped_frames_in_both_encodings(message):
    check_relay(as_text(message), relay_proto.Encoding.JSON)
    try:
        packed = msgpack.packb(message)
    except (TypeError, ValueError, OverflowError):
        return
    check_relay(packed, relay_proto.Encoding.MSGPACK)


@FUZZ
@given(st.text(max_size=60))
def test_relay_endpoints(path):
    with contextlib.suppress(ClientError):
        relay_proto.parse_endpoint("/" + path)


# --- Signal-Fire ------------------------------------------------------------------------------

sf_messages = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers() | st.text(max_size=8) | values,
        "cmd": st.sampled_from([c.value for c in sf_proto.Cmd]) | values,
        "target": st.text(max_size=21) | values,
        "data": values,
    },
)


def check_signalfire(frame: str | bytes) -> None:
    try:
        decoded = sf_proto.decode(frame)
    except ClientError:
        return
    if isinstance(decoded, sf_proto.Request):
        sf_proto.precheck(decoded, "own-id")
        for state in sf_proto.TargetState:
            sf_proto.postcheck(decoded, state)
        out = sf_proto.encode(sf_proto.relayed(decoded, "origin"))
        assert jsonwire.loads(out)["cmd"] == decoded.cmd.value
        assert sf_proto.encode_ack(decoded.id)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200) | deep | deep_offer)
def test_signalfire_arbitrary_frames(frame):
    check_signalfire(frame)


@FUZZ
@given(sf_messages)
def test_signalfire_message_shaped_frames(message):
    check_signalfire(as_text(message))
