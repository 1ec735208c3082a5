"""The demo's order saga: inventory, payment and shipping, each its own participant service.

Each handler records its effect in ``LEDGER`` (per process), which the end-to-end tests read
to check that every effect happened exactly once. An order whose data says ``decline``
fails at payment for good, so its reservation is released. ``delay`` (seconds) makes each
step take that long, to keep sagas in flight.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from sagaz import Retry, Saga, SagaContext
from sagaz.errors import SagazError

LEDGER: Counter[tuple[str, str]] = Counter()  # (effect, order id) -> times applied


class PaymentDeclined(SagazError):
    pass


order = Saga("order", timeout=60)


@order.step(participant="inventory", retry=Retry(attempts=3, backoff=0.05))
async def reserve_inventory(ctx: SagaContext) -> dict[str, str]:
    await asyncio.sleep(ctx.get("delay", 0))
    LEDGER["reserve", ctx["order_id"]] += 1
    return {"reservation": f"r-{ctx['order_id']}"}


@reserve_inventory.compensation
async def release_inventory(ctx: SagaContext) -> None:
    LEDGER["release", ctx["order_id"]] += 1


@order.step(participant="payment",
            retry=Retry(attempts=3, backoff=0.05, give_up_on=(PaymentDeclined,)))
async def charge_payment(ctx: SagaContext) -> dict[str, object]:
    await asyncio.sleep(ctx.get("delay", 0))
    if ctx.get("decline"):
        raise PaymentDeclined(f"card declined for order {ctx['order_id']}")
    LEDGER["charge", ctx["order_id"]] += 1
    return {"charged": ctx.get("amount", 0)}


@charge_payment.compensation
async def refund_payment(ctx: SagaContext) -> None:
    LEDGER["refund", ctx["order_id"]] += 1


@order.step(participant="shipping")
async def ship_order(ctx: SagaContext) -> dict[str, str]:
    await asyncio.sleep(ctx.get("delay", 0))
    LEDGER["ship", ctx["order_id"]] += 1
    return {"tracking": f"t-{ctx['order_id']}"}


# A 3-step saga with trivial steps on one participant service, for tests/bench.
bench = Saga("bench")


async def _bench_step(ctx: SagaContext) -> int:
    return 1


for _name in ("one", "two", "three"):
    bench.add_step(_name, _bench_step, participant="bench")
