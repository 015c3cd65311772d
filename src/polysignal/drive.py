"""Running a rule of ``core/`` that needs answers from the cluster before it can go on.

Such a rule is a generator (docs/architecture.md, "Machines and effects"): it yields each
request (an ``Op`` of its module, or of ``core/effects.py``), is sent the answer, and returns its
result. ``drive`` runs one against ``perform``, the caller's way of carrying a request out: a
backend call, a message to another node, a wait. A failure of ``perform`` that the rule handles
itself (``thrown``) is thrown into it at the point of its request; any other propagates, and the
rule is closed either way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

R = TypeVar("R")
T = TypeVar("T")


async def drive(
    steps: Generator[R, Any, T],
    perform: Callable[[R], Awaitable[Any]],
    thrown: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> T:
    """Carry out what ``steps`` asks, in order, sending each answer back (each failure of kind
    ``thrown`` thrown in) until it returns its result."""
    answer: Any = None
    error: BaseException | None = None
    try:
        while True:
            try:
                op = steps.throw(error) if error is not None else steps.send(answer)
            except StopIteration as stop:
                result: T = stop.value
                return result
            error = None
            try:
                answer = await perform(op)
            except thrown as exc:
                error = exc
    finally:
        steps.close()
