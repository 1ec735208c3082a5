"""What a finished (or inspected) saga run looks like to its caller."""

from __future__ import annotations

from functools import cached_property
from typing import Any, NamedTuple

from sagaz.machine import Plan, SagaState, SagaStatus, StepStatus


class StepRecord(NamedTuple):
    name: str
    status: StepStatus
    attempts: int
    compensation_attempts: int
    started_at: float | None
    ended_at: float | None
    error: str | None
    compensation_error: str | None


class SagaResult:
    """The outcome of a run. Nothing is re-raised unless ``raise_on_failure`` asked for it.

    ``steps`` and ``compensation_errors`` are built from the final state when first read.
    """

    __slots__ = ("__dict__", "_plan", "_state", "context", "exception", "results")

    def __init__(self, plan: Plan, state: SagaState, context: dict[str, Any],
                 results: dict[str, Any], exception: BaseException | None = None) -> None:
        self._plan, self._state = plan, state
        self.context = context
        self.results = results
        self.exception = exception

    saga_id = property(lambda self: self._state.saga_id)
    name = property(lambda self: self._state.name)
    status = property(lambda self: self._state.status)
    error = property(lambda self: self._state.failure, doc="why the saga did not complete")
    failed_step = property(lambda self: self._state.failed_step)
    started_at = property(lambda self: self._state.started_at)
    ended_at = property(lambda self: self._state.ended_at)
    version = property(lambda self: self._state.version,
                       doc="the definition version the run started on")

    @property
    def succeeded(self) -> bool:
        return self._state.status is SagaStatus.COMPLETED

    @property
    def duration(self) -> float | None:
        st = self._state
        return None if st.ended_at is None else st.ended_at - st.started_at

    @cached_property
    def steps(self) -> dict[str, StepRecord]:
        return {
            sp.name: StepRecord(sp.name, st.status, st.attempt, st.comp_attempt, st.started_at,
                                st.ended_at, st.error, st.comp_error)
            for sp, st in zip(self._plan.steps, self._state.steps, strict=True)
        }

    @cached_property
    def compensation_errors(self) -> dict[str, str]:
        return {n: r.compensation_error for n, r in self.steps.items()
                if r.status is StepStatus.COMPENSATION_FAILED and r.compensation_error}

    def to_dict(self) -> dict[str, Any]:
        """The run's JSON: ``sagaz.run.view``, the same keys as the stores' records, the
        orchestrator's web views and the CLI (``saga``, ``data``, ``steps`` as a list)."""
        from sagaz.run import Run, view

        return view(Run(self._state, self.context, self.results), self._plan)

    def __repr__(self) -> str:
        return (f"SagaResult(saga_id={self.saga_id!r}, name={self.name!r}, "
                f"status={self.status.value!r}, error={self.error!r})")
