"""Topic registry: topic -> subscribers, and each subscriber's own topics.

The reverse index makes removing a closed connection cost O(its own topics), as in y-webrtc's
``bin/server.js``. Subscribers are any hashable handle (the server uses its connection objects).
Every mutation returns the topics whose *local* subscriber count changed, so the caller can tell
the backend (presence, channel subscriptions) without recounting. A topic already held is not
subscribed twice (docs/protocols/topics.md, "Messages").

Two bounds: topics per subscriber (``MAX_TOPICS_PER_CONNECTION``) and topics held by all the
subscribers of one client address together (``MAX_TOPICS_PER_ADDRESS``), so that one address
with many connections cannot hold more than its share of the node's memory.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

from polysignal.core.errors import LimitExceeded
from polysignal.protocols import topics as proto

if TYPE_CHECKING:
    from polysignal.core.auth import Identity

S = TypeVar("S", bound=Hashable)


class TopicRegistry(Generic[S]):
    """Local subscriptions of one node."""

    def __init__(self, max_topics_per_subscriber: int = 0, max_topics_per_address: int = 0) -> None:
        self.max_topics_per_subscriber = max_topics_per_subscriber
        self.max_topics_per_address = max_topics_per_address
        self._subscribers: dict[str, set[S]] = {}
        self._topics: dict[S, set[str]] = {}
        self._address: dict[S, str] = {}  # of subscribers holding topics, when given
        self._held: dict[str, int] = {}  # address -> topics its subscribers hold together

    def subscribe(self, subscriber: S, topics: Iterable[str], address: str = "") -> list[str]:
        """Add ``subscriber`` (of client ``address``, if given) to each topic; return the topics
        it newly joined.

        Topics it already holds are no-ops (never counted twice). Raises TopicLimitExceeded,
        after subscribing as many as fit, when a limit would be passed.
        """
        own = self._topics.setdefault(subscriber, set())
        per_subscriber = self.max_topics_per_subscriber
        per_address = self.max_topics_per_address if address else 0
        held = self._held.get(address, 0)
        added: list[str] = []
        refused = 0
        scope = ""
        for topic in topics:
            if topic in own:
                continue
            if per_subscriber and len(own) >= per_subscriber:
                refused, scope = refused + 1, scope or "connection"
                continue
            if per_address and held >= per_address:
                refused, scope = refused + 1, scope or "address"
                continue
            own.add(topic)
            self._subscribers.setdefault(topic, set()).add(subscriber)
            added.append(topic)
            held += 1
        if address and added:
            self._held[address] = held
            self._address[subscriber] = address
        if not own:
            del self._topics[subscriber]
        if refused:
            limit = per_subscriber if scope == "connection" else per_address
            raise TopicLimitExceeded(added, refused, limit, scope)
        return added

    def _release(self, subscriber: S, count: int, forget: bool) -> None:
        """``subscriber`` holds ``count`` topics fewer (``forget``: none any more)."""
        address = self._address.pop(subscriber, None) if forget else self._address.get(subscriber)
        if address is None or not count:
            return
        left = self._held[address] - count
        if left:
            self._held[address] = left
        else:
            del self._held[address]

    def held_by(self, address: str) -> int:
        """Topics the subscribers of ``address`` hold together."""
        return self._held.get(address, 0)

    def unsubscribe(self, subscriber: S, topics: Iterable[str]) -> list[str]:
        """Remove ``subscriber`` from each topic it holds; return the topics it left."""
        own = self._topics.get(subscriber)
        if not own:
            return []
        removed: list[str] = []
        for topic in topics:
            if topic in own:
                own.discard(topic)
                self._drop(topic, subscriber)
                removed.append(topic)
        if not own:
            del self._topics[subscriber]
        self._release(subscriber, len(removed), forget=not own)
        return removed

    def remove(self, subscriber: S) -> list[str]:
        """Forget ``subscriber`` everywhere (it closed); return the topics it left."""
        own = self._topics.pop(subscriber, None)
        if not own:
            return []
        for topic in own:
            self._drop(topic, subscriber)
        self._release(subscriber, len(own), forget=True)
        return list(own)

    def _drop(self, topic: str, subscriber: S) -> None:
        members = self._subscribers.get(topic)
        if members is None:
            return
        members.discard(subscriber)
        if not members:
            del self._subscribers[topic]

    def subscribers(self, topic: str) -> frozenset[S] | set[S]:
        """The local subscribers of ``topic`` (do not mutate)."""
        members = self._subscribers.get(topic)
        return members if members is not None else frozenset()

    def topics_of(self, subscriber: S) -> frozenset[str] | set[str]:
        own = self._topics.get(subscriber)
        return own if own is not None else frozenset()

    def count(self, topic: str) -> int:
        members = self._subscribers.get(topic)
        return len(members) if members else 0

    def topics(self) -> list[str]:
        """Every topic with at least one local subscriber."""
        return list(self._subscribers)

    def __len__(self) -> int:
        return len(self._subscribers)


class TopicLimitExceeded(LimitExceeded):
    """Some topics were refused because the subscriber, or its address, holds the maximum."""

    def __init__(
        self, added: list[str], refused: int, limit: int, scope: str = "connection"
    ) -> None:
        holder = "a connection" if scope == "connection" else "the connections of one address"
        super().__init__(
            f"subscribe: {refused} topic(s) refused, {holder} may hold at most {limit} topics"
        )
        self.added = added
        self.refused = refused


class TopicsRules(Generic[S]):
    """The topics protocol's rules for commands that change subscriptions, on one node
    (docs/protocols/topics.md): which topics a subscriber gets, within its limits and what its
    token allows, and what it is told about the rest. Each call returns the frames to send the
    subscriber, in order, and the topics whose local count changed (for the backend's presence
    and channel subscriptions). A publish is the hub's: its fan-out writes to sockets."""

    def __init__(self, registry: TopicRegistry[S]) -> None:
        self.registry = registry

    def subscribe(
        self,
        subscriber: S,
        cmd: proto.Subscribe,
        address: str = "",
        identity: Identity | None = None,
    ) -> tuple[list[bytes], list[str]]:
        """``subscribe``: the topics ``identity`` allows (all without one), as many as fit."""
        answers: list[bytes] = []
        topics = cmd.topics
        if identity is not None:
            topics, refused = identity.split_topics(topics)
            if refused:
                answers.append(proto.encode_error(refused_topics_error("subscribe", refused)))
        try:
            added = self.registry.subscribe(subscriber, topics, address)
        except TopicLimitExceeded as exc:
            added = exc.added
            answers.append(proto.encode_error(exc.message))
        if cmd.problems:
            answers.append(proto.skipped_entries_error("subscribe", cmd.problems))
        return answers, added

    def unsubscribe(self, subscriber: S, cmd: proto.Unsubscribe) -> tuple[list[bytes], list[str]]:
        """``unsubscribe``: the topics it holds of ``cmd``'s; entries that were not topics told."""
        removed = self.registry.unsubscribe(subscriber, cmd.topics)
        if cmd.problems:
            return [proto.skipped_entries_error("unsubscribe", cmd.problems)], removed
        return [], removed

    @staticmethod
    def publish_refusal(identity: Identity | None, topic: str) -> bytes | None:
        """The error frame of a publish on a topic ``identity`` does not allow; None to go on."""
        if identity is None or identity.may_use_topic(topic):
            return None
        return proto.encode_error(refused_topics_error("publish", (topic,)))


def refused_topics_error(kind: str, refused: tuple[str, ...]) -> str:
    """The error text of topics a token does not allow (the first three named)."""
    named = ", ".join(repr(topic[:100]) for topic in refused[:3])
    more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
    return f"{kind}: topic {named}{more} not allowed for this token"
