"""The metric catalogue is the contract: every component registers its families, the union
is the catalogue, docs/metrics.md is generated from it; the engine's counts are right."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sagaz import Engine, Retry, Saga, SagaStatus, metrics
from sagaz.metrics import InFlight

ROOT = Path(__file__).resolve().parents[2]


def families(registry: CollectorRegistry) -> set[str]:
    return {f.name + ("_total" if f.type == "counter" else "") for f in registry.collect()}


def test_the_components_together_register_exactly_the_catalogue():
    seen: dict[str, str] = {}
    for component in metrics.COMPONENTS:
        registry = CollectorRegistry()
        component(registry)
        for name in families(registry):
            assert name not in seen, f"{name} registered by {seen[name]} and {component}"
            seen[name] = component.__name__
    assert set(seen) == set(metrics.CATALOGUE)
    assert len(seen) >= 40


def test_each_family_is_registered_by_a_component_of_its_documented_place():
    where = {"RunMetrics": "engine+worker", "StreamMetrics": "worker",
             "ParticipantMetrics": "participant", "OutboxMetrics": "outbox",
             "OptimisticMetrics": "outbox", "InboxMetrics": "inbox",
             "InboxConsumerMetrics": "inbox", "ClientMetrics": "client"}
    for component in metrics.COMPONENTS:
        registry = CollectorRegistry()
        component(registry)
        for name in families(registry):
            assert metrics.CATALOGUE[name].component == where[component.__name__], name


def test_docs_metrics_md_is_generated_from_the_catalogue():
    assert (ROOT / "docs" / "metrics.md").read_text() == metrics.markdown()


def test_components_of_one_kind_share_one_registry_and_bad_registries_are_refused():
    registry = CollectorRegistry()
    assert metrics.shared(metrics.RunMetrics, registry) is metrics.shared(
        metrics.RunMetrics, registry)
    Engine(metrics=registry)
    Engine(metrics=registry)  # no "Duplicated timeseries"
    with pytest.raises(TypeError, match="CollectorRegistry"):
        Engine(metrics="prometheus")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


class Boom(Exception):
    pass


async def test_engine_counts_completed_compensated_failed_retried_and_timed_out_sagas():
    registry = CollectorRegistry()
    engine = Engine(metrics=registry)
    calls = {"flaky": 0}

    async def ok(ctx):
        return 1

    async def flaky(ctx):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise Boom("once")
        return 2

    async def fail(ctx):
        raise Boom("no")

    async def hang(ctx):
        await asyncio.sleep(10)

    async def undo(ctx):
        pass

    async def bad_undo(ctx):
        raise Boom("cannot undo")

    done = Saga("done")
    done.add_step("a", ok, undo)
    done.add_step("b", flaky, undo, retry=Retry(attempts=2))
    undone = Saga("undone")
    undone.add_step("a", ok, undo)
    undone.add_step("slow", hang, undo, timeout=0.05)
    stuck = Saga("stuck")
    stuck.add_step("a", ok, bad_undo)
    stuck.add_step("c", fail)

    assert (await engine.run(done)).status is SagaStatus.COMPLETED
    assert (await engine.run(undone)).status is SagaStatus.COMPENSATED
    assert (await engine.run(stuck)).status is SagaStatus.FAILED

    v = lambda name, **labels: value(registry, name, **labels)  # noqa: E731
    assert v("saga_started_total", saga="done") == 1
    assert v("saga_execution_total", saga="done", status="completed") == 1
    assert v("saga_execution_total", saga="undone", status="compensated") == 1
    assert v("saga_execution_total", saga="stuck", status="failed") == 1
    assert v("saga_execution_duration_seconds_count", saga="undone", status="compensated") == 1
    assert v("saga_execution_duration_seconds_sum", saga="undone",
             status="compensated") >= 0.05
    # retried: attempt 1 failed, attempt 2 (a retry) succeeded
    assert v("saga_step_total", saga="done", step_name="b", outcome="failed") == 1
    assert v("saga_step_total", saga="done", step_name="b", outcome="succeeded") == 1
    assert v("saga_step_retries_total", saga="done", step_name="b") == 1
    assert v("saga_step_duration_seconds_count", saga="done", step_name="b",
             action="run") == 2
    # timed out, then compensated
    assert v("saga_step_total", saga="undone", step_name="slow", outcome="timed_out") == 1
    assert v("saga_step_timeouts_total", saga="undone", step_name="slow") == 1
    assert v("saga_compensation_total", saga="undone", step_name="a",
             outcome="succeeded") == 1
    assert v("saga_step_duration_seconds_count", saga="undone", step_name="a",
             action="compensate") == 1
    # failed: the compensation of a gave up
    assert v("saga_step_total", saga="stuck", step_name="c", outcome="failed") == 1
    assert v("saga_compensation_total", saga="stuck", step_name="a", outcome="failed") == 1
    # nothing in flight any more: the gauges say 0 for what they reported
    assert v("saga_oldest_in_flight_age_seconds", saga="done") == 0


async def test_engine_in_flight_gauges_follow_running_and_compensating_runs():
    registry = CollectorRegistry()
    now = [1000.0]
    engine = Engine(metrics=registry, clock=lambda: now[0])
    gate = asyncio.Event()

    async def wait(ctx):
        await gate.wait()

    async def fail(ctx):
        await gate.wait()
        raise Boom("no")

    async def undo_slowly(ctx):
        await asyncio.sleep(0.05)

    saga = Saga("inflight")
    saga.add_step("w", wait, undo_slowly)
    saga.add_step("f", fail)
    runs = [asyncio.create_task(engine.run(saga)) for _ in range(3)]
    await asyncio.sleep(0.01)
    now[0] = 1030.0
    assert value(registry, "saga_in_flight", saga="inflight", status="running") == 3
    assert value(registry, "saga_oldest_in_flight_age_seconds", saga="inflight") == 30
    gate.set()
    for _ in range(100):
        await asyncio.sleep(0.005)
        if value(registry, "saga_in_flight", saga="inflight", status="compensating") == 3:
            break
    assert value(registry, "saga_in_flight", saga="inflight", status="compensating") == 3
    assert value(registry, "saga_in_flight", saga="inflight", status="running") == 0
    assert {r.status for r in await asyncio.gather(*runs)} == {SagaStatus.COMPENSATED}
    assert value(registry, "saga_in_flight", saga="inflight", status="compensating") == 0
    assert value(registry, "saga_oldest_in_flight_age_seconds", saga="inflight") == 0


async def test_an_engine_without_metrics_measures_nothing():
    engine = Engine()
    saga = Saga("plain")

    async def ok(ctx):
        return 1

    saga.add_step("a", ok)
    assert (await engine.run(saga)).succeeded and engine.metrics is None


def test_in_flight_tracker_counts_and_oldest_age_follow_row_changes():
    now = [100.0]
    tracker = InFlight(clock=lambda: now[0])
    tracker.update("s1", "order", "running", 10.0)
    tracker.update("s2", "order", "running", 50.0)
    tracker.update("s3", "pay", "running", 70.0)
    tracker.update("s1", "order", "compensating", 10.0)
    assert tracker.counts() == {("order", "running"): 1, ("order", "compensating"): 1,
                                ("pay", "running"): 1}
    assert tracker.oldest() == {"order": 90.0, "pay": 30.0}
    tracker.update("s1", "order", "compensated", 10.0)  # ended: gone
    tracker.update("s3", "pay", None, 70.0)  # row deleted
    assert tracker.counts() == {("order", "running"): 1, ("order", "compensating"): 0,
                                ("pay", "running"): 0}
    assert tracker.oldest() == {"order": 50.0, "pay": 0.0}
    tracker.clear()
    assert len(tracker) == 0 and tracker.oldest() == {"order": 0.0, "pay": 0.0}


def test_the_stream_worker_reports_the_runs_transitions_as_the_engine_would():
    """The pure orchestrator's outputs carry the transition; RunMetrics and the in-flight
    index of the worker read it (elapsed: as the participant measured the attempt)."""
    import orjson

    from sagaz import messages as msgs
    from sagaz.metrics import RunMetrics
    from streams.orchestrator import Orchestrator, Topics

    saga = Saga("pay")

    async def charge(ctx): ...

    async def refund(ctx): ...

    async def ship(ctx): ...

    saga.add_step("charge", charge, refund)
    saga.add_step("ship", ship, retry=Retry(attempts=2), timeout=5)
    orch = Orchestrator([saga], Topics("t"))
    registry = CollectorRegistry()
    runs = RunMetrics(registry)
    tracker = InFlight(clock=lambda: 160.0)
    runs.add_in_flight(tracker.counts, tracker.oldest)

    def feed(topic: str, value: bytes, row: bytes | None, now: float) -> tuple[Any, Any]:
        out = orch.process(topic, b"s1", value, row, now)
        if out.run is not None:
            tracker.update(out.run.saga_id, out.run.saga, out.run.status, out.run.started_at)
            runs.transition(out.run)
        return out, out.row or row

    def reply(cmd: dict, ok: bool, row: bytes, now: float) -> tuple[Any, Any]:
        return feed("t.results", msgs.encode(
            "result", "s1", command_id=cmd["command_id"], step=cmd["step"],
            attempt=cmd["attempt"], action="run" if cmd["type"] == "run" else "compensate",
            ok=ok, result=None, error=None if ok else "no", retryable=True, set={},
            elapsed=0.25), row, now)

    def commands(out: Any) -> list[dict]:
        return [orjson.loads(v) for t, _, v in out.sends if t.startswith("t.participant")]

    out, row = feed("t.commands", msgs.encode("start", "s1", saga="pay", data={},
                                              idempotency_key=None), None, 100.0)
    [charge_cmd] = commands(out)
    out, row = reply(charge_cmd, True, row, 101.0)
    [ship_cmd] = commands(out)
    assert value(registry, "saga_in_flight", saga="pay", status="running") == 1
    assert value(registry, "saga_oldest_in_flight_age_seconds", saga="pay") == 60
    out, row = reply(ship_cmd, False, row, 102.0)  # retried at once: attempt 2
    [retry_cmd] = commands(out)
    assert retry_cmd["attempt"] == 2
    # attempt 2 times out: abandoned, the saga compensates charge
    timer = msgs.encode("timer", "s1", key="timeout|ship|2", due=107.0)
    out, row = feed("t.timers", timer, row, 108.0)
    [refund_cmd] = commands(out)
    assert value(registry, "saga_in_flight", saga="pay", status="compensating") == 1
    out, row = reply(refund_cmd, True, row, 109.0)
    assert out.run.status == "compensated"
    repeat, _ = feed("t.results", msgs.encode(  # a repeat of the last input: re-sent
        "result", "s1", command_id=refund_cmd["command_id"], step="charge", attempt=1,
        action="compensate", ok=True, result=None, error=None, retryable=True, set={}),
        row, 110.0)
    assert repeat.run is None and repeat.duplicate

    v = lambda name, **labels: value(registry, name, **labels)  # noqa: E731
    assert v("saga_started_total", saga="pay") == 1
    assert v("saga_execution_total", saga="pay", status="compensated") == 1
    assert v("saga_execution_duration_seconds_sum", saga="pay", status="compensated") == 9
    assert v("saga_step_total", saga="pay", step_name="charge", outcome="succeeded") == 1
    assert v("saga_step_total", saga="pay", step_name="ship", outcome="failed") == 1
    assert v("saga_step_total", saga="pay", step_name="ship", outcome="timed_out") == 1
    assert v("saga_step_timeouts_total", saga="pay", step_name="ship") == 1
    assert v("saga_step_retries_total", saga="pay", step_name="ship") == 1
    assert v("saga_compensation_total", saga="pay", step_name="charge",
             outcome="succeeded") == 1
    assert v("saga_step_duration_seconds_sum", saga="pay", step_name="ship",
             action="run") == 0.25  # the failed attempt's; the abandoned one has none
    assert v("saga_step_duration_seconds_count", saga="pay", step_name="charge",
             action="compensate") == 1
    assert v("saga_in_flight", saga="pay", status="compensating") == 0
    assert len(tracker) == 0


def test_dead_letters_are_classed_for_the_metrics():
    from sagaz import messages as msgs
    from streams.orchestrator import Orchestrator, Topics

    orch = Orchestrator([], Topics("t"))
    assert orch.process("t.commands", b"s1", b"not json", None, 1.0).dead_letter_kind == \
        "malformed"
    start = msgs.encode("start", "s1", saga="nope", data={}, idempotency_key=None)
    assert orch.process("t.commands", b"s1", start, None, 1.0).dead_letter_kind == \
        "unknown_saga"
    timer = msgs.encode("timer", "s1", key="deadline", due=0.0)
    assert orch.process("t.timers", b"s1", timer, None, 1.0).dead_letter_kind == "no_saga"
