"""Sizes, early timers and the client's memory, on the pure orchestrator and the client."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from sagaz import Saga, SagaContext
from sagaz import messages as msgs
from sagaz.client import ROW_HEADROOM, SagaClient
from streams.orchestrator import EXPIRE, Orchestrator, Topics

saga = Saga("pay", timeout=3600)


@saga.step()
async def charge(ctx: SagaContext) -> None: ...


@charge.compensation
async def refund(ctx: SagaContext) -> None: ...


@saga.step()
async def ship(ctx: SagaContext) -> None: ...


def start(orch: Orchestrator, data: dict[str, Any], now: float = 100.0) -> Any:
    return orch.process(orch.topics.commands, b"s1", msgs.encode(
        "start", "s1", saga="pay", data=data, idempotency_key=None), None, now)


def reply(orch: Orchestrator, row: bytes, cmd: dict[str, Any], result: Any,
          now: float = 101.0, error: str | None = None) -> Any:
    return orch.process(orch.topics.results, b"s1", msgs.encode(
        "result", "s1", command_id=cmd["command_id"], step=cmd["step"],
        attempt=cmd["attempt"], action="run", ok=error is None, result=result, error=error,
        retryable=False, set={}), row, now)


def test_a_step_result_that_would_make_the_row_too_large_fails_the_step() -> None:
    orch = Orchestrator([saga], Topics("t"), max_message_bytes=100_000)
    out = start(orch, {"blob": "x" * 60_000})
    assert out.dead_letter is None and out.row is not None
    cmd = orjson.loads(out.sends[0][2])
    out = reply(orch, out.row, cmd, "y" * 50_000)  # fits a message, not the row
    assert out.dead_letter is None and out.row is not None
    assert len(out.row) <= 100_000 and all(len(v) <= 100_000 for _, _, v in out.sends)
    doc = orjson.loads(out.row)
    assert doc["results"] == {} and doc["state"]["status"] == "compensating"
    # its effect happened: it is compensated
    [undo] = [orjson.loads(v) for t, _, v in out.sends if t == "t.participant.pay"]
    assert (undo["type"], undo["step"]) == ("compensate", "charge")
    failure = doc["state"]["failure"]
    assert "result of step 'charge' is too large: a saga row of" in failure, failure
    assert "max_message_bytes is 100000" in failure
    # a repeat of the same success changes nothing: it was applied (as a failure); the row
    # is written again unchanged (tests/unit/test_repeats.py), not the large result
    again = reply(orch, out.row, cmd, "y" * 50_000)
    assert again.row == out.row and again.duplicate and again.dead_letter is None


def test_a_start_too_large_for_a_row_is_dead_lettered_and_errors_are_clipped() -> None:
    orch = Orchestrator([saga], Topics("t"), max_message_bytes=100_000)
    out = start(orch, {"blob": "x" * 100_000})
    assert out.row is None and out.sends == []
    assert out.dead_letter is not None and "start of saga 's1' (pay) refused" in \
        out.dead_letter and "max_message_bytes is 100000" in out.dead_letter
    out = start(orch, {})
    cmd = orjson.loads(out.sends[0][2])
    out = reply(orch, out.row, cmd, None, error="E" * 1_000_000)
    doc = orjson.loads(out.row)
    assert len(doc["state"]["failure"]) <= msgs.MAX_ERROR_CHARS + 100
    assert doc["state"]["failure"].endswith("more characters cut]")


def test_an_early_or_forged_timer_changes_nothing_and_is_armed_again() -> None:
    orch = Orchestrator([saga], Topics("t"), retention=60)
    out = start(orch, {}, now=100.0)
    row = out.row
    assert (100.0 + 3600, "deadline") in out.timers
    forged = orch.process(orch.topics.timers, b"s1",
                          msgs.encode("timer", "s1", key="deadline", due=0.0), row, 101.0)
    assert forged.row is None and forged.dead_letter is None and forged.sends == []
    assert forged.timers == [(3700.0, "deadline")]  # armed again for its real due time
    due = orch.process(orch.topics.timers, b"s1",
                       msgs.encode("timer", "s1", key="deadline", due=0.0), row, 3700.0)
    assert orjson.loads(due.row)["state"]["status"] in ("aborting", "compensating",
                                                          "compensated")
    # an expiry before the saga's expires_at deletes nothing
    cmd = orjson.loads(out.sends[0][2])
    out = reply(orch, row, cmd, None, now=100.0)
    ship_cmd = orjson.loads(out.sends[0][2])
    done = reply(orch, out.row, ship_cmd, None, now=100.0)
    assert orjson.loads(done.row)["expires_at"] == 160.0
    early = orch.process(orch.topics.timers, b"s1",
                         msgs.encode("timer", "s1", key=EXPIRE, due=0.0), done.row, 120.0)
    assert not early.delete and early.timers == [(160.0, EXPIRE)]
    late = orch.process(orch.topics.timers, b"s1",
                        msgs.encode("timer", "s1", key=EXPIRE, due=0.0), done.row, 161.0)
    assert late.delete


def test_msgs_clip() -> None:
    assert msgs.clip("abc", 10) == "abc"
    cut = msgs.clip("a" * 5000, 100)
    assert len(cut) == 100 and cut.endswith("[4930 more characters cut]")


async def test_the_client_refuses_a_start_too_large_and_keeps_bounded_memory() -> None:
    client = SagaClient("127.0.0.1:1", keep_outcomes=3, keep_outcomes_for=60,
                        max_message_bytes=200_000)
    with pytest.raises(ValueError, match=r"saga data too large: the start of 'pay' is \d+ "
                                         r"bytes, over 134464"):
        client._start_message("s1", None, "pay", {"blob": "x" * 150_000}, None)
    assert 200_000 - ROW_HEADROOM == 134464
    # timed-out and cancelled waits leave no future behind
    with pytest.raises(TimeoutError):
        await client.wait("never", timeout=0.01)
    waiter = asyncio.create_task(client.wait("never-either"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert client._waiters == {}
    # outcomes kept: at most keep_outcomes, newest kept
    for i in range(10):
        client._outcome({"saga_id": f"s{i}", "status": "completed"})
    assert list(client._outcomes) == ["s7", "s8", "s9"]
    assert (await client.wait("s9"))["status"] == "completed"
    # and for at most keep_outcomes_for seconds
    client.keep_outcomes_for = 0
    client._outcome({"saga_id": "s10", "status": "completed"})
    assert list(client._outcomes) == ["s10"]
    for bad in ({"keep_outcomes": -1}, {"keep_outcomes_for": True},
                {"max_message_bytes": 1000}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SagaClient("127.0.0.1:1", **bad)


def test_only_connection_errors_and_time_outs_are_infrastructure() -> None:
    from sagaz.consumer_inbox import is_infrastructure_error

    assert is_infrastructure_error(ConnectionRefusedError("refused"))
    assert is_infrastructure_error(TimeoutError())
    try:
        raise RuntimeError("wrapped") from OSError("network down")
    except RuntimeError as exc:
        assert is_infrastructure_error(exc)  # an explicit cause counts
    try:
        try:
            raise FileNotFoundError("cache.json")
        except FileNotFoundError:
            raise ValueError("bad record") from None  # handling an OSError, not caused by it
    except ValueError as exc:
        assert not is_infrastructure_error(exc)
    try:
        try:
            raise TimeoutError
        except TimeoutError:
            raise ValueError("a verdict on the record")  # noqa: B904 (context: a time-out)
    except ValueError as exc:
        assert not is_infrastructure_error(exc)
    assert not is_infrastructure_error(TypeError("not JSON serialisable"))


def test_replication_is_a_checked_setting_that_reaches_faust_and_the_cli(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from sagaz.cli import _replication
    from sagaz.participant import Participant
    from streams.app import OrchestratorApp
    from streams.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="replication"):
        Settings(replication=0)
    oapp = OrchestratorApp(Settings(replication=3, datadir=str(tmp_path)), [saga])
    assert oapp.app.conf.topic_replication_factor == 3
    assert Settings.from_env({"SAGAZ_REPLICATION": "3"}).replication == 3
    with pytest.raises(ValueError, match="replication"):
        Participant("pay", [saga], bootstrap="127.0.0.1:1", replication=0)
    monkeypatch.setenv("SAGAZ_REPLICATION", "3")
    assert _replication(argparse.Namespace(replication=None)) == 3
    assert _replication(argparse.Namespace(replication=2)) == 2
    monkeypatch.setenv("SAGAZ_REPLICATION", "three")
    with pytest.raises(ValueError, match="SAGAZ_REPLICATION must be an integer"):
        _replication(argparse.Namespace(replication=None))
