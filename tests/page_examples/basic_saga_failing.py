"""Quick Start, "Basic Saga", plus a second step that fails: the reservation is released."""

from sagaz import Saga, SagaContext
from tests.page_examples.basic_saga import InventoryService

inventory_service = InventoryService()


class PaymentDeclined(Exception):
    pass

# --- the page's snippet, unchanged ---


@Saga.step
async def reserve_inventory(ctx: SagaContext):
    inventory_id = await inventory_service.reserve(ctx.order_id)
    ctx.set("inventory_id", inventory_id)
    return inventory_id

@reserve_inventory.compensation
async def release_inventory(ctx: SagaContext):
    await inventory_service.release(ctx.get("inventory_id"))

# --- the failing variant: a second step after it ---


@Saga.step
async def charge_payment(ctx: SagaContext):
    raise PaymentDeclined(f"card declined for {ctx.amount}")

# Execute saga
saga = Saga()


async def main():
    result = await saga.execute(order_id="123", amount=99.99)
    return result
