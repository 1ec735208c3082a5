"""Definitions versioned per run, on the pure parts: fingerprints, version selection, and
runs whose definition is not here (they wait: neither guessed nor dropped)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import orjson
import pytest

from sagaz import Engine, FailureStrategy, InMemorySagaStore, Retry, Saga, SagaContext
from sagaz import messages as msgs
from sagaz.errors import SagaDefinitionError
from sagaz.participant import Participant
from sagaz.versions import Definitions, DefinitionUnavailable, continues_on
from streams.orchestrator import EXPIRE, Orchestrator, Topics
from tests import versioned_sagas as vs


async def a(ctx: SagaContext) -> None: ...
async def b(ctx: SagaContext) -> None: ...
async def undo(ctx: SagaContext) -> None: ...


def build(name: str = "s", *, version: int = 1, saga: dict[str, Any] | None = None,
          steps: list[tuple[str, dict[str, Any]]] | None = None) -> Saga:
    s = Saga(name, version=version, **(saga or {}))
    for step, options in steps if steps is not None else [("one", {}), ("two", {})]:
        s.add_step(step, options.pop("fn", a), options.pop("undo", undo), **options)
    return s


# -- fingerprints

def test_the_same_definition_has_the_same_fingerprint_in_other_processes() -> None:
    code = "from tests.versioned_sagas import v1, v2; print(v1.fingerprint, v2.fingerprint)"
    seen = {tuple(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONHASHSEED": seed}
                                 ).stdout.split()) for seed in ("1", "2")}
    assert seen == {(vs.v1.fingerprint, vs.v2.fingerprint)}
    assert vs.v1.fingerprint != vs.v2.fingerprint


def test_the_fingerprint_ignores_bodies_and_spelling_but_not_what_decides_a_run() -> None:
    base = build().fingerprint
    assert build().fingerprint == base
    assert build(steps=[("one", {"fn": b}), ("two", {})]).fingerprint == base  # bodies
    assert build(version=3).fingerprint == base  # the version is recorded on its own
    assert build(steps=[("one", {"timeout": 5}), ("two", {})]).fingerprint == \
        build(steps=[("one", {"timeout": 5.0}), ("two", {})]).fingerprint
    changed = [
        build(steps=[("one", {}), ("two", {}), ("three", {})]),
        build(steps=[("two", {}), ("one", {})]),
        build(steps=[("one", {}), ("two", {"depends_on": []})]),  # a DAG: both roots
        build(steps=[("one", {"participant": "elsewhere"}), ("two", {})]),
        build(steps=[("one", {"retry": Retry(attempts=2)}), ("two", {})]),
        build(steps=[("one", {"retry": Retry(retry_on=(ValueError,))}), ("two", {})]),
        build(steps=[("one", {"timeout": 5}), ("two", {})]),
        build(steps=[("one", {"undo": None}), ("two", {})]),
        build(steps=[("one", {"compensation_timeout": 5}), ("two", {})]),
        build(steps=[("one", {"compensation_retry": Retry(attempts=3)}), ("two", {})]),
        build(saga={"timeout": 60}),
        build(saga={"compensate_started": True}),
        build(saga={"failure_strategy": FailureStrategy.WAIT_ALL}),
        build(saga={"failure_strategy": "fail_fast_with_grace", "grace_period": 1}),
    ]
    prints = [s.fingerprint for s in changed]
    assert base not in prints and len(set(prints)) == len(prints)


@pytest.mark.parametrize("bad", [0, -1, True, "2", 1.5, 2.0])
def test_a_version_is_a_positive_int(bad: Any) -> None:
    with pytest.raises(SagaDefinitionError, match=r"saga 's': version must be a positive int"):
        Saga("s", version=bad)


def test_a_subclass_may_set_its_version_in_its_body() -> None:
    class Order(Saga):
        name = "order"
        version = 4

    assert Order().version == 4 and Saga("x").version == 1


def test_two_definitions_of_one_version_are_an_error_naming_both() -> None:
    one, other = build("dup"), build("dup", steps=[("one", {})])
    with pytest.raises(SagaDefinitionError) as err:
        Orchestrator([one, other], Topics("t"))
    text = str(err.value)
    assert "two definitions of saga 'dup' version 1" in text
    assert one.built_at in text and other.built_at in text
    assert one.fingerprint in text and other.fingerprint in text and "new version" in text
    with pytest.raises(SagaDefinitionError, match="two definitions of saga 'dup'"):
        Participant("s", [one, other], bootstrap="127.0.0.1:9")


def test_new_runs_start_on_the_newest_version() -> None:
    defs = Definitions([vs.v2, vs.v1])
    assert defs.newest("vorder") is vs.v2 and defs.get("vorder", 1) is vs.v1
    assert defs.newest("other") is None


# -- the Kafka orchestrator's pure core

def start(orch: Orchestrator, sid: str = "s1", row: bytes | None = None) -> Any:
    return orch.process(orch.topics.commands, sid.encode(), msgs.encode(
        "start", sid, saga="vorder", data={"order_id": sid}, idempotency_key=None),
        row, 100.0)


def commands(orch: Orchestrator, out: Any) -> list[dict[str, Any]]:
    return [orjson.loads(v) for t, _, v in out.sends if ".participant." in t]


def reply(orch: Orchestrator, cmd: dict[str, Any], row: bytes, ok: bool = True) -> Any:
    return orch.process(orch.topics.results, cmd["saga_id"].encode(), msgs.encode(
        "result", cmd["saga_id"], command_id=cmd["command_id"], step=cmd["step"],
        attempt=cmd["attempt"], action=cmd["type"], ok=ok, result=None,
        error=None if ok else "no", retryable=False, set={}), row, 101.0)


def test_in_flight_runs_continue_on_their_version_and_new_ones_start_on_the_newest() -> None:
    old = Orchestrator(vs.V1, Topics("t"))
    out = start(old)
    row = out.row
    doc = orjson.loads(row)
    assert (doc["version"], doc["fingerprint"]) == (1, vs.v1.fingerprint)
    [cmd] = commands(old, out)
    assert (cmd["step"], cmd["version"]) == ("reserve", 1)

    both = Orchestrator(vs.BOTH, Topics("t"))  # the rolled worker
    out = reply(both, cmd, row)
    row = out.row
    [cmd] = commands(both, out)
    assert (cmd["step"], cmd["version"]) == ("charge", 1)
    out = reply(both, cmd, row)
    assert orjson.loads(out.row)["state"]["status"] == "completed"  # 2 steps: v1's
    assert both.view(out.row)["version"] == 1
    assert [s["name"] for s in both.view(out.row)["steps"]] == ["reserve", "charge"]

    fresh = start(both, "s2")
    assert orjson.loads(fresh.row)["version"] == 2
    assert [c["version"] for c in commands(both, fresh)] == [2]


def test_a_row_of_a_version_the_worker_lacks_waits_and_is_not_changed() -> None:
    out = start(Orchestrator(vs.V1, Topics("t")))
    [cmd] = commands(Orchestrator(vs.V1, Topics("t")), out)
    only_v2 = Orchestrator(vs.V2, Topics("t"))
    with pytest.raises(DefinitionUnavailable, match=r"saga 'vorder' version 1 is not defined "
                                                    r"here \(this process has versions \[2\]\)"):
        reply(only_v2, cmd, out.row)
    assert only_v2.waiting(out.row) == ("vorder", 1)
    with pytest.raises(DefinitionUnavailable):  # a repeated start of the running saga
        start(only_v2, row=out.row)
    # a saga name the worker does not define at all waits too (it was dead-lettered)
    assert Orchestrator([build("other")], Topics("t")).waiting(out.row) == ("vorder", 1)


def test_a_finished_run_of_a_removed_version_needs_no_definition() -> None:
    v1 = Orchestrator(vs.V1, Topics("t"), retention=60)
    out = start(v1)
    row = out.row
    while True:
        cmds = commands(v1, out)
        if not cmds:
            break
        out = reply(v1, cmds[0], row)
        row = out.row or row
    only_v2 = Orchestrator(vs.V2, Topics("t"), retention=60)
    assert only_v2.waiting(row) is None
    again = start(only_v2, row=row)  # an idempotent start: the outcome, announced again
    # (and its row written again as it is: tests/unit/test_repeats.py)
    assert [t for t, _, _ in again.sends] == ["t.outcomes"] and again.row == row
    assert again.dead_letter is None
    expired = only_v2.process(only_v2.topics.timers, b"s1",
                              msgs.encode("timer", "s1", key=EXPIRE, due=0.0), row, 1e9)
    assert expired.delete and expired.dead_letter is None


def test_a_row_written_before_versions_is_version_1_of_the_definition_here() -> None:
    out = start(Orchestrator(vs.V1, Topics("t")))
    doc = orjson.loads(out.row)
    del doc["version"], doc["fingerprint"]
    legacy = orjson.dumps(doc)
    [cmd] = commands(Orchestrator(vs.V1, Topics("t")), out)
    both = Orchestrator(vs.BOTH, Topics("t"))
    nxt = reply(both, cmd, legacy)
    assert [c["version"] for c in commands(both, nxt)] == [1]
    assert "version" not in orjson.loads(nxt.row)  # not invented afterwards either
    assert Orchestrator(vs.V2, Topics("t")).waiting(legacy) == ("vorder", 1)


def changed_v1(step: str) -> Saga:
    """Version 1 of "vorder", changed without a bump: ``step``'s retries."""
    s = Saga("vorder", timeout=300)
    original = {"reserve": Retry(attempts=2, backoff=0.05), "charge": None}
    for name, retry in original.items():
        s.add_step(name, a, undo, participant="vstock" if name == "reserve" else "vpay",
                   retry=Retry(attempts=9) if name == step else retry)
    return s


def test_a_change_without_a_version_bump_continues_only_if_the_rest_of_the_run_is_unchanged(
        ) -> None:
    v1 = Orchestrator(vs.V1, Topics("t"))
    out = start(v1)
    row = out.row
    [cmd] = commands(v1, out)
    # reserve (running) changed: the run has not passed it, so it waits
    with pytest.raises(DefinitionUnavailable, match="changed without a version bump"):
        reply(Orchestrator([changed_v1("reserve")], Topics("t")), cmd, row)
    # charge changed: not reached yet either
    assert Orchestrator([changed_v1("charge")], Topics("t")).waiting(row) == ("vorder", 1)
    out = reply(v1, cmd, row)  # reserve succeeded: charge runs now
    row = out.row
    [cmd] = commands(v1, out)
    changed = Orchestrator([changed_v1("reserve")], Topics("t"))  # passed: it continues
    done = reply(changed, cmd, row)
    assert orjson.loads(done.row)["state"]["status"] == "completed"
    assert changed.changed == {("vorder", 1, vs.v1.fingerprint):
                               changed_v1("reserve").fingerprint}


def test_continues_on_compares_the_graph_the_saga_policies_and_the_steps_not_passed() -> None:
    state = {"status": "running", "steps": [["succeeded"], ["running"]]}
    assert continues_on("h.g.s1.s2", "h.g.X.s2", state)
    assert not continues_on("h.g.s1.s2", "h.g.s1.X", state)
    assert not continues_on("h.g.s1.s2", "h.X.s1.s2", state)  # names, order, dependencies
    assert not continues_on("h.g.s1.s2", "X.g.s1.s2", state)  # deadline, strategy, ...
    assert continues_on("h.g.s1.s2", "X.g.s1.X", {"status": "completed",
                                                  "steps": [["succeeded"], ["succeeded"]]})
    assert not continues_on("h.g.s1", "h.g.s1.s2", state)
    assert not continues_on("garbage", "h.g.s1.s2", state)


# -- the in-process engine: the same rule

async def test_engine_resume_continues_on_the_runs_version_or_refuses() -> None:
    import asyncio

    store = InMemorySagaStore()
    calls: list[str] = []

    def step(label: str, hang: bool = False) -> Any:
        async def fn(ctx: SagaContext) -> None:
            calls.append(label)
            if hang and len(calls) == 1:
                await asyncio.sleep(3600)  # the process "dies" during this attempt
        return fn

    s1 = Saga("e", version=1)
    s1.add_step("x", step("v1 x", hang=True))
    s2 = Saga("e", version=2)
    s2.add_step("x", step("v2 x"))
    s2.add_step("y", step("v2 y"))
    task = asyncio.create_task(Engine(store).run(s1, {}, saga_id="r1"))
    while not calls:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = await store.load("r1")
    assert record is not None and (record.version, record.fingerprint) == (1, s1.fingerprint)
    assert record.status == "running"
    with pytest.raises(DefinitionUnavailable, match="'e' version 1 is not defined here"):
        await Engine(store).resume(s2, "r1")
    assert (await store.load("r1")) == record  # left as it was
    resumed = await Engine(store).resume([s2, s1], "r1")
    assert resumed.status.value == "completed" and list(resumed.steps) == ["x"]
    assert calls == ["v1 x", "v1 x"] and resumed.version == 1
    view = await Engine(store).get([s1, s2], "r1")
    assert view is not None and view.version == 1


async def test_engine_resume_on_a_version_changed_without_a_bump(
        caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    store = InMemorySagaStore()
    hang = asyncio.Event()

    async def second(ctx: SagaContext) -> None:
        if not hang.is_set():
            hang.set()
            await asyncio.sleep(3600)  # the process "dies" during this attempt

    def definition(first_retry: int, second_retry: int) -> Saga:
        s = Saga("c")
        s.add_step("first", a, retry=Retry(attempts=first_retry))
        s.add_step("second", second, retry=Retry(attempts=second_retry))
        return s

    task = asyncio.create_task(Engine(store).run(definition(1, 1), {}, saga_id="r"))
    await hang.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    before = await store.load("r")
    with pytest.raises(DefinitionUnavailable, match="changed without a version bump"):
        await Engine(store).resume(definition(1, 5), "r")  # "second" runs: not passed
    assert await store.load("r") == before
    resumed = await Engine(store).resume(definition(5, 1), "r")  # "first" is passed
    assert resumed.status.value == "completed"
    assert "changed without a version bump" in caplog.text


def test_the_worker_reports_waiting_runs_and_changes_without_a_bump(tmp_path: Any) -> None:
    from streams.app import OrchestratorApp
    from streams.config import Settings

    oapp = OrchestratorApp(Settings(datadir=str(tmp_path)), [changed_v1("reserve")])
    orch = oapp.orchestrator
    v1 = Orchestrator(vs.V1, Topics("sagaz"))
    out = start(v1)
    [cmd] = commands(v1, out)
    waiting_row = out.row
    passed_row = reply(v1, cmd, out.row).row  # reserve passed: continues on the change
    assert orch.waiting(passed_row) is None and orch.waiting(waiting_row) == ("vorder", 1)
    oapp._set_waiting({orch.waiting(waiting_row): 1})  # as the scan of the rows does
    _, ready, details = oapp.health()
    assert not ready
    assert details["definitions"] == {
        "waiting": [{"saga": "vorder", "version": 1, "runs": 1, "versions_here": [1]}],
        "changed_without_version_bump": [
            {"saga": "vorder", "version": 1, "runs_started_on": vs.v1.fingerprint,
             "fingerprint_here": changed_v1("reserve").fingerprint}]}
    sample = oapp.registry.get_sample_value
    assert sample("saga_stream_waiting_runs", {"saga": "vorder", "version": "1"}) == 1
    oapp._set_waiting({})  # rescanned: none waits any more
    assert sample("saga_stream_waiting_runs", {"saga": "vorder", "version": "1"}) is None
    assert oapp.health()[2]["definitions"]["waiting"] == []  # the change is still reported
