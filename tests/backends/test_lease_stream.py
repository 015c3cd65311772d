"""Leases and streams (backends/lease.py, backends/stream.py) on every backend: memory and a real
Redis, through the same contract."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from backends.cluster import Cluster, eventually
from polysignal.backends import Claim
from polysignal.backends.lease import Leases
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
    la = Leases(a, 1.0)
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
