"""Leases and streams (backends/lease.py, backends/stream.py) on every backend: memory and a real
Redis, through the same contract."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backends.cluster import Cluster, eventually
from polysignal.backends import Backend, Claim, MemoryBackend
from polysignal.backends.lease import Leases
from polysignal.backends.memory import MemoryLink
from polysignal.backends.stream import Streams

from support import UNIT

pytestmark = pytest.mark.timeout(30)


# --- leases ---


async def test_a_lease_is_one_holders_cluster_wide(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    la, lb = Leases(a, 5), Leases(b, 5)
    key = cluster.key()
    lease = await la.claim(key)
    assert lease is not None and lease.held
    assert await lb.claim(key) is None
    assert await b.lookup(key) == Claim(a.node_id, lease.token)
    await la.release(lease)
    assert await a.lookup(key) is None
    assert (await lb.claim(key)) is not None
    await la.close()
    await lb.close()


async def test_the_same_token_takes_a_lease_over(cluster: Cluster):
    """A room handed to another node: the new node claims it with the room's token."""
    a, b = await cluster.node("a"), await cluster.node("b")
    la, lb = Leases(a, 5), Leases(b, 5)
    key = cluster.key()
    first = await la.claim(key)
    assert first is not None
    second = await lb.claim(key, first.token)
    assert second is not None and second.held
    assert (await a.lookup(key)) == Claim(b.node_id, first.token)
    la.forget(first)
    await la.close()
    await lb.close()


async def test_take_evicts_the_holder_and_tells_its_node(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    la, lb = Leases(a, 5), Leases(b, 5)
    key = cluster.key()
    old = await la.claim(key)
    assert old is not None
    evicted: list[Claim] = []

    async def evict(holder: Claim) -> None:
        evicted.append(holder)

    new = await lb.take(key, evict)
    assert new.held and evicted == [Claim(a.node_id, old.token)]
    assert (await a.lookup(key)) == Claim(b.node_id, new.token)
    await la.close()
    await lb.close()


async def test_renewal_keeps_a_lease_past_its_ttl(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    la = Leases(a, 1.0 * UNIT)
    key = cluster.key()
    lease = await la.claim(key)
    assert lease is not None
    await asyncio.sleep(1.6 * UNIT)  # past the TTL: renewed every third of it
    assert (await b.lookup(key)) == Claim(a.node_id, lease.token)
    await la.close()
    await eventually(lambda: _gone(b, key), "the lease expires once nobody renews it")


async def _gone(backend: Any, key: str) -> bool:
    return await backend.lookup(key) is None


async def test_a_lease_the_backend_lost_is_claimed_again(cluster: Cluster):
    """E.g. Redis restarted empty: the next round (or the backend's return) re-asserts it."""
    a = await cluster.node("a")
    la = Leases(a, 3.0)
    key = cluster.key()
    lease = await la.claim(key)
    assert lease is not None
    await a.release(key, lease.token)  # the backend forgets it behind the lease's back
    assert await a.lookup(key) is None
    await la.renew_all()
    assert (await a.lookup(key)) == Claim(a.node_id, lease.token) and lease.held
    await la.close()


async def test_a_lease_taken_by_another_holder_is_lost_and_its_owner_told(cluster: Cluster):
    a, b = await cluster.node("a"), await cluster.node("b")
    lost: list[Claim | None] = []
    la = Leases(a, 3.0)
    key = cluster.key()
    lease = await la.claim(key, on_lost=lost.append)
    assert lease is not None
    await a.release(key, lease.token)
    assert await b.claim(key, "someone-else", 3.0)
    await la.renew_all()
    assert lost == [Claim(b.node_id, "someone-else")] and not lease.held
    assert la.get(key) is None  # no longer renewed
    await la.close()


def test_a_lease_ttl_under_one_second_is_refused():
    class Dummy:
        def on_ready(self, handler: Any) -> None:
            pass

    with pytest.raises(ValueError, match="at least 1 s"):
        Leases(Dummy(), 0.5)  # type: ignore[arg-type]


# --- when the store comes back (docs/redis.md, "Faults") ---


@pytest.fixture
async def memory() -> AsyncIterator[Cluster]:
    """In-process nodes on one net that can stop and start as a redis-server does."""
    made = Cluster("memory", None)
    try:
        yield made
    finally:
        made.bus.start()
        await made.close()


def link_of(node: Backend) -> MemoryLink:
    assert isinstance(node, MemoryBackend)
    return node.link


async def _ready(node: Backend) -> bool:
    return node.ready


async def _down(node: Backend) -> bool:
    return not node.ready


async def test_leases_are_claimed_again_before_the_node_is_ready_again(memory: Cluster):
    """The store restarts empty: by the time the node counts as ready, every lease it held is
    claimed again with its token, a taken one included, and nothing it gave up meanwhile."""
    a, b = await memory.node("a"), await memory.node("b")
    la = Leases(a, 5)
    kept, taken, given_up = memory.key("kept"), memory.key("taken"), memory.key("given-up")
    lease = await la.claim(kept)
    took = await la.take(taken, _no_eviction)
    gone = await la.claim(given_up)
    assert lease is not None and gone is not None and lease.held and took.held
    memory.bus.stop()
    await eventually(lambda: _down(a), "a noticed")
    await la.release(gone)  # while the store is away
    memory.bus.start()
    await eventually(lambda: _ready(a), "a is back", timeout=3 * UNIT)
    assert await b.lookup(kept) == Claim(a.node_id, lease.token)
    assert await b.lookup(taken) == Claim(a.node_id, took.token)
    assert await b.lookup(given_up) is None
    await la.close()


async def _no_eviction(holder: Claim) -> None:
    raise AssertionError(f"nobody to evict, yet {holder} was")


async def test_nothing_is_claimed_or_looked_up_before_a_late_node_re_asserts(memory: Cluster):
    """The store comes back empty while node a is still cut off from it: b neither grants a new
    claim of a's key nor answers a lookup of it until a, back within the settle grace, has
    claimed it again; then b's claim is refused and its lookup finds a."""
    a, b = await memory.node("a"), await memory.node("b")
    la, lb = Leases(a, 5), Leases(b, 5)
    key = memory.key()
    lease = await la.claim(key)
    assert lease is not None
    memory.bus.stop()
    link_of(a).cut = True
    await eventually(lambda: _down(a), "a noticed")
    memory.bus.start()
    await eventually(lambda: _ready(b), "b is back first", timeout=3 * UNIT)
    claim = asyncio.create_task(lb.claim(key))
    lookup = asyncio.create_task(b.lookup(key))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not claim.done() and not lookup.done(), "answered before a could re-assert"
    link_of(a).cut = False
    assert await asyncio.wait_for(claim, 3 * UNIT) is None
    assert await asyncio.wait_for(lookup, 3 * UNIT) == Claim(a.node_id, lease.token)
    assert lease.held
    await la.close()
    await lb.close()


async def test_a_lease_taken_while_its_node_was_away_is_lost_not_overwritten(memory: Cluster):
    """Node a stays cut off past the settle grace; b claims a's key meanwhile. When a is back,
    the claim stays b's and a's owner is told who has it, before a counts as ready."""
    a, b = await memory.node("a"), await memory.node("b")
    lost: list[Claim | None] = []
    la, lb = Leases(a, 5), Leases(b, 5)
    key = memory.key()
    lease = await la.claim(key, on_lost=lost.append)
    assert lease is not None
    memory.bus.stop()
    link_of(a).cut = True
    await eventually(lambda: _down(a), "a noticed")
    memory.bus.start()
    await eventually(lambda: _ready(b), "b is back", timeout=3 * UNIT)
    theirs = await asyncio.wait_for(lb.claim(key), 5 * UNIT)  # after the grace: a is late
    assert theirs is not None and theirs.held
    link_of(a).cut = False
    await eventually(lambda: _ready(a), "a is back", timeout=3 * UNIT)
    assert lost == [Claim(b.node_id, theirs.token)]
    assert not lease.held and la.get(key) is None
    assert await a.lookup(key) == Claim(b.node_id, theirs.token)
    await la.close()
    await lb.close()


async def test_a_lease_taken_during_the_outage_replaces_the_older_one_afterwards(memory: Cluster):
    """A newer socket takes a's key on b while the store is away (held on b only). When the
    store is back, a claims its lease again first; then b takes it as ``take`` does: a is
    evicted and told, whatever order the two nodes reconnected in."""
    a, b = await memory.node("a"), await memory.node("b")
    la, lb = Leases(a, 5), Leases(b, 5)
    key = memory.key()
    old = await la.claim(key)
    assert old is not None
    memory.bus.stop()
    await eventually(lambda: _down(a), "a noticed")
    await eventually(lambda: _down(b), "b noticed")
    evicted: list[Claim] = []

    async def evict(holder: Claim) -> None:
        evicted.append(holder)

    new = await lb.take(key, evict)
    assert not new.held
    memory.bus.start()

    async def taken() -> bool:
        return new.held

    await eventually(taken, "b's lease claimed", timeout=5 * UNIT)
    assert evicted == [Claim(a.node_id, old.token)]
    assert await a.lookup(key) == Claim(b.node_id, new.token)
    await la.close()
    await lb.close()


async def test_a_release_while_the_node_is_cut_off_is_done_when_it_is_back(memory: Cluster):
    """Only node a loses the store (the store keeps its data): a lease it gives back meanwhile
    is released when a reconnects, not left to expire, and not claimed again."""
    a, b = await memory.node("a"), await memory.node("b")
    la, lb = Leases(a, 60), Leases(b, 60)
    key = memory.key()
    lease = await la.claim(key)
    assert lease is not None
    link_of(a).cut = True
    link_of(a).lose("cut off")
    await eventually(lambda: _down(a), "a noticed")
    await la.release(lease)
    assert await b.lookup(key) == Claim(a.node_id, lease.token)  # still in the store
    link_of(a).cut = False
    await eventually(lambda: _ready(a), "a is back", timeout=3 * UNIT)
    assert await b.lookup(key) is None
    assert await lb.claim(key) is not None
    await la.close()
    await lb.close()


async def test_a_claim_the_store_does_not_answer_promptly_is_held_here_meanwhile(
    redis_cluster: Cluster, r: Any
):
    """``answer_within``: Redis hangs (CLIENT PAUSE); the claim answers within the bound with a
    lease held here only, and is claimed in Redis once Redis answers."""
    a = await redis_cluster.node("a")
    la = Leases(a, 5)
    key = redis_cluster.key()
    await r.execute_command("CLIENT", "PAUSE", str(int(600 * UNIT)), "WRITE")
    lease = await asyncio.wait_for(la.claim(key, answer_within=0.1), 0.5 * UNIT)
    assert lease is not None and not lease.held

    async def held() -> bool:
        return lease.held

    await eventually(held, "claimed once Redis answers", timeout=5 * UNIT)
    assert await a.lookup(key) == Claim(a.node_id, lease.token)
    await la.close()


async def test_a_late_answer_that_the_key_is_taken_tells_the_owner(redis_cluster: Cluster, r: Any):
    a, b = await redis_cluster.node("a"), await redis_cluster.node("b")
    la, lb = Leases(a, 5), Leases(b, 5)
    key = redis_cluster.key()
    theirs = await lb.claim(key)
    assert theirs is not None
    lost: list[Claim | None] = []
    await r.execute_command("CLIENT", "PAUSE", str(int(500 * UNIT)), "WRITE")
    lease = await la.claim(key, on_lost=lost.append, answer_within=0.1)
    assert lease is not None and not lease.held

    async def told() -> bool:
        return bool(lost)

    await eventually(told, "the owner told", timeout=5 * UNIT)
    assert lost == [Claim(b.node_id, theirs.token)] and la.get(key) is None
    await la.close()
    await lb.close()


# --- streams ---


class Sink:
    """A stream's local end that records what it gets, and may hold the credit back."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.endings: list[str] = []
        self.reading = asyncio.Event()
        self.reading.set()
        self.got = asyncio.Event()

    def deliver(self, frames: list[tuple[int, bytes]]) -> Any:
        self.frames += frames
        self.got.set()
        return None if self.reading.is_set() else self.reading.wait()

    def ended(self, reason: str) -> None:
        self.endings.append(reason)

    async def until(self, count: int) -> None:
        async with asyncio.timeout(5 * UNIT):
            while len(self.frames) < count:
                self.got.clear()
                await self.got.wait()


async def pair(cluster: Cluster, **kwargs: Any):
    a, b = await cluster.node("a"), await cluster.node("b")
    options = {"window": 64 * 1024, "outbox_bytes": 1 << 20, "wait_timeout": 5 * UNIT, **kwargs}
    sa, sb = Streams(a, **options), Streams(b, **options)
    sink_a, sink_b = Sink(), Sink()
    left = sa.open("left", b.node_id, "right", sink_a)
    right = sb.open("right", a.node_id, "left", sink_b)
    return (sa, sb), (left, right), (sink_a, sink_b)


async def test_frames_arrive_in_order_with_their_type(cluster: Cluster):
    (sa, sb), (left, right), (sink_a, sink_b) = await pair(cluster)
    sent = [(1 + i % 2, f"frame {i}".encode() * (i % 7 + 1)) for i in range(300)]
    for opcode, data in sent:
        assert left.send(opcode, data) is None
    await sink_b.until(len(sent))
    assert sink_b.frames == sent
    right.send(2, b"back")
    await sink_a.until(1)
    assert sink_a.frames == [(2, b"back")]
    await sa.close()
    await sb.close()


async def test_the_window_holds_the_writer_until_the_reader_reads(cluster: Cluster):
    (sa, sb), (left, _), (_, sink_b) = await pair(cluster, window=64 * 1024)
    sink_b.reading.clear()  # the reader does not read: no credit comes back
    chunk = b"x" * 16 * 1024
    for _ in range(12):  # 192 KiB: three windows
        left.send(2, chunk)
    await sink_b.until(4)
    await asyncio.sleep(0.3 * UNIT)
    assert len(sink_b.frames) == 4  # one window on its way, no more
    assert left.unacked == 64 * 1024
    sink_b.reading.set()  # it reads: the rest follows
    await sink_b.until(12)
    await eventually(lambda: _zero(left), "every byte acknowledged")
    await sa.close()
    await sb.close()


async def _zero(stream: Any) -> bool:
    return stream.unacked == 0


async def test_a_full_outbox_makes_the_writer_wait(cluster: Cluster):
    (sa, sb), (left, _), (_, sink_b) = await pair(cluster, window=64 * 1024, outbox_bytes=32 * 1024)
    sink_b.reading.clear()
    sends = [left.send(2, b"y" * 16 * 1024) for _ in range(10)]
    waits = [w for w in sends if w is not None]  # past 32 KiB queued: the writer must wait
    assert waits and sends[0] is None
    done = asyncio.ensure_future(asyncio.gather(*waits))
    await asyncio.sleep(0.3 * UNIT)
    assert not done.done()
    sink_b.reading.set()
    await asyncio.wait_for(done, 5 * UNIT)
    await sink_b.until(10)
    await sa.close()
    await sb.close()


async def test_close_sends_what_is_queued_then_ends_the_other_side(cluster: Cluster):
    """No frame written before a close is lost."""
    (sa, sb), (left, right), (sink_a, sink_b) = await pair(cluster)
    for i in range(50):
        left.send(1, b"last words %d" % i)
    left.close()
    await eventually(lambda: _ended(sink_b), "the other side ended")
    assert len(sink_b.frames) == 50 and sink_b.endings == ["peer closed"]
    assert right.ended and sb.get("right") is None and sa.get("left") is None
    assert sink_a.endings == []  # the closing side is not told about its own close
    await sa.close()
    await sb.close()


async def _ended(sink: Sink) -> bool:
    return bool(sink.endings)


async def test_a_stream_to_a_node_that_is_gone_ends(cluster: Cluster):
    a = await cluster.node("a")
    streams = Streams(a, window=65536, outbox_bytes=1 << 20, wait_timeout=5 * UNIT)
    sink = Sink()
    stream = streams.open("orphan", f"{cluster.uid}-nowhere", "other", sink)
    stream.send(2, b"hello")
    await eventually(lambda: _ended(sink), "the stream ended")
    assert sink.endings == ["the peer's node is unreachable"] and stream.ended
    await streams.close()


async def test_a_reader_that_never_reads_ends_the_stream_after_the_wait(cluster: Cluster):
    (sa, sb), (left, _), (sink_a, sink_b) = await pair(
        cluster, window=64 * 1024, wait_timeout=0.5 * UNIT
    )
    sink_b.reading.clear()
    for _ in range(8):
        left.send(2, b"z" * 16 * 1024)
    await eventually(lambda: _ended(sink_a), "the writer's side ended", timeout=5 * UNIT)
    assert sink_a.endings == ["the peer's node is unreachable"]
    await sa.close()
    await sb.close()


async def test_malformed_stream_messages_are_refused(cluster: Cluster):
    from polysignal.core.errors import MalformedFrame

    a = await cluster.node("a")
    streams = Streams(a, window=65536, outbox_bytes=1 << 20, wait_timeout=1.0)
    for payload in (
        b"\xc1",
        b"\x90",
        b"\x93\xa1x\xa1y\x91\x01",
        b"\x93\xa1x\xa1y\x92\xa1a\xc4\x00",
    ):
        with pytest.raises(MalformedFrame):
            streams._on_data("n", payload)
    for payload in (b"\x92\xa1x\xa1y", b"\x92\x01\x02", b"\x92\xa1x\xff"):
        with pytest.raises(MalformedFrame):
            streams._on_ack("n", payload)
    with pytest.raises(MalformedFrame):
        streams._on_close("n", b"\x91\x01")
    await streams.close()
