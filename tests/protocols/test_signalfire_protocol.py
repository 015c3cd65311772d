"""The Signal-Fire codec and rules without I/O: every command, error string, close and id."""

from __future__ import annotations

import re

import orjson
import pytest

from polysignal.core.errors import CloseCode, MalformedFrame
from polysignal.protocols import signalfire as proto
from polysignal.protocols.signalfire import (
    CloseReason,
    CloseRequest,
    Cmd,
    ErrorText,
    Ignored,
    Request,
    TargetState,
)

ME = "A" * 21
PEER = "B" * 21
NANOID = re.compile(r"^[A-Za-z0-9_-]{21}$")

# Every request, with the data the original requires (docs/protocols/signal-fire.md).
VALID = {
    Cmd.SESSION_START: None,
    Cmd.SESSION_ACCEPT: None,
    Cmd.SESSION_REJECT: None,
    Cmd.SESSION_CANCEL: None,
    Cmd.OFFER: {"offer": {"type": "offer", "sdp": "v=0"}},
    Cmd.ANSWER: {"answer": {"type": "answer", "sdp": "v=0"}},
    Cmd.ICE: {"candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}},
}


def frame(**fields) -> bytes:
    return orjson.dumps(fields)


def request(cmd: Cmd, target=PEER, data=None, id="r1") -> Request:
    decoded = proto.decode(frame(id=id, cmd=cmd.value, target=target, data=data))
    assert isinstance(decoded, Request)
    return decoded


def test_ids_are_nanoids_and_distinct():
    """Server ids: 21 URL-safe characters, from a CSPRNG (no repeats in many draws)."""
    ids = {proto.new_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(NANOID.match(i) for i in ids)
    assert all(proto.is_id(i) for i in ids)
    # every character of the alphabet turns up: one byte maps onto all 64
    assert set("".join(ids)) == set(proto.ID_ALPHABET)


def test_each_random_byte_picks_the_character_of_its_low_six_bits(monkeypatch):
    """nanoid's mapping: byte b is ID_ALPHABET[b & 63]."""
    draws = iter([bytes(range(21)), bytes(range(64, 85)), bytes([255] * 21), bytes(range(43, 64))])
    monkeypatch.setattr(proto.secrets, "token_bytes", lambda n: next(draws)[:n])
    assert proto.new_id() == proto.ID_ALPHABET[:21]
    assert proto.new_id() == proto.ID_ALPHABET[:21]
    assert proto.new_id() == proto.ID_ALPHABET[63] * 21
    assert proto.new_id() == proto.ID_ALPHABET[43:]


@pytest.mark.parametrize(
    "value",
    [None, 5, "", "short", "A" * 22, "A" * 20 + "!", "A" * 20 + "\n", "é" * 21, ["A" * 21]],
)
def test_is_id_rejects_other_shapes(value):
    assert not proto.is_id(value)


@pytest.mark.parametrize("cmd", list(VALID))
def test_every_command_decodes_and_passes_checks(cmd):
    req = request(cmd, data=VALID[cmd])
    assert req.cmd is cmd and req.id == "r1" and req.target == PEER
    assert proto.precheck(req, ME) is None
    assert proto.postcheck(req, TargetState.ONLINE) is None


@pytest.mark.parametrize("cmd", [Cmd.OFFER, Cmd.ANSWER, Cmd.ICE])
def test_relay_carries_whole_data_fresh_id_origin_no_target(cmd):
    data = {**VALID[cmd], "extra": [1, 2]}
    req = request(cmd, data=data)
    out = proto.relayed(req, ME)
    assert out["cmd"] == cmd.value and out["origin"] == ME and out["data"] == data
    assert "target" not in out and out["id"] != "r1" and NANOID.match(out["id"])


@pytest.mark.parametrize("cmd", [Cmd.SESSION_START, Cmd.SESSION_ACCEPT, Cmd.SESSION_CANCEL])
def test_session_commands_relay_without_data(cmd):
    req = request(cmd, data={"anything": 1})
    out = proto.relayed(req, ME)
    assert set(out) == {"id", "cmd", "origin"} and out["cmd"] == cmd.value


def test_session_reject_forwards_only_the_reason():
    req = request(Cmd.SESSION_REJECT, data={"message": "busy", "secret": 1})
    assert proto.relayed(req, ME)["data"] == {"message": "busy"}
    for data in (None, {"message": 7}, "busy"):
        assert "data" not in proto.relayed(request(Cmd.SESSION_REJECT, data=data), ME)


@pytest.mark.parametrize("target", [None, "", 0, False])
def test_missing_target(target):
    req = request(Cmd.SESSION_START, target=target)
    assert proto.precheck(req, ME) is ErrorText.MISSING_TARGET
    assert ErrorText.MISSING_TARGET == "Missing Target"


def test_missing_target_field_entirely():
    req = proto.decode(frame(id="x", cmd="offer"))
    assert isinstance(req, Request) and proto.precheck(req, ME) == "Missing Target"


def test_cannot_send_to_yourself():
    req = request(Cmd.OFFER, target=ME, data=VALID[Cmd.OFFER])
    assert proto.precheck(req, ME) == "Can't Send to Yourself"


def test_target_state_errors_come_before_payload_errors():
    """The original looks the target up before it checks the command's data."""
    req = request(Cmd.OFFER, data=None)
    assert proto.postcheck(req, TargetState.NOT_FOUND) == "Peer Not Found"
    assert proto.postcheck(req, TargetState.OFFLINE) == "Peer Offline"
    assert proto.postcheck(req, TargetState.ONLINE) == "Missing Offer"


@pytest.mark.parametrize(
    ("cmd", "data", "error"),
    [
        (Cmd.OFFER, None, "Missing Offer"),
        (Cmd.OFFER, {}, "Missing Offer"),
        (Cmd.OFFER, {"offer": None}, "Missing Offer"),
        (Cmd.OFFER, {"sdp": "v=0"}, "Missing Offer"),
        (Cmd.OFFER, "v=0", "Missing Offer"),
        (Cmd.ANSWER, {"offer": {"sdp": "x"}}, "Missing Answer"),
        (Cmd.ANSWER, [], "Missing Answer"),
        (Cmd.ICE, {"candidate": ""}, "Missing ICE Candidate"),
        (Cmd.ICE, {"ice": {}}, "Missing ICE Candidate"),
    ],
)
def test_missing_payload_errors(cmd, data, error):
    assert proto.postcheck(request(cmd, data=data), TargetState.ONLINE) == error


def test_legacy_connections_may_send_sdp():
    """Signal-Fire@2 clients (server 0.3.0) put both offer and answer in data.sdp."""
    for cmd in (Cmd.OFFER, Cmd.ANSWER):
        req = request(cmd, data={"sdp": {"type": "offer", "sdp": "v=0"}})
        assert proto.postcheck(req, TargetState.ONLINE, legacy=True) is None
        assert proto.postcheck(req, TargetState.ONLINE) is not None
    ice = request(Cmd.ICE, data={"sdp": "x"})
    assert proto.postcheck(ice, TargetState.ONLINE, legacy=True) == "Missing ICE Candidate"


@pytest.mark.parametrize("raw", [b"not json", b"{", b"[1,2]", b'"str"', b"5", b"null", b"\xff\xfe"])
def test_unparseable_or_non_object_closes_4400_bad_request(raw):
    with pytest.raises(CloseRequest) as info:
        proto.decode(raw)
    assert info.value.close_code == CloseCode.BAD_REQUEST == 4400
    assert info.value.message == "Bad Request"


@pytest.mark.parametrize(
    "fields",
    [
        {"cmd": "offer"},
        {"id": None, "cmd": "offer"},
        {"id": "", "cmd": "offer"},
        {"id": 0, "cmd": "offer"},
        {"id": False, "cmd": "offer"},
        {},
    ],
)
def test_missing_id_closes_4400(fields):
    with pytest.raises(CloseRequest) as info:
        proto.decode(frame(**fields))
    assert info.value.close_code == 4400 and info.value.message == CloseReason.MISSING_ID
    assert info.value.message == "Missing message ID"


@pytest.mark.parametrize("bad_id", [{"a": 1}, [1], True])
def test_id_of_unusable_type_closes_bad_request(bad_id):
    with pytest.raises(CloseRequest) as info:
        proto.decode(frame(id=bad_id, cmd="offer"))
    assert info.value.message == "Bad Request"


def test_numeric_ids_are_echoed_as_given():
    req = proto.decode(frame(id=42, cmd="session-start", target=PEER))
    assert isinstance(req, Request) and req.id == 42
    assert orjson.loads(proto.encode_ack(req.id)) == {"id": 42, "ok": True}


@pytest.mark.parametrize(
    "cmd", ["dance", "session-timeout", "welcome", None, 7, ["offer"], {"cmd": "offer"}, "OFFER"]
)
def test_unknown_or_missing_cmd_is_ignored(cmd):
    fields = {"id": "x", "target": PEER}
    if cmd is not None:
        fields["cmd"] = cmd
    assert isinstance(proto.decode(frame(**fields)), Ignored)


def test_ack_and_error_shapes():
    assert orjson.loads(proto.encode_ack("r1")) == {"id": "r1", "ok": True}
    for error in ErrorText:
        assert orjson.loads(proto.encode_error("r1", error)) == {
            "id": "r1",
            "ok": False,
            "data": {"message": error.value},
        }


def test_error_strings_are_the_originals():
    assert {e.value for e in ErrorText} >= {
        "Missing Target",
        "Can't Send to Yourself",
        "Peer Not Found",
        "Peer Offline",
        "Missing Offer",
        "Missing Answer",
        "Missing ICE Candidate",
        "Internal Server Error",
    }


def test_welcome_with_and_without_configuration():
    plain = orjson.loads(proto.encode_welcome(ME, None))
    assert plain["cmd"] == "welcome" and plain["data"] == {"id": ME}
    assert NANOID.match(plain["id"]) and plain["id"] != ME
    servers = ({"urls": "stun:127.0.0.1:3478"},)
    configured = orjson.loads(proto.encode_welcome(ME, servers))
    assert configured["data"] == {"id": ME, "configuration": {"iceServers": list(servers)}}
    assert orjson.loads(proto.encode_welcome(ME, ()))["data"]["configuration"] == {"iceServers": []}


def test_notice_is_a_server_message_about_a_peer():
    out = proto.notice(Cmd.SESSION_TIMEOUT, PEER)
    assert out["cmd"] == "session-timeout" and out["origin"] == PEER and NANOID.match(out["id"])


def test_cluster_relays_round_trip():
    relay = proto.RemoteRelay("b" * 21, {"id": "x", "cmd": "offer"}, "a" * 21, 7)
    assert proto.decode_remote_relay(proto.encode_remote_relay(relay)) == relay
    notice = proto.Undeliverable("a" * 21, "req-1", "session-start", "b" * 21)
    assert proto.decode_undeliverable(proto.encode_undeliverable(notice)) == notice
    server_made = proto.RemoteRelay("b" * 21, {"cmd": "session-timeout"})
    assert proto.decode_remote_relay(proto.encode_remote_relay(server_made)) == server_made


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[]", b'{"to":"x"}', b'{"to":5,"message":{}}', b'{"to":"x","message":"text"}'],
)
def test_malformed_cluster_relays_raise(payload):
    with pytest.raises(MalformedFrame, match="invalid cluster message"):
        proto.decode_remote_relay(payload)


@pytest.mark.parametrize("payload", [b"{}", b'{"to":"x"}', b'{"to":1,"req":1}', b"1"])
def test_malformed_undeliverable_notices_raise(payload):
    with pytest.raises(MalformedFrame, match="invalid cluster message"):
        proto.decode_undeliverable(payload)


def test_a_relay_with_a_non_string_requester_reports_to_nobody():
    relay = proto.decode_remote_relay(b'{"to":"x","message":{},"from":5,"req":1}')
    assert relay.requester is None and relay.request_id == 1


def test_nesting_is_bounded_before_anything_is_acknowledged():
    def frame(levels: int) -> bytes:
        data = "[" * (levels - 1) + "]" * (levels - 1)
        return ('{"id":1,"cmd":"offer","target":"x","data":' + data + "}").encode()

    assert isinstance(proto.decode(frame(64)), proto.Request)
    with pytest.raises(CloseRequest) as info:
        proto.decode(frame(65))
    assert (info.value.close_code, info.value.message) == (4400, "Bad Request")
