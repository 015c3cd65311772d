"""The claims a node holds, without I/O (core/claims.py): bookkeeping, the settling window, and
re-asserting them when the store is reached again."""

from __future__ import annotations

from typing import Any

import pytest

from polysignal.core.claims import ClaimLedger, ReclaimOp, Rejoined, ReleaseOp
from polysignal.core.errors import BackendUnavailable


def name(key: str) -> str:
    return "P:claim:" + key


def test_a_claim_is_new_unless_held_with_the_same_token():
    ledger = ClaimLedger(name)
    assert ledger.is_new("id", "t1")
    ledger.claimed("id", "t1", 5.0)
    assert not ledger.is_new("id", "t1")
    assert ledger.is_new("id", "t2")
    assert ledger.held == {"id": ("t1", 5.0)}


def test_a_claim_granted_is_no_longer_waiting_to_be_released():
    ledger = ClaimLedger(name)
    ledger.release_failed("id", "t1")
    ledger.claimed("id", "t1", 5.0)
    assert ledger.unreleased == {}


def test_a_failed_renewal_forgets_the_claim():
    ledger = ClaimLedger(name)
    ledger.claimed("id", "t1", 5.0)
    ledger.renew_failed("id")
    ledger.renew_failed("other")
    assert ledger.held == {}


def test_releasing_forgets_only_a_claim_of_the_same_token():
    ledger = ClaimLedger(name)
    ledger.claimed("id", "t1", 5.0)
    assert ledger.releasing("id", "t2") is False
    assert ledger.releasing("other", "t1") is False
    assert ledger.held == {"id": ("t1", 5.0)}
    assert ledger.releasing("id", "t1") is True
    assert ledger.held == {}


def test_the_settling_window_holds_new_claims_until_its_end():
    ledger = ClaimLedger(name)
    assert ledger.settle_wait(0.0) == 0.0
    ledger.settling(100.0, 1.5)
    assert ledger.settle_until == 101.5
    assert ledger.settle_wait(100.5) == 1.0
    assert ledger.settle_wait(101.5) == 0.0
    assert ledger.settle_wait(200.0) == 0.0


def test_the_claims_released_at_a_stop_are_the_held_and_the_unreleased_ones():
    ledger = ClaimLedger(name)
    ledger.claimed("a", "ta", 5.0)
    ledger.release_failed("b", "tb")
    ledger.release_failed("a", "old")
    assert ledger.node_claims() == {"P:claim:a": "ta", "P:claim:b": "tb"}
    ledger.removed()
    assert ledger.held == {} and ledger.unreleased == {}


def start(ledger: ClaimLedger) -> tuple[Any, ReclaimOp]:
    steps = ledger.rejoin()
    op = steps.send(None)
    assert isinstance(op, ReclaimOp)
    return steps, op


def finish(steps: Any, answer: Any) -> tuple[list[Any], Rejoined]:
    ops: list[Any] = []
    while True:
        try:
            op = steps.send(answer)
        except StopIteration as stop:
            return ops, stop.value
        ops.append(op)
        answer = True


def test_nothing_held_nothing_to_rejoin():
    ledger = ClaimLedger(name)
    steps = ledger.rejoin()
    with pytest.raises(StopIteration) as stop:
        steps.send(None)
    assert stop.value.value == Rejoined(0, [])


def test_rejoining_claims_everything_again_and_releases_what_was_given_up():
    ledger = ClaimLedger(name)
    ledger.claimed("a", "ta", 5.0)
    ledger.claimed("b", "tb", 9.0)
    ledger.release_failed("c", "tc")
    steps, op = start(ledger)
    assert op == ReclaimOp(
        {"P:claim:a": ("ta", 5.0), "P:claim:b": ("tb", 9.0)}, {"P:claim:c": "tc"}
    )
    assert ledger.unreleased == {}
    ops, result = finish(steps, {})
    assert ops == [] and result == Rejoined(2, [])
    assert ledger.held == {"a": ("ta", 5.0), "b": ("tb", 9.0)}


def test_only_releases_still_make_a_rejoin():
    ledger = ClaimLedger(name)
    ledger.release_failed("c", "tc")
    steps, op = start(ledger)
    assert op == ReclaimOp({}, {"P:claim:c": "tc"})
    assert finish(steps, {}) == ([], Rejoined(0, []))


def test_a_claim_another_holder_has_now_is_lost_not_overwritten():
    ledger = ClaimLedger(name)
    ledger.claimed("a", "ta", 5.0)
    ledger.claimed("b", "tb", 5.0)
    steps, _ = start(ledger)
    ops, result = finish(steps, {"P:claim:a": "holder-of-a"})
    assert ops == [] and result == Rejoined(1, [("a", "ta", "holder-of-a")])
    assert ledger.held == {"b": ("tb", 5.0)}


def test_a_claim_given_up_while_the_batch_was_on_its_way_is_released():
    ledger = ClaimLedger(name)
    ledger.claimed("a", "ta", 5.0)
    ledger.claimed("b", "tb", 5.0)
    steps, _ = start(ledger)
    ledger.releasing("a", "ta")  # given up meanwhile: the batch claimed it again
    ledger.releasing("b", "tb")  # given up too, but another holder has it: nothing to do
    ops, result = finish(steps, {"P:claim:b": None})
    assert ops == [ReleaseOp("P:claim:a", "ta")] and result == Rejoined(0, [])


def test_a_claim_claimed_anew_meanwhile_with_another_token_releases_the_old_one():
    ledger = ClaimLedger(name)
    ledger.claimed("a", "old", 5.0)
    steps, _ = start(ledger)
    ledger.claimed("a", "new", 5.0)
    ops, result = finish(steps, {})
    assert ops == [ReleaseOp("P:claim:a", "old")] and result == Rejoined(0, [])
    assert ledger.held == {"a": ("new", 5.0)}


def test_a_release_the_store_cannot_make_is_kept_for_the_next_time():
    ledger = ClaimLedger(name)
    ledger.claimed("a", "ta", 5.0)
    steps, _ = start(ledger)
    ledger.releasing("a", "ta")
    assert steps.send({}) == ReleaseOp("P:claim:a", "ta")
    with pytest.raises(BackendUnavailable, match=r"^away$"):
        steps.throw(BackendUnavailable("away"))
    assert ledger.unreleased == {"a": "ta"}


def test_another_failure_of_a_release_is_not_kept():
    ledger = ClaimLedger(name)
    ledger.claimed("a", "ta", 5.0)
    steps, _ = start(ledger)
    ledger.releasing("a", "ta")
    steps.send({})
    with pytest.raises(RuntimeError):
        steps.throw(RuntimeError())
    assert ledger.unreleased == {}
