"""The in-process engine, policy by policy, on a real event loop (small real sleeps)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sagaz import (
    DAGSaga,
    Engine,
    FailureStrategy,
    InMemorySagaStore,
    Retry,
    Saga,
    SagaFailed,
    SagaStatus,
    StepStatus,
)


class Boom(Exception):
    pass


def recorder():
    log: list[str] = []

    def step(name, *, fail=False, sleep=0.0, result=None):
        async def fn(ctx):
            log.append(f"start {name}")
            try:
                if sleep:
                    await asyncio.sleep(sleep)
            except asyncio.CancelledError:
                log.append(f"cancelled {name}")
                raise
            if fail:
                log.append(f"fail {name}")
                raise Boom(f"{name} failed")
            log.append(f"done {name}")
            return result

        return fn

    def undo(name):
        async def fn(ctx):
            log.append(f"undo {name}")

        return fn

    return log, step, undo


async def test_sequential_happy_path_passes_results_along():
    saga = Saga("order")

    @saga.step()
    async def reserve(ctx):
        return {"reservation": ctx["order_id"] + "-r"}

    @saga.step()
    async def charge(ctx):
        return {"paid": ctx.result("reserve")["reservation"]}

    result = await saga.execute(order_id="o1")
    assert result.status is SagaStatus.COMPLETED and result.succeeded
    assert result.results == {"reserve": {"reservation": "o1-r"}, "charge": {"paid": "o1-r"}}
    assert result.context == {"order_id": "o1"}
    assert result.steps["charge"].status is StepStatus.SUCCEEDED
    assert result.error is None and result.duration is not None


async def test_failure_compensates_completed_steps_in_reverse_order():
    log, step, undo = recorder()
    saga = Saga("order")
    saga.add_step("a", step("a"), undo("a"))
    saga.add_step("b", step("b", sleep=0.001), undo("b"))
    saga.add_step("c", step("c", fail=True), undo("c"))
    saga.add_step("d", step("d"), undo("d"))
    result = await saga.execute()
    assert result.status is SagaStatus.COMPENSATED
    assert log == ["start a", "done a", "start b", "done b", "start c", "fail c",
                   "undo b", "undo a"]
    assert result.failed_step == "c" and "Boom: c failed" in (result.error or "")
    assert isinstance(result.exception, Boom)
    assert result.steps["d"].status is StepStatus.SKIPPED
    assert result.steps["c"].status is StepStatus.FAILED


async def test_retries_with_backoff_then_success():
    calls: list[float] = []

    async def flaky(ctx):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("transient")
        return "ok"

    saga = Saga("r")
    saga.add_step("flaky", flaky, retry=Retry(attempts=3, backoff=0.02, multiplier=2))
    result = await saga.execute()
    assert result.succeeded and result.steps["flaky"].attempts == 3
    assert calls[1] - calls[0] >= 0.02 * 0.9 and calls[2] - calls[1] >= 0.04 * 0.9


async def test_retry_gives_up_on_non_retryable_errors():
    calls = 0

    async def bad(ctx):
        nonlocal calls
        calls += 1
        raise KeyError("no such order")

    saga = Saga("r")
    saga.add_step("bad", bad, retry=Retry(attempts=5, give_up_on=(KeyError,)))
    result = await saga.execute()
    assert result.status is SagaStatus.COMPENSATED and calls == 1


async def test_retries_exhausted_fail_the_step():
    calls = 0

    async def bad(ctx):
        nonlocal calls
        calls += 1
        raise Boom("always")

    saga = Saga("r")
    saga.add_step("bad", bad, retry=Retry(attempts=4))
    result = await saga.execute()
    assert result.status is SagaStatus.COMPENSATED and calls == 4
    assert result.steps["bad"].attempts == 4


async def test_step_timeout_cancels_the_attempt_and_compensates():
    log, step, undo = recorder()
    saga = Saga("t")
    saga.add_step("a", step("a"), undo("a"))
    saga.add_step("slow", step("slow", sleep=10), undo("slow"), timeout=0.05)
    result = await saga.execute()
    assert result.status is SagaStatus.COMPENSATED
    assert "cancelled slow" in log and "undo slow" not in log and log[-1] == "undo a"
    assert result.steps["slow"].error == "timed out after 0.05s"


async def test_step_timeout_is_retried_when_the_policy_says_so():
    calls = 0

    async def slow_once(ctx):
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(10)
        return calls

    saga = Saga("t")
    saga.add_step("s", slow_once, timeout=0.05, retry=Retry(attempts=2))
    result = await saga.execute()
    assert result.succeeded and result.results["s"] == 2

    saga2 = Saga("t2")
    calls = 0
    saga2.add_step("s", slow_once, timeout=0.05,
                   retry=Retry(attempts=2, retry_on_timeout=False))
    assert (await saga2.execute()).status is SagaStatus.COMPENSATED and calls == 1


async def test_saga_deadline_cancels_running_steps_and_compensates():
    log, step, undo = recorder()
    saga = Saga("deadline", timeout=0.08)
    saga.add_step("a", step("a"), undo("a"))
    saga.add_step("b", step("b", sleep=10), undo("b"))
    result = await saga.execute()
    assert result.status is SagaStatus.COMPENSATED
    assert result.error == "saga deadline of 0.08s exceeded"
    assert log == ["start a", "done a", "start b", "cancelled b", "undo a"]
    assert result.steps["b"].status is StepStatus.CANCELLED


async def test_independent_dag_steps_run_concurrently():
    a_started = asyncio.Event()
    b_started = asyncio.Event()

    async def a(ctx):
        a_started.set()
        await asyncio.wait_for(b_started.wait(), 2)  # deadlocks if run one after the other

    async def b(ctx):
        b_started.set()
        await asyncio.wait_for(a_started.wait(), 2)

    async def c(ctx):
        return "joined"

    saga = DAGSaga("par")
    saga.add_step("a", a)
    saga.add_step("b", b)
    saga.add_step("c", c, depends_on=["a", "b"])
    result = await saga.execute()
    assert result.succeeded and result.results["c"] == "joined"


async def test_fail_fast_cancels_running_siblings():
    log, step, undo = recorder()
    saga = DAGSaga("ff", failure_strategy=FailureStrategy.FAIL_FAST)
    saga.add_step("done_first", step("done_first"), undo("done_first"))
    saga.add_step("slow", step("slow", sleep=10), undo("slow"))
    saga.add_step("bad", step("bad", sleep=0.01, fail=True), undo("bad"))
    saga.add_step("never", step("never"), undo("never"), depends_on=["slow", "bad"])
    result = await saga.execute()
    assert result.status is SagaStatus.COMPENSATED
    assert "cancelled slow" in log and "start never" not in log
    assert "undo done_first" in log and "undo slow" not in log and "undo bad" not in log
    assert result.steps["slow"].status is StepStatus.CANCELLED


async def test_wait_all_lets_siblings_finish_then_compensates_them():
    log, step, undo = recorder()
    saga = DAGSaga("wa", failure_strategy=FailureStrategy.WAIT_ALL)
    saga.add_step("slowish", step("slowish", sleep=0.05), undo("slowish"))
    saga.add_step("bad", step("bad", fail=True), undo("bad"))
    saga.add_step("after", step("after"), undo("after"), depends_on=["slowish"])
    result = await saga.execute()
    assert result.status is SagaStatus.COMPENSATED
    assert log.index("done slowish") < log.index("undo slowish")
    assert "start after" not in log
    assert result.steps["slowish"].status is StepStatus.COMPENSATED


async def test_fail_fast_with_grace_waits_for_quick_siblings_and_cancels_slow_ones():
    log, step, undo = recorder()
    saga = DAGSaga("g", failure_strategy=FailureStrategy.FAIL_FAST_WITH_GRACE,
                   grace_period=0.2)
    saga.add_step("quick", step("quick", sleep=0.02), undo("quick"))
    saga.add_step("slow", step("slow", sleep=10), undo("slow"))
    saga.add_step("bad", step("bad", fail=True), undo("bad"))
    result = await saga.execute()
    assert result.status is SagaStatus.COMPENSATED
    assert "done quick" in log and "undo quick" in log
    assert "cancelled slow" in log and "undo slow" not in log


async def test_compensate_started_option_undoes_the_failed_step_too():
    log, step, undo = recorder()
    saga = Saga("cs", compensate_started=True)
    saga.add_step("a", step("a"), undo("a"))
    saga.add_step("b", step("b", fail=True), undo("b"))
    await saga.execute()
    assert log[-2:] == ["undo b", "undo a"]


async def test_compensation_failure_retries_then_marks_the_saga_failed():
    attempts = 0
    log, step, undo = recorder()

    async def stubborn_undo(ctx):
        nonlocal attempts
        attempts += 1
        raise Boom("refund service down")

    saga = Saga("cf")
    saga.add_step("a", step("a"), undo("a"))
    saga.add_step("b", step("b"), stubborn_undo, compensation_retry=Retry(attempts=3,
                                                                          backoff=0.001))
    saga.add_step("c", step("c", fail=True))
    result = await saga.execute()
    assert result.status is SagaStatus.FAILED and attempts == 3
    assert result.compensation_errors == {"b": "Boom: refund service down"}
    # a depends on b: it is not undone while b's undo failed, so an operator sees both
    assert "undo a" not in log and result.steps["a"].status is StepStatus.SUCCEEDED


async def test_raise_on_failure_raises_with_the_result_and_the_cause():
    saga = Saga("x")

    async def bad(ctx):
        raise Boom("nope")

    saga.add_step("bad", bad)
    with pytest.raises(SagaFailed, match="ended compensated") as info:
        await saga.execute(raise_on_failure=True)
    assert info.value.result.failed_step == "bad"
    assert isinstance(info.value.__cause__, Boom)


async def test_step_results_must_be_serialisable():
    saga = Saga("x")

    async def returns_object(ctx):
        return object()

    saga.add_step("s", returns_object)
    result = await saga.execute()
    assert result.status is SagaStatus.COMPENSATED
    assert "result of step 's' is not serialisable" in (result.error or "")


async def test_idempotent_start_returns_the_same_saga():
    calls = 0

    async def once(ctx):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        return calls

    saga = Saga("idem")
    saga.add_step("once", once)
    engine = Engine()
    r1, r2 = await asyncio.gather(
        engine.run(saga, {"n": 1}, idempotency_key="order-1"),
        engine.run(saga, {"n": 1}, idempotency_key="order-1"),
    )
    r3 = await engine.run(saga, {"n": 1}, idempotency_key="order-1")
    assert calls == 1 and r1.saga_id == r2.saga_id == r3.saga_id
    assert r3.succeeded and r3.results == {"once": 1}
    r4 = await engine.run(saga, {"n": 2}, idempotency_key="order-2")
    assert calls == 2 and r4.saga_id != r1.saga_id


async def test_concurrent_runs_of_one_definition_are_independent():
    saga = Saga("conc")

    @saga.step()
    async def echo(ctx):
        await asyncio.sleep(0.001 * (ctx["i"] % 3))
        return ctx["i"]

    @saga.step()
    async def check(ctx):
        if ctx["i"] % 5 == 0:
            raise Boom("every fifth")
        return ctx.result("echo") * 2

    results = await asyncio.gather(*(saga.execute(i=i) for i in range(60)))
    for i, r in enumerate(results):
        assert r.context["i"] == i
        if i % 5 == 0:
            assert r.status is SagaStatus.COMPENSATED
        else:
            assert r.results == {"echo": i, "check": 2 * i}
    assert len({r.saga_id for r in results}) == 60


async def test_a_crashed_run_resumes_from_the_store():
    store = InMemorySagaStore()
    calls = {"a": 0, "b": 0}
    gate = asyncio.Event()

    async def a(ctx):
        calls["a"] += 1
        return "a"

    async def b(ctx):
        calls["b"] += 1
        if calls["b"] == 1:
            gate.set()
            await asyncio.sleep(10)  # the process "dies" here
        return "b"

    saga = Saga("resume")
    saga.add_step("a", a)
    saga.add_step("b", b)
    first = asyncio.create_task(Engine(store).run(saga, {"k": 1}, saga_id="s-1"))
    await gate.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    record = await store.load("s-1")
    assert record is not None and record.state["status"] == "running"

    result = await Engine(store).resume(saga, "s-1")
    assert result.succeeded and result.results == {"a": "a", "b": "b"}
    assert calls == {"a": 1, "b": 2}  # a is not repeated; b's attempt is issued again
    assert (await store.load("s-1")).status == "completed"  # type: ignore[union-attr]


async def test_store_lists_and_bounds_finished_runs():
    store = InMemorySagaStore(max_finished=3)
    saga = Saga("listed")
    saga.add_step("a", lambda_ok)
    for i in range(5):
        await Engine(store).run(saga, saga_id=f"id-{i}")
    listed = await store.list(name="listed")
    assert [r.saga_id for r in listed] == ["id-4", "id-3", "id-2"]
    assert await store.load("id-0") is None
    assert await store.list(status="failed") == []


async def lambda_ok(ctx):
    return None


async def test_bad_run_arguments_are_rejected():
    saga = Saga("x")
    saga.add_step("a", lambda_ok)
    with pytest.raises(ValueError, match="saga_id must be a non-empty str"):
        await Engine().run(saga, saga_id="")
    with pytest.raises(ValueError, match="idempotency_key must be a non-empty str"):
        await Engine().run(saga, idempotency_key=5)  # type: ignore[arg-type]
    remote = Saga("remote")
    remote.add_step("pay", None, participant="payments")
    with pytest.raises(ValueError, match=r"cannot run in-process: steps \['pay'\]"):
        await remote.execute()


async def test_operator_retries_the_failed_compensations_of_a_failed_saga():
    log, step, undo = recorder()
    refund_works = False

    async def refund(ctx):
        log.append("refund attempt")
        if not refund_works:
            raise Boom("refund service down")

    saga = Saga("op")
    saga.add_step("reserve", step("reserve"), undo("reserve"))
    saga.add_step("charge", step("charge"), refund, compensation_retry=Retry(attempts=2))
    saga.add_step("ship", step("ship", fail=True))
    engine = Engine()
    failed = await engine.run(saga, saga_id="op-1")
    assert failed.status is SagaStatus.FAILED and log.count("refund attempt") == 2
    assert "undo reserve" not in log  # blocked behind the failed refund

    with pytest.raises(ValueError, match="is completed, not failed"):
        ok_saga = Saga("fine")
        ok_saga.add_step("a", step("a"))
        await engine.run(ok_saga, saga_id="fine-1")
        await engine.retry_compensations(ok_saga, "fine-1")

    with pytest.raises(ValueError, match="saga 'op-1' is a 'op', not a 'fine'"):
        await engine.retry_compensations(ok_saga, "op-1")  # the wrong definition

    again = await engine.retry_compensations(saga, "op-1")  # still broken: one attempt
    assert again.status is SagaStatus.FAILED and log.count("refund attempt") == 3
    refund_works = True
    fixed = await engine.retry_compensations(saga, "op-1")
    assert fixed.status is SagaStatus.COMPENSATED
    assert log[-2:] == ["refund attempt", "undo reserve"]  # then the blocked step, in order
    assert fixed.steps["charge"].compensation_attempts == 4


@pytest.mark.parametrize("lease", [0, -1, True, "5", None, float("nan"), float("inf")])
def test_claim_lease_is_checked(lease):
    with pytest.raises(ValueError, match="claim_lease must be a finite number of seconds > 0"):
        Engine(claim_lease=lease)
    assert Engine(claim_lease=2).claim_lease == 2.0


async def test_a_run_that_cannot_start_does_not_hold_its_key():
    """The context is checked before the key is claimed: a rejected start leaves no claim
    behind (which made every later run with the key fail)."""
    from sagaz import SagaAlreadyRunning, SagaContextError, SagazError

    assert issubclass(SagaAlreadyRunning, SagazError)
    saga = Saga("unstartable")

    @saga.step()
    async def only(ctx):
        return "ok"

    engine = Engine(InMemorySagaStore())
    with pytest.raises(SagaContextError):
        await engine.run(saga, {"when": {1, 2}}, idempotency_key="k")
    assert (await engine.run(saga, {"n": 1}, idempotency_key="k")).succeeded
