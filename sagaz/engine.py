"""The in-process engine: runs a saga on asyncio by feeding the state machine its events.

All decisions are the machine's (``sagaz.machine``); this shell only starts attempts, arms
timers, cancels what the machine says to cancel, and reports outcomes back as events.

Steps start eagerly: an attempt's coroutine runs at once, inside the engine, up to its first
real suspension. A step that never suspends finishes without a task or an event-loop round
trip (as ``asyncio.eager_task_factory`` does on Python 3.12); one that suspends continues as
a task, so independent DAG branches still overlap.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, assert_never

from sagaz import logs as _logs
from sagaz import machine as m
from sagaz import run as run_record
from sagaz.context import SagaContext
from sagaz.definition import Saga
from sagaz.errors import (
    SagaAlreadyRunning,
    SagaContextError,
    SagaDefinitionError,
    SagaFailed,
    describe,
)
from sagaz.machine import Plan, SagaState
from sagaz.result import SagaResult
from sagaz.run import Run, attempt_data, changes, has_containers, refusal
from sagaz.store import InMemorySagaStore, SagaRecord, SagaStore
from sagaz.tracing import SagaTracer
from sagaz.versions import Definitions

log = logging.getLogger("sagaz.engine")

if TYPE_CHECKING:
    from sagaz.metrics import RunMetrics

_RUN, _COMP = 0, 1
_PLAIN = frozenset({type(None), str, int, float, bool})  # serialisable as they are
_NO_TIMES: dict[Any, float] = {}  # never written: runs without metrics share it
_RunStep, _RunCompensation, _Finish = m.RunStep, m.RunCompensation, m.Finish
_ScheduleTimer, _CancelTimer = m.ScheduleTimer, m.CancelTimer
_CancelStep, _CancelCompensation = m.CancelStep, m.CancelCompensation


class _Ids:
    """Saga ids: 16 random hex digits per process, then a counter. Unique, cheap, ordered."""

    prefix = ""
    counter = itertools.count()

    @classmethod
    def reset(cls) -> None:
        cls.prefix = os.urandom(8).hex()
        cls.counter = itertools.count()


def new_saga_id() -> str:
    if not _Ids.prefix:
        _Ids.reset()
        os.register_at_fork(after_in_child=_Ids.reset)  # a forked child must not reuse ids
    return f"{_Ids.prefix}{next(_Ids.counter):08x}"


class _Continue:
    """Awaitable that drives a coroutine which has already yielded ``first`` once."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.first
        self.coro = self.first = None  # type: ignore[assignment]
        while True:
            try:
                value = yield yielded
            except BaseException as exc:  # cancellation (or close) goes to the step
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(value)
                except StopIteration as stop:
                    return stop.value


async def _continue(coro: Coroutine[Any, Any, Any], first: Any) -> Any:
    return await _Continue(coro, first)


class _Run:
    """One saga run being driven. Not reusable."""

    __slots__ = ("actions", "began", "clock", "errors", "loop", "metrics", "name", "nested",
                 "plan", "queue", "rec", "saga", "saga_id", "scanned", "span", "spans", "store",
                 "tasks", "timers", "tracer", "waiter", "watchers")

    def __init__(self, engine: Engine, saga: Saga, plan: Plan, rec: Run) -> None:
        self.saga, self.plan, self.rec, self.saga_id = saga, plan, rec, rec.saga_id
        self.name = saga.name
        self.scanned: dict[str, Any] | None = None  # the data dict ``nested`` is about
        self.nested = False  # it holds a list or dict: attempts get a deep copy
        self.store, self.clock, self.tracer = engine.store, engine.clock, engine.tracer
        self.span: Any = None  # the run's span, when tracing
        self.spans: dict[tuple[int, str, int], Any] = {}  # attempt -> its span
        self.actions = saga.actions
        self.loop = asyncio.get_running_loop()
        self.queue: deque[m.Event] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.tasks: dict[tuple[int, str, int], asyncio.Task[Any]] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.errors: dict[str, BaseException] = {}
        self.watchers: asyncio.Future[SagaResult] | None = None  # made when someone waits
        self.metrics = engine.metrics  # None: no metrics, and no cost but these checks
        # attempt -> its perf_counter start, with metrics only
        self.began: dict[tuple[int, str, int], float] = {} if self.metrics is not None \
            else _NO_TIMES

    # -- the loop

    async def drive(self, cmds: m.Commands) -> SagaResult:
        rec, plan, queue, clock, store = self.rec, self.plan, self.queue, self.clock, self.store
        state = rec.state
        apply, execute, terminal = run_record.apply, self.execute, m.TERMINAL
        save_each = not store.keeps_live_state
        key = rec.idempotency_key
        if self.tracer is not None:
            self.span = self.tracer.run_span(plan.name, state.saga_id)
        # log lines of this run carry its saga id (sagaz.logs; only when JSON logs want it)
        logged = _logs.bind(state.saga_id, trace=self.span) if _logs.wanted else None
        try:
            await store.save(state, rec, key)
            execute(cmds)
            while state.status not in terminal:
                if not queue:
                    self.waiter = self.loop.create_future()
                    await self.waiter
                    continue
                applied, cmds = apply(plan, rec, queue.popleft(), clock())
                if not applied:
                    continue  # stale or repeated: ignored by the machine
                if save_each:  # write-ahead: saved before its commands are carried out
                    await store.save(state, rec, key)
                execute(cmds)
            if not save_each:
                await store.save(state, rec, key)
            if self.metrics is not None:
                self.metrics.ended(plan.name, state.status.value,
                                   None if state.ended_at is None
                                   else state.ended_at - state.started_at)
        finally:
            if self.timers or self.tasks:
                await self.settle()
            if self.tracer is not None and self.span is not None:
                self.tracer.end(self.span, None if state.status is m.SagaStatus.COMPLETED
                                else f"{state.status.value}: {state.failure}")
            if logged is not None:
                _logs.unbind(logged)
        failed = state.failed_step
        return SagaResult(plan, state, rec.data, rec.results,
                          self.errors.get(failed) if failed else None)

    async def settle(self) -> None:
        """Nothing may outlive the run: disarm timers, cancel and await abandoned attempts."""
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        pending = [t for t in self.tasks.values() if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def push(self, event: m.Event) -> None:
        self.queue.append(event)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- commands

    def execute(self, cmds: m.Commands) -> None:
        # isinstance, not ``match``: class patterns cost a third more per command here, and
        # mypy checks this chain as exhaustive all the same (assert_never)
        now = None  # one clock reading per batch: timers due together fire in their order
        for cmd in cmds:
            if isinstance(cmd, _RunStep):
                self.start(_RUN, cmd.step, cmd.attempt)
            elif isinstance(cmd, _Finish):
                pass  # nothing to do: the loop ends on the terminal state
            elif isinstance(cmd, _RunCompensation):
                self.start(_COMP, cmd.step, cmd.attempt)
            elif isinstance(cmd, _ScheduleTimer):
                if now is None:
                    now = self.clock()
                delay = max(0.0, cmd.due - now)
                self.timers[cmd.key] = self.loop.call_later(delay, self.fire, cmd.key)
            elif isinstance(cmd, _CancelTimer):
                handle = self.timers.pop(cmd.key, None)
                if handle is not None:
                    handle.cancel()
            elif isinstance(cmd, _CancelStep):
                self.cancel(_RUN, cmd.step, cmd.attempt)
            elif isinstance(cmd, _CancelCompensation):
                self.cancel(_COMP, cmd.step, cmd.attempt)
            else:
                assert_never(cmd)

    def fire(self, key: str) -> None:
        self.timers.pop(key, None)
        self.push(m.TimerFired(key))

    def cancel(self, kind: int, step: str, attempt: int) -> None:
        task = self.tasks.get((kind, step, attempt))
        if task is not None:
            task.cancel()  # its done-callback reports the outcome
        else:
            # Nothing runs it here (it finished, and that outcome is queued ahead of this,
            # or the run was resumed in a new process): confirm the cancellation at once.
            self.outcome(kind, step, attempt, None, asyncio.CancelledError(), None, None)

    def start(self, kind: int, step: str, attempt: int) -> None:
        if self.metrics is not None:
            self.began[(kind, step, attempt)] = time.perf_counter()
            if attempt > 1 and kind == _RUN:
                self.metrics.retry(self.plan.name, step)
        if self.tracer is not None:
            self.spans[(kind, step, attempt)] = self.tracer.attempt_span(
                self.span, "step" if kind == _RUN else "compensate", step, attempt,
                self.saga_id)
        fn = self.actions[step][kind]
        # The attempt works on its own copy of the data: its writes count only once its
        # success is applied (sagaz.run: the same rule as over Kafka).
        rec = self.rec
        before = rec.data
        if before is not self.scanned:  # merges replace the dict: scanned once per value
            self.scanned, self.nested = before, has_containers(before)
        ctx = _new_context(SagaContext)  # its data was validated: no SagaContext.__init__
        # results are shared, not copied: they change only when a success is applied, and a
        # step reads them (writing ctx.results is not a way to change a run, in any shell)
        ctx.saga_id, ctx.saga_name, ctx.results = self.saga_id, self.name, rec.results
        ctx.data = attempt_data(before) if self.nested else dict(before)
        # The step's log lines carry its fields: bound while it starts, and in the task that
        # continues it (a task copies the context it is created in).
        logged = _logs.bind(self.saga_id, step, m.command_id(
            self.saga_id, step, attempt, "run" if kind == _RUN else "compensate"),
            self.spans.get((kind, step, attempt)) or self.span) if _logs.wanted else None
        try:
            coro: Any = fn(ctx)  # type: ignore[misc]  # _prepare: actions exist
            yielded = coro.send(None)
        except StopIteration as stop:
            self.outcome(kind, step, attempt, stop.value, None, ctx, before)
            return
        except (Exception, asyncio.CancelledError) as exc:
            # Drop this frame from the traceback: it starts at the step, and the exception
            # kept in the result does not hold the run alive through a reference cycle.
            if exc.__traceback__ is not None:
                exc.__traceback__ = exc.__traceback__.tb_next
            self.outcome(kind, step, attempt, None, exc, None, None)
            return
        else:
            task = self.loop.create_task(_continue(coro, yielded))
            self.tasks[(kind, step, attempt)] = task
            task.add_done_callback(partial(self.task_done, kind, step, attempt, ctx, before))
        finally:
            if logged is not None:
                _logs.unbind(logged)

    def task_done(self, kind: int, step: str, attempt: int, ctx: SagaContext,
                  before: dict[str, Any], task: asyncio.Task[Any]) -> None:
        del self.tasks[(kind, step, attempt)]
        if task.cancelled():
            self.outcome(kind, step, attempt, None, asyncio.CancelledError(), None, None)
            return
        exc = task.exception()
        self.outcome(kind, step, attempt, None if exc else task.result(), exc, ctx, before)

    def outcome(self, kind: int, step: str, attempt: int, value: Any,
                exc: BaseException | None, ctx: SagaContext | None,
                before: dict[str, Any] | None) -> None:
        if self.tracer is not None:
            span = self.spans.pop((kind, step, attempt), None)
            if span is not None:
                self.tracer.end(span, None if exc is None else describe(exc))
        if self.metrics is not None:
            self.observe(kind, step, attempt, exc)
        if exc is None:
            assert ctx is not None and before is not None
            data = ctx.data
            changed = None if data == before else changes(before, data)
            if kind == _RUN:
                if changed is not None or type(value) not in _PLAIN:
                    reason = refusal(step, value, changed)
                    if reason is not None:  # ran, outcome unusable: as over Kafka
                        self.errors[step] = SagaContextError(reason)
                        self.push(run_record.refused(step, attempt, reason))
                        return
                self.push(m.StepSucceeded(step, attempt, value, changed))
                return
            reason = refusal(step, None, changed) if changed is not None else None
            if reason is None:
                self.push(m.CompensationSucceeded(step, attempt, changed))
                return
            self.errors[step] = SagaContextError(reason)
            self.push(m.CompensationFailed(step, attempt, reason, False))
            return
        self.errors[step] = exc
        cancelled = isinstance(exc, asyncio.CancelledError)
        policy = self.saga.steps[step]
        if kind == _RUN:
            if cancelled:
                self.push(m.StepCancelled(step, attempt))
            else:
                self.push(m.StepFailed(step, attempt, describe(exc), policy.retry.retryable(exc)))
        else:
            self.push(m.CompensationFailed(
                step, attempt, "cancelled" if cancelled else describe(exc),
                not cancelled and policy.compensation_retry.retryable(exc)))

    def observe(self, kind: int, step: str, attempt: int, exc: BaseException | None) -> None:
        """Metrics of an attempt that ended. Only attempts started here count: a
        cancellation confirmed for an attempt that had already ended (or ran in another
        process before a resume) is not a second outcome."""
        began = self.began.pop((kind, step, attempt), None)
        if began is None or self.metrics is None:
            return
        seconds = time.perf_counter() - began
        if exc is None:
            outcome = "succeeded"
        elif isinstance(exc, asyncio.CancelledError):
            # The machine marks an attempt it cancels at its timeout until it has stopped.
            timed_out = self.rec.state.steps[self.plan.index[step]].timed_out
            outcome = "timed_out" if timed_out else "cancelled"
        else:
            outcome = "failed"
        self.metrics.attempt(self.plan.name, step, "run" if kind == _RUN else "compensate",
                             outcome, seconds)

    def in_flight(self) -> tuple[str, m.SagaStatus, float] | None:
        """(saga, status, started_at) while the run is under way, for the gauges."""
        state = self.rec.state
        if state.status in m.TERMINAL:
            return None
        return self.plan.name, state.status, state.started_at


_new_context = object.__new__


class Engine:
    """Runs sagas in this process. Holds no per-saga state besides its store.

    ``claim_lease`` (seconds, default 30) bounds how long an idempotency key claimed by a
    run that has not saved its first snapshot keeps other runs off: normally that save
    follows the claim at once; a run that died in between leaves a stale claim, which the
    next run with the key takes over once the lease is out. Meanwhile ``run`` with that
    key raises ``SagaAlreadyRunning`` in other engines (processes); in this engine it waits
    for the run and returns its result. Make it longer than a store write can stall.

    ``metrics``: a prometheus_client ``CollectorRegistry`` (or a ``sagaz.metrics.RunMetrics``)
    to report the saga run families to (``docs/metrics.md``: executions, durations, steps,
    retries, timeouts, compensations, in flight); engines given the same registry share its
    families. None (the default): no metrics, and nothing measured.
    """

    def __init__(self, store: SagaStore | None = None, *,
                 clock: Callable[[], float] = time.time, tracer: SagaTracer | None = None,
                 claim_lease: float = 30.0, metrics: Any = None) -> None:
        if isinstance(claim_lease, bool) or not isinstance(claim_lease, (int, float)) \
                or not math.isfinite(claim_lease) or claim_lease <= 0:
            raise ValueError(f"claim_lease must be a finite number of seconds > 0, "
                             f"got {claim_lease!r}")
        self.store: SagaStore = store if store is not None else InMemorySagaStore()
        self.clock = clock
        self.tracer = tracer  # sagaz.tracing.SagaTracer: spans per run and attempt
        self.claim_lease = float(claim_lease)
        self._inflight: dict[str, _Run] = {}
        # (saga name, key) -> the saga id its claim returned, while this engine claims it:
        # a racing run of the same key here waits for that instead of claiming again
        self._claiming: dict[tuple[str, str], asyncio.Future[str]] = {}
        self.metrics: RunMetrics | None = None
        if metrics is not None:
            from sagaz.metrics import RunMetrics, shared

            self.metrics = metrics if isinstance(metrics, RunMetrics) else shared(
                RunMetrics, metrics)
            self.metrics.add_in_flight(self._in_flight_counts, self._oldest_in_flight)

    def _in_flight_counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for run in self._inflight.values():
            live = run.in_flight()
            if live is not None:
                key = (live[0], live[1].value)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def _oldest_in_flight(self) -> dict[str, float]:
        now = self.clock()
        oldest: dict[str, float] = {}
        for run in self._inflight.values():
            live = run.in_flight()
            if live is not None:
                oldest[live[0]] = max(oldest.get(live[0], 0.0), now - live[2])
        return oldest

    async def run(self, saga: Saga, data: dict[str, Any] | None = None, *,
                  saga_id: str | None = None, idempotency_key: str | None = None,
                  raise_on_failure: bool = False) -> SagaResult:
        """Run ``saga`` with ``data`` as its initial context.

        ``idempotency_key`` makes the start idempotent per saga name: a run of this saga
        with the same key returns that run (its result once finished, its current view if it
        runs elsewhere) instead of starting another. See the class docstring for a run that
        holds the key but has not saved its first snapshot (``SagaAlreadyRunning``).
        """
        plan = _prepare(saga)
        if saga_id is None:
            saga_id = new_saga_id()
        elif not isinstance(saga_id, str) or not saga_id:
            raise ValueError(f"saga_id must be a non-empty str, got {saga_id!r}")
        # Checked before the key is claimed: a run that cannot start must not hold its key.
        ctx = SagaContext(saga_id, saga.name, data)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise ValueError(f"idempotency_key must be a non-empty str, "
                                 f"got {idempotency_key!r}")
            owner = await self._claim(saga.name, idempotency_key, saga_id)
            if owner != saga_id:
                return _check(await self._existing(saga, idempotency_key, owner),
                              raise_on_failure)
        state, cmds = m.start(plan, saga_id, self.clock(), confirms_cancel=True)
        run = _Run(self, saga, plan, Run(state, ctx.data, {}, idempotency_key,
                                         version=saga.version, fingerprint=saga.fingerprint))
        if self.metrics is not None:
            self.metrics.started(saga.name)
        return _check(await self._track(saga_id, run, run.drive(cmds)), raise_on_failure)

    async def _claim(self, name: str, key: str, saga_id: str) -> str:
        scoped = (name, key)
        pending = self._claiming.get(scoped)
        if pending is not None:
            return await asyncio.shield(pending)
        claimed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._claiming[scoped] = claimed
        try:
            owner = await self.store.claim(name, key, saga_id, self.claim_lease)
        except BaseException as exc:
            claimed.set_exception(exc)
            claimed.exception()  # marked retrieved; the waiters re-raise it
            raise
        else:
            # The waiters resume after this run registered in _inflight (no await between
            # here and _track), so they find it there and wait for its result.
            claimed.set_result(owner)
        finally:
            del self._claiming[scoped]
        return owner

    async def resume(self, saga: Saga | Iterable[Saga], saga_id: str, *,
                     raise_on_failure: bool = False) -> SagaResult:
        """Continue a run from its stored state: in-flight attempts are issued again.

        ``saga``: the definition, or every version of it this process holds. The run
        continues on the version it started on (``sagaz.versions``); when that version is
        not given, or changed without a version bump in a step the run has not passed,
        ``DefinitionUnavailable`` is raised and the stored run is left as it is (resume it
        with its definition).
        """
        if saga_id in self._inflight:
            return _check(await self._wait(self._inflight[saga_id]), raise_on_failure)
        saga, rec = await self._load(saga, saga_id)
        return await self._continue(saga, rec, m.resume(saga.plan, rec.state),
                                    raise_on_failure)

    async def retry_compensations(self, saga: Saga | Iterable[Saga], saga_id: str, *,
                                  raise_on_failure: bool = False) -> SagaResult:
        """Operator action: give each failed compensation of a FAILED run one more attempt
        (on the run's own version, as ``resume``)."""
        saga, rec = await self._load(saga, saga_id)
        state = rec.state
        if state.status is not m.SagaStatus.FAILED:
            raise ValueError(f"saga {saga_id!r} is {state.status.value}, not failed: only a "
                             f"failed saga's compensations can be retried")
        state.confirms_cancel = True
        _, cmds = run_record.apply(saga.plan, rec, m.RetryCompensations(), self.clock())
        return await self._continue(saga, rec, cmds, raise_on_failure)

    async def _load(self, sagas: Saga | Iterable[Saga], saga_id: str) -> tuple[Saga, Run]:
        """A stored run and the definition it continues on."""
        record = await self.store.load(saga_id)
        if record is None:
            raise KeyError(f"no saga {saga_id!r} in the store")
        return _definition(sagas, record), run_record.from_record(record)

    async def _continue(self, saga: Saga, rec: Run, cmds: m.Commands,
                        raise_on_failure: bool) -> SagaResult:
        run = _Run(self, saga, saga.plan, rec)
        return _check(await self._track(rec.saga_id, run, run.drive(cmds)), raise_on_failure)

    async def _track(self, saga_id: str, run: _Run,
                     coro: Coroutine[Any, Any, SagaResult]) -> SagaResult:
        if saga_id in self._inflight:
            coro.close()
            raise ValueError(f"saga {saga_id!r} is already running in this engine")
        self._inflight[saga_id] = run
        try:
            result = await coro
        except BaseException as exc:
            if run.watchers is not None:
                run.watchers.set_exception(exc)
                run.watchers.exception()  # marked retrieved; the waiters re-raise it
            raise
        finally:
            del self._inflight[saga_id]
        if run.watchers is not None:
            run.watchers.set_result(result)
        return result

    async def _wait(self, run: _Run) -> SagaResult:
        if run.watchers is None:
            run.watchers = asyncio.get_running_loop().create_future()
        return await asyncio.shield(run.watchers)

    async def _existing(self, saga: Saga, key: str, saga_id: str) -> SagaResult:
        run = self._inflight.get(saga_id)
        if run is not None:
            return await self._wait(run)
        result = await self.get(saga, saga_id)
        if result is None:  # claimed, no snapshot yet: starting elsewhere, or died there
            raise SagaAlreadyRunning.held(saga.name, key, saga_id)
        return result

    async def get(self, saga: Saga | Iterable[Saga], saga_id: str) -> SagaResult | None:
        """The current view of a run (live or finished), or None if the store has no such run.
        ``saga``: as for ``resume`` (the view needs the run's own version)."""
        record = await self.store.load(saga_id)
        if record is None:
            return None
        return SagaResult(_definition(saga, record).plan, SagaState.from_dict(record.state),
                          record.data, record.results)


def _prepare(saga: Saga) -> Plan:
    plan = saga.plan
    if saga.remote_steps:
        raise SagaDefinitionError(
            f"saga {saga.name!r} cannot run in-process: steps {list(saga.remote_steps)} have "
            f"no local action (they run in participants; use the Kafka orchestrator)")
    return plan


def _definition(sagas: Saga | Iterable[Saga], record: SagaRecord) -> Saga:
    """The definition a stored run continues on, among ``sagas`` (one, or its versions):
    the rule of ``sagaz.versions``; DefinitionUnavailable when it is not among them."""
    defs = Definitions([sagas] if isinstance(sagas, Saga) else sagas)
    if record.name not in defs.by_name:
        raise ValueError(f"saga {record.saga_id!r} is a {record.name!r}, not a "
                         f"{' or '.join(sorted(repr(n) for n in defs.by_name))}")
    resolved = defs.resolve(record.name, record.version, record.fingerprint, record.state)
    if resolved.changed:
        log.warning("saga %r version %d changed without a version bump (run %s started on "
                    "fingerprint %s, this definition is %s); the steps it has not passed are "
                    "unchanged, so it continues on this definition", record.name,
                    record.version, record.saga_id, record.fingerprint,
                    resolved.saga.fingerprint)
    _prepare(resolved.saga)
    return resolved.saga


def _check(result: SagaResult, raise_on_failure: bool) -> SagaResult:
    if raise_on_failure and not result.succeeded:
        raise SagaFailed(result) from result.exception
    return result


_default: Engine | None = None


def default_engine() -> Engine:
    """The engine behind ``Saga.execute``: an in-memory store of bounded size."""
    global _default
    if _default is None:
        _default = Engine()
    return _default
