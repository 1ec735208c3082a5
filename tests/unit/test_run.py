"""The run record (sagaz.run): data rules, deduplication, codec and view, in both shells."""

from __future__ import annotations

import orjson
import pytest

from sagaz import Engine, InMemorySagaStore, Retry, Saga, SagaContext, SagaStatus, StepStatus
from sagaz import machine as m
from sagaz import run as run_record
from sagaz.participant import Participant
from streams.orchestrator import Orchestrator, Topics


class Boom(Exception):
    pass


def data_saga() -> Saga:
    """a sets and succeeds; b sets (also in place) and fails; a's compensation sets."""
    saga = Saga("data")

    @saga.step()
    async def a(ctx: SagaContext) -> str:
        ctx.set("a", 1)
        ctx.get("items").append("a")
        return "ra"

    @a.compensation
    async def undo_a(ctx: SagaContext) -> str:
        ctx.set("undone", ctx.get("a"))
        return "ignored"

    @saga.step(retry=Retry(attempts=2))
    async def b(ctx: SagaContext) -> None:
        assert ctx.get("b") is None and ctx.get("items") == ["a"]  # a retry starts clean
        ctx.set("b", 2)
        ctx.get("items").append("b")
        raise Boom("b failed")

    return saga


EXPECTED_DATA = {"items": ["a"], "a": 1, "undone": 1}


async def test_in_process_keeps_only_applied_successes_writes() -> None:
    """Old engine: one shared context, so b's writes (and its in-place append) stayed."""
    result = await data_saga().execute(items=[])
    assert result.status is SagaStatus.COMPENSATED
    assert result.steps["b"].attempts == 2
    assert result.context == EXPECTED_DATA
    assert result.results == {"a": "ra"}


def participant_for(saga: Saga) -> Participant:
    return Participant(saga.name, [saga], bootstrap="unused:9092")


async def drive_orchestrator(saga: Saga, data: dict) -> dict:
    """Run a saga through the orchestrator's pure core and a real participant's execute."""
    orch = Orchestrator([saga], Topics("t"))
    part = participant_for(saga)
    row, now = None, 1000.0
    start = m_encode("start", "s1", saga=saga.name, data=data, idempotency_key=None)
    pending = [("t.commands", start)]
    while pending:
        topic, value = pending.pop(0)
        out = orch.process(topic, b"s1", value, row, now)
        assert out.dead_letter is None, out.dead_letter
        row = out.row or row
        for t, _, v in out.sends:
            if t.startswith("t.participant."):
                reply, _ = await part.execute(orjson.loads(v))
                pending.append(("t.results", reply))
    assert row is not None
    return orch.view(row)


def m_encode(type_: str, saga_id: str, **fields: object) -> bytes:
    from sagaz import messages

    return messages.encode(type_, saga_id, **fields)


async def test_kafka_core_keeps_the_same_data() -> None:
    """Old orchestrator: the compensation's writes were dropped and b's in-place append to a
    shared list went unnoticed by the participant's diff."""
    view = await drive_orchestrator(data_saga(), {"items": []})
    assert view["status"] == "compensated"
    assert view["data"] == EXPECTED_DATA
    assert view["results"] == {"a": "ra"}


def unserialisable_saga() -> Saga:
    saga = Saga("unser")

    @saga.step(retry=Retry(attempts=3))
    async def s(ctx: SagaContext) -> object:
        return object()

    @s.compensation
    async def undo(ctx: SagaContext) -> None:
        ctx.set("undone", True)

    return saga


async def test_unserialisable_result_fails_for_good_and_is_compensated_in_process() -> None:
    """Old engine: retried (3 attempts) and never compensated; over Kafka: one attempt,
    compensated (it ran). Now both do the latter."""
    result = await unserialisable_saga().execute()
    assert result.status is SagaStatus.COMPENSATED
    assert result.steps["s"].attempts == 1
    assert result.steps["s"].status is StepStatus.COMPENSATED
    assert "result of step 's' is not serialisable" in (result.error or "")
    view = await drive_orchestrator(unserialisable_saga(), {})
    assert view["status"] == "compensated" and view["steps"][0]["attempts"] == 1
    assert view["steps"][0]["status"] == "compensated"
    assert view["data"] == result.context == {"undone": True}


def test_apply_dedupes_by_event_id_and_repeats_the_last_commands() -> None:
    plan = m.Plan.build("p", [("a", ()), ("b", ())])
    rec, cmds = run_record.start(plan, "s", {"x": 0}, 0.0, event_id="start")
    assert [type(c) for c in cmds] == [m.RunStep, m.RunStep]
    ok = m.StepSucceeded("a", 1, {"r": 1}, {"x": 1})
    applied, cmds = run_record.apply(plan, rec, ok, 1.0, "a-ok")
    assert applied and cmds == [] and rec.data == {"x": 1} and rec.results == {"a": {"r": 1}}
    # the last event again: its commands may have been lost, everything in flight again
    applied, cmds = run_record.apply(plan, rec, ok, 2.0, "a-ok")
    assert not applied and cmds == [m.RunStep("b", 1, "s")]
    applied, cmds = run_record.apply(plan, rec, m.StepFailed("b", 1, "x", False), 3.0, "b-e")
    assert applied
    # an older repeat: later inputs prove its commands went out
    assert run_record.apply(plan, rec, ok, 4.0, "a-ok") == (False, [])
    # stale without an id: the machine's rule
    assert run_record.apply(plan, rec, m.StepSucceeded("b", 1, "late", {"x": 9}), 5.0) == (
        False, [])
    assert rec.data == {"x": 1} and "b" not in rec.results
    assert rec.inbox == ["start", "a-ok", "b-e"]


def test_inbox_is_bounded() -> None:
    plan = m.Plan.build("p", [("a", ())])
    rec, _ = run_record.start(plan, "s", {}, 0.0, event_id="start")
    for i in range(5):
        run_record.apply(plan, rec, m.CancelRequested(), 1.0, f"c{i}", inbox_size=3)
    assert rec.inbox == ["c2", "c3", "c4"]


def test_changes_and_attempt_data() -> None:
    before = {"a": 1, "l": [1, {"x": []}], "d": {"k": [1]}}
    work = run_record.attempt_data(before)
    work["l"][1]["x"].append(2)
    work["d"]["k"].append(2)
    work["n"] = None
    assert before == {"a": 1, "l": [1, {"x": []}], "d": {"k": [1]}}
    assert run_record.changes(before, work) == {"l": [1, {"x": [2]}], "d": {"k": [1, 2]},
                                                "n": None}
    assert run_record.changes(before, run_record.attempt_data(before)) is None
    assert run_record.refusal("s", object(), None) is not None
    assert run_record.refusal("s", None, {"k": object()}) is not None
    assert run_record.refusal("s", {"ok": [1]}, {"k": 1}) is None


V1_ROW = {"v": 1, "saga": "p", "state": None, "data": {"x": 1}, "results": {"a": 2},
          "inbox": ["start"], "key": "k", "trace": {"traceparent": "00-1-2-01"},
          "expires_at": 5.0}


def test_codec_reads_version_1_rows_and_round_trips() -> None:
    plan = m.Plan.build("p", [("a", ())])
    state, _ = m.start(plan, "s", 0.0)
    row = orjson.dumps({**V1_ROW, "state": state.to_dict()})  # as streams wrote it before
    rec = run_record.decode(row)
    assert (rec.data, rec.results, rec.inbox, rec.idempotency_key, rec.trace, rec.expires_at,
            rec.version, rec.fingerprint) == ({"x": 1}, {"a": 2}, ["start"], "k",
                                              {"traceparent": "00-1-2-01"}, 5.0, 1, "")
    rec.version, rec.fingerprint = 3, "abc"
    again = run_record.decode(run_record.encode(rec))
    assert run_record.to_doc(again) == run_record.to_doc(rec)
    assert orjson.loads(run_record.encode(rec))["v"] == run_record.CODEC_VERSION
    with pytest.raises(run_record.RunCodecError, match="unsupported run record version 9"):
        run_record.decode(orjson.dumps({**V1_ROW, "v": 9}))
    with pytest.raises(run_record.RunCodecError, match="not JSON"):
        run_record.decode(b"{")
    with pytest.raises(run_record.RunCodecError, match="malformed"):
        run_record.decode(orjson.dumps({"v": 2}))


async def test_one_view_for_result_store_and_web() -> None:
    saga = data_saga()
    store = InMemorySagaStore()
    result = await Engine(store).run(saga, {"items": []}, idempotency_key="k1")
    record = await store.load(result.saga_id)
    assert record is not None
    from_result, from_store = result.to_dict(), record.view(saga.plan)
    view = await drive_orchestrator(data_saga(), {"items": []})
    assert list(from_result) == list(from_store) == list(view)
    assert from_store["idempotency_key"] == "k1" and from_store["data"] == from_result["data"]
    assert [s["status"] for s in from_result["steps"]] == [s["status"] for s in view["steps"]]
    assert from_result["saga"] == view["saga"] == "data"
    # a store row written before the run record (state, data, results, key) still loads
    assert record.to_run().data == EXPECTED_DATA
