"""In-memory ``Storage``: the outbox, inbox markers and saga snapshots of one process.

For tests and single-process use: nothing survives the process, and there are no
transactions (``tx`` is None), so "the event commits with the business change" holds only
as far as the caller's own code does. Each method runs without awaiting, so it is atomic
with respect to other tasks on the event loop. Same outbox model as the Redis backend: a
queue of pending event ids per aggregate, leases per aggregate.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from sagaz.inbox import MemoryInbox
from sagaz.storage import (
    Backoff,
    Handler,
    OutboxError,
    OutboxEvent,
    check_inbox_args,
    prepare_event,
)
from sagaz.store import InMemorySagaStore


@dataclass(slots=True)
class _Row:
    event: OutboxEvent
    seq: int
    due: float
    status: str = "pending"
    last_error: str | None = None
    sent_at: float = 0.0
    added: float = 0.0  # clock() when inserted


class MemoryOutbox:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._rows: dict[str, _Row] = {}
        self._queues: dict[str, deque[str]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._seq = itertools.count()

    async def insert(self, tx: Any, *, aggregate_id: str, topic: str, event_type: str,
                     payload: Any, headers: dict[str, str] | None = None,
                     event_id: str | None = None, delay: float = 0.0) -> OutboxEvent:
        raw, headers, event_id = prepare_event(aggregate_id, topic, event_type, payload,
                                               headers, event_id, delay)
        if event_id in self._rows:
            raise OutboxError(f"event_id {event_id!r} is already in the outbox")
        event = OutboxEvent(event_id, event_id, aggregate_id, topic, event_type,
                            orjson.loads(raw), headers)
        now = self.clock()
        self._rows[event_id] = _Row(event, next(self._seq), now + delay, added=now)
        self._queues.setdefault(aggregate_id, deque()).append(event_id)
        return event

    def _free(self, aggregate_id: str, now: float, worker_id: str) -> bool:
        lease = self._leases.get(aggregate_id)
        return lease is None or lease[1] < now or lease[0] == worker_id

    def _holder(self, aggregate_id: str) -> str | None:
        lease = self._leases.get(aggregate_id)
        return None if lease is None else lease[0]

    async def claim(self, worker_id: str, limit: int, lease: float) -> list[OutboxEvent]:
        now = self.clock()
        heads = sorted(
            (self._rows[q[0]].seq, agg) for agg, q in self._queues.items()
            if q and self._free(agg, now, worker_id) and self._rows[q[0]].due <= now)
        out: list[OutboxEvent] = []
        for _, agg in heads:
            if len(out) >= limit:
                break
            for event_id in self._queues[agg]:
                row = self._rows[event_id]
                if len(out) >= limit or row.due > now:
                    break
                out.append(row.event)
            self._leases[agg] = (worker_id, now + lease)
        return out

    async def renew(self, worker_id: str, events: list[OutboxEvent], lease: float) -> None:
        now = self.clock()
        for agg in {e.aggregate_id for e in events}:
            if self._holder(agg) == worker_id:
                self._leases[agg] = (worker_id, now + lease)

    def _leave(self, row: _Row, status: str, now: float) -> None:
        row.status = status
        queue = self._queues.get(row.event.aggregate_id)
        if queue is not None and row.event.event_id in queue:
            queue.remove(row.event.event_id)
            if not queue:
                del self._queues[row.event.aggregate_id]
        if status == "sent":  # a publish acknowledged: one more attempt, the last
            row.event = replace(row.event, attempts=row.event.attempts + 1)
            row.sent_at = now

    async def settle(self, worker_id: str, sent: list[OutboxEvent],
                     failed: list[tuple[OutboxEvent, str]], released: list[OutboxEvent],
                     backoff: Backoff) -> None:
        now = self.clock()
        for event in sent:
            row = self._rows.get(event.event_id)
            if row is not None and row.status == "pending":
                self._leave(row, "sent", now)
        for event, error in failed:
            row = self._rows.get(event.event_id)
            if row is None or row.status != "pending" or \
                    self._holder(event.aggregate_id) != worker_id:
                continue  # counted once, by the holder
            attempts = row.event.attempts
            row.event = replace(row.event, attempts=attempts + 1)
            row.last_error = error
            if attempts + 1 >= backoff.max_attempts:
                self._leave(row, "dead", now)
            else:
                row.due = now + backoff.delay(attempts)
        for agg in {e.aggregate_id for e in [*sent, *released, *(e for e, _ in failed)]}:
            if self._holder(agg) == worker_id:
                del self._leases[agg]

    async def is_next(self, event: OutboxEvent) -> bool:
        queue = self._queues.get(event.aggregate_id)
        return bool(queue) and queue[0] == event.event_id  # type: ignore[index]

    async def mark_sent(self, event: OutboxEvent) -> None:
        row = self._rows.get(event.event_id)
        if row is not None and row.status == "pending":
            self._leave(row, "sent", self.clock())

    async def prune(self, older_than: float) -> int:
        cutoff = self.clock() - older_than
        old = [k for k, r in self._rows.items() if r.status == "sent" and r.sent_at < cutoff]
        for k in old:
            del self._rows[k]
        return len(old)

    async def counts(self) -> dict[str, int]:
        out = {"pending": 0, "sent": 0, "dead": 0}
        for row in self._rows.values():
            out[row.status] += 1
        return out

    async def oldest_pending_age(self) -> float:
        added = [r.added for r in self._rows.values() if r.status == "pending"]
        return max(0.0, self.clock() - min(added)) if added else 0.0

    async def dead(self, limit: int = 100) -> list[tuple[OutboxEvent, str]]:
        rows = sorted((r for r in self._rows.values() if r.status == "dead"),
                      key=lambda r: r.seq)
        return [(r.event, r.last_error or "") for r in rows[:limit]]

    async def requeue(self, event_ids: list[str]) -> int:
        now, n = self.clock(), 0
        for event_id in event_ids:
            row = self._rows.get(event_id)
            if row is None or row.status != "dead":
                continue
            row.status, row.due, row.seq, row.last_error = "pending", now, next(self._seq), None
            row.event = replace(row.event, attempts=0)
            self._queues.setdefault(row.event.aggregate_id, deque()).append(event_id)
            n += 1
        return n


class MemoryStorage:
    def __init__(self, *, max_finished: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.outbox = MemoryOutbox(clock)
        self.sagas = InMemorySagaStore(max_finished)
        self.replies = MemoryInbox()
        self._results: dict[tuple[str, str], Any] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def process_idempotent(self, consumer: str, event_id: str, source_topic: str,
                                 event_type: str, payload: Any, handler: Handler) -> Any:
        check_inbox_args(consumer, event_id, source_topic, event_type)
        key = (consumer, event_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # racing duplicates wait for the first to finish
            if key in self._results:
                return self._results[key]
            result = await handler(payload, None)
            orjson.dumps(result)  # storable, as in the durable backends
            self._results[key] = result
        self._locks.pop(key, None)
        return result

    async def seen(self, consumer: str, event_id: str) -> bool:
        return (consumer, event_id) in self._results

    async def close(self) -> None:
        pass
