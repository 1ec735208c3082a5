"""The saga state machine: every rule of a saga run, and no I/O.

Theory of operation
-------------------
A saga run is a ``SagaState``. It changes only through ``start`` and ``handle``:

    state, commands = start(plan, saga_id, now)
    state, commands = handle(plan, state, event, now)

``plan`` is the compiled, immutable definition (steps, dependencies, policies). ``now`` is
wall-clock seconds supplied by the caller: the machine never reads a clock, sleeps, draws a
random number or touches the network. Given the same plan, events and times it produces the
same states and commands, which is what lets a crashed worker replay its inputs and lets a
Kafka consumer process a message twice without doing anything twice.

The shells (the in-process engine, the Faust orchestrator) carry out the commands:

    RunStep / RunCompensation     start attempt N of a step or of its compensation
    CancelStep / CancelCompensation  stop waiting for that attempt; cancel it if you can
    ScheduleTimer / CancelTimer   deliver TimerFired(key) at ``due`` (or forget it)
    Finish                        the saga reached a terminal status

and report what happened as events: StepSucceeded, StepFailed, StepCancelled,
CompensationSucceeded, CompensationFailed, TimerFired, CancelRequested (and, from an
operator, RetryCompensations). Every step event names the (step, attempt) it is about. An
event for an attempt that is not the one the state is waiting for, a timer that is no
longer armed, or anything after the end (but an operator's retry of a FAILED saga) is
*ignored*:
the transition returns the state unchanged and no commands. Duplicated, reordered and stale
deliveries are therefore harmless.

Saga status (every transition, with its cause, is in ``SAGA_TRANSITIONS``; the invariant
tests check that the code makes exactly these):
    RUNNING -> COMPLETED                         every step succeeded
    RUNNING -> ABORTING -> COMPENSATING -> COMPENSATED | FAILED
                           COMPENSATING <- FAILED   (operator: RetryCompensations)
ABORTING waits until no step attempt is running (per the failure strategy: cancel them,
let them finish, or give them a grace period). COMPENSATING then undoes, in reverse
topological order, every step that succeeded, every step with an abandoned attempt (below),
and, with ``compensate_started``, every step that was started: a step is compensated only
after each compensated step depending on it,
directly or not, has been compensated. A compensation that exhausts its retries marks the
saga FAILED, which needs an operator; the steps it blocks stay uncompensated. The
operator's RetryCompensations (accepted only in FAILED) gives each failed compensation
one more attempt; the blocked steps follow in order if it succeeds.

Step status: the happy path is PENDING -> RUNNING -> SUCCEEDED (-> COMPENSATING ->
COMPENSATED when the saga aborts). Every transition, each with its cause, is in
``STEP_TRANSITIONS``; this list is generated from it and the invariant tests check that
the code makes exactly these (and that this list is the table):

    PENDING               -> RUNNING | SKIPPED
    RUNNING               -> SUCCEEDED | RUNNING | RETRYING | FAILED | CANCELLING | CANCELLED
    RETRYING              -> RUNNING | CANCELLED
    CANCELLING            -> SUCCEEDED | CANCELLED | RUNNING | RETRYING | FAILED
    SUCCEEDED             -> COMPENSATING
    FAILED                -> COMPENSATING
    CANCELLED             -> COMPENSATING
    COMPENSATING          -> COMPENSATED | COMPENSATING | COMPENSATION_RETRYING |
                             COMPENSATION_FAILED
    COMPENSATION_RETRYING -> COMPENSATING
    COMPENSATION_FAILED   -> SUCCEEDED

RUNNING -> RUNNING is a retry at once (attempt + 1); CANCELLING -> RUNNING | RETRYING |
FAILED decide about a timed-out attempt once it stopped; FAILED | CANCELLED ->
COMPENSATING undo an attempt that may have applied (abandoned, refused) or, with
``compensate_started``, any started step; COMPENSATION_FAILED -> SUCCEEDED is the
operator's RetryCompensations (the step is then undone again).

Timeouts: when a step's (or compensation's) timer fires, its attempt is cancelled. If the
shell confirms cancellations (``start(..., confirms_cancel=True)``: the in-process engine
does), the machine waits for that confirmation before it retries or compensates, so two
attempts of a step never overlap and nothing is undone while a step still runs. A remote
participant cannot confirm, so the Kafka orchestrator abandons the attempt at once and
ignores whatever it reports later; since that attempt may still have applied its effect,
a step with an abandoned attempt is compensated if the saga aborts (so is a step whose
result a shell refused, reported as ``StepFailed(..., applied=True)``; its compensation must
tolerate finding nothing to undo).

Timer keys are strings: ``deadline``, ``grace``, ``timeout|step|n``, ``retry|step|n``,
``ctimeout|step|n``, ``cretry|step|n``. The state holds the armed timers and their due times,
so a shell that restarts can re-arm them from the state alone (see ``resume``).

The state is mutable and owned by the machine: ``handle`` updates the object it is given and
returns it. Keep ``to_dict()`` (or ``orjson.dumps``) of it if you need the old value.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from sagaz.policy import NO_RETRY, FailureStrategy, Retry

# --------------------------------------------------------------------------- statuses


class SagaStatus(enum.StrEnum):
    RUNNING = "running"
    ABORTING = "aborting"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED})


class StepStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    COMPENSATING = "compensating"
    COMPENSATION_RETRYING = "compensation_retrying"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


S = StepStatus
# Members bound once: enum attribute access costs ~70 ns on Python 3.11.
_PENDING = S.PENDING
_RUNNING = S.RUNNING
_RETRYING = S.RETRYING
_CANCELLING = S.CANCELLING
_SUCCEEDED = S.SUCCEEDED
_FAILED = S.FAILED
_CANCELLED = S.CANCELLED
_SKIPPED = S.SKIPPED
_COMPENSATING = S.COMPENSATING
_COMPENSATED = S.COMPENSATED
_COMP_RETRYING = S.COMPENSATION_RETRYING
_COMP_FAILED = S.COMPENSATION_FAILED
_SAGA_RUNNING = SagaStatus.RUNNING
_SAGA_ABORTING = SagaStatus.ABORTING
_SAGA_COMPENSATING = SagaStatus.COMPENSATING
_SAGA_COMPLETED = SagaStatus.COMPLETED
_SAGA_COMPENSATED = SagaStatus.COMPENSATED
_SAGA_FAILED = SagaStatus.FAILED
_FAIL_FAST = FailureStrategy.FAIL_FAST
_WAIT_ALL = FailureStrategy.WAIT_ALL
_WITH_GRACE = FailureStrategy.FAIL_FAST_WITH_GRACE
_IN_FLIGHT = frozenset({_RUNNING, _CANCELLING, _RETRYING})
_STARTED = frozenset({_FAILED, _CANCELLED})  # started, did not succeed
_COMP_ACTIVE = frozenset({_COMPENSATING, _COMP_RETRYING})
_COMP_SETTLED = frozenset({_COMPENSATED, _COMP_FAILED})

# --------------------------------------------------------------------------- transitions
# The documentation of every status change the machine makes, as h11 documents its states:
# tests/unit/test_invariants.py records each status assignment the code makes on random
# runs and checks that the set is exactly the keys of these tables.

STEP_TRANSITIONS: dict[tuple[StepStatus, StepStatus], str] = {
    (S.PENDING, S.RUNNING): "its dependencies succeeded (or it has none): attempt 1",
    (S.PENDING, S.SKIPPED): "the saga ended before it started",
    (S.RUNNING, S.SUCCEEDED): "StepSucceeded for the current attempt",
    (S.RUNNING, S.RUNNING): "the attempt failed, retryable, no backoff: attempt + 1 at once",
    (S.RUNNING, S.RETRYING): "the attempt failed, retryable: attempt + 1 after the backoff",
    (S.RUNNING, S.FAILED): "the attempt failed for good (or its retries are used up)",
    (S.RUNNING, S.CANCELLING): "abort cancels it, or its timeout fires and the shell "
                               "confirms cancellations",
    (S.RUNNING, S.CANCELLED): "StepCancelled for the current attempt (it was cancelled "
                              "by something else than the machine)",
    (S.RETRYING, S.RUNNING): "its retry timer fired: the next attempt",
    (S.RETRYING, S.CANCELLED): "abort while it waits for a retry: no new attempt",
    (S.CANCELLING, S.SUCCEEDED): "the attempt finished before the cancel reached it",
    (S.CANCELLING, S.CANCELLED): "the attempt stopped (cancelled by an abort, or a remote "
                                 "one abandoned at its timeout)",
    (S.CANCELLING, S.RUNNING): "the timed-out attempt stopped; retried at once",
    (S.CANCELLING, S.RETRYING): "the timed-out attempt stopped; retried after the backoff",
    (S.CANCELLING, S.FAILED): "the timed-out attempt stopped; no retry left",
    (S.SUCCEEDED, S.COMPENSATING): "the saga compensates: its dependents are undone",
    (S.FAILED, S.COMPENSATING): "compensated too: an abandoned or refused attempt may have "
                                "applied, or compensate_started",
    (S.CANCELLED, S.COMPENSATING): "as FAILED -> COMPENSATING",
    (S.COMPENSATING, S.COMPENSATED): "CompensationSucceeded",
    (S.COMPENSATING, S.COMPENSATING): "the compensation failed, retryable, no backoff",
    (S.COMPENSATING, S.COMPENSATION_RETRYING): "the compensation failed, retryable: after "
                                               "the backoff",
    (S.COMPENSATING, S.COMPENSATION_FAILED): "the compensation failed for good: saga FAILED",
    (S.COMPENSATION_RETRYING, S.COMPENSATING): "its retry timer fired",
    (S.COMPENSATION_FAILED, S.SUCCEEDED): "operator's RetryCompensations: to be undone again "
                                          "(at once, or once what blocks it is undone)",
}

SAGA_TRANSITIONS: dict[tuple[SagaStatus, SagaStatus], str] = {
    (SagaStatus.RUNNING, SagaStatus.COMPLETED): "every step succeeded",
    (SagaStatus.RUNNING, SagaStatus.ABORTING): "a step failed for good, the deadline "
                                               "passed, or CancelRequested",
    (SagaStatus.ABORTING, SagaStatus.COMPENSATING): "no step attempt is in flight any more",
    (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED): "every compensation succeeded",
    (SagaStatus.COMPENSATING, SagaStatus.FAILED): "a compensation failed for good",
    (SagaStatus.FAILED, SagaStatus.COMPENSATING): "operator's RetryCompensations",
}

# --------------------------------------------------------------------------- plan


class StepPlan(NamedTuple):
    name: str
    position: int
    deps: tuple[int, ...]
    dependents: tuple[int, ...]
    descendants: tuple[int, ...]  # every step that depends on this one, directly or not
    ancestors: tuple[int, ...]  # every step this one depends on, directly or not
    retry: Retry
    compensation_retry: Retry
    timeout: float | None
    compensation_timeout: float | None
    has_compensation: bool


class Plan:
    """A compiled saga definition: what the machine needs to know, immutable."""

    __slots__ = ("compensate_started", "deadline", "grace_period", "index", "name",
                 "roots", "steps", "strategy")

    def __init__(
        self,
        name: str,
        steps: Sequence[StepPlan],
        *,
        strategy: FailureStrategy = FailureStrategy.FAIL_FAST,
        grace_period: float = 0.0,
        deadline: float | None = None,
        compensate_started: bool = False,
    ) -> None:
        self.name = name
        self.steps = tuple(steps)
        self.index = {s.name: s.position for s in self.steps}
        self.roots = tuple(s.position for s in self.steps if not s.deps)
        self.strategy = FailureStrategy(strategy)
        self.grace_period = grace_period
        self.deadline = deadline
        self.compensate_started = compensate_started

    @classmethod
    def build(
        cls,
        name: str,
        steps: Iterable[tuple[str, Iterable[str]]],
        *,
        retry: dict[str, Retry] | None = None,
        compensation_retry: dict[str, Retry] | None = None,
        timeout: dict[str, float | None] | None = None,
        compensation_timeout: dict[str, float | None] | None = None,
        has_compensation: dict[str, bool] | None = None,
        **options: Any,
    ) -> Plan:
        """Compile (name, dependency names) pairs, in a topological order, into a plan."""
        pairs = [(n, tuple(d)) for n, d in steps]
        index = {n: i for i, (n, _) in enumerate(pairs)}
        deps = [tuple(index[d] for d in ds) for _, ds in pairs]
        for i, ds in enumerate(deps):
            if any(d >= i for d in ds):
                raise ValueError(f"steps of plan {name!r} are not in topological order")
        dependents: list[list[int]] = [[] for _ in pairs]
        for i, ds in enumerate(deps):
            for d in ds:
                dependents[d].append(i)
        ancestors: list[set[int]] = []
        for ds in deps:
            acc: set[int] = set(ds)
            for d in ds:
                acc |= ancestors[d]
            ancestors.append(acc)
        descendants: list[list[int]] = [[] for _ in pairs]
        for i, acc in enumerate(ancestors):
            for a in acc:
                descendants[a].append(i)
        retry, compensation_retry = retry or {}, compensation_retry or {}
        timeout, compensation_timeout = timeout or {}, compensation_timeout or {}
        has_compensation = has_compensation or {}
        plans = [
            StepPlan(
                n, i, deps[i], tuple(dependents[i]), tuple(descendants[i]),
                tuple(sorted(ancestors[i])), retry.get(n, NO_RETRY),
                compensation_retry.get(n, NO_RETRY), timeout.get(n),
                compensation_timeout.get(n), has_compensation.get(n, True),
            )
            for i, (n, _) in enumerate(pairs)
        ]
        return cls(name, plans, **options)


# --------------------------------------------------------------------------- events

class StepSucceeded(NamedTuple):
    step: str
    attempt: int
    #: the step's return value and the context keys it set (``sagaz.run.changes``): the
    #: machine ignores both; ``sagaz.run.apply`` keeps them when the event is applied
    result: Any = None
    changes: dict[str, Any] | None = None


class StepFailed(NamedTuple):
    step: str
    attempt: int
    error: str
    retryable: bool = True
    #: the attempt did apply its effect, but its outcome cannot be kept (a Kafka shell
    #: refusing a result too large to carry): compensated, like an abandoned attempt
    applied: bool = False


class StepCancelled(NamedTuple):
    step: str
    attempt: int


class CompensationSucceeded(NamedTuple):
    step: str
    attempt: int
    changes: dict[str, Any] | None = None  # context keys it set; see StepSucceeded


class CompensationFailed(NamedTuple):
    step: str
    attempt: int
    error: str
    retryable: bool = True


class TimerFired(NamedTuple):
    key: str


class CancelRequested(NamedTuple):
    reason: str = "cancel requested"


class RetryCompensations(NamedTuple):
    """Operator action on a FAILED saga: attempt each failed compensation once more."""


Event = (StepSucceeded | StepFailed | StepCancelled | CompensationSucceeded
         | CompensationFailed | TimerFired | CancelRequested | RetryCompensations)

# --------------------------------------------------------------------------- commands


class RunStep(NamedTuple):
    step: str
    attempt: int
    saga_id: str

    @property
    def command_id(self) -> str:
        return command_id(self.saga_id, self.step, self.attempt, "run")


class RunCompensation(NamedTuple):
    step: str
    attempt: int
    saga_id: str

    @property
    def command_id(self) -> str:
        return command_id(self.saga_id, self.step, self.attempt, "compensate")


class CancelStep(NamedTuple):
    step: str
    attempt: int


class CancelCompensation(NamedTuple):
    step: str
    attempt: int


class ScheduleTimer(NamedTuple):
    key: str
    due: float


class CancelTimer(NamedTuple):
    key: str


class Finish(NamedTuple):
    status: SagaStatus


Command = (RunStep | RunCompensation | CancelStep | CancelCompensation | ScheduleTimer
           | CancelTimer | Finish)


def command_id(saga_id: str, step: str, attempt: int, action: str) -> str:
    """Deterministic id of one attempt of a step ("run") or compensation ("compensate")."""
    return f"{saga_id}|{step}|{attempt}|{action}"


# --------------------------------------------------------------------------- state


class StepState:
    __slots__ = ("abandoned", "attempt", "comp_attempt", "comp_error", "ended_at", "error",
                 "started_at", "status", "timed_out", "to_compensate")

    def __init__(self) -> None:
        self.status: StepStatus = _PENDING
        self.attempt = 0
        self.comp_attempt = 0
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.error: str | None = None
        self.comp_error: str | None = None
        self.to_compensate = False
        self.timed_out = False  # current attempt timed out; waiting for its cancellation
        # An attempt was given up on without a confirmation that it stopped (a remote step
        # timed out): it may have applied its effect, so an abort compensates the step.
        self.abandoned = False

    def to_list(self) -> list[Any]:
        return [self.status.value, self.attempt, self.comp_attempt, self.started_at,
                self.ended_at, self.error, self.comp_error, self.to_compensate, self.timed_out,
                self.abandoned]

    @classmethod
    def from_list(cls, row: list[Any]) -> StepState:
        st = cls()
        (status, st.attempt, st.comp_attempt, st.started_at, st.ended_at, st.error,
         st.comp_error, st.to_compensate, st.timed_out) = row[:9]
        st.abandoned = len(row) > 9 and row[9]  # rows written before the field: False
        st.status = StepStatus(status)
        return st

    def __repr__(self) -> str:
        return f"StepState({self.to_list()!r})"


class SagaState:
    __slots__ = ("confirms_cancel", "ended_at", "failed_step", "failure", "fingerprint", "name",
                 "saga_id", "seq", "started_at", "status", "steps", "timers", "updated_at",
                 "version")

    def __init__(self, name: str, saga_id: str, n_steps: int, now: float) -> None:
        self.name = name
        self.saga_id = saga_id
        self.status = _SAGA_RUNNING
        self.steps = [StepState() for _ in range(n_steps)]
        self.timers: dict[str, float] = {}
        self.started_at = now
        self.updated_at = now
        self.ended_at: float | None = None
        self.failure: str | None = None
        self.failed_step: str | None = None
        self.seq = 0  # events applied; ignored events leave it unchanged
        # The shell reports when a cancelled attempt has really stopped (in-process: yes;
        # remote participants: no). If so, a timed-out attempt is awaited before its step is
        # retried or anything is compensated, so attempts never overlap.
        self.confirms_cancel = False
        # The definition the run started on (sagaz.versions), for shells that keep it in
        # the state (the in-process engine's stores); the machine does not read them.
        self.version = 1
        self.fingerprint = ""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def step(self, plan: Plan, name: str) -> StepState:
        return self.steps[plan.index[name]]

    def to_dict(self) -> dict[str, Any]:
        """Compact, orjson-ready form; ``from_dict(to_dict())`` round-trips exactly."""
        d = {
            "v": 1, "name": self.name, "id": self.saga_id, "status": self.status.value,
            "steps": [s.to_list() for s in self.steps], "timers": dict(self.timers),
            "started_at": self.started_at, "updated_at": self.updated_at,
            "ended_at": self.ended_at, "failure": self.failure, "failed_step": self.failed_step,
            "seq": self.seq, "cc": self.confirms_cancel,
        }
        if self.fingerprint:  # only when a shell set them: states without read as version 1
            d["version"], d["fingerprint"] = self.version, self.fingerprint
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SagaState:
        if d.get("v") != 1:
            raise ValueError(f"unsupported saga state version {d.get('v')!r}")
        st = cls(d["name"], d["id"], 0, d["started_at"])
        st.status = SagaStatus(d["status"])
        st.steps = [StepState.from_list(r) for r in d["steps"]]
        st.timers = dict(d["timers"])
        st.updated_at, st.ended_at = d["updated_at"], d["ended_at"]
        st.failure, st.failed_step, st.seq = d["failure"], d["failed_step"], d["seq"]
        st.confirms_cancel = d["cc"]
        st.version, st.fingerprint = d.get("version", 1), d.get("fingerprint", "")
        return st

    def __repr__(self) -> str:
        return f"SagaState({self.to_dict()!r})"


# --------------------------------------------------------------------------- transitions

Commands = list[Command]


def start(plan: Plan, saga_id: str, now: float, *,
          confirms_cancel: bool = False) -> tuple[SagaState, Commands]:
    """Create the state of a new run and the commands that begin it.

    ``confirms_cancel``: the shell answers every CancelStep / CancelCompensation with the
    attempt's final event (StepCancelled, or its real outcome if it finished first).
    """
    state = SagaState(plan.name, saga_id, len(plan.steps), now)
    state.confirms_cancel = confirms_cancel
    cmds: Commands = []
    if plan.deadline is not None:
        _arm(state, "deadline", now + plan.deadline, cmds)
    for i in plan.roots:
        _run_attempt(plan, state, i, 1, now, cmds)
    if not plan.steps:
        _finish(state, _SAGA_COMPLETED, now, cmds)
    return state, cmds


def transition(plan: Plan, state: SagaState, event: Event,
               now: float) -> tuple[bool, Commands]:
    """Apply one event: (applied, commands). An ignored event (stale, repeated, late)
    returns (False, []) and leaves the state untouched; the shells need no other test."""
    if state.status in TERMINAL and type(event) is not RetryCompensations:
        return False, []
    cmds: Commands = []
    if _HANDLERS[type(event)](plan, state, event, now, cmds):
        state.updated_at = now
        state.seq += 1
        return True, cmds
    return False, cmds


def handle(plan: Plan, state: SagaState, event: Event, now: float) -> tuple[SagaState, Commands]:
    """Apply one event (``transition``, returning the state). Stale, repeated and late
    events return no commands."""
    return state, transition(plan, state, event, now)[1]


def resume(plan: Plan, state: SagaState) -> Commands:
    """Commands that re-issue everything in flight: for a shell restarting from a saved state.

    Re-running an attempt is safe because its command id is the same: participants dedupe.
    """
    cmds: Commands = []
    if state.status in TERMINAL:
        return [Finish(state.status)]
    for sp, st in zip(plan.steps, state.steps, strict=True):
        if st.status is _RUNNING:
            cmds.append(RunStep(sp.name, st.attempt, state.saga_id))
        elif st.status is _CANCELLING:
            cmds.append(CancelStep(sp.name, st.attempt))
        elif st.status is _COMPENSATING:
            if st.timed_out:
                cmds.append(CancelCompensation(sp.name, st.comp_attempt))
            else:
                cmds.append(RunCompensation(sp.name, st.comp_attempt, state.saga_id))
    cmds.extend(ScheduleTimer(k, due) for k, due in state.timers.items())
    return cmds


# -- helpers


def _arm(state: SagaState, key: str, due: float, cmds: Commands) -> None:
    state.timers[key] = due
    cmds.append(ScheduleTimer(key, due))


def _disarm(state: SagaState, key: str, cmds: Commands) -> None:
    if state.timers.pop(key, None) is not None:
        cmds.append(CancelTimer(key))


def _run_attempt(plan: Plan, state: SagaState, i: int, attempt: int, now: float,
                 cmds: Commands) -> None:
    sp, st = plan.steps[i], state.steps[i]
    st.status = _RUNNING
    st.attempt = attempt
    st.timed_out = False
    if attempt == 1:
        st.started_at = now
    cmds.append(RunStep(sp.name, attempt, state.saga_id))
    if sp.timeout is not None:
        _arm(state, f"timeout|{sp.name}|{attempt}", now + sp.timeout, cmds)


def _run_compensation(plan: Plan, state: SagaState, i: int, attempt: int, now: float,
                      cmds: Commands) -> None:
    sp, st = plan.steps[i], state.steps[i]
    st.status = _COMPENSATING
    st.comp_attempt = attempt
    st.timed_out = False
    cmds.append(RunCompensation(sp.name, attempt, state.saga_id))
    if sp.compensation_timeout is not None:
        _arm(state, f"ctimeout|{sp.name}|{attempt}", now + sp.compensation_timeout, cmds)


def _finish(state: SagaState, status: SagaStatus, now: float, cmds: Commands) -> None:
    state.status = status
    state.ended_at = now
    state.updated_at = now
    for key in list(state.timers):
        _disarm(state, key, cmds)
    for st in state.steps:
        if st.status is _PENDING:
            st.status = _SKIPPED
    cmds.append(Finish(status))


def _launch_after(plan: Plan, state: SagaState, i: int, now: float, cmds: Commands) -> None:
    """Step i succeeded while RUNNING: start what it unblocked, or complete the saga."""
    # Plain loops: this is the hot path of every run, and generator expressions cost more.
    steps, plans = state.steps, plan.steps
    for d in plans[i].dependents:
        if steps[d].status is _PENDING:
            for x in plans[d].deps:
                if steps[x].status is not _SUCCEEDED:
                    break
            else:
                _run_attempt(plan, state, d, 1, now, cmds)
    for st in steps:
        if st.status is not _SUCCEEDED:
            return
    _finish(state, _SAGA_COMPLETED, now, cmds)


def _abort(plan: Plan, state: SagaState, reason: str, failed_step: str | None, hard: bool,
           now: float, cmds: Commands) -> None:
    """Stop launching steps; deal with running ones per the strategy (hard: cancel now)."""
    if state.status is _SAGA_RUNNING:
        state.status = _SAGA_ABORTING
        state.failure = reason
        state.failed_step = failed_step
    strategy = plan.strategy
    if hard or strategy is not _WAIT_ALL:
        cancel = hard or strategy is _FAIL_FAST or plan.grace_period <= 0
        waiting = False
        for sp, st in zip(plan.steps, state.steps, strict=True):
            if st.status is _RETRYING:  # no new attempts
                _disarm(state, f"retry|{sp.name}|{st.attempt + 1}", cmds)
                st.status = _CANCELLED
                st.ended_at = now
            elif st.status is _RUNNING:
                if cancel:
                    st.status = _CANCELLING
                    cmds.append(CancelStep(sp.name, st.attempt))
                else:
                    waiting = True
            elif st.status is _CANCELLING and cancel:
                st.timed_out = False  # no retry after it stops: it is cancelled for good
        if waiting and "grace" not in state.timers:
            _arm(state, "grace", now + plan.grace_period, cmds)
    _maybe_compensate(plan, state, now, cmds)


def _cancel_running(plan: Plan, state: SagaState, cmds: Commands) -> None:
    for sp, st in zip(plan.steps, state.steps, strict=True):
        if st.status is _RUNNING:
            st.status = _CANCELLING
            cmds.append(CancelStep(sp.name, st.attempt))
        elif st.status is _CANCELLING:
            st.timed_out = False


def _maybe_compensate(plan: Plan, state: SagaState, now: float, cmds: Commands) -> None:
    """ABORTING and nothing in flight: choose what to undo and start undoing it."""
    if state.status is not _SAGA_ABORTING:
        return
    for st in state.steps:
        if st.status in _IN_FLIGHT:
            return
    _disarm(state, "grace", cmds)
    state.status = _SAGA_COMPENSATING
    wide = plan.compensate_started
    for sp, st in zip(plan.steps, state.steps, strict=True):
        st.to_compensate = sp.has_compensation and (
            st.status is _SUCCEEDED or ((wide or st.abandoned) and st.status in _STARTED)
        )
    for i in range(len(plan.steps) - 1, -1, -1):
        _compensate_if_ready(plan, state, i, now, cmds)
    _maybe_settle(state, now, cmds)


def _compensate_if_ready(plan: Plan, state: SagaState, i: int, now: float,
                         cmds: Commands, *, attempt: int | None = None) -> None:
    steps = state.steps
    st = steps[i]
    if not st.to_compensate or st.status in _COMP_ACTIVE or st.status in _COMP_SETTLED:
        return
    for d in plan.steps[i].descendants:
        if steps[d].to_compensate and steps[d].status is not _COMPENSATED:
            return
    _run_compensation(plan, state, i, attempt or st.comp_attempt + 1, now, cmds)


def _maybe_settle(state: SagaState, now: float, cmds: Commands) -> None:
    """COMPENSATING and nothing more can run: COMPENSATED, or FAILED if any undo failed."""
    failed = False
    for st in state.steps:
        if st.status in _COMP_ACTIVE:
            return
        if st.status is _COMP_FAILED:
            failed = True
    _finish(state, _SAGA_FAILED if failed else _SAGA_COMPENSATED, now, cmds)


def _current(plan: Plan, state: SagaState, step: str, attempt: int,
             statuses: frozenset[StepStatus], comp: bool) -> int | None:
    """Index of the step if the event is about the attempt the state waits for, else None."""
    i = plan.index.get(step)
    if i is None:
        return None
    st = state.steps[i]
    if (st.comp_attempt if comp else st.attempt) != attempt or st.status not in statuses:
        return None
    return i


_RUNNING_OR_CANCELLING = frozenset({_RUNNING, _CANCELLING})
_ONLY_COMPENSATING = frozenset({_COMPENSATING})


def _on_step_succeeded(plan: Plan, state: SagaState, ev: StepSucceeded, now: float,
                       cmds: Commands) -> bool:
    i = _current(plan, state, ev.step, ev.attempt, _RUNNING_OR_CANCELLING, False)
    if i is None:
        return False
    st = state.steps[i]
    if plan.steps[i].timeout is not None:
        _disarm(state, f"timeout|{ev.step}|{ev.attempt}", cmds)
    st.status = _SUCCEEDED  # also when cancelling: it finished anyway, so it gets undone
    st.timed_out = False
    st.ended_at = now
    if state.status is _SAGA_RUNNING:
        _launch_after(plan, state, i, now, cmds)
    else:
        _maybe_compensate(plan, state, now, cmds)
    return True


def _attempt_failed(plan: Plan, state: SagaState, i: int, error: str, retryable: bool,
                    now: float, cmds: Commands, *, cancelled: bool = False) -> None:
    """Attempt of step i is over without success (failed, timed out, or cancelled)."""
    sp, st = plan.steps[i], state.steps[i]
    if sp.timeout is not None:
        _disarm(state, f"timeout|{sp.name}|{st.attempt}", cmds)
    if st.status is _CANCELLING:
        if not st.timed_out:  # cancelled by an abort, as asked: stop waiting
            st.error = error
            st.status = _CANCELLED
            st.ended_at = now
            _maybe_compensate(plan, state, now, cmds)
            return
        # The timed-out attempt has stopped: decide as for any failed attempt.
        st.timed_out = False
        error, retryable, cancelled = st.error or error, sp.retry.retry_on_timeout, False
    st.error = error
    may_continue = state.status is _SAGA_RUNNING or (
        state.status is _SAGA_ABORTING and plan.strategy is _WAIT_ALL
    )
    if may_continue and retryable and not cancelled and st.attempt < sp.retry.attempts:
        delay = sp.retry.delay(state.saga_id, sp.name, st.attempt)
        if delay <= 0:
            _run_attempt(plan, state, i, st.attempt + 1, now, cmds)
        else:
            st.status = _RETRYING
            _arm(state, f"retry|{sp.name}|{st.attempt + 1}", now + delay, cmds)
        return
    st.status = _CANCELLED if cancelled else _FAILED
    st.ended_at = now
    if state.status is _SAGA_RUNNING:
        _abort(plan, state, f"step {sp.name!r} failed: {error}", sp.name, False, now, cmds)
    else:
        _maybe_compensate(plan, state, now, cmds)


def _on_step_failed(plan: Plan, state: SagaState, ev: StepFailed, now: float,
                    cmds: Commands) -> bool:
    i = _current(plan, state, ev.step, ev.attempt, _RUNNING_OR_CANCELLING, False)
    if i is None:
        return False
    if ev.applied:
        state.steps[i].abandoned = True
    _attempt_failed(plan, state, i, ev.error, ev.retryable, now, cmds)
    return True


def _on_step_cancelled(plan: Plan, state: SagaState, ev: StepCancelled, now: float,
                       cmds: Commands) -> bool:
    i = _current(plan, state, ev.step, ev.attempt, _RUNNING_OR_CANCELLING, False)
    if i is None:
        return False
    _attempt_failed(plan, state, i, "cancelled", False, now, cmds, cancelled=True)
    return True


def _compensation_over(plan: Plan, state: SagaState, i: int, error: str | None,
                       retryable: bool, now: float, cmds: Commands) -> None:
    sp, st = plan.steps[i], state.steps[i]
    if sp.compensation_timeout is not None:
        _disarm(state, f"ctimeout|{sp.name}|{st.comp_attempt}", cmds)
    if st.timed_out:  # the timed-out attempt has stopped
        st.timed_out = False
        if error is not None:
            error, retryable = st.comp_error or error, sp.compensation_retry.retry_on_timeout
    if error is None:
        st.status = _COMPENSATED
        st.comp_error = None
        for a in reversed(sp.ancestors):
            _compensate_if_ready(plan, state, a, now, cmds)
    else:
        st.comp_error = error
        if retryable and st.comp_attempt < sp.compensation_retry.attempts:
            delay = sp.compensation_retry.delay(state.saga_id, sp.name, st.comp_attempt)
            if delay <= 0:
                _run_compensation(plan, state, i, st.comp_attempt + 1, now, cmds)
            else:
                st.status = _COMP_RETRYING
                _arm(state, f"cretry|{sp.name}|{st.comp_attempt + 1}", now + delay, cmds)
            return
        st.status = _COMP_FAILED
    _maybe_settle(state, now, cmds)


def _on_comp_succeeded(plan: Plan, state: SagaState, ev: CompensationSucceeded, now: float,
                       cmds: Commands) -> bool:
    i = _current(plan, state, ev.step, ev.attempt, _ONLY_COMPENSATING, True)
    if i is None:
        return False
    _compensation_over(plan, state, i, None, False, now, cmds)
    return True


def _on_comp_failed(plan: Plan, state: SagaState, ev: CompensationFailed, now: float,
                    cmds: Commands) -> bool:
    i = _current(plan, state, ev.step, ev.attempt, _ONLY_COMPENSATING, True)
    if i is None:
        return False
    _compensation_over(plan, state, i, ev.error, ev.retryable, now, cmds)
    return True


def _on_timer(plan: Plan, state: SagaState, ev: TimerFired, now: float, cmds: Commands) -> bool:
    key = ev.key
    if state.timers.pop(key, None) is None:
        return False  # not armed (any more): stale or repeated
    if key == "deadline":
        if state.status is not _SAGA_COMPENSATING:  # undoing is never cut short
            _abort(plan, state, f"saga deadline of {plan.deadline}s exceeded", None, True,
                   now, cmds)
        return True
    if key == "grace":
        _cancel_running(plan, state, cmds)
        _maybe_compensate(plan, state, now, cmds)
        return True
    kind, step, n = key.split("|")
    i, attempt = plan.index[step], int(n)
    sp = plan.steps[i]
    st = state.steps[i]
    if kind == "timeout":  # the armed timer is always for the current attempt
        message = f"timed out after {sp.timeout}s"
        if not state.confirms_cancel:  # abandon the attempt now
            cmds.append(CancelStep(step, attempt))
            st.abandoned = True
            _attempt_failed(plan, state, i, message, sp.retry.retry_on_timeout, now, cmds)
        elif st.status is _RUNNING:  # cancel it and decide once it has stopped
            cmds.append(CancelStep(step, attempt))
            st.status, st.timed_out, st.error = _CANCELLING, True, message
        # else: already being cancelled by an abort; keep waiting for it
    elif kind == "retry":
        _run_attempt(plan, state, i, attempt, now, cmds)
    elif kind == "ctimeout":
        cmds.append(CancelCompensation(step, attempt))
        message = f"timed out after {sp.compensation_timeout}s"
        if state.confirms_cancel:
            st.timed_out, st.comp_error = True, message
        else:
            _compensation_over(plan, state, i, message,
                               sp.compensation_retry.retry_on_timeout, now, cmds)
    elif kind == "cretry":
        _run_compensation(plan, state, i, attempt, now, cmds)
    return True


def _on_cancel(plan: Plan, state: SagaState, ev: CancelRequested, now: float,
               cmds: Commands) -> bool:
    if state.status is _SAGA_COMPENSATING:
        return False
    _abort(plan, state, ev.reason, None, True, now, cmds)
    return True


def _on_retry_compensations(plan: Plan, state: SagaState, ev: RetryCompensations,
                            now: float, cmds: Commands) -> bool:
    if state.status is not _SAGA_FAILED:
        return False
    state.status = _SAGA_COMPENSATING
    state.ended_at = None
    for i, st in enumerate(state.steps):
        if st.status is _COMP_FAILED:
            # One more attempt, numbered on: past the policy's limit, so a failure goes
            # straight back to FAILED for the operator instead of retrying on its own.
            st.status = _SUCCEEDED
            _compensate_if_ready(plan, state, i, now, cmds, attempt=st.comp_attempt + 1)
    _maybe_settle(state, now, cmds)
    return True


_HANDLERS: dict[type, Any] = {
    StepSucceeded: _on_step_succeeded,
    StepFailed: _on_step_failed,
    StepCancelled: _on_step_cancelled,
    CompensationSucceeded: _on_comp_succeeded,
    CompensationFailed: _on_comp_failed,
    TimerFired: _on_timer,
    CancelRequested: _on_cancel,
    RetryCompensations: _on_retry_compensations,
}
