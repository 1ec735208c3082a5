"""The saga of the tracing tests (tests/integration/test_tracing_kafka.py), importable by a
participant process (``sagaz participant --service traced --sagas tests.sagas_traced``).
Every step and compensation writes one line to the ``tests.steps`` logger; ``ship`` fails
(both attempts) when the saga's data has ``fail``."""

from __future__ import annotations

import asyncio
import logging

from sagaz import Retry, Saga, SagaContext

step_log = logging.getLogger("tests.steps")

traced = Saga("traced")


async def reserve(ctx: SagaContext) -> str:
    step_log.info("reserving")
    return "r-1"


async def release(ctx: SagaContext) -> None:
    step_log.info("releasing")


async def charge(ctx: SagaContext) -> str:
    await asyncio.sleep(0)
    step_log.info("charging")
    return "c-1"


async def refund(ctx: SagaContext) -> None:
    step_log.info("refunding")


async def ship(ctx: SagaContext) -> str:
    step_log.info("shipping")
    if ctx.get("fail"):
        raise RuntimeError("no courier")
    return "s-1"


traced.add_step("reserve", reserve, release)
traced.add_step("charge", charge, refund)
# a retry after a backoff: the second attempt is caused by a timer event, which carries no
# trace context of its own (the worker takes the saga row's)
traced.add_step("ship", ship, retry=Retry(attempts=2, backoff=0.1))
