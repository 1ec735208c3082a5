"""Quick Start, "Basic Saga", as written (``inventory_service`` stubbed; the page's
top-level ``await`` is in ``main``)."""

from sagaz import Saga, SagaContext


class InventoryService:
    """Stub: records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def reserve(self, order_id: str) -> str:
        self.calls.append(("reserve", order_id))
        return f"inv-{order_id}"

    async def release(self, inventory_id: str) -> None:
        self.calls.append(("release", inventory_id))


inventory_service = InventoryService()

# --- the page's snippet, unchanged ---


@Saga.step
async def reserve_inventory(ctx: SagaContext):
    inventory_id = await inventory_service.reserve(ctx.order_id)
    ctx.set("inventory_id", inventory_id)
    return inventory_id

@reserve_inventory.compensation
async def release_inventory(ctx: SagaContext):
    await inventory_service.release(ctx.get("inventory_id"))

# Execute saga
saga = Saga()


async def main():
    result = await saga.execute(order_id="123", amount=99.99)
    return result
