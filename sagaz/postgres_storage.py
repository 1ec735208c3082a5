"""PostgreSQL ``Storage`` (asyncpg): outbox, consumer-inbox markers and saga snapshots.

Tables come from ``sagaz.migrations`` (``sagaz db migrate``). The caller's transaction is an
asyncpg connection inside ``conn.transaction()``:

    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE orders ...")
        event = await storage.outbox.insert(conn, aggregate_id="order-1", topic="orders",
                                          event_type="OrderPaid", payload={...})

Claiming (one statement): scan the oldest ``scan`` pending rows; per aggregate, number them
and mark the unbroken run of due, unleased rows from its oldest one; lock the aggregates'
oldest rows (*heads*) ``FOR UPDATE SKIP LOCKED``; lease the marked rows of the aggregates
whose heads we locked, aggregate after aggregate (oldest head first), each a prefix of its
queue, up to the batch size. Whole aggregates per worker, rather than a slice of every
aggregate, leave the other aggregates to other workers. A second worker skips the locked
or leased heads and takes other aggregates; rows behind a head are never claimable on
their own, so one aggregate is never on two workers. The scan
window bounds the cost of a claim; an aggregate beyond it waits until earlier rows drain.
Ids give the order: events of one aggregate must be inserted in the order they commit, which
holds when the business transaction locks the aggregate's row (the usual case).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from sagaz.errors import SagaAlreadyRunning
from sagaz.machine import SagaState
from sagaz.storage import (
    Backoff,
    Handler,
    OutboxError,
    OutboxEvent,
    check_inbox_args,
    prepare_event,
)
from sagaz.store import RunData, SagaRecord


async def init_connection(conn: Any) -> None:
    """asyncpg pool ``init``: JSONB as Python objects, via orjson."""
    await conn.set_type_codec("jsonb", encoder=lambda v: orjson.dumps(v).decode(),
                              decoder=orjson.loads, schema="pg_catalog")


async def create_pool(url: str, **options: Any) -> Any:
    """An asyncpg pool with ``init_connection``; connects now. A URL or option asyncpg
    refuses is a ``ValueError``, an unreachable server a ``StorageError``; both name the
    URL with its password masked."""
    import asyncpg

    from sagaz.errors import mask_url, safe_cause, url_for_error
    from sagaz.storage import StorageError

    try:
        return await asyncpg.create_pool(url, init=init_connection, **options)
    except (ValueError, TypeError) as exc:  # asyncpg's DSN parser, or an option
        raise ValueError(f"invalid PostgreSQL URL or option for {url_for_error(url)}: "
                         f"{mask_url(str(exc))}") from safe_cause(exc)
    except Exception as exc:
        raise StorageError(f"cannot connect to PostgreSQL at {url_for_error(url)}: "
                           f"{type(exc).__name__}: {mask_url(str(exc))}") from safe_cause(exc)


class LazyPool:
    """An asyncpg pool opened on first ``acquire()``, so a storage can be built (at import
    or in a constructor) before the database is up. A failed opening is not remembered:
    the next ``acquire()`` tries again (the worker's loop keeps retrying through an
    outage). Only ``acquire()`` and ``close()``, what the stores use."""

    def __init__(self, url: str, **options: Any) -> None:
        from sagaz.errors import url_for_error

        if not isinstance(url, str):
            raise TypeError(f"expected a postgresql:// URL or an asyncpg pool, got a "
                            f"{type(url).__name__}")
        if url.split("://", 1)[0].lower() not in ("postgresql", "postgres") \
                or "://" not in url:
            raise ValueError(f"expected a postgresql:// URL, got {url_for_error(url)}")
        self.url, self.options = url, options
        self.pool: Any = None
        self._lock: Any = None

    async def open(self) -> Any:
        if self.pool is None:
            import asyncio

            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self.pool is None:
                    self.pool = await create_pool(self.url, **self.options)
        return self.pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        pool = await self.open()
        async with pool.acquire() as conn:
            yield conn

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    def __repr__(self) -> str:
        from sagaz.errors import mask_url

        state = "open" if self.pool is not None else "not opened yet"
        return f"LazyPool({mask_url(self.url)!r}, {state})"


_CLAIM = """
WITH pending AS (
    SELECT id, aggregate_id,
           row_number() OVER w AS pos,
           bool_and(available_at <= now() AND (lease_until IS NULL OR lease_until < now()
                                                OR lease_owner = $2))
               OVER w AS ready
    FROM (SELECT id, aggregate_id, available_at, lease_until, lease_owner FROM sagaz_outbox
          WHERE status = 'pending' ORDER BY id LIMIT $4) AS scan
    WINDOW w AS (PARTITION BY aggregate_id ORDER BY id)
), heads AS (
    SELECT o.id, o.aggregate_id FROM sagaz_outbox o
    WHERE o.id IN (SELECT id FROM pending WHERE pos = 1 AND ready)
      AND o.status = 'pending' AND o.available_at <= now()
      AND (o.lease_until IS NULL OR o.lease_until < now() OR o.lease_owner = $2)
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), batch AS (
    SELECT p.id FROM pending p JOIN heads h USING (aggregate_id)
    WHERE p.ready
    ORDER BY h.id, p.pos
    LIMIT $1
)
UPDATE sagaz_outbox o
SET lease_owner = $2, lease_until = now() + $3 * interval '1 second'
FROM batch b
WHERE o.id = b.id AND o.status = 'pending'
RETURNING o.id, o.event_id, o.aggregate_id, o.topic, o.event_type, o.payload, o.headers,
          o.attempts
"""

_COLUMNS = "id, event_id, aggregate_id, topic, event_type, payload, headers, attempts"


def _event(r: Any) -> OutboxEvent:
    return OutboxEvent(r["id"], r["event_id"], r["aggregate_id"], r["topic"], r["event_type"],
                       r["payload"], r["headers"], r["attempts"])


class PostgresOutbox:
    def __init__(self, pool: Any, scan_window: int | None = None) -> None:
        if scan_window is not None and (isinstance(scan_window, bool) or not isinstance(
                scan_window, int) or scan_window < 1):
            raise ValueError(f"scan_window must be an int >= 1 or None, got {scan_window!r}")
        self.pool, self.scan_window = pool, scan_window

    async def insert(self, tx: Any, *, aggregate_id: str, topic: str, event_type: str,
                     payload: Any, headers: dict[str, str] | None = None,
                     event_id: str | None = None, delay: float = 0.0) -> OutboxEvent:
        raw, headers, event_id = prepare_event(aggregate_id, topic, event_type, payload,
                                               headers, event_id, delay)
        in_transaction = getattr(tx, "is_in_transaction", None)
        if in_transaction is None or not in_transaction():
            raise OutboxError("insert needs the caller's connection inside an open transaction, "
                              "so the event commits or rolls back with the business change")
        import asyncpg

        try:
            row_id = await tx.fetchval(
                """INSERT INTO sagaz_outbox (event_id, aggregate_id, topic, event_type, payload,
                                             headers, available_at)
                   VALUES ($1, $2, $3, $4, $5::text::jsonb, $6,
                           now() + $7 * interval '1 second')
                   RETURNING id""",
                event_id, aggregate_id, topic, event_type, raw.decode(), headers, delay)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "sagaz_outbox_event_id_key":
                raise
            # The caller's transaction is aborted now and rolls back whole on the way out.
            raise OutboxError(f"event_id {event_id!r} is already in the outbox") from None
        return OutboxEvent(row_id, event_id, aggregate_id, topic, event_type,
                           orjson.loads(raw), headers)

    async def claim(self, worker_id: str, limit: int, lease: float) -> list[OutboxEvent]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_CLAIM, limit, worker_id, lease,
                                    self.scan_window or 2 * limit + 1000)
        return [_event(r) for r in sorted(rows, key=lambda r: r["id"])]

    async def renew(self, worker_id: str, events: list[OutboxEvent], lease: float) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE sagaz_outbox SET lease_until = now() + $3 * interval '1 second' "
                "WHERE id = ANY($1::bigint[]) AND lease_owner = $2",
                [e.id for e in events], worker_id, lease)

    async def settle(self, worker_id: str, sent: list[OutboxEvent],
                     failed: list[tuple[OutboxEvent, str]], released: list[OutboxEvent],
                     backoff: Backoff) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if sent:
                await conn.execute(
                    """UPDATE sagaz_outbox SET status = 'sent', sent_at = now(),
                           attempts = attempts + 1, lease_owner = NULL, lease_until = NULL,
                           last_error = NULL
                       WHERE id = ANY($1::bigint[]) AND status = 'pending'""",
                    [e.id for e in sent])
            if failed:
                await conn.execute(
                    """UPDATE sagaz_outbox o SET attempts = o.attempts + 1,
                           last_error = f.error, lease_owner = NULL, lease_until = NULL,
                           status = CASE WHEN o.attempts + 1 >= $3 THEN 'dead'
                                         ELSE 'pending' END,
                           available_at = now() + LEAST($5, $4 * power(2, LEAST(o.attempts, 62)))
                                                  * interval '1 second'
                       FROM unnest($1::bigint[], $2::text[]) AS f(id, error)
                       WHERE o.id = f.id AND o.status = 'pending' AND o.lease_owner = $6""",
                    [e.id for e, _ in failed], [err for _, err in failed],
                    backoff.max_attempts, backoff.base, backoff.cap, worker_id)
            # The batch's aggregates are free again, whole: leases are per row here, and
            # rows of ours beyond this batch (a shorter claim after a batch that broke
            # off) would otherwise keep the aggregate from other workers until they expire.
            aggs = sorted({e.aggregate_id for e in [*sent, *released, *(e for e, _ in failed)]})
            if aggs:
                await conn.execute(
                    "UPDATE sagaz_outbox SET lease_owner = NULL, lease_until = NULL "
                    "WHERE aggregate_id = ANY($1::text[]) AND status = 'pending' "
                    "AND lease_owner = $2", aggs, worker_id)

    async def is_next(self, event: OutboxEvent) -> bool:
        async with self.pool.acquire() as conn:
            return not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM sagaz_outbox WHERE aggregate_id = $1 "
                "AND status = 'pending' AND id < $2)", event.aggregate_id, event.id)

    async def mark_sent(self, event: OutboxEvent) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE sagaz_outbox SET status = 'sent', sent_at = now(), "
                "attempts = attempts + 1 WHERE id = $1 AND status = 'pending'", event.id)

    async def prune(self, older_than: float) -> int:
        async with self.pool.acquire() as conn:
            result = await conn.execute(
                "DELETE FROM sagaz_outbox WHERE status = 'sent' "
                "AND sent_at < now() - $1 * interval '1 second'", older_than)
        return int(result.split()[-1])

    async def counts(self) -> dict[str, int]:
        # One count per status, each on its partial index (sent rows, kept for the
        # retention, would make a GROUP BY scan the table).
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM sagaz_outbox WHERE status = 'pending') AS pending,"
                " (SELECT count(*) FROM sagaz_outbox WHERE status = 'sent') AS sent,"
                " (SELECT count(*) FROM sagaz_outbox WHERE status = 'dead') AS dead")
        return dict(row)

    async def oldest_pending_age(self) -> float:
        # The first pending id on the partial index: no scan however long the backlog.
        async with self.pool.acquire() as conn:
            age = await conn.fetchval(
                "SELECT extract(epoch FROM now() - created_at) FROM sagaz_outbox "
                "WHERE status = 'pending' ORDER BY id LIMIT 1")
        return max(0.0, float(age)) if age is not None else 0.0

    async def dead(self, limit: int = 100) -> list[tuple[OutboxEvent, str]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT {_COLUMNS}, last_error FROM sagaz_outbox "
                                    "WHERE status = 'dead' ORDER BY id LIMIT $1", limit)
        return [(_event(r), r["last_error"] or "") for r in rows]

    async def requeue(self, event_ids: list[str]) -> int:
        async with self.pool.acquire() as conn:
            result = await conn.execute(
                """UPDATE sagaz_outbox
                   SET id = nextval(pg_get_serial_sequence('sagaz_outbox', 'id')),
                       status = 'pending', attempts = 0, available_at = now(),
                       last_error = NULL, lease_owner = NULL, lease_until = NULL
                   WHERE event_id = ANY($1::text[]) AND status = 'dead'""", event_ids)
        return int(result.split()[-1])


class PostgresSagaStore:
    """Saved after every applied transition, before its commands run (write-ahead).

    A claim is a row with status 'claimed' (unique per saga name and key) whose
    ``updated_at`` starts its lease; the first save turns it into the run's snapshot. A
    claim taken over gets the new run's id, so the old run's first save would insert a
    second row for the same (name, key): the unique constraint refuses it.
    """

    keeps_live_state = False

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def save(self, state: SagaState, context: RunData,
                   idempotency_key: str | None) -> None:
        import asyncpg

        async with self.pool.acquire() as conn:
            try:
                await conn.execute(
                    """INSERT INTO sagaz_sagas (saga_id, name, status, state, data, results,
                                                idempotency_key, updated_at)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, now())
                       ON CONFLICT (saga_id) DO UPDATE SET name = $2, status = $3, state = $4,
                           data = $5, results = $6, updated_at = now()""",
                    state.saga_id, state.name, state.status.value, state.to_dict(),
                    context.data, context.results, idempotency_key)
            except asyncpg.UniqueViolationError as exc:
                if idempotency_key is None or \
                        exc.constraint_name != "sagaz_sagas_name_idempotency_key_key":
                    raise
                owner = await conn.fetchval(
                    "SELECT saga_id FROM sagaz_sagas WHERE name = $1 AND idempotency_key = $2",
                    state.name, idempotency_key)
                raise SagaAlreadyRunning.taken_over(state.name, idempotency_key, str(owner),
                                                    state.saga_id) from None

    async def load(self, saga_id: str) -> SagaRecord | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM sagaz_sagas WHERE saga_id = $1 "
                                      "AND status <> 'claimed'", saga_id)
        return None if row is None else _record(row)

    async def claim(self, name: str, idempotency_key: str, saga_id: str, lease: float) -> str:
        # A placeholder row reserves the key; save() fills it in. A placeholder older than
        # its lease is taken over (a concurrent taker waits on the row lock, then sees it
        # fresh and leaves it).
        async with self.pool.acquire() as conn:
            owner = await conn.fetchval(
                """INSERT INTO sagaz_sagas (saga_id, name, status, state, data, results,
                                            idempotency_key, updated_at)
                   VALUES ($3, $1, 'claimed', '{}', '{}', '{}', $2, now())
                   ON CONFLICT (name, idempotency_key) DO UPDATE
                       SET saga_id = EXCLUDED.saga_id, updated_at = now()
                       WHERE sagaz_sagas.status = 'claimed'
                         AND sagaz_sagas.updated_at < now() - $4 * interval '1 second'
                   RETURNING saga_id""",
                name, idempotency_key, saga_id, lease)
            if owner is None:
                owner = await conn.fetchval(
                    "SELECT saga_id FROM sagaz_sagas WHERE name = $1 AND idempotency_key = $2",
                    name, idempotency_key)
        return str(owner)

    async def list(self, *, status: str | None = None, name: str | None = None,
                   limit: int = 100) -> list[SagaRecord]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT * FROM sagaz_sagas WHERE status <> 'claimed'
                   AND ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR name = $2)
                   ORDER BY updated_at DESC LIMIT $3""", status, name, limit)
        return [_record(r) for r in rows]


def _record(row: Any) -> SagaRecord:
    return SagaRecord(row["saga_id"], row["name"], row["state"], row["data"], row["results"],
                      row["idempotency_key"])


class PostgresInbox:
    """Participant replies in ``sagaz_inbox``, keyed by (service, command id)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def get(self, consumer: str, command_id: str) -> bytes | None:
        async with self.pool.acquire() as conn:
            result = await conn.fetchval(
                "SELECT result FROM sagaz_inbox WHERE consumer = $1 AND event_id = $2 "
                "AND event_type = 'sagaz-reply'", consumer, command_id)
        return None if result is None else orjson.dumps(result)

    async def put(self, consumer: str, command_id: str, reply: bytes) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO sagaz_inbox (consumer, event_id, source_topic, event_type,
                                            result)
                   VALUES ($1, $2, 'sagaz', 'sagaz-reply', $3::text::jsonb)
                   ON CONFLICT DO NOTHING""", consumer, command_id, reply.decode())


class PostgresStorage:
    """The pool must use ``init_connection`` (JSONB codec)."""

    def __init__(self, pool: Any, *, owns_pool: bool = False,
                 scan_window: int | None = None) -> None:
        self.pool, self._owns_pool = pool, owns_pool
        self.outbox = PostgresOutbox(pool, scan_window)
        self.sagas = PostgresSagaStore(pool)
        self.replies = PostgresInbox(pool)

    async def process_idempotent(self, consumer: str, event_id: str, source_topic: str,
                                 event_type: str, payload: Any, handler: Handler) -> Any:
        """The marker is inserted first, in the transaction the handler then works in: a
        racing duplicate waits on the key and, once the first commits, finds its marker;
        a handler that raises rolls the marker back with its own writes."""
        check_inbox_args(consumer, event_id, source_topic, event_type)
        async with self.pool.acquire() as conn, conn.transaction():
            fresh = await conn.fetchval(
                """INSERT INTO sagaz_inbox (consumer, event_id, source_topic, event_type)
                   VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING true""",
                consumer, event_id, source_topic, event_type)
            if not fresh:
                return await conn.fetchval("SELECT result FROM sagaz_inbox WHERE consumer = $1 "
                                           "AND event_id = $2", consumer, event_id)
            result = await handler(payload, conn)
            orjson.dumps(result)  # must be storable: fail (and roll back) now, not later
            await conn.execute("UPDATE sagaz_inbox SET result = $3 WHERE consumer = $1 "
                               "AND event_id = $2", consumer, event_id, result)
            return result

    async def seen(self, consumer: str, event_id: str) -> bool:
        async with self.pool.acquire() as conn:
            return bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM sagaz_inbox WHERE consumer = $1 "
                "AND event_id = $2)", consumer, event_id))

    async def close(self) -> None:
        if self._owns_pool:
            await self.pool.close()
