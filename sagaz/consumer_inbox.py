"""Consumer inbox: a handler's effect and its dedup marker commit together.

    inbox = ConsumerInbox(storage, "billing")
    result = await inbox.process_idempotent(event_id, "orders", "OrderPaid", payload, handle)

``handle(payload, tx)`` runs in the transaction that records the marker keyed by
(consumer, event id), and must do its own writes through ``tx`` (an asyncpg connection on
PostgreSQL, a MULTI/EXEC pipeline on Redis, None in memory; ``sagaz.storage``). If it
raises, nothing commits, no marker remains, and a redelivery runs it again. A duplicate
returns the first run's (JSON) result without calling the handler; racing duplicates
commit once (PostgreSQL and memory make the second wait; Redis lets both run and commits
the first, see ``RedisStorage.process_idempotent``).
"""

from __future__ import annotations

from typing import Any

from sagaz.storage import Handler, Storage, check_inbox_args


class ConsumerInbox:
    def __init__(self, storage: Storage, consumer_name: str) -> None:
        check_inbox_args(consumer_name, "-", "-", "-")
        if not hasattr(storage, "process_idempotent"):
            raise TypeError(f"storage must be a sagaz Storage (PostgresStorage, RedisStorage, "
                            f"MemoryStorage), got {storage!r}")
        self.storage, self.consumer = storage, consumer_name

    async def process_idempotent(self, event_id: str, source_topic: str, event_type: str,
                                 payload: Any, handler: Handler) -> Any:
        return await self.storage.process_idempotent(self.consumer, event_id, source_topic,
                                                     event_type, payload, handler)

    async def seen(self, event_id: str) -> bool:
        return await self.storage.seen(self.consumer, event_id)
