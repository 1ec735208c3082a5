"""Transactional outbox on PostgreSQL: never an event without its change, nor a change
without its event.

    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE orders ...")
        event = await outbox.insert(conn, aggregate_id="order-1", topic="orders",
                                    event_type="OrderPaid", payload={...})
    await publisher.publish_after_commit(event)      # optional: lower latency

``OutboxWorker`` publishes whatever is pending. Claiming (one statement, in one
transaction): rows ``FOR UPDATE SKIP LOCKED`` that are pending, due and not leased; then
any claimed row with an *earlier pending row of the same aggregate* is let go, whoever
holds that row. So for one aggregate only the oldest unsent events are ever in flight, in
id order, on one worker: per-aggregate order holds across any number of workers. A
claimed row carries a lease, renewed while its publish is outstanding (through a broker
outage the producer keeps retrying, so the batch is neither lost nor handed to a second
worker); a worker that dies loses it when the lease expires and another worker takes the
rows over (publishing them again: at least once, which consumer inboxes absorb). Publish
failures back off exponentially; after ``max_attempts`` a row is marked dead with its
last error and stops blocking its aggregate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from sagaz.brokers import Broker, BrokerError, Skipped

log = logging.getLogger("sagaz.outbox")


class OutboxError(ValueError):
    """An event that cannot go into the outbox; the message says why."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    id: int
    event_id: str
    aggregate_id: str
    topic: str
    event_type: str
    payload: Any
    headers: dict[str, str]

    def message(self) -> tuple[str, str, bytes, dict[str, str]]:
        headers = {"event-id": self.event_id, "event-type": self.event_type, **self.headers}
        return self.topic, self.aggregate_id, orjson.dumps(self.payload), headers


def _check(aggregate_id: Any, topic: Any, event_type: Any, payload: Any,
           headers: Any) -> bytes:
    for name, value in (("aggregate_id", aggregate_id), ("topic", topic),
                        ("event_type", event_type)):
        if not isinstance(value, str) or not value:
            raise OutboxError(f"{name} must be a non-empty str, got {value!r}")
    if headers is not None and (not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
        raise OutboxError(f"headers must map str to str, got {headers!r}")
    try:
        return orjson.dumps(payload)
    except TypeError as exc:
        raise OutboxError(f"payload of {event_type!r} is not JSON-serialisable: {exc}") from None


async def init_connection(conn: Any) -> None:
    """asyncpg pool ``init``: JSONB as Python objects, via orjson."""
    await conn.set_type_codec("jsonb", encoder=lambda v: orjson.dumps(v).decode(),
                              decoder=orjson.loads, schema="pg_catalog")


async def insert(conn: Any, *, aggregate_id: str, topic: str, event_type: str, payload: Any,
                 headers: dict[str, str] | None = None, event_id: str | None = None,
                 delay: float = 0.0) -> OutboxEvent:
    """Write an event in the caller's transaction (``conn`` must be inside one).

    ``delay`` keeps the worker off the row for that long (the optimistic publisher uses it
    so the two do not race for a fresh event).
    """
    raw = _check(aggregate_id, topic, event_type, payload, headers)
    if not conn.is_in_transaction():
        raise OutboxError("insert needs the caller's open transaction, so the event commits "
                          "or rolls back with the business change")
    event_id = event_id or uuid.uuid4().hex
    row_id = await conn.fetchval(
        """INSERT INTO sagaz_outbox (event_id, aggregate_id, topic, event_type, payload,
                                     headers, available_at)
           VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, now() + $7 * interval '1 second')
           RETURNING id""",
        event_id, aggregate_id, topic, event_type, raw.decode(), headers or {}, delay)
    return OutboxEvent(row_id, event_id, aggregate_id, topic, event_type,
                       orjson.loads(raw), dict(headers or {}))


_CLAIM = """
WITH candidates AS (
    SELECT id, aggregate_id FROM sagaz_outbox
    WHERE status = 'pending' AND available_at <= now()
      AND (lease_until IS NULL OR lease_until < now())
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), blocked AS (
    SELECT c.id FROM candidates c
    WHERE EXISTS (SELECT 1 FROM sagaz_outbox p
                  WHERE p.aggregate_id = c.aggregate_id AND p.status = 'pending'
                    AND p.id < c.id AND p.id NOT IN (SELECT id FROM candidates))
)
UPDATE sagaz_outbox o
SET lease_owner = $2, lease_until = now() + $3 * interval '1 second'
FROM candidates c
WHERE o.id = c.id AND c.id NOT IN (SELECT id FROM blocked)
RETURNING o.id, o.event_id, o.aggregate_id, o.topic, o.event_type, o.payload, o.headers,
          o.attempts
"""


class OutboxWorker:
    def __init__(self, pool: Any, broker: Broker, *, batch_size: int = 500,
                 lease: float = 30.0, poll_interval: float = 0.1, max_attempts: int = 10,
                 backoff: float = 0.5, max_backoff: float = 60.0,
                 retention: float | None = 7 * 86400, prune_interval: float = 300.0,
                 worker_id: str | None = None) -> None:
        for name, count in (("batch_size", batch_size), ("max_attempts", max_attempts)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an int >= 1, got {count!r}")
        for name, value in (("lease", lease), ("poll_interval", poll_interval),
                            ("backoff", backoff), ("max_backoff", max_backoff),
                            ("prune_interval", prune_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if retention is not None and retention <= 0:
            raise ValueError(f"retention must be > 0 seconds or None, got {retention!r}")
        self.pool, self.broker = pool, broker
        self.batch_size, self.lease, self.poll_interval = batch_size, lease, poll_interval
        self.max_attempts, self.backoff, self.max_backoff = max_attempts, backoff, max_backoff
        self.retention, self.prune_interval = retention, prune_interval
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stopping = asyncio.Event()
        self.published = 0

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Publish until stop(); database and broker errors are logged and retried."""
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while not self._stopping.is_set():
            try:
                n = await self.run_once()
                if self.retention is not None and loop.time() >= next_prune:
                    await self.prune()
                    next_prune = loop.time() + self.prune_interval
            except Exception as exc:  # the database went away, say: try again shortly
                log.warning("outbox worker %s: %s: %s", self.worker_id, type(exc).__name__, exc)
                n = 0
            if n < self.batch_size:
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.poll_interval)
                except TimeoutError:
                    pass

    async def run_once(self) -> int:
        """Claim one batch, publish it, record the outcome; return how many were claimed."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_CLAIM, self.batch_size, self.worker_id, self.lease)
        if not rows:
            return 0
        rows = sorted(rows, key=lambda r: r["id"])  # per-aggregate order: publish by id
        events = [OutboxEvent(r["id"], r["event_id"], r["aggregate_id"], r["topic"],
                              r["event_type"], r["payload"], r["headers"]) for r in rows]
        ids = [e.id for e in events]
        # While the broker holds the batch (it retries through an outage), keep the lease:
        # a worker that takes the rows over would publish them a second time.
        done = asyncio.Event()
        renew = asyncio.create_task(self._renew(ids, done))
        try:
            errors = await self.broker.publish_many([e.message() for e in events])
        except BrokerError as exc:
            errors = [exc] * len(events)
        finally:
            # Stopped between queries, not cancelled: a query cancelled mid-flight would
            # hand its connection back to the pool in an unusable state.
            done.set()
            await asyncio.gather(renew, return_exceptions=True)
        # Per aggregate, everything after its first failure waits for it: released
        # without counting an attempt, and blocked (by the claim) until it goes out.
        sent, failed, skipped = [], [], []
        broken: set[str] = set()
        for e, err in zip(events, errors, strict=True):
            if e.aggregate_id in broken or isinstance(err, Skipped):
                skipped.append(e.id)
                broken.add(e.aggregate_id)
            elif err is not None:
                failed.append((e.id, err))
                broken.add(e.aggregate_id)
            else:
                sent.append(e.id)
        if sent:
            async with self.pool.acquire() as conn:
                await conn.execute(
                    """UPDATE sagaz_outbox SET status = 'sent', sent_at = now(),
                           attempts = attempts + 1, lease_owner = NULL, lease_until = NULL,
                           last_error = NULL
                       WHERE id = ANY($1::bigint[]) AND status = 'pending'""", sent)
            self.published += len(sent)
        if failed:
            await self._failed([i for i, _ in failed],
                               f"{type(failed[0][1]).__name__}: {failed[0][1]}")
        if skipped:
            async with self.pool.acquire() as conn:
                await conn.execute("UPDATE sagaz_outbox SET lease_owner = NULL, "
                                   "lease_until = NULL WHERE id = ANY($1::bigint[])", skipped)
        return len(rows)

    async def _renew(self, ids: list[int], done: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(done.wait(), self.lease / 3)
                return
            except TimeoutError:
                pass
            try:
                async with self.pool.acquire() as conn:
                    await conn.execute(
                        "UPDATE sagaz_outbox SET lease_until = now() + $3 * interval '1 second' "
                        "WHERE id = ANY($1::bigint[]) AND lease_owner = $2", ids,
                        self.worker_id, self.lease)
            except Exception as exc:  # keep trying; the lease is the fallback
                log.warning("outbox worker %s: renewing a lease failed: %s", self.worker_id, exc)

    async def _failed(self, ids: list[int], error: str) -> None:
        log.warning("outbox worker %s: publishing %d events failed: %s", self.worker_id,
                    len(ids), error)
        async with self.pool.acquire() as conn:
            await conn.execute(
                """UPDATE sagaz_outbox SET attempts = attempts + 1, last_error = $2,
                       lease_owner = NULL, lease_until = NULL,
                       status = CASE WHEN attempts + 1 >= $3 THEN 'dead' ELSE 'pending' END,
                       available_at = now() + LEAST($5, $4 * power(2, attempts))
                                                * interval '1 second'
                   WHERE id = ANY($1::bigint[]) AND status = 'pending'""",
                ids, error, self.max_attempts, self.backoff, self.max_backoff)

    async def prune(self) -> int:
        """Delete events sent more than ``retention`` seconds ago."""
        async with self.pool.acquire() as conn:
            result = await conn.execute(
                "DELETE FROM sagaz_outbox WHERE status = 'sent' "
                "AND sent_at < now() - $1 * interval '1 second'", self.retention)
        return int(result.split()[-1])


class OptimisticPublisher:
    """Publish right after commit; the worker is the safety net.

    The event should be inserted with ``delay`` (e.g. 5 s) so the worker leaves it alone
    meanwhile. Marked sent only after the broker acknowledged it; on any failure it stays
    pending and the worker publishes it when the delay is over. An event that has an
    earlier unsent event of its aggregate is left to the worker, to keep the order.
    """

    def __init__(self, pool: Any, broker: Broker) -> None:
        self.pool, self.broker = pool, broker

    async def publish_after_commit(self, event: OutboxEvent) -> bool:
        """True if published and marked sent now; False if left to the worker."""
        try:
            async with self.pool.acquire() as conn:
                earlier = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM sagaz_outbox WHERE aggregate_id = $1 "
                    "AND status = 'pending' AND id < $2)", event.aggregate_id, event.id)
            if earlier:
                return False
            [error] = await self.broker.publish_many([event.message()])
            if error is not None:
                raise error
            async with self.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE sagaz_outbox SET status = 'sent', sent_at = now(), "
                    "attempts = attempts + 1 WHERE id = $1 AND status = 'pending'", event.id)
            return True
        except Exception as exc:
            log.info("optimistic publish of %s left to the worker: %s", event.event_id, exc)
            return False
