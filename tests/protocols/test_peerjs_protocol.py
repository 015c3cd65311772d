"""The PeerJS wire format (protocols/peerjs.py): query parameters, messages, the cluster format.

What the original `peer` 1.0.2 sends is asserted byte for byte; where it is silent or crashes,
polysignal's ERROR text is asserted whole. Arbitrary input is fuzzed at the end.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polysignal.core.errors import ClientError, MalformedFrame
from polysignal.protocols import peerjs as proto
from polysignal.protocols.peerjs import BadMessage, ErrorText, Message, MessageType, Params

# --- opening ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "params"),
    [
        ("key=peerjs&id=a&token=t&version=1.5.4", Params("peerjs", "a", "t")),
        ("id=a&token=t", Params("", "a", "t")),
        ("", Params("", "", "")),
        ("key=k&key=peerjs&id=a%20b&token=x+y", Params("peerjs", "a b", "x y")),  # last wins
        ("key=peerjs&id=%ZZ&token=t", Params("peerjs", "%ZZ", "t")),
    ],
)
def test_parse_query_reads_key_id_and_token_as_url_search_params_does(query, params):
    assert proto.parse_query(query) == params


@pytest.mark.parametrize(
    ("params", "error"),
    [
        (Params("peerjs", "a", "t"), None),
        (Params("", "a", "t"), ErrorText.INVALID_WS_PARAMETERS),
        (Params("peerjs", "", "t"), ErrorText.INVALID_WS_PARAMETERS),
        (Params("peerjs", "a", ""), ErrorText.INVALID_WS_PARAMETERS),
        (Params("wrong", "", "t"), ErrorText.INVALID_WS_PARAMETERS),  # the original's order
        (Params("wrong", "a", "t"), ErrorText.INVALID_KEY),
        (Params("peerjs", "a" * 256, "t" * 256), None),
        (Params("peerjs", "a" * 257, "t"), ErrorText.PARAMETER_TOO_LONG),
        (Params("peerjs", "a", "t" * 257), ErrorText.PARAMETER_TOO_LONG),
    ],
)
def test_check_params_in_the_originals_order_then_the_length_bound(params, error):
    assert proto.check_params(params, "peerjs") == error


def test_error_texts_are_the_originals():
    assert ErrorText.INVALID_KEY == "Invalid key provided"
    assert ErrorText.INVALID_WS_PARAMETERS == "No id, token, or key supplied to websocket server"
    assert ErrorText.CONNECTION_LIMIT_EXCEED == "Server has reached its concurrent user limit"
    assert orjson.loads(proto.ID_TAKEN_FRAME) == {
        "type": "ID-TAKEN",
        "payload": {"msg": "ID is taken"},
    }
    assert orjson.loads(proto.OPEN_FRAME) == {"type": "OPEN"}
    assert orjson.loads(proto.encode_error("x")) == {"type": "ERROR", "payload": {"msg": "x"}}


def test_token_digest_depends_on_id_and_token_and_hides_the_token():
    digest = proto.token_digest("a", "secret")
    assert digest == proto.token_digest("a", "secret")
    assert digest != proto.token_digest("b", "secret") != proto.token_digest("a", "other")
    assert "secret" not in digest and len(digest) == 36
    assert proto.token_digest("a", "\udcff")  # a lone surrogate from the query is digested


def test_new_id_is_a_random_uuid():
    first, second = proto.new_id(), proto.new_id()
    assert str(uuid.UUID(first)) == first and first != second


# --- messages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ('{"type":"HEARTBEAT"}', Message(MessageType.HEARTBEAT)),
        ('{"type":"HEARTBEAT","dst":5}', Message(MessageType.HEARTBEAT)),
        (
            '{"type":"OFFER","dst":"b","payload":{"sdp":"x"},"src":"forged"}',
            Message(MessageType.OFFER, "b", {"sdp": "x"}, True),
        ),
        (
            '{"type":"ANSWER","dst":"b","payload":null}',
            Message(MessageType.ANSWER, "b", None, True),
        ),
        ('{"type":"CANDIDATE","dst":"b"}', Message(MessageType.CANDIDATE, "b")),
        ('{"type":"LEAVE","dst":"b"}', Message(MessageType.LEAVE, "b")),
        ('{"type":"LEAVE"}', Message(MessageType.LEAVE)),
        ('{"type":"LEAVE","dst":""}', Message(MessageType.LEAVE)),
        ('{"type":"EXPIRE","dst":null}', Message(MessageType.EXPIRE)),
        (b'{"type":"OFFER","dst":"b"}', Message(MessageType.OFFER, "b")),
    ],
)
def test_decode_well_formed_messages(frame, message):
    assert proto.decode(frame) == message


@pytest.mark.parametrize(
    ("frame", "text"),
    [
        ("nope", "Invalid message: not JSON"),
        (b"\xff", "Invalid message: not JSON"),
        ("[" * 65 + "]" * 65, "Invalid message: JSON nested deeper than 64 levels"),
        ('{"type":"OFFER","dst":"b","payload":' + "[" * 63 + "]" * 63 + "}", None),
        (
            '{"type":"OFFER","dst":"b","payload":' + "[" * 64 + "]" * 64 + "}",
            "Invalid message: JSON nested deeper than 64 levels",
        ),
        ("[]", "Invalid message: expected a JSON object"),
        ("null", "Invalid message: expected a JSON object"),
        ("{}", "Invalid message: type must be a string"),
        ('{"type":5}', "Invalid message: type must be a string"),
        ('{"type":"PING"}', "Unknown message type: PING"),
        ('{"type":"OPEN"}', "Unknown message type: OPEN"),
        ('{"type":"' + "X" * 100 + '"}', "Unknown message type: " + "X" * 40 + "…"),
        ('{"type":"OFFER","dst":7}', "Invalid message: dst must be a string"),
        ('{"type":"OFFER","dst":["b"]}', "Invalid message: dst must be a string"),
    ],
)
def test_decode_refuses_what_is_no_message_with_its_text(frame, text):
    if text is None:
        proto.decode(frame)  # 64 levels in all are allowed
        return
    with pytest.raises(BadMessage) as refused:
        proto.decode(frame)
    assert refused.value.message == text


def test_relayed_frames_carry_the_stamped_src_and_nothing_else():
    message = proto.decode('{"type":"OFFER","dst":"b","payload":{"x":1},"src":"forged","z":2}')
    assert proto.encode_relayed(message, "a") == (
        b'{"type":"OFFER","src":"a","dst":"b","payload":{"x":1}}'
    )
    bare = proto.decode('{"type":"CANDIDATE","dst":"b"}')
    assert proto.encode_relayed(bare, "a") == b'{"type":"CANDIDATE","src":"a","dst":"b"}'
    assert proto.encode_notice(MessageType.EXPIRE, "b", "a") == (
        b'{"type":"EXPIRE","src":"b","dst":"a"}'
    )


# --- the cluster format -----------------------------------------------------------------------


def test_relayed_frames_round_trip_between_nodes():
    frame = proto.encode_relayed(Message(MessageType.ANSWER, "b", {"s": 1}, True), "a")
    relayed = proto.decode_relayed(frame)
    assert (relayed.type, relayed.src, relayed.dst, relayed.frame) == (
        MessageType.ANSWER,
        "a",
        "b",
        frame,
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"type":"HEARTBEAT","src":"a","dst":"b"}',
        b'{"type":"OFFER","src":1,"dst":"b"}',
        b'{"type":"OFFER","src":"a"}',
        b'{"type":7,"src":"a","dst":"b"}',
    ],
)
def test_malformed_relays_from_other_nodes_are_refused(payload):
    with pytest.raises(MalformedFrame):
        proto.decode_relayed(payload)


def test_holders_and_probe_answers_round_trip():
    holder = proto.Holder("a", "digest", 7)
    assert proto.decode_holder(proto.encode_holder(holder)) == holder
    assert proto.decode_probe_answer(proto.encode_probe_answer(7, True)) == (7, True)
    for bad in (b"{}", b'{"id":"a","token":"t","ask":"1"}', b"5"):
        with pytest.raises(MalformedFrame):
            proto.decode_holder(bad)
    for bad in (b'{"ask":1,"live":1}', b'{"ask":"1","live":true}'):
        with pytest.raises(MalformedFrame):
            proto.decode_probe_answer(bad)


# --- fuzz -------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from([t.value for t in MessageType]) | values},
    optional={"dst": st.text(max_size=8) | values, "payload": values, "src": values},
)


def as_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return "{}"


@FUZZ
@given(
    messages.map(as_text)
    | values.map(as_text)
    | st.text(max_size=60)
    | st.binary(max_size=60)
    | st.integers(1, 300).map(
        lambda n: '{"type":"OFFER","dst":"b","payload":' + "[" * n + "]" * n + "}"
    )
)
def test_any_input_decodes_or_raises_a_client_error_and_re_encodes(frame):
    try:
        message = proto.decode(frame)
    except ClientError:
        return
    assert message.type in proto.RELAYED or message.type is MessageType.HEARTBEAT
    encoded = proto.encode_relayed(message, "src")
    again = orjson.loads(encoded)
    assert again["src"] == "src" and again["type"] == message.type.value
    if message.dst is not None:
        assert proto.decode_relayed(encoded).frame == encoded


@FUZZ
@given(st.text(max_size=80))
def test_any_query_string_parses(query):
    params = proto.parse_query(query)
    assert proto.check_params(params, "peerjs") in (None, *ErrorText)
