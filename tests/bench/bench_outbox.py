#!/usr/bin/env python3
"""Benchmark (not a test): outbox and inbox on real PostgreSQL and Kafka.

    python tests/bench/bench_outbox.py [-n 50000] [--peer [--peer-python PY]]

- optimistic publish latency (publish_after_commit: order check, publish + ack, mark sent);
- outbox worker throughput -> Kafka with 1 and 2 workers (N events over 1,000 interleaved
  aggregates, from full to empty), for each storage: PostgreSQL, Redis, memory;
- consumer inbox duplicate check latency (process_idempotent of an event already seen).
--peer also runs sagaz 1.5.0's outbox worker (PostgreSQL -> Kafka, same events, same
servers, same run; tests/bench/peer_outbox_1_5.py in the peer's own virtualenv, made under
~/.cache/sagaz/peer-venv unless --peer-python is given) and prints the ratio.
Uses SAGAZ_TEST_POSTGRES_URL / SAGAZ_TEST_REDIS_URL / KAFKA_BOOTSTRAP_SERVERS when set,
else local servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
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
    from sagaz.postgres_storage import init_connection

    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(url)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    pool = await asyncpg.create_pool(url.rsplit("/", 1)[0] + f"/{name}", min_size=4,
                                     max_size=8, init=init_connection)
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool


async def fill(storage: Any, topic: str, n: int) -> None:
    from sagaz.postgres_storage import PostgresStorage

    rows = [(uuid.uuid4().hex, f"agg-{i % 1000}", {"i": i}) for i in range(n)]
    if isinstance(storage, PostgresStorage):  # bulk load; the outbox reads it the same
        async with storage.pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO sagaz_outbox (event_id, aggregate_id, topic, event_type, payload) "
                "VALUES ($1, $2, $3, 'E', $4)", [(e, a, topic, p) for e, a, p in rows])
        return
    for start in range(0, n, 1000):
        tx = None
        if hasattr(storage, "redis"):
            tx = storage.redis.pipeline(transaction=True)
            tx.multi()
        for event_id, agg, payload in rows[start:start + 1000]:
            await storage.outbox.insert(tx, aggregate_id=agg, topic=topic, event_type="E",
                                     payload=payload, event_id=event_id)
        if tx is not None:
            await tx.execute()
            await tx.reset()


async def worker_throughput(storage: Any, bootstrap: str, topic: str, n: int,
                            workers: int) -> float:
    from sagaz.brokers import KafkaBroker
    from sagaz.outbox import OutboxWorker

    await fill(storage, topic, n)
    brokers = [KafkaBroker(bootstrap) for _ in range(workers)]
    for b in brokers:
        await b.start()
    ws = [OutboxWorker(storage.outbox, b, batch_size=1000, poll_interval=0.01)
          for b in brokers]
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
    share = "/".join(f"{w.published / n:.0%}" for w in ws)
    print(f"  x{workers}  {n / elapsed:8.0f} events/s  ({n} events in {elapsed:.2f}s; "
          f"shares {share})")
    return n / elapsed


def peer_python(given: str | None) -> str:
    if given:
        return given
    venv = Path.home() / ".cache/sagaz/peer-venv"
    py = venv / "bin/python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "sagaz==1.5.0", "asyncpg",
                    "aiokafka"], check=True)
    return str(py)


def run_peer(py: str, pg_url: str, bootstrap: str, topic: str, n: int) -> float:
    script = Path(__file__).resolve().parent / "peer_outbox_1_5.py"
    out = subprocess.run([py, str(script), "--pg", pg_url, "--bootstrap", bootstrap,
                          "--topic", topic, "-n", str(n)], check=True, capture_output=True,
                         text=True, cwd="/").stdout  # cwd: never import this repo's sagaz
    return float(json.loads(out.strip().splitlines()[-1])["events_per_s"])


async def run(pg_url: str, redis_url: str, bootstrap: str, n: int,
              peer: str | None = None) -> None:
    from sagaz.brokers import KafkaBroker
    from sagaz.consumer_inbox import ConsumerInbox
    from sagaz.memory_storage import MemoryStorage
    from sagaz.outbox import OptimisticPublisher
    from sagaz.postgres_storage import PostgresStorage
    from sagaz.redis_storage import RedisStorage
    from sagaz.topics import ensure_topics

    topic = f"bench-outbox-{uuid.uuid4().hex[:6]}"
    await ensure_topics(bootstrap, {topic: 4})
    broker = KafkaBroker(bootstrap, linger_ms=0)
    await broker.start()

    pool = await fresh_pool(pg_url)
    storage = PostgresStorage(pool)
    publisher = OptimisticPublisher(storage.outbox, broker)
    lat = []
    for i in range(2200):
        async with pool.acquire() as conn, conn.transaction():
            event = await storage.outbox.insert(conn, aggregate_id=f"a{i % 100}", topic=topic,
                                             event_type="E", payload={"i": i}, delay=30)
        t0 = time.perf_counter()
        assert await publisher.publish_after_commit(event)
        lat.append(time.perf_counter() - t0)
    lat = lat[200:]
    print(f"optimistic publish (PostgreSQL)  p50 {pct(lat, 50) * 1e3:6.2f} ms   "
          f"p99 {pct(lat, 99) * 1e3:6.2f} ms   (n={len(lat)})")
    await pool.close()

    ours: dict[tuple[str, int], float] = {}
    for name in ("PostgreSQL", "Redis", "memory"):
        print(f"outbox worker, {name} -> Kafka")
        for workers in (1, 2):
            if name == "PostgreSQL":
                pool = await fresh_pool(pg_url)
                store: Any = PostgresStorage(pool)
            elif name == "Redis":
                store = RedisStorage(redis_url, prefix=f"bench{uuid.uuid4().hex[:6]}")
            else:
                store = MemoryStorage()
            ours[name, workers] = await worker_throughput(store, bootstrap, topic, n, workers)
            await store.close()
            if name == "PostgreSQL":
                await pool.close()

    if peer is not None:
        rate = await asyncio.to_thread(run_peer, peer, pg_url, bootstrap, topic, n)
        print(f"peer: sagaz 1.5.0 outbox worker, PostgreSQL -> Kafka, x1  {rate:8.0f} events/s"
              f"  -> ours x1 is {ours['PostgreSQL', 1] / rate:.1f}x")

    pool = await fresh_pool(pg_url)
    inbox = ConsumerInbox(PostgresStorage(pool), "bench")

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
    print(f"inbox duplicate check (PostgreSQL)  p50 {pct(lat, 50) * 1e3:6.2f} ms   "
          f"p99 {pct(lat, 99) * 1e3:6.2f} ms   mean {statistics.fmean(lat) * 1e3:.2f} ms")
    await pool.close()
    await broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=50_000)
    ap.add_argument("--peer", action="store_true", help="also run sagaz 1.5.0's outbox worker")
    ap.add_argument("--peer-python", default=None)
    args = ap.parse_args()
    peer = peer_python(args.peer_python) if args.peer else None
    print(f"machine: {machine()}")
    from sagaz.testing.kafka import LocalKafka
    from sagaz.testing.postgres import LocalPostgres
    from sagaz.testing.redis import LocalRedis

    pg = kafka = redis = None
    pg_url = os.environ.get("SAGAZ_TEST_POSTGRES_URL")
    redis_url = os.environ.get("SAGAZ_TEST_REDIS_URL")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    try:
        if not pg_url:
            pg = LocalPostgres().start()
            pg_url = pg.url
        if not redis_url:
            redis = LocalRedis().start()
            redis_url = redis.url
        if not bootstrap:
            kafka = LocalKafka(partitions=4).start()
            bootstrap = kafka.bootstrap_servers
        from sagaz.errors import mask_url

        # the URLs may be given (SAGAZ_TEST_*_URL) with a password: not on the terminal
        print(mask_url(f"postgres {pg_url}; redis {redis_url}; kafka {bootstrap}"))
        asyncio.run(run(pg_url, redis_url, bootstrap, args.n, peer))
    finally:
        if redis is not None:
            redis.stop()
        if kafka is not None:
            kafka.stop()
        if pg is not None:
            pg.stop()


if __name__ == "__main__":
    main()
