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
            await outbox.insert(conn, aggregate_id=f"o{i % 5}", topic="orders", event_type="E",
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




async def test_redis_outbox_worker_survives_its_connections_being_killed(
        redis_url: str) -> None:
    """The Redis counterpart of terminating PostgreSQL backends mid-batch: CLIENT KILL
    drops the worker's connections a few times; it reconnects, nothing is lost, and per
    aggregate the first publications stay in order (a batch cut off may go out again)."""
    import redis.asyncio as aioredis

    from sagaz.redis_storage import RedisStorage

    storage = RedisStorage(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    admin = aioredis.from_url(redis_url)
    try:
        for start in range(0, 3000, 500):
            async with storage.redis.pipeline(transaction=True) as tx:
                tx.multi()
                for i in range(start, start + 500):
                    await storage.outbox.insert(tx, aggregate_id=f"agg-{i % 50}", topic="t",
                                             event_type="E", payload={"n": i})
                await tx.execute()
        broker = MemoryBroker()
        worker = OutboxWorker(storage.outbox, broker, batch_size=50, poll_interval=0.02)
        task = asyncio.create_task(worker.run())
        killed = 0
        try:
            async with asyncio.timeout(60):
                while (await admin.get(f"{storage.prefix}:ob:npending")) not in (b"0", None):
                    if killed < 6:
                        me = await admin.client_id()
                        for c in await admin.client_list():
                            if int(c["id"]) != me:
                                killed += await admin.client_kill_filter(_id=c["id"])
                    await asyncio.sleep(0.1)
        finally:
            await worker.stop()
            await task
        assert killed > 0
        published = broker.topics["t"]
        ids = {h["event-id"] for _, _, h in published}
        assert len(ids) == 3000  # none lost
        per: dict[str, list[int]] = {}
        for key, value, _ in published:
            per.setdefault(key, []).append(orjson.loads(value)["n"])
        for agg, ns in per.items():
            assert [n for i, n in enumerate(ns) if n not in ns[:i]] == sorted(set(ns)), agg
        assert await storage.outbox.counts() == {"pending": 0, "sent": 3000, "dead": 0}
    finally:
        await admin.aclose()
        await storage.close()
