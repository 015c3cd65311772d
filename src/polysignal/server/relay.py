"""Serving the relay protocol (cevitxe-signal-server, @localfirst/relay) on its two endpoints.

* ``/introduction/{peerId}``: Join/Leave/Heartbeat in any generation (protocols/relay.py); every
  peer sharing a document with a joiner is introduced to it and it to them
  (docs/protocols/relay.md, introductions).
* ``/connection/{a}/{b}/{key}``: the first socket is held and what it sends is buffered; when
  ``/connection/{b}/{a}/{key}`` arrives the buffer is flushed to it in order and the two are piped
  both ways, byte-exact, each frame keeping its text/binary type; closing one closes the other
  (docs/protocols/relay.md, pipes).

Fixes over the originals: bad input closes with a code and reason instead of
throwing; the hold buffer is bounded in bytes (``RELAY_BUFFER_BYTES``) and time
(``RELAY_WAIT_TIMEOUT``); a second socket for the same peer id or the same pipe request replaces
the first cleanly (the old one is closed, and its cleanup cannot remove the new one).

Across nodes, through the backend only:

* each document id is a topic in the ``relay`` namespace whose presence is the number of local
  peers that joined it; a Join is announced on the topics of the documents it names, and a node
  with peers in them introduces both sides (the reverse introduction goes to the joiner's node
  with ``send_direct``);
* ``/introduction/{peerId}`` claims the peer id cluster-wide (lease renewed while connected), so a
  newer socket on another node evicts the older one;
* a ``/connection`` request claims one rendezvous name shared by both directions: the first
  holds it, the second finds the holder's node and socket in the claim and is piped to it; frames
  then cross with ``send_direct``, sent in order by one pump task per socket, which batches what
  queued up meanwhile into one message and keeps at most a window of bytes unacknowledged by the
  receiving node (it acknowledges once its client has read them), so a slow reader on one node
  slows the writer on another instead of being cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import unquote

from polysignal.core.errors import (
    Answer,
    BackendUnavailable,
    ClientError,
    Close,
    CloseCode,
    LimitExceeded,
)
from polysignal.core.relay import (
    Directory,
    HoldBuffer,
    Introduction,
    PipeToken,
    peer_claim_key,
    pipe_claim_key,
)
from polysignal.protocols import relay as proto
from polysignal.protocols.relay import Direct, Encoding, Generation
from polysignal.protocols.websocket import OP_BINARY, OP_TEXT
from polysignal.server.connection import Connection
from polysignal.server.driver import Handler, Handshake, Result
from polysignal.server.node import Node

log = logging.getLogger("polysignal.relay")

INTRODUCTION = "introduction"
CONNECTION = "connection"
_PREFIXES = ("/" + INTRODUCTION, "/" + CONNECTION)
MATCH_TIMEOUT = 5.0
"""Seconds a ``/connection`` socket waits for the holder's node to confirm a cross-node pipe."""
RENDEZVOUS_ATTEMPTS = 4
PIPE_BATCH_BYTES = 64 * 1024
"""Piped frames sent to another node in one direct message, at most (unless one is larger)."""
BACKPRESSURE_WAIT = 30.0
"""Seconds a pipe's writer waits for a reader that is behind before the send buffer limit
(1013) decides."""


class PipeState(Enum):
    RENDEZVOUS = "rendezvous"  # looking for the reciprocal request
    HOLDING = "holding"  # first of the pair: buffering until the other arrives
    PIPED = "piped"
    CLOSED = "closed"


@dataclass(eq=False)
class PeerSocket:
    """The current ``/introduction/{peer}`` socket of a peer."""

    conn: Connection
    peer: str
    token: str
    encoding: Encoding | None = None
    generation: Generation | None = None


@dataclass(eq=False)
class PipeEnd:
    """One ``/connection/{a}/{b}/{key}`` socket on this node."""

    id: str
    conn: Connection
    a: str
    b: str
    key: str
    buffer: HoldBuffer
    state: PipeState = PipeState.RENDEZVOUS
    partner: PipeEnd | None = None  # the other end, when it is on this node
    remote: tuple[str, str] | None = None  # (node id, end id) when it is on another node
    # Frames on their way to a remote partner, sent in order by one pump task per end.
    outbox: deque[tuple[int, bytes]] = field(default_factory=deque)
    outbox_bytes: int = 0
    pump: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # the outbox has frames
    room: asyncio.Event = field(default_factory=asyncio.Event)  # the outbox has room
    unacked: int = 0  # bytes sent to the remote partner not yet written to its client
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    watchdog: asyncio.Task[None] | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # rendezvous finished
    claim_key: str = field(init=False)
    token: str = field(init=False)

    def __post_init__(self) -> None:
        self.claim_key = pipe_claim_key(self.a, self.b, self.key)
        self.token = PipeToken(self.a, self.id).encode()

    def __repr__(self) -> str:
        return f"<pipe {self.id} {self.state.value}>"


def parse_path(raw_path: str) -> tuple[str, list[str]] | None:
    """``/introduction/x`` -> ("introduction", ["x"]); None if the path is not the relay's.

    Segments are split before percent-decoding, as Express does for route parameters.
    """
    if not raw_path.startswith(_PREFIXES):
        return None
    parts = raw_path.split("/")
    if len(parts) < 2 or parts[0] != "" or parts[1] not in (INTRODUCTION, CONNECTION):
        return None
    rest = parts[2:]
    if rest and rest[-1] == "":
        rest = rest[:-1]  # Express matches a trailing slash
    return parts[1], [unquote(p) for p in rest]


class RelayHub(Handler):
    """This node's relay peers, held and piped sockets, and their links to other nodes."""

    protocol = "relay"

    def __init__(self, node: Node) -> None:
        self.node = node
        settings = node.settings
        self.backend = node.backend
        self.limits = proto.RelayLimits(
            settings.relay.relay_max_id_length, settings.relay.relay_max_documents
        )
        self.directory = Directory(settings.relay.relay_max_documents)
        self.peers: dict[str, PeerSocket] = {}
        self.ends: dict[str, PipeEnd] = {}
        self.holding: dict[str, PipeEnd] = {}  # claim key -> the end held under it here
        self.matching: dict[str, asyncio.Future[bool]] = {}
        self.lease = float(max(settings.server.id_lease_ttl, 3))
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self.backend.on_topic_message(self._on_announce, proto.NAMESPACE)
        handlers = {
            Direct.INTRODUCE: self._on_introduce,
            Direct.EVICT_PEER: self._on_evict_peer,
            Direct.MATCH: self._on_match,
            Direct.MATCHED: self._on_matched,
            Direct.NO_MATCH: self._on_no_match,
            Direct.EVICT_PIPE: self._on_evict_pipe,
            Direct.FRAMES: self._on_frames,
            Direct.ACK: self._on_ack,
            Direct.CLOSE: self._on_close,
        }
        for kind, handler in handlers.items():
            self.backend.on_direct(kind, handler)
        node.shutdown_hooks.append(self.stop)

    # --- routing ---
    def matches(self, request: Handshake) -> bool:
        return parse_path(request.path) is not None

    # --- the driver's callbacks ---
    def on_open(self, conn: Connection, request: Handshake) -> Result:
        parsed = parse_path(request.path)
        assert parsed is not None  # the matcher said so
        endpoint, params = parsed
        if endpoint == INTRODUCTION:
            return self._introduction(conn, params)
        # Pipes carry document sync: larger frames, and no message rate limit; a writer waits
        # (``drained``) once half the reader's send buffer is unsent.
        conn.max_frame = self.node.settings.relay.relay_max_frame_bytes
        conn.set_rate_limit(0, 0)
        conn.transport.set_write_buffer_limits(high=conn.max_buffer // 2)
        return self._connection(conn, params)

    def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
        state = conn.state
        if isinstance(state, PeerSocket):
            return self._on_intro_frame(state, data, binary)
        if isinstance(state, PipeEnd):
            return self._pipe(state, OP_BINARY if binary else OP_TEXT, data)
        return None

    def on_close(self, conn: Connection) -> Result:
        state = conn.state
        if isinstance(state, PeerSocket):
            return self._unregister(state)
        if isinstance(state, PipeEnd):
            return self._end_closed(state)
        return None

    def answer(self, conn: Connection, error: Exception) -> Answer:
        return proto.answer(error)

    def rate_limited(self, conn: Connection, data: bytes, binary: bool, report: bool) -> Answer:
        rate = self.node.settings.limits.rate_limit
        return Close(CloseCode.POLICY_VIOLATION, f"rate limit exceeded ({rate:g} messages/s)")

    # --- /introduction/{peerId} ---
    def _introduction(self, conn: Connection, params: list[str]) -> Result:
        if len(params) != 1:
            raise ClientError("expected /introduction/{peerId}")
        peer = params[0]
        proto.check_id("peer id", peer, self.limits)
        sock = conn.state = PeerSocket(conn, peer, secrets.token_hex(8))
        return self._register(sock)

    def _on_intro_frame(self, sock: PeerSocket, data: bytes, binary: bool) -> Result:
        """Handle one frame of an introduction socket (a ClientError closes it)."""
        encoding = Encoding.MSGPACK if binary else Encoding.JSON
        if sock.encoding is None:
            sock.encoding = encoding
        elif encoding is not sock.encoding:
            # A connection answers in the encoding it started with (docs/protocols/relay.md).
            expected = "msgpack binary" if sock.encoding is Encoding.MSGPACK else "JSON text"
            raise ProtocolMismatch(f"this connection speaks {expected} frames")
        decoded = proto.decode(data, encoding, self.limits)
        if sock.generation is None:
            sock.generation = decoded.generation
        if self.peers.get(sock.peer) is not sock:
            return None  # replaced by a newer socket (and closing): its frames no longer count
        match decoded.command:
            case proto.Join() as join:
                return self._join(sock, join)
            case proto.Leave() as leave:
                self._presence(self.directory.leave(sock.peer, leave.document_ids))
            case proto.Heartbeat():
                pass
        return None

    async def _join(self, sock: PeerSocket, join: proto.Join) -> None:
        # DocumentLimitExceeded (a ClientError) leaves the peer's set unchanged and closes it.
        added, removed, intros = self.directory.join(sock.peer, join.document_ids, join.leave)
        self._presence(added + removed)
        for intro in intros:
            self._introduce(intro)
        documents = self.directory.documents_of(sock.peer)
        joined = tuple(doc for doc in join.document_ids if doc in documents)
        if not joined:
            return
        announce = proto.encode_announce(
            proto.Announce(self.node.node_id, sock.peer, joined, documents)
        )
        for doc in joined:
            await self.backend.publish(doc, announce, proto.NAMESPACE)

    def _introduce(self, intro: Introduction) -> None:
        """Send ``intro`` to its local recipient in that recipient's generation."""
        sock = self.peers.get(intro.to)
        if sock is None or sock.generation is None:
            return
        frame = proto.encode_introduction(sock.generation, intro.peer, intro.documents)
        if sock.generation is Generation.V4:
            sock.conn.send_binary(frame)
        else:
            sock.conn.send_text(frame)

    def _presence(self, documents: list[str]) -> None:
        for doc in documents:
            self.backend.local_count_changed(doc, self.directory.count(doc), proto.NAMESPACE)

    async def _register(self, sock: PeerSocket) -> None:
        """Make ``sock`` the peer's one socket in the cluster, evicting an older one."""
        try:
            claimed = await self._claim_peer(sock)
        except BackendUnavailable as exc:
            # The backend is away (it warns about that itself): keep serving this node's peers
            # (docs/redis.md).
            log.debug("peer id %r not claimed cluster-wide (%s); serving it here", sock.peer, exc)
        else:
            if not claimed:
                log.warning("peer id %r: claim kept failing; serving it here", sock.peer)
        old = self.peers.get(sock.peer)
        if old is not None:
            self._evict_peer(sock.peer, old.token)
        self.peers[sock.peer] = sock
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_peers())

    async def _claim_peer(self, sock: PeerSocket) -> bool:
        key = peer_claim_key(sock.peer)
        for _ in range(RENDEZVOUS_ATTEMPTS):
            if await self.backend.claim(key, sock.token, self.lease):
                return True
            holder = await self.backend.lookup(key)
            if holder is None:
                continue
            await self.backend.release(key, holder.token)
            if holder.node_id == self.node.node_id:
                self._evict_peer(sock.peer, holder.token)
            else:
                ref = proto.EndRef(sock.peer, holder.token)
                await self.backend.send_direct(
                    holder.node_id, Direct.EVICT_PEER, proto.encode_end(ref)
                )
        return False

    def _evict_peer(self, peer: str, token: str) -> None:
        old = self.peers.get(peer)
        if old is None or old.token != token:
            return
        del self.peers[peer]
        self._presence(self.directory.remove(peer))
        old.conn.close(CloseCode.NORMAL, "replaced by a newer connection with the same peer id")

    async def _unregister(self, sock: PeerSocket) -> None:
        if self.peers.get(sock.peer) is sock:
            del self.peers[sock.peer]
            self._presence(self.directory.remove(sock.peer))
        # else: replaced; the newer socket's state is not ours to remove. Releasing our own
        # token is always safe: it frees the claim only if we still hold it.
        with contextlib.suppress(Exception):
            await self.backend.release(peer_claim_key(sock.peer), sock.token)

    async def _renew_peers(self) -> None:
        """Keep this node's peer id claims alive; a claim lost to another node closes its socket."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._renew_round()
            except BackendUnavailable as exc:
                # The backend warns about its outage itself; leases are renewed (or claimed
                # again, if they expired meanwhile) on the first round after it returns.
                log.debug("peer id leases not renewed: %s", exc)

    async def _renew_round(self) -> None:
        for sock in list(self.peers.values()):
            key = peer_claim_key(sock.peer)
            if await self.backend.renew(key, sock.token, self.lease):
                continue
            # Not ours any more: taken over by a newer socket elsewhere whose eviction message
            # was lost, or expired during an outage. Claim it again, or yield to the holder.
            if self.peers.get(sock.peer) is sock and not await self.backend.claim(
                key, sock.token, self.lease
            ):
                self._evict_peer(sock.peer, sock.token)

    # --- announcements and introductions from other nodes ---
    def _on_announce(self, topic: str, payload: bytes) -> None:
        # Like every message from another node: a malformed one (MalformedFrame) is dropped
        # with a warning by the backend.
        msg = proto.decode_announce(payload)
        if msg.node == self.node.node_id:
            return
        replies: list[bytes] = []
        for intro in self.directory.remote_introductions(
            msg.peer, msg.joined, msg.documents, topic
        ):
            self._introduce(intro)
            replies.append(
                proto.encode_introduce(proto.Introduce(msg.peer, intro.to, intro.documents))
            )
        if replies:
            self._spawn(self._send_all(msg.node, Direct.INTRODUCE, replies))

    def _on_introduce(self, origin: str, payload: bytes) -> None:
        msg = proto.decode_introduce(payload)
        if msg.to not in self.peers:
            return
        common = self.directory.common(msg.to, msg.documents)
        if common:
            self._introduce(Introduction(msg.to, msg.peer, common))

    def _on_evict_peer(self, origin: str, payload: bytes) -> None:
        ref = proto.decode_end(payload)
        self._evict_peer(ref.end, ref.other)

    # --- /connection/{a}/{b}/{key} ---
    def _connection(self, conn: Connection, params: list[str]) -> Result:
        if len(params) != 3:
            raise ClientError("expected /connection/{localId}/{remoteId}/{documentId}")
        a, b, key = params
        for what, value in (("local id", a), ("remote id", b), ("document id", key)):
            proto.check_id(what, value, self.limits)
        end = PipeEnd(
            secrets.token_hex(8),
            conn,
            a,
            b,
            key,
            HoldBuffer(self.node.settings.relay.relay_buffer_bytes),
        )
        conn.state = end
        self.ends[end.id] = end
        return self._rendezvous(end)

    async def _rendezvous(self, end: PipeEnd) -> None:
        """Hold ``end`` or pipe it to its held reciprocal, wherever that is."""
        try:
            await self._rendezvous_cluster(end)
        except BackendUnavailable as exc:
            log.debug("pipe rendezvous on this node only (%s)", exc)
            self._rendezvous_locally(end)
        finally:
            end.settled.set()

    def _rendezvous_locally(self, end: PipeEnd) -> None:
        held = self.holding.get(end.claim_key)
        if held is None or held.state is not PipeState.HOLDING:
            self._hold(end)
        elif held.a == end.a and end.a != end.b:
            self._evict_end(held.id, "replaced by a newer connection request")
            self._hold(end)
        else:
            self._pipe_locally(held, end)

    async def _rendezvous_cluster(self, end: PipeEnd) -> bool:
        backend = self.backend
        for _ in range(RENDEZVOUS_ATTEMPTS):
            if await backend.claim(end.claim_key, end.token, self.lease):
                self._hold(end)
                return True
            holder = await backend.lookup(end.claim_key)
            if holder is None:
                continue  # released in between: try to claim again
            token = PipeToken.decode(holder.token)
            if token is None:
                await backend.release(end.claim_key, holder.token)
                continue
            if token.seeker == end.a and end.a != end.b:
                # The same request again: the newer socket replaces the held one.
                await backend.release(end.claim_key, holder.token)
                reason = "replaced by a newer connection request"
                if holder.node_id == self.node.node_id:
                    await self._evict_end_when_settled(token.end, reason)
                else:
                    ref = proto.encode_end(proto.EndRef(token.end, reason=reason))
                    await backend.send_direct(holder.node_id, Direct.EVICT_PIPE, ref)
                continue
            if holder.node_id == self.node.node_id:
                other = self.ends.get(token.end)
                if other is not None:
                    # Its claim may have succeeded a moment before it learnt so (the reply
                    # comes on another Redis connection than ours): let it start holding.
                    await self._settled(other)
                if other is not None and other.state is PipeState.HOLDING:
                    self._pipe_locally(other, end)
                    await backend.release(end.claim_key, holder.token)
                    return True
                await backend.release(end.claim_key, holder.token)  # a stale hold
                continue
            if await self._match_remote(end, holder.node_id, token.end):
                return True
            await backend.release(end.claim_key, holder.token)
        end.conn.close(CloseCode.TRY_AGAIN_LATER, "could not pair this connection request")
        return False

    def _hold(self, end: PipeEnd) -> None:
        end.state = PipeState.HOLDING
        self.holding[end.claim_key] = end
        end.watchdog = asyncio.get_running_loop().create_task(self._watch(end))
        log.debug("holding %r for %s", end, end.claim_key)

    async def _watch(self, end: PipeEnd) -> None:
        """Close a held socket whose peer does not come in time; renew its claim meanwhile."""
        wait = self.node.settings.relay.relay_wait_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait if wait > 0 else None
        while end.state is PipeState.HOLDING:
            step = self.lease / 3
            if deadline is not None:
                step = min(step, deadline - loop.time())
            if step > 0:
                await asyncio.sleep(step)
            if end.state is not PipeState.HOLDING:
                return
            if deadline is not None and loop.time() >= deadline:
                end.conn.close(CloseCode.TRY_AGAIN_LATER, f"no peer connected within {wait:g} s")
                return
            with contextlib.suppress(Exception):
                await self.backend.renew(end.claim_key, end.token, self.lease)

    async def _evict_end_when_settled(self, end_id: str, reason: str) -> None:
        """Evict a held end, letting one that is about to hold (its claim's reply has not reached
        it yet) start holding first, so it cannot hold on without its claim afterwards."""
        end = self.ends.get(end_id)
        if end is not None:
            await self._settled(end)
        self._evict_end(end_id, reason)

    def _evict_end(self, end_id: str, reason: str) -> None:
        end = self.ends.get(end_id)
        if end is not None and end.state is PipeState.HOLDING:
            self._stop_holding(end)
            end.state = PipeState.CLOSED
            end.conn.close(CloseCode.NORMAL, reason)

    def _pipe_locally(self, held: PipeEnd, arrived: PipeEnd) -> None:
        """Flush what ``held`` buffered to ``arrived``, in order, then pipe them."""
        self._stop_holding(held)
        for opcode, data in held.buffer.take():
            arrived.conn.send_message(data, opcode)
        held.partner, arrived.partner = arrived, held
        held.state = arrived.state = PipeState.PIPED
        log.debug("piped %r <-> %r", held, arrived)

    def _stop_holding(self, end: PipeEnd) -> None:
        if self.holding.get(end.claim_key) is end:
            del self.holding[end.claim_key]
        if end.watchdog is not None:
            end.watchdog.cancel()
            end.watchdog = None

    async def _match_remote(self, end: PipeEnd, node_id: str, holder_end: str) -> bool:
        """Ask ``node_id`` to pipe its held ``holder_end`` to ``end``; True once it has."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.matching[end.id] = future
        try:
            ref = proto.encode_end(proto.EndRef(holder_end, end.id))
            if not await self.backend.send_direct(node_id, Direct.MATCH, ref):
                return False
            try:
                async with asyncio.timeout(MATCH_TIMEOUT):
                    matched = await future
            except TimeoutError:
                log.warning("node %s did not answer a pipe match in %g s", node_id, MATCH_TIMEOUT)
                return False
        finally:
            self.matching.pop(end.id, None)
        if matched:
            end.remote = (node_id, holder_end)
            end.state = PipeState.PIPED
            self._start_pump(end, None)
            log.debug("piped %r <-> %s on node %s", end, holder_end, node_id)
        return matched

    def _on_match(self, origin: str, payload: bytes) -> None:
        ref = proto.decode_end(payload)
        end = self.ends.get(ref.end)
        if end is not None and end.state is PipeState.RENDEZVOUS:
            # The matcher saw this end's claim before this node saw its reply: the end is
            # about to hold. Answer once it does, instead of refusing a valid match.
            self._spawn(self._match_when_settled(end, origin, ref))
            return
        self._answer_match(end, origin, ref)

    async def _match_when_settled(self, end: PipeEnd, origin: str, ref: proto.EndRef) -> None:
        await self._settled(end)
        self._answer_match(self.ends.get(ref.end), origin, ref)

    async def _settled(self, end: PipeEnd) -> None:
        """Wait (bounded) until ``end`` has finished its rendezvous."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MATCH_TIMEOUT):
                await end.settled.wait()

    def _answer_match(self, end: PipeEnd | None, origin: str, ref: proto.EndRef) -> None:
        if end is None or end.state is not PipeState.HOLDING:
            reply = proto.encode_end(proto.EndRef(ref.other))
            self._spawn(self._send_all(origin, Direct.NO_MATCH, [reply]))
            return
        self._stop_holding(end)
        end.state = PipeState.PIPED
        end.remote = (origin, ref.other)
        for opcode, data in end.buffer.take():  # the held frames go first, in order
            self._queue(end, opcode, data)
        self._start_pump(end, proto.encode_end(proto.EndRef(ref.other, end.id)))

    def _start_pump(self, end: PipeEnd, matched: bytes | None) -> None:
        end.room.set()
        end.pump = asyncio.get_running_loop().create_task(self._pump(end, matched))

    def _queue(self, end: PipeEnd, opcode: int, data: bytes) -> None:
        end.outbox.append((opcode, data))
        end.outbox_bytes += len(data)
        end.wake.set()

    async def _pump(self, end: PipeEnd, matched: bytes | None) -> None:
        """Send ``end``'s frames to its remote partner in order, batching what has queued up
        meanwhile into one direct message; after the socket closed, tell the partner.

        ``matched`` (on the holder's side) confirms the match before any frame.
        """
        assert end.remote is not None
        node_id, other = end.remote
        limit = self.node.settings.relay.relay_buffer_bytes
        window = self._window()
        try:
            if matched is not None:
                if not await self.backend.send_direct(node_id, Direct.MATCHED, matched):
                    raise BackendUnavailable(f"node {node_id} is gone")
                with contextlib.suppress(Exception):
                    await self.backend.release(end.claim_key, end.token)
            while end.remote is not None:
                if not end.outbox:
                    if end.state is PipeState.CLOSED:
                        await self.backend.send_direct(
                            node_id, Direct.CLOSE, proto.encode_end(proto.EndRef(other))
                        )
                        return
                    end.wake.clear()
                    await end.wake.wait()
                    continue
                batch: list[tuple[int, bytes]] = []
                size = 0
                while end.outbox and (
                    not batch or size + len(end.outbox[0][1]) <= PIPE_BATCH_BYTES
                ):
                    opcode, data = end.outbox.popleft()
                    batch.append((opcode, data))
                    size += len(data)
                end.outbox_bytes -= size
                if not limit or end.outbox_bytes <= limit // 2:
                    end.room.set()
                # Flow control: at most ``window`` bytes on their way to the partner's client,
                # so a slow reader there slows this writer instead of being cut off (1013).
                while end.unacked and end.unacked + size > window and end.remote is not None:
                    end.acked.clear()
                    try:
                        async with asyncio.timeout(BACKPRESSURE_WAIT):
                            await end.acked.wait()
                    except TimeoutError:
                        raise BackendUnavailable("the peer's client stopped reading") from None
                message = proto.encode_frames(proto.PipedFrames(other, end.id, tuple(batch)))
                end.unacked += size
                if not await self.backend.send_direct(node_id, Direct.FRAMES, message):
                    raise BackendUnavailable(f"node {node_id} is gone")
        except BackendUnavailable as exc:
            log.debug("%r: %s", end, exc)
            end.remote = None  # later frames from the client end the pipe instead of queueing
            end.conn.close(CloseCode.TRY_AGAIN_LATER, "the peer's node is unreachable")
        finally:
            end.outbox.clear()
            end.outbox_bytes = 0
            end.room.set()  # never leave the reader waiting for a pump that stopped

    def _on_matched(self, origin: str, payload: bytes) -> None:
        future = self.matching.get(proto.decode_end(payload).end)
        if future is not None and not future.done():
            future.set_result(True)

    def _on_no_match(self, origin: str, payload: bytes) -> None:
        future = self.matching.get(proto.decode_end(payload).end)
        if future is not None and not future.done():
            future.set_result(False)

    def _on_evict_pipe(self, origin: str, payload: bytes) -> None:
        ref = proto.decode_end(payload)
        self._spawn(self._evict_end_when_settled(ref.end, ref.reason))

    def _window(self) -> int:
        """Bytes a pump may have unacknowledged: well under the receiver's send buffer, so
        those bytes plus what its client has not read yet stay below ``send_buffer_bytes``."""
        settings = self.node.settings
        bounds = [
            b for b in (settings.relay.relay_buffer_bytes, settings.limits.send_buffer_bytes) if b
        ]
        return max(PIPE_BATCH_BYTES, min(bounds, default=4 << 20) // 4)

    def _on_frames(self, origin: str, payload: bytes) -> None:
        piped = proto.decode_frames(payload)
        end = self.ends.get(piped.end)
        if end is None:
            return  # closed meanwhile; its close tells the sender
        size = 0
        for opcode, data in piped.frames:
            if opcode in (OP_TEXT, OP_BINARY):
                end.conn.send_message(data, opcode)
                size += len(data)
        # Acknowledge once the client has taken most of it (the write happens at the end of
        # this loop iteration, so the check runs in a task).
        # (The receiving end may still be waiting for MATCHED: frames follow it at once.)
        self._spawn(self._ack_when_read(end, origin, piped.sender, size))

    async def _ack_when_read(self, end: PipeEnd, node_id: str, other: str, size: int) -> None:
        conn = end.conn
        conn.flush()
        await drained(conn)
        await self.backend.send_direct(
            node_id, Direct.ACK, proto.encode_ack(proto.Ack(other, size))
        )

    def _on_ack(self, origin: str, payload: bytes) -> None:
        ack = proto.decode_ack(payload)
        end = self.ends.get(ack.end)
        if end is not None:
            end.unacked = max(0, end.unacked - ack.size)
            end.acked.set()

    def _on_close(self, origin: str, payload: bytes) -> None:
        end = self.ends.get(proto.decode_end(payload).end)
        if end is not None:
            end.remote = None  # the other end is gone: nothing to tell it
            end.wake.set()  # let the pump see it
            end.conn.close(CloseCode.NORMAL, "peer closed")

    def _pipe(self, end: PipeEnd, opcode: int, data: bytes) -> Result:
        """Forward (or hold) one frame from ``end``'s client; a coroutine when the reader on the
        other side is behind, which holds this client's next frames until it catches up."""
        match end.state:
            case PipeState.HOLDING:
                try:
                    end.buffer.add(opcode, data)
                except LimitExceeded as exc:
                    end.conn.close(CloseCode.POLICY_VIOLATION, exc.message)
                return None
            case PipeState.PIPED if end.partner is not None:
                partner = end.partner.conn
                partner.send_message(data, opcode)
                partner.flush()  # so the transport's buffer shows what waits for the reader
                if partner.writing_paused:
                    return drained(partner)
                return None
            case PipeState.PIPED if end.remote is not None:
                self._queue(end, opcode, data)
                limit = self.node.settings.relay.relay_buffer_bytes
                if limit and end.outbox_bytes > limit:
                    return self._wait_for_room(end)
                return None
        end.conn.close(CloseCode.NORMAL)
        return None

    async def _wait_for_room(self, end: PipeEnd) -> None:
        """Stop reading from ``end``'s client until its pump has caught up (bounded)."""
        end.room.clear()
        try:
            async with asyncio.timeout(BACKPRESSURE_WAIT):
                await end.room.wait()
        except TimeoutError:
            end.conn.close(CloseCode.TRY_AGAIN_LATER, "the peer's node is too slow")

    async def _end_closed(self, end: PipeEnd) -> None:
        was = end.state
        end.state = PipeState.CLOSED
        self.ends.pop(end.id, None)
        self._stop_holding(end)
        if was is PipeState.HOLDING:
            with contextlib.suppress(Exception):
                await self.backend.release(end.claim_key, end.token)
        partner = end.partner
        if partner is not None:
            partner.partner = None
            partner.conn.close(CloseCode.NORMAL, "peer closed")
        if end.pump is not None:
            # The pump sends what is still queued, then tells the remote partner (bounded).
            end.wake.set()
            try:
                async with asyncio.timeout(BACKPRESSURE_WAIT):
                    await asyncio.shield(end.pump)
            except TimeoutError:
                end.pump.cancel()
            except Exception:
                log.exception("%r: pump failed", end)

    # --- tasks ---
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_all(self, node_id: str, kind: str, payloads: list[bytes]) -> None:
        for payload in payloads:
            try:
                await self.backend.send_direct(node_id, kind, payload)
            except Exception:
                log.warning("relay: sending %s to node %s failed", kind, node_id, exc_info=True)
                return

    async def stop(self) -> None:
        """Shutdown hook: stop the lease renewal and the pending sends."""
        tasks = list(self._tasks)
        if self._renewer is not None:
            tasks.append(self._renewer)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def drained(conn: Connection) -> None:
    """Wait (bounded) until ``conn``'s reader has caught up (``Connection.drained``)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(BACKPRESSURE_WAIT):
            await conn.drained()


class ProtocolMismatch(ClientError):
    """A frame in the other encoding than the connection's first (closes with 1003)."""

    close_code = CloseCode.UNSUPPORTED_DATA
