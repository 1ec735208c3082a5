"""Command dispatch is exhaustive: every command kind of the machine is handled by both shells,
and a kind neither knows is an error, not silently dropped (mypy checks the same statically:
both dispatch with ``match`` ending in ``assert_never``)."""

from __future__ import annotations

import inspect
from typing import NamedTuple, get_args

import pytest

from sagaz import Saga, SagaContext
from sagaz import machine as m
from sagaz import run as run_record
from sagaz.engine import Engine, _Run
from streams.orchestrator import Orchestrator, Topics

COMMANDS = get_args(m.Command)
EVENTS = get_args(m.Event)


def samples() -> list[m.Command]:
    return [m.RunStep("a", 1, "s1"), m.RunCompensation("a", 1, "s1"), m.CancelStep("a", 1),
            m.CancelCompensation("a", 1), m.ScheduleTimer("retry|a|2", 1e12),
            m.CancelTimer("retry|a|2"), m.Finish(m.SagaStatus.COMPLETED)]


def test_the_command_union_names_every_command_class() -> None:
    tuples = {c for _, c in inspect.getmembers(m, inspect.isclass)
              if c.__module__ == m.__name__ and issubclass(c, tuple) and hasattr(c, "_fields")}
    assert tuples - set(EVENTS) - {m.StepPlan} == set(COMMANDS)
    assert {type(c) for c in samples()} == set(COMMANDS)


class Unknown(NamedTuple):
    step: str


def saga() -> Saga:
    s = Saga("dispatch")

    async def a(ctx: SagaContext) -> None:
        return None

    s.add_step("a", a, a)
    return s


async def test_the_engine_handles_every_command_kind() -> None:
    definition = saga()
    rec, _ = run_record.start(definition.plan, "s1", {}, 0.0, confirms_cancel=True)
    run = _Run(Engine(), definition, definition.plan, rec)
    for cmd in samples():
        run.execute([cmd])  # raises on a kind it does not handle
    assert len(run.queue) == 4  # the run and compensation outcomes, two cancellations
    await run.settle()
    with pytest.raises(AssertionError):
        run.execute([Unknown("a")])  # type: ignore[list-item]


def test_the_orchestrator_handles_every_command_kind() -> None:
    definition = saga()
    orch = Orchestrator([definition], Topics("t"))
    rec, _ = run_record.start(definition.plan, "s1", {}, 0.0)
    for cmd in samples():
        orch._translate(definition, rec, [cmd])
    sends, timers, disarmed = orch._translate(definition, rec, samples())
    assert [t for t, _, _ in sends] == ["t.participant.dispatch"] * 2 + ["t.outcomes"]
    assert timers == [(1e12, "retry|a|2")] and disarmed == ["retry|a|2"]
    with pytest.raises(AssertionError):
        orch._translate(definition, rec, [Unknown("a")])  # type: ignore[list-item]
