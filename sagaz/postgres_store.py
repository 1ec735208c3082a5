"""Saga snapshots on PostgreSQL, for the in-process engine: inspect and resume after a
restart. Saved after every applied transition, before its commands run (write-ahead)."""

from __future__ import annotations

from typing import Any

from sagaz.context import SagaContext
from sagaz.machine import SagaState
from sagaz.store import SagaRecord


class PostgresSagaStore:
    keeps_live_state = False

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def save(self, state: SagaState, context: SagaContext,
                   idempotency_key: str | None) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                """INSERT INTO sagaz_sagas (saga_id, name, status, state, data, results,
                                            idempotency_key, updated_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, now())
                   ON CONFLICT (saga_id) DO UPDATE SET name = $2, status = $3, state = $4,
                       data = $5, results = $6, updated_at = now()""",
                state.saga_id, state.name, state.status.value, state.to_dict(), context.data,
                context.results, idempotency_key)

    async def load(self, saga_id: str) -> SagaRecord | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM sagaz_sagas WHERE saga_id = $1 "
                                      "AND status <> 'claimed'", saga_id)
        return None if row is None else _record(row)

    async def claim(self, idempotency_key: str, saga_id: str) -> str:
        # A placeholder row reserves the key; save() fills it in.
        async with self.pool.acquire() as conn:
            owner = await conn.fetchval(
                """INSERT INTO sagaz_sagas (saga_id, name, status, state, data, results,
                                            idempotency_key)
                   VALUES ($2, '', 'claimed', '{}', '{}', '{}', $1)
                   ON CONFLICT (idempotency_key) DO NOTHING RETURNING saga_id""",
                idempotency_key, saga_id)
            if owner is None:
                owner = await conn.fetchval("SELECT saga_id FROM sagaz_sagas "
                                            "WHERE idempotency_key = $1", idempotency_key)
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
