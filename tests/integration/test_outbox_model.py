"""Model-based test of the outbox: random programs of adds, claims by two workers, settles
with random outcomes, worker crashes and requeues, run against each backend (real
PostgreSQL and Redis, and memory) and checked step by step against a small model.

What every claim must satisfy, whichever aggregates a backend picks: only aggregates free
to the claiming worker (nobody holds them, or it does itself), for each a non-empty
prefix of the aggregate's pending events in order, at most ``limit`` events, and when
fewer than ``limit``, every claimable aggregate whole (all events are due at once here).
Every event sent is the oldest pending one of its aggregate (so per-aggregate order
holds), counts always match the model, and an event fails at most ``max_attempts``
times before it is dead.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagaz.memory_storage import MemoryStorage
from sagaz.storage import Backoff

WORKERS = ("W1", "W2")
AGGREGATES = ("a", "b", "c")
BACKOFF = Backoff(max_attempts=2, base=0.0, cap=0.0)  # failed events are due at once
EXAMPLES = {"memory": int(os.environ.get("SAGAZ_HYPOTHESIS_EXAMPLES", "3000")) // 10,
            "redis": 150, "postgres": 100}

ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(AGGREGATES), st.integers(1, 3)),
    st.tuples(st.just("claim"), st.sampled_from(WORKERS), st.integers(1, 5)),
    st.tuples(st.just("settle"), st.sampled_from(WORKERS),
              st.lists(st.sampled_from(["ok", "ok", "fail", "skip"]), min_size=1,
                       max_size=8)),
    st.tuples(st.just("crash"), st.sampled_from(WORKERS), st.none()),
    st.tuples(st.just("requeue"), st.none(), st.none()),
), min_size=1, max_size=25)


@dataclass
class Model:
    queues: dict[str, list[str]] = field(default_factory=lambda: {a: [] for a in AGGREGATES})
    holder: dict[str, str] = field(default_factory=dict)  # aggregate -> worker
    batch: dict[str, list[Any]] = field(default_factory=dict)  # worker -> claimed events
    attempts: dict[str, int] = field(default_factory=dict)
    aggregate_of: dict[str, str] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)
    dead: list[str] = field(default_factory=list)

    def free_to(self, worker: str, agg: str) -> bool:
        return self.holder.get(agg) in (None, worker)

    def counts(self) -> dict[str, int]:
        return {"pending": sum(len(q) for q in self.queues.values()),
                "sent": len(self.sent), "dead": len(self.dead)}


async def program(storage: Any, tx_factory: Any, steps: list[tuple[Any, Any, Any]]) -> None:
    outbox, model = storage.outbox, Model()
    for kind, who, arg in steps:
        if kind == "add":
            async with tx_factory() as tx:
                for _ in range(arg):
                    e = await outbox.insert(tx, aggregate_id=who, topic="t", event_type="E",
                                         payload={})
                    model.queues[who].append(e.event_id)
                    model.attempts[e.event_id] = 0
                    model.aggregate_of[e.event_id] = who
        elif kind == "claim":
            if model.batch.get(who):
                continue  # a worker claims one batch at a time
            got = await outbox.claim(who, arg, 60)
            assert len(got) <= arg
            per: dict[str, list[str]] = {}
            for e in got:
                per.setdefault(e.aggregate_id, []).append(e.event_id)
            for agg, ids in per.items():
                assert model.free_to(who, agg), f"{agg} is held by {model.holder[agg]}"
                assert ids == model.queues[agg][:len(ids)], (agg, ids, model.queues[agg])
                model.holder[agg] = who
            if len(got) < arg:  # room left: everything claimable was taken, whole
                for agg, queue in model.queues.items():
                    if queue and model.free_to(who, agg):
                        assert per.get(agg) == queue, (agg, per.get(agg), queue)
            model.batch[who] = got
        elif kind == "settle":
            batch = model.batch.pop(who, [])
            if not batch:
                continue
            sent, failed, released, broken = [], [], [], set()
            for i, e in enumerate(batch):  # as OutboxWorker does
                outcome = arg[i % len(arg)]
                if e.aggregate_id in broken or outcome == "skip":
                    released.append(e)
                    broken.add(e.aggregate_id)
                elif outcome == "fail":
                    failed.append((e, "boom"))
                    broken.add(e.aggregate_id)
                else:
                    sent.append(e)
            await outbox.settle(who, sent, failed, released, BACKOFF)
            for e in sent:
                assert model.queues[e.aggregate_id][0] == e.event_id  # oldest goes first
                model.queues[e.aggregate_id].pop(0)
                model.sent.add(e.event_id)
            for e, _ in failed:
                model.attempts[e.event_id] += 1
                if model.attempts[e.event_id] >= BACKOFF.max_attempts:
                    model.queues[e.aggregate_id].remove(e.event_id)
                    model.dead.append(e.event_id)
            for e in batch:
                if model.holder.get(e.aggregate_id) == who:
                    del model.holder[e.aggregate_id]
        elif kind == "crash":  # forgets its batch; its leases stay (free to itself only)
            model.batch.pop(who, None)
        elif kind == "requeue" and model.dead:
            event_id = model.dead.pop(0)
            assert await outbox.requeue([event_id]) == 1
            model.queues[model.aggregate_of[event_id]].append(event_id)  # behind the rest
            model.attempts[event_id] = 0
        assert await outbox.counts() == model.counts(), (kind, who, arg)


class _NoTx:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _settings(backend: str) -> Any:
    return settings(max_examples=EXAMPLES[backend], deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


@_settings("memory")
@given(steps=ops)
def test_outbox_model_memory(steps: list[Any]) -> None:
    asyncio.run(program(MemoryStorage(), _NoTx, steps))


@_settings("redis")
@given(steps=ops)
def test_outbox_model_redis(redis_url: str, steps: list[Any]) -> None:
    from contextlib import asynccontextmanager

    from sagaz.redis_storage import RedisStorage

    async def main() -> None:
        storage = RedisStorage(redis_url, prefix=f"m{uuid.uuid4().hex[:10]}")

        @asynccontextmanager
        async def tx() -> Any:
            async with storage.redis.pipeline(transaction=True) as pipe:
                pipe.multi()
                yield pipe
                await pipe.execute()

        try:
            await program(storage, tx, steps)
        finally:
            await storage.close()

    asyncio.run(main())


@pytest.fixture(scope="module")
def model_pg_url(postgres_url: str) -> str:
    from tests.conftest import fresh_pg_url

    return asyncio.run(fresh_pg_url(postgres_url))


@_settings("postgres")
@given(steps=ops)
def test_outbox_model_postgres(model_pg_url: str, steps: list[Any]) -> None:
    from contextlib import asynccontextmanager

    import asyncpg

    from sagaz.postgres_storage import PostgresStorage, init_connection

    async def main() -> None:
        pool = await asyncpg.create_pool(model_pg_url, min_size=1, max_size=2,
                                         init=init_connection)
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE sagaz_outbox")
        storage = PostgresStorage(pool)

        @asynccontextmanager
        async def tx() -> Any:
            async with pool.acquire() as conn, conn.transaction():
                yield conn

        try:
            await program(storage, tx, steps)
        finally:
            await pool.close()

    asyncio.run(main())
