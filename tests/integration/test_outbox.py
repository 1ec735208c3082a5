"""The PostgreSQL outbox under faults, with a real Kafka broker: racing workers, the broker
going down, database connections killed. The storage contract is in test_storage.py."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import orjson
import pytest

from sagaz.brokers import BrokerError, KafkaBroker, broker_from_url
from sagaz.migrations import MIGRATIONS, migrate
from sagaz.outbox import OptimisticPublisher, OutboxWorker
from sagaz.postgres_storage import PostgresStorage
from sagaz.topics import ensure_topics

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
    outbox = PostgresStorage(pool).outbox
    async with pool.acquire() as conn, conn.transaction():
        for i in range(n):
            await outbox.insert(conn, aggregate_id=f"agg-{i % aggregates}", topic=topic,
                             event_type="Counted", payload={"n": i})


async def test_migrations_are_versioned_and_idempotent(pg_pool: Any) -> None:
    async with pg_pool.acquire() as conn:
        assert await migrate(conn) == []  # the fixture applied them already
        versions = [r["version"] for r in await conn.fetch(
            "SELECT version FROM sagaz_schema_migrations ORDER BY version")]
    assert versions == [v for v, _, _ in MIGRATIONS]


async def test_two_workers_race_over_10000_events_each_published_once_in_order(
        pg_pool: Any, kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}-outbox"
    await ensure_topics(kafka_bootstrap, {topic: 4})
    await fill(pg_pool, topic, 10_000, aggregates=200)
    brokers = [KafkaBroker(kafka_bootstrap), KafkaBroker(kafka_bootstrap)]
    outbox = PostgresStorage(pg_pool).outbox
    workers = [OutboxWorker(outbox, b, batch_size=500, poll_interval=0.05) for b in brokers]
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
    # Together, each event exactly once; and both did work (claims by aggregate head let
    # two workers progress at once although every aggregate is in every id range).
    assert sum(w.published for w in workers) == 10_000
    assert all(w.published >= 1000 for w in workers), [w.published for w in workers]
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
        # The publish outlasts the outage (~4 s down + the restart), so the batch is held
        # by the broker for seconds and its 1 s lease must be renewed all along.
        broker = KafkaBroker(kafka.bootstrap_servers, request_timeout_ms=30000)
        await broker.start()
        # a short lease: it must be renewed while the broker holds the batch (for seconds)
        outbox = PostgresStorage(pg_pool).outbox
        worker = OutboxWorker(outbox, broker, poll_interval=0.05, lease=1.0)
        rival = OutboxWorker(outbox, broker, poll_interval=0.05, lease=1.0)
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
    # Each event went out once: had a lease lapsed while the broker held a batch, the
    # other worker would have claimed and published it again (more than 300 records, and
    # more than 300 counted). Which worker published what is not fixed: the two claim at
    # once when the events appear, and SKIP LOCKED splits the aggregates between them
    # (this asserted [300, 0] or [0, 300] and failed about once in ten runs: that race).
    assert worker.published + rival.published == 300
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
    worker = OutboxWorker(PostgresStorage(pg_pool).outbox, broker, batch_size=50,
                          poll_interval=0.02)
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
    from prometheus_client import CollectorRegistry

    broker = KafkaBroker(kafka_bootstrap)
    await broker.start()
    registry = CollectorRegistry()
    publisher = OptimisticPublisher(PostgresStorage(pg_pool).outbox, broker,
                                    registry=registry)
    async with pg_pool.acquire() as conn:
        async with conn.transaction():
            first = await publisher.outbox.insert(conn, aggregate_id="a", topic=topic,
                                               event_type="E", payload={"n": 1}, delay=5)
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
            second = await publisher.outbox.insert(conn, aggregate_id="a", topic=topic,
                                                event_type="E", payload={"n": 2}, delay=5)
        fallback = OptimisticPublisher(publisher.outbox, dead, registry=registry)
        assert await fallback.publish_after_commit(second) is False
        assert [registry.get_sample_value(f"outbox_optimistic_send_{name}_total")
                for name in ("success", "failures")] == [1, 1]
        assert await conn.fetchval("SELECT status FROM sagaz_outbox WHERE id = $1",
                                   second.id) == "pending"
    records = await consume_all(kafka_bootstrap, topic, 1)
    assert [orjson.loads(r.value) for r in records] == [{"n": 1}]


def test_broker_urls_are_checked() -> None:
    assert isinstance(broker_from_url("kafka://127.0.0.1:9092"), KafkaBroker)
    with pytest.raises(ValueError, match="unknown broker URL scheme 'nats'"):
        broker_from_url("nats://x")
    with pytest.raises(ValueError, match="kafka URL needs host:port"):
        broker_from_url("kafka://")




async def test_cli_runs_a_worker_and_shows_lists_and_requeues_dead_events(
        pg_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    """What an operator does at 3 a.m.: run the worker, look at the counts and the dead
    events, requeue them once the cause is fixed."""
    import os
    import signal
    import sys

    import aiohttp

    from sagaz.storage import open_storage
    from sagaz.testing.kafka import free_port

    topic = f"{topic_prefix}-cli"
    await ensure_topics(kafka_bootstrap, {topic: 1})
    storage: Any = await open_storage(pg_url)
    try:
        await fill(storage.pool, topic, 50, aggregates=5)

        async def sagaz(*args: str) -> Any:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sagaz.cli", *args, "--storage", pg_url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            return orjson.loads(out)

        assert await sagaz("outbox", "status") == {"pending": 50, "sent": 0, "dead": 0}
        port = free_port()
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sagaz.cli", "--bootstrap", kafka_bootstrap, "outbox", "run",
            "--storage", pg_url, "--poll-interval", "0.05", "--metrics-port", str(port),
            "--metrics-interval", "0.2", stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "SAGAZ_BROKER_URL": ""})
        async with asyncio.timeout(60):
            while (await storage.outbox.counts())["sent"] < 50:
                await asyncio.sleep(0.1)
        metrics = ""
        async with asyncio.timeout(20), aiohttp.ClientSession() as http:
            while 'outbox_events{status="pending"} 0.0' not in metrics:
                await asyncio.sleep(0.2)
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    metrics = await resp.text()
        assert "outbox_published_events_total 50.0" in metrics
        assert "outbox_pending_events_total 0.0" in metrics
        assert "outbox_oldest_pending_age_seconds 0.0" in metrics
        worker.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(worker.communicate(), 20)
        assert worker.returncode == 0, err.decode()
        assert len(await consume_all(kafka_bootstrap, topic, 50)) == 50

        async with storage.pool.acquire() as conn:  # as if its publishes had all failed
            await conn.execute("UPDATE sagaz_outbox SET status = 'dead', attempts = 10, "
                               "last_error = 'KafkaTimeoutError: boom' WHERE id <= 3")
        dead = await sagaz("outbox", "dead", "--limit", "2")
        assert [d["last_error"] for d in dead] == ["KafkaTimeoutError: boom"] * 2
        assert await sagaz("outbox", "requeue", *[d["event_id"] for d in dead]) == \
            {"requeued": 2}
        assert await sagaz("outbox", "status") == {"pending": 2, "sent": 47, "dead": 1}
    finally:
        await storage.close()


async def test_kill_9_an_outbox_worker_mid_run_another_takes_over_nothing_lost(
        pg_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    import signal
    import sys

    from sagaz.storage import open_storage

    topic = f"{topic_prefix}-kill"
    await ensure_topics(kafka_bootstrap, {topic: 2})
    storage: Any = await open_storage(pg_url)

    def worker() -> Any:
        return asyncio.create_subprocess_exec(
            sys.executable, "-m", "sagaz.cli", "outbox", "run", "--storage", pg_url,
            "--broker", f"kafka://{kafka_bootstrap}", "--batch-size", "100",
            "--poll-interval", "0.02", "--lease", "2", stderr=asyncio.subprocess.DEVNULL)

    try:
        await fill(storage.pool, topic, 5000, aggregates=40)
        first = await worker()
        async with asyncio.timeout(60):  # kill once it is under way, not before
            while (await storage.outbox.counts())["sent"] < 500:
                await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        left = (await storage.outbox.counts())["pending"]
        second = await worker()
        try:
            async with asyncio.timeout(90):
                while (await storage.outbox.counts())["pending"]:
                    await asyncio.sleep(0.1)
        finally:
            second.send_signal(signal.SIGTERM)
            await second.wait()
    finally:
        await storage.close()
    assert left > 0  # killed mid-run
    records = await consume_all(kafka_bootstrap, topic, 5000)
    ids = [dict(r.headers)["event-id"] for r in records]
    assert len(set(ids)) == 5000  # none lost
    assert len(ids) - 5000 <= 100  # at most the batch in hand went out twice
    for agg, ns in by_aggregate(records).items():
        assert [n for i, n in enumerate(ns) if n not in ns[:i]] == sorted(set(ns)), agg


async def test_outbox_to_inbox_consumer_end_to_end_effects_once_poison_dead_lettered(
        pg_pool: Any, kafka_bootstrap: str, topic_prefix: str) -> None:
    """Outbox -> Kafka -> InboxConsumer: every event's effect once although every event is
    delivered twice; malformed records and a handler that keeps failing are dead-lettered
    with their reason; offsets are committed, so a restarted consumer repeats nothing."""
    from aiokafka import AIOKafkaProducer

    from sagaz.consumer_inbox import InboxConsumer

    topic, dlq = f"{topic_prefix}-orders", f"{topic_prefix}-billing-dlq"
    await ensure_topics(kafka_bootstrap, {topic: 2, dlq: 1})
    storage = PostgresStorage(pg_pool)
    async with pg_pool.acquire() as conn:
        await conn.execute("CREATE TABLE ledger (order_id TEXT, amount INT)")
        async with conn.transaction():
            events = [await storage.outbox.insert(
                conn, aggregate_id=f"o{i % 10}", topic=topic, event_type="OrderPaid",
                payload={"order": f"o{i}", "amount": i}) for i in range(100)]
            await storage.outbox.insert(conn, aggregate_id="o-bad", topic=topic,
                                     event_type="OrderPaid", payload={"poison": True})
    broker = KafkaBroker(kafka_bootstrap)
    await broker.start()
    try:
        while await OutboxWorker(storage.outbox, broker).run_once():
            pass
        assert await broker.publish_many([e.message() for e in events]) == [None] * 100
    finally:
        await broker.stop()
    raw = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await raw.start()
    try:
        await raw.send_and_wait(topic, b'{"no": "headers"}', key=b"x")
        await raw.send_and_wait(topic, b"\xff not json", key=b"y",
                                headers=[("event-id", b"e-x"), ("event-type", b"OrderPaid")])
    finally:
        await raw.stop()

    async def book(payload: dict[str, Any], conn: Any) -> str:
        if payload.get("poison"):
            raise ValueError("cannot book this order")
        await conn.execute("INSERT INTO ledger VALUES ($1, $2)", payload["order"],
                           payload["amount"])
        return payload["order"]

    def consumer(registry: Any = None) -> InboxConsumer:
        return InboxConsumer(storage, "billing", [topic], book, bootstrap=kafka_bootstrap,
                             dead_letter_topic=dlq, max_attempts=2, backoff=0.05,
                             registry=registry)

    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    first = consumer(registry)
    task = asyncio.create_task(first.run())
    try:
        async with asyncio.timeout(60):
            while first.handled + first.dead_lettered < 203:
                await asyncio.sleep(0.05)
    finally:
        await first.stop()
        await task
    assert (first.handled, first.dead_lettered) == (200, 3)
    sample = registry.get_sample_value
    assert {name: sample(f"consumer_inbox_{name}_total", {"consumer": "billing"})
            for name in ("processed", "duplicates", "handler_errors")} == \
        {"processed": 100, "duplicates": 100, "handler_errors": 2}
    assert [sample("consumer_inbox_dead_letters_total", {"consumer": "billing", "reason": r})
            for r in ("malformed", "handler_failed")] == [2, 1]
    async with pg_pool.acquire() as conn:
        rows = await conn.fetch("SELECT order_id, amount FROM ledger")
    assert sorted(r["amount"] for r in rows) == list(range(100))  # each effect once
    letters = await consume_all(kafka_bootstrap, dlq, 3)
    reasons = sorted(dict(r.headers)["sagaz-reason"].decode() for r in letters)
    assert reasons[0].startswith("handler failed 2 times: ValueError: cannot book")
    assert reasons[1] == "missing, empty or null event-id or event-type header"
    assert reasons[2].startswith("value is not JSON")

    again = consumer()  # same group: offsets were committed
    task = asyncio.create_task(again.run())
    await asyncio.sleep(3)
    await again.stop()
    await task
    assert (again.handled, again.dead_lettered) == (0, 0)
    with pytest.raises(ValueError, match="topics must be a non-empty list"):
        InboxConsumer(storage, "billing", [], book, bootstrap=kafka_bootstrap)
