"""Exceptions raised by sagaz. Each message names what is wrong."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sagaz.result import SagaResult


def describe(exc: BaseException) -> str:
    """'Type: message' (or just the type): how step errors are recorded and reported."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SagazError(Exception):
    """Base of every sagaz exception."""


class SagaDefinitionError(SagazError, ValueError):
    """The saga definition is invalid: unknown dependency, cycle, duplicate, non-async step..."""


class SagaContextError(SagazError, TypeError):
    """A context value (or step result) cannot be serialised for transport."""


class SagaFailed(SagazError):
    """Raised by ``execute(..., raise_on_failure=True)`` when a saga did not complete."""

    def __init__(self, result: SagaResult) -> None:
        self.result = result
        super().__init__(
            f"saga {result.name!r} ({result.saga_id}) ended {result.status.value}: {result.error}"
        )
