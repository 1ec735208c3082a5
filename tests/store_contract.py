"""One scenario every durable SagaStore must pass: a run dies mid-step, a new engine
resumes it from the store (on the definition version it started on), and its idempotency
key still names it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sagaz import Engine, Saga


async def crash_then_resume(store: Any, name: str) -> None:
    gate = asyncio.Event()
    calls = {"a": 0, "b": 0}

    async def a(ctx: Any) -> str:
        calls["a"] += 1
        ctx.set("seen", True)
        return "a"

    async def b(ctx: Any) -> str:
        calls["b"] += 1
        if calls["b"] == 1:
            gate.set()
            await asyncio.sleep(10)  # the process "dies" here
        return "b"

    saga = Saga(name, version=3)
    saga.add_step("a", a)
    saga.add_step("b", b)
    first = asyncio.create_task(Engine(store).run(saga, {"k": 1}, saga_id="s1",
                                                  idempotency_key="key-1"))
    await gate.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    record = await store.load("s1")
    assert record is not None and record.status == "running" and record.data["seen"] is True
    # the definition the run started on is stored with it (sagaz.versions)
    assert (record.version, record.fingerprint) == (3, saga.fingerprint)

    result = await Engine(store).resume(saga, "s1")
    assert result.succeeded and calls == {"a": 1, "b": 2}  # a is not repeated; b's attempt is
    assert result.context == {"k": 1, "seen": True}        # issued again
    again = await Engine(store).run(saga, {"k": 1}, idempotency_key="key-1")
    assert again.saga_id == "s1" and again.succeeded and calls == {"a": 1, "b": 2}
    assert [r.saga_id for r in await store.list(status="completed", name=name)] == ["s1"]
