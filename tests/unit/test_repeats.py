"""A repeated input after a crash, on the pure orchestrator: what the worker must write and
send again.

The worker writes a row to its local table (RocksDB) and to the table's changelog, then
sends the commands; the input is acked once all were acknowledged. A worker that dies (a
crash, or its fence: exit 75) after the local write but before the changelog record was
acknowledged restarts with the new row in its local table and gets the input again. It
used to see a repeat and write nothing: the changelog kept the row before, so any worker
recovering from it (the partition's next owner) had the saga waiting for a reply it had
already applied (chaos scenario 2: sagas stuck after a broker outage, their outcome
announced). A repeat of the last applied input (or of anything once the run ended) now
writes the row again, unchanged."""

from __future__ import annotations

from typing import Any

import orjson

from sagaz import Saga, SagaContext
from sagaz import messages as msgs
from streams.orchestrator import Orchestrator, Topics

saga = Saga("pay")


@saga.step()
async def charge(ctx: SagaContext) -> None: ...


@saga.step()
async def ship(ctx: SagaContext) -> None: ...


def reply(orch: Orchestrator, row: bytes, cmd: dict[str, Any], now: float) -> Any:
    return orch.process("t.results", b"s1", msgs.encode(
        "result", "s1", command_id=cmd["command_id"], step=cmd["step"],
        attempt=cmd["attempt"], action="run", ok=True, result=None, error=None,
        retryable=False, set={}), row, now)


def commands(out: Any) -> list[dict[str, Any]]:
    return [orjson.loads(v) for t, _, v in out.sends if t.startswith("t.participant")]


def test_a_repeat_of_the_last_applied_input_writes_the_row_again() -> None:
    orch = Orchestrator([saga], Topics("t"))
    started = orch.process("t.commands", b"s1", msgs.encode(
        "start", "s1", saga="pay", data={}, idempotency_key=None), None, 100.0)
    [charge_cmd] = commands(started)
    charged = reply(orch, started.row, charge_cmd, 101.0)
    assert charged.row is not None
    [ship_cmd] = commands(charged)

    again = reply(orch, charged.row, charge_cmd, 102.0)  # the worker restarted
    assert again.duplicate and again.run is None
    assert again.row == charged.row  # its changelog record may be what the crash lost
    assert commands(again) == [ship_cmd]  # and its commands

    shipped = reply(orch, charged.row, ship_cmd, 103.0)
    assert shipped.run is not None and shipped.run.status == "completed"
    older = reply(orch, shipped.row, charge_cmd, 104.0)  # a finished run: any repeat
    assert older.row == shipped.row and older.duplicate
    assert [t for t, _, _ in older.sends] == ["t.outcomes"]

    # the idempotent start of a run in flight: the row again, with what is in flight
    restarted = orch.process("t.commands", b"s1", msgs.encode(
        "start", "s1", saga="pay", data={}, idempotency_key=None), started.row, 105.0)
    assert restarted.row == started.row and commands(restarted) == [charge_cmd]


def test_an_older_repeat_of_a_run_in_flight_writes_nothing() -> None:
    """Later inputs were applied after it: its row is not the newest one to write."""
    orch = Orchestrator([saga], Topics("t"))
    started = orch.process("t.commands", b"s1", msgs.encode(
        "start", "s1", saga="pay", data={}, idempotency_key=None), None, 100.0)
    [charge_cmd] = commands(started)
    charged = reply(orch, started.row, charge_cmd, 101.0)
    late_start = orch.process("t.commands", b"s1", msgs.encode(
        "start", "s1", saga="pay", data={}, idempotency_key=None), charged.row, 102.0)
    assert late_start.row is None and late_start.sends == [] and not late_start.duplicate
