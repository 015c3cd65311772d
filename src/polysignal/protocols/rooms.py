"""The rooms protocol of wrtc-signal (docs/protocols/rooms.md): tokens, validation, event bodies.

No I/O: the socket.io server (``server/rooms.py``) hands event data in and sends what comes out.

Tokens (docs/protocols/rooms.md, "Tokens") keep the original format, so tokens issued by an
existing deployment with the same ``APP_SECRET`` stay valid::

    base64(header) "." base64(payload) "." hex(HMAC-SHA256(APP_SECRET, header + payload))

with standard, padded base64 and the payload serialized as Node's ``JSON.stringify`` does. Unlike
the original, every check compares in constant time (``hmac.compare_digest``) and per-event
session tokens have their signature verified, not only decoded.

Event data is validated here into typed, frozen commands; anything a client gets wrong raises
``BadEvent``, which carries the client's ``payload`` so the reject can echo it as the original
does. A field the client did not send is ``MISSING`` and stays absent from the events built from
it, as ``undefined`` fields vanish from the original's JSON.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, Final

import orjson

from polysignal.core.errors import ClientError, FrameTooLarge, MalformedFrame
from polysignal.protocols.jsonwire import MAX_DEPTH, type_name


class ClientEvent(StrEnum):
    """Events a client emits (docs/protocols/rooms.md, "Events")."""

    AUTH_REQUEST = "auth-request"
    ROOM_CREATE_REQUEST = "room-create-request"
    ROOM_JOIN_REQUEST = "room-join-request"
    ROOM_JOIN_ACCEPT = "room-join-accept"
    ROOM_JOIN_REJECT = "room-join-reject"
    RELAY_SESSION_DESCRIPTION = "relay-session-description"
    RELAY_ICE_CANDIDATE = "relay-ice-candidate"


class ServerEvent(StrEnum):
    """Events the server emits (docs/protocols/rooms.md, "Events"), plus ``error``: polysignal's
    answer to bad input that has no reject event of its own (accept/reject/relay events, unknown
    events, floods)."""

    UNAUTHORIZED = "unauthorized"
    AUTH_ACCEPT = "auth-accept"
    AUTH_REJECT = "auth-reject"
    ROOM_CREATE_ACCEPT = "room-create-accept"
    ROOM_CREATE_REJECT = "room-create-reject"
    ROOM_JOIN_REQUEST = "room-join-request"
    ROOM_JOIN_ACCEPT = "room-join-accept"
    ROOM_JOIN_REJECT = "room-join-reject"
    ROOM_USER_JOIN = "room-user-join"
    ROOM_USER_LEAVE = "room-user-leave"
    ICE_CANDIDATE = "ice-candidate"
    SESSION_DESCRIPTION = "session-description"
    ERROR = "error"


# The original's messages, verbatim (docs/protocols/rooms.md).
TOKEN_NOT_VALID: Final = "Token is not valid"
ROOM_TAKEN: Final = (
    "Room already taken someone else. Please type another room name or stay it blank."
)
ROOM_NOT_FOUND: Final = "Room is not found."
OWNER_REJECTED: Final = "Room owner was rejected your request"
UNAUTHORIZED_HTTP: Final = "Unauthorized"
APP_REQUIRED: Final = "Required properties (app) is undefined"
# polysignal's own messages for what the original did not check.
NOT_OWNER: Final = "Only the room's owner may accept or reject join requests"
NO_PENDING_REQUEST: Final = "No pending join request from this peer in this room"
ALREADY_IN_ROOM: Final = "You are already in this room."
NOT_SHARING_ROOM: Final = "You can only relay to a peer in a room you are both in"
TOKEN_REQUIRED: Final = "Token is required: connect with auth: {token: <app token>}"
BACKEND_DOWN: Final = "The cluster's shared state is unreachable right now; try again"


class _Missing(Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing.MISSING
"""A field the client did not send (JavaScript's ``undefined``)."""

Maybe = Any  # a JSON value or MISSING


class BadEvent(ClientError):
    """Event data that cannot be used; ``payload`` is the client's, echoed in the reject."""

    def __init__(self, message: str, payload: Maybe = MISSING) -> None:
        super().__init__(message)
        self.payload = payload


# --- tokens (docs/protocols/rooms.md, "Tokens") --------------------------------------------------

HEADER: Final = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
"""base64 of ``{"alg":"HS256","typ":"JWT"}``, the only header the original makes."""


def js_json(value: Any) -> str:
    """``value`` serialized as JavaScript's ``JSON.stringify`` does for JSON data: no spaces,
    non-ASCII kept, the same escapes."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _signature(secret: bytes, header: str, payload: str) -> str:
    return hmac.new(secret, (header + payload).encode(), hashlib.sha256).hexdigest()


def create_token(data: dict[str, Any], secret: bytes) -> str:
    """A token for ``data`` (key order kept, as the original's ``createToken``)."""
    payload = _b64(js_json(data))
    return f"{HEADER}.{payload}.{_signature(secret, HEADER, payload)}"


def app_token(app: str, secret: bytes) -> str:
    """The app token ``POST /app`` issues: payload ``{"app": <name>}``, no expiry."""
    return create_token({"app": app}, secret)


def session_token(app: Any, sid: str, exp: int, secret: bytes) -> str:
    """The session token of ``auth-accept``: ``{"app", "exp", "socket"}`` in that order."""
    return create_token({"app": app, "exp": exp, "socket": sid}, secret)


def verify_token(token: object, secret: bytes) -> dict[str, Any] | None:
    """The payload of a validly signed token that names an ``app``, else None.

    The signature is compared in constant time before the payload is decoded, so nothing a
    forger sends is parsed. Like the original, a token's payload must carry ``app``.
    """
    if not isinstance(token, str) or not token.isascii():  # a token is base64, hex and dots
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    header, payload, signature = parts
    expected = _signature(secret, HEADER, payload)
    # Both compares always run: which part was wrong must not show in the timing.
    header_ok = hmac.compare_digest(header.encode(), HEADER.encode())
    signature_ok = hmac.compare_digest(signature.encode(), expected.encode())
    if not (header_ok and signature_ok):
        return None
    try:
        data = orjson.loads(base64.b64decode(payload, validate=False))
    except (binascii.Error, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("app"):
        return None
    return data


def verify_handshake(token: object, secret: bytes, now: float) -> bool:
    """The socket.io handshake token: any validly signed token, not expired if it has ``exp``."""
    data = verify_token(token, secret)
    if data is None:
        return False
    exp = data.get("exp")
    if exp is None:
        return True
    return _is_number(exp) and float(exp) > now


def verify_session(token: object, secret: bytes, sid: str, now: float) -> bool:
    """An event's ``auth``: signed, for this socket, not expired (checked in full here)."""
    data = verify_token(token, secret)
    if data is None:
        return False
    socket = data.get("socket")
    exp = data.get("exp")
    if not isinstance(socket, str) or not isinstance(exp, int | float) or isinstance(exp, bool):
        return False
    return hmac.compare_digest(socket.encode(), sid.encode()) and float(exp) > now


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- event validation (docs/protocols/rooms.md, "Events") ----------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int = 16384
    max_room_length: int = 512


@dataclass(frozen=True, slots=True)
class AuthRequest:
    token: Any
    payload: Maybe = MISSING
    peerinfo: Maybe = MISSING


@dataclass(frozen=True, slots=True)
class CreateRoom:
    room: str | None  # None: the server picks a uuid
    payload: Maybe = MISSING


@dataclass(frozen=True, slots=True)
class JoinRoom:
    room: str
    payload: Maybe = MISSING


@dataclass(frozen=True, slots=True)
class Answer:
    """``room-join-accept`` or ``room-join-reject`` from the room's owner."""

    room: str
    peer_id: str
    payload: Maybe = MISSING


@dataclass(frozen=True, slots=True)
class Relay:
    """``relay-session-description`` / ``relay-ice-candidate``; ``body`` is the SDP or ICE."""

    to: str
    room: str
    body: Any
    payload: Maybe = MISSING


def json_size(value: Any, what: str = "payload") -> int:
    """Bytes of ``value`` as JSON; BadEvent if it is not JSON data every peer can read back.

    Refused: binary, integers past 64 bits, text that is not Unicode (a lone surrogate), and
    ``NaN`` or ``Infinity``, which socket.io's JSON parser lets in and its encoder writes back as
    bare ``NaN``: socket.io-client cannot parse that and drops its connection, so relaying one
    would let a client disconnect another.
    """
    try:
        encoded = orjson.dumps(value)
    except TypeError:
        raise BadEvent(f"{what} must be JSON data (no binary, NaN or Infinity)") from None
    # orjson writes NaN and Infinity as null: only a value whose JSON has a null can hold one.
    if b"null" in encoded and _has_non_finite(value):
        raise BadEvent(f"{what} must be JSON data (no binary, NaN or Infinity)")
    return len(encoded)


def _has_non_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is float:
            if not math.isfinite(item):
                return True
        elif type(item) is list:
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.values())
    return False


def _payload(data: dict[str, Any], limits: Limits) -> Maybe:
    if "payload" not in data:
        return MISSING
    payload = data["payload"]
    size = json_size(payload)  # binary is not echoed back either
    if size > limits.max_payload_bytes:
        # The README's promise: "a long payload data will be rejected". Not echoed back.
        raise BadEvent(
            f"payload is too large: {size} bytes, the limit is {limits.max_payload_bytes}"
        )
    return payload


def _object(data: Any, event: ClientEvent) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadEvent(f"{event}: expected an object, got {type_name(data)}")
    return data


def _string(data: dict[str, Any], key: str, event: ClientEvent, payload: Maybe) -> str:
    value = data.get(key)
    if value is None or value == "":
        raise BadEvent(f"{event}: '{key}' is required", payload)
    if not isinstance(value, str):
        raise BadEvent(f"{event}: '{key}' must be a string, got {type_name(value)}", payload)
    if not value.isascii() and not _is_unicode(value):
        # A lone surrogate: it could not be written to another node or to Redis.
        raise BadEvent(f"{event}: '{key}' must be Unicode text", payload)
    return value


def _is_unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _room(data: dict[str, Any], event: ClientEvent, payload: Maybe, limits: Limits) -> str:
    room = _string(data, "room", event, payload)
    if len(room) > limits.max_room_length:
        raise BadEvent(
            f"{event}: 'room' is longer than {limits.max_room_length} characters", payload
        )
    return room


def parse_auth_request(data: Any, limits: Limits) -> AuthRequest:
    """``{token, payload?, peerinfo?}``; the original README's bare-string form never worked."""
    data = _object(data, ClientEvent.AUTH_REQUEST)
    payload = _payload(data, limits)
    peerinfo: Maybe = MISSING
    if js_truthy(data.get("peerinfo")):  # the original's `if (peerinfo) socket.data = {peerinfo}`
        peerinfo = data["peerinfo"]
        size = json_size(peerinfo, "peerinfo")
        if size > limits.max_payload_bytes:
            raise BadEvent(
                f"peerinfo is too large: {size} bytes, the limit is {limits.max_payload_bytes}",
                payload,
            )
    return AuthRequest(data.get("token"), payload, peerinfo)


def js_truthy(value: Any) -> bool:
    """JavaScript's truthiness of a JSON value: ``[]`` and ``{}`` are true, ``0`` and ``""`` not."""
    if value is None or value is False or value == "":
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == value and value != 0  # NaN is falsy too
    return True


def parse_create(data: Any, limits: Limits) -> CreateRoom:
    event = ClientEvent.ROOM_CREATE_REQUEST
    data = _object(data, event)
    payload = _payload(data, limits)
    room = data.get("room")
    if room is None or room == "":  # the original picks a uuid for any falsy room
        return CreateRoom(None, payload)
    return CreateRoom(_room(data, event, payload, limits), payload)


def parse_join(data: Any, limits: Limits) -> JoinRoom:
    event = ClientEvent.ROOM_JOIN_REQUEST
    data = _object(data, event)
    payload = _payload(data, limits)
    return JoinRoom(_room(data, event, payload, limits), payload)


def parse_answer(event: ClientEvent, data: Any, limits: Limits) -> Answer:
    """``room-join-accept`` / ``room-join-reject``: ``{room, peer_id, to?, payload?}``."""
    data = _object(data, event)
    payload = _payload(data, limits)
    room = _room(data, event, payload, limits)
    return Answer(room, _string(data, "peer_id", event, payload), payload)


RELAY_BODY: Final = {
    ClientEvent.RELAY_SESSION_DESCRIPTION: "session_description",
    ClientEvent.RELAY_ICE_CANDIDATE: "ice_candidate",
}


def parse_relay(event: ClientEvent, data: Any, limits: Limits) -> Relay:
    """``{to, room, session_description | ice_candidate, payload?}``; ``peer_id`` is ignored."""
    data = _object(data, event)
    payload = _payload(data, limits)
    room = _room(data, event, payload, limits)
    to = _string(data, "to", event, payload)
    key = RELAY_BODY[event]
    body = data.get(key)
    if not isinstance(body, dict | str):
        raise BadEvent(f"{event}: '{key}' must be an object, got {type_name(body)}", payload)
    json_size(body, key)
    return Relay(to, room, body, payload)


def payload_of(data: Any) -> Maybe:
    """The client's ``payload`` if ``data`` has one (for rejecting data that failed to parse)."""
    if isinstance(data, dict) and "payload" in data:
        return data["payload"]
    return MISSING


# --- socket.io and engine.io packets, as far as polysignal checks them ---------------------------
#
# python-socketio and python-engineio decode the packets (``server/socketio_compat.py``); what
# they would choke on is refused here first, so that it closes its connection cleanly instead of
# failing inside the libraries (docs/protocols/rooms.md, "Security and limits").

TOO_DEEP: Final = f"packet nested deeper than {MAX_DEPTH} levels"

MAX_POLLING_PACKETS: Final = 16
"""Packets one long-polling POST may carry (python-engineio's ``Payload.max_decode_packets``)."""

RECORD_SEPARATOR: Final = "\x1e"
"""Between the packets of a long-polling payload (engine.io 4)."""

ENGINEIO_TYPES: Final = "0123456"
"""engine.io packet types: open, close, ping, pong, message, upgrade, noop ("b": binary)."""

# A JSON string (its escapes included), and a bracket.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def nests_deeper(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON in packet ``text`` nests arrays and objects deeper than ``limit`` (the
    outermost is level 1), measured on the text, before any parser recurses into it.

    Brackets inside JSON strings do not count. A packet with at most ``limit`` brackets in all
    (nearly every one) costs one count, as ``protocols/jsonwire.py`` does; the scan that follows
    skips strings with one regular expression and then walks the brackets alone.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for bracket in _BRACKET.findall(_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def check_packet(packet: str | bytes) -> None:
    """One engine.io packet as a client sent it (a WebSocket message, or one packet of a
    long-polling payload): MalformedFrame unless its type is known and its JSON nests at most
    ``MAX_DEPTH`` levels. Binary packets are engine.io messages and carry no JSON."""
    if isinstance(packet, bytes | bytearray):
        return
    if not packet:
        raise MalformedFrame("empty engine.io packet")
    if packet[0] not in ENGINEIO_TYPES and packet[0] != "b":
        raise MalformedFrame("unknown engine.io packet type")
    if nests_deeper(packet):
        raise MalformedFrame(TOO_DEEP)


def polling_packets(body: bytes, max_bytes: int) -> list[str]:
    """The engine.io packets of one long-polling POST ``body``, each checked (``check_packet``).

    FrameTooLarge past ``max_bytes`` (``MAX_FRAME_BYTES``, the same bound as a WebSocket
    message); MalformedFrame for a body that is not UTF-8 or carries more than
    ``MAX_POLLING_PACKETS`` packets. An empty body carries none. JSONP bodies (``d=``), which no
    engine.io 4 client sends, are refused as an unknown packet type.
    """
    if len(body) > max_bytes:
        raise FrameTooLarge(f"payload is too large: {len(body)} bytes, the limit is {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedFrame("payload is not UTF-8") from None
    if not text:
        return []
    packets = text.split(RECORD_SEPARATOR, MAX_POLLING_PACKETS)
    if len(packets) > MAX_POLLING_PACKETS:
        raise MalformedFrame(f"more than {MAX_POLLING_PACKETS} packets in one payload")
    for packet in packets:
        check_packet(packet)
    return packets


# --- outgoing event bodies ----------------------------------------------------------------------


def body(**fields: Any) -> dict[str, Any]:
    """An event body without the fields that are MISSING."""
    return {key: value for key, value in fields.items() if value is not MISSING}


def peerinfo_of(data: dict[str, Any]) -> Maybe:
    """``socket.data.peerinfo``: the peer's info, or MISSING when it gave none."""
    return data.get("peerinfo", MISSING)


def error_body(message: str, event: str | None = None, payload: Maybe = MISSING) -> dict[str, Any]:
    return body(message=message, event=event if event is not None else MISSING, payload=payload)


# --- messages between nodes (core/rooms.py makes them, the backend's direct delivery carries them)


class ClusterOp(StrEnum):
    JOIN_REQUEST = "join-request"  # requester's node -> owner's node
    ADMIT = "admit"  # owner's node -> joiner's node
    LEAVE = "leave"  # member's node -> owner's node: it left, ``to`` were told already
    WITHDRAW = "withdraw"  # requester's (or refused joiner's) node -> owner's node, untold
    SNAPSHOT = "snapshot"  # owner's node -> every other node with members
    HANDOVER = "handover"  # old owner's node -> new owner's node
    EMIT = "emit"  # any node -> the node of sockets ``to``: emit ``event`` with ``body``


# Polysignal's own message to an owner whose room lost its name (docs/protocols/rooms.md).
NAME_LOST: Final = (
    "Another room took the name of room {room!r} while the cluster's shared state was "
    "unreachable; this room takes no more join requests"
)


@dataclass(frozen=True, slots=True)
class Member:
    node: str
    data: dict[str, Any]  # socket.data: {} or {"peerinfo": ...}


@dataclass(frozen=True, slots=True)
class Pending:
    node: str
    data: dict[str, Any]
    payload: Maybe = MISSING


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A room as its owner's node knows it; members in the order they joined."""

    room: str
    token: str
    owner: str
    version: int
    members: tuple[tuple[str, Member], ...]
    pending: tuple[tuple[str, Pending], ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterMessage:
    """One message between nodes. ``token`` names the room's instance (its claim's owner
    token): a message for a room of the same name but another token is not for this room."""

    op: ClusterOp
    room: str
    sid: str = ""
    node: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    payload: Maybe = MISSING
    snapshot: Snapshot | None = None
    hops: int = 0
    token: str = ""
    event: ServerEvent | None = None
    body: dict[str, Any] = field(default_factory=dict)
    to: tuple[str, ...] = ()


def _maybe_out(value: Maybe) -> list[Any]:
    return [] if value is MISSING else [value]


def _maybe_in(value: Any) -> Maybe:
    return value[0] if isinstance(value, list) and value else MISSING


def encode_cluster(msg: ClusterMessage) -> bytes:
    snap = msg.snapshot
    snapshot = None
    if snap is not None:
        snapshot = {
            "room": snap.room,
            "token": snap.token,
            "owner": snap.owner,
            "version": snap.version,
            "members": [[sid, m.node, m.data] for sid, m in snap.members],
            "pending": [[sid, p.node, p.data, _maybe_out(p.payload)] for sid, p in snap.pending],
        }
    obj: dict[str, Any] = {"op": msg.op.value, "room": msg.room}
    # Only the fields a message uses: an EMIT is on the hot path of every relay.
    if msg.sid:
        obj["sid"] = msg.sid
    if msg.node:
        obj["node"] = msg.node
    if msg.data:
        obj["data"] = msg.data
    if msg.payload is not MISSING:
        obj["payload"] = [msg.payload]
    if snapshot is not None:
        obj["snapshot"] = snapshot
    if msg.hops:
        obj["hops"] = msg.hops
    if msg.token:
        obj["token"] = msg.token
    if msg.event is not None:
        obj["event"] = msg.event.value
    if msg.body:
        obj["body"] = msg.body
    if msg.to:
        obj["to"] = list(msg.to)
    return orjson.dumps(obj)


def decode_cluster(raw: bytes) -> ClusterMessage:
    """Parse a message from another node; MalformedFrame if it is not one."""
    try:
        return _decode_cluster(raw)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise MalformedFrame("invalid cluster message") from None


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError("expected a list of strings")
    return tuple(value)


def _decode_cluster(raw: bytes) -> ClusterMessage:
    obj = orjson.loads(raw)
    snapshot = None
    snap = obj.get("snapshot")
    if snap is not None:
        snapshot = Snapshot(
            room=str(snap["room"]),
            token=str(snap["token"]),
            owner=str(snap["owner"]),
            version=int(snap["version"]),
            members=tuple((str(s), Member(str(n), dict(d))) for s, n, d in snap["members"]),
            pending=tuple(
                (str(s), Pending(str(n), dict(d), _maybe_in(p))) for s, n, d, p in snap["pending"]
            ),
        )
    event = obj.get("event")
    return ClusterMessage(
        op=ClusterOp(obj["op"]),
        room=str(obj["room"]),
        sid=str(obj.get("sid", "")),
        node=str(obj.get("node", "")),
        data=dict(obj.get("data") or {}),
        payload=_maybe_in(obj.get("payload")),
        snapshot=snapshot,
        hops=int(obj.get("hops", 0)),
        token=str(obj.get("token", "")),
        event=None if event is None else ServerEvent(event),
        body=dict(obj.get("body") or {}),
        to=_strings(obj.get("to", [])),
    )
