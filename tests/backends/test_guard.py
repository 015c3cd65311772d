"""The one guard around what other nodes send (backends/base.py): malformed is a WARNING once
per interval, a handler's bug an ERROR with its traceback, and neither stops later messages."""

from __future__ import annotations

import asyncio
import logging

from polysignal.backends.memory import MemoryBackend, MemoryBus
from polysignal.core.errors import MalformedFrame

from support import until


async def nodes() -> tuple[MemoryBackend, MemoryBackend]:
    bus = MemoryBus()
    one, two = MemoryBackend("one", bus), MemoryBackend("two", bus)
    await one.start()
    await two.start()
    return one, two


async def test_malformed_direct_messages_are_one_warning_per_interval(caplog):
    one, two = await nodes()
    got: list[bytes] = []

    def handler(origin: str, payload: bytes) -> None:
        if payload == b"bad":
            raise MalformedFrame("invalid cluster message")
        got.append(payload)

    one.on_direct("kind", handler)
    for payload in (b"bad", b"bad", b"bad", b"good"):
        assert await two.send_direct("one", "kind", payload)
    await until(lambda: got == [b"good"])
    warnings = [r for r in caplog.records if r.name == "polysignal.backend"]
    assert [(r.levelname, r.getMessage()) for r in warnings] == [
        ("WARNING", "dropped a malformed kind message from node two: invalid cluster message")
    ]


async def test_a_handlers_bug_is_an_error_with_its_traceback_once(caplog):
    one, two = await nodes()
    calls = 0

    async def handler(origin: str, payload: bytes) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    one.on_direct("kind", handler)
    for _ in range(3):
        assert await two.send_direct("one", "kind", b"x")
    await until(lambda: calls == 3)
    await asyncio.sleep(0)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage() == "handling a kind message from node two failed"
    assert errors[0].exc_info is not None and str(errors[0].exc_info[1]) == "bug"


async def test_a_malformed_publish_is_a_warning_and_the_next_one_arrives(caplog):
    one, two = await nodes()
    got: list[bytes] = []

    def handler(topic: str, frame: bytes) -> None:
        if frame == b"bad":
            raise MalformedFrame("invalid announcement")
        got.append(frame)

    one.on_topic_message(handler, "relay")
    one.local_count_changed("doc", 1, "relay")
    await one.sync()  # the subscription is visible to the other node
    await two.publish("doc", b"bad", "relay")
    await two.publish("doc", b"good", "relay")
    await until(lambda: got == [b"good"])
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "dropped a malformed relay publish from another node: invalid announcement"
    ]
