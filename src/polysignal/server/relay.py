"""Serving the relay protocol (cevitxe-signal-server, @localfirst/relay) on its two endpoints.

The rules live in ``core/relay.py`` (``RelayNode``): who is introduced to whom, the rendezvous of
the two ``/connection`` sockets of a pipe wherever they are, holding, piping, eviction of an older
socket, the hold bounds (docs/protocols/relay.md). This hub carries its effects out:

* frames to local sockets, closes, presence and announcements through the backend, direct
  messages to other nodes;
* the peer ids' and held pipes' cluster-wide claims, as leases (``backends/lease.py``);
* a pipe whose other end is on another node, as a stream each way (``backends/stream.py``): in
  order, with a credit window, so a slow reader there slows the writer here;
* a local pipe's backpressure: a writer waits while its reader's socket has half its send
  buffer unsent (the transport's own flow control);
* one timer for the machine's next deadline (a held socket's wait, or the linger of a held
  socket that closed with frames).

A rendezvous runs as the machine's generator: it yields what it needs (claim, look up, release,
match with another node, wait for another end) and the hub answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Generator
from typing import Any

from polysignal.backends.base import Backend, Claim
from polysignal.backends.lease import Lease, Leases
from polysignal.backends.stream import Streams
from polysignal.config import RelaySettings
from polysignal.core.effects import (
    ClaimOp,
    Close,
    LookupOp,
    Presence,
    Publish,
    ReleaseOp,
    Send,
    ToNode,
)
from polysignal.core.errors import Answer, BackendUnavailable, CloseCode
from polysignal.core.errors import Close as CloseAnswer
from polysignal.core.relay import (
    ApplyOp,
    DropLease,
    Effect,
    EndState,
    MatchOp,
    Op,
    PeerSocket,
    PipeEnd,
    RelayNode,
    SendFrames,
    SettleOp,
    StreamClose,
    StreamOpen,
    StreamSend,
    TakeLease,
)
from polysignal.drive import drive
from polysignal.logs import Throttle, more
from polysignal.protocols import relay as proto
from polysignal.protocols.relay import Direct, Encoding
from polysignal.protocols.websocket import OP_BINARY, OP_TEXT
from polysignal.server.connection import Connection
from polysignal.server.driver import Handler, Handshake, Result
from polysignal.server.executor import Background, DeadlineTimer

log = logging.getLogger("polysignal.relay")


class RelayHub(Handler):
    """This node's relay sockets: the driver's callbacks, executing ``RelayNode``'s effects."""

    protocol = "relay"

    def __init__(
        self,
        settings: RelaySettings,
        backend: Backend,
        node_id: str,
        *,
        lease_ttl: float,
        send_buffer_bytes: int,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.limits = proto.RelayLimits(settings.relay_max_id_length, settings.relay_max_documents)
        # A held socket's frames are written to its peer at once when the pair forms (so that no
        # later frame overtakes them): they never hold more than the peer's send buffer takes.
        hold = [b for b in (settings.relay_buffer_bytes, send_buffer_bytes) if b]
        self.machine = RelayNode(
            node_id,
            max_documents=settings.relay_max_documents,
            buffer_bytes=min(hold, default=0),
            address_buffer_bytes=settings.relay_address_buffer_bytes,
            wait_timeout=settings.relay_wait_timeout,
            # A held socket that closes keeps its frames as long as another node's answer to
            # a match may take: a reciprocal request already on its way still gets them.
            linger=settings.relay_match_timeout,
        )
        self.leases = Leases(backend, lease_ttl)
        self._leases: dict[str, Lease] = {}  # key -> this node's lease of it
        # A stream may have this much unacknowledged: well under the receiver's send buffer,
        # so those bytes plus what its client has not read yet stay below SEND_BUFFER_BYTES.
        bounds = [b for b in (settings.relay_buffer_bytes, send_buffer_bytes) if b]
        self.streams = Streams(
            backend,
            window=min(bounds, default=4 << 20) // 4,
            outbox_bytes=settings.relay_buffer_bytes,
            wait_timeout=settings.relay_backpressure_timeout,
        )
        self._settled: dict[str, asyncio.Event] = {}  # end id -> its rendezvous finished
        self.pipe_frames_in = 0  # frames received on pipe ends (``/metrics``)
        self._throttle = Throttle()  # repeated warnings: one line per interval
        self._matching: dict[str, asyncio.Future[bool]] = {}
        self.background = Background(log)
        self.timer = DeadlineTimer(self.machine.next_deadline, self._on_timer, self.background)
        backend.on_topic_message(self._on_announce, proto.NAMESPACE)
        for kind, handler in {
            Direct.INTRODUCE: self._on_introduce,
            Direct.EVICT_PEER: self._on_evict_peer,
            Direct.MATCH: self._on_match,
            Direct.MATCHED: self._on_matched,
            Direct.NO_MATCH: self._on_no_match,
            Direct.EVICT_PIPE: self._on_evict_pipe,
        }.items():
            backend.on_direct(kind, handler)

    # --- routing ---
    def matches(self, request: Handshake) -> bool:
        return proto.is_relay_path(request.path)

    def claimed_id(self, request: Handshake) -> str | None:
        """The peer id of an introduction socket, the local id of a pipe end."""
        endpoint = proto.parse_endpoint(request.path, self.limits)
        if isinstance(endpoint, proto.IntroductionPath):
            return endpoint.peer
        return endpoint.local if endpoint is not None else None

    # --- the driver's callbacks ---
    def on_open(self, conn: Connection, request: Handshake) -> Result:
        endpoint = proto.parse_endpoint(request.path, self.limits)
        if isinstance(endpoint, proto.IntroductionPath):
            token = secrets.token_hex(8)
            conn.peer_id = endpoint.peer
            sock, effects = self.machine.peer_opened(conn, endpoint.peer, token)
            conn.state = sock
            return self._run(effects)
        assert endpoint is not None  # the matcher said so
        a, b, key = endpoint.local, endpoint.remote, endpoint.document
        conn.peer_id = a
        # Pipes carry document sync: larger frames, and no message rate limit; a writer waits
        # (``drained``) once half the reader's send buffer is unsent.
        conn.max_frame = self.settings.relay_max_frame_bytes
        conn.set_rate_limit(0, 0)
        conn.transport.set_write_buffer_limits(high=conn.max_buffer // 2)
        end_id = secrets.token_hex(8)
        end = conn.state = self.machine.end_opened(conn, end_id, a, b, key, conn.address)
        self._settled[end.id] = asyncio.Event()
        return self._rendezvous(end)

    def on_message(self, conn: Connection, data: bytes, binary: bool) -> Result:
        state = conn.state
        if isinstance(state, PipeEnd):
            self.pipe_frames_in += 1
            return self._run(self.machine.end_frame(state, OP_BINARY if binary else OP_TEXT, data))
        if isinstance(state, PeerSocket):
            encoding = Encoding.MSGPACK if binary else Encoding.JSON
            self.machine.expect_encoding(state, encoding)  # before decoding: garbage too
            decoded = proto.decode(data, encoding, self.limits)
            return self._run(self.machine.peer_message(state, decoded, encoding))
        return None

    def on_close(self, conn: Connection) -> Result:
        state = conn.state
        if isinstance(state, PeerSocket):
            return self._run(self.machine.peer_closed(state))
        if isinstance(state, PipeEnd):
            self._settled.pop(state.id, None)
            return self._run(self.machine.end_closed(state, self.timer.now()))
        return None

    def answer(self, conn: Connection, error: Exception) -> Answer:
        return proto.answer(error)

    def typed_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        return {"pipe": self.pipe_frames_in}, {}

    def held(self) -> dict[str, int]:
        return {"ids": len(self.machine.peers), "pipes": len(self.machine.ends)}

    def rate_limited(self, conn: Connection, data: bytes, binary: bool, report: bool) -> Answer:
        return CloseAnswer(
            CloseCode.POLICY_VIOLATION, f"rate limit exceeded ({conn.rate:g} messages/s)"
        )

    # --- carrying effects out ---
    def _run(self, effects: list[Effect]) -> Result:
        """Carry ``effects`` out in order: at once while they need no wait, the rest in a
        coroutine (returned) from the first one that does."""
        for index, effect in enumerate(effects):
            waiting = self._now(effect)
            if waiting is not None:
                return self._finish(waiting, effects[index + 1 :])
        self.timer.arm()
        return None

    def _detach(self, effects: list[Effect]) -> None:
        """Carry out effects no connection waits for (another node's message, the timer's)."""
        self.background.run(self._run(effects))

    async def _finish(self, waiting: Awaitable[None], rest: list[Effect]) -> None:
        await waiting
        await self._apply(rest)

    async def _apply(self, effects: list[Effect] | tuple[Effect, ...]) -> None:
        for effect in effects:
            waiting = self._now(effect)
            if waiting is not None:
                await waiting
        self.timer.arm()

    def _now(self, effect: Effect) -> Awaitable[None] | None:
        """Carry out one effect; what to wait for before the next, if anything."""
        match effect:
            case Send(conn, payload, binary):
                assert isinstance(conn, Connection)
                conn.send_message(payload, OP_BINARY if binary else OP_TEXT)
                if conn.writing_paused:  # a pipe's reader is behind: its writer waits
                    return self._drained(conn)
            case SendFrames(conn, frames):
                assert isinstance(conn, Connection)
                for opcode, data in frames:
                    conn.send_message(data, opcode)
                if conn.writing_paused:
                    return self._drained(conn)
            case Close(conn, code, reason):
                assert isinstance(conn, Connection)
                conn.close(code, reason)
            case Presence(topic, count, namespace):
                self.backend.local_count_changed(topic, count, namespace)
            case Publish(topic, payload, namespace):
                if not self.backend.publish_nowait(topic, payload, namespace):
                    return self.backend.publish(topic, payload, namespace)
            case ToNode(node, kind, payload):
                return self._to_node(node, kind, payload)
            case TakeLease(key, token, peer):
                return self._take_lease(key, token, peer)
            case DropLease(key, token, forget):
                return self._drop_lease(key, token, forget)
            case StreamOpen(end, node, peer):
                self.streams.open(end, node, peer, _EndSink(self, end))
            case StreamSend(end, opcode, data):
                stream = self.streams.get(end)
                if stream is not None:
                    return stream.send(opcode, data)
            case StreamClose(end):
                stream = self.streams.get(end)
                if stream is not None:
                    stream.close()
        return None

    async def _drained(self, conn: Connection) -> None:
        """Wait (bounded) until ``conn``'s reader has caught up."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.relay_backpressure_timeout):
                await conn.drained()

    async def _to_node(self, node: str, kind: str, payload: bytes) -> None:
        try:
            if not await self.backend.send_direct(node, kind, payload):
                log.debug("relay: node %s is gone; %s not delivered", node, kind)
        except BackendUnavailable as exc:
            log.debug("relay: %s to node %s not sent (%s)", kind, node, exc)

    # --- leases ---
    async def _take_lease(self, key: str, token: str, peer: str) -> None:
        """The peer's id, cluster-wide: an older socket elsewhere is evicted."""

        async def evict(holder: Claim) -> None:
            if holder.node_id == self.machine.node_id:
                await self._apply(self.machine.evicted(peer, holder.token))
            else:
                ref = proto.encode_end(proto.EndRef(peer, holder.token))
                await self._to_node(holder.node_id, Direct.EVICT_PEER, ref)

        def lost(holder: Claim | None) -> None:
            self._detach(self.machine.evicted(peer, token))

        lease = await self.leases.take(key, evict, token, on_lost=lost)
        if lease.released:
            return
        self._leases[key] = lease
        sock = self.machine.peers.get(peer)
        if sock is None or sock.token != token:  # closed or replaced meanwhile
            await self._drop_lease(key, token, False)

    async def _drop_lease(self, key: str, token: str, forget: bool) -> None:
        lease = self._leases.get(key)
        if lease is not None and lease.token == token:
            del self._leases[key]
            if forget:
                self.leases.forget(lease)
            else:
                await self.leases.release(lease)
        elif not forget:
            # Never kept as a lease (a claim still on its way, or a pipe's raw claim): release
            # what this token holds, if anything.
            with contextlib.suppress(BackendUnavailable):
                await self.backend.release(key, token)

    # --- rendezvous ---
    async def _rendezvous(self, end: PipeEnd) -> None:
        try:
            effects = await self._drive(self.machine.rendezvous(end, self.timer.now()))
        finally:
            settled = self._settled.get(end.id)
            if settled is not None:
                settled.set()
        await self._apply(effects)

    async def _drive(self, gen: Generator[Op, Any, list[Effect]]) -> list[Effect]:
        """Answer a rendezvous's requests until it returns its effects."""
        return await drive(gen, self._perform, BackendUnavailable)

    async def _perform(self, op: Op) -> Any:
        match op:
            case ClaimOp(key, token):
                lease = await self.leases.claim(key, token, keep_while_unavailable=False)
                if lease is None:
                    return False
                self._leases[key] = lease
                return True
            case LookupOp(key):
                return await self.backend.lookup(key)
            case ReleaseOp(key, token):
                return await self.backend.release(key, token)
            case MatchOp(node, holder, end):
                return await self._match_remote(node, holder, end)
            case SettleOp(end):
                await self._settle(end)
            case ApplyOp(effects):
                await self._apply(effects)
        return None

    async def _settle(self, end_id: str) -> None:
        """Wait (bounded) until this node's end ``end_id`` has finished its rendezvous."""
        settled = self._settled.get(end_id)
        if settled is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.relay_match_timeout):
                    await settled.wait()

    async def _match_remote(self, node: str, holder: str, end_id: str) -> bool:
        """Ask ``node`` to pipe its held ``holder`` to ``end_id``; True once it has."""
        stream = self.streams.open(end_id, node, holder, _EndSink(self, end_id))
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._matching[end_id] = future
        matched = False
        try:
            ref = proto.encode_end(proto.EndRef(holder, end_id))
            if await self.backend.send_direct(node, Direct.MATCH, ref):
                timeout = self.settings.relay_match_timeout
                try:
                    async with asyncio.timeout(timeout):
                        matched = await future
                except TimeoutError:
                    held = self._throttle.allow(("no match answer", node))
                    if held is not None:
                        log.warning(
                            "node %s did not answer a pipe match in %g s%s",
                            node,
                            timeout,
                            more(held),
                        )
        finally:
            self._matching.pop(end_id, None)
            if not matched:
                self.streams.discard(stream)
        return matched

    # --- from other nodes (a malformed message is dropped with a warning by the backend) ---
    def _on_announce(self, topic: str, payload: bytes) -> None:
        self._detach(self.machine.announced(topic, proto.decode_announce(payload)))

    def _on_introduce(self, origin: str, payload: bytes) -> None:
        self._detach(self.machine.introduced(proto.decode_introduce(payload)))

    def _on_evict_peer(self, origin: str, payload: bytes) -> None:
        ref = proto.decode_end(payload)
        self._detach(self.machine.evicted(ref.end, ref.other))

    def _on_match(self, origin: str, payload: bytes) -> None:
        ref = proto.decode_end(payload)
        self.background.run(self._answer_match(origin, ref))

    async def _answer_match(self, origin: str, ref: proto.EndRef) -> None:
        await self._apply(await self._drive(self.machine.match(origin, ref.end, ref.other)))

    def _on_matched(self, origin: str, payload: bytes) -> None:
        self._answered(proto.decode_end(payload).end, True)

    def _on_no_match(self, origin: str, payload: bytes) -> None:
        self._answered(proto.decode_end(payload).end, False)

    def _answered(self, end_id: str, matched: bool) -> None:
        future = self._matching.get(end_id)
        if future is not None and not future.done():
            future.set_result(matched)

    def _on_evict_pipe(self, origin: str, payload: bytes) -> None:
        ref = proto.decode_end(payload)
        self.background.run(self._evict_when_settled(ref.end, ref.reason))

    async def _evict_when_settled(self, end_id: str, reason: str) -> None:
        """Evict a held end, letting one that is about to hold (its claim's reply has not reached
        it yet) start holding first, so it cannot hold on without its claim afterwards."""
        await self._settle(end_id)
        await self._apply(self.machine.evict_end(end_id, reason))

    def _on_timer(self, now: float) -> Result:
        return self._run(self.machine.on_timer(now))

    async def stop(self) -> None:
        """Shutdown hook: stop the leases' renewal, the streams and the pending sends."""
        self.timer.cancel()
        await self.leases.close()
        await self.streams.close()
        await self.background.stop()


class _EndSink:
    """Where a stream from another node delivers: the local pipe end's socket."""

    __slots__ = ("end_id", "hub")

    def __init__(self, hub: RelayHub, end_id: str) -> None:
        self.hub = hub
        self.end_id = end_id

    def deliver(self, frames: list[tuple[int, bytes]]) -> Awaitable[None] | None:
        end = self.hub.machine.ends.get(self.end_id)
        if end is None or end.state is EndState.CLOSED:
            return None
        conn = end.conn
        assert isinstance(conn, Connection)
        for opcode, data in frames:
            if opcode in (OP_TEXT, OP_BINARY):
                conn.send_message(data, opcode)
        conn.flush()  # so the transport's buffer shows what waits for the reader
        return conn.drained() if conn.writing_paused else None

    def ended(self, reason: str) -> None:
        self.hub._detach(self.hub.machine.stream_ended(self.end_id, reason))
