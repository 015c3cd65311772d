"""Token bucket and per-address counting with an explicit clock."""

from __future__ import annotations

from polysignal.core.limits import AddressCounter, FailureWindow, TokenBucket


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


# --- FailureWindow (POST /app's wrong passwords per address) ---------------------------------


def test_the_failure_window_at_its_exact_boundaries():
    failures = FailureWindow(limit=5, window=60.0, now=100.0)
    now = 100.0
    for n in range(5):
        assert failures.retry_after("a", now) is None
        assert failures.record("a", now) == n + 1
        now += 1.0  # failures at 100, 101, ..., 104
    assert failures.retry_after("a", 105.0) == 55  # until the first, at 100, leaves the window
    assert failures.retry_after("b", 105.0) is None
    assert failures.retry_after("a", 159.5) == 1  # never 0: a client told 0 comes back at once
    assert failures.retry_after("a", 160.0) is None  # the first is exactly 60 s old: gone
    assert failures.record("a", 160.0) == 5
    assert failures.retry_after("a", 160.0) == 1  # the next oldest, at 101, leaves in 1 s


def test_one_failure_short_of_the_limit_may_try_again():
    failures = FailureWindow(limit=2, window=10.0, now=0.0)
    assert failures.record("a", 0.0) == 1
    assert failures.retry_after("a", 0.0) is None
    assert failures.record("a", 0.0) == 2
    assert failures.retry_after("a", 0.0) == 10


def test_without_a_limit_nothing_is_counted():
    failures = FailureWindow(limit=0, window=60.0, now=0.0)
    assert failures.record("a", 0.0) == 0
    assert failures.retry_after("a", 0.0) is None
    assert len(failures) == 0


def test_addresses_whose_failures_left_the_window_are_forgotten():
    failures = FailureWindow(limit=5, window=60.0, now=0.0)
    for n in range(1000):
        failures.record(f"10.0.{n // 256}.{n % 256}", 0.0)
    assert len(failures) == 1000
    failures.record("192.0.2.1", 59.9)  # not yet a window since the last sweep
    assert len(failures) == 1001
    failures.record("192.0.2.2", 60.0)  # the sweep drops every address whose failures left
    assert len(failures) == 2
    assert failures.retry_after("192.0.2.1", 60.0) is None
    assert failures.record("192.0.2.1", 60.0) == 2
