"""Token bucket and per-address counting with an explicit clock."""

from __future__ import annotations

from polysignal.core.limits import AddressCounter, TokenBucket


def test_bucket_allows_burst_then_refills_at_rate():
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow(0.05) is False  # half a token
    assert bucket.allow(0.1) is True  # one token after 0.1 s at 10/s
    assert bucket.allow(0.1) is False


def test_bucket_never_exceeds_burst_after_idling():
    bucket = TokenBucket(rate=100, burst=2, now=0.0)
    assert bucket.allow(1000.0) and bucket.allow(1000.0)
    assert not bucket.allow(1000.0)


def test_bucket_rate_zero_means_unlimited():
    bucket = TokenBucket(rate=0, burst=1, now=0.0)
    assert all(bucket.allow(0.0) for _ in range(1000))


def test_bucket_clock_going_backwards_adds_nothing():
    bucket = TokenBucket(rate=10, burst=1, now=5.0)
    assert bucket.allow(5.0)
    assert not bucket.allow(4.0)


def test_address_counter_limit_and_release():
    counter = AddressCounter(limit=2)
    assert counter.acquire("1.2.3.4") and counter.acquire("1.2.3.4")
    assert not counter.acquire("1.2.3.4")
    assert counter.acquire("5.6.7.8")
    counter.release("1.2.3.4")
    assert counter.count("1.2.3.4") == 1
    assert counter.acquire("1.2.3.4")
    counter.release("5.6.7.8")
    assert counter.count("5.6.7.8") == 0


def test_address_counter_zero_is_unlimited():
    counter = AddressCounter(limit=0)
    assert all(counter.acquire("a") for _ in range(10_000))
