"""Redis (redis-py asyncio) storage: saga snapshots for the engine, and a participant inbox.

Keys, under a configurable prefix (default ``sagaz``):
    {p}:saga:{id}       hash: name, status, state, data, results, key (JSON fields)
    {p}:sagas           sorted set of saga ids by last update, for listing
    {p}:idem:{key}      the saga id an idempotency key names (SET NX)
    {p}:inbox:{consumer}:{command id}   the recorded reply, with a TTL
A snapshot is written with MULTI/EXEC, so a reader never sees half of one.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from sagaz.context import SagaContext
from sagaz.machine import SagaState
from sagaz.store import SagaRecord


def _client(url_or_client: Any) -> Any:
    if isinstance(url_or_client, str):
        import redis.asyncio as redis

        return redis.from_url(url_or_client)
    return url_or_client


class RedisSagaStore:
    keeps_live_state = False

    def __init__(self, redis: Any, *, prefix: str = "sagaz") -> None:
        self.redis = _client(redis)
        self.prefix = prefix

    async def save(self, state: SagaState, context: SagaContext,
                   idempotency_key: str | None) -> None:
        p = self.prefix
        fields = {"name": state.name, "status": state.status.value,
                  "state": orjson.dumps(state.to_dict()), "data": orjson.dumps(context.data),
                  "results": orjson.dumps(context.results),
                  "key": idempotency_key or ""}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(f"{p}:saga:{state.saga_id}", mapping=fields)
            pipe.zadd(f"{p}:sagas", {state.saga_id: time.time()})
            await pipe.execute()

    async def load(self, saga_id: str) -> SagaRecord | None:
        raw = await self.redis.hgetall(f"{self.prefix}:saga:{saga_id}")
        if not raw:
            return None
        h = {k.decode(): v for k, v in raw.items()}
        return SagaRecord(saga_id, h["name"].decode(), orjson.loads(h["state"]),
                          orjson.loads(h["data"]), orjson.loads(h["results"]),
                          h["key"].decode() or None)

    async def claim(self, idempotency_key: str, saga_id: str) -> str:
        key = f"{self.prefix}:idem:{idempotency_key}"
        if await self.redis.set(key, saga_id, nx=True):
            return saga_id
        owner = await self.redis.get(key)
        return owner.decode() if owner else saga_id

    async def list(self, *, status: str | None = None, name: str | None = None,
                   limit: int = 100) -> list[SagaRecord]:
        out: list[SagaRecord] = []
        start = 0
        while len(out) < limit:
            ids = await self.redis.zrevrange(f"{self.prefix}:sagas", start, start + 199)
            if not ids:
                break
            start += len(ids)
            for sid in ids:
                record = await self.load(sid.decode())
                if record is None:
                    continue
                if (status is None or record.status == status) and (
                        name is None or record.name == name):
                    out.append(record)
                    if len(out) >= limit:
                        break
        return out


class RedisInbox:
    """Participant inbox on Redis: replies survive a participant restart (for ``ttl``)."""

    def __init__(self, redis: Any, *, prefix: str = "sagaz", ttl: float = 7 * 86400) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl!r}")
        self.redis = _client(redis)
        self.prefix, self.ttl = prefix, ttl

    async def get(self, consumer: str, command_id: str) -> bytes | None:
        value = await self.redis.get(f"{self.prefix}:inbox:{consumer}:{command_id}")
        return bytes(value) if value is not None else None

    async def put(self, consumer: str, command_id: str, reply: bytes) -> None:
        await self.redis.set(f"{self.prefix}:inbox:{consumer}:{command_id}", reply,
                             px=int(self.ttl * 1000))
