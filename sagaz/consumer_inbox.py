"""Consumer inboxes: a handler's effect and its dedup marker commit together.

PostgreSQL (``ConsumerInbox``), Redis (``RedisConsumerInbox``) and in-memory
(``MemoryConsumerInbox``) keep one contract; the PostgreSQL one is described here, the
others where they are defined.


    inbox = ConsumerInbox(pool, "billing")
    result = await inbox.process_idempotent(event_id, "orders", "OrderPaid", payload, handle)

``handle(payload, conn)`` runs inside the transaction that inserts the marker keyed by
(consumer, event id), and must do its own database work on ``conn``. If it raises, the
transaction rolls back, no marker remains, and a redelivery runs it again. A duplicate
returns the first run's (JSON) result without calling the handler. Two deliveries racing
wait on the same key: the second sees the first's marker once it commits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

Handler = Callable[[Any, Any], Awaitable[Any]]


class ConsumerInbox:
    def __init__(self, pool: Any, consumer_name: str) -> None:
        if not isinstance(consumer_name, str) or not consumer_name:
            raise ValueError(f"consumer_name must be a non-empty str, got {consumer_name!r}")
        self.pool, self.consumer = pool, consumer_name

    async def process_idempotent(self, event_id: str, source_topic: str, event_type: str,
                                 payload: Any, handler: Handler) -> Any:
        for name, value in (("event_id", event_id), ("source_topic", source_topic),
                            ("event_type", event_type)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        async with self.pool.acquire() as conn, conn.transaction():
            fresh = await conn.fetchval(
                """INSERT INTO sagaz_inbox (consumer, event_id, source_topic, event_type)
                   VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true""",
                self.consumer, event_id, source_topic, event_type)
            if not fresh:
                return await conn.fetchval("SELECT result FROM sagaz_inbox WHERE consumer = $1 "
                                           "AND event_id = $2", self.consumer, event_id)
            result = await handler(payload, conn)
            orjson.dumps(result)  # must be storable: fail (and roll back) now, not later
            await conn.execute("UPDATE sagaz_inbox SET result = $3 WHERE consumer = $1 "
                               "AND event_id = $2", self.consumer, event_id, result)
            return result

    async def seen(self, event_id: str) -> bool:
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM sagaz_inbox WHERE consumer = $1 "
                "AND event_id = $2)", self.consumer, event_id))


def _check(consumer: str, event_id: Any, source_topic: Any, event_type: Any) -> None:
    if not isinstance(consumer, str) or not consumer:
        raise ValueError(f"consumer_name must be a non-empty str, got {consumer!r}")
    for name, value in (("event_id", event_id), ("source_topic", source_topic),
                        ("event_type", event_type)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty str, got {value!r}")


class RedisConsumerInbox:
    """``tx`` is a MULTI/EXEC pipeline: the handler queues its own Redis writes on it and
    the marker is queued after them, so they commit together or not at all. The marker key
    is WATCHed first: if a racing delivery commits first, EXEC fails, nothing of ours is
    applied, and the first result is returned. So racing duplicates may *run* the handler,
    but only one commits: its effects must go through ``tx``. A handler that raises leaves
    no marker."""

    def __init__(self, redis: Any, consumer_name: str, *, prefix: str = "sagaz",
                 ttl: float | None = None) -> None:
        _check(consumer_name, "x", "x", "x")
        if isinstance(redis, str):
            import redis.asyncio as aioredis

            redis = aioredis.from_url(redis)
        self.redis, self.consumer, self.prefix, self.ttl = redis, consumer_name, prefix, ttl

    def _key(self, event_id: str) -> str:
        return f"{self.prefix}:cinbox:{self.consumer}:{event_id}"

    async def process_idempotent(self, event_id: str, source_topic: str, event_type: str,
                                 payload: Any, handler: Handler) -> Any:
        from redis.exceptions import WatchError

        _check(self.consumer, event_id, source_topic, event_type)
        key = self._key(event_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            seen = await pipe.get(key)
            if seen is not None:
                return orjson.loads(seen)["result"]
            pipe.multi()
            result = await handler(payload, pipe)
            marker = orjson.dumps({"result": result, "source_topic": source_topic,
                                   "event_type": event_type})
            if self.ttl is None:
                pipe.set(key, marker)
            else:
                pipe.set(key, marker, px=int(self.ttl * 1000))
            try:
                await pipe.execute()
                return result
            except WatchError:  # a racing delivery committed first: its result stands
                pass
        return orjson.loads(await self.redis.get(key))["result"]

    async def seen(self, event_id: str) -> bool:
        return bool(await self.redis.exists(self._key(event_id)))


class MemoryConsumerInbox:
    """``tx`` is None; one lock per event id. For tests and single-process use."""

    def __init__(self, consumer_name: str) -> None:
        _check(consumer_name, "x", "x", "x")
        self.consumer = consumer_name
        self._results: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def process_idempotent(self, event_id: str, source_topic: str, event_type: str,
                                 payload: Any, handler: Handler) -> Any:
        _check(self.consumer, event_id, source_topic, event_type)
        lock = self._locks.setdefault(event_id, asyncio.Lock())
        async with lock:
            if event_id in self._results:
                return self._results[event_id]
            result = await handler(payload, None)
            orjson.dumps(result)  # storable, as in the durable inboxes
            self._results[event_id] = result
        self._locks.pop(event_id, None)
        return result

    async def seen(self, event_id: str) -> bool:
        return event_id in self._results
