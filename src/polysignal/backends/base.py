"""The cluster seam: everything a protocol needs from "the cluster", nothing more.

A node's server layer keeps its own local registries and delivers to local connections itself;
the backend carries what must cross nodes:

* topic fan-out: ``publish`` sends an already-encoded frame to the *other* nodes that have
  subscribers for the topic; frames from other nodes arrive at the handler registered with
  ``on_topic_message`` for the topic's namespace. A node never receives its own publish back.
* presence: ``local_count_changed`` reports this node's subscriber count of a topic;
  ``topic_clients`` answers the cluster-wide count.

* direct delivery: ``send_direct`` hands bytes to a named node's handler for ``kind``.
* id claims: ``claim``/``renew``/``release``/``lookup`` (and ``claimed``, a listing by prefix)
  of cluster-wide ids with TTL leases and owner tokens (a registry id -> node). While the
  backing service is unreachable these raise ``BackendUnavailable``; a lease that cannot be
  released expires by itself. When the service comes back, this node's claims are claimed again
  before anything else, and new claims and lookups wait until the other nodes have had time to
  do the same (``on_claim_lost`` tells of a claim found held by another holder meanwhile); see
  docs/redis.md, "Faults".

Topics live in namespaces, one per protocol that uses them (``TOPICS`` for the topics protocol,
whose Redis keys are Flow-Like's ``topic:presence:{topic}``); the same topic name in two
namespaces is two different topics.

Propagation is asynchronous on a real bus: a subscription (``local_count_changed``) takes
effect on other nodes a moment later. ``sync`` waits until everything this node changed so far
is visible to the others; once a node's presence for a topic is visible, it receives every
later publish to that topic.

One class implements all of it: ``Cluster`` (cluster.py), over the two small interfaces an
implementation provides (interfaces.py): a ``Bus`` that moves bytes on channels and a
``LeaseStore`` that keeps keys with owner tokens and TTLs. ``memory.py`` provides them in-process
(one process; several in-process nodes may share a ``MemoryBus``, which is how the contract tests
exercise multi-node semantics without Redis) and ``redis.py`` on Redis.
See docs/architecture.md, "The cluster seam".
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from polysignal.core.errors import BackendUnavailable, ClientError
from polysignal.logs import Throttle, more

TopicHandler = Callable[[str, bytes], None]
"""Called with (topic, frame) for a frame published on another node."""

TOPICS = "topics"
"""The namespace of the topics protocol; other protocols use their own (e.g. "rooms")."""

DirectHandler = Callable[[str, bytes], "Awaitable[None] | None"]
"""Called with (origin node id, payload) for a direct message of one ``kind``."""

ClaimLostHandler = Callable[[str, str, "Claim | None"], None]
"""Called with (key, token, holder) for a claim of this node that another holder had taken by
the time the backend came back (the claim is no longer this node's)."""

log = logging.getLogger("polysignal.backend")

__all__ = [
    "TOPICS",
    "Backend",
    "BackendUnavailable",
    "Claim",
    "ClaimLostHandler",
    "DirectHandler",
    "TopicHandler",
]


@dataclass(frozen=True, slots=True)
class Claim:
    """Who holds a claimed id: the node it is connected to and the holder's owner token."""

    node_id: str
    token: str


class Backend(ABC):
    """Interface every backend implements; see the module docstring for the semantics."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._topic_handlers: dict[str, TopicHandler] = {}
        self._direct_handlers: dict[str, DirectHandler] = {}
        self._ready_handlers: list[Callable[[], None]] = []
        self._claim_lost_handlers: list[ClaimLostHandler] = []
        self._throttle = Throttle()

    # --- lifecycle ---
    @abstractmethod
    async def start(self) -> None:
        """Connect; must not raise when the backing service is down (keep retrying instead)."""

    @abstractmethod
    async def close(self) -> None:
        """Remove this node's presence and claims at once, then disconnect."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True when cross-node operations currently work (``/readyz``)."""

    def on_ready(self, handler: Callable[[], None]) -> None:
        """Call ``handler`` each time the backend becomes usable: at start, and when it comes
        back after an outage (this node's state is re-asserted by then; leases use it)."""
        self._ready_handlers.append(handler)

    def on_claim_lost(self, handler: ClaimLostHandler) -> None:
        """Call ``handler(key, token, holder)`` for each claim of this node found held by
        another holder when the backend comes back (before the backend counts as ready)."""
        self._claim_lost_handlers.append(handler)

    def _claim_lost(self, key: str, token: str, holder: Claim | None) -> None:
        for handler in self._claim_lost_handlers:
            try:
                handler(key, token, holder)
            except Exception:
                log.exception("a claim-lost handler failed")

    def _became_ready(self) -> None:
        for handler in self._ready_handlers:
            try:
                handler()
            except Exception:
                log.exception("a ready handler failed")

    @abstractmethod
    async def sync(self) -> None:
        """Wait until every change this node made so far is visible to the other nodes, and
        this node has applied every presence change the others had made visible before.

        Raises ``BackendUnavailable`` when the backing service is unreachable.
        """

    # --- topic fan-out and presence ---
    def on_topic_message(self, handler: TopicHandler, namespace: str = TOPICS) -> None:
        self._topic_handlers[namespace] = handler

    @abstractmethod
    def local_count_changed(self, topic: str, count: int, namespace: str = TOPICS) -> None:
        """This node now has ``count`` local subscribers of ``topic`` (0 = none). Never blocks."""

    @abstractmethod
    async def topic_clients(self, topic: str, local_count: int, namespace: str = TOPICS) -> int:
        """Cluster-wide subscriber count of ``topic``; ``local_count`` is this node's own."""

    @abstractmethod
    async def publish(self, topic: str, frame: bytes, namespace: str = TOPICS) -> None:
        """Deliver ``frame`` to the subscribers of ``topic`` on every *other* node."""

    # Without waiting: the paths a publish takes, so local delivery never waits for the cluster
    # and the server's hot path needs no task.
    @abstractmethod
    def topic_clients_nowait(self, topic: str, local_count: int, namespace: str = TOPICS) -> int:
        """The best known cluster-wide count of ``topic``, at once: the cached count (kept
        current by the other nodes' notices; one older than the cache's TTL is re-read in the
        background for the next caller), or ``local_count`` while nothing else is known."""

    def publish_nowait(self, topic: str, frame: bytes, namespace: str = TOPICS) -> bool:
        """``publish`` when it needs no wait (False: nothing was done; await ``publish``)."""
        return False

    # --- direct delivery ---
    def on_direct(self, kind: str, handler: DirectHandler) -> None:
        self._direct_handlers[kind] = handler

    @abstractmethod
    async def send_direct(self, node_id: str, kind: str, payload: bytes) -> bool:
        """Hand ``payload`` to ``node_id``'s handler for ``kind``; False if it cannot be sent."""

    # --- id claims ---
    @abstractmethod
    async def claim(self, key: str, token: str, ttl: float) -> bool:
        """Claim ``key`` for this node, atomically; succeeds if free, expired or held by ``token``
        (a takeover by the same owner, e.g. after a reconnect to another node). A new claim
        waits while the backend settles after coming back empty (docs/redis.md, "Faults")."""

    @abstractmethod
    async def renew(self, key: str, token: str, ttl: float) -> bool:
        """Extend the lease of a claim held with ``token``; False if it is no longer ours."""

    @abstractmethod
    async def release(self, key: str, token: str) -> bool:
        """Drop the claim if ``token`` holds it; False otherwise."""

    @abstractmethod
    async def lookup(self, key: str) -> Claim | None:
        """Who holds ``key``, or None (waits, as a new claim does, while the backend settles)."""

    @abstractmethod
    async def claimed(self, prefix: str, limit: int) -> list[str]:
        """The claimed keys that start with ``prefix``, cluster-wide, at most ``limit`` of them,
        in no particular order (a listing: SCAN on Redis, so keep it off hot paths)."""

    # --- helpers for implementations: the one guard around what other nodes send ---
    def _deliver_topic(self, namespace: str, topic: str, frame: bytes) -> None:
        handler = self._topic_handlers.get(namespace)
        if handler is None:
            return
        try:
            handler(topic, frame)
        except Exception as exc:
            self._dropped(f"{namespace} publish", "another node", exc)

    async def _deliver_direct(self, origin: str, kind: str, payload: bytes) -> None:
        rest = self._deliver_direct_now(origin, kind, payload)
        if rest is not None:
            await rest

    def _deliver_direct_now(
        self, origin: str, kind: str, payload: bytes
    ) -> Coroutine[Any, Any, None] | None:
        """Run the handler of ``kind`` at once, as topic frames are delivered, so a node's
        publishes and direct messages are handled in the order they were sent; what it still
        has to wait for is returned as a coroutine to run as a task."""
        handler = self._direct_handlers.get(kind)
        if handler is None:
            log.debug("direct message of unknown kind %r from %s dropped", kind, origin)
            return None
        try:
            result = handler(origin, payload)
        except Exception as exc:
            self._dropped(f"{kind} message", f"node {origin}", exc)
            return None
        if result is None:
            return None
        return self._finish_direct(result, origin, kind)

    async def _finish_direct(self, result: Awaitable[None], origin: str, kind: str) -> None:
        try:
            await result
        except Exception as exc:
            self._dropped(f"{kind} message", f"node {origin}", exc)

    def _dropped(self, what: str, origin: str, exc: Exception) -> None:
        """A message from another node failed: malformed (a WARNING, never an ERROR: another
        node's bytes are not this node's bug), or a handler's bug (ERROR with its traceback);
        each at most once per interval per kind."""
        if isinstance(exc, ClientError):
            held = self._throttle.allow(("malformed", what))
            if held is not None:
                log.warning("dropped a malformed %s from %s: %s%s", what, origin, exc, more(held))
            return
        held = self._throttle.allow(("failed", what))
        if held is not None:
            log.error("handling a %s from %s failed%s", what, origin, more(held), exc_info=exc)
