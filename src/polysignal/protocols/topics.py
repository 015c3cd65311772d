"""The topics protocol of y-webrtc and Flow-Like (docs/protocols/topics.md): frames <-> commands.

```
-> {"type":"subscribe","topics":["a","b"]}      no reply
-> {"type":"unsubscribe","topics":["a"]}        no reply
-> {"type":"publish","topic":"a","data":{...}}  relayed whole to the topic's other subscribers
                                                 with "clients" and "_origin" added
-> {"type":"ping"}                              <- {"type":"pong"}
<- {"type":"error","message":"..."}             polysignal's answer to bad input
```

Decoding never raises anything but ``ClientError``; ``answer`` turns it into an error frame and
the connection stays open (y-webrtc ignores message types it does not know).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from polysignal.core.errors import (
    Answer,
    BackendUnavailable,
    ClientError,
    MalformedFrame,
    Reply,
    UnknownCommand,
)
from polysignal.protocols import jsonwire
from polysignal.protocols.jsonwire import clip, type_name


class MessageType(StrEnum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    PUBLISH = "publish"
    PING = "ping"
    PONG = "pong"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Subscribe:
    topics: tuple[str, ...]
    # Problems with individual entries (skipped, not fatal): reported as one error frame.
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topics: tuple[str, ...]
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    # The client's whole object; every field is relayed (Flow-Like keeps extra top-level fields).
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ping:
    pass


Command = Subscribe | Unsubscribe | Publish | Ping

PONG = b'{"type":"pong"}'


@dataclass(frozen=True, slots=True)
class TopicLimits:
    max_topic_length: int = 512


def decode(frame: str | bytes, limits: TopicLimits = TopicLimits()) -> Command:
    """Parse one text frame into a command; raise ClientError naming what is wrong."""
    try:
        message = jsonwire.loads(frame)
    except jsonwire.TooDeep as exc:
        raise MalformedFrame(f"JSON {exc}") from None
    except jsonwire.DecodeError:
        raise MalformedFrame("invalid JSON") from None
    if not isinstance(message, dict):
        raise MalformedFrame(f"expected a JSON object, got {type_name(message)}")
    kind = message.get("type")
    if kind is None:
        raise MalformedFrame("missing 'type'")
    if not isinstance(kind, str):
        raise MalformedFrame(f"'type' must be a string, got {type_name(kind)}")
    match kind:
        case MessageType.SUBSCRIBE:
            topics, problems = _topic_list(kind, message, limits)
            return Subscribe(topics, problems)
        case MessageType.UNSUBSCRIBE:
            topics, problems = _topic_list(kind, message, limits)
            return Unsubscribe(topics, problems)
        case MessageType.PUBLISH:
            topic = message.get("topic")
            if topic is None or topic == "":
                raise MalformedFrame("publish: missing 'topic'")
            if not isinstance(topic, str):
                raise MalformedFrame(f"publish: 'topic' must be a string, got {type_name(topic)}")
            _check_length(kind, topic, limits)
            return Publish(topic, message)
        case MessageType.PING:
            return Ping()
        case _:
            raise UnknownCommand(f"unknown type {clip(kind)!r}")


def _topic_list(
    kind: str, message: dict[str, Any], limits: TopicLimits
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    raw = message.get("topics")
    if raw is None:
        raise MalformedFrame(f"{kind}: missing 'topics'")
    if not isinstance(raw, list):
        raise MalformedFrame(f"{kind}: 'topics' must be a list, got {type_name(raw)}")
    topics: list[str] = []
    problems: list[str] = []
    for index, topic in enumerate(raw):
        if not isinstance(topic, str):
            problems.append(f"topics[{index}] is {type_name(topic)}, not a string")
        elif topic == "":
            problems.append(f"topics[{index}] is empty")
        elif len(topic) > limits.max_topic_length:
            problems.append(f"topics[{index}] is longer than {limits.max_topic_length} characters")
        else:
            topics.append(topic)
    return tuple(topics), tuple(problems)


def _check_length(kind: str, topic: str, limits: TopicLimits) -> None:
    if len(topic) > limits.max_topic_length:
        raise ClientError(f"{kind}: topic longer than {limits.max_topic_length} characters")


def encode_publish(message: dict[str, Any], clients: int, origin: str) -> bytes:
    """The outbound publish: the client's whole object plus ``clients`` and ``_origin``.

    Encoded once per publish and written as-is to every recipient (local and remote).
    """
    return jsonwire.dumps({**message, "clients": clients, "_origin": origin})


def encode_error(message: str) -> bytes:
    return jsonwire.dumps({"type": MessageType.ERROR, "message": message})


def rate_limited_error(rate: float) -> bytes:
    return encode_error(f"rate limit exceeded ({rate:g} messages/s); messages dropped")


def skipped_entries_error(kind: str, problems: tuple[str, ...]) -> bytes:
    return encode_error(f"{kind}: skipped " + "; ".join(problems))


INTERNAL_ERROR = encode_error("internal error")
UNAVAILABLE = encode_error("the cluster is unavailable; try again")


def answer(error: Exception) -> Answer:
    """How the topics protocol answers an error: an error frame; the connection stays open."""
    if isinstance(error, ClientError):
        return Reply(encode_error(error.message))
    if isinstance(error, BackendUnavailable):
        return Reply(UNAVAILABLE)
    return Reply(INTERNAL_ERROR)
