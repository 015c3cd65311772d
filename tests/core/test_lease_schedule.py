"""Leases without I/O (core/lease.py): the TTL's floor, the renewal schedule, what a round does
for each lease and asks of the backend, what each answer means, and the book of leases."""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import pytest

from polysignal.core.lease import (
    MIN_TTL,
    TAKE_ATTEMPTS,
    ClaimOp,
    EvictOp,
    LeaseBook,
    LeaseState,
    LookupOp,
    ReleaseOp,
    RenewalSchedule,
    RenewOp,
    Step,
    Verdict,
    check_ttl,
)


@dataclass(eq=False)
class Lease(LeaseState):
    """A lease with the executor's two facts settable."""

    pending: bool = False
    evicts: bool = False

    @property
    def answering(self) -> bool:
        return self.pending

    @property
    def taking(self) -> bool:
        return self.evicts


@dataclass(frozen=True)
class Holder:
    node_id: str
    token: str


def drive(steps: Generator[Any, Any, Any], answer: Callable[[Any], Any]):
    """Run ``steps``, answering each op with ``answer(op)``: (ops, result)."""
    ops: list[Any] = []
    reply: Any = None
    while True:
        try:
            op = steps.send(reply)
        except StopIteration as stop:
            return ops, stop.value
        ops.append(op)
        reply = answer(op)


def script(*answers: Any) -> Callable[[Any], Any]:
    """Answer the ops in turn with ``answers``."""
    queue = list(answers)
    return lambda op: queue.pop(0)


# --- the TTL and the schedule ---


def test_a_ttl_of_exactly_the_minimum_is_accepted_and_just_under_refused():
    assert check_ttl(1.0) == 1.0 and MIN_TTL == 1.0
    assert check_ttl(5) == 5.0 and isinstance(check_ttl(5), float)
    with pytest.raises(ValueError) as caught:
        check_ttl(0.999)
    assert str(caught.value) == "a lease TTL must be at least 1 s, not 0.999"


def test_a_full_round_is_due_every_third_of_the_ttl():
    schedule = RenewalSchedule(3.0, 100.0)
    assert schedule.every == 1.0 and schedule.due == 101.0
    assert schedule.start(100.5) is False  # woken early: the next full round stays due
    assert schedule.due == 101.0
    assert schedule.start(101.0) is True  # exactly due
    assert schedule.due == 102.0
    assert schedule.start(105.0) is True
    assert schedule.due == 106.0


# --- what a round does ---


@pytest.mark.parametrize(
    ("lease", "full", "step"),
    [
        (Lease("k", "t", held=True), True, Step.RENEW),
        (Lease("k", "t", held=True), False, Step.SKIP),
        (Lease("k", "t"), True, Step.CLAIM),
        (Lease("k", "t"), False, Step.CLAIM),
        (Lease("k", "t", evicts=True), False, Step.TAKE),
        (Lease("k", "t", held=True, evicts=True), True, Step.RENEW),
        (Lease("k", "t", released=True), True, Step.SKIP),
        (Lease("k", "t", held=True, released=True), True, Step.SKIP),
        (Lease("k", "t", pending=True), True, Step.SKIP),
    ],
)
def test_each_lease_gets_its_step(lease, full, step):
    assert lease.step(full) is step


def test_the_base_lease_is_neither_answering_nor_taking():
    lease = LeaseState("k", "t")
    assert not lease.answering and not lease.taking
    assert lease.step(True) is Step.CLAIM


def test_a_skipped_lease_asks_nothing():
    ops, verdict = drive(Lease("k", "t", released=True).renewal(True), script())
    assert ops == [] and verdict is None


def test_a_held_lease_renewed_stays_held():
    lease = Lease("k", "t", held=True)
    ops, verdict = drive(lease.renewal(True), script(True))
    assert ops == [RenewOp("k", "t")] and verdict is Verdict.HELD and lease.held


def test_a_lease_the_backend_lost_is_claimed_again_never_taken():
    lease = Lease("k", "t", held=True, evicts=True)
    ops, verdict = drive(lease.renewal(True), script(False, True))
    assert ops == [RenewOp("k", "t"), ClaimOp("k", "t")]
    assert verdict is Verdict.HELD and lease.held
    lease = Lease("k", "t", held=True, evicts=True)
    ops, verdict = drive(lease.renewal(True), script(False, False))
    assert ops == [RenewOp("k", "t"), ClaimOp("k", "t")] and verdict is Verdict.LOST


def test_a_lease_held_here_only_is_claimed():
    lease = Lease("k", "t")
    ops, verdict = drive(lease.renewal(False), script(True))
    assert ops == [ClaimOp("k", "t")] and verdict is Verdict.REGAINED and lease.held
    lease = Lease("k", "t")
    ops, verdict = drive(lease.renewal(False), script(False))
    assert verdict is Verdict.LOST and not lease.held


def test_a_lease_released_while_its_claim_was_on_its_way_is_gone():
    lease = Lease("k", "t")
    steps = lease.renewal(True)
    assert steps.send(None) == ClaimOp("k", "t")
    lease.released = True
    with pytest.raises(StopIteration) as stop:
        steps.send(False)
    assert stop.value.value is Verdict.GONE


def test_a_lease_made_by_a_take_is_taken_again():
    lease = Lease("k", "t", evicts=True)
    ops, verdict = drive(lease.renewal(False), script(True))
    assert ops == [ClaimOp("k", "t")] and verdict is Verdict.REGAINED
    lease = Lease("k", "t", evicts=True)
    answers = [False, None] * TAKE_ATTEMPTS
    ops, verdict = drive(lease.renewal(False), script(*answers))
    assert len(ops) == 2 * TAKE_ATTEMPTS == 8 and verdict is Verdict.LOST


# --- taking ---


def test_a_take_of_a_free_key_claims_it():
    ops, ok = drive(LeaseState("k", "t").take(TAKE_ATTEMPTS), script(True))
    assert ops == [ClaimOp("k", "t")] and ok is True


def test_a_take_releases_and_evicts_the_holder_then_claims():
    holder = Holder("node-b", "theirs")
    ops, ok = drive(
        LeaseState("k", "t").take(TAKE_ATTEMPTS), script(False, holder, True, None, True)
    )
    assert ops == [
        ClaimOp("k", "t"),
        LookupOp("k"),
        ReleaseOp("k", "theirs"),
        EvictOp(holder),
        ClaimOp("k", "t"),
    ]
    assert ok is True


def test_a_holder_gone_in_between_is_not_evicted():
    ops, ok = drive(LeaseState("k", "t").take(TAKE_ATTEMPTS), script(False, None, True))
    assert ops == [ClaimOp("k", "t"), LookupOp("k"), ClaimOp("k", "t")] and ok is True


def test_a_take_gives_up_after_exactly_its_attempts():
    holder = Holder("node-b", "theirs")
    answers = [False, holder, True, None] * 2
    ops, ok = drive(LeaseState("k", "t").take(2), script(*answers))
    assert ok is False and len(ops) == 8
    assert [type(op) for op in ops] == [ClaimOp, LookupOp, ReleaseOp, EvictOp] * 2
    ops, ok = drive(LeaseState("k", "t").take(0), script())
    assert ops == [] and ok is False


# --- what an answer means ---


def test_a_claim_granted_holds_the_lease():
    held = LeaseState("k", "t", held=True)
    assert held.claimed(True) is Verdict.HELD and held.held
    here = LeaseState("k", "t")
    assert here.claimed(True) is Verdict.REGAINED and here.held


def test_a_claim_refused_loses_the_lease_unless_it_was_released():
    assert LeaseState("k", "t", held=True).claimed(False) is Verdict.LOST
    released = LeaseState("k", "t", released=True)
    assert released.claimed(False) is Verdict.GONE
    assert LeaseState("k", "t", held=True).held  # claimed() does not drop it: the book does


def test_a_late_answer_to_a_first_claim():
    granted = LeaseState("k", "t")
    assert granted.answered(True) is Verdict.REGAINED and granted.held
    refused = LeaseState("k", "t")
    assert refused.answered(False) is Verdict.LOST and not refused.held
    given_back = LeaseState("k", "t", released=True)
    assert given_back.answered(True) is Verdict.GIVE_BACK and not given_back.held
    gone = LeaseState("k", "t", released=True)
    assert gone.answered(False) is Verdict.GONE


# --- the book ---


def test_the_book_keeps_the_newest_lease_of_a_key():
    book: LeaseBook[LeaseState] = LeaseBook()
    old, new = LeaseState("k", "t1"), LeaseState("k", "t2")
    book.keep(old)
    book.keep(old)
    assert not old.released and len(book) == 1
    book.keep(new)
    assert old.released and not new.released
    assert book.get("k") is new and len(book) == 1
    assert book.get("other") is None


def test_forgetting_stops_the_renewals_of_that_lease_only():
    book: LeaseBook[LeaseState] = LeaseBook()
    old, new = LeaseState("k", "t1"), LeaseState("k", "t2")
    book.keep(old)
    book.keep(new)
    book.forget(old)
    assert book.get("k") is new
    book.forget(new)
    assert new.released and book.get("k") is None and len(book) == 0


def test_a_release_goes_to_the_backend_only_when_it_holds_the_lease():
    book: LeaseBook[LeaseState] = LeaseBook()
    held, here = LeaseState("a", "t", held=True), LeaseState("b", "t")
    book.keep(held)
    book.keep(here)
    assert book.release(held) is True
    assert not held.held and held.released and book.get("a") is None
    assert book.release(held) is False  # once
    assert book.release(here) is False
    assert here.released and len(book) == 0


def test_a_lost_lease_is_no_longer_held_nor_renewed():
    book: LeaseBook[LeaseState] = LeaseBook()
    lease = LeaseState("k", "t", held=True)
    book.keep(lease)
    book.lose(lease)
    assert not lease.held and lease.released and book.get("k") is None


def test_a_claim_lost_on_reconnect_finds_its_lease_if_still_kept():
    book: LeaseBook[LeaseState] = LeaseBook()
    lease = LeaseState("k", "t", held=True)
    book.keep(lease)
    assert book.claim_lost("other", "t") is None
    assert book.claim_lost("k", "another-token") is None
    assert lease.held
    assert book.claim_lost("k", "t") is lease
    assert not lease.held and lease.released and book.get("k") is None
    assert book.claim_lost("k", "t") is None


def test_a_released_lease_still_in_the_book_is_not_lost_again():
    book: LeaseBook[LeaseState] = LeaseBook()
    lease = LeaseState("k", "t", held=True)
    book.keep(lease)
    lease.released = True
    assert book.claim_lost("k", "t") is None and lease.held


def test_iterating_the_book_is_a_snapshot():
    book: LeaseBook[LeaseState] = LeaseBook()
    first, second = LeaseState("a", "t"), LeaseState("b", "t")
    book.keep(first)
    book.keep(second)
    seen = []
    for lease in book:
        seen.append(lease.key)
        book.forget(second)  # a round may release leases while it runs
    assert seen == ["a", "b"] and len(book) == 1
