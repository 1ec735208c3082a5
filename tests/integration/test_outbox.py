"""Outbox, optimistic sending, consumer inbox and saga snapshots on real PostgreSQL + Kafka."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import orjson
import pytest

from sagaz.brokers import BrokerError, KafkaBroker, broker_from_url
from sagaz.consumer_inbox import ConsumerInbox
from sagaz.migrations import MIGRATIONS, migrate
from sagaz.outbox import OptimisticPublisher, OutboxError, OutboxWorker, insert
from sagaz.postgres_store import PostgresSagaStore
from sagaz.topics import ensure_topics
from tests.store_contract import crash_then_resume

pytestmark = pytest.mark.kafka


async def consume_all(bootstrap: str, topic: str, expect: int, timeout: float = 60) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=f"{topic}-reader")
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(got) < expect and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300, max_records=5000)).values():
                got.extend(records)
        await asyncio.sleep(0.5)  # anything beyond `expect` (a duplicate) shows up too
        for records in (await consumer.getmany(timeout_ms=300)).values():
            got.extend(records)
    finally:
        await consumer.stop()
    return got


def by_aggregate(records: list[Any]) -> dict[str, list[int]]:
    seq: dict[str, list[int]] = defaultdict(list)
    for r in records:
        seq[r.key.decode()].append(orjson.loads(r.value)["n"])
    return seq


async def fill(pool: Any, topic: str, n: int, aggregates: int) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for i in range(n):
            await insert(conn, aggregate_id=f"agg-{i % aggregates}", topic=topic,
                         event_type="Counted", payload={"n": i})


async def test_migrations_are_versioned_and_idempotent(pg_pool: Any) -> None:
    async with pg_pool.acquire() as conn:
        assert await migrate(conn) == []  # the fixture applied them already
        versions = [r["version"] for r in await conn.fetch(
            "SELECT version FROM sagaz_schema_migrations ORDER BY version")]
    assert versions == [v for v, _, _ in MIGRATIONS]


async def test_insert_commits_and_rolls_back_with_the_business_change(pg_pool: Any) -> None:
    async with pg_pool.acquire() as conn:
        await conn.execute("CREATE TABLE orders (id TEXT PRIMARY KEY)")
        with pytest.raises(RuntimeError, match="business failure"):
            async with conn.transaction():
                await conn.execute("INSERT INTO orders VALUES ('o1')")
                await insert(conn, aggregate_id="o1", topic="orders", event_type="Created",
                             payload={"id": "o1"})
                raise RuntimeError("business failure")
        async with conn.transaction():
            await conn.execute("INSERT INTO orders VALUES ('o2')")
            event = await insert(conn, aggregate_id="o2", topic="orders",
                                 event_type="Created", payload={"id": "o2"})
        rows = await conn.fetch("SELECT aggregate_id, status FROM sagaz_outbox")
        assert [(r["aggregate_id"], r["status"]) for r in rows] == [("o2", "pending")]
        assert event.payload == {"id": "o2"}

        with pytest.raises(OutboxError, match="needs the caller's open transaction"):
            await insert(conn, aggregate_id="o3", topic="orders", event_type="Created",
                         payload={})
        async with conn.transaction():
            with pytest.raises(OutboxError, match="payload of 'Bad' is not JSON-serialisable"):
                await insert(conn, aggregate_id="o4", topic="orders", event_type="Bad",
                             payload={"when": {1, 2}})
            with pytest.raises(OutboxError, match="aggregate_id must be a non-empty str"):
                await insert(conn, aggregate_id="", topic="orders", event_type="X", payload={})
            with pytest.raises(OutboxError, match="headers must map str to str"):
                await insert(conn, aggregate_id="o5", topic="orders", event_type="X",
                             payload={}, headers={"n": 1})  # type: ignore[dict-item]


async def test_two_workers_race_over_10000_events_each_published_once_in_order(
        pg_pool: Any, kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}-outbox"
    await ensure_topics(kafka_bootstrap, {topic: 4})
    await fill(pg_pool, topic, 10_000, aggregates=200)
    brokers = [KafkaBroker(kafka_bootstrap), KafkaBroker(kafka_bootstrap)]
    workers = [OutboxWorker(pg_pool, b, batch_size=500, poll_interval=0.05) for b in brokers]
    for b in brokers:
        await b.start()
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        async with asyncio.timeout(120):
            while True:
                async with pg_pool.acquire() as conn:
                    if not await conn.fetchval(
                            "SELECT count(*) FROM sagaz_outbox WHERE status = 'pending'"):
                        break
                await asyncio.sleep(0.1)
    finally:
        for w in workers:
            await w.stop()
        await asyncio.gather(*tasks)
        for b in brokers:
            await b.stop()
    # Which worker wins which batch is timing: with every aggregate in every window, order
    # lets one at a time progress. What must hold: together, each event exactly once.
    assert sum(w.published for w in workers) == 10_000
    records = await consume_all(kafka_bootstrap, topic, 10_000)
    ids = [dict(r.headers)["event-id"] for r in records]
    assert len(ids) == 10_000 and len(set(ids)) == 10_000  # each exactly once
    for agg, ns in by_aggregate(records).items():
        assert ns == sorted(ns), f"{agg} out of order"


async def test_broker_down_events_stay_pending_then_go_out_once(
        pg_pool: Any, topic_prefix: str) -> None:
    from sagaz.testing.kafka import LocalKafka

    topic = f"{topic_prefix}-down"
    with LocalKafka() as kafka:
        await ensure_topics(kafka.bootstrap_servers, {topic: 2})
        broker = KafkaBroker(kafka.bootstrap_servers, request_timeout_ms=2000)
        await broker.start()
        # a short lease: it must be renewed while the broker holds the batch
        worker = OutboxWorker(pg_pool, broker, poll_interval=0.05, lease=1.0)
        rival = OutboxWorker(pg_pool, broker, poll_interval=0.05, lease=1.0)
        # in a thread: the workers' event loop must keep running (and renewing leases)
        await asyncio.to_thread(kafka.stop, keep_data=True)  # down while the workers run
        tasks = [asyncio.create_task(w.run()) for w in (worker, rival)]
        await fill(pg_pool, topic, 300, aggregates=10)
        await asyncio.sleep(4)
        async with pg_pool.acquire() as conn:
            assert await conn.fetchval(
                "SELECT count(*) FROM sagaz_outbox WHERE status = 'pending'") == 300
        await asyncio.to_thread(kafka.start)  # back, same port and data
        try:
            async with asyncio.timeout(90):
                while True:
                    async with pg_pool.acquire() as conn:
                        if await conn.fetchval("SELECT count(*) FROM sagaz_outbox "
                                               "WHERE status = 'sent'") == 300:
                            break
                    await asyncio.sleep(0.2)
        finally:
            for w in (worker, rival):
                await w.stop()
            await asyncio.gather(*tasks)
            await broker.stop()
        records = await consume_all(kafka.bootstrap_servers, topic, 300)
    assert len({dict(r.headers)["event-id"] for r in records}) == 300
    assert [worker.published, rival.published] in ([300, 0], [0, 300])
    assert len(records) == 300
    for agg, ns in by_aggregate(records).items():
        assert ns == sorted(ns), agg


async def test_worker_survives_its_database_connection_being_killed(
        pg_pool: Any, kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}-dbkill"
    await ensure_topics(kafka_bootstrap, {topic: 2})
    await fill(pg_pool, topic, 3000, aggregates=50)
    broker = KafkaBroker(kafka_bootstrap)
    await broker.start()
    worker = OutboxWorker(pg_pool, broker, batch_size=50, poll_interval=0.02)
    task = asyncio.create_task(worker.run())
    killed = rounds = 0
    try:
        async with asyncio.timeout(90):
            while True:
                async with pg_pool.acquire() as conn:
                    if rounds < 6:  # drop the worker's connections a few times, mid-run
                        killed += await conn.fetchval(
                            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM "
                            "pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid()) t")
                        rounds += 1
                    left = await conn.fetchval(
                        "SELECT count(*) FROM sagaz_outbox WHERE status = 'pending'")
                if not left:
                    break
                await asyncio.sleep(0.2)
    finally:
        await worker.stop()
        await task
        await broker.stop()
    assert killed > 0
    records = await consume_all(kafka_bootstrap, topic, 3000)
    ids = {dict(r.headers)["event-id"] for r in records}
    assert len(ids) == 3000  # none lost (a batch cut off mid-way may be published again)
    for agg, ns in by_aggregate(records).items():
        assert [n for i, n in enumerate(ns) if n not in ns[:i]] == sorted(set(ns)), agg


async def test_optimistic_publisher_marks_sent_only_after_an_ack(
        pg_pool: Any, kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}-opt"
    await ensure_topics(kafka_bootstrap, {topic: 1})
    broker = KafkaBroker(kafka_bootstrap)
    await broker.start()
    publisher = OptimisticPublisher(pg_pool, broker)
    async with pg_pool.acquire() as conn:
        async with conn.transaction():
            first = await insert(conn, aggregate_id="a", topic=topic, event_type="E",
                                 payload={"n": 1}, delay=5)
        assert await publisher.publish_after_commit(first) is True
        assert await conn.fetchval("SELECT status FROM sagaz_outbox WHERE id = $1",
                                   first.id) == "sent"
    await broker.stop()
    # broker unreachable: stays pending for the worker
    dead = KafkaBroker("127.0.0.1:1", request_timeout_ms=500)
    with pytest.raises(BrokerError):
        await dead.start()
    async with pg_pool.acquire() as conn:
        async with conn.transaction():
            second = await insert(conn, aggregate_id="a", topic=topic, event_type="E",
                                  payload={"n": 2}, delay=5)
        assert await OptimisticPublisher(pg_pool, dead).publish_after_commit(second) is False
        assert await conn.fetchval("SELECT status FROM sagaz_outbox WHERE id = $1",
                                   second.id) == "pending"
    records = await consume_all(kafka_bootstrap, topic, 1)
    assert [orjson.loads(r.value) for r in records] == [{"n": 1}]


async def test_consumer_inbox_commits_the_marker_with_the_handler(pg_pool: Any) -> None:
    async with pg_pool.acquire() as conn:
        await conn.execute("CREATE TABLE ledger (event_id TEXT, amount INT)")
    inbox = ConsumerInbox(pg_pool, "billing")
    calls = 0

    async def handler(payload: Any, conn: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await conn.execute("INSERT INTO ledger VALUES ($1, $2)", payload["id"], payload["amt"])
        if payload.get("fail") and calls == 1:
            raise RuntimeError("handler failed")
        return {"booked": payload["amt"]}

    with pytest.raises(RuntimeError, match="handler failed"):
        await inbox.process_idempotent("e1", "orders", "Paid", {"id": "e1", "amt": 5,
                                                                "fail": True}, handler)
    assert not await inbox.seen("e1")  # no marker: the redelivery runs it again
    assert await inbox.process_idempotent("e1", "orders", "Paid",
                                          {"id": "e1", "amt": 5, "fail": True},
                                          handler) == {"booked": 5}
    assert calls == 2
    # duplicates (also racing ones) return the first result without running the handler
    results = await asyncio.gather(*(inbox.process_idempotent(
        "e2", "orders", "Paid", {"id": "e2", "amt": 7}, handler) for _ in range(5)))
    assert results == [{"booked": 7}] * 5 and calls == 3
    other = ConsumerInbox(pg_pool, "shipping")  # keyed by (consumer, event id)
    assert await other.process_idempotent("e2", "orders", "Paid", {"id": "e2", "amt": 7},
                                          handler) == {"booked": 7}
    async with pg_pool.acquire() as conn:
        rows = await conn.fetch("SELECT event_id, amount FROM ledger ORDER BY event_id")
    assert [(r["event_id"], r["amount"]) for r in rows] == [("e1", 5), ("e2", 7), ("e2", 7)]
    with pytest.raises(ValueError, match="event_id must be a non-empty str"):
        await inbox.process_idempotent("", "t", "E", {}, handler)


async def test_saga_snapshots_on_postgres_resume_after_a_crash(pg_pool: Any) -> None:
    await crash_then_resume(PostgresSagaStore(pg_pool), "pg-resume")


def test_broker_urls_are_checked() -> None:
    assert isinstance(broker_from_url("kafka://127.0.0.1:9092"), KafkaBroker)
    with pytest.raises(ValueError, match="unknown broker URL scheme 'nats'"):
        broker_from_url("nats://x")
    with pytest.raises(ValueError, match="kafka URL needs host:port"):
        broker_from_url("kafka://")


async def test_failing_publishes_back_off_then_go_dead_with_the_last_error(
        pg_pool: Any, kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}-dead"
    await ensure_topics(kafka_bootstrap, {topic: 1})
    # a real client that refuses every message: larger than its max_request_size
    broker = KafkaBroker(kafka_bootstrap, max_request_size=64)
    await broker.start()
    async with pg_pool.acquire() as conn, conn.transaction():
        await insert(conn, aggregate_id="a", topic=topic, event_type="Big",
                     payload={"blob": "x" * 200})
        await insert(conn, aggregate_id="a", topic=topic, event_type="Next", payload={})
    worker = OutboxWorker(pg_pool, broker, max_attempts=3, backoff=0.05, max_backoff=0.2)
    try:
        async with asyncio.timeout(30):
            while True:
                await worker.run_once()
                async with pg_pool.acquire() as conn:
                    row = await conn.fetchrow("SELECT status, attempts, last_error, "
                                              "available_at > now() AS waiting "
                                              "FROM sagaz_outbox WHERE event_type = 'Big'")
                if row["status"] == "dead":
                    break
                if row["attempts"] == 1:
                    assert row["waiting"]  # backing off, not retried at once
                await asyncio.sleep(0.05)
        assert row["attempts"] == 3 and "MessageSizeTooLarge" in row["last_error"]
        next_attempts = "SELECT attempts FROM sagaz_outbox WHERE event_type = 'Next'"
        async with pg_pool.acquire() as conn:  # blocked behind 'Big' while it was pending
            assert await conn.fetchval(next_attempts) == 0
        await worker.run_once()  # a dead event no longer holds its aggregate back
        async with pg_pool.acquire() as conn:
            assert await conn.fetchval(next_attempts) == 1
    finally:
        await broker.stop()


async def test_sent_events_are_pruned_after_the_retention(pg_pool: Any) -> None:
    async with pg_pool.acquire() as conn:
        async with conn.transaction():
            for i in range(3):
                await insert(conn, aggregate_id=f"a{i}", topic="t", event_type="E",
                             payload={})
        await conn.execute("UPDATE sagaz_outbox SET status = 'sent', sent_at = now() - "
                           "interval '2 hours' WHERE aggregate_id IN ('a0', 'a1')")
    worker = OutboxWorker(pg_pool, broker_from_url("memory://"), retention=3600)
    assert await worker.prune() == 2
    async with pg_pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM sagaz_outbox") == 1
    with pytest.raises(ValueError, match="retention must be > 0"):
        OutboxWorker(pg_pool, broker_from_url("memory://"), retention=0)


async def test_a_crashed_workers_lease_expires_and_its_batch_is_taken_over(
        pg_pool: Any, kafka_bootstrap: str, topic_prefix: str) -> None:
    from sagaz.outbox import _CLAIM

    topic = f"{topic_prefix}-lease"
    await ensure_topics(kafka_bootstrap, {topic: 1})
    await fill(pg_pool, topic, 20, aggregates=2)
    async with pg_pool.acquire() as conn:  # a worker claims with a 1 s lease, then dies
        claimed = await conn.fetch(_CLAIM, 100, "crashed-worker", 1.0)
    assert len(claimed) == 20
    broker = KafkaBroker(kafka_bootstrap)
    await broker.start()
    worker = OutboxWorker(pg_pool, broker, poll_interval=0.05)
    try:
        assert await worker.run_once() == 0  # leased: hands off
        await asyncio.sleep(1.2)
        assert await worker.run_once() == 20  # expired: taken over
    finally:
        await broker.stop()
    records = await consume_all(kafka_bootstrap, topic, 20)
    assert len({dict(r.headers)["event-id"] for r in records}) == 20 == len(records)
