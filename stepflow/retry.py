"""When a failed step is tried again, and how long the engine waits first.

A step that failed on a flaky dependency (a rate-limited model API, a
restarting database) usually succeeds a little later, so the engine retries
it. Two things make retries safe rather than harmful:

- **Exponential backoff** gives a struggling dependency more room after each
  failure instead of hammering it at a fixed rate, and ``max_delay`` keeps a
  long retry chain from sleeping for hours.
- **Jitter** spreads the retries out. Without it, every run that failed in
  the same outage wakes at the same instant and hits the recovering service
  together (the "thundering herd"), often knocking it over again.

``never_retry`` names errors that will fail the same way every time (bad
input, a programming error), so retrying them only wastes the budget. The
policy is a frozen value: a ``StepSpec`` holds it and the engine only asks it
questions, so it carries no per-run state.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from stepflow.errors import DefinitionError

__all__ = ["RetryPolicy"]


def _check_number(field_name: str, value: object, *, minimum: float) -> None:
    """Reject bools, NaN and infinities too: each would make a delay meaningless."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DefinitionError(
            f"RetryPolicy.{field_name} must be a number, got {type(value).__name__}"
        )
    if not math.isfinite(value):
        raise DefinitionError(f"RetryPolicy.{field_name} must be finite, got {value!r}")
    if value < minimum:
        raise DefinitionError(f"RetryPolicy.{field_name} must be >= {minimum:g}, got {value!r}")


def _check_exception_types(field_name: str, value: object) -> tuple[type[BaseException], ...]:
    """Return ``value`` as a tuple of exception classes, as ``isinstance`` needs."""
    # A lone class or a list is an easy slip; accept it rather than fail later in isinstance.
    items = (value,) if isinstance(value, type) else value
    if not isinstance(items, (tuple, list)):
        raise DefinitionError(
            f"RetryPolicy.{field_name} must be a tuple of exception classes, "
            f"got {type(value).__name__}"
        )
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise DefinitionError(
                f"RetryPolicy.{field_name} must hold exception classes, got {item!r}"
            )
    return tuple(items)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often a step is retried and how long the engine waits between attempts.

    ``retries`` counts extra attempts, so a driver runs a step at most
    ``retries + 1`` times. Each driver counts afresh: a resume (of a failed
    run, say) or a takeover of the step gives it its retries again. The wait
    before attempt ``n + 1`` is ``initial_delay * backoff**(n-1)`` seconds,
    capped at ``max_delay``, then scaled by a random factor in
    ``[1 - jitter, 1 + jitter]``.
    """

    retries: int = 0
    """Extra attempts after the first; 0 means the first failure is final."""
    initial_delay: float = 0.1
    """Seconds to wait after the first failure."""
    backoff: float = 2.0
    """Factor the delay grows by after each further failure (>= 1)."""
    max_delay: float = 30.0
    """Cap on the delay before jitter is applied, in seconds."""
    jitter: float = 0.1
    """Fraction in [0, 1] by which each delay is randomly stretched or shrunk."""
    retry_on: tuple[type[BaseException], ...] = field(default=(Exception,))
    """Only errors of these classes are retried."""
    never_retry: tuple[type[BaseException], ...] = ()
    """Errors of these classes are never retried, even if ``retry_on`` matches."""

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int):
            raise DefinitionError(
                f"RetryPolicy.retries must be an int, got {type(self.retries).__name__}"
            )
        if self.retries < 0:
            raise DefinitionError(f"RetryPolicy.retries must be >= 0, got {self.retries}")
        _check_number("initial_delay", self.initial_delay, minimum=0.0)
        _check_number("backoff", self.backoff, minimum=1.0)
        _check_number("max_delay", self.max_delay, minimum=0.0)
        _check_number("jitter", self.jitter, minimum=0.0)
        if self.jitter > 1:
            raise DefinitionError(f"RetryPolicy.jitter must be <= 1, got {self.jitter!r}")
        # Frozen: normalising a list or lone class to a tuple needs object.__setattr__.
        object.__setattr__(self, "retry_on", _check_exception_types("retry_on", self.retry_on))
        object.__setattr__(
            self, "never_retry", _check_exception_types("never_retry", self.never_retry)
        )

    @property
    def max_attempts(self) -> int:
        """Total attempts a driver gives a step: the first plus ``retries``."""
        return self.retries + 1

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether to try again after attempt number ``attempt`` (1-based) raised ``exc``."""
        if attempt > self.retries:
            return False
        if isinstance(exc, self.never_retry):
            return False
        return isinstance(exc, self.retry_on)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after attempt number ``attempt`` (1-based) failed.

        Pass a seeded ``rng`` for reproducible delays in tests; without one the
        module-level generator is used.
        """
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt}")
        try:
            base = self.initial_delay * self.backoff ** (attempt - 1)
        except OverflowError:  # a long retry chain; the cap applies anyway
            base = self.max_delay
        base = min(base, self.max_delay)
        if self.jitter:
            uniform = rng.uniform if rng is not None else random.uniform
            base *= uniform(1.0 - self.jitter, 1.0 + self.jitter)
        # Float rounding in uniform() could step an ulp outside the promised range.
        return min(max(base, 0.0), self.max_delay * (1.0 + self.jitter))
