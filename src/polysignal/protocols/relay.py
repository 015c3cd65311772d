"""The relay protocol of cevitxe-signal-server and @localfirst/relay (docs/protocols/relay.md).

Frames <-> commands. Three generations share the endpoints; a connection's first frame tells
which one it speaks, and it is answered in kind (docs/protocols/relay.md, "Introductions"):

```
V1  cevitxe 0.4.x, relay 1.0   JSON text
    -> {"type":"Join","join":[..],"leave":[..]}    {"type":"Leave","leave":[..]}
    <- {"type":"Introduction","id":B,"keys":[..]}
V2  relay 2.0-3.6              JSON text
    -> {"type":"Join","documentIds":[..]}          {"type":"Leave","documentIds":[..]}
    <- {"type":"Introduction","userName":B,"documentIds":[..]}
V4  relay 4.x                  msgpack binary
    -> {"type":"Join","documentIds":[..]}          {"type":"Leave","documentIds":[..]}
    <- {"type":"Introduction","peerId":B,"documentIds":[..]}
all -> {"type":"Heartbeat"} (v4's types.ts also names "❤️"); nothing is sent back
```

The clients throw on any server message that is not an ``Introduction``, so the protocol has no
error frame. ``decode`` raises ``ClientError``: ``Ignored`` for a frame that is not a relay
message the server can act on (not JSON or msgpack, not an object, no or an unknown ``type``, a
Join or Leave without a valid id list), which is dropped while the socket stays open, as
@localfirst/relay 3.6 and 4.x do; any other ``ClientError`` (a limit, nesting past the decode
bound) closes the socket with its code and reason (docs/protocols/relay.md, "Errors and limits").

The second half of this module is the cluster format: what relay nodes send each other over the
backend (announcements of joins on a document's topic, and direct messages that introduce peers
and carry piped frames between nodes). It is msgpack, so piped binary frames cross unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any
from urllib.parse import unquote

import msgpack
import orjson

from polysignal.core.errors import (
    Answer,
    BackendUnavailable,
    ClientError,
    Close,
    CloseCode,
    LimitExceeded,
    MalformedFrame,
)
from polysignal.protocols import jsonwire
from polysignal.protocols.jsonwire import clip, type_name

NAMESPACE = "relay"
"""The backend topic namespace: one topic per document id, its presence = peers that joined it."""


class Encoding(Enum):
    """How a connection's frames are encoded, fixed by its first frame."""

    JSON = "json"
    MSGPACK = "msgpack"


class Generation(Enum):
    """Which client family a connection belongs to; picks the shape of its ``Introduction``."""

    V1 = "join/keys"  # cevitxe-signal-client 0.4.x and relay 1.0.x
    V2 = "documentIds"  # @localfirst/relay-client 2.0-3.6
    V4 = "msgpack"  # @localfirst/relay 4.x


class MessageType(StrEnum):
    JOIN = "Join"
    LEAVE = "Leave"
    HEARTBEAT = "Heartbeat"
    HEART = "❤️"  # the v4 server's name for a heartbeat (types.ts); clients send "Heartbeat"
    INTRODUCTION = "Introduction"


@dataclass(frozen=True, slots=True)
class Join:
    """Add ``document_ids`` to the peer's set (then remove ``leave``, which only V1 sends with a
    Join) and introduce the peer to everyone it shares a document with."""

    document_ids: tuple[str, ...]
    leave: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Leave:
    """Remove ``document_ids`` from the peer's set; nothing is sent."""

    document_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


Command = Join | Leave | Heartbeat


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded frame and the generation its fields reveal (None: a heartbeat reveals none)."""

    command: Command
    generation: Generation | None


class Ignored(MalformedFrame):
    """A frame that is not a relay message the server can act on: dropped, and the socket stays
    open (``answer``), as @localfirst/relay 3.6 and 4.x do; rate-limited like any frame."""


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_id_length: int = 512
    max_documents: int = 256


def decode(frame: str | bytes, encoding: Encoding, limits: RelayLimits = RelayLimits()) -> Decoded:
    """Parse one frame of an ``/introduction`` socket; raise ClientError naming what is wrong.

    ``encoding`` is the frame's type (text = JSON, binary = msgpack); the caller checks that it
    matches the connection's.
    """
    if encoding is Encoding.JSON:
        try:
            message = jsonwire.loads(frame)
        except jsonwire.TooDeep as exc:
            raise MalformedFrame(f"JSON {exc}") from None
        except jsonwire.DecodeError:
            raise Ignored("invalid JSON") from None
    else:
        try:
            message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        except Exception:  # the msgpack library raises many types for bad input; none is ours
            raise Ignored("invalid msgpack") from None
        try:
            jsonwire.check_depth(message, len(frame))
        except jsonwire.TooDeep as exc:
            raise MalformedFrame(f"msgpack {exc}") from None
    if not isinstance(message, dict):
        raise Ignored(f"expected an object (map), got {type_name(message)}")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise Ignored("missing 'type'" if kind is None else "'type' must be a string")
    match kind:
        case MessageType.HEARTBEAT | MessageType.HEART:
            return Decoded(Heartbeat(), Generation.V4 if encoding is Encoding.MSGPACK else None)
        case MessageType.JOIN | MessageType.LEAVE:
            pass
        case _:
            raise Ignored(f"unknown message type {clip(kind)!r}")
    if encoding is Encoding.MSGPACK:
        ids = _id_list(message, "documentIds", limits, required=True)
        generation = Generation.V4
        command: Command = Join(ids) if kind == MessageType.JOIN else Leave(ids)
        return Decoded(command, generation)
    # JSON: V2 names the list `documentIds`; V1 has `join` and/or `leave` lists.
    if "documentIds" in message:
        if "join" in message or "leave" in message:
            raise Ignored("a frame has either 'documentIds' or 'join'/'leave', not both")
        ids = _id_list(message, "documentIds", limits, required=True)
        command = Join(ids) if kind == MessageType.JOIN else Leave(ids)
        return Decoded(command, Generation.V2)
    if "join" not in message and "leave" not in message:
        raise Ignored(f"{kind}: missing 'documentIds' (or 'join'/'leave')")
    join = _id_list(message, "join", limits, required=False)
    leave = _id_list(message, "leave", limits, required=False)
    if kind == MessageType.JOIN:
        return Decoded(Join(join, leave), Generation.V1)
    if join:
        raise Ignored("Leave: 'join' is only allowed in a Join")
    return Decoded(Leave(leave), Generation.V1)


def _id_list(
    message: dict[Any, Any], field: str, limits: RelayLimits, *, required: bool
) -> tuple[str, ...]:
    raw = message.get(field)
    if raw is None:
        if required:
            raise Ignored(f"missing '{field}'")
        return ()
    if not isinstance(raw, list):
        raise Ignored(f"'{field}' must be a list, got {type_name(raw)}")
    if len(raw) > limits.max_documents:
        raise LimitExceeded(
            f"'{field}' has {len(raw)} entries; a peer may hold at most {limits.max_documents}"
        )
    for index, item in enumerate(raw):
        if not isinstance(item, str):
            raise Ignored(f"{field}[{index}] is {type_name(item)}, not a string")
        if item == "":
            raise Ignored(f"{field}[{index}] is empty")
        check_id(f"{field}[{index}]", item, limits)
    # Duplicates within one frame collapse, keeping the first position (the original's dedupe).
    return tuple(dict.fromkeys(raw))


def check_id(what: str, value: str, limits: RelayLimits) -> None:
    """A peer id or document id must be a non-empty string of at most ``max_id_length``."""
    if value == "":
        raise MalformedFrame(f"{what} is empty")
    if len(value) > limits.max_id_length:
        raise LimitExceeded(f"{what} is longer than {limits.max_id_length} characters")


def encode_introduction(
    generation: Generation, peer_id: str, document_ids: tuple[str, ...] | list[str]
) -> bytes:
    """``peer_id``'s ``Introduction`` in ``generation``'s shape (JSON for V1/V2, msgpack V4)."""
    ids = list(document_ids)
    match generation:
        case Generation.V1:
            return orjson.dumps({"type": MessageType.INTRODUCTION, "id": peer_id, "keys": ids})
        case Generation.V2:
            return orjson.dumps(
                {"type": MessageType.INTRODUCTION, "userName": peer_id, "documentIds": ids}
            )
        case Generation.V4:
            packed: bytes = msgpack.packb(
                {"type": str(MessageType.INTRODUCTION), "peerId": peer_id, "documentIds": ids},
                use_bin_type=True,
            )
            return packed


def encoding_of(generation: Generation) -> Encoding:
    return Encoding.MSGPACK if generation is Generation.V4 else Encoding.JSON


def answer(error: Exception) -> Answer:
    """How the relay answers an error: it has no error frame (its clients throw on anything but
    an ``Introduction``), so a frame that is no relay message is dropped without an answer
    (``Ignored``), and anything else closes the socket, with the error's code and message."""
    if isinstance(error, Ignored):
        return None
    if isinstance(error, ClientError):
        return Close(error.close_code, error.message)
    if isinstance(error, BackendUnavailable):
        return Close(CloseCode.TRY_AGAIN_LATER, "the cluster is unavailable; try again")
    return Close(CloseCode.INTERNAL_ERROR, "internal error")


# --- the endpoints -----------------------------------------------------------------------------

INTRODUCTION = "introduction"
CONNECTION = "connection"
_PREFIXES = ("/" + INTRODUCTION, "/" + CONNECTION)


@dataclass(frozen=True, slots=True)
class IntroductionPath:
    """``/introduction/{peer}``: a peer's introductions socket."""

    peer: str


@dataclass(frozen=True, slots=True)
class ConnectionPath:
    """``/connection/{local}/{remote}/{document}``: one end of a pipe."""

    local: str
    remote: str
    document: str


def _split(raw_path: str) -> tuple[str, list[str]] | None:
    if not raw_path.startswith(_PREFIXES):
        return None
    parts = raw_path.split("/")
    if parts[1] not in (INTRODUCTION, CONNECTION):
        return None  # "/introductions", say
    rest = parts[2:]
    if rest and rest[-1] == "":
        rest = rest[:-1]  # Express matches a trailing slash
    # Segments are split before percent-decoding, as Express does for route parameters.
    return parts[1], [unquote(p) for p in rest]


def is_relay_path(raw_path: str) -> bool:
    """Whether a WebSocket on ``raw_path`` is the relay's (its endpoints, valid or not)."""
    return _split(raw_path) is not None


def parse_endpoint(
    raw_path: str, limits: RelayLimits = RelayLimits()
) -> IntroductionPath | ConnectionPath | None:
    """The endpoint ``raw_path`` names; None if it is not the relay's. Raises ClientError for
    a relay path with the wrong number of ids or an id over the limits."""
    split = _split(raw_path)
    if split is None:
        return None
    endpoint, params = split
    if endpoint == INTRODUCTION:
        if len(params) != 1:
            raise ClientError("expected /introduction/{peerId}")
        check_id("peer id", params[0], limits)
        return IntroductionPath(params[0])
    if len(params) != 3:
        raise ClientError("expected /connection/{localId}/{remoteId}/{documentId}")
    for what, value in zip(("local id", "remote id", "document id"), params, strict=True):
        check_id(what, value, limits)
    return ConnectionPath(*params)


# --- the cluster format -------------------------------------------------------------------------


class Direct(StrEnum):
    """Kinds of direct messages between relay nodes (``Backend.send_direct``)."""

    INTRODUCE = "relay.introduce"  # introduce a remote peer to a local one
    EVICT_PEER = "relay.evict-peer"  # a newer /introduction socket took over this peer id
    MATCH = "relay.match"  # a /connection request found its reciprocal held on your node
    MATCHED = "relay.matched"  # the held socket is now piped to yours
    NO_MATCH = "relay.no-match"  # the held socket is gone; try again
    EVICT_PIPE = "relay.evict-pipe"  # a newer duplicate /connection request replaces yours


@dataclass(frozen=True, slots=True)
class Announce:
    """Published on each joined document's topic: ``peer`` on ``node`` joined ``joined`` and now
    holds ``documents``, so nodes with peers in those documents introduce them."""

    node: str
    peer: str
    joined: tuple[str, ...]
    documents: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Introduce:
    """Introduce ``peer`` to the local peer ``to`` for ``documents`` (those both hold)."""

    to: str
    peer: str
    documents: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EndRef:
    """A message about one pipe end (the socket with id ``end``), optionally naming another."""

    end: str
    other: str = ""
    reason: str = ""


def pack(value: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def encode_announce(msg: Announce) -> bytes:
    return pack([msg.node, msg.peer, list(msg.joined), list(msg.documents)])


def decode_announce(payload: bytes) -> Announce:
    node, peer, joined, documents = _unpack(payload, 4)
    return Announce(_str(node), _str(peer), _strs(joined), _strs(documents))


def encode_introduce(msg: Introduce) -> bytes:
    return pack([msg.to, msg.peer, list(msg.documents)])


def decode_introduce(payload: bytes) -> Introduce:
    to, peer, documents = _unpack(payload, 3)
    return Introduce(_str(to), _str(peer), _strs(documents))


def encode_end(msg: EndRef) -> bytes:
    return pack([msg.end, msg.other, msg.reason])


def decode_end(payload: bytes) -> EndRef:
    end, other, reason = _unpack(payload, 3)
    return EndRef(_str(end), _str(other), _str(reason))


def _unpack(payload: bytes, size: int) -> list[Any]:
    try:
        value = msgpack.unpackb(payload, raw=False)
    except Exception:
        raise MalformedFrame("invalid cluster message") from None
    if not isinstance(value, list) or len(value) != size:
        raise MalformedFrame("invalid cluster message")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise MalformedFrame("invalid cluster message")
    return value


def _strs(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedFrame("invalid cluster message")
    return tuple(value)
