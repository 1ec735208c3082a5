"""Versioned, idempotent SQL migrations for PostgreSQL (`sagaz db migrate`).

Each migration runs in its own transaction and is recorded in sagaz_schema_migrations; an
advisory lock serialises concurrent migrators (several pods starting at once).
"""

from __future__ import annotations

from typing import Any

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "outbox, inbox and saga snapshots", """
CREATE TABLE sagaz_outbox (
    id            BIGSERIAL PRIMARY KEY,
    event_id      TEXT NOT NULL UNIQUE,
    aggregate_id  TEXT NOT NULL,
    topic         TEXT NOT NULL,
    event_type    TEXT NOT NULL,
    payload       JSONB NOT NULL,
    headers       JSONB NOT NULL DEFAULT '{}',
    status        TEXT NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'sent', 'dead')),
    attempts      INT NOT NULL DEFAULT 0,
    available_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_owner   TEXT,
    lease_until   TIMESTAMPTZ,
    last_error    TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at       TIMESTAMPTZ
);
CREATE INDEX sagaz_outbox_pending ON sagaz_outbox (id) WHERE status = 'pending';
CREATE INDEX sagaz_outbox_pending_aggregate ON sagaz_outbox (aggregate_id, id)
    WHERE status = 'pending';
CREATE INDEX sagaz_outbox_sent ON sagaz_outbox (sent_at) WHERE status = 'sent';

CREATE TABLE sagaz_inbox (
    consumer      TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    source_topic  TEXT NOT NULL,
    event_type    TEXT NOT NULL,
    result        JSONB,
    processed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

CREATE TABLE sagaz_sagas (
    saga_id          TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    status           TEXT NOT NULL,
    state            JSONB NOT NULL,
    data             JSONB NOT NULL,
    results          JSONB NOT NULL,
    idempotency_key  TEXT UNIQUE,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX sagaz_sagas_status ON sagaz_sagas (status, updated_at);
"""),
    (2, "dead outbox events: a partial index for listing and counting them", """
CREATE INDEX sagaz_outbox_dead ON sagaz_outbox (id) WHERE status = 'dead';
"""),
    # Runs of different sagas may share a key (an order id): a key names one run per saga.
    # Claims of version 2 carried no saga name ('' until the first snapshot filled it in);
    # a claim still nameless never got its snapshot, and nothing could find it now.
    (3, "engine idempotency keys scoped by saga name", """
DELETE FROM sagaz_sagas WHERE status = 'claimed' AND name = '';
ALTER TABLE sagaz_sagas DROP CONSTRAINT sagaz_sagas_idempotency_key_key;
ALTER TABLE sagaz_sagas ADD CONSTRAINT sagaz_sagas_name_idempotency_key_key
    UNIQUE (name, idempotency_key);
"""),
]

_LOCK = 0x5A6A2  # pg_advisory_lock key for migrations


async def migrate(conn: Any) -> list[int]:
    """Apply the migrations this database lacks; return the versions applied."""
    applied: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK)
    try:
        await conn.execute("""CREATE TABLE IF NOT EXISTS sagaz_schema_migrations (
            version INT PRIMARY KEY, name TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now())""")
        done = {r["version"] for r in await conn.fetch(
            "SELECT version FROM sagaz_schema_migrations")}
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO sagaz_schema_migrations (version, name) "
                                   "VALUES ($1, $2)", version, name)
            applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)
    return applied
