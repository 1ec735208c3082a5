"""Two versions of one saga, for the versioning tests (``sagaz worker --sagas
tests.versioned_sagas:V1`` / ``:V2`` / ``:BOTH``).

Both versions have steps named ``reserve`` and ``charge`` (version 2 adds ``notify``), with
different functions: each records ``(version, step, order id)`` in ``LEDGER`` (per process:
the tests run the participants in their own process), so a test can tell which version's
steps a run went through. ``delay`` (seconds) in the data keeps runs in flight.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from sagaz import Retry, Saga, SagaContext

LEDGER: Counter[tuple[str, str, str]] = Counter()  # (version, step, order id) -> times run

v1 = Saga("vorder", timeout=300)
v2 = Saga("vorder", version=2, timeout=300)


def _step(version: str, name: str) -> object:
    async def run(ctx: SagaContext) -> str:
        await asyncio.sleep(ctx.get("delay", 0))
        LEDGER[version, name, ctx["order_id"]] += 1
        return f"{version}:{name}"

    run.__name__ = name
    return run


async def _undo(ctx: SagaContext) -> None:
    LEDGER["undo", "any", ctx["order_id"]] += 1


for _saga, _v in ((v1, "v1"), (v2, "v2")):
    _saga.add_step("reserve", _step(_v, "reserve"), _undo,  # type: ignore[arg-type]
                   participant="vstock", retry=Retry(attempts=2, backoff=0.05))
    _saga.add_step("charge", _step(_v, "charge"), _undo,  # type: ignore[arg-type]
                   participant="vpay")
v2.add_step("notify", _step("v2", "notify"), participant="vpay")  # type: ignore[arg-type]

V1 = [v1]
V2 = [v2]
BOTH = [v1, v2]
