"""Storages for the outbox built from a URL, with no server needed until first use.

    storage = PostgreSQLOutboxStorage("postgresql://app@db/app")   # or an asyncpg pool
    publisher = OptimisticPublisher(storage, broker)
    worker = OutboxWorker(storage, broker)
    inbox = ConsumerInbox(storage, consumer_name="billing")

Each is a full ``Storage`` of its backend (``PostgresStorage``, ``RedisStorage``,
``MemoryStorage``: outbox, inbox markers, saga snapshots), so it goes wherever a storage
goes, and an ``OutboxStore`` too (its ``.outbox`` methods on itself), so the worker and
publisher take it as it is. Building one connects to nothing (a
module can build it at import, before the database is up); the first call that needs the
server connects, and if it cannot, raises (PostgreSQL: ``StorageError`` naming the URL with
its password masked; Redis: redis-py's ``ConnectionError`` naming host and port), and the
next call tries again. ``open_storage(url)`` (``sagaz.storage``) is the
connect-now alternative.

The event is written with the caller's transaction and the event's fields, and the call
returns the ``OutboxEvent`` to hand to the publisher:

    async with storage.pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE orders ...")
        event = await storage.insert(conn, aggregate_id=order_id, topic="orders",
                                     event_type="OrderPaid", payload={...}, delay=5)
    await publisher.publish_after_commit(event)

(``storage.insert`` is ``storage.outbox.insert``.)
"""

from __future__ import annotations

from typing import Any

from sagaz.memory_storage import MemoryStorage
from sagaz.postgres_storage import LazyPool, PostgresStorage
from sagaz.redis_storage import RedisStorage
from sagaz.storage import (
    Backoff,
    OutboxError,
    OutboxEvent,
    Storage,
    StorageError,
    open_storage,
)

__all__ = ["InMemoryOutboxStorage", "OutboxError", "OutboxEvent", "PostgreSQLOutboxStorage",
           "RedisOutboxStorage", "Storage", "StorageError", "open_storage"]

INSERT_HOW = (
    "insert takes the caller's transaction and the event's fields, not an event object: "
    "event = await storage.insert(tx, aggregate_id=..., topic=..., event_type=..., "
    "payload=..., delay=5) inside the business transaction (tx: the asyncpg connection "
    "inside conn.transaction() on PostgreSQL, the pipeline after pipe.multi() on Redis, "
    "None in memory); it returns the OutboxEvent to pass to "
    "publisher.publish_after_commit(event) after the commit")


class _OutboxOnStorage:
    """The storage's outbox methods on the storage itself, so the page can hand the one
    object to ``OptimisticPublisher``, ``OutboxWorker`` and ``ConsumerInbox``, and write
    ``storage.insert(tx, ...)``. ``insert`` given an event object (as the page's
    ``outbox_storage.insert(event)`` reads) is refused with the call to write instead."""

    outbox: Any

    async def insert(self, tx: Any = None, *args: Any, **fields: Any) -> OutboxEvent:
        if args or isinstance(tx, OutboxEvent) or not fields:
            raise TypeError(INSERT_HOW)
        event: OutboxEvent = await self.outbox.insert(tx, **fields)
        return event

    async def claim(self, worker_id: str, limit: int, lease: float) -> list[OutboxEvent]:
        events: list[OutboxEvent] = await self.outbox.claim(worker_id, limit, lease)
        return events

    async def renew(self, worker_id: str, events: list[OutboxEvent], lease: float) -> None:
        await self.outbox.renew(worker_id, events, lease)

    async def settle(self, worker_id: str, sent: list[OutboxEvent],
                     failed: list[tuple[OutboxEvent, str]], released: list[OutboxEvent],
                     backoff: Backoff) -> None:
        await self.outbox.settle(worker_id, sent, failed, released, backoff)

    async def is_next(self, event: OutboxEvent) -> bool:
        return bool(await self.outbox.is_next(event))

    async def mark_sent(self, event: OutboxEvent) -> None:
        await self.outbox.mark_sent(event)

    async def prune(self, older_than: float) -> int:
        return int(await self.outbox.prune(older_than))

    async def oldest_pending_age(self) -> float:
        return float(await self.outbox.oldest_pending_age())

    async def counts(self) -> dict[str, int]:
        counts: dict[str, int] = await self.outbox.counts()
        return counts

    async def dead(self, limit: int = 100) -> list[tuple[OutboxEvent, str]]:
        events: list[tuple[OutboxEvent, str]] = await self.outbox.dead(limit)
        return events

    async def requeue(self, event_ids: list[str]) -> int:
        return int(await self.outbox.requeue(event_ids))


class PostgreSQLOutboxStorage(_OutboxOnStorage, PostgresStorage):
    """``PostgresStorage`` from a ``postgresql://`` URL, its pool opened on first use (with
    ``pool_options``, asyncpg's ``create_pool`` arguments), or from an asyncpg pool made
    with ``sagaz.postgres_storage.init_connection``. Tables: ``sagaz db migrate``."""

    def __init__(self, url_or_pool: Any, *, scan_window: int | None = None,
                 **pool_options: Any) -> None:
        if isinstance(url_or_pool, str):
            super().__init__(LazyPool(url_or_pool, **pool_options), owns_pool=True,
                             scan_window=scan_window)
        elif pool_options:
            raise TypeError(f"pool options ({', '.join(sorted(pool_options))}) apply when "
                            f"the storage opens its pool from a URL, not to a given pool")
        elif not hasattr(url_or_pool, "acquire"):
            raise TypeError(f"expected a postgresql:// URL or an asyncpg pool, got a "
                            f"{type(url_or_pool).__name__}")
        else:
            super().__init__(url_or_pool, scan_window=scan_window)

    def __repr__(self) -> str:
        return f"PostgreSQLOutboxStorage({self.pool!r})"


class RedisOutboxStorage(_OutboxOnStorage, RedisStorage):
    """``RedisStorage`` from a ``redis://`` URL (or a redis.asyncio client); redis-py
    connects on the first command."""


class InMemoryOutboxStorage(_OutboxOnStorage, MemoryStorage):
    """``MemoryStorage``: one process, no transactions (``tx`` is None), for tests."""
