"""What an implementation of the cluster provides: a ``Bus`` and a ``LeaseStore``
(docs/architecture.md, "The cluster seam").

Both only move bytes and keys. Every semantic of the cluster seam (presence arithmetic and its
cache, the origin envelope, direct dispatch, ``sync``, re-assertion after an outage, the outbox)
is the ``Cluster``'s (cluster.py), written once over these two. ``memory.py`` implements both
in-process, ``redis.py`` on Redis; one object may implement both.

Names (channels, keys) are made by the Cluster (names.py) and used verbatim; an implementation
needs none of its own but the one it keeps its nodes' liveness under.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from polysignal.backends.base import Claim

Listener = Callable[[bytes, bytes], None]
"""Called with (channel, data) for each message the Bus receives, in the order it arrived."""


class Bus(ABC):
    """Publish bytes on named channels; receive those of the channels this node subscribes to.

    One connection at a time, driven by the Cluster: ``connect``, then ``serve`` (running) while
    it lasts, and ``disconnect`` after it failed or at the end. A new connection starts with no
    subscriptions. Messages published on one channel arrive in the order they were published,
    and a publisher that subscribes to the channel gets its own messages too.
    """

    name: str = "bus"
    """Its name in log lines and messages (its connection lines go to ``polysignal.<name>``)."""
    where: str = ""
    """Where it connects to, for log lines (a URL without its password)."""
    in_process: bool = False
    """An in-process bus: nothing is lost, ``publish`` completes without waiting, ``settled``
    answers, and connecting cannot fail (unless a fault test stops its net)."""

    @abstractmethod
    def listen(self, listener: Listener) -> None:
        """Hand every received message to ``listener`` (which does not raise for bad data)."""

    @abstractmethod
    async def connect(self) -> None:
        """Open a connection; raises when it cannot (within the implementation's timeout)."""

    @abstractmethod
    async def serve(self) -> None:
        """Run the open connection: hand messages to the listener, confirm (un)subscribes,
        check that it is alive. Raises when the connection is lost; never returns otherwise."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Drop the connection; subscribes and unsubscribes still waiting fail with
        ``BackendUnavailable``. Publishing may still work until then, also after ``serve``
        was cancelled."""

    @abstractmethod
    async def subscribe(self, channels: Sequence[bytes]) -> None:
        """Subscribe to ``channels``, batched; returns once every one is confirmed: a message
        published after that reaches this node."""

    @abstractmethod
    async def unsubscribe(self, channels: Sequence[bytes]) -> None:
        """Unsubscribe from ``channels``, batched; returns once every one is confirmed.
        Messages published before may still arrive."""

    @abstractmethod
    async def publish(self, channels: Sequence[bytes], payloads: Sequence[bytes]) -> list[int]:
        """Publish ``payloads[i]`` on ``channels[i]``, in order, as one batch (one round trip
        where the implementation can); answers how many subscribers received each one."""

    def settled(self) -> bool:
        """True when every message that reached this node has been handed to the listener.
        An implementation that cannot tell answers False."""
        return False


class LeaseStore(ABC):
    """Keys held with an owner token and a TTL (claims), and per-node counts of keys with a TTL
    (presence), read only for nodes that are alive.

    While the store cannot be reached every method raises ``BackendUnavailable`` and changes
    nothing.
    """

    # --- claims ---
    @abstractmethod
    async def claim(self, key: str, token: str, node_id: str, ttl: float) -> bool:
        """Hold ``key`` for ``node_id`` with ``token`` for ``ttl`` seconds, atomically; succeeds
        if it is free, expired, or held with the same token (the holder's node is replaced)."""

    @abstractmethod
    async def renew(self, key: str, token: str, ttl: float) -> bool:
        """Hold ``key`` for ``ttl`` more seconds if ``token`` holds it."""

    @abstractmethod
    async def release(self, key: str, token: str, node_id: str | None = None) -> bool:
        """Drop ``key`` if ``token`` (and, if given, ``node_id``) holds it."""

    @abstractmethod
    async def lookup(self, key: str) -> Claim | None:
        """The node and token holding ``key``, or None."""

    @abstractmethod
    async def claimed(self, prefix: str, limit: int) -> list[str]:
        """The keys held now that start with ``prefix``, at most ``limit`` of them, in no
        particular order."""

    @abstractmethod
    async def reclaim(
        self, claims: Mapping[str, tuple[str, float]], releases: Mapping[str, str], node_id: str
    ) -> dict[str, Claim | None]:
        """As one batch (when a node is connected again): claim each key of ``claims`` again for
        ``node_id`` with its (token, ttl), and release each key of ``releases`` that its token
        still holds. Answers, for each key of ``claims`` another token holds now, its holder
        (that key is not claimed)."""

    @abstractmethod
    async def settle(self, grace: float) -> float:
        """Called by each node when it connects: if the store has lost what it kept (it is new,
        or came back empty), start a settling window of ``grace`` seconds for every node.
        Answers the seconds left of the window (0 when there is none)."""

    # --- per-node counts ---
    @abstractmethod
    async def set_counts(self, node_id: str, counts: Mapping[str, int], ttl: float) -> None:
        """Set ``node_id``'s count of each key (0 deletes its count), as one batch; each key
        written lives ``ttl`` seconds unless written again. Also marks ``node_id`` alive for
        ``ttl`` seconds (``counts`` may be empty for just that)."""

    @abstractmethod
    async def read_counts(self, keys: Sequence[str]) -> list[dict[str, int]]:
        """Every alive node's count of each key, as one batch. Counts of nodes no longer alive
        are deleted here."""

    def read_counts_nowait(self, keys: Sequence[str]) -> list[dict[str, int]] | None:
        """``read_counts`` without waiting, where the store can (in-process); else None."""
        return None

    @abstractmethod
    async def remove_node(
        self, node_id: str, keys: Iterable[str], claims: Mapping[str, str]
    ) -> None:
        """At a node's stop, as one batch: its counts of ``keys``, its alive mark, and each claim
        of ``claims`` (key -> token) it still holds."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the store holds open (after ``remove_node``)."""


def first_error(group: BaseExceptionGroup[Any]) -> Exception | None:
    """The first real failure in a task group's exceptions, not the cancellations it caused."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = first_error(exc)
            if found is not None:
                return found
        elif isinstance(exc, Exception):
            return exc
    return None


def describe(exc: BaseException) -> str:
    """An exception as one log-safe phrase (redis-py messages carry host:port, never passwords)."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
