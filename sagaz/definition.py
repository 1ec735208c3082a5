"""Saga definitions: steps, compensations, dependencies and policies. No run state lives here.

A definition is validated as it is built and frozen the first time it is compiled (its first
run): after that it cannot change, so concurrent runs of one saga are independent.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, overload

from sagaz.errors import SagaDefinitionError
from sagaz.machine import Plan
from sagaz.policy import NO_RETRY, FailureStrategy, Retry

if TYPE_CHECKING:
    from sagaz.context import SagaContext
    from sagaz.result import SagaResult
    from sagaz.store import SagaStore

StepFn = Callable[["SagaContext"], Awaitable[Any]]
_engine_module: Any = None


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )


def _check_seconds(what: str, value: Any, *, allow_zero: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or (
        value < 0 if allow_zero else value <= 0
    ) or math.isinf(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise SagaDefinitionError(f"{what} must be a finite number of seconds {bound}, "
                                  f"got {value!r}")
    return float(value)


class Step:
    """One step of a saga: an async action, an optional async compensation, and policies."""

    __slots__ = ("action", "compensation_fn", "compensation_retry", "compensation_timeout",
                 "depends_on", "name", "participant", "retry", "saga", "timeout")

    def __init__(self, saga: Saga, name: str, action: StepFn | None,
                 compensation: StepFn | None, *, depends_on: Iterable[str] | str | None,
                 retry: Retry | None, compensation_retry: Retry | None,
                 timeout: float | None, compensation_timeout: float | None,
                 participant: str | None) -> None:
        where = f"step {name!r} of saga {saga.name!r}"
        if not isinstance(name, str) or not name or "|" in name:
            raise SagaDefinitionError(f"step names must be non-empty str without '|', got {name!r}")
        if action is None:
            if participant is None:
                raise SagaDefinitionError(f"{where} needs an action or a participant")
        elif not _is_async(action):
            raise SagaDefinitionError(f"{where}: action {action!r} must be an async function")
        if participant is not None and (not isinstance(participant, str) or not participant):
            raise SagaDefinitionError(f"{where}: participant must be a non-empty str")
        for label, policy in (("retry", retry), ("compensation_retry", compensation_retry)):
            if policy is not None and not isinstance(policy, Retry):
                raise SagaDefinitionError(f"{where}: {label} must be a sagaz.Retry, got {policy!r}")
        if isinstance(depends_on, str):
            depends_on = (depends_on,)
        if depends_on is not None:
            depends_on = tuple(depends_on)
            for dep in depends_on:
                if not isinstance(dep, str):
                    raise SagaDefinitionError(f"{where}: depends_on holds {dep!r}, not a step name")
            if len(set(depends_on)) != len(depends_on):
                raise SagaDefinitionError(f"{where}: depends_on repeats a name: {depends_on}")
            if name in depends_on:
                raise SagaDefinitionError(f"{where} depends on itself (cycle: {name} -> {name})")
        self.saga = saga
        self.name = name
        self.action = action
        self.compensation_fn: StepFn | None = None
        self.depends_on: tuple[str, ...] | None = depends_on
        self.retry = retry or NO_RETRY
        self.compensation_retry = compensation_retry or NO_RETRY
        self.timeout = _check_seconds(f"{where}: timeout", timeout)
        self.compensation_timeout = _check_seconds(f"{where}: compensation_timeout",
                                                   compensation_timeout)
        self.participant = participant
        if compensation is not None:
            self.compensation(compensation)

    def compensation(self, fn: StepFn) -> StepFn:
        """Decorator: register the async function that undoes this step."""
        self.saga._check_open()
        if not _is_async(fn):
            raise SagaDefinitionError(f"compensation {fn!r} of step {self.name!r} must be an "
                                      f"async function")
        if self.compensation_fn is not None:
            raise SagaDefinitionError(f"step {self.name!r} already has a compensation")
        self.compensation_fn = fn
        return fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # the decorated function stays callable
        if self.action is None:
            raise TypeError(f"step {self.name!r} runs in participant {self.participant!r}")
        return self.action(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Step({self.name!r}, depends_on={self.depends_on!r})"


class Saga:
    """A saga definition.

    Steps without ``depends_on`` run in the order they were added. As soon as any step
    declares ``depends_on`` the saga is a DAG: steps without it are roots, and independent
    steps run in parallel. ``DAGSaga`` is always a DAG.
    """

    dag = False

    def __init__(self, name: str, *, failure_strategy: FailureStrategy | str =
                 FailureStrategy.FAIL_FAST, timeout: float | None = None,
                 grace_period: float | None = None, compensate_started: bool = False) -> None:
        if not isinstance(name, str) or not name:
            raise SagaDefinitionError(f"saga name must be a non-empty str, got {name!r}")
        try:
            strategy = FailureStrategy(failure_strategy)
        except ValueError:
            raise SagaDefinitionError(
                f"saga {name!r}: unknown failure_strategy {failure_strategy!r}; use one of "
                f"{', '.join(s.name for s in FailureStrategy)}") from None
        grace = _check_seconds(f"saga {name!r}: grace_period", grace_period)
        if strategy is FailureStrategy.FAIL_FAST_WITH_GRACE and grace is None:
            raise SagaDefinitionError(f"saga {name!r}: FAIL_FAST_WITH_GRACE needs grace_period")
        if strategy is not FailureStrategy.FAIL_FAST_WITH_GRACE and grace is not None:
            raise SagaDefinitionError(f"saga {name!r}: grace_period only applies to "
                                      f"FAIL_FAST_WITH_GRACE, not {strategy.name}")
        if not isinstance(compensate_started, bool):
            raise SagaDefinitionError(f"saga {name!r}: compensate_started must be a bool")
        self.name = name
        self.failure_strategy = strategy
        self.timeout = _check_seconds(f"saga {name!r}: timeout", timeout)
        self.grace_period = grace or 0.0
        self.compensate_started = compensate_started
        self.steps: dict[str, Step] = {}
        self._plan: Plan | None = None
        # step name -> (action, compensation), for the in-process engine; set by validate()
        self.actions: dict[str, tuple[StepFn | None, StepFn | None]] = {}
        self.remote_steps: tuple[str, ...] = ()  # steps that only a participant can run

    # -- building

    def _check_open(self) -> None:
        if self._plan is not None:
            raise SagaDefinitionError(f"saga {self.name!r} has run and is frozen; "
                                      f"define a new Saga to change it")

    def add_step(self, name: str, action: StepFn | None, compensation: StepFn | None = None, *,
                 depends_on: Iterable[str] | str | None = None, retry: Retry | None = None,
                 compensation_retry: Retry | None = None, timeout: float | None = None,
                 compensation_timeout: float | None = None,
                 participant: str | None = None) -> Step:
        self._check_open()
        if name in self.steps:
            raise SagaDefinitionError(f"saga {self.name!r} already has a step named {name!r}")
        step = Step(self, name, action, compensation, depends_on=depends_on, retry=retry,
                    compensation_retry=compensation_retry, timeout=timeout,
                    compensation_timeout=compensation_timeout, participant=participant)
        self.steps[name] = step
        return step

    @overload
    def step(self, fn: StepFn, /) -> Step: ...
    @overload
    def step(self, name: str | None = None, /, **options: Any) -> Callable[[StepFn], Step]: ...

    def step(self, fn_or_name: Any = None, /, **options: Any) -> Any:
        """Decorator adding a step named after the function (or the name given)."""
        if callable(fn_or_name):
            return self.add_step(fn_or_name.__name__, fn_or_name)

        def register(fn: StepFn) -> Step:
            return self.add_step(fn_or_name or fn.__name__, fn, **options)

        return register

    # -- compiling

    @property
    def is_dag(self) -> bool:
        return self.dag or any(s.depends_on is not None for s in self.steps.values())

    def validate(self) -> Plan:
        """Check the whole definition and compile it; freezes the saga. Returns the plan."""
        if self._plan is not None:
            return self._plan
        names = list(self.steps)
        if self.is_dag:
            deps = {n: self.steps[n].depends_on or () for n in names}
            for n, ds in deps.items():
                for d in ds:
                    if d not in self.steps:
                        raise SagaDefinitionError(
                            f"step {n!r} of saga {self.name!r} depends on unknown step {d!r}")
            order = _topological(self.name, names, deps)
        else:
            deps = {n: (names[i - 1],) if i else () for i, n in enumerate(names)}
            order = names
        steps = self.steps
        self.actions = {n: (s.action, s.compensation_fn) for n, s in steps.items()}
        self.remote_steps = tuple(n for n, s in steps.items() if s.action is None)
        self._plan = Plan.build(
            self.name, [(n, deps[n]) for n in order],
            retry={n: s.retry for n, s in steps.items()},
            compensation_retry={n: s.compensation_retry for n, s in steps.items()},
            timeout={n: s.timeout for n, s in steps.items()},
            compensation_timeout={n: s.compensation_timeout for n, s in steps.items()},
            # A step defined only by name (action=None) runs elsewhere: its participant is
            # assumed to know how to undo it. Otherwise the definition says.
            has_compensation={n: s.compensation_fn is not None or s.action is None
                              for n, s in steps.items()},
            strategy=self.failure_strategy, grace_period=self.grace_period,
            deadline=self.timeout, compensate_started=self.compensate_started,
        )
        return self._plan

    @property
    def plan(self) -> Plan:
        return self._plan or self.validate()

    # -- running in-process

    async def execute(self, *, saga_id: str | None = None, idempotency_key: str | None = None,
                      raise_on_failure: bool = False, store: SagaStore | None = None,
                      **data: Any) -> SagaResult:
        """Run the saga in this process with ``data`` as its initial context.

        ``saga_id``, ``idempotency_key``, ``raise_on_failure`` and ``store`` are options, not
        context keys; pass such keys through ``run(data=...)``.
        """
        return await self.run(data, saga_id=saga_id, idempotency_key=idempotency_key,
                              raise_on_failure=raise_on_failure, store=store)

    async def run(self, data: dict[str, Any] | None = None, *, saga_id: str | None = None,
                  idempotency_key: str | None = None, raise_on_failure: bool = False,
                  store: SagaStore | None = None) -> SagaResult:
        global _engine_module
        if _engine_module is None:  # imported late: the engine imports this module
            import sagaz.engine as _engine_module
        engine = _engine_module.default_engine() if store is None else _engine_module.Engine(store)
        return await engine.run(self, data, saga_id=saga_id, idempotency_key=idempotency_key,
                                raise_on_failure=raise_on_failure)

    def __repr__(self) -> str:
        kind = "DAG" if self.is_dag else "sequential"
        return f"{type(self).__name__}({self.name!r}, {kind}, steps={list(self.steps)})"


class DAGSaga(Saga):
    """A saga whose steps run as soon as their ``depends_on`` steps completed."""

    dag = True


def _topological(saga: str, names: list[str], deps: dict[str, tuple[str, ...]]) -> list[str]:
    """Kahn's order, stable in declaration order; a cycle is reported by its members."""
    remaining = {n: set(deps[n]) for n in names}
    order: list[str] = []
    while remaining:
        ready = [n for n in names if n in remaining and not remaining[n]]
        if not ready:
            raise SagaDefinitionError(f"saga {saga!r} has a dependency cycle: "
                                      f"{' -> '.join(_find_cycle(remaining))}")
        for n in ready:
            del remaining[n]
            order.append(n)
        for ds in remaining.values():
            ds.difference_update(ready)
    return order


def _find_cycle(remaining: dict[str, set[str]]) -> list[str]:
    node = next(iter(remaining))
    seen: list[str] = []
    while node not in seen:  # every remaining node has a remaining dependency
        seen.append(node)
        node = sorted(remaining[node])[0]
    cycle = seen[seen.index(node):]
    return [*cycle, node]
