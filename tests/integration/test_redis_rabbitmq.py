"""Redis storage and the RabbitMQ broker against real servers."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from sagaz.brokers import BrokerError, MemoryBroker, RabbitMQBroker, broker_from_url
from sagaz.outbox import OutboxWorker
from sagaz.postgres_storage import PostgresStorage
from sagaz.redis_storage import RedisInbox


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

    outbox = PostgresStorage(pg_pool).outbox
    async with pg_pool.acquire() as conn, conn.transaction():
        for i in range(200):
            await outbox.add(conn, aggregate_id=f"o{i % 5}", topic="orders", event_type="E",
                             payload={"n": i})
    broker = broker_from_url(rabbitmq_url, exchange=exchange)
    assert isinstance(broker, RabbitMQBroker)
    await broker.start()
    worker = OutboxWorker(outbox, broker, batch_size=50, poll_interval=0.02)
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


