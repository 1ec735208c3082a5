"""One storage interface for outbox events, consumer-inbox markers and saga snapshots.

A ``Storage`` bundles the three on one backend, so a service picks a backend once:

    storage.outbox                  OutboxStore: events written in the caller's transaction,
                                    claimed, published and settled by ``OutboxWorker``
    storage.sagas                   SagaStore (``sagaz.store``): snapshots of engine runs
    storage.process_idempotent(...) the consumer-inbox primitive behind ``ConsumerInbox``
    storage.replies                 Inbox (``sagaz.inbox``): a participant's recorded replies

    backend                                   the caller's transaction ``tx``
    PostgresStorage(pool)   postgres_storage  an asyncpg connection inside a transaction
    RedisStorage(redis)     redis_storage     a MULTI/EXEC pipeline (``pipe.multi()`` called)
    MemoryStorage()         memory_storage    None: no transactions (tests, one process)

``open_storage(url)`` picks one by URL: ``postgresql://``, ``redis://``, ``memory://``.

Outbox semantics every backend keeps (tested once, against all three):
- ``insert`` with an ``event_id`` already in the outbox raises ``OutboxError`` and the
  caller's transaction applies nothing (PostgreSQL rolls it back; Redis refuses before
  EXEC; memory has no transaction, only the insert is refused).
- An event is *pending* until a broker acknowledged it (*sent*) or it failed
  ``max_attempts`` times (*dead*, with its last error; it then stops blocking its aggregate).
- Per aggregate, events go out in the order they were added. ``claim`` only hands out an
  aggregate's oldest pending events (its *head* and the due, unleased events right behind
  it), and never the same aggregate to two workers at once: a claim leases the events; the
  worker renews the lease while the broker holds them; a worker that dies loses the lease
  when it expires and another worker takes the events over (publishing them again: at least
  once, which consumer inboxes absorb). Claiming by aggregate head, not by id window, is
  what lets several workers progress at once when aggregates interleave. A worker claims
  one batch at a time, so its own leases are free to it: a batch that broke off (the
  storage connection dropped) is claimed again at once, not after the lease; what the new
  claim does not take back stays the worker's until its lease runs out.
- ``settle`` records a batch's outcome: sent, failed (attempt counted, backoff before the
  event is due again, dead after ``max_attempts``) and released (handed back untouched:
  events behind a failure of their aggregate); the batch's aggregates are then free,
  whole, to every worker. Settling twice changes nothing more (the worker repeats a settle
  whose reply was lost): sent is sent, and a failure is counted only while the worker
  still holds the aggregate.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from sagaz.errors import SagazError, mask_url, safe_cause, url_for_error
from sagaz.inbox import Inbox
from sagaz.store import SagaStore

Handler = Callable[[Any, Any], Awaitable[Any]]


class StorageError(SagazError, RuntimeError):
    """The storage named by a URL cannot be reached; the message names the URL, masked."""


class OutboxError(SagazError, ValueError):
    """An event that cannot go into the outbox; the message says why."""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    #: the backend's handle for the row: a bigserial on PostgreSQL, the event id elsewhere
    id: Any
    event_id: str
    aggregate_id: str
    topic: str
    event_type: str
    payload: Any
    headers: dict[str, str]
    attempts: int = 0

    def message(self) -> tuple[str, str, bytes, dict[str, str]]:
        headers = {"event-id": self.event_id, "event-type": self.event_type, **self.headers}
        return self.topic, self.aggregate_id, orjson.dumps(self.payload), headers


@dataclass(frozen=True, slots=True)
class Backoff:
    """How failed publishes are retried: ``min(cap, base * 2**attempts)`` seconds apart,
    dead after ``max_attempts``."""

    max_attempts: int = 10
    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempts_before: int) -> float:
        return float(min(self.cap, self.base * 2 ** min(attempts_before, 62)))


def prepare_event(aggregate_id: Any, topic: Any, event_type: Any, payload: Any,
                  headers: Any, event_id: Any, delay: Any) -> tuple[bytes, dict[str, str], str]:
    """Validate an event before any backend writes it. Returns the payload as JSON, the
    headers (the current trace context, then the caller's, which win) and the event id
    (a fresh one unless given)."""
    for name, value in (("aggregate_id", aggregate_id), ("topic", topic),
                        ("event_type", event_type)):
        if not isinstance(value, str) or not value:
            raise OutboxError(f"{name} must be a non-empty str, got {value!r}")
    if event_id is not None and (not isinstance(event_id, str) or not event_id):
        raise OutboxError(f"event_id must be a non-empty str or None, got {event_id!r}")
    if headers is not None and (not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
        raise OutboxError(f"headers must map str to str, got {headers!r}")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
        raise OutboxError(f"delay must be a number of seconds >= 0, got {delay!r}")
    try:
        raw = orjson.dumps(payload)
    except TypeError as exc:
        raise OutboxError(f"payload of {event_type!r} is not JSON-serialisable: {exc}") from None
    from sagaz.tracing import current_trace_headers

    return raw, {**current_trace_headers(), **(headers or {})}, event_id or uuid.uuid4().hex


def check_inbox_args(consumer: Any, event_id: Any, source_topic: Any, event_type: Any) -> None:
    for name, value in (("consumer_name", consumer), ("event_id", event_id),
                        ("source_topic", source_topic), ("event_type", event_type)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty str, got {value!r}")


class OutboxStore(Protocol):
    async def insert(self, tx: Any, *, aggregate_id: str, topic: str, event_type: str,
                     payload: Any, headers: dict[str, str] | None = None,
                     event_id: str | None = None, delay: float = 0.0) -> OutboxEvent:
        """Write an event in the caller's transaction ``tx``. ``delay`` keeps workers off it
        for that long (the optimistic publisher uses it so the two do not race)."""
        ...

    async def claim(self, worker_id: str, limit: int, lease: float) -> list[OutboxEvent]:
        """Lease up to ``limit`` publishable events; per aggregate, oldest first."""
        ...

    async def renew(self, worker_id: str, events: list[OutboxEvent], lease: float) -> None: ...

    async def settle(self, worker_id: str, sent: list[OutboxEvent],
                     failed: list[tuple[OutboxEvent, str]], released: list[OutboxEvent],
                     backoff: Backoff) -> None: ...

    async def is_next(self, event: OutboxEvent) -> bool:
        """True if no earlier event of its aggregate is still pending."""
        ...

    async def mark_sent(self, event: OutboxEvent) -> None:
        """Record an optimistic publish (the broker acknowledged it)."""
        ...

    async def prune(self, older_than: float) -> int:
        """Delete events sent more than ``older_than`` seconds ago; return how many."""
        ...

    async def counts(self) -> dict[str, int]:
        """How many events are pending, sent and dead (for gauges and operators)."""
        ...

    async def oldest_pending_age(self) -> float:
        """Seconds the oldest pending event has waited (0 when none): since it was added
        (PostgreSQL, memory), or since the oldest head of an unclaimed aggregate became due
        (Redis, which keeps no insertion time). One indexed read, for a gauge."""
        ...

    async def dead(self, limit: int = 100) -> list[tuple[OutboxEvent, str]]:
        """Dead events with their last error, oldest first."""
        ...

    async def requeue(self, event_ids: list[str]) -> int:
        """Make dead events pending again (attempts reset), e.g. after fixing the broker;
        each goes behind its aggregate's pending events, as if added now. Returns how many."""
        ...


class Storage(Protocol):
    @property
    def outbox(self) -> OutboxStore: ...

    @property
    def sagas(self) -> SagaStore: ...

    @property
    def replies(self) -> Inbox: ...

    async def process_idempotent(self, consumer: str, event_id: str, source_topic: str,
                                 event_type: str, payload: Any, handler: Handler) -> Any:
        """Run ``handler(payload, tx)`` and record the marker (consumer, event_id) with its
        JSON result in the same transaction; for a marked event return the recorded result
        without running the handler."""
        ...

    async def seen(self, consumer: str, event_id: str) -> bool: ...

    async def close(self) -> None: ...


async def open_storage(url: str, **options: Any) -> Storage:
    """``postgresql://user@host/db`` (asyncpg pool, migrations must be applied; options:
    ``scan_window`` and asyncpg's pool arguments), ``redis://host:port/db`` (options:
    ``prefix``, ``inbox_ttl``) or ``memory://``.

    Connects before returning (Redis answers a PING), so a wrong address or password fails
    here, as a ``StorageError`` naming the URL with its password masked; a URL that does not
    parse is a ``ValueError``, masked too."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        from sagaz.postgres_storage import PostgresStorage, create_pool

        scan_window = options.pop("scan_window", None)
        pool = await create_pool(url, **options)
        return PostgresStorage(pool, owns_pool=True, scan_window=scan_window)
    if scheme in ("redis", "rediss", "unix"):
        from sagaz.redis_storage import RedisStorage

        storage = RedisStorage(url, **options)
        try:
            await storage.redis.ping()
        except Exception as exc:
            await storage.close()
            raise StorageError(f"cannot connect to Redis at {url_for_error(url)}: "
                               f"{type(exc).__name__}: {mask_url(str(exc))}"
                               ) from safe_cause(exc)
        return storage
    if scheme == "memory":
        from sagaz.memory_storage import MemoryStorage

        return MemoryStorage(**options)
    raise ValueError(f"unknown storage URL {url_for_error(url)}: "
                     f"use postgresql://, redis:// or memory://")
