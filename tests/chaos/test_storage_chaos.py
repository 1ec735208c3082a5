"""Chaos scenario 6: storage faults on the outbox and inbox side, on real servers.

- PostgreSQL stopped (as a crash: ``pg_ctl -m immediate``) for a while during outbox load,
  two ``sagaz outbox run`` processes publishing to Kafka and an application inserting
  events in transactions (retrying what the outage refused): nothing lost, each aggregate's
  events in order, the outbox drained after.
- An ``InboxConsumer``'s database unreachable (a proxy cut) while events arrive: nothing
  dead-lettered for it, nothing handled twice, everything handled after.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from sagaz.testing.kafka import _die_with_parent
from sagaz.topics import ensure_topics
from tests.chaos.cluster import Fault, Figures, size
from tests.chaos.cluster import save as save_figures

pytestmark = [pytest.mark.chaos, pytest.mark.kafka]


async def consume(bootstrap: str, topic: str, expect: int, timeout: float) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", group_id=f"{topic}-check")
    await consumer.start()
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len({dict(r.headers)["event-id"] for r in got}) < expect \
                and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300, max_records=5000)).values():
                got.extend(records)
        await asyncio.sleep(1)  # late duplicates show up too
        for records in (await consumer.getmany(timeout_ms=500)).values():
            got.extend(records)
    finally:
        await consumer.stop()
    return got


async def test_postgresql_down_during_outbox_load(kafka_bootstrap: str, tmp_path: Path) -> None:
    import asyncpg

    from sagaz.migrations import migrate
    from sagaz.postgres_storage import PostgresStorage, init_connection
    from sagaz.testing.postgres import LocalPostgres

    n, outage, aggregates = size(2_000, 10_000), size(10, 30), 100
    topic = f"chaos-outbox-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, {topic: 4})
    pg = await asyncio.to_thread(LocalPostgres(durable=True).start)  # a crash keeps commits
    fig = Figures("postgresql-down-outbox", n)
    workers: list[Any] = []
    try:
        url = pg.url
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        pool = await asyncpg.create_pool(url, min_size=1, max_size=4, init=init_connection)
        outbox = PostgresStorage(pool).outbox

        def worker(i: int) -> Any:
            log = open(tmp_path / f"outbox-{i}.log", "ab")
            return asyncio.create_subprocess_exec(
                sys.executable, "-m", "sagaz.cli", "outbox", "run", "--storage", url,
                "--broker", f"kafka://{kafka_bootstrap}", "--batch-size", "100",
                "--poll-interval", "0.05", "--lease", "5", stdout=log, stderr=log,
                preexec_fn=_die_with_parent)

        workers = [await worker(i) for i in range(2)]
        refused = 0

        async def insert_all() -> None:
            nonlocal refused
            for b in range(0, n, 50):
                for _ in range(600):  # bounded: 5 minutes of a database that stays down
                    try:
                        async with pool.acquire() as c, c.transaction():
                            for i in range(b, min(n, b + 50)):
                                await outbox.insert(c, aggregate_id=f"agg-{i % aggregates}",
                                                    topic=topic, event_type="Counted",
                                                    payload={"n": i})
                        break
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                        refused += 1  # the transaction rolled back: insert it again
                        await asyncio.sleep(0.5)
                await asyncio.sleep(pace)

        # The application inserts through the whole outage (its transactions are refused
        # while the database is down, and retried).
        pace = (outage + 8) / (n / 50)
        app = asyncio.create_task(insert_all())
        await asyncio.sleep(2)
        f = Fault(f"PostgreSQL stopped {outage}s", "postgresql", time.monotonic())
        fig.faults.append(f)
        await asyncio.to_thread(pg.halt)
        await asyncio.sleep(outage)
        await asyncio.to_thread(pg.resume)
        f.ended = time.monotonic()
        await app
        deadline = time.monotonic() + size(120, 300)
        pending = -1
        while time.monotonic() < deadline:
            try:
                async with pool.acquire() as c:
                    pending = await c.fetchval(
                        "SELECT count(*) FROM sagaz_outbox WHERE status <> 'sent'")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pending = -1
            if pending == 0:
                break
            await asyncio.sleep(0.2)
        f.recovered = time.monotonic()
        await pool.close()
        records = await consume(kafka_bootstrap, topic, n, timeout=60)
    finally:
        for w in workers:
            if w.returncode is None:
                w.terminate()
        for w in workers:
            await w.wait()
        await asyncio.to_thread(pg.stop)
    ids = [dict(r.headers)["event-id"] for r in records]
    numbers: dict[str, list[int]] = {}
    for r in records:
        numbers.setdefault(r.key.decode(), []).append(orjson.loads(r.value)["n"])
    out_of_order = [agg for agg, ns in numbers.items()
                    if [x for i, x in enumerate(ns) if x not in ns[:i]] != sorted(set(ns))]
    fig.seconds = time.monotonic() - f.at
    fig.notes += [f"{len(set(ids))} of {n} events published, {len(ids) - len(set(ids))} "
                  f"published twice (at least once: a batch whose settle the outage refused)",
                  f"application transactions refused during the outage: {refused}",
                  f"aggregates out of order: {len(out_of_order)}",
                  f"outbox drained (nothing pending or dead): {pending == 0}"]
    save_figures(fig)
    assert pending == 0, "the outbox did not drain after the database came back"
    assert len(set(ids)) == n, f"lost {n - len(set(ids))} events"
    assert not out_of_order, out_of_order[:5]


async def test_inbox_consumer_database_unreachable(kafka_bootstrap: str, postgres_url: str) -> None:
    from urllib.parse import urlsplit

    import asyncpg
    from aiokafka import AIOKafkaProducer

    from sagaz.consumer_inbox import InboxConsumer
    from sagaz.postgres_storage import PostgresStorage, init_connection
    from tests.conftest import fresh_pg_url
    from tests.proxy import Proxy

    n, outage = size(500, 5_000), size(10, 30)
    url = await fresh_pg_url(postgres_url)
    parts = urlsplit(url)
    proxy = await Proxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    proxied = url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    admin = await asyncpg.connect(url)
    await admin.execute("CREATE TABLE ledger (event_id TEXT)")
    pool = await asyncpg.create_pool(proxied, min_size=1, max_size=4, init=init_connection)
    tag = uuid.uuid4().hex[:8]
    topic, name = f"chaos-orders-{tag}", f"chaos-billing-{tag}"
    await ensure_topics(kafka_bootstrap, {topic: 4})

    async def book(payload: dict[str, Any], conn: Any) -> None:
        await conn.execute("INSERT INTO ledger VALUES ($1)", payload["id"])

    consumer = InboxConsumer(PostgresStorage(pool), name, [topic], book,
                             bootstrap=kafka_bootstrap, max_attempts=3, backoff=0.05,
                             max_backoff=1.0)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    await producer.start()
    fig = Figures("inbox-database-unreachable", n)
    task = asyncio.create_task(consumer.run())
    try:
        async def send(i: int) -> None:
            # every event twice: a redelivery the inbox must absorb
            for _ in range(2):
                await producer.send(topic, orjson.dumps({"id": f"e{i}"}), key=f"k{i % 50}".encode(),
                                    headers=[("event-id", f"e{i}".encode()),
                                             ("event-type", b"Paid")])

        for i in range(n // 2):
            await send(i)
        await asyncio.sleep(1)
        f = Fault(f"database unreachable {outage}s", "inbox consumer", time.monotonic())
        fig.faults.append(f)
        proxy.cut()
        for i in range(n // 2, n):
            await send(i)
        await producer.flush()
        await asyncio.sleep(outage)
        proxy.heal()
        f.ended = time.monotonic()
        async with asyncio.timeout(size(120, 300)):
            while await admin.fetchval("SELECT count(DISTINCT event_id) FROM ledger") < n:
                if task.done():
                    task.result()
                await asyncio.sleep(0.2)
        await asyncio.sleep(2)  # the redeliveries behind the last first delivery, too
        f.recovered = time.monotonic()
        rows = await admin.fetch("SELECT event_id, count(*) AS c FROM ledger GROUP BY event_id")
    finally:
        await consumer.stop()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()
        await pool.close()
        await admin.close()
        await proxy.stop()
    twice = [r["event_id"] for r in rows if r["c"] > 1]
    fig.seconds = time.monotonic() - f.at
    fig.notes += [f"{len(rows)} of {n} events handled; handled twice: {len(twice)}; "
                  f"dead-lettered: {consumer.dead_lettered}"]
    save_figures(fig)
    assert consumer.dead_lettered == 0
    assert not twice, twice[:5]
    assert len(rows) == n
