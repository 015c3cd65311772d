"""The relay protocol's decode/encode for each generation, without I/O (docs/protocols/relay.md)."""

from __future__ import annotations

import msgpack
import orjson
import pytest

from polysignal.core.errors import (
    BackendUnavailable,
    ClientError,
    Close,
    LimitExceeded,
    MalformedFrame,
)
from polysignal.protocols import relay as proto
from polysignal.protocols.relay import Encoding, Generation

JSON, MSGPACK = Encoding.JSON, Encoding.MSGPACK


def packb(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def test_v1_join_carries_join_and_leave_lists():
    got = proto.decode('{"type":"Join","join":["happy-raccoon","hairy-thumb"]}', JSON)
    assert got == proto.Decoded(proto.Join(("happy-raccoon", "hairy-thumb")), Generation.V1)
    got = proto.decode('{"type":"Join","join":["a"],"leave":["b"]}', JSON)
    assert got.command == proto.Join(("a",), ("b",))


def test_v1_empty_join_on_open_is_v1():
    """cevitxe-signal-client sends its key list, maybe empty, on open (docs/protocols/relay.md)."""
    assert proto.decode('{"type":"Join","join":[]}', JSON) == proto.Decoded(
        proto.Join(()), Generation.V1
    )


def test_v1_leave():
    got = proto.decode('{"type":"Leave","leave":["happy-raccoon"]}', JSON)
    assert got == proto.Decoded(proto.Leave(("happy-raccoon",)), Generation.V1)


def test_v2_json_document_ids():
    got = proto.decode('{"type":"Join","documentIds":["d1","d2"]}', JSON)
    assert got == proto.Decoded(proto.Join(("d1", "d2")), Generation.V2)
    got = proto.decode('{"type":"Leave","documentIds":["d1"]}', JSON)
    assert got == proto.Decoded(proto.Leave(("d1",)), Generation.V2)


def test_v4_msgpack_document_ids():
    got = proto.decode(packb({"type": "Join", "documentIds": ["d1"]}), MSGPACK)
    assert got == proto.Decoded(proto.Join(("d1",)), Generation.V4)
    got = proto.decode(packb({"type": "Leave", "documentIds": ["d1"]}), MSGPACK)
    assert got == proto.Decoded(proto.Leave(("d1",)), Generation.V4)


def test_v4_join_as_msgpackr_encodes_it_with_map16():
    """msgpackr writes maps as map16 (0xde) even when small (docs/protocols/relay.md)."""
    frame = bytes.fromhex("de0002a474797065a44a6f696eab646f63756d656e7449647391a4646f6331")
    assert proto.decode(frame, MSGPACK).command == proto.Join(("doc1",))


def test_heartbeats_in_both_encodings():
    assert proto.decode('{"type":"Heartbeat"}', JSON) == proto.Decoded(proto.Heartbeat(), None)
    for kind in ("Heartbeat", "❤️"):
        got = proto.decode(packb({"type": kind}), MSGPACK)
        assert got == proto.Decoded(proto.Heartbeat(), Generation.V4)


def test_duplicate_ids_in_one_frame_collapse_in_order():
    got = proto.decode('{"type":"Join","documentIds":["b","a","b"]}', JSON)
    assert got.command == proto.Join(("b", "a"))


def test_extra_fields_are_ignored():
    got = proto.decode('{"type":"Join","documentIds":["a"],"extra":{"x":1}}', JSON)
    assert got.command == proto.Join(("a",))


IGNORED = [
    ("{nope", JSON, "invalid JSON"),
    ("{╯°□°}╯︵ ┻━┻", JSON, "invalid JSON"),  # relay 3.6's own test frame
    (b"\xc1", MSGPACK, "invalid msgpack"),
    (bytes([1, 2, 3]), MSGPACK, "invalid msgpack"),  # relay 4's own test frame: trailing data
    (b"\x92\x01", MSGPACK, "invalid msgpack"),  # truncated array
    ("[1,2]", JSON, "expected an object (map), got a list"),
    (packb("Join"), MSGPACK, "expected an object (map), got a string"),
    ('{"join":["a"]}', JSON, "missing 'type'"),
    ('{"type":7}', JSON, "'type' must be a string"),
    ('{"type":"Dance"}', JSON, "unknown message type 'Dance'"),
    ('{"type":"Join"}', JSON, "Join: missing 'documentIds' (or 'join'/'leave')"),
    (packb({"type": "Join"}), MSGPACK, "missing 'documentIds'"),
    ('{"type":"Join","documentIds":"a"}', JSON, "'documentIds' must be a list, got a string"),
    ('{"type":"Join","join":[1]}', JSON, "join[0] is a number, not a string"),
    ('{"type":"Join","documentIds":[""]}', JSON, "documentIds[0] is empty"),
    (
        '{"type":"Join","documentIds":["a"],"join":["b"]}',
        JSON,
        "a frame has either 'documentIds' or 'join'/'leave', not both",
    ),
    ('{"type":"Leave","join":["a"]}', JSON, "Leave: 'join' is only allowed in a Join"),
    (
        packb({"type": "Join", "documentIds": [b"\x00"]}),
        MSGPACK,
        "documentIds[0] is binary, not a string",
    ),
]


@pytest.mark.parametrize(("frame", "encoding", "message"), IGNORED)
def test_frames_that_are_no_relay_message_are_ignored_naming_the_fault(frame, encoding, message):
    """Dropped without an answer, the socket open, as @localfirst/relay 3.6 and 4.x do."""
    with pytest.raises(proto.Ignored) as info:
        proto.decode(frame, encoding)
    assert info.value.message == message
    assert proto.answer(info.value) is None


def test_limits_and_depth_close_the_socket_with_a_reason():
    deep = '{"type":"Join","documentIds":' + "[" * 70 + "]" * 70 + "}"
    with pytest.raises(MalformedFrame) as too_deep:
        proto.decode(deep, JSON)
    assert proto.answer(too_deep.value) == Close(1003, "JSON nested deeper than 64 levels")
    limits = proto.RelayLimits(max_id_length=3)
    with pytest.raises(LimitExceeded) as too_long:
        proto.decode('{"type":"Join","documentIds":["abcd"]}', JSON, limits)
    assert proto.answer(too_long.value) == Close(1008, "documentIds[0] is longer than 3 characters")


def test_limits_on_id_length_and_count():
    limits = proto.RelayLimits(max_id_length=3, max_documents=2)
    assert proto.decode('{"type":"Join","documentIds":["abc"]}', JSON, limits)
    with pytest.raises(LimitExceeded, match="longer than 3 characters"):
        proto.decode('{"type":"Join","documentIds":["abcd"]}', JSON, limits)
    with pytest.raises(LimitExceeded, match="at most 2"):
        proto.decode('{"type":"Join","documentIds":["a","b","c"]}', JSON, limits)
    with pytest.raises(LimitExceeded):
        proto.check_id("peer id", "abcd", limits)


def test_introduction_shapes_per_generation():
    assert orjson.loads(proto.encode_introduction(Generation.V1, "qrst7890", ("k",))) == {
        "type": "Introduction",
        "id": "qrst7890",
        "keys": ["k"],
    }
    assert orjson.loads(proto.encode_introduction(Generation.V2, "bob", ["d1", "d2"])) == {
        "type": "Introduction",
        "userName": "bob",
        "documentIds": ["d1", "d2"],
    }
    v4 = proto.encode_introduction(Generation.V4, "bob", ("doc1",))
    assert msgpack.unpackb(v4) == {"type": "Introduction", "peerId": "bob", "documentIds": ["doc1"]}


def test_encoding_of_generation():
    assert proto.encoding_of(Generation.V4) is MSGPACK
    assert proto.encoding_of(Generation.V1) is proto.encoding_of(Generation.V2) is JSON


def test_cluster_messages_round_trip():
    announce = proto.Announce("node-1", "alice", ("d1",), ("d0", "d1"))
    assert proto.decode_announce(proto.encode_announce(announce)) == announce
    intro = proto.Introduce("alice", "bob", ("d1",))
    assert proto.decode_introduce(proto.encode_introduce(intro)) == intro
    ref = proto.EndRef("e1", "e2", "why")
    assert proto.decode_end(proto.encode_end(ref)) == ref


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        packb([1, 2]),
        packb(["a", "b", [1]]),
        packb(["a", "b", ["x", b"y"]]),
        packb(["n", "p", "x", "y"]),
    ],
)
def test_malformed_cluster_messages_raise(payload):
    with pytest.raises(MalformedFrame):
        proto.decode_announce(payload)
    with pytest.raises(MalformedFrame):
        proto.decode_introduce(payload)
    with pytest.raises(MalformedFrame):
        proto.decode_end(payload)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/introduction/alice", proto.IntroductionPath("alice")),
        ("/introduction/alice/", proto.IntroductionPath("alice")),
        ("/introduction/a%2Fb", proto.IntroductionPath("a/b")),  # split, then decoded
        ("/connection/a/b/doc", proto.ConnectionPath("a", "b", "doc")),
        ("/connection/a/b/d%20c/", proto.ConnectionPath("a", "b", "d c")),
        ("/introductions/alice", None),
        ("/connectionx/a/b/c", None),
        ("/", None),
        ("/other/introduction/a", None),
    ],
)
def test_endpoints(path, expected):
    assert proto.parse_endpoint(path) == expected
    assert proto.is_relay_path(path) is (expected is not None)


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("/introduction", ClientError, "expected /introduction/{peerId}"),
        ("/introduction/a/b", ClientError, "expected /introduction/{peerId}"),
        ("/introduction//", MalformedFrame, "peer id is empty"),
        ("/connection/a/b", ClientError, "expected /connection/{localId}/{remoteId}/{documentId}"),
        (
            "/connection/a/b/c/d",
            ClientError,
            "expected /connection/{localId}/{remoteId}/{documentId}",
        ),
        ("/connection//b/c", MalformedFrame, "local id is empty"),
        ("/connection/a//c", MalformedFrame, "remote id is empty"),
        ("/connection/a/b/" + "x" * 5, LimitExceeded, "document id is longer than 4 characters"),
        ("/introduction/" + "x" * 5, LimitExceeded, "peer id is longer than 4 characters"),
    ],
)
def test_endpoint_refusals(path, error, message):
    assert proto.is_relay_path(path)
    with pytest.raises(error) as exc:
        proto.parse_endpoint(path, proto.RelayLimits(max_id_length=4))
    assert type(exc.value) is error and exc.value.message == message


def test_ids_at_the_length_limit_are_accepted():
    limits = proto.RelayLimits(max_id_length=4)
    assert proto.parse_endpoint("/introduction/abcd", limits) == proto.IntroductionPath("abcd")
    assert proto.parse_endpoint("/connection/abcd/efgh/ijkl", limits) == proto.ConnectionPath(
        "abcd", "efgh", "ijkl"
    )


def _deep_join(levels: int) -> dict[str, object]:
    value: object = []
    for _ in range(levels - 2):
        value = [value]
    return {"type": "Join", "documentIds": ["d"], "x": value}


def test_nesting_is_bounded_at_decode_in_both_encodings():
    assert proto.decode(orjson.dumps(_deep_join(64)), JSON).command == proto.Join(("d",), ())
    assert proto.decode(packb(_deep_join(64)), MSGPACK).command == proto.Join(("d",), ())
    with pytest.raises(MalformedFrame) as exc:
        proto.decode(orjson.dumps(_deep_join(65)), JSON)
    assert exc.value.message == "JSON nested deeper than 64 levels"
    with pytest.raises(MalformedFrame) as exc:
        proto.decode(packb(_deep_join(65)), MSGPACK)
    assert exc.value.message == "msgpack nested deeper than 64 levels"


def test_a_frame_with_both_id_list_shapes_is_ignored_whichever_v1_list_it_has():
    for extra in ('"join":["b"]', '"leave":["b"]'):
        for kind in ("Join", "Leave"):
            frame = f'{{"type":"{kind}","documentIds":["a"],{extra}}}'
            with pytest.raises(proto.Ignored) as info:
                proto.decode(frame, JSON)
            assert info.value.message == (
                "a frame has either 'documentIds' or 'join'/'leave', not both"
            )


@pytest.mark.parametrize(
    ("frame", "encoding"),
    [
        ('{"type":"Join","documentIds":null}', JSON),
        ('{"type":"Leave","documentIds":null}', JSON),
        (packb({"type": "Join", "documentIds": None}), MSGPACK),
    ],
)
def test_a_null_id_list_is_a_missing_one(frame, encoding):
    with pytest.raises(proto.Ignored) as info:
        proto.decode(frame, encoding)
    assert info.value.message == "missing 'documentIds'"


def test_v1_null_lists_are_empty_ones():
    got = proto.decode('{"type":"Join","join":null,"leave":["a"]}', JSON)
    assert got == proto.Decoded(proto.Join((), ("a",)), Generation.V1)


def test_msgpack_maps_with_keys_that_are_not_strings_decode():
    frame = packb({"type": "Join", "documentIds": ["d"], 1: "x", b"k": "y"})
    assert proto.decode(frame, MSGPACK) == proto.Decoded(proto.Join(("d",)), Generation.V4)


@pytest.mark.parametrize("encoding", [JSON, MSGPACK])
def test_the_document_count_is_bounded_at_its_exact_limit(encoding):
    limits = proto.RelayLimits(max_documents=2)

    def frame(*ids: str) -> str | bytes:
        message = {"type": "Join", "documentIds": list(ids)}
        return orjson.dumps(message).decode() if encoding is JSON else packb(message)

    assert proto.decode(frame("a", "b"), encoding, limits).command == proto.Join(("a", "b"))
    with pytest.raises(LimitExceeded) as info:
        proto.decode(frame("a", "b", "c"), encoding, limits)
    assert info.value.message == "'documentIds' has 3 entries; a peer may hold at most 2"
    assert proto.answer(info.value) == Close(1008, info.value.message)
    with pytest.raises(LimitExceeded) as info:
        proto.decode('{"type":"Join","join":["a","b","c"]}', JSON, limits)
    assert info.value.message == "'join' has 3 entries; a peer may hold at most 2"


def test_errors_that_are_not_the_clients_close_with_a_server_side_code():
    assert proto.answer(BackendUnavailable("redis down")) == Close(
        1013, "the cluster is unavailable; try again"
    )
    assert proto.answer(RuntimeError("bug")) == Close(1011, "internal error")


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", packb([1, 2]), packb({"a": 1}), packb([1, "b", "c"]), packb(["a", "b", 3])],
)
def test_malformed_cluster_messages_say_so(payload):
    with pytest.raises(MalformedFrame) as info:
        proto.decode_end(payload)
    assert info.value.message == "invalid cluster message"
    with pytest.raises(MalformedFrame) as info:
        proto.decode_introduce(packb(["a", "b", "not a list"]))
    assert info.value.message == "invalid cluster message"
