from __future__ import annotations

import pytest

from sagaz import DAGSaga, FailureStrategy, Retry, Saga, SagaContext, SagaDefinitionError
from sagaz.errors import SagaContextError


async def ok(ctx):
    return None


async def undo(ctx):
    return None


def test_decorator_and_add_step_build_a_sequential_saga():
    saga = Saga("order")

    @saga.step(retry=Retry(attempts=3, backoff=0.1), timeout=5)
    async def reserve(ctx):
        return 1

    @reserve.compensation
    async def release(ctx):
        return None

    saga.add_step("charge", ok, undo)
    plan = saga.plan
    assert [s.name for s in plan.steps] == ["reserve", "charge"]
    assert plan.steps[1].deps == (0,)
    assert plan.steps[0].retry.attempts == 3 and plan.steps[0].timeout == 5
    assert saga.steps["reserve"].compensation_fn is release
    assert not saga.is_dag


def test_any_depends_on_makes_a_dag_with_roots():
    saga = Saga("d")
    saga.add_step("a", ok)
    saga.add_step("b", ok)
    saga.add_step("c", ok, depends_on=["a", "b"])
    assert saga.is_dag
    plan = saga.plan
    assert plan.roots == (0, 1)
    assert plan.steps[2].deps == (0, 1)


def test_dag_saga_allows_forward_references_and_orders_topologically():
    saga = DAGSaga("d")
    saga.add_step("c", ok, depends_on=["b"])
    saga.add_step("b", ok, depends_on="a")
    saga.add_step("a", ok)
    assert [s.name for s in saga.plan.steps] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda s: s.add_step("a", ok, depends_on=["nope"]), "depends on unknown step 'nope'"),
        (lambda s: s.add_step("a", ok, depends_on=["a"]), "depends on itself"),
    ],
)
def test_dependency_errors_name_the_step(build, message):
    saga = DAGSaga("x")
    with pytest.raises(SagaDefinitionError, match=message):
        build(saga)
        saga.validate()


def test_cycle_is_named():
    saga = DAGSaga("x")
    saga.add_step("root", ok)
    saga.add_step("a", ok, depends_on=["c", "root"])
    saga.add_step("b", ok, depends_on=["a"])
    saga.add_step("c", ok, depends_on=["b"])
    with pytest.raises(SagaDefinitionError, match=r"cycle: (a -> c -> b -> a|b -> a -> c -> b|"
                                                  r"c -> b -> a -> c)"):
        saga.validate()


def test_duplicate_and_non_async_steps_are_rejected():
    saga = Saga("x")
    saga.add_step("a", ok)
    with pytest.raises(SagaDefinitionError, match="already has a step named 'a'"):
        saga.add_step("a", ok)

    def sync_step(ctx):
        return None

    with pytest.raises(SagaDefinitionError, match=r"step 'b' of saga 'x'.*must be an async"):
        saga.add_step("b", sync_step)
    with pytest.raises(SagaDefinitionError, match=r"compensation .* of step 'a' must be an async"):
        saga.steps["a"].compensation(sync_step)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": 0}, "timeout must be a finite number of seconds > 0"),
        ({"timeout": float("nan")}, "timeout must be"),
        ({"timeout": "5"}, "timeout must be"),
        ({"compensation_timeout": -1}, "compensation_timeout must be"),
        ({"retry": 3}, "retry must be a sagaz.Retry"),
        ({"depends_on": [1]}, "depends_on holds 1"),
        ({"depends_on": ["a", "a"]}, "repeats a name"),
    ],
)
def test_step_parameters_are_checked(kwargs, message):
    saga = DAGSaga("x")
    saga.add_step("a", ok)
    with pytest.raises(SagaDefinitionError, match=message):
        saga.add_step("b", ok, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"attempts": 0}, "Retry.attempts must be >= 1"),
        ({"attempts": 1.5}, "Retry.attempts must be an integer"),
        ({"backoff": -1}, "Retry.backoff must be >= 0"),
        ({"multiplier": 0.5}, "Retry.multiplier must be >= 1"),
        ({"jitter": 2}, "Retry.jitter must be between 0 and 1"),
        ({"retry_on": (ValueError, 3)}, "Retry.retry_on must be exception classes"),
    ],
)
def test_retry_parameters_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Retry(**kwargs)


def test_retry_delay_is_exponential_capped_and_deterministic():
    r = Retry(attempts=10, backoff=0.1, multiplier=2, max_backoff=0.5)
    assert [r.delay("s", "a", n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
    j = Retry(attempts=5, backoff=1, jitter=0.5)
    delays = {j.delay(f"s{i}", "a", 1) for i in range(50)}
    assert len(delays) > 40 and all(0.5 <= d <= 1.0 for d in delays)
    assert j.delay("s1", "a", 1) == j.delay("s1", "a", 1)
    assert Retry(retry_on=ValueError).retryable(ValueError()) is True
    assert Retry(retry_on=ValueError).retryable(KeyError()) is False
    assert Retry(give_up_on=(KeyError,)).retryable(KeyError()) is False


def test_saga_options_are_checked():
    with pytest.raises(SagaDefinitionError, match="unknown failure_strategy 'sometimes'"):
        Saga("x", failure_strategy="sometimes")
    with pytest.raises(SagaDefinitionError, match="FAIL_FAST_WITH_GRACE needs grace_period"):
        Saga("x", failure_strategy=FailureStrategy.FAIL_FAST_WITH_GRACE)
    with pytest.raises(SagaDefinitionError, match="grace_period only applies"):
        Saga("x", grace_period=1.0)
    with pytest.raises(SagaDefinitionError, match="timeout must be"):
        Saga("x", timeout=-3)
    with pytest.raises(SagaDefinitionError, match="name must be a non-empty str"):
        Saga("")
    assert Saga("x", failure_strategy="wait_all").failure_strategy is FailureStrategy.WAIT_ALL


def test_definition_is_frozen_after_compiling():
    saga = Saga("x")
    saga.add_step("a", ok)
    saga.validate()
    with pytest.raises(SagaDefinitionError, match="frozen"):
        saga.add_step("b", ok)


def test_context_rejects_values_that_cannot_cross_kafka():
    ctx = SagaContext("id", "s", {"a": 1})
    ctx.set("nested", {"x": [1, 2.5, "y", None, True]})
    assert ctx["nested"]["x"][1] == 2.5 and "a" in ctx
    with pytest.raises(SagaContextError, match="context value 'bad' is not serialisable"):
        ctx.set("bad", object())
    with pytest.raises(SagaContextError, match="context keys must be str"):
        ctx.set(3, 1)  # type: ignore[arg-type]
    with pytest.raises(SagaContextError, match="context value 'k' is not serialisable"):
        SagaContext("id", "s", {"k": {1: "int keys do not survive JSON"}})
    with pytest.raises(KeyError, match="step 'a' has no result"):
        ctx.result("a")
    assert ctx.result("a", None) is None
