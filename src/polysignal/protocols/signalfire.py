"""The Signal-Fire protocol of server 0.5.0 (docs/protocols/signal-fire.md): frames <-> requests.

```
<- {"id":"<nanoid>","cmd":"welcome","data":{"id":"<your id>","configuration":{"iceServers":[]}}}
-> {"id":"<nanoid>","cmd":"session-start","target":"<peer id>"}
<- {"id":"<same>","ok":true}                         ack, always before the relay
                                                     target gets {"id":"<new>","cmd":..,"origin":..}
-> {"id":"<nanoid>","cmd":"offer","target":"..","data":{"offer":{..}}}   data relayed whole
<- {"id":"<same>","ok":false,"data":{"message":"Peer Not Found"}}        or an error
```

Decoding is split in two, because the original checks in this order (docs/protocols/signal-fire.md,
"Errors"): the message id and the target's presence (``decode`` and ``precheck``, no I/O), then the
target's registry state (which the server looks up), then the command's own payload
(``postcheck``). Everything a client can send ends as a ``Request``, an ``Ignored`` (no reply to
unknown commands) or a ``CloseRequest`` exception (close 4400).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

import orjson

from polysignal.core.errors import Answer, ClientError, Close, CloseCode, MalformedFrame, Reply
from polysignal.protocols import jsonwire

SUBPROTOCOL = "Signal-Fire@3"
LEGACY_SUBPROTOCOL = "Signal-Fire@2"
"""Clients 1.0-1.3 (server 0.3.0) offer this one and send SDP as ``data.sdp``."""
SUBPROTOCOLS = (SUBPROTOCOL, LEGACY_SUBPROTOCOL)

ID_LENGTH = 21
ID_ALPHABET = "useandom-26T198340PX75pxJACKVERYMINDBUSHWOLF_GQZbfghjklqvwyzrict"
"""nanoid's URL-safe alphabet: 64 characters, so one random byte picks one exactly."""


class Cmd(StrEnum):
    """Every ``cmd`` on the wire."""

    WELCOME = "welcome"
    SESSION_START = "session-start"
    SESSION_ACCEPT = "session-accept"
    SESSION_REJECT = "session-reject"
    SESSION_CANCEL = "session-cancel"
    SESSION_TIMEOUT = "session-timeout"
    OFFER = "offer"
    ANSWER = "answer"
    ICE = "ice"


REQUESTS = frozenset(
    {
        Cmd.SESSION_START,
        Cmd.SESSION_ACCEPT,
        Cmd.SESSION_REJECT,
        Cmd.SESSION_CANCEL,
        Cmd.OFFER,
        Cmd.ANSWER,
        Cmd.ICE,
    }
)
"""Commands a client may send. ``session-timeout`` is not one: the server never answers it
(nor did the original); polysignal sends it itself when a session start goes unanswered."""
_REQUEST_CMDS = {cmd.value: cmd for cmd in REQUESTS}


class ErrorText(StrEnum):
    """The ``data.message`` of an ``ok:false`` reply: exactly the original's strings."""

    MISSING_TARGET = "Missing Target"
    SELF_TARGET = "Can't Send to Yourself"
    PEER_NOT_FOUND = "Peer Not Found"
    PEER_OFFLINE = "Peer Offline"
    MISSING_OFFER = "Missing Offer"
    MISSING_ANSWER = "Missing Answer"
    MISSING_CANDIDATE = "Missing ICE Candidate"
    INTERNAL = "Internal Server Error"
    # polysignal's own: a request over the connection's rate limit is refused, not lost silently.
    RATE_LIMITED = "Too Many Requests"


class CloseReason(StrEnum):
    """Reasons of the 4400 close (docs/protocols/signal-fire.md, "Errors")."""

    BAD_REQUEST = "Bad Request"
    MISSING_ID = "Missing message ID"


class TargetState(Enum):
    """What the server found when it looked the target id up."""

    ONLINE = "online"
    OFFLINE = "offline"  # registered, but its socket is closing (the original's status)
    NOT_FOUND = "not-found"


# Which payload field each relaying command requires, and the error when it is absent.
_REQUIRED_DATA: dict[Cmd, tuple[str, ErrorText]] = {
    Cmd.OFFER: ("offer", ErrorText.MISSING_OFFER),
    Cmd.ANSWER: ("answer", ErrorText.MISSING_ANSWER),
    Cmd.ICE: ("candidate", ErrorText.MISSING_CANDIDATE),
}

MessageId = str | int | float
"""A client's request id, echoed unchanged in the ack (nanoid strings in practice)."""


class CloseRequest(ClientError):
    """The frame ends the connection: close 4400 with ``message`` as the reason."""

    close_code = CloseCode.BAD_REQUEST


@dataclass(frozen=True, slots=True)
class Request:
    """One well-formed client request; ``target`` and ``data`` are as the client sent them."""

    id: MessageId
    cmd: Cmd
    target: Any
    data: Any


@dataclass(frozen=True, slots=True)
class Ignored:
    """A frame with an id but an unknown or missing ``cmd``: no reply, socket stays open."""

    id: MessageId
    cmd: Any


_ID_BYTES = bytes(ord(ID_ALPHABET[b & 63]) for b in range(256))
"""Random byte -> its character: the low 6 bits pick one of the 64 (a table for ``translate``)."""
_ID_SHAPE = re.compile(f"[{re.escape(ID_ALPHABET)}]{{{ID_LENGTH}}}")


def new_id() -> str:
    """A nanoid: 21 characters of the URL-safe alphabet from the system's CSPRNG."""
    return secrets.token_bytes(ID_LENGTH).translate(_ID_BYTES).decode("ascii")


def is_id(value: Any) -> bool:
    """True when ``value`` could be an id this server assigned (used to skip hopeless lookups)."""
    return isinstance(value, str) and _ID_SHAPE.fullmatch(value) is not None


def _truthy(value: Any) -> bool:
    """JavaScript truthiness of a JSON value: the original tests fields with ``!value``."""
    if type(value) is str:
        return value != ""
    return value not in (None, False, 0, "") and not (isinstance(value, float) and value != value)


def decode(frame: str | bytes) -> Request | Ignored:
    """Parse one frame; raise ``CloseRequest`` when the protocol says the socket must close.

    * not JSON, or not a JSON object: 4400 ``Bad Request`` (the original's parse-failure close);
    * no usable ``id`` (absent, or falsy as JavaScript sees it): 4400 ``Missing message ID``;
      an id that is neither a string nor a number cannot be echoed meaningfully: ``Bad Request``;
    * unknown or missing ``cmd``: ``Ignored`` (no reply, as in the original).
    """
    try:
        message = jsonwire.loads(frame)
    except jsonwire.DecodeError:  # not JSON, or nested deeper than MAX_DEPTH
        raise CloseRequest(CloseReason.BAD_REQUEST) from None
    if not isinstance(message, dict):
        raise CloseRequest(CloseReason.BAD_REQUEST)
    msg_id = message.get("id")
    if not _truthy(msg_id):
        raise CloseRequest(CloseReason.MISSING_ID)
    if type(msg_id) is not str and (
        isinstance(msg_id, bool) or not isinstance(msg_id, int | float)
    ):
        raise CloseRequest(CloseReason.BAD_REQUEST)
    request_id: MessageId = msg_id
    raw_cmd = message.get("cmd")
    cmd = _REQUEST_CMDS.get(raw_cmd) if isinstance(raw_cmd, str) else None
    if cmd is None:
        return Ignored(request_id, raw_cmd)
    return Request(request_id, cmd, message.get("target"), message.get("data"))


def precheck(request: Request, own_id: str) -> ErrorText | None:
    """Checks that need no lookup, in the original's order: target present, not yourself."""
    if not _truthy(request.target):
        return ErrorText.MISSING_TARGET
    if request.target == own_id:
        return ErrorText.SELF_TARGET
    return None


def postcheck(request: Request, state: TargetState, *, legacy: bool = False) -> ErrorText | None:
    """Checks after the target lookup: its state, then the command's required ``data`` field.

    ``legacy`` (a ``Signal-Fire@2`` connection) also accepts ``data.sdp`` for offers and answers,
    as server 0.3.0 did.
    """
    if state is TargetState.NOT_FOUND:
        return ErrorText.PEER_NOT_FOUND
    if state is TargetState.OFFLINE:
        return ErrorText.PEER_OFFLINE
    required = _REQUIRED_DATA.get(request.cmd)
    if required is None:
        return None
    field, error = required
    data = request.data
    if not isinstance(data, dict):
        return error
    if _truthy(data.get(field)):
        return None
    if legacy and request.cmd is not Cmd.ICE and _truthy(data.get("sdp")):
        return None
    return error


def relayed(request: Request, origin: str) -> dict[str, Any]:
    """What the target receives: a fresh id, ``cmd``, ``origin``, never ``target``.

    ``offer``/``answer``/``ice`` carry the client's whole ``data``; ``session-reject`` carries
    the rejecting side's ``data.message`` reason (polysignal's addition; the original dropped
    it); the other session commands carry nothing.
    """
    message: dict[str, Any] = {"id": new_id(), "cmd": request.cmd.value, "origin": origin}
    if request.cmd in _REQUIRED_DATA:
        message["data"] = request.data
    elif request.cmd is Cmd.SESSION_REJECT:
        data = request.data
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            message["data"] = {"message": data["message"]}
    return message


def notice(cmd: Cmd, origin: str) -> dict[str, Any]:
    """A message the server makes about ``origin``'s session (timeout, cancel)."""
    return {"id": new_id(), "cmd": cmd.value, "origin": origin}


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


def encode_ack(request_id: MessageId) -> bytes:
    return orjson.dumps({"id": request_id, "ok": True})


def encode_error(request_id: MessageId, error: ErrorText) -> bytes:
    return orjson.dumps({"id": request_id, "ok": False, "data": {"message": error.value}})


def encode_welcome(client_id: str, ice_servers: tuple[dict[str, Any], ...] | None) -> bytes:
    """The first frame; ``configuration`` only when ICE servers are configured."""
    data: dict[str, Any] = {"id": client_id}
    if ice_servers is not None:
        data["configuration"] = {"iceServers": list(ice_servers)}
    return orjson.dumps({"id": new_id(), "cmd": Cmd.WELCOME.value, "data": data})


def answer(error: Exception, request_id: MessageId | None) -> Answer:
    """How Signal-Fire answers an error: ``CloseRequest`` closes with 4400; any other fault
    while handling request ``request_id`` is its ``ok:false`` reply ``Internal Server Error``
    (with no request to answer, the socket closes with 4500)."""
    if isinstance(error, ClientError):
        return Close(error.close_code, error.message)
    if request_id is None:
        return Close(CloseCode.SERVER_ERROR, ErrorText.INTERNAL.value)
    return Reply(encode_error(request_id, ErrorText.INTERNAL))


# --- the cluster format: what Signal-Fire nodes send each other ---------------------------------


@dataclass(frozen=True, slots=True)
class RemoteRelay:
    """A relay for the peer ``to`` on the receiving node; ``requester``/``request_id`` name the
    request it answers, so an undeliverable relay can be reported back (None: a server notice)."""

    to: str
    message: dict[str, Any]
    requester: str | None = None
    request_id: Any = None


@dataclass(frozen=True, slots=True)
class Undeliverable:
    """Back to the requester's node: the relay of ``cmd`` to ``target`` found no open socket."""

    to: str
    request_id: Any
    cmd: Any = None
    target: Any = None


def encode_remote_relay(relay: RemoteRelay) -> bytes:
    return orjson.dumps(
        {"to": relay.to, "message": relay.message, "from": relay.requester, "req": relay.request_id}
    )


def decode_remote_relay(payload: bytes) -> RemoteRelay:
    envelope = _cluster_object(payload)
    to, message, requester = envelope.get("to"), envelope.get("message"), envelope.get("from")
    if not isinstance(to, str) or not isinstance(message, dict):
        raise MalformedFrame("invalid cluster message")
    return RemoteRelay(
        to, message, requester if isinstance(requester, str) else None, envelope.get("req")
    )


def encode_undeliverable(notice: Undeliverable) -> bytes:
    return orjson.dumps(
        {"to": notice.to, "req": notice.request_id, "cmd": notice.cmd, "target": notice.target}
    )


def decode_undeliverable(payload: bytes) -> Undeliverable:
    notice = _cluster_object(payload)
    to = notice.get("to")
    if not isinstance(to, str) or "req" not in notice:
        raise MalformedFrame("invalid cluster message")
    return Undeliverable(to, notice["req"], notice.get("cmd"), notice.get("target"))


def _cluster_object(payload: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise MalformedFrame("invalid cluster message") from None
    if not isinstance(value, dict):
        raise MalformedFrame("invalid cluster message")
    return value
