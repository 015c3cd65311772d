"""The PeerJS protocol of server ``peer`` 1.0.2 (docs/protocols/peerjs.md): frames <-> messages.

```
-> GET {path}peerjs?key=peerjs&id=<id>&token=<token>&version=1.5.4      (WebSocket)
<- {"type":"OPEN"}                                        then any messages queued for <id>
-> {"type":"OFFER","dst":"<peer>","payload":{..}}         <peer> gets it with "src":"<id>"
<- {"type":"OFFER","src":"<id>","dst":"<peer>","payload":{..}}
-> {"type":"HEARTBEAT"}                                   every 5 s; nothing is answered
<- {"type":"EXPIRE","src":"<peer>","dst":"<id>"}          a message queued for <peer> went unread
<- {"type":"ID-TAKEN","payload":{"msg":"ID is taken"}}    then the socket closes
<- {"type":"ERROR","payload":{"msg":"Invalid key provided"}}
```

Everything a client can send ends as a ``Message`` or a ``BadMessage`` (answered with an
``ERROR`` frame; the socket stays open). The server stamps ``src``; it never takes it from the
client. The original's error strings are kept exactly (``ErrorText``); where the original is
silent or crashes (bad JSON, unknown types, a missing ``dst``) polysignal answers an ``ERROR``
whose ``msg`` says what was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl

import orjson

from polysignal.core.errors import ClientError, MalformedFrame
from polysignal.protocols import jsonwire

WS_PATH = "peerjs"
"""The WebSocket's path under the mount path, as the client builds it: ``{path}peerjs``."""

MAX_PARAMETER_LENGTH = 256
"""Longest ``id``, ``token`` or ``key``, in characters (the original has no bound)."""

SERVER_INFO = {
    "name": "PeerJS Server",
    "description": "A server side element to broker connections between PeerJS clients.",
    "website": "https://peerjs.com/",
}
"""``GET {path}``: the original's ``app.json``."""


class MessageType(StrEnum):
    """Every ``type`` on the wire."""

    OPEN = "OPEN"
    LEAVE = "LEAVE"
    CANDIDATE = "CANDIDATE"
    OFFER = "OFFER"
    ANSWER = "ANSWER"
    EXPIRE = "EXPIRE"
    HEARTBEAT = "HEARTBEAT"
    ID_TAKEN = "ID-TAKEN"
    ERROR = "ERROR"


RELAYED = frozenset(
    {
        MessageType.OFFER,
        MessageType.ANSWER,
        MessageType.CANDIDATE,
        MessageType.LEAVE,
        MessageType.EXPIRE,
    }
)
"""Types a client sends to another peer (``dst``)."""
NOT_QUEUED = frozenset({MessageType.LEAVE, MessageType.EXPIRE})
"""Relayed types dropped, not queued, when ``dst`` is not connected (as the original)."""
_FROM_CLIENT = {t.value: t for t in (*RELAYED, MessageType.HEARTBEAT)}


class ErrorText(StrEnum):
    """The ``payload.msg`` of an ``ERROR`` frame."""

    # The original's, exactly (its ``Errors`` enum).
    INVALID_KEY = "Invalid key provided"
    INVALID_WS_PARAMETERS = "No id, token, or key supplied to websocket server"
    CONNECTION_LIMIT_EXCEED = "Server has reached its concurrent user limit"
    # polysignal's own, where the original is silent or crashes.
    PARAMETER_TOO_LONG = "id, token or key longer than 256 characters"
    NOT_JSON = "Invalid message: not JSON"
    TOO_DEEP = "Invalid message: JSON nested deeper than 64 levels"
    NOT_OBJECT = "Invalid message: expected a JSON object"
    BAD_TYPE = "Invalid message: type must be a string"
    MISSING_DST = "Invalid message: dst is missing"
    BAD_DST = "Invalid message: dst must be a string"
    RATE_LIMITED = "Too many messages"


ID_TAKEN_TEXT = "ID is taken"
"""The ``payload.msg`` of ``ID-TAKEN``."""


class BadMessage(ClientError):
    """A frame that is no PeerJS message; ``message`` is the ``ERROR`` frame's ``msg``."""


@dataclass(frozen=True, slots=True)
class Params:
    """The WebSocket's query parameters the server reads (``version`` and others are ignored)."""

    key: str
    id: str
    token: str


@dataclass(frozen=True, slots=True)
class Message:
    """One well-formed client message. ``dst`` is None when absent or empty (a ``LEAVE`` without
    one ends the session); ``payload`` is relayed whole when ``has_payload``."""

    type: MessageType
    dst: str | None = None
    payload: Any = None
    has_payload: bool = False


# --- opening ----------------------------------------------------------------------------------


def parse_query(query: str) -> Params:
    """``key``, ``id`` and ``token`` of a query string; the last of a repeated name counts (as
    ``URLSearchParams`` does); absent ones are empty."""
    values = dict(parse_qsl(query, keep_blank_values=True, errors="replace"))
    return Params(values.get("key", ""), values.get("id", ""), values.get("token", ""))


def check_params(params: Params, key: str) -> ErrorText | None:
    """The original's checks, in its order: all three given, then the key; then polysignal's
    length bound."""
    if not params.id or not params.token or not params.key:
        return ErrorText.INVALID_WS_PARAMETERS
    if not hmac.compare_digest(params.key.encode(), key.encode()):
        return ErrorText.INVALID_KEY
    if max(len(params.id), len(params.token), len(params.key)) > MAX_PARAMETER_LENGTH:
        return ErrorText.PARAMETER_TOO_LONG
    return None


def token_digest(peer_id: str, token: str) -> str:
    """What the cluster keeps of a client's token: its claim's owner token. A digest, so that
    reading the shared state does not give anyone the token that re-attaches to an id."""
    raw = hashlib.sha256(f"{peer_id}\0{token}".encode(errors="replace")).digest()
    return raw[:18].hex()


def new_id() -> str:
    """``GET {path}{key}/id``: a random UUID, as the original's ``randomUUID``."""
    return str(uuid.uuid4())


# --- messages ---------------------------------------------------------------------------------


def decode(frame: str | bytes) -> Message:
    """Parse one client frame (binary frames are read as JSON text, as the original does);
    raise ``BadMessage`` with the ``ERROR`` text when it is no message."""
    try:
        value = jsonwire.loads(frame)
    except jsonwire.TooDeep:
        raise BadMessage(ErrorText.TOO_DEEP) from None
    except jsonwire.DecodeError:
        raise BadMessage(ErrorText.NOT_JSON) from None
    if type(value) is not dict:
        raise BadMessage(ErrorText.NOT_OBJECT)
    raw_type = value.get("type")
    if type(raw_type) is not str:
        raise BadMessage(ErrorText.BAD_TYPE)
    kind = _FROM_CLIENT.get(raw_type)
    if kind is None:
        raise BadMessage(f"Unknown message type: {jsonwire.clip(raw_type)}")
    if kind is MessageType.HEARTBEAT:
        return Message(kind)
    dst = value.get("dst")
    if dst is not None and type(dst) is not str:
        raise BadMessage(ErrorText.BAD_DST)
    has_payload = "payload" in value
    return Message(kind, dst or None, value.get("payload"), has_payload)


def encode_relayed(message: Message, src: str) -> bytes:
    """What ``dst`` receives: ``type``, ``src`` (stamped), ``dst`` and ``payload``, nothing else
    the client sent."""
    out: dict[str, Any] = {"type": message.type.value, "src": src, "dst": message.dst}
    if message.has_payload:
        out["payload"] = message.payload
    return orjson.dumps(out)


def encode_notice(kind: MessageType, src: str, dst: str) -> bytes:
    """A message the server makes on a peer's behalf: ``EXPIRE`` or ``LEAVE`` from ``src``."""
    return orjson.dumps({"type": kind.value, "src": src, "dst": dst})


OPEN_FRAME = orjson.dumps({"type": MessageType.OPEN.value})
ID_TAKEN_FRAME = orjson.dumps(
    {"type": MessageType.ID_TAKEN.value, "payload": {"msg": ID_TAKEN_TEXT}}
)


def encode_error(text: str) -> bytes:
    return orjson.dumps({"type": MessageType.ERROR.value, "payload": {"msg": text}})


# --- the cluster format: what PeerJS nodes send each other --------------------------------------


@dataclass(frozen=True, slots=True)
class Relayed:
    """A relayed frame as another node sent it (the frame ``dst`` gets, unchanged)."""

    type: MessageType
    src: str
    dst: str
    frame: bytes


def decode_relayed(frame: bytes) -> Relayed:
    """A frame another node relays (``MalformedFrame`` if it is not one)."""
    value = _cluster_object(frame)
    kind = _FROM_CLIENT.get(value.get("type"))  # type: ignore[arg-type]
    src, dst = value.get("src"), value.get("dst")
    if kind is None or kind not in RELAYED or type(src) is not str or type(dst) is not str:
        raise MalformedFrame("invalid cluster message")
    return Relayed(kind, src, dst, frame)


@dataclass(frozen=True, slots=True)
class Holder:
    """A client holding ``id`` with the token digest ``token`` (a probe, or an eviction)."""

    id: str
    token: str
    ask: int = 0


def encode_holder(holder: Holder) -> bytes:
    return orjson.dumps({"id": holder.id, "token": holder.token, "ask": holder.ask})


def decode_holder(payload: bytes) -> Holder:
    value = _cluster_object(payload)
    peer_id, token, ask = value.get("id"), value.get("token"), value.get("ask")
    if type(peer_id) is not str or type(token) is not str or type(ask) is not int:
        raise MalformedFrame("invalid cluster message")
    return Holder(peer_id, token, ask)


def encode_probe_answer(ask: int, live: bool) -> bytes:
    return orjson.dumps({"ask": ask, "live": live})


def decode_probe_answer(payload: bytes) -> tuple[int, bool]:
    value = _cluster_object(payload)
    ask, live = value.get("ask"), value.get("live")
    if type(ask) is not int or type(live) is not bool:
        raise MalformedFrame("invalid cluster message")
    return ask, live


def _cluster_object(payload: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise MalformedFrame("invalid cluster message") from None
    if type(value) is not dict:
        raise MalformedFrame("invalid cluster message")
    return value
