"""The rooms protocol's decoders fed arbitrary input (hypothesis), without a server: event data,
tokens, messages between nodes, and socket.io / engine.io packets as far as polysignal checks
or decodes them (``protocols/rooms.py``, ``server/socketio_compat.py``).

Whatever comes in, nothing escapes but a ``ClientError`` (core/errors.py), or for what
python-socketio decodes, one of what ``BoundedServer`` refuses cleanly; and what is accepted
encodes again into JSON every peer can read back (no NaN, no lone surrogate) and decodes to the
same thing. A failure prints its example and the blob to reproduce it (``print_blob``).
"""

from __future__ import annotations

import json
import os
import string
from typing import Any

import orjson
import socketio.packet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polysignal.core.errors import ClientError
from polysignal.protocols import jsonwire
from polysignal.protocols import rooms as proto
from polysignal.protocols.rooms import ClientEvent, ClusterMessage, ClusterOp, ServerEvent
from polysignal.server import socketio_compat as compat

FUZZ = settings(
    max_examples=int(os.environ.get("POLYSIGNAL_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
LIMITS = proto.Limits(max_payload_bytes=2048, max_room_length=64)
SECRET = b"fuzz-secret"

# What socket.io's JSON parser (the standard library's, engineio.json) can hand the server:
# NaN and Infinity, integers of up to 100 digits, lone surrogates; and binary attachments.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.text(max_size=20),
    st.sampled_from(["\ud800", "a\udfffb", ""]),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=20,
)
names_or_not = st.one_of(st.sampled_from(["r", "", "\ud800", "x" * 70, "p-1"]), values)
event_data = st.one_of(
    values,
    st.fixed_dictionaries(
        {},
        optional={
            **dict.fromkeys(("room", "peer_id", "to"), names_or_not),
            **dict.fromkeys(("token", "auth", "payload", "peerinfo"), values),
            **dict.fromkeys(("session_description", "ice_candidate"), values),
        },
    ),
)

PARSERS = {
    ClientEvent.AUTH_REQUEST: lambda data: proto.parse_auth_request(data, LIMITS),
    ClientEvent.ROOM_CREATE_REQUEST: lambda data: proto.parse_create(data, LIMITS),
    ClientEvent.ROOM_JOIN_REQUEST: lambda data: proto.parse_join(data, LIMITS),
    ClientEvent.ROOM_JOIN_ACCEPT: lambda data: proto.parse_answer(
        ClientEvent.ROOM_JOIN_ACCEPT, data, LIMITS
    ),
    ClientEvent.ROOM_JOIN_REJECT: lambda data: proto.parse_answer(
        ClientEvent.ROOM_JOIN_REJECT, data, LIMITS
    ),
    ClientEvent.RELAY_SESSION_DESCRIPTION: lambda data: proto.parse_relay(
        ClientEvent.RELAY_SESSION_DESCRIPTION, data, LIMITS
    ),
    ClientEvent.RELAY_ICE_CANDIDATE: lambda data: proto.parse_relay(
        ClientEvent.RELAY_ICE_CANDIDATE, data, LIMITS
    ),
}


def reencoded(command: Any) -> dict[str, Any]:
    """The event data a client would send for ``command``, as socket.io carries it: JSON that
    JavaScript reads back (``allow_nan=False``), decoded again. An ``auth-request``'s token is
    only checked, never sent on: it is carried over as it came."""
    fields = {
        name: getattr(command, name)
        for name in ("room", "peer_id", "to", "payload", "peerinfo")
        if hasattr(command, name)
    }
    if isinstance(command, proto.Relay):
        fields["session_description"] = fields["ice_candidate"] = command.body
    if fields.get("room", "") is None:  # a create without a name: the server picks one
        del fields["room"]
    data = proto.body(**fields)
    text = json.dumps(data, allow_nan=False)  # as socket.io's encoder writes it
    orjson.dumps(data)  # and as a message to another node carries it
    again: dict[str, Any] = json.loads(text)
    if isinstance(command, proto.AuthRequest):
        again["token"] = command.token
    return again


@FUZZ
@given(st.sampled_from(sorted(PARSERS)), event_data)
def test_event_data_parses_to_a_command_that_encodes_again_or_is_refused(kind, data):
    parse = PARSERS[kind]
    try:
        command = parse(data)
    except ClientError as exc:
        assert isinstance(exc, proto.BadEvent)
        json.dumps(proto.body(message=exc.message, payload=exc.payload), allow_nan=False)
        return
    assert parse(reencoded(command)) == command
    if kind is ClientEvent.AUTH_REQUEST and command.token is not None:
        assert proto.verify_token(command.token, SECRET) is None or isinstance(command.token, str)


@FUZZ
@given(values)
def test_payloads_accepted_are_json_every_peer_reads_back(payload):
    try:
        size = proto.json_size(payload)
    except proto.BadEvent:
        return
    text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    assert json.loads(text) == payload
    assert size == len(orjson.dumps(payload))


token_part = st.one_of(
    st.text(alphabet=string.ascii_letters + "=+/0123456789", max_size=40),
    st.sampled_from([proto.HEADER, "\ud800", "é", ""]),
)


@FUZZ
@given(
    st.one_of(
        values,
        st.text(alphabet=string.ascii_letters + "=.+/0123456789"),
        st.builds(lambda *parts: ".".join(parts), token_part, token_part, token_part),
    )
)
def test_any_token_is_verified_or_refused_never_raises(token):
    for check in (
        lambda: proto.verify_token(token, SECRET),
        lambda: proto.verify_handshake(token, SECRET, 0.0),
        lambda: proto.verify_session(token, SECRET, "sid", 0.0),
    ):
        assert check() in (None, True, False) or isinstance(check(), dict)


def is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@FUZZ
@given(st.text(min_size=1, max_size=40).filter(is_unicode))
def test_tokens_issued_verify(app):
    assert proto.verify_token(proto.app_token(app, SECRET), SECRET) == {"app": app}
    session = proto.session_token(app, "sid-1", 100, SECRET)
    assert proto.verify_session(session, SECRET, "sid-1", 99.0)
    assert not proto.verify_session(session, SECRET, "sid-1", 100.0)


# --- messages between nodes -------------------------------------------------------------------

names = st.text(max_size=12).filter(is_unicode)
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        names,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(names, inner, max_size=3)),
    max_leaves=10,
)
socket_data = st.one_of(st.just({}), st.builds(lambda p: {"peerinfo": p}, json_values))
snapshots = st.builds(
    proto.Snapshot,
    room=names,
    token=names,
    owner=names,
    version=st.integers(0, 2**31),
    members=st.lists(st.tuples(names, st.builds(proto.Member, names, socket_data)), max_size=3).map(
        tuple
    ),
    pending=st.lists(
        st.tuples(
            names,
            st.builds(
                proto.Pending, names, socket_data, st.one_of(st.just(proto.MISSING), json_values)
            ),
        ),
        max_size=3,
    ).map(tuple),
)
messages = st.builds(
    ClusterMessage,
    op=st.sampled_from(ClusterOp),
    room=names,
    sid=names,
    node=names,
    data=socket_data,
    payload=st.one_of(st.just(proto.MISSING), json_values),
    snapshot=st.one_of(st.none(), snapshots),
    hops=st.integers(0, 5),
    token=names,
    event=st.one_of(st.none(), st.sampled_from(ServerEvent)),
    body=st.dictionaries(names, json_values, max_size=3),
    to=st.lists(names, max_size=3).map(tuple),
)


@FUZZ
@given(messages)
def test_cluster_messages_decode_to_what_was_encoded(msg):
    assert proto.decode_cluster(proto.encode_cluster(msg)) == msg


@FUZZ
@given(st.one_of(st.binary(max_size=200), json_values.map(orjson.dumps)))
def test_any_cluster_bytes_decode_or_are_malformed(raw):
    try:
        proto.decode_cluster(raw)
    except ClientError as exc:
        assert exc.message == "invalid cluster message"


# --- socket.io and engine.io packets ----------------------------------------------------------

brackety = st.text(alphabet='[]{}"\\,:1ax ', max_size=300)
packet_text = st.one_of(
    st.text(max_size=200),
    brackety,
    st.builds(lambda t, body: t + body, st.sampled_from(list("0123456b")), brackety),
    st.builds(
        lambda depth, inner: "42" + "[" * depth + inner + "]" * depth,
        st.integers(0, 3000),
        st.sampled_from(['"x"', '"[["', "{}", '{"a":[1]}', "1"]),
    ),
)


@FUZZ
@given(json_values, st.integers(1, 80))
def test_nests_deeper_measures_the_json_it_is_given(value, wrap):
    for _ in range(wrap):
        value = [value] if wrap % 2 else {"k": value}
    text = json.dumps(value)
    assert proto.nests_deeper(text) == jsonwire.too_deep(value)
    assert proto.nests_deeper("42" + json.dumps(["event", value])) == jsonwire.too_deep(
        ["event", value]
    )


@FUZZ
@given(packet_text)
def test_socketio_packets_are_decoded_or_refused_cleanly(text):
    """What ``BoundedServer._handle_eio_message`` does with an engine.io message's text: refuse
    it unparsed if it nests too deep, else let python-socketio decode it, which raises only
    what it refuses as malformed, and never recurses past the interpreter's limit."""
    if proto.nests_deeper(text):
        return
    try:
        socketio.packet.Packet(encoded_packet=text)
    except RecursionError:  # pragma: no cover - the property under test
        raise AssertionError("python-socketio recursed past the limit") from None
    except compat.MALFORMED:
        pass


@FUZZ
@given(st.one_of(packet_text, st.binary(max_size=100)))
def test_engineio_packets_are_decoded_or_refused_with_a_client_error(data):
    try:
        packet = compat.decode_packet(data)
    except ClientError:
        return
    assert 0 <= packet.packet_type < 7


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=400),
        st.lists(packet_text, max_size=20).map(lambda ps: "\x1e".join(ps).encode()),
        st.lists(packet_text, max_size=20).map(
            lambda ps: "\x1e".join(ps).encode("utf-8", "surrogatepass")
        ),
    )
)
def test_polling_bodies_are_decoded_or_refused_with_a_client_error(body):
    try:
        packets = compat.decode_polling(body, 1024)
    except ClientError as exc:
        assert exc.message
        return
    assert len(body) <= 1024 and len(packets) <= proto.MAX_POLLING_PACKETS
    assert all(packet.packet_type in compat.POLLING_TYPES for packet in packets)
