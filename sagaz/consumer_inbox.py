"""Consumer inbox on PostgreSQL: a handler's effect and its dedup marker commit together.

    inbox = ConsumerInbox(pool, "billing")
    result = await inbox.process_idempotent(event_id, "orders", "OrderPaid", payload, handle)

``handle(payload, conn)`` runs inside the transaction that inserts the marker keyed by
(consumer, event id), and must do its own database work on ``conn``. If it raises, the
transaction rolls back, no marker remains, and a redelivery runs it again. A duplicate
returns the first run's (JSON) result without calling the handler. Two deliveries racing
wait on the same key: the second sees the first's marker once it commits.
"""

from __future__ import annotations

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
