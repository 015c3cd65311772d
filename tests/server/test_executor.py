"""server/executor.py: the background work and the deadline timer every hub uses."""

from __future__ import annotations

import asyncio
import logging

from polysignal.server.executor import Background, DeadlineTimer

from support import UNIT, until

log = logging.getLogger("test.executor")


class Machine:
    def __init__(self) -> None:
        self.deadlines: list[float] = []
        self.fired: list[float] = []

    def next_deadline(self) -> float | None:
        return min(self.deadlines, default=None)

    def on_timer(self, now: float) -> None:
        self.fired.append(now)
        self.deadlines = [d for d in self.deadlines if d > now]


async def test_the_timer_fires_at_the_earliest_deadline_and_again_for_the_next():
    machine, background = Machine(), Background(log)
    timer = DeadlineTimer(machine.next_deadline, machine.on_timer, background)
    timer.arm()  # nothing due: no timer
    assert machine.fired == []
    start = timer.now()
    machine.deadlines = [start + 0.2 * UNIT]
    timer.arm()
    machine.deadlines.append(start + 0.05 * UNIT)  # an earlier one replaces the armed timer
    timer.arm()
    await until(lambda: len(machine.fired) == 2)
    first, second = machine.fired
    assert start + 0.05 * UNIT <= first < start + 0.2 * UNIT <= second


async def test_a_cancelled_timer_does_not_fire():
    machine, background = Machine(), Background(log)
    timer = DeadlineTimer(machine.next_deadline, machine.on_timer, background)
    machine.deadlines = [timer.now() + 0.05 * UNIT]
    timer.arm()
    timer.cancel()
    await asyncio.sleep(0.1 * UNIT)
    assert machine.fired == []


async def test_background_work_is_stopped_and_its_failures_logged(caplog):
    background = Background(log)
    gate = asyncio.Event()
    started = asyncio.Event()

    async def waits() -> None:
        started.set()
        await gate.wait()

    async def fails() -> None:
        raise RuntimeError("a bug")

    background.run(None)
    background.run(waits())
    with caplog.at_level(logging.ERROR, "test.executor"):
        background.run(fails())
        await until(lambda: any(r.exc_info for r in caplog.records))
    assert caplog.records[-1].getMessage() == "background work failed"
    await started.wait()
    await background.settle(0.05 * UNIT)  # still waiting: settle gives up after its grace
    await background.stop()
    assert not gate.is_set()


async def test_settle_returns_once_the_work_is_done():
    background = Background(log)
    done = asyncio.Event()

    async def quick() -> None:
        await asyncio.sleep(0)
        done.set()

    background.run(quick())
    await background.settle(5 * UNIT)
    assert done.is_set()
