"""Quick Start, "Parallel Execution (DAG)", as written (the steps are stubs that record
when they ran; the page's top-level ``await`` is in ``main``)."""

import asyncio
import time

from sagaz import DAGSaga

spans: dict[str, tuple[float, float]] = {}
undone: list[str] = []


def _stub(name: str, delay: float = 0.05):
    async def fn(ctx):
        start = time.monotonic()
        await asyncio.sleep(delay)
        spans[name] = (start, time.monotonic())
        return name

    return fn


def _undo(name: str):
    async def fn(ctx):
        undone.append(name)

    return fn


check_inventory, compensate_inventory = _stub("check_inventory"), _undo("check_inventory")
validate_address = _stub("validate_address")
reserve_items, release_items = _stub("reserve_items", 0.0), _undo("reserve_items")


async def main():
    # --- the page's snippet, unchanged ---
    saga = DAGSaga()

    # These run in parallel
    await saga.add_step("check_inventory", check_inventory, compensate_inventory)
    await saga.add_step("validate_address", validate_address, None)

    # This waits for both
    await saga.add_step(
        "reserve_items",
        reserve_items,
        release_items,
        depends_on=["check_inventory", "validate_address"]
    )

    result = await saga.execute()
    return result
