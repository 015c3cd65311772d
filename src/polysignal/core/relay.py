"""Relay rules without I/O (docs/protocols/relay.md): who is introduced to whom, and held pipes.

* ``Directory``: each peer's document ids (in join order) and each document's peers, so a Join
  finds every peer sharing a document in O(the joiner's documents) instead of scanning all peers.
  ``join`` returns the introductions to send: for every other peer B sharing any document with A,
  A is introduced to B and B to A with the *full* list of documents they share, in A's order — on
  every Join, even one that adds nothing, as the originals do (clients dedupe per peer and key).
* ``HoldBuffer``: the frames a ``/connection`` socket sends before its peer arrives, bounded in
  bytes (the originals buffer without limit).
* Names and tokens of the cluster-wide claims of peer ids and pipe rendezvous.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from polysignal.core.errors import LimitExceeded


@dataclass(frozen=True, slots=True)
class Introduction:
    """Tell ``to`` that ``peer`` shares ``documents`` with it."""

    to: str
    peer: str
    documents: tuple[str, ...]


class DocumentLimitExceeded(LimitExceeded):
    def __init__(self, limit: int) -> None:
        super().__init__(f"a peer may join at most {limit} document ids")


class Directory:
    """The document ids of the peers connected to one node."""

    def __init__(self, max_documents: int = 0) -> None:
        self.max_documents = max_documents
        self._documents: dict[str, dict[str, None]] = {}  # peer -> its documents, ordered
        self._peers: dict[str, dict[str, None]] = {}  # document -> its peers, ordered

    def join(
        self, peer: str, documents: Iterable[str], leave: Iterable[str] = ()
    ) -> tuple[list[str], list[str], list[Introduction]]:
        """Apply ``dedupe(current + documents) - leave`` for ``peer``, as the originals do.

        Returns (documents newly held, documents dropped, introductions). Raises
        DocumentLimitExceeded, changing nothing, when the peer would hold too many documents.
        """
        own = self._documents.get(peer, {})
        leaving = set(leave)
        wanted = dict(own)
        for doc in documents:
            wanted.setdefault(doc, None)
        for doc in leaving:
            wanted.pop(doc, None)
        if self.max_documents and len(wanted) > self.max_documents:
            raise DocumentLimitExceeded(self.max_documents)
        added = [doc for doc in wanted if doc not in own]
        removed = [doc for doc in own if doc not in wanted]
        self._set(peer, own, wanted, added, removed)
        return added, removed, self.introductions(peer)

    def leave(self, peer: str, documents: Iterable[str]) -> list[str]:
        """Drop ``documents`` from ``peer``'s set; returns the ones it held. Nobody is told."""
        own = self._documents.get(peer)
        if not own:
            return []
        leaving = set(documents)
        wanted = {doc: None for doc in own if doc not in leaving}
        removed = [doc for doc in own if doc in leaving]
        self._set(peer, own, wanted, [], removed)
        return removed

    def remove(self, peer: str) -> list[str]:
        """Forget ``peer`` (its socket closed); returns the documents it held."""
        own = self._documents.get(peer)
        if not own:
            return []
        removed = list(own)
        self._set(peer, own, {}, [], removed)
        return removed

    def _set(
        self,
        peer: str,
        own: dict[str, None],
        wanted: dict[str, None],
        added: list[str],
        removed: list[str],
    ) -> None:
        for doc in added:
            self._peers.setdefault(doc, {})[peer] = None
        for doc in removed:
            members = self._peers.get(doc)
            if members is not None:
                members.pop(peer, None)
                if not members:
                    del self._peers[doc]
        if wanted:
            self._documents[peer] = wanted
        else:
            self._documents.pop(peer, None)

    def introductions(self, peer: str) -> list[Introduction]:
        """Both introductions for every other peer sharing a document with ``peer``."""
        own = self._documents.get(peer)
        if not own:
            return []
        others: dict[str, None] = {}
        for doc in own:
            for other in self._peers.get(doc, {}):
                if other != peer:
                    others.setdefault(other, None)
        result: list[Introduction] = []
        for other in others:
            common = self.common(other, own)
            result.append(Introduction(peer, other, common))
            result.append(Introduction(other, peer, common))
        return result

    def remote_introductions(
        self, peer: str, joined: tuple[str, ...], documents: tuple[str, ...], via: str
    ) -> list[Introduction]:
        """Introductions for a Join of ``peer`` on another node, received through ``via``'s topic.

        The announcement reaches this node once per joined document it has peers for; each local
        peer is handled only through the first joined document it holds, so it is introduced once.
        Returned items introduce ``peer`` to local peers (``to`` is local); the caller also sends
        the reverse introduction to ``peer``'s node.
        """
        result: list[Introduction] = []
        for other in self._peers.get(via, {}):
            if other == peer:
                continue
            held = self._documents[other]
            first = next((doc for doc in joined if doc in held), None)
            if first != via:
                continue
            common = tuple(doc for doc in documents if doc in held)
            if common:
                result.append(Introduction(other, peer, common))
        return result

    def common(self, peer: str, documents: Iterable[str]) -> tuple[str, ...]:
        """The ``documents`` that ``peer`` holds, in the order given."""
        own = self._documents.get(peer, {})
        return tuple(doc for doc in documents if doc in own)

    def documents_of(self, peer: str) -> tuple[str, ...]:
        return tuple(self._documents.get(peer, ()))

    def count(self, document: str) -> int:
        """Local peers holding ``document`` (the node's presence in the document's topic)."""
        return len(self._peers.get(document, ()))

    def __contains__(self, peer: object) -> bool:
        return peer in self._documents


@dataclass
class HoldBuffer:
    """Frames (opcode, payload) sent by a held ``/connection`` socket, at most ``limit`` bytes."""

    limit: int
    frames: list[tuple[int, bytes]] = field(default_factory=list)
    size: int = 0

    def add(self, opcode: int, payload: bytes) -> None:
        """Keep the frame; raise LimitExceeded (keeping nothing more) past ``limit`` bytes."""
        if self.limit and self.size + len(payload) > self.limit:
            raise LimitExceeded(
                f"relay buffer full: more than {self.limit} bytes sent before the peer connected"
            )
        self.frames.append((opcode, payload))
        self.size += len(payload)

    def take(self) -> list[tuple[int, bytes]]:
        frames, self.frames, self.size = self.frames, [], 0
        return frames


# --- cluster-wide names ---------------------------------------------------------------------------


def peer_claim_key(peer: str) -> str:
    """The claim that makes one ``/introduction/{peer}`` socket the current one, cluster-wide."""
    return "relay:peer:" + orjson.dumps(peer).decode()


def pipe_claim_key(a: str, b: str, key: str) -> str:
    """The rendezvous of ``/connection/{a}/{b}/{key}`` and ``/connection/{b}/{a}/{key}``: one name
    for both directions, so whichever arrives first holds it and the other finds it."""
    low, high = sorted((a, b))
    return "relay:pipe:" + orjson.dumps([key, low, high]).decode()


@dataclass(frozen=True, slots=True)
class PipeToken:
    """The owner token of a held pipe: which side holds it (``seeker`` = its ``{a}``) and the
    holding socket's end id, so the other side can tell a reciprocal from a duplicate."""

    seeker: str
    end: str

    def encode(self) -> str:
        return orjson.dumps([self.seeker, self.end]).decode()

    @classmethod
    def decode(cls, token: str) -> PipeToken | None:
        try:
            value = orjson.loads(token)
        except orjson.JSONDecodeError:
            return None
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return cls(value[0], value[1])
        return None
