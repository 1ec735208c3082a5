#!/usr/bin/env python3
"""The peer for bench_outbox.py: sagaz 1.5.0's outbox worker, PostgreSQL -> Kafka.

Runs inside the peer's own virtualenv (sagaz==1.5.0 plus asyncpg and aiokafka), never
imports this repository, and prints one JSON line: {"events_per_s": ..., "n": ...}.

    $PEER/bin/python tests/bench/peer_outbox_1_5.py --pg URL --bootstrap HOST:PORT -n N

Same shape as ours: N events over 1,000 aggregates, one worker, batches of 1,000, from a
full table to empty, to a 4-partition topic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid


async def main(pg: str, bootstrap: str, n: int, topic: str) -> None:
    import asyncpg
    from sagaz.core.outbox.brokers.kafka import KafkaBroker, KafkaBrokerConfig
    from sagaz.core.outbox.types import OutboxConfig, OutboxEvent
    from sagaz.core.outbox.worker import OutboxWorker
    from sagaz.core.storage.backends.postgresql.outbox import PostgreSQLOutboxStorage

    name = f"peer_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    storage = PostgreSQLOutboxStorage(pg.rsplit("/", 1)[0] + f"/{name}")
    await storage.initialize()
    async with storage._pool.acquire() as conn, conn.transaction():
        for i in range(n):
            await storage.insert(OutboxEvent(saga_id=f"s{i}", event_type=topic,
                                             aggregate_id=f"agg-{i % 1000}",
                                             payload={"i": i}), connection=conn)
    broker = KafkaBroker(KafkaBrokerConfig(bootstrap_servers=bootstrap))
    await broker.connect()
    worker = OutboxWorker(storage, broker, OutboxConfig(batch_size=1000))
    t0 = time.perf_counter()
    done = 0
    while done < n:
        done += await worker.process_batch()
    elapsed = time.perf_counter() - t0
    async with storage._pool.acquire() as conn:  # count only what really went out
        sent = await conn.fetchval("SELECT count(*) FROM saga_outbox WHERE status = 'sent'")
    if sent != n:
        raise SystemExit(f"peer: only {sent} of {n} events were marked sent")
    await broker.close()
    await storage.close()
    print(json.dumps({"events_per_s": n / elapsed, "n": n, "seconds": elapsed}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pg", required=True)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("-n", type=int, default=20_000)
    a = ap.parse_args()
    asyncio.run(main(a.pg, a.bootstrap, a.n, a.topic))
