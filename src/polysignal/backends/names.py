"""Every name the cluster uses on its Bus and in its LeaseStore (docs/redis.md, "What
polysignal keeps in Redis").

``P`` is the prefix (``SIGNAL_CHANNEL``, default ``signal:publish``). Every name is built by one
function, ``redis_name``: the parts are joined with ``:``, every part but the last has ``%`` and
``:`` percent-encoded, and the last part (a topic, a node id, a claimed id) is kept verbatim. So
any string can be a topic, two different topics never share a name, and Flow-Like's presence key
stays exactly ``topic:presence:{topic}``.
"""

from __future__ import annotations

import functools

from polysignal.backends.base import TOPICS


def escape(part: str) -> str:
    """``part`` with ``%`` and ``:`` percent-encoded, so it cannot contain a separator."""
    if "%" in part or ":" in part:
        return part.replace("%", "%25").replace(":", "%3A")
    return part


def redis_name(*parts: str) -> str:
    """The one naming function: parts joined by ``:``, all but the last escaped.

    The last part is kept verbatim (it is unambiguous at the tail), which keeps Flow-Like's
    ``topic:presence:{topic}`` exact for any topic, colons included.
    """
    return ":".join([*map(escape, parts[:-1]), parts[-1]])


def presence_key(namespace: str, topic: str) -> str:
    """``topic:presence:{topic}`` for the topics protocol, ``{namespace}:presence:{topic}`` else:
    the key of every node's count of ``topic`` (not prefixed: Flow-Like's fixed names)."""
    if namespace == TOPICS:
        return "topic:presence:" + topic  # redis_name("topic", "presence", topic), per change
    return redis_name(namespace, "presence", topic)


@functools.lru_cache(maxsize=65536)
def topic_channel(prefix: str, namespace: str, topic: str) -> bytes:
    """``P:t:{namespace}:{topic}``: the channel of a topic's publishes."""
    return f"{prefix}:{redis_name('t', namespace, topic)}".encode()


class Names:
    """The names of one cluster (one prefix) that are not a topic's channel or count key."""

    __slots__ = ("alive_prefix", "prefix", "presence_channel")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.presence_channel = f"{prefix}:presence".encode()
        """``P:presence``: every node's presence notices."""
        self.alive_prefix = f"{prefix}:alive:"
        """``P:alive:`` + node id: the key that says a node is alive."""

    def direct(self, node_id: str) -> bytes:
        """``P:direct:{node}``: the channel of direct messages to one node."""
        return f"{self.prefix}:{redis_name('direct', node_id)}".encode()

    def claim(self, key: str) -> str:
        """``P:claim:{id}``: a claimed id's key."""
        return f"{self.prefix}:{redis_name('claim', key)}"

    def alive(self, node_id: str) -> str:
        return self.alive_prefix + node_id


EPOCH = "polysignal:epoch"
"""Set by the first node that finds it missing: Redis is new or lost its data (a restart
without persistence). Not prefixed: a restart empties every cluster that shares the Redis."""
SETTLING = "polysignal:settling"
"""Lives for the settle grace after ``EPOCH`` was found missing: while it exists, nodes claim
only what they held before (docs/redis.md, "Faults")."""
