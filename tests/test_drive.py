"""``drive`` (polysignal/drive.py): a rule's requests carried out in order, answers sent back,
the failures it handles thrown in, the others raised, the rule closed either way."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from polysignal.drive import drive


class Down(Exception):
    pass


class Bug(Exception):
    pass


def rule(log: list[str]) -> Generator[str, Any, str]:
    try:
        first = yield "ask 1"
        try:
            second = yield "ask 2"
        except Down:
            second = "handled"
        return f"{first}+{second}"
    finally:
        log.append("closed")


async def test_answers_go_back_in_order_until_the_result() -> None:
    asked: list[str] = []
    log: list[str] = []

    async def perform(op: str) -> str:
        asked.append(op)
        return op.upper()

    assert await drive(rule(log), perform) == "ASK 1+ASK 2"
    assert (asked, log) == (["ask 1", "ask 2"], ["closed"])


async def test_a_failure_the_rule_handles_is_thrown_in() -> None:
    log: list[str] = []

    async def perform(op: str) -> str:
        if op == "ask 2":
            raise Down
        return "one"

    assert await drive(rule(log), perform, Down) == "one+handled"
    assert log == ["closed"]


async def test_any_other_failure_is_raised_and_the_rule_closed() -> None:
    log: list[str] = []

    async def perform(op: str) -> str:
        raise Bug(op)

    with pytest.raises(Bug, match="ask 1"):
        await drive(rule(log), perform, Down)
    assert log == ["closed"]


async def test_a_failure_thrown_in_that_the_rule_does_not_handle_is_raised() -> None:
    log: list[str] = []

    async def perform(op: str) -> str:
        raise Down

    with pytest.raises(Down):
        await drive(rule(log), perform, Down)  # "ask 1" is not inside the rule's try
    assert log == ["closed"]
