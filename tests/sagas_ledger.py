"""Sagas for tests that run participants as separate processes (``sagaz participant
--sagas tests.sagas_ledger``): every step appends a line to the file named by
``SAGAZ_TEST_LEDGER`` (one ``write`` of one line, O_APPEND: lines of concurrent processes
never interleave), so a test can count each effect across kills and restarts."""

from __future__ import annotations

import asyncio
import os

from sagaz import Saga, SagaContext

ledger = Saga("ledger", timeout=120)


def _append(effect: str, ctx: SagaContext) -> None:
    line = f"{effect} {ctx.saga_id} {os.getpid()}\n".encode()
    fd = os.open(os.environ["SAGAZ_TEST_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@ledger.step(participant="books")
async def book(ctx: SagaContext) -> dict[str, int]:
    await asyncio.sleep(ctx.get("delay", 0))
    _append("book", ctx)
    return {"pid": os.getpid()}


@ledger.step(participant="books")
async def confirm(ctx: SagaContext) -> dict[str, int]:
    await asyncio.sleep(ctx.get("delay", 0))
    _append("confirm", ctx)
    return {"pid": os.getpid()}


crasher = Saga("crasher", timeout=120)


@crasher.step(participant="crashy")
async def explode(ctx: SagaContext) -> None:
    """Kills its own process, as a segfault or an OOM kill would."""
    _append("explode", ctx)
    os._exit(3)


@explode.compensation
async def tidy(ctx: SagaContext) -> None:
    _append("tidy", ctx)
