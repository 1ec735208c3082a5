"""Policies a saga definition carries: retries with backoff, and what to do when a step fails.

Pure data. The state machine reads them; the shells classify exceptions with ``Retry.retryable``.
"""

from __future__ import annotations

import enum
import math
import zlib
from dataclasses import dataclass


class FailureStrategy(enum.StrEnum):
    """What happens to running siblings when a step of a DAG saga fails for good."""

    FAIL_FAST = "fail_fast"
    """Launch nothing more, cancel running siblings, then compensate."""
    WAIT_ALL = "wait_all"
    """Launch nothing more, let running siblings finish (with their retries), then compensate."""
    FAIL_FAST_WITH_GRACE = "fail_fast_with_grace"
    """Launch nothing more, give running siblings ``grace_period`` seconds, cancel the rest."""


def _check_number(owner: str, name: str, value: object, *, minimum: float,
                  maximum: float = math.inf, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise ValueError(f"{owner}.{name} must be {what}, got {value!r}")
    if not (minimum <= value <= maximum) or value != value:  # also rejects NaN
        bound = f">= {minimum}" if maximum == math.inf else f"between {minimum} and {maximum}"
        raise ValueError(f"{owner}.{name} must be {bound}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Retry:
    """How often to attempt a step (or a compensation) and how long to wait in between.

    The wait before attempt ``n + 1`` is ``min(max_backoff, backoff * multiplier ** (n - 1))``,
    shortened by up to ``jitter`` (a fraction) by an amount derived from the saga id, the step
    and the attempt, so a replay computes the same delay and many sagas do not retry in step.
    """

    attempts: int = 1
    backoff: float = 0.0
    multiplier: float = 2.0
    max_backoff: float = 60.0
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = ()
    retry_on_timeout: bool = True

    def __post_init__(self) -> None:
        _check_number("Retry", "attempts", self.attempts, minimum=1, integer=True)
        _check_number("Retry", "backoff", self.backoff, minimum=0)
        _check_number("Retry", "multiplier", self.multiplier, minimum=1)
        _check_number("Retry", "max_backoff", self.max_backoff, minimum=0)
        _check_number("Retry", "jitter", self.jitter, minimum=0, maximum=1)
        for name in ("retry_on", "give_up_on"):
            value = getattr(self, name)
            if isinstance(value, type):
                value = (value,)
                object.__setattr__(self, name, value)
            if not isinstance(value, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in value
            ):
                raise ValueError(f"Retry.{name} must be exception classes, got {value!r}")
        if not isinstance(self.retry_on_timeout, bool):
            raise ValueError(
                f"Retry.retry_on_timeout must be a bool, got {self.retry_on_timeout!r}")

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self.retry_on) and not isinstance(exc, self.give_up_on)

    def delay(self, saga_id: str, step: str, failed_attempt: int) -> float:
        """Seconds to wait after ``failed_attempt`` failed, before the next attempt."""
        if self.backoff == 0:
            return 0.0
        exp = min(failed_attempt - 1, 1000)  # keeps the power finite; the cap applies anyway
        base = min(self.max_backoff, self.backoff * self.multiplier**exp)
        if self.jitter:
            h = zlib.crc32(f"{saga_id}\x00{step}\x00{failed_attempt}".encode()) / 4294967296.0
            base *= 1.0 - self.jitter * h
        return base


NO_RETRY = Retry()
