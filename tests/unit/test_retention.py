"""Retention of finished sagas in the stream worker's table, on the pure orchestrator."""

from __future__ import annotations

from typing import Any

import orjson

from sagaz import Saga, SagaContext
from sagaz import messages as msgs
from sagaz.machine import command_id
from streams.orchestrator import EXPIRE, Orchestrator, Topics, armed_timers

saga = Saga("pay")


@saga.step()
async def charge(ctx: SagaContext) -> None: ...


@charge.compensation
async def refund(ctx: SagaContext) -> None: ...


@saga.step()
async def ship(ctx: SagaContext) -> None: ...


def run(orch: Orchestrator, outcome: dict[str, bool], now: float = 100.0,
        compensations_ok: bool = True) -> tuple[Any, bytes]:
    """Start saga s1 and answer its commands as ``outcome`` says (step -> ok)."""
    topics = orch.topics
    out = orch.process(topics.commands, b"s1", msgs.encode(
        "start", "s1", saga="pay", data={}, idempotency_key=None), None, now)
    row = out.row
    assert row is not None
    pending = [orjson.loads(v) for t, _, v in out.sends if t != topics.outcomes]
    while pending:
        cmd = pending.pop(0)
        action = "run" if cmd["type"] == "run" else "compensate"
        ok = outcome.get(cmd["step"], True) if action == "run" else compensations_ok
        out = orch.process(topics.results, b"s1", msgs.encode(
            "result", "s1", command_id=cmd["command_id"], step=cmd["step"],
            attempt=cmd["attempt"], action=action, ok=ok, result=None,
            error=None if ok else "declined", retryable=False, set={}), row, now)
        row = out.row or row
        pending += [orjson.loads(v) for t, _, v in out.sends if t != topics.outcomes]
    return out, row


def expire(orch: Orchestrator, row: bytes | None) -> Any:
    return orch.process(orch.topics.timers, b"s1",
                        msgs.encode("timer", "s1", key=EXPIRE, due=0.0), row, 1e9)


def test_a_finished_saga_expires_after_the_retention_and_its_row_is_deleted() -> None:
    orch = Orchestrator([saga], Topics("t"), retention=3600)
    for outcome in ({}, {"ship": False}):  # completed, compensated
        out, row = run(orch, outcome)
        doc = orjson.loads(row)
        assert doc["state"]["status"] in ("completed", "compensated")
        ended = doc["state"]["ended_at"]
        assert doc["expires_at"] == ended + 3600
        assert (ended + 3600, EXPIRE) in out.timers  # within the horizon: armed at once
        assert (ended + 3600, EXPIRE) in armed_timers(row, ended + 3600)
        assert armed_timers(row, ended + 3599) == []  # beyond the rescan horizon
        assert orch.view(row)["expires_at"] == ended + 3600
        assert expire(orch, row).delete
        repeat = expire(orch, None)  # already deleted: ignored, not dead-lettered
        assert not repeat.delete and repeat.dead_letter is None


def test_a_far_expiry_is_left_to_the_rescan_not_armed_at_once() -> None:
    orch = Orchestrator([saga], Topics("t"), retention=7 * 86400)
    out, row = run(orch, {})
    assert out.timers == [] and orjson.loads(row)["expires_at"] > 7 * 86400
    assert armed_timers(row, 1e12) == [(orjson.loads(row)["expires_at"], EXPIRE)]


def test_rows_stay_while_running_when_failed_and_without_retention() -> None:
    forever = Orchestrator([saga], Topics("t"), retention=0)
    _, row = run(forever, {})
    assert "expires_at" not in orjson.loads(row)
    assert not expire(forever, row).delete
    orch = Orchestrator([saga], Topics("t"), retention=3600)
    out = orch.process("t.commands", b"s1", msgs.encode(
        "start", "s1", saga="pay", data={}, idempotency_key=None), None, 100.0)
    assert out.row is not None and not expire(orch, out.row).delete  # still running
    _, row = run(orch, {"ship": False}, compensations_ok=False)
    doc = orjson.loads(row)
    assert doc["state"]["status"] == "failed" and "expires_at" not in doc  # for the operator
    assert not expire(orch, row).delete
    assert command_id("s1", "charge", 1, "run") in out.sends[0][2].decode()

