"""Saga definitions: steps, compensations, dependencies and policies. No run state lives here.

A definition is validated as it is built and frozen the first time it is compiled (its first
run): after that it cannot change, so concurrent runs of one saga are independent.

Three ways to declare steps (see ``Saga``): ``saga = Saga("order")`` + ``@saga.step`` /
``saga.add_step(...)`` (recommended); ``@Saga.step`` in a ``class OrderSaga(Saga):`` body
(the steps belong to that class); ``@Saga.step`` on module-level functions, collected by the
one ``Saga()`` that module builds. Anything ambiguous between them is a SagaDefinitionError
that says what to write instead.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any, Protocol, overload

from sagaz.errors import SagaDefinitionError
from sagaz.machine import Plan
from sagaz.policy import NO_RETRY, FailureStrategy, Retry
from sagaz.versions import check_version, fingerprint

if TYPE_CHECKING:
    from sagaz.context import SagaContext
    from sagaz.result import SagaResult
    from sagaz.store import SagaStore

StepFn = Callable[["SagaContext"], Awaitable[Any]]
_engine_module: Any = None
# Module-level form: module name -> steps declared there with @Saga.step, not yet collected;
# and module name -> ("saga 'x' built at file:line", its first step's name) for a module
# whose steps a Saga() collected.
_pending: dict[str, list[Step]] = {}
_collected: dict[str, tuple[str, str]] = {}
_FORMS = ('write saga = Saga("name") and declare its steps with @saga.step or '
          'saga.add_step(...)')


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
                 "depends_on", "name", "owner", "participant", "retry", "saga", "timeout")

    def __init__(self, saga: Saga | None, name: str, action: StepFn | None,
                 compensation: StepFn | None, *, depends_on: Iterable[str] | str | None,
                 retry: Retry | None, compensation_retry: Retry | None,
                 timeout: float | None, compensation_timeout: float | None,
                 participant: str | None, owner: str | None = None) -> None:
        # saga is None for a step declared with @Saga.step: ``owner`` then says where
        # ("module m" or "class m.C") until a Saga takes it.
        where = (f"step {name!r} of saga {saga.name!r}" if saga is not None
                 else f"step {name!r} of {owner}")
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
        self.owner = owner
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
        if self.saga is not None:
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

    def __await__(self) -> Generator[Any, None, Step]:
        """``await saga.add_step(...)`` works too (and is the step): the definition API is
        synchronous, but examples written for an async builder run unchanged."""
        return self
        yield  # pragma: no cover - makes this a generator

    def __set_name__(self, owner: type, name: str) -> None:
        """A step declared with ``@Saga.step`` in a class body belongs to that class, which
        must be a Saga subclass (``Saga.__init_subclass__`` collects it)."""
        if self.owner is not None and self.owner.startswith("class ") and not (
                isinstance(owner, type) and issubclass(owner, Saga)):
            raise SagaDefinitionError(
                f"@Saga.step on {self.name!r} in class {owner.__qualname__}, which is not a "
                f"Saga: declare it in a `class {owner.__name__}(Saga):` body, or {_FORMS}")

    def _copy(self, saga: Saga) -> Step:
        step = Step(saga, self.name, self.action, self.compensation_fn,
                    depends_on=self.depends_on, retry=self.retry,
                    compensation_retry=self.compensation_retry, timeout=self.timeout,
                    compensation_timeout=self.compensation_timeout,
                    participant=self.participant)
        return step

    def __repr__(self) -> str:
        return f"Step({self.name!r}, depends_on={self.depends_on!r})"


def _declare(owner_cls: type[Saga], fn_or_name: Any = None, /, **options: Any) -> Any:
    """``@Saga.step`` (class access): declare a step for the class body or module it is in."""
    if callable(fn_or_name) and not isinstance(fn_or_name, str):
        return _declare_fn(owner_cls, fn_or_name, None, options)
    if fn_or_name is not None and not isinstance(fn_or_name, str):
        raise SagaDefinitionError(f"@Saga.step takes a step name (str) or a function, "
                                  f"got {fn_or_name!r}")

    def register(fn: StepFn) -> Step:
        return _declare_fn(owner_cls, fn, fn_or_name, options)

    return register


def _declare_fn(owner_cls: type[Saga], fn: Any, name: str | None,
                options: dict[str, Any]) -> Step:
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or ""
    parts = qualname.split(".")
    parent = parts[-2] if len(parts) > 1 else None
    label = name or str(getattr(fn, "__name__", "?"))
    if parent == "<locals>" or not qualname:
        raise SagaDefinitionError(
            f"@Saga.step on {label!r} inside a function: it would belong to no saga; {_FORMS} "
            f"(or use @Saga.step at module level or in a `class ...(Saga):` body)")
    if owner_cls is not Saga and parent is None:
        raise SagaDefinitionError(
            f"@{owner_cls.__name__}.step on module-level function {label!r}: the module-level "
            f"form is @Saga.step, collected by the Saga() or {owner_cls.__name__}() built in "
            f"that module; or {_FORMS}")
    if parent is None and module in _collected:
        built, first = _collected[module]
        if label == first:  # the module runs again (importlib.reload): a fresh declaration
            del _collected[module]
        else:
            raise SagaDefinitionError(
                f"@Saga.step on {label!r} after module {module!r} built its saga ({built}): "
                f"declare every @Saga.step before that Saga(), or {_FORMS}")
    owner = (f"module {module}" if parent is None
             else f"class {module}.{'.'.join(parts[:-1])}")
    opts = _step_options(f"@Saga.step {label!r}", options)
    compensation = opts.pop("compensation")
    step = Step(None, label, fn, compensation, owner=owner, **opts)
    if parent is None:
        pending = _pending.setdefault(module, [])
        if any(s.name == step.name for s in pending):
            raise SagaDefinitionError(f"module {module!r} already declares a step named "
                                      f"{step.name!r} with @Saga.step")
        pending.append(step)
    return step


_STEP_OPTIONS = ("depends_on", "retry", "compensation_retry", "timeout",
                 "compensation_timeout", "participant", "compensation")


def _step_options(what: str, options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_STEP_OPTIONS))
    if unknown:
        raise SagaDefinitionError(f"{what}: unknown option(s) {', '.join(unknown)}; "
                                  f"use {', '.join(_STEP_OPTIONS)}")
    full: dict[str, Any] = dict.fromkeys(_STEP_OPTIONS[:-1])
    full.update(options)
    full.setdefault("compensation", None)
    return full


class _StepDecoratorType(Protocol):
    """The type of ``saga.step`` and ``Saga.step``: ``@x.step`` or ``@x.step(name, **options)``."""

    @overload
    def __call__(self, fn: StepFn, /) -> Step: ...
    @overload
    def __call__(self, name: str | None = None, /,
                 **options: Any) -> Callable[[StepFn], Step]: ...


class _StepDecorator:
    """``Saga.step``: on an instance, the decorator adding a step to that saga; on the class
    (``@Saga.step``), the declaration of a step for the enclosing class body or module."""

    def __get__(self, obj: Saga | None, cls: type[Saga]) -> _StepDecoratorType:
        if obj is None:
            return lambda *args, **options: _declare(cls, *args, **options)
        return obj._step


def _caller_module(saga: Saga) -> tuple[str, str]:
    """The module building ``saga`` and "file:line" of the call, past sagaz's own frames and
    the ``__init__`` of Saga subclasses."""
    frame = sys._getframe(2)
    while frame.f_back is not None and (
            frame.f_globals.get("__name__") == __name__
            or (frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is saga)):
        frame = frame.f_back
    return (frame.f_globals.get("__name__") or "?",
            f"{frame.f_code.co_filename}:{frame.f_lineno}")


class Saga:
    """A saga definition.

    Steps without ``depends_on`` run in the order they were added. As soon as any step
    declares ``depends_on`` the saga is a DAG: steps without it are roots, and independent
    steps run in parallel. ``DAGSaga`` is always a DAG.

    Declaring steps, recommended form: ``saga = Saga("order")``, then ``@saga.step`` or
    ``saga.add_step(name, action, compensation)`` (``await saga.add_step(...)`` works too).
    Two other forms:

    - ``@Saga.step`` in the body of ``class OrderSaga(Saga):`` declares a step of that class;
      every ``OrderSaga()`` has them (a subclass inherits its bases' steps first).
    - ``@Saga.step`` on module-level functions declares steps of that module, in order; the
      one ``Saga()`` (or ``DAGSaga()``) built in that module, after them, takes them.

    Ambiguous uses are errors (SagaDefinitionError): ``@Saga.step`` inside a function or in a
    class that is not a Saga; ``@Saga.step`` after the module built its saga; a second
    Saga built in a module whose steps were collected; a module-level step no Saga took
    when a saga of that module first runs; a Saga subclass with declared steps built in a
    module with pending module-level steps.

    The name defaults, when omitted, to the class attribute ``name`` of a subclass if set,
    else the subclass's name (``OrderSaga``); for ``Saga()``/``DAGSaga()`` to the name of the
    module that builds it. A default name is fine in-process, but it scopes idempotency keys
    and stored runs, so sagas sharing one share those. Over Kafka a default name is refused
    (``kafka_name``): the orchestrator, clients and participants must agree on a stable name.

    ``version`` (a positive int, default 1; a subclass may set ``version = 2`` in its body)
    and ``fingerprint`` identify the definition a run started on: runs in flight finish on
    their own version, new runs start on the newest one a worker holds (``sagaz.versions``).
    """

    dag = False
    step = _StepDecorator()
    _declared: tuple[Step, ...] = ()  # steps declared with @Saga.step in the class bodies

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = tuple(v for v in vars(cls).values()
                    if isinstance(v, Step) and v.saga is None and v.owner is not None
                    and v.owner.startswith("class "))
        cls._declared = (*cls._declared, *own)

    def __init__(self, name: str | None = None, *, failure_strategy: FailureStrategy | str =
                 FailureStrategy.FAIL_FAST, timeout: float | None = None,
                 grace_period: float | None = None, compensate_started: bool = False,
                 version: int | None = None) -> None:
        module, where = _caller_module(self)
        cls = type(self)
        class_name = vars(cls).get("name") if cls is not Saga else None
        self.name_given = name is not None or isinstance(class_name, str)
        if name is None:
            if isinstance(class_name, str):
                name = class_name
            elif cls not in (Saga, DAGSaga):
                name = cls.__name__
            else:
                name = module
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
        # Runs record the version and fingerprint they started on (sagaz.versions): bump
        # the version when a changed definition is deployed while runs are in flight.
        if version is None:  # a subclass may say `version = 2` in its body, like `name`
            version = getattr(cls, "version", 1) if cls not in (Saga, DAGSaga) else 1
        self.version = check_version(name, version)
        self._fingerprint: str | None = None
        self.built_at = where  # "file:line", to name both of two clashing definitions
        self.failure_strategy = strategy
        self.timeout = _check_seconds(f"saga {name!r}: timeout", timeout)
        self.grace_period = grace or 0.0
        self.compensate_started = compensate_started
        self.steps: dict[str, Step] = {}
        self._plan: Plan | None = None
        # step name -> (action, compensation), for the in-process engine; set by validate()
        self.actions: dict[str, tuple[StepFn | None, StepFn | None]] = {}
        self.remote_steps: tuple[str, ...] = ()  # steps that only a participant can run
        self.module = module  # the module that built it (module-level @Saga.step form)
        self._take_declared(module, where)

    def _take_declared(self, module: str, where: str) -> None:
        """Adopt the steps declared with @Saga.step for this class, or for the module."""
        pending = _pending.get(module)
        if self._declared:
            if pending:
                raise SagaDefinitionError(
                    f"{type(self).__name__} declares its steps in its class body, but module "
                    f"{module!r} also declares @Saga.step steps "
                    f"({', '.join(s.name for s in pending)}) for its Saga(): keep one form")
            for declared in self._declared:
                if declared.name in self.steps:
                    raise SagaDefinitionError(
                        f"saga {self.name!r} declares two steps named {declared.name!r}")
                self.steps[declared.name] = declared._copy(self)
            return
        if pending:
            del _pending[module]
            _collected[module] = (f"saga {self.name!r} built at {where}", pending[0].name)
            for step in pending:
                step.saga = self
                self.steps[step.name] = step
        elif module in _collected:
            raise SagaDefinitionError(
                f"module {module!r} already built its saga from its @Saga.step steps "
                f"({_collected[module][0]}); a module using that form builds one Saga(), once, "
                f"after its steps. For more sagas in one module, {_FORMS}")


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
    def _step(self, fn: StepFn, /) -> Step: ...
    @overload
    def _step(self, name: str | None = None, /, **options: Any) -> Callable[[StepFn], Step]: ...

    def _step(self, fn_or_name: Any = None, /, **options: Any) -> Any:
        """``@saga.step``: decorator adding a step named after the function (or the name
        given)."""
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
        late = _pending.get(self.module)
        if late:
            raise SagaDefinitionError(
                f"module {self.module!r} declares steps with @Saga.step "
                f"({', '.join(s.name for s in late)}) that no Saga() took; saga "
                f"{self.name!r} was built before them: build `saga = Saga()` after the "
                f"@Saga.step functions, or {_FORMS}")
        if not self.steps and not self.name_given:
            raise SagaDefinitionError(
                f"saga {self.name!r} (built without a name) has no steps: @Saga.step steps "
                f"are taken only by the Saga() built after them in their own module "
                f"({self.module!r} declares none); {_FORMS}")
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

    @property
    def fingerprint(self) -> str:
        """A stable hash of what decides a run's course (steps, dependencies,
        participants, policies; not the functions' bodies): the same in every process.
        Compiles and so freezes the saga. See ``sagaz.versions``."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self)
        return self._fingerprint

    def kafka_name(self) -> str:
        """The name under which this saga travels over Kafka; a SagaDefinitionError if the
        name was not given (a default name is not a stable one)."""
        if not self.name_given:
            raise SagaDefinitionError(
                f"saga {self.name!r} has no name of its own (its name defaults to its "
                f"{'module' if type(self) in (Saga, DAGSaga) else 'class'}): over Kafka a "
                f"saga needs a stable name that the orchestrator, its clients and its "
                f"participants share; write Saga(\"order\") (or `name = \"order\"` in the "
                f"class body)")
        return self.name

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
        version = f", version={self.version}" if self.version != 1 else ""
        return (f"{type(self).__name__}({self.name!r}{version}, {kind}, "
                f"steps={list(self.steps)})")


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
