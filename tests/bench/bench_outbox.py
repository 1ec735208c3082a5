#!/usr/bin/env python3
"""Benchmark (not a test): outbox and inbox on real PostgreSQL and Kafka.

    python tests/bench/bench_outbox.py [-n 50000]

- optimistic publish latency (publish_after_commit: order check, publish + ack, mark sent);
- outbox worker throughput PostgreSQL -> Kafka with 1 and 2 workers (N events, 1,000
  aggregates, from a full table to empty);
- consumer inbox duplicate check latency (process_idempotent of an event already seen).
Uses SAGAZ_TEST_POSTGRES_URL / KAFKA_BOOTSTRAP_SERVERS when set, else local servers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine


def pct(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[max(0, min(len(v) - 1, round(p / 100 * (len(v) - 1))))]


async def fresh_pool(url: str) -> Any:
    import asyncpg

    from sagaz.migrations import migrate
    from sagaz.outbox import init_connection

    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(url)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    pool = await asyncpg.create_pool(url.rsplit("/", 1)[0] + f"/{name}", min_size=4,
                                     max_size=8, init=init_connection)
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool


async def run(pg_url: str, bootstrap: str, n: int) -> None:
    from sagaz.brokers import KafkaBroker
    from sagaz.consumer_inbox import ConsumerInbox
    from sagaz.outbox import OptimisticPublisher, OutboxWorker, insert
    from sagaz.topics import ensure_topics

    topic = f"bench-outbox-{uuid.uuid4().hex[:6]}"
    await ensure_topics(bootstrap, {topic: 4})
    broker = KafkaBroker(bootstrap, linger_ms=0)
    await broker.start()

    pool = await fresh_pool(pg_url)
    publisher = OptimisticPublisher(pool, broker)
    lat = []
    for i in range(2200):
        async with pool.acquire() as conn, conn.transaction():
            event = await insert(conn, aggregate_id=f"a{i % 100}", topic=topic,
                                 event_type="E", payload={"i": i}, delay=30)
        t0 = time.perf_counter()
        assert await publisher.publish_after_commit(event)
        lat.append(time.perf_counter() - t0)
    lat = lat[200:]
    print(f"optimistic publish        p50 {pct(lat, 50) * 1e3:6.2f} ms   "
          f"p99 {pct(lat, 99) * 1e3:6.2f} ms   (n={len(lat)})")
    await pool.close()

    for workers in (1, 2):
        pool = await fresh_pool(pg_url)
        async with pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO sagaz_outbox (event_id, aggregate_id, topic, event_type, payload) "
                "VALUES ($1, $2, $3, 'E', $4)",
                [(uuid.uuid4().hex, f"agg-{i % 1000}", topic, {"i": i}) for i in range(n)])
        brokers = [KafkaBroker(bootstrap) for _ in range(workers)]
        for b in brokers:
            await b.start()
        ws = [OutboxWorker(pool, b, batch_size=1000, poll_interval=0.01) for b in brokers]
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(w.run()) for w in ws]
        while sum(w.published for w in ws) < n:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        for w in ws:
            await w.stop()
        await asyncio.gather(*tasks)
        for b in brokers:
            await b.stop()
        print(f"outbox worker x{workers}          {n / elapsed:8.0f} events/s  "
              f"({n} events in {elapsed:.2f}s)")
        await pool.close()

    pool = await fresh_pool(pg_url)
    inbox = ConsumerInbox(pool, "bench")

    async def handler(payload: Any, conn: Any) -> int:
        return 1

    ids = [f"e{i}" for i in range(2000)]
    for e in ids:
        await inbox.process_idempotent(e, "t", "E", {}, handler)
    lat = []
    for e in ids:
        t0 = time.perf_counter()
        await inbox.process_idempotent(e, "t", "E", {}, handler)
        lat.append(time.perf_counter() - t0)
    print(f"inbox duplicate check     p50 {pct(lat, 50) * 1e3:6.2f} ms   "
          f"p99 {pct(lat, 99) * 1e3:6.2f} ms   mean {statistics.fmean(lat) * 1e3:.2f} ms")
    await pool.close()
    await broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=50_000)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    from sagaz.testing.kafka import LocalKafka
    from sagaz.testing.postgres import LocalPostgres

    pg = kafka = None
    pg_url = os.environ.get("SAGAZ_TEST_POSTGRES_URL")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    try:
        if not pg_url:
            pg = LocalPostgres().start()
            pg_url = pg.url
        if not bootstrap:
            kafka = LocalKafka(partitions=4).start()
            bootstrap = kafka.bootstrap_servers
        print(f"postgres {pg_url}; kafka {bootstrap}")
        asyncio.run(run(pg_url, bootstrap, args.n))
    finally:
        if kafka is not None:
            kafka.stop()
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
