"""The chaos suite's sagas (``sagaz worker|participant --sagas tests.chaos.sagas``).

Every applied effect (a step or compensation that returned) appends one line to the ledger
file named by ``SAGAZ_CHAOS_LEDGER``: ``<action> <saga id> <step> <command id> <pid>``, one
``write`` with O_APPEND, so lines of concurrent processes never interleave and their order
is the order effects happened. A step that raises applies nothing.

The documented rule for effects: a participant may run a command again after a crash
(the one in flight when it died); a real service makes its effect idempotent by the command
id (a unique key), so the checker counts effects per distinct command id.

Data of a run decides its behaviour: ``fail`` names a step that fails for good (the saga
compensates), ``flaky`` is the chance that any one attempt fails and is retried (a run whose
retries all fail compensates too), ``delay`` is seconds each step takes.
"""

from __future__ import annotations

import asyncio
import os
import random

from sagaz import Retry, Saga, SagaContext

SERVICES = ("flights", "hotels", "payments")


class Declined(Exception):
    """A permanent failure: not retried."""


class Glitch(Exception):
    """A transient failure: retried."""


RETRY = Retry(attempts=6, backoff=0.05, max_backoff=0.5, give_up_on=(Declined,))
COMP_RETRY = Retry(attempts=20, backoff=0.05, max_backoff=1.0)


def command_id() -> str:
    """The id of the command this step runs for (the participant binds it for its logs)."""
    from sagaz import logs

    fields = logs.current_fields() or {}
    command = fields.get("command_id")
    if not command:
        raise RuntimeError("no command id bound: run these sagas through sagaz participant")
    return str(command)


def _append(action: str, step: str, ctx: SagaContext) -> None:
    line = f"{action} {ctx.saga_id} {step} {command_id()} {os.getpid()}\n".encode()
    fd = os.open(os.environ["SAGAZ_CHAOS_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _step(name: str):  # type: ignore[no-untyped-def]
    async def run(ctx: SagaContext) -> dict[str, str]:
        delay = ctx.get("delay", 0)
        if delay:
            await asyncio.sleep(delay)
        if ctx.get("fail") == name:
            raise Declined(f"{name} declined for {ctx.saga_id}")
        if random.random() < ctx.get("flaky", 0):
            raise Glitch(f"{name} glitched for {ctx.saga_id}")
        _append("run", name, ctx)
        return {name: "done"}

    async def undo(ctx: SagaContext) -> None:
        _append("comp", name, ctx)

    run.__name__, undo.__name__ = name, f"undo_{name}"
    return run, undo


def _add(saga: Saga, name: str, service: str, depends_on: list[str] | None = None) -> None:
    run, undo = _step(name)
    saga.add_step(name, run, undo, participant=service, retry=RETRY, compensation_retry=COMP_RETRY,
                  **({"depends_on": depends_on} if depends_on is not None else {}))


# A sequence: flight, hotel, payment.
trip = Saga("trip", timeout=600)
_add(trip, "flight", "flights")
_add(trip, "hotel", "hotels")
_add(trip, "pay", "payments")

# A DAG: flight and hotel in parallel, then payment; FAIL_FAST cancels the sibling.
party = Saga("party", timeout=600)
_add(party, "flight", "flights", [])
_add(party, "hotel", "hotels", [])
_add(party, "pay", "payments", ["flight", "hotel"])

SAGAS = {"trip": trip, "party": party}
