"""Topic registry: topic -> subscribers, and each subscriber's own topics.

The reverse index makes removing a closed connection cost O(its own topics), as in y-webrtc's
``bin/server.js``. Subscribers are any hashable handle (the server uses its connection objects).
Every mutation returns the topics whose *local* subscriber count changed, so the caller can tell
the backend (presence, channel subscriptions) without recounting. A topic already held is not
subscribed twice (docs/protocols/topics.md, "Messages").
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

from polysignal.core.errors import LimitExceeded

S = TypeVar("S", bound=Hashable)


class TopicRegistry(Generic[S]):
    """Local subscriptions of one node."""

    def __init__(self, max_topics_per_subscriber: int = 0) -> None:
        self.max_topics_per_subscriber = max_topics_per_subscriber
        self._subscribers: dict[str, set[S]] = {}
        self._topics: dict[S, set[str]] = {}

    def subscribe(self, subscriber: S, topics: Iterable[str]) -> list[str]:
        """Add ``subscriber`` to each topic; return the topics it newly joined.

        Topics it already holds are no-ops (never counted twice). Raises LimitExceeded, after
        subscribing as many as fit, when the per-subscriber limit would be passed.
        """
        own = self._topics.setdefault(subscriber, set())
        added: list[str] = []
        refused = 0
        for topic in topics:
            if topic in own:
                continue
            if self.max_topics_per_subscriber and len(own) >= self.max_topics_per_subscriber:
                refused += 1
                continue
            own.add(topic)
            self._subscribers.setdefault(topic, set()).add(subscriber)
            added.append(topic)
        if not own:
            del self._topics[subscriber]
        if refused:
            raise TopicLimitExceeded(added, refused, self.max_topics_per_subscriber)
        return added

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
        return removed

    def remove(self, subscriber: S) -> list[str]:
        """Forget ``subscriber`` everywhere (it closed); return the topics it left."""
        own = self._topics.pop(subscriber, None)
        if not own:
            return []
        for topic in own:
            self._drop(topic, subscriber)
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
    """Some topics were refused because the subscriber holds the maximum already."""

    def __init__(self, added: list[str], refused: int, limit: int) -> None:
        super().__init__(
            f"subscribe: {refused} topic(s) refused, a connection may hold at most {limit} topics"
        )
        self.added = added
        self.refused = refused
