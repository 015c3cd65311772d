"""Relay rules without I/O (docs/protocols/relay.md): who is introduced to whom, and held pipes.

* ``Directory``: each peer's document ids (in join order) and each document's peers, so a Join
  finds every peer sharing a document in O(the documents it adds) instead of scanning all peers.
  ``join`` returns the introductions to send: for every other peer B sharing a document that the
  Join *adds* to A's set, A is introduced to B and B to A with the *full* list of documents they
  share, in A's order. A Join that adds nothing introduces nobody (the originals re-introduced
  on every Join, which let a client amplify a flood by the number of peers sharing its documents).
* ``HoldBuffer``: the frames a ``/connection`` socket sends before its peer arrives, bounded in
  bytes (the originals buffer without limit); each frame counts its payload plus ``FRAME_COST``.
  The machine also bounds what all held sockets of one client address hold together.
* Names and tokens of the cluster-wide claims of peer ids and pipe rendezvous.
* ``RelayNode``: the rules of one node as a state machine (``core/effects.py``): events in
  (a socket opened, a frame, another node's message, the time), effects out. A pipe's
  rendezvous with its reciprocal request runs as a generator that yields what it needs of the
  cluster (claim, lookup, release, match) and gets each answer sent back in.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

from polysignal.core.effects import (
    ClaimOp,
    Close,
    Conn,
    LookupOp,
    Presence,
    Publish,
    ReleaseOp,
    Send,
    ToNode,
)
from polysignal.core.errors import BackendUnavailable, ClientError, CloseCode, LimitExceeded
from polysignal.protocols.relay import (
    NAMESPACE,
    Announce,
    Decoded,
    Direct,
    Encoding,
    EndRef,
    Generation,
    Introduce,
    Join,
    Leave,
    encode_announce,
    encode_end,
    encode_introduce,
    encode_introduction,
)
from polysignal.protocols.websocket import OP_BINARY


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

        Returns (documents newly held, documents dropped, introductions for the documents newly
        held). Raises DocumentLimitExceeded, changing nothing, when the peer would hold too many
        documents.
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
        return added, removed, self.introductions(peer, added)

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

    def introductions(self, peer: str, via: Iterable[str]) -> list[Introduction]:
        """Both introductions for every other peer sharing one of the documents ``via`` with
        ``peer``, each with every document the two share (in ``peer``'s order)."""
        own = self._documents.get(peer)
        if not own:
            return []
        others: dict[str, None] = {}
        for doc in via:
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


FRAME_COST = 128
"""Bytes a held frame counts for beyond its payload: about what holding it costs the server (its
tuple, the bytes object's header and a list slot, ~100 bytes measured), so a flood of empty
frames cannot hold memory for free."""


@dataclass
class HoldBuffer:
    """Frames (opcode, payload) sent by a held ``/connection`` socket, at most ``limit`` bytes,
    each counted as its payload plus ``FRAME_COST`` (``size``)."""

    limit: int
    frames: list[tuple[int, bytes]] = field(default_factory=list)
    size: int = 0

    def cost(self, payload: bytes) -> int:
        """What holding ``payload`` would count; raise LimitExceeded if it does not fit."""
        cost = len(payload) + FRAME_COST
        if self.limit and self.size + cost > self.limit:
            raise LimitExceeded(
                f"relay buffer full: more than {self.limit} bytes held before the peer connected"
            )
        return cost

    def add(self, opcode: int, payload: bytes) -> int:
        """Keep the frame and return what it counts; raise LimitExceeded (keeping nothing more)
        past ``limit``."""
        cost = self.cost(payload)
        self.frames.append((opcode, payload))
        self.size += cost
        return cost

    def take(self) -> tuple[list[tuple[int, bytes]], int]:
        """Every frame held, and what they counted; the buffer is empty afterwards."""
        frames, size = self.frames, self.size
        self.frames, self.size = [], 0
        return frames, size


class AddressBufferFull(LimitExceeded):
    def __init__(self, limit: int) -> None:
        super().__init__(f"relay buffer full: more than {limit} bytes held for this address")


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


# --- the machine ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TakeLease:
    """Claim the id of ``peer`` (``key``) cluster-wide with ``token``, taking it from any other
    holder, whose socket is then evicted (``evicted`` on its node); if the lease is ever lost to
    another holder, ``evicted`` closes this socket."""

    key: str
    token: str
    peer: str


@dataclass(frozen=True, slots=True)
class DropLease:
    """Release the lease of ``key`` held with ``token`` (``forget``: stop renewing it without
    releasing it: another socket holds the key on from here)."""

    key: str
    token: str
    forget: bool = False


@dataclass(frozen=True, slots=True)
class SendFrames:
    """Write ``frames`` (opcode, payload) to ``conn`` at once, in order, and only then wait for
    its reader if it is behind: a held pipe's frames, which no frame of the now piped socket may
    overtake."""

    conn: Conn
    frames: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class StreamOpen:
    """Open this node's end ``end`` of a stream to the pipe end ``peer`` on ``node``."""

    end: str
    node: str
    peer: str


@dataclass(frozen=True, slots=True)
class StreamSend:
    """Send one frame of the pipe end ``end`` through its stream to the other node."""

    end: str
    opcode: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamClose:
    """The pipe end ``end`` closed: send what its stream holds, then tell the other end."""

    end: str


Effect = (
    Send
    | SendFrames
    | Close
    | ToNode
    | Publish
    | Presence
    | TakeLease
    | DropLease
    | StreamOpen
    | StreamSend
    | StreamClose
)


# What a rendezvous asks of the hub while it runs (the answer is sent back into it): a claim
# (``ClaimOp``; once it succeeds the hub keeps it as a lease until ``DropLease``), a lookup or a
# release (``core/effects.py``), and these:
@dataclass(frozen=True, slots=True)
class MatchOp:
    """Ask ``node`` to pipe its held end ``holder`` to this node's ``end``; answered True once it
    has (the hub opens ``end``'s stream to it first), False if it cannot, or after a while."""

    node: str
    holder: str
    end: str


@dataclass(frozen=True, slots=True)
class SettleOp:
    """Wait (bounded) until this node's end ``end`` has finished its own rendezvous."""

    end: str


@dataclass(frozen=True, slots=True)
class ApplyOp:
    """Carry these effects out now, before the rendezvous goes on."""

    effects: tuple[Effect, ...]


Op = ClaimOp | LookupOp | ReleaseOp | MatchOp | SettleOp | ApplyOp
Rendezvous = Generator[Op, Any, list[Effect]]
"""A rendezvous in progress: it yields what it needs from the hub and gets each answer back
(a failure of the cluster is thrown in as ``BackendUnavailable``); it returns the effects of its
end, once held or piped."""


class EndState(Enum):
    RENDEZVOUS = "rendezvous"  # looking for the reciprocal request
    HOLDING = "holding"  # first of the pair: buffering until the other arrives
    PIPED = "piped"
    CLOSED = "closed"


@dataclass(eq=False)
class PeerSocket:
    """The ``/introduction/{peer}`` socket of a peer on this node."""

    conn: Conn
    peer: str
    token: str
    encoding: Encoding | None = None
    generation: Generation | None = None


@dataclass(eq=False)
class PipeEnd:
    """One ``/connection/{a}/{b}/{key}`` socket on this node."""

    id: str
    conn: Conn
    a: str
    b: str
    key: str
    buffer: HoldBuffer
    address: str = ""  # the client's address: what its held bytes count against
    state: EndState = EndState.RENDEZVOUS
    partner: PipeEnd | None = None  # the other end, when it is on this node
    remote: tuple[str, str] | None = None  # (node id, end id) when it is on another node
    deadline: float | None = None  # while holding: when it gives up waiting for its peer
    closing: bool = False  # the machine closed it (a limit, its wait): it does not linger
    lingering: bool = False  # its socket closed while holding frames; they wait a little more
    claim_key: str = field(init=False)
    token: str = field(init=False)

    def __post_init__(self) -> None:
        self.claim_key = pipe_claim_key(self.a, self.b, self.key)
        self.token = PipeToken(self.a, self.id).encode()

    def __repr__(self) -> str:
        return f"<pipe {self.id} {self.state.value}>"


REPLACED_PEER = "replaced by a newer connection with the same peer id"
REPLACED_PIPE = "replaced by a newer connection request"
PEER_CLOSED = "peer closed"

LINGER_PER_ADDRESS = 64
"""Closed held sockets of one client address whose frames may linger at once (``linger``);
beyond it, a held socket that closes drops its frames at once, as the originals always do."""


class RelayNode:
    """The relay's rules on one node: introductions, pipe rendezvous, holding and piping.

    ``node_id`` names this node in the cluster; ``buffer_bytes`` and ``wait_timeout`` bound a
    held socket (``RELAY_BUFFER_BYTES``, ``RELAY_WAIT_TIMEOUT``, 0 = no limit), and
    ``address_buffer_bytes`` what all held sockets of one client address hold together
    (``RELAY_ADDRESS_BUFFER_BYTES``); ``linger`` is how long the frames of a held socket that
    closed wait for a reciprocal request already on its way (0: dropped at once); ``attempts``
    is how many times a rendezvous races other nodes before it gives up.
    """

    def __init__(
        self,
        node_id: str,
        *,
        max_documents: int = 0,
        buffer_bytes: int = 0,
        address_buffer_bytes: int = 0,
        wait_timeout: float = 0.0,
        linger: float = 0.0,
        attempts: int = 4,
    ) -> None:
        self.node_id = node_id
        self.buffer_bytes = buffer_bytes
        self.address_buffer_bytes = address_buffer_bytes
        self.wait_timeout = wait_timeout
        self.linger = linger
        self.attempts = attempts
        self.directory = Directory(max_documents)
        self.peers: dict[str, PeerSocket] = {}
        self.ends: dict[str, PipeEnd] = {}
        self.holding: dict[str, PipeEnd] = {}  # claim key -> the end held under it here
        self.held: dict[str, int] = {}  # client address -> what its held ends hold
        self.lingering: dict[str, int] = {}  # client address -> its lingering ends

    # --- introductions ---
    def peer_opened(self, conn: Conn, peer: str, token: str) -> tuple[PeerSocket, list[Effect]]:
        """``/introduction/{peer}`` opened: this socket is the peer's now, here and (once its
        lease is taken) in the cluster; an older one here is closed."""
        sock = PeerSocket(conn, peer, token)
        effects: list[Effect] = []
        old = self.peers.get(peer)
        if old is not None:
            effects += self.evicted(peer, old.token)
        self.peers[peer] = sock
        effects.append(TakeLease(peer_claim_key(peer), token, peer))
        return sock, effects

    def expect_encoding(self, sock: PeerSocket, encoding: Encoding) -> None:
        """Raise EncodingMismatch (closing ``sock``) for a frame in the other encoding than the
        connection's first decoded one, whether or not it decodes: a connection answers in the
        encoding it started with (docs/protocols/relay.md)."""
        if sock.encoding is not None and encoding is not sock.encoding:
            expected = "msgpack binary" if sock.encoding is Encoding.MSGPACK else "JSON text"
            raise EncodingMismatch(f"this connection speaks {expected} frames")

    def peer_message(self, sock: PeerSocket, decoded: Decoded, encoding: Encoding) -> list[Effect]:
        """One decoded frame of ``sock``; raises ClientError (closing it) for a frame in the
        other encoding than its first or over the document limit."""
        self.expect_encoding(sock, encoding)
        if sock.encoding is None:
            sock.encoding = encoding
        if sock.generation is None:
            sock.generation = decoded.generation
        if self.peers.get(sock.peer) is not sock:
            return []  # replaced by a newer socket (and closing): its frames no longer count
        match decoded.command:
            case Join() as join:
                return self._join(sock, join)
            case Leave() as leave:
                return self._presence(self.directory.leave(sock.peer, leave.document_ids))
        return []  # a heartbeat

    def _join(self, sock: PeerSocket, join: Join) -> list[Effect]:
        # DocumentLimitExceeded (a ClientError) leaves the peer's set unchanged and closes it.
        # Only the documents it adds introduce, here and (announced on their topics) elsewhere.
        added, removed, intros = self.directory.join(sock.peer, join.document_ids, join.leave)
        effects = self._presence(added + removed)
        for intro in intros:
            effects += self._introduce(intro)
        if added:
            documents = self.directory.documents_of(sock.peer)
            announce = encode_announce(Announce(self.node_id, sock.peer, tuple(added), documents))
            effects += [Publish(doc, announce, NAMESPACE) for doc in added]
        return effects

    def _introduce(self, intro: Introduction) -> list[Effect]:
        """``intro`` for its local recipient, in that recipient's generation."""
        sock = self.peers.get(intro.to)
        if sock is None or sock.generation is None:
            return []
        frame = encode_introduction(sock.generation, intro.peer, intro.documents)
        return [Send(sock.conn, frame, binary=sock.generation is Generation.V4)]

    def _presence(self, documents: list[str]) -> list[Effect]:
        count = self.directory.count
        return [Presence(doc, count(doc), NAMESPACE) for doc in documents]

    def peer_closed(self, sock: PeerSocket) -> list[Effect]:
        effects: list[Effect] = []
        if self.peers.get(sock.peer) is sock:
            del self.peers[sock.peer]
            effects += self._presence(self.directory.remove(sock.peer))
        # else: replaced; the newer socket's state is not ours to remove. Releasing our own
        # token is always safe: it frees the claim only if we still hold it.
        effects.append(DropLease(peer_claim_key(sock.peer), sock.token))
        return effects

    def evicted(self, peer: str, token: str) -> list[Effect]:
        """A newer socket took ``peer`` over (here, or on another node: its eviction message,
        or the peer's lease found taken): the socket holding ``token`` is closed."""
        old = self.peers.get(peer)
        if old is None or old.token != token:
            return []
        del self.peers[peer]
        effects = self._presence(self.directory.remove(peer))
        effects.append(Close(old.conn, 1000, REPLACED_PEER))
        return effects

    def announced(self, topic: str, msg: Announce) -> list[Effect]:
        """A Join on another node reached this node through ``topic``'s document."""
        if msg.node == self.node_id:
            return []
        effects: list[Effect] = []
        for intro in self.directory.remote_introductions(
            msg.peer, msg.joined, msg.documents, topic
        ):
            effects += self._introduce(intro)
            reply = encode_introduce(Introduce(msg.peer, intro.to, intro.documents))
            effects.append(ToNode(msg.node, Direct.INTRODUCE, reply))
        return effects

    def introduced(self, msg: Introduce) -> list[Effect]:
        """Another node introduces its peer to ``msg.to`` here."""
        if msg.to not in self.peers:
            return []
        common = self.directory.common(msg.to, msg.documents)
        return self._introduce(Introduction(msg.to, msg.peer, common)) if common else []

    # --- pipes ---
    def end_opened(
        self, conn: Conn, end_id: str, a: str, b: str, key: str, address: str = ""
    ) -> PipeEnd:
        """``/connection/{a}/{b}/{key}`` opened by a client at ``address``; its ``rendezvous``
        comes next."""
        end = PipeEnd(end_id, conn, a, b, key, HoldBuffer(self.buffer_bytes), address)
        self.ends[end.id] = end
        return end

    def rendezvous(self, end: PipeEnd, now: float) -> Rendezvous:
        """Hold ``end`` or pipe it to its held reciprocal, wherever that is. Through the cluster
        first; while the cluster is unreachable, on this node only."""
        try:
            return (yield from self._rendezvous_cluster(end, now))
        except BackendUnavailable:
            return self._rendezvous_locally(end, now)

    def _rendezvous_cluster(self, end: PipeEnd, now: float) -> Rendezvous:
        for _ in range(self.attempts):
            if _closed(end):
                return []
            if (yield ClaimOp(end.claim_key, end.token)):
                return self._hold(end, now)
            holder = yield LookupOp(end.claim_key)
            if holder is None:
                continue  # released in between: try to claim again
            token = PipeToken.decode(holder.token)
            if token is None:
                yield ReleaseOp(end.claim_key, holder.token)
                continue
            if token.seeker == end.a and end.a != end.b:
                # The same request again: the newer socket replaces the held one.
                yield ReleaseOp(end.claim_key, holder.token)
                if holder.node_id == self.node_id:
                    yield SettleOp(token.end)
                    yield ApplyOp(tuple(self.evict_end(token.end, REPLACED_PIPE)))
                else:
                    ref = encode_end(EndRef(token.end, reason=REPLACED_PIPE))
                    yield ApplyOp((ToNode(holder.node_id, Direct.EVICT_PIPE, ref),))
                continue
            if holder.node_id == self.node_id:
                other = self.ends.get(token.end)
                if other is not None:
                    # Its claim may have succeeded a moment before it learnt so (the reply
                    # comes on another Redis connection than ours): let it start holding.
                    yield SettleOp(other.id)
                if other is not None and other.state is EndState.HOLDING:
                    # Returned at once, with nothing to wait for first: the held frames are
                    # written before any frame the now piped holder sends (its claim goes with
                    # the DropLease among the effects).
                    return self._pipe_locally(other, end)
                yield ReleaseOp(end.claim_key, holder.token)  # a stale hold
                continue
            if (yield MatchOp(holder.node_id, token.end, end.id)):
                if _closed(end):  # closed while the match was on its way
                    return [StreamClose(end.id)]
                end.remote = (holder.node_id, token.end)
                end.state = EndState.PIPED
                return []
            yield ReleaseOp(end.claim_key, holder.token)
        return [Close(end.conn, 1013, "could not pair this connection request")]

    def _rendezvous_locally(self, end: PipeEnd, now: float) -> list[Effect]:
        if end.state is EndState.CLOSED:
            return []
        held = self.holding.get(end.claim_key)
        if held is None or held.state is not EndState.HOLDING:
            return self._hold(end, now)
        if held.a == end.a and end.a != end.b:
            return self.evict_end(held.id, REPLACED_PIPE) + self._hold(end, now)
        return self._pipe_locally(held, end)

    def _hold(self, end: PipeEnd, now: float) -> list[Effect]:
        if end.state is EndState.CLOSED:  # closed while its claim was on its way
            return [DropLease(end.claim_key, end.token)]
        end.state = EndState.HOLDING
        self.holding[end.claim_key] = end
        if self.wait_timeout > 0:
            end.deadline = now + self.wait_timeout
        return []

    def _stop_holding(self, end: PipeEnd) -> None:
        if self.holding.get(end.claim_key) is end:
            del self.holding[end.claim_key]
        end.deadline = None

    def _take_held(self, end: PipeEnd) -> list[tuple[int, bytes]]:
        """Empty ``end``'s hold buffer; its address holds that much less."""
        frames, size = end.buffer.take()
        if size:
            left = self.held.get(end.address, 0) - size
            if left > 0:
                self.held[end.address] = left
            else:
                self.held.pop(end.address, None)
        return frames

    def _forget(self, end: PipeEnd) -> None:
        """``end`` is done with: no hold, no frames, no entry (a lingering one no longer counts)."""
        end.state = EndState.CLOSED
        self._stop_holding(end)
        self._take_held(end)
        self.ends.pop(end.id, None)
        if end.lingering:
            end.lingering = False
            left = self.lingering.get(end.address, 0) - 1
            if left > 0:
                self.lingering[end.address] = left
            else:
                self.lingering.pop(end.address, None)

    def _pipe_locally(self, held: PipeEnd, arrived: PipeEnd) -> list[Effect]:
        """Write what ``held`` buffered to ``arrived``, in order, then pipe them (or, if ``held``
        closed meanwhile, close ``arrived`` after the frames)."""
        self._stop_holding(held)
        frames = self._take_held(held)
        effects: list[Effect] = [SendFrames(arrived.conn, tuple(frames))] if frames else []
        arrived.state = EndState.PIPED
        if held.lingering:
            self._forget(held)
            effects.append(Close(arrived.conn, 1000, PEER_CLOSED))
        else:
            held.partner, arrived.partner = arrived, held
            held.state = EndState.PIPED
        effects.append(DropLease(held.claim_key, held.token))
        return effects

    def evict_end(self, end_id: str, reason: str) -> list[Effect]:
        """A newer duplicate request replaces the held end ``end_id`` (whose claim the newer one
        released already)."""
        end = self.ends.get(end_id)
        if end is None or end.state is not EndState.HOLDING:
            return []
        lingering = end.lingering
        self._forget(end)
        effects: list[Effect] = [DropLease(end.claim_key, end.token, forget=True)]
        if not lingering:
            effects.append(Close(end.conn, 1000, reason))
        return effects

    def match(self, origin: str, holder_id: str, seeker: str) -> Generator[Op, Any, list[Effect]]:
        """Node ``origin``'s end ``seeker`` asks to be piped to this node's held ``holder_id``."""
        end = self.ends.get(holder_id)
        if end is not None and end.state is EndState.RENDEZVOUS:
            # The matcher saw this end's claim before this node saw its reply: the end is about
            # to hold. Answer once it does, instead of refusing a valid match.
            yield SettleOp(end.id)
            end = self.ends.get(holder_id)
        if end is None or end.state is not EndState.HOLDING:
            return [ToNode(origin, Direct.NO_MATCH, encode_end(EndRef(seeker)))]
        self._stop_holding(end)
        frames = self._take_held(end)
        end.state = EndState.PIPED
        end.remote = (origin, seeker)
        # The held frames go first, in order: queued on the stream before anything can wait
        # (the reply below does), so no frame of the now piped socket can overtake them.
        effects: list[Effect] = [StreamOpen(end.id, origin, seeker)]
        effects += [StreamSend(end.id, opcode, data) for opcode, data in frames]
        effects.append(ToNode(origin, Direct.MATCHED, encode_end(EndRef(seeker, end.id))))
        effects.append(DropLease(end.claim_key, end.token))
        if end.lingering:  # its socket closed meanwhile: the stream ends after its frames
            self._forget(end)
            end.remote = None
            effects.append(StreamClose(end.id))
        return effects

    def end_frame(self, end: PipeEnd, opcode: int, data: bytes) -> list[Effect]:
        """Forward (or hold) one frame from ``end``'s client."""
        match end.state:
            case EndState.HOLDING:
                try:
                    self._charge(end.address, end.buffer.cost(data))
                except LimitExceeded as exc:
                    end.closing = True
                    return [Close(end.conn, 1008, exc.message)]
                end.buffer.add(opcode, data)
                return []
            case EndState.PIPED if end.partner is not None:
                return [Send(end.partner.conn, data, binary=opcode == OP_BINARY)]
            case EndState.PIPED if end.remote is not None:
                return [StreamSend(end.id, opcode, data)]
        return [Close(end.conn, 1000)]

    def _charge(self, address: str, cost: int) -> None:
        """``address`` holds ``cost`` more; raise AddressBufferFull, changing nothing, past
        ``address_buffer_bytes``."""
        held = self.held.get(address, 0) + cost
        if self.address_buffer_bytes and held > self.address_buffer_bytes:
            raise AddressBufferFull(self.address_buffer_bytes)
        self.held[address] = held

    def end_closed(self, end: PipeEnd, now: float) -> list[Effect]:
        """``end``'s socket is gone: its claim, its partner, its stream. A held socket that its
        client closed with frames held lingers (``linger`` seconds, at most
        ``LINGER_PER_ADDRESS`` per address), so that a reciprocal request already on its way,
        which its client may have seen open before this close, still gets them."""
        if end.lingering:
            return []
        if (
            end.state is EndState.HOLDING
            and end.buffer.frames
            and not end.closing
            and self.linger > 0
            and self.lingering.get(end.address, 0) < LINGER_PER_ADDRESS
        ):
            end.lingering = True
            self.lingering[end.address] = self.lingering.get(end.address, 0) + 1
            until = now + self.linger
            end.deadline = until if end.deadline is None else min(end.deadline, until)
            return []
        was = end.state
        end.state = EndState.CLOSED
        self.ends.pop(end.id, None)
        self._stop_holding(end)
        self._take_held(end)
        effects: list[Effect] = []
        if was is EndState.HOLDING:
            effects.append(DropLease(end.claim_key, end.token))
        partner = end.partner
        if partner is not None:
            partner.partner = None
            effects.append(Close(partner.conn, 1000, PEER_CLOSED))
        if end.remote is not None:
            end.remote = None
            effects.append(StreamClose(end.id))
        return effects

    def stream_ended(self, end_id: str, reason: str) -> list[Effect]:
        """The stream of ``end_id`` is over: the other end closed, or its node is gone."""
        end = self.ends.get(end_id)
        if end is None:
            return []
        end.remote = None  # nothing to tell the other end any more
        if reason == PEER_CLOSED:
            return [Close(end.conn, 1000, PEER_CLOSED)]
        return [Close(end.conn, 1013, "the peer's node is unreachable")]

    # --- time ---
    def next_deadline(self) -> float | None:
        """When ``on_timer`` is due next (a held end's wait, or a lingering end's, ends)."""
        deadlines = [end.deadline for end in self.holding.values() if end.deadline is not None]
        return min(deadlines, default=None)

    def on_timer(self, now: float) -> list[Effect]:
        """Close the held ends whose peer did not come in time; forget the lingering ones."""
        effects: list[Effect] = []
        for end in list(self.holding.values()):
            if end.deadline is not None and end.deadline <= now:
                end.deadline = None
                if end.lingering:
                    self._forget(end)
                    effects.append(DropLease(end.claim_key, end.token))
                else:
                    end.closing = True
                    reason = f"no peer connected within {self.wait_timeout:g} s"
                    effects.append(Close(end.conn, 1013, reason))
        return effects


def _closed(end: PipeEnd) -> bool:
    """Whether ``end`` closed (a rendezvous asks again after each of its waits)."""
    return end.state is EndState.CLOSED


class EncodingMismatch(ClientError):
    """A frame in the other encoding than the connection's first (closes with 1003)."""

    close_code = CloseCode.UNSUPPORTED_DATA
