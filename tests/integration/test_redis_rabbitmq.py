"""Redis storage and the RabbitMQ broker against real servers."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from sagaz.brokers import BrokerError, MemoryBroker, RabbitMQBroker, broker_from_url
from sagaz.outbox import OutboxWorker, insert
from sagaz.redis_store import RedisInbox, RedisSagaStore
from tests.store_contract import crash_then_resume


async def test_redis_snapshots_resume_a_crashed_run_and_keep_idempotency(
        redis_url: str) -> None:
    store = RedisSagaStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        await crash_then_resume(store, "redis-resume")
    finally:
        await store.redis.aclose()


async def test_redis_inbox_records_replies(redis_url: str) -> None:
    inbox = RedisInbox(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}", ttl=60)
    assert await inbox.get("payments", "c1") is None
    await inbox.put("payments", "c1", b"reply-1")
    assert await inbox.get("payments", "c1") == b"reply-1"
    assert await inbox.get("shipping", "c1") is None  # per consumer
    with pytest.raises(ValueError, match="ttl must be > 0"):
        RedisInbox(redis_url, ttl=0)
    await inbox.redis.aclose()


async def test_outbox_worker_publishes_to_rabbitmq_with_confirms(
        pg_pool: Any, rabbitmq_url: str) -> None:
    import aio_pika

    exchange = f"sagaz-{uuid.uuid4().hex[:6]}"
    connection = await aio_pika.connect_robust(rabbitmq_url)
    channel = await connection.channel()
    ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(ex, routing_key="orders")

    async with pg_pool.acquire() as conn, conn.transaction():
        for i in range(200):
            await insert(conn, aggregate_id=f"o{i % 5}", topic="orders", event_type="E",
                         payload={"n": i})
    broker = broker_from_url(rabbitmq_url, exchange=exchange)
    assert isinstance(broker, RabbitMQBroker)
    await broker.start()
    worker = OutboxWorker(pg_pool, broker, batch_size=50, poll_interval=0.02)
    task = asyncio.create_task(worker.run())
    got: list[Any] = []
    try:
        async with asyncio.timeout(30):
            async with queue.iterator() as it:
                async for message in it:
                    await message.ack()
                    got.append(message)
                    if len(got) == 200:
                        break
    finally:
        await worker.stop()
        await task
        await broker.stop()
        await connection.close()
    assert len({m.headers["event-id"] for m in got}) == 200
    per_key: dict[str, list[int]] = {}
    for m in got:
        per_key.setdefault(m.headers["sagaz-key"], []).append(orjson.loads(m.body)["n"])
    assert all(ns == sorted(ns) for ns in per_key.values())
    async with pg_pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sagaz_outbox WHERE status = 'sent'") \
            == 200


async def test_unreachable_rabbitmq_is_a_clear_error() -> None:
    broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:1/")
    with pytest.raises(BrokerError, match="cannot connect to RabbitMQ"):
        await asyncio.wait_for(broker.start(), 30)


async def test_memory_broker_keeps_order() -> None:
    broker = broker_from_url("memory://")
    assert isinstance(broker, MemoryBroker)
    assert await broker.publish_many([("t", "k", b"1", None), ("t", "k", b"2", None)]) == \
        [None, None]
    assert [v for _, v, _ in broker.topics["t"]] == [b"1", b"2"]


@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_consumer_inbox_on_redis_and_in_memory(redis_url: str, kind: str) -> None:
    from sagaz.consumer_inbox import MemoryConsumerInbox, RedisConsumerInbox

    redis = None
    if kind == "redis":
        import redis.asyncio as aioredis

        redis = aioredis.from_url(redis_url)
        prefix = f"t{uuid.uuid4().hex[:8]}"
        inbox: Any = RedisConsumerInbox(redis, "billing", prefix=prefix)
    else:
        inbox = MemoryConsumerInbox("billing")
    calls = 0

    async def handler(payload: Any, tx: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if tx is not None:  # the handler's own write, in the marker's transaction
            tx.incrby(f"{prefix}:balance", payload["amt"])
        await asyncio.sleep(0.01)  # let racing duplicates overlap
        if payload.get("fail") and calls == 1:
            raise RuntimeError("handler failed")
        return {"booked": payload["amt"]}

    with pytest.raises(RuntimeError, match="handler failed"):
        await inbox.process_idempotent("e1", "orders", "Paid", {"amt": 5, "fail": True},
                                       handler)
    assert not await inbox.seen("e1")  # no marker: a redelivery runs it again
    assert await inbox.process_idempotent("e1", "orders", "Paid", {"amt": 5, "fail": True},
                                          handler) == {"booked": 5}
    results = await asyncio.gather(*(inbox.process_idempotent(
        "e2", "orders", "Paid", {"amt": 7}, handler) for _ in range(5)))
    assert results == [{"booked": 7}] * 5
    if redis is not None:
        # racing deliveries may all run the handler, but only one transaction commits
        assert int(await redis.get(f"{prefix}:balance")) == 5 + 7
        await redis.aclose()
    else:
        assert calls == 3  # in memory the lock serialises them
    with pytest.raises(ValueError, match="event_id must be a non-empty str"):
        await inbox.process_idempotent("", "t", "E", {}, handler)
