"""RetryPolicy: validation, backoff growth and cap, jitter bounds, which errors retry."""

from __future__ import annotations

import random
from typing import Any

import pytest

from stepflow.errors import DefinitionError
from stepflow.retry import RetryPolicy


class Transient(Exception):
    pass


class Permanent(Transient):
    pass


def test_defaults() -> None:
    policy = RetryPolicy()
    assert policy.retries == 0
    assert policy.max_attempts == 1
    assert policy.retry_on == (Exception,)
    assert policy.never_retry == ()
    assert not policy.should_retry(Transient(), 1)


def test_frozen_and_keyword_only() -> None:
    policy = RetryPolicy(retries=2)
    with pytest.raises(AttributeError):
        policy.retries = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        RetryPolicy(2)  # type: ignore[call-arg]
    assert policy == RetryPolicy(retries=2)
    assert hash(policy) == hash(RetryPolicy(retries=2))


def test_delay_grows_exponentially_without_jitter() -> None:
    policy = RetryPolicy(initial_delay=0.5, backoff=3.0, max_delay=100.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 5)] == [0.5, 1.5, 4.5, 13.5]


def test_delay_is_capped() -> None:
    policy = RetryPolicy(initial_delay=1.0, backoff=2.0, max_delay=5.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert policy.delay(10_000) == 5.0  # backoff**9999 overflows a float


def test_constant_backoff() -> None:
    policy = RetryPolicy(initial_delay=2.0, backoff=1.0, jitter=0.0)
    assert {policy.delay(n) for n in range(1, 20)} == {2.0}


def test_jitter_bounds_over_many_samples() -> None:
    policy = RetryPolicy(initial_delay=1.0, backoff=2.0, max_delay=8.0, jitter=0.25)
    rng = random.Random(1234)
    for attempt in range(1, 8):
        base = min(2.0 ** (attempt - 1), 8.0)
        samples = [policy.delay(attempt, rng) for _ in range(2000)]
        assert min(samples) >= base * 0.75
        assert max(samples) <= base * 1.25 <= 8.0 * 1.25
        # Jitter actually spreads the delays over most of the range.
        assert min(samples) < base * 0.8
        assert max(samples) > base * 1.2
        assert len(set(samples)) > 1900


def test_jitter_is_reproducible_with_a_seed() -> None:
    policy = RetryPolicy(jitter=0.5)
    first = [policy.delay(n, random.Random(7)) for n in range(1, 6)]
    second = [policy.delay(n, random.Random(7)) for n in range(1, 6)]
    assert first == second


def test_full_jitter_never_negative() -> None:
    policy = RetryPolicy(initial_delay=0.1, max_delay=1.0, jitter=1.0)
    rng = random.Random(0)
    samples = [policy.delay(n, rng) for n in range(1, 10) for _ in range(500)]
    assert min(samples) >= 0.0
    assert max(samples) <= 2.0


def test_delay_without_rng_uses_module_generator() -> None:
    policy = RetryPolicy(initial_delay=1.0, jitter=0.1)
    assert 0.9 <= policy.delay(1) <= 1.1


def test_zero_delay() -> None:
    assert RetryPolicy(initial_delay=0.0).delay(3, random.Random(1)) == 0.0


def test_delay_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="1-based"):
        RetryPolicy().delay(0)


def test_should_retry_until_exhausted() -> None:
    policy = RetryPolicy(retries=2)
    assert policy.max_attempts == 3
    assert policy.should_retry(Transient(), 1)
    assert policy.should_retry(Transient(), 2)
    assert not policy.should_retry(Transient(), 3)


def test_should_retry_respects_retry_on() -> None:
    policy = RetryPolicy(retries=3, retry_on=(TimeoutError, Transient))
    assert policy.should_retry(TimeoutError(), 1)
    assert policy.should_retry(Permanent(), 1)  # a subclass matches
    assert not policy.should_retry(KeyError("x"), 1)


def test_default_does_not_retry_base_exceptions() -> None:
    policy = RetryPolicy(retries=3)
    assert not policy.should_retry(KeyboardInterrupt(), 1)
    assert not policy.should_retry(SystemExit(), 1)


def test_never_retry_wins_over_retry_on() -> None:
    policy = RetryPolicy(retries=3, retry_on=(Transient,), never_retry=(Permanent,))
    assert policy.should_retry(Transient(), 1)
    assert not policy.should_retry(Permanent(), 1)


def test_exception_lists_and_lone_classes_become_tuples() -> None:
    policy = RetryPolicy(retries=1, retry_on=[OSError], never_retry=ValueError)  # type: ignore[arg-type]
    assert policy.retry_on == (OSError,)
    assert policy.never_retry == (ValueError,)
    assert policy.should_retry(ConnectionError(), 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"retries": -1}, "retries must be >= 0"),
        ({"retries": 1.0}, "retries must be an int"),
        ({"retries": True}, "retries must be an int"),
        ({"initial_delay": -0.1}, "initial_delay must be >= 0"),
        ({"initial_delay": float("nan")}, "initial_delay must be finite"),
        ({"initial_delay": "1"}, "initial_delay must be a number"),
        ({"backoff": 0.5}, "backoff must be >= 1"),
        ({"max_delay": -1}, "max_delay must be >= 0"),
        ({"max_delay": float("inf")}, "max_delay must be finite"),
        ({"jitter": -0.1}, "jitter must be >= 0"),
        ({"jitter": 1.5}, "jitter must be <= 1"),
        ({"retry_on": (ValueError, int)}, "retry_on must hold exception classes"),
        ({"retry_on": (ValueError())}, "retry_on must be a tuple"),
        ({"retry_on": ("ValueError",)}, "retry_on must hold exception classes"),
        ({"never_retry": (object,)}, "never_retry must hold exception classes"),
    ],
)
def test_invalid_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        RetryPolicy(**kwargs)
