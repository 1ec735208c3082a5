"""Invariants of the state machine on random DAGs, policies and failure schedules.

A simulated shell carries out the machine's commands. Hypothesis decides, one choice at a
time, what each attempt does (succeed, fail, fail for good, hang), in which order outcomes
arrive, when timers fire, and when an old event is delivered again. The checks are the
invariants of issue #3; see each ``assert``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagaz import machine as m
from sagaz.machine import Plan, SagaStatus, StepStatus
from sagaz.policy import FailureStrategy, Retry

EXAMPLES = int(os.environ.get("SAGAZ_HYPOTHESIS_EXAMPLES", "3000"))


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(1, 6))
    steps, retry, cretry, timeout, ctimeout, has_comp = [], {}, {}, {}, {}, {}
    for i in range(n):
        name = f"s{i}"
        deps = draw(st.lists(st.sampled_from([f"s{j}" for j in range(i)]), unique=True,
                             max_size=min(i, 3))) if i else []
        steps.append((name, deps))
        retry[name] = Retry(attempts=draw(st.integers(1, 3)),
                            backoff=draw(st.sampled_from([0.0, 0.5])),
                            jitter=draw(st.sampled_from([0.0, 0.5])),
                            retry_on_timeout=draw(st.booleans()))
        cretry[name] = Retry(attempts=draw(st.integers(1, 3)),
                             backoff=draw(st.sampled_from([0.0, 0.25])))
        timeout[name] = draw(st.sampled_from([None, 2.0]))
        ctimeout[name] = draw(st.sampled_from([None, 3.0]))
        has_comp[name] = draw(st.booleans()) or draw(st.booleans())
    strategy = draw(st.sampled_from(list(FailureStrategy)))
    return Plan.build(
        "p", steps, retry=retry, compensation_retry=cretry, timeout=timeout,
        compensation_timeout=ctimeout, has_compensation=has_comp, strategy=strategy,
        grace_period=1.5 if strategy is FailureStrategy.FAIL_FAST_WITH_GRACE else 0.0,
        deadline=draw(st.sampled_from([None, None, 6.0])),
        compensate_started=draw(st.booleans()),
    )


OUTCOMES = ["ok", "ok", "fail", "fatal", "hang", "stopped"]  # stopped: cancelled elsewhere


@dataclass
class Shell:
    """Carries out commands the way a real shell may: late, out of order, twice."""

    plan: Plan
    data: st.DataObject
    now: float = 1000.0
    state: m.SagaState | None = None
    inbox: list[tuple] = field(default_factory=list)  # outcomes not yet delivered
    timers: dict[str, float] = field(default_factory=dict)
    delivered: list[tuple] = field(default_factory=list)
    applied: list[tuple[tuple, float]] = field(default_factory=list)  # (event, now) applied
    outstanding: set[tuple[str, str, int]] = field(default_factory=set)  # attempts running
    abandoned: set[tuple[str, str, int]] = field(default_factory=set)  # cancel requested
    effects: set[tuple[str, int]] = field(default_factory=set)  # run attempts that applied
    gave_up_on: set[str] = field(default_factory=set)  # steps with a remote attempt timed out
    runs: dict[str, int] = field(default_factory=dict)  # max attempt issued per step
    comp_ok: set[str] = field(default_factory=set)
    comp_runs: list[str] = field(default_factory=list)
    finished: list[SagaStatus] = field(default_factory=list)
    aborted: bool = False
    operator: bool = False  # an operator retried compensations (past the policy's limit)

    # -- commands

    def carry_out(self, cmds: list) -> None:
        state = self.state
        assert state is not None
        assert not self.finished or not cmds, "commands after Finish"
        for cmd in cmds:
            if isinstance(cmd, m.RunStep):
                self.check_run_step(cmd)
                self.outstanding.add(("run", cmd.step, cmd.attempt))
                self.schedule_outcome("run", cmd.step, cmd.attempt)
            elif isinstance(cmd, m.RunCompensation):
                self.check_run_compensation(cmd)
                self.outstanding.add(("comp", cmd.step, cmd.attempt))
                self.schedule_outcome("comp", cmd.step, cmd.attempt)
            elif isinstance(cmd, (m.CancelStep, m.CancelCompensation)):
                kind = "run" if isinstance(cmd, m.CancelStep) else "comp"
                self.abandoned.add((kind, cmd.step, cmd.attempt))
                self.cancel(kind, cmd.step, cmd.attempt)
            elif isinstance(cmd, m.ScheduleTimer):
                assert cmd.due >= self.now
                self.timers[cmd.key] = cmd.due
            elif isinstance(cmd, m.CancelTimer):
                self.timers.pop(cmd.key, None)
            elif isinstance(cmd, m.Finish):
                self.finished.append(cmd.status)
        # The shell's armed timers are exactly the state's.
        assert self.timers == state.timers
        if state.status is not SagaStatus.RUNNING:
            self.aborted = True

    def check_run_step(self, cmd: m.RunStep) -> None:
        plan, state = self.plan, self.state
        assert state is not None
        sp = plan.steps[plan.index[cmd.step]]
        # 3. a step starts only after all its dependencies completed
        for d in sp.deps:
            assert state.steps[d].status is StepStatus.SUCCEEDED
        # 4. attempts are numbered 1, 2, ... and bounded by the policy
        assert cmd.attempt == self.runs.get(cmd.step, 0) + 1
        assert cmd.attempt <= sp.retry.attempts
        self.runs[cmd.step] = cmd.attempt
        # 3. after a failure nothing new starts (WAIT_ALL lets started steps retry)
        if self.aborted:
            assert cmd.attempt > 1 and plan.strategy is FailureStrategy.WAIT_ALL
        assert cmd.command_id == f"{state.saga_id}|{cmd.step}|{cmd.attempt}|run"

    def check_run_compensation(self, cmd: m.RunCompensation) -> None:
        plan, state = self.plan, self.state
        assert state is not None
        i = plan.index[cmd.step]
        sp = plan.steps[i]
        # 2. only steps that completed (or, by option, were started) are compensated...
        assert sp.has_compensation
        assert cmd.step in self.runs, "compensating a step that never started"
        if not plan.compensate_started:  # (an abandoned attempt may have succeeded)
            assert ("run", cmd.step) in {(k, s) for k, s, _ in self.succeeded_attempts()} \
                or cmd.step in self.gave_up_on
        # ... at most once successfully, and within the compensation retry limit
        assert cmd.step not in self.comp_ok
        assert cmd.attempt <= sp.compensation_retry.attempts or self.operator
        # ... and in reverse topological order
        for d in sp.descendants:
            if state.steps[d].to_compensate:
                assert plan.steps[d].name in self.comp_ok, (cmd.step, plan.steps[d].name)
        self.comp_runs.append(cmd.step)

    def succeeded_attempts(self):
        return [(("run" if isinstance(e, m.StepSucceeded) else "comp"), e.step, e.attempt)
                for e, _ in self.applied if isinstance(e, m.StepSucceeded)]

    def schedule_outcome(self, kind: str, step: str, attempt: int) -> None:
        sp = self.plan.steps[self.plan.index[step]]
        outcome = self.data.draw(st.sampled_from(OUTCOMES), label=f"{kind} {step}#{attempt}")
        can_hang = (sp.timeout if kind == "run" else sp.compensation_timeout) is not None
        if outcome == "hang" and not can_hang:
            outcome = "fail"
        if kind == "run":
            ev = {"ok": m.StepSucceeded(step, attempt),
                  "fail": m.StepFailed(step, attempt, "boom", True),
                  "fatal": m.StepFailed(step, attempt, "fatal", False),
                  "stopped": m.StepCancelled(step, attempt),
                  "hang": None}[outcome]
        else:
            ev = {"ok": m.CompensationSucceeded(step, attempt),
                  "fail": m.CompensationFailed(step, attempt, "boom", True),
                  "fatal": m.CompensationFailed(step, attempt, "fatal", False),
                  "stopped": m.CompensationFailed(step, attempt, "cancelled", False),
                  "hang": None}[outcome]
        if ev is not None:
            self.inbox.append(ev)
        if kind == "run" and outcome == "ok":  # the participant applied it, heard or not
            self.effects.add((step, attempt))

    def cancel(self, kind: str, step: str, attempt: int) -> None:
        """A cancelled attempt reports its real outcome (too late to stop) or that it stopped.

        A shell that does not confirm cancellations may also report nothing at all.
        """
        assert self.state is not None
        if not self.state.confirms_cancel and self.data.draw(st.booleans(), label="silent"):
            return
        if kind == "run":
            real: tuple = (m.StepSucceeded, m.StepFailed)
            stopped: tuple = m.StepCancelled(step, attempt)
        else:
            real = (m.CompensationSucceeded, m.CompensationFailed)
            stopped = m.CompensationFailed(step, attempt, "cancelled", False)
        pending = [e for e in self.inbox if e[:2] == (step, attempt) and isinstance(e, real)]
        if pending and self.data.draw(st.booleans(), label="finished before cancel"):
            return
        for e in pending:
            self.inbox.remove(e)
        if kind == "run":  # stopped before its effect
            self.effects.discard((step, attempt))
        self.inbox.append(stopped)

    # -- events

    def deliver(self, event: tuple) -> None:
        state = self.state
        assert state is not None
        before = orjson.dumps(state.to_dict())
        seq = state.seq
        _, cmds = m.handle(self.plan, state, event, self.now)
        self.delivered.append(event)
        if state.seq == seq:
            # 5. an ignored event changes nothing and asks for nothing
            assert cmds == []
            assert orjson.dumps(state.to_dict()) == before
            return
        self.applied.append((event, self.now))
        if isinstance(event, m.TimerFired) and event.key.startswith("timeout|") \
                and not state.confirms_cancel:
            self.gave_up_on.add(event.key.split("|")[1])
        if isinstance(event, m.CompensationSucceeded):
            self.comp_ok.add(event.step)
        if isinstance(event, (m.StepSucceeded, m.StepFailed, m.StepCancelled)):
            self.outstanding.discard(("run", event.step, event.attempt))
        if isinstance(event, (m.CompensationSucceeded, m.CompensationFailed)):
            self.outstanding.discard(("comp", event.step, event.attempt))
        self.carry_out(cmds)

    def run(self) -> None:
        self.state, cmds = m.start(self.plan, "saga-1", self.now,
                                   confirms_cancel=self.data.draw(st.booleans(), label="cc"))
        self.carry_out(cmds)
        self.loop()

    def loop(self) -> None:
        for _ in range(400):
            if self.finished:
                break
            choices = []
            if self.inbox:
                choices.append("deliver")
            if self.timers:
                choices.append("timer")
            if self.delivered:
                choices.append("again")
            if not self.inbox and not self.timers:
                break
            what = self.data.draw(st.sampled_from(choices), label="next")
            if what == "deliver":
                i = self.data.draw(st.integers(0, len(self.inbox) - 1), label="which")
                self.deliver(self.inbox.pop(i))
            elif what == "timer":
                key = min(self.timers, key=lambda k: (self.timers[k], k))
                self.now = max(self.now, self.timers.pop(key))
                self.deliver(m.TimerFired(key))
            else:
                i = self.data.draw(st.integers(0, len(self.delivered) - 1), label="again")
                self.deliver(self.delivered[i])


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans(), data=st.data())
def test_machine_invariants(plan: Plan, data: st.DataObject) -> None:
    shell = Shell(plan, data)
    shell.run()
    state = shell.state
    assert state is not None

    # 1. exactly one terminal state, reached only when nothing is running
    assert shell.finished == [state.status], (shell.finished, state)
    assert state.status.terminal
    assert not state.timers
    assert shell.outstanding <= shell.abandoned, "finished while an attempt was still awaited"
    if state.confirms_cancel:
        assert not shell.outstanding, "finished before a cancelled attempt confirmed it stopped"
    for s in state.steps:
        assert s.status not in (StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.CANCELLING,
                                StepStatus.COMPENSATING, StepStatus.COMPENSATION_RETRYING,
                                StepStatus.PENDING)

    # 6. COMPLETED means every step completed and nothing was compensated
    if state.status is SagaStatus.COMPLETED:
        assert all(s.status is StepStatus.SUCCEEDED for s in state.steps)
        assert not shell.comp_runs
    # 2. COMPENSATED means everything that needed undoing was undone: every step with an
    # effect applied (also by an attempt the machine gave up on and never heard from)
    if state.status is SagaStatus.COMPENSATED:
        for step, attempt in shell.effects:
            if plan.steps[plan.index[step]].has_compensation:
                assert step in shell.comp_ok, f"{step}#{attempt} applied, never compensated"
        for sp, s in zip(plan.steps, state.steps, strict=True):
            if s.to_compensate:
                assert s.status is StepStatus.COMPENSATED
            assert s.status is not StepStatus.SUCCEEDED or not sp.has_compensation
    if state.status is SagaStatus.FAILED:
        assert any(s.status is StepStatus.COMPENSATION_FAILED for s in state.steps)

    # 5 + replay: the applied events alone, replayed, give the identical state
    replay, _ = m.start(plan, "saga-1", 1000.0, confirms_cancel=state.confirms_cancel)
    for event, now in shell.applied:
        m.handle(plan, replay, event, now)
    assert replay.to_dict() == state.to_dict()

    # the state round-trips exactly through orjson
    again = m.SagaState.from_dict(orjson.loads(orjson.dumps(state.to_dict())))
    assert again.to_dict() == state.to_dict()


@settings(max_examples=max(200, EXAMPLES // 10), deadline=None)
@given(plan=plans(), data=st.data())
def test_backoff_follows_policy(plan: Plan, data: st.DataObject) -> None:
    """4. Every retry timer is armed for exactly the policy's delay."""
    state, cmds = m.start(plan, "saga-2", 0.0)
    now = 0.0
    for _ in range(30):
        runs = [c for c in cmds if isinstance(c, m.RunStep)]
        if not runs or state.terminal:
            break
        cmd = data.draw(st.sampled_from(runs))
        sp = plan.steps[plan.index[cmd.step]]
        _, cmds = m.handle(plan, state, m.StepFailed(cmd.step, cmd.attempt, "x", True), now)
        timers = {c.key: c.due for c in cmds if isinstance(c, m.ScheduleTimer)}
        key = f"retry|{cmd.step}|{cmd.attempt + 1}"
        if cmd.attempt < sp.retry.attempts and sp.retry.backoff > 0 and \
                state.status is not SagaStatus.RUNNING and plan.strategy is not \
                FailureStrategy.WAIT_ALL:
            assert key not in timers
        elif key in timers:
            assert timers[key] == pytest.approx(now + sp.retry.delay("saga-2", cmd.step,
                                                                     cmd.attempt))
            base = min(sp.retry.max_backoff,
                       sp.retry.backoff * sp.retry.multiplier ** (cmd.attempt - 1))
            assert base * (1 - sp.retry.jitter) <= timers[key] - now <= base
            now = timers[key]
            _, cmds = m.handle(plan, state, m.TimerFired(key), now)


def test_step_rows_written_before_the_abandoned_field_still_load() -> None:
    old = ["failed", 2, 0, 1.0, 2.0, "boom", None, False, False]
    st = m.StepState.from_list(old)
    assert st.abandoned is False and st.status is StepStatus.FAILED
    assert m.StepState.from_list(st.to_list()).to_list() == [*old, False]


# --------------------------------------------------------------------------- transition table


class _Recorded:
    """Status assignments made inside the machine's transitions: (old, new)."""

    active = False
    steps: set[tuple[StepStatus, StepStatus]] = set()
    sagas: set[tuple[SagaStatus, SagaStatus]] = set()


class _TrackedStep(m.StepState):
    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        if name == "status" and _Recorded.active and hasattr(self, "status"):
            _Recorded.steps.add((self.status, value))  # type: ignore[arg-type]
        object.__setattr__(self, name, value)


class _TrackedSaga(m.SagaState):
    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        if name == "status" and _Recorded.active and hasattr(self, "status"):
            _Recorded.sagas.add((self.status, value))  # type: ignore[arg-type]
        object.__setattr__(self, name, value)


def test_the_code_makes_exactly_the_documented_transitions(monkeypatch) -> None:
    """Every status change the machine makes on random runs (operator retries included) is
    a row of STEP_TRANSITIONS / SAGA_TRANSITIONS, and every row is made: the tables are the
    documentation of the state diagram, and the docstring's list is the step table."""
    transition, start = m.transition, m.start

    def recorded(fn):
        def wrapper(*args, **kwargs):
            _Recorded.active = True
            try:
                return fn(*args, **kwargs)
            finally:
                _Recorded.active = False
        return wrapper

    monkeypatch.setattr(m, "StepState", _TrackedStep)
    monkeypatch.setattr(m, "SagaState", _TrackedSaga)
    monkeypatch.setattr(m, "transition", recorded(transition))
    monkeypatch.setattr(m, "start", recorded(start))
    _Recorded.steps, _Recorded.sagas = set(), set()

    @settings(max_examples=max(400, EXAMPLES // 8), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(plan=plans(), data=st.data())
    def explore(plan: Plan, data: st.DataObject) -> None:
        shell = Shell(plan, data)
        shell.run()
        assert shell.state is not None
        for _ in range(3):  # the operator retries a FAILED saga's compensations
            if shell.state.status is not SagaStatus.FAILED:
                break
            shell.operator = True
            shell.finished.clear()
            shell.deliver(m.RetryCompensations())
            shell.loop()

    for _ in range(6):  # rare transitions may need another random batch
        explore()
        if set(m.STEP_TRANSITIONS) <= _Recorded.steps and \
                set(m.SAGA_TRANSITIONS) <= _Recorded.sagas:
            break
    assert _Recorded.steps - set(m.STEP_TRANSITIONS) == set(), "undocumented transitions"
    assert _Recorded.sagas - set(m.SAGA_TRANSITIONS) == set(), "undocumented transitions"
    assert set(m.STEP_TRANSITIONS) - _Recorded.steps == set(), "documented, never made"
    assert set(m.SAGA_TRANSITIONS) - _Recorded.sagas == set(), "documented, never made"
    # (a row never made in 6 batches of random runs is taken for one the code cannot make)


def test_the_docstring_lists_the_step_table() -> None:
    by_source: dict[StepStatus, list[StepStatus]] = {}
    for a, b in m.STEP_TRANSITIONS:
        by_source.setdefault(a, []).append(b)
    doc = " ".join((m.__doc__ or "").split())
    for a, targets in by_source.items():
        line = f"{a.name} -> " + " | ".join(b.name for b in targets)
        assert line in doc, f"the module docstring lacks: {line}"
