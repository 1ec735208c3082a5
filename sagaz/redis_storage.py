"""Redis ``Storage`` (redis-py asyncio): outbox, consumer-inbox markers, saga snapshots,
and a participant inbox.

The caller's transaction is a MULTI/EXEC pipeline; the outbox queues its write there, so
the event is applied with the business change or not at all:

    async with redis.pipeline(transaction=True) as tx:
        tx.multi()
        tx.hset("order:1", "paid", 1)
        await storage.outbox.insert(tx, aggregate_id="order-1", topic="orders",
                                 event_type="OrderPaid", payload={...})
        await tx.execute()

MULTI/EXEC applies the other commands when one of them fails, so nothing may fail inside
it: ``insert`` with a caller-given ``event_id`` refuses a taken id before EXEC
(``OutboxError``, also for the same id twice in one pipeline) and WATCHes it on the
pipeline's connection, so a transaction that adds it meanwhile makes our EXEC fail whole
(``WatchError``): a duplicate event id never applies the business writes without the event.
A fresh id (uuid4) needs no check.

Keys, under a configurable prefix ``{p}`` (default ``sagaz``; one Redis node, not a cluster:
the outbox scripts touch keys of many aggregates):
    {p}:ob:ev:{event id}  hash: the event, status, attempts, due (ms), last error
    {p}:ob:q:{aggregate}  list: the aggregate's pending event ids, oldest first
    {p}:ob:ready          zset: aggregates free to claim, scored by their head's due time
    {p}:ob:leased         zset: claimed aggregates, scored by lease expiry
    {p}:ob:owner          hash: claimed aggregate -> worker id
    {p}:ob:held:{worker}  set: the aggregates a worker holds
    {p}:ob:sent, :dead    zsets of event ids (sent time / order of death)
    {p}:saga:{id}         hash: name, status, state, data, results, key (JSON fields)
    {p}:sagas             zset of saga ids by last update, for listing
    {p}:sagakey:{len(name)}:{name}:{key}
                          the saga id an idempotency key names for saga {name}: with a TTL
                          (the claim lease) until the run's first snapshot, then for good
    {p}:idem:{key}        the same, as versions before the name scoping wrote it: read
                          (and copied to the key above) when it names a run of that saga
    {p}:cinbox:{consumer}:{event id}     consumer-inbox marker with the handler's result
    {p}:inbox:{consumer}:{command id}    participant inbox reply, with a TTL
Every outbox transition is one Lua script (atomic; Redis' clock), so an aggregate is in
exactly one of ready / leased / neither (empty queue), and only its queue's head decides
when it may be claimed.
"""

from __future__ import annotations

import time
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


def _client(url_or_client: Any) -> Any:
    if isinstance(url_or_client, str):
        import redis.asyncio as redis

        from sagaz.errors import mask_url, safe_cause, url_for_error

        try:
            return redis.from_url(url_or_client)
        except ValueError as exc:  # redis-py's parser: a bad port, scheme, db number
            raise ValueError(f"invalid Redis URL {url_for_error(url_or_client)}: "
                             f"{mask_url(str(exc))}") from safe_cause(exc)
    return url_or_client


# Shared Lua helpers: now in ms from Redis' clock; put an aggregate back in `ready` (or
# take it out) according to its queue's head; take an event out of its queue.
_LIB = """
local p = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function refresh(agg)
  local head = redis.call('LINDEX', p .. ':ob:q:' .. agg, 0)
  if head then
    redis.call('ZADD', p .. ':ob:ready', redis.call('HGET', p .. ':ob:ev:' .. head, 'due'), agg)
  else
    redis.call('ZREM', p .. ':ob:ready', agg)
  end
end
local function free(agg)
  local owner = redis.call('HGET', p .. ':ob:owner', agg)
  if owner then redis.call('SREM', p .. ':ob:held:' .. owner, agg) end
  redis.call('HDEL', p .. ':ob:owner', agg)
  redis.call('ZREM', p .. ':ob:leased', agg)
  refresh(agg)
end
local function leave(id, status, now)
  local ev = p .. ':ob:ev:' .. id
  local agg = redis.call('HGET', ev, 'aggregate_id')
  redis.call('HSET', ev, 'status', status)
  redis.call('LREM', p .. ':ob:q:' .. agg, 1, id)
  redis.call('DECR', p .. ':ob:npending')
  if status == 'sent' then
    redis.call('HINCRBY', ev, 'attempts', 1)
    redis.call('HSET', ev, 'sent_at', now)
    redis.call('ZADD', p .. ':ob:sent', now, id)
  else
    redis.call('ZADD', p .. ':ob:dead', redis.call('INCR', p .. ':ob:seq'), id)
  end
  return agg
end
"""

# ARGV: prefix, event id, aggregate, topic, type, payload, headers, delay ms
_ADD = _LIB + """
local id, agg = ARGV[2], ARGV[3]
local ev = p .. ':ob:ev:' .. id
if redis.call('EXISTS', ev) == 1 then
  return redis.error_reply('event_id ' .. id .. ' is already in the outbox')
end
local due = now_ms() + tonumber(ARGV[8])
redis.call('HSET', ev, 'aggregate_id', agg, 'topic', ARGV[4], 'event_type', ARGV[5],
           'payload', ARGV[6], 'headers', ARGV[7], 'attempts', 0, 'due', due,
           'status', 'pending', 'last_error', '')
redis.call('INCR', p .. ':ob:npending')
if redis.call('RPUSH', p .. ':ob:q:' .. agg, id) == 1
   and redis.call('HEXISTS', p .. ':ob:owner', agg) == 0 then
  redis.call('ZADD', p .. ':ob:ready', due, agg)
end
return 1
"""

# ARGV: prefix, worker, limit, lease ms
_CLAIM = _LIB + """
local worker, limit, lease = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
for _, agg in ipairs(redis.call('ZRANGEBYSCORE', p .. ':ob:leased', '-inf', '(' .. now)) do
  free(agg)  -- the owner died or stalled: its events go back to whoever claims next
end
-- Ours from a batch that broke off (a worker claims one batch at a time): free to this
-- claim, as to no other; what it does not take stays ours until that lease runs out.
local own, expiry = redis.call('SMEMBERS', p .. ':ob:held:' .. worker), {}
for _, agg in ipairs(own) do
  expiry[agg] = redis.call('ZSCORE', p .. ':ob:leased', agg)
  free(agg)
end
local out = {}
for _, agg in ipairs(redis.call('ZRANGEBYSCORE', p .. ':ob:ready', '-inf', now,
                                'LIMIT', 0, limit)) do
  if #out >= limit then break end
  local taken = 0
  for _, id in ipairs(redis.call('LRANGE', p .. ':ob:q:' .. agg, 0, limit - #out - 1)) do
    local f = redis.call('HMGET', p .. ':ob:ev:' .. id, 'topic', 'event_type', 'payload',
                         'headers', 'attempts', 'due')
    if tonumber(f[6]) > now then break end
    out[#out + 1] = {id, agg, f[1], f[2], f[3], f[4], f[5]}
    taken = taken + 1
  end
  if taken > 0 then
    redis.call('ZREM', p .. ':ob:ready', agg)
    redis.call('ZADD', p .. ':ob:leased', now + lease, agg)
    redis.call('HSET', p .. ':ob:owner', agg, worker)
    redis.call('SADD', p .. ':ob:held:' .. worker, agg)
  end
end
for _, agg in ipairs(own) do
  if redis.call('HEXISTS', p .. ':ob:owner', agg) == 0
     and redis.call('LLEN', p .. ':ob:q:' .. agg) > 0 then
    redis.call('ZREM', p .. ':ob:ready', agg)
    redis.call('ZADD', p .. ':ob:leased', expiry[agg], agg)
    redis.call('HSET', p .. ':ob:owner', agg, worker)
    redis.call('SADD', p .. ':ob:held:' .. worker, agg)
  end
end
return out
"""

# ARGV: prefix, worker, lease ms, aggregates...
_RENEW = _LIB + """
local expiry = now_ms() + tonumber(ARGV[3])
for i = 4, #ARGV do
  if redis.call('HGET', p .. ':ob:owner', ARGV[i]) == ARGV[2] then
    redis.call('ZADD', p .. ':ob:leased', expiry, ARGV[i])
  end
end
"""

# ARGV: prefix, JSON {worker, sent: [ids], failed: [[id, error]], aggs, max_attempts, base, cap}
_SETTLE = _LIB + """
local a = cjson.decode(ARGV[2])
local now = now_ms()
for _, id in ipairs(a.sent) do
  if redis.call('HGET', p .. ':ob:ev:' .. id, 'status') == 'pending' then
    leave(id, 'sent', now)
  end
end
for _, f in ipairs(a.failed) do
  local ev = p .. ':ob:ev:' .. f[1]
  local agg = redis.call('HGET', ev, 'aggregate_id')
  -- counted once: by the holder (a settle repeated after a lost reply finds it freed)
  if redis.call('HGET', ev, 'status') == 'pending'
     and redis.call('HGET', p .. ':ob:owner', agg) == a.worker then
    local attempts = tonumber(redis.call('HGET', ev, 'attempts'))
    redis.call('HSET', ev, 'attempts', attempts + 1, 'last_error', f[2])
    if attempts + 1 >= a.max_attempts then
      leave(f[1], 'dead', now)
    else
      local delay = math.min(a.cap, a.base * math.pow(2, math.min(attempts, 62)))
      redis.call('HSET', ev, 'due', now + math.floor(delay))
    end
  end
end
for _, agg in ipairs(a.aggs) do
  local owner = redis.call('HGET', p .. ':ob:owner', agg)
  if not owner or owner == a.worker then free(agg) end
end
"""

# ARGV: prefix, event id
_MARK_SENT = _LIB + """
local ev = p .. ':ob:ev:' .. ARGV[2]
if redis.call('HGET', ev, 'status') == 'pending' then
  local agg = leave(ARGV[2], 'sent', now_ms())
  if redis.call('HEXISTS', p .. ':ob:owner', agg) == 0 then refresh(agg) end
end
"""

# ARGV: prefix, event ids...
_REQUEUE = _LIB + """
local now, n = now_ms(), 0
for i = 2, #ARGV do
  local id = ARGV[i]
  local ev = p .. ':ob:ev:' .. id
  if redis.call('HGET', ev, 'status') == 'dead' then
    local agg = redis.call('HGET', ev, 'aggregate_id')
    redis.call('ZREM', p .. ':ob:dead', id)
    redis.call('HSET', ev, 'status', 'pending', 'attempts', 0, 'due', now, 'last_error', '')
    redis.call('INCR', p .. ':ob:npending')
    if redis.call('RPUSH', p .. ':ob:q:' .. agg, id) == 1
       and redis.call('HEXISTS', p .. ':ob:owner', agg) == 0 then
      redis.call('ZADD', p .. ':ob:ready', now, agg)
    end
    n = n + 1
  end
end
return n
"""

# ARGV: prefix, cutoff ms, max
_PRUNE = _LIB + """
local ids = redis.call('ZRANGEBYSCORE', p .. ':ob:sent', '-inf', '(' .. ARGV[2],
                       'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('DEL', p .. ':ob:ev:' .. id)
  redis.call('ZREM', p .. ':ob:sent', id)
end
return #ids
"""


class RedisOutbox:
    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis, self.prefix = redis, prefix
        self._claim = redis.register_script(_CLAIM)
        self._renew = redis.register_script(_RENEW)
        self._settle = redis.register_script(_SETTLE)
        self._mark_sent = redis.register_script(_MARK_SENT)
        self._requeue = redis.register_script(_REQUEUE)
        self._prune = redis.register_script(_PRUNE)

    async def insert(self, tx: Any, *, aggregate_id: str, topic: str, event_type: str,
                     payload: Any, headers: dict[str, str] | None = None,
                     event_id: str | None = None, delay: float = 0.0) -> OutboxEvent:
        given_id = event_id is not None  # a fresh one (a uuid4) cannot be taken
        raw, headers, event_id = prepare_event(aggregate_id, topic, event_type, payload,
                                               headers, event_id, delay)
        if not getattr(tx, "explicit_transaction", False):
            raise OutboxError("insert needs the caller's MULTI/EXEC pipeline (after "
                              "pipe.multi()), so the event is applied with the business change")
        if given_id:
            await self._refuse_duplicate(tx, event_id)
        # EVAL, not EVALSHA: inside MULTI a missing script would fail alone, after the
        # business writes were applied.
        tx.eval(_ADD, 0, self.prefix, event_id, aggregate_id, topic, event_type, raw,
                orjson.dumps(headers), int(delay * 1000))
        return OutboxEvent(event_id, event_id, aggregate_id, topic, event_type,
                           orjson.loads(raw), headers)

    async def _refuse_duplicate(self, tx: Any, event_id: str) -> None:
        """Refuse a given event id that is taken, before EXEC: a command that fails inside
        MULTI/EXEC does not undo the others, so the business writes would apply without
        the event. The id is WATCHed on the pipeline's connection first (redis-py keeps
        the queued commands client-side until ``execute()``), so a transaction that adds
        it between now and our EXEC makes our EXEC fail whole (``WatchError``)."""
        key = f"{self.prefix}:ob:ev:{event_id}"
        await tx.immediate_execute_command("WATCH", key)  # the pipeline UNWATCHes on reset
        queued = any(args[:2] == ("EVAL", _ADD) and args[3:5] == (self.prefix, event_id)
                     for args, _ in getattr(tx, "command_stack", ()))
        if queued or await tx.immediate_execute_command("EXISTS", key):
            raise OutboxError(f"event_id {event_id!r} is already in the outbox")

    async def claim(self, worker_id: str, limit: int, lease: float) -> list[OutboxEvent]:
        rows = await self._claim(args=[self.prefix, worker_id, limit, int(lease * 1000)])
        return [OutboxEvent(r[0].decode(), r[0].decode(), r[1].decode(), r[2].decode(),
                            r[3].decode(), orjson.loads(r[4]), orjson.loads(r[5]), int(r[6]))
                for r in rows]

    async def renew(self, worker_id: str, events: list[OutboxEvent], lease: float) -> None:
        aggs = sorted({e.aggregate_id for e in events})
        await self._renew(args=[self.prefix, worker_id, int(lease * 1000), *aggs])

    async def settle(self, worker_id: str, sent: list[OutboxEvent],
                     failed: list[tuple[OutboxEvent, str]], released: list[OutboxEvent],
                     backoff: Backoff) -> None:
        aggs = sorted({e.aggregate_id for e in [*sent, *released, *(e for e, _ in failed)]})
        arg = {"worker": worker_id, "sent": [e.event_id for e in sent],
               "failed": [[e.event_id, err] for e, err in failed], "aggs": aggs,
               "max_attempts": backoff.max_attempts, "base": backoff.base * 1000,
               "cap": backoff.cap * 1000}
        await self._settle(args=[self.prefix, orjson.dumps(arg)])

    async def is_next(self, event: OutboxEvent) -> bool:
        head = await self.redis.lindex(f"{self.prefix}:ob:q:{event.aggregate_id}", 0)
        return head is not None and head.decode() == event.event_id

    async def mark_sent(self, event: OutboxEvent) -> None:
        await self._mark_sent(args=[self.prefix, event.event_id])

    async def prune(self, older_than: float) -> int:
        cutoff = int((time.time() - older_than) * 1000)
        total = 0
        while True:
            n = int(await self._prune(args=[self.prefix, cutoff, 1000]))
            total += n
            if n < 1000:
                return total

    async def counts(self) -> dict[str, int]:
        p = self.prefix
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(f"{p}:ob:npending")
            pipe.zcard(f"{p}:ob:sent")
            pipe.zcard(f"{p}:ob:dead")
            pending, sent, dead = await pipe.execute()
        return {"pending": int(pending or 0), "sent": int(sent), "dead": int(dead)}

    async def oldest_pending_age(self) -> float:
        # Aggregates free to claim are scored by their head's due time (ms, Redis' clock).
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrange(f"{self.prefix}:ob:ready", 0, 0, withscores=True)
            pipe.time()
            head, (seconds, micros) = await pipe.execute()
        if not head:
            return 0.0
        return max(0.0, seconds + micros / 1e6 - float(head[0][1]) / 1000)

    async def dead(self, limit: int = 100) -> list[tuple[OutboxEvent, str]]:
        out = []
        for raw_id in await self.redis.zrange(f"{self.prefix}:ob:dead", 0, limit - 1):
            event_id = raw_id.decode()
            f = await self.redis.hmget(f"{self.prefix}:ob:ev:{event_id}", "aggregate_id",
                                       "topic", "event_type", "payload", "headers",
                                       "attempts", "last_error")
            out.append((OutboxEvent(event_id, event_id, f[0].decode(), f[1].decode(),
                                    f[2].decode(), orjson.loads(f[3]), orjson.loads(f[4]),
                                    int(f[5])), f[6].decode()))
        return out

    async def requeue(self, event_ids: list[str]) -> int:
        return int(await self._requeue(args=[self.prefix, *event_ids])) if event_ids else 0


# A claim: the key's current run, else a legacy key naming a run of this saga, else ours
# with the lease as TTL (a claim whose run died before its first snapshot expires).
# ARGV: claim key, legacy key, saga hash prefix, name, saga id, lease ms
_SAGA_CLAIM = """
local owner = redis.call('GET', ARGV[1])
if owner then return owner end
local old = redis.call('GET', ARGV[2])
if old and redis.call('HGET', ARGV[3] .. old, 'name') == ARGV[4] then
  redis.call('SET', ARGV[1], old)
  return old
end
redis.call('SET', ARGV[1], ARGV[5], 'PX', ARGV[6])
return ARGV[5]
"""

# A snapshot, atomic; with a key, only while the key names this run (then for good).
# ARGV: saga hash, sagas zset, claim key or '', saga id, score, then field/value pairs
_SAGA_SAVE = """
if ARGV[3] ~= '' then
  local owner = redis.call('GET', ARGV[3])
  if owner and owner ~= ARGV[4] then return owner end
  if not owner or redis.call('PTTL', ARGV[3]) >= 0 then redis.call('SET', ARGV[3], ARGV[4]) end
end
redis.call('HSET', ARGV[1], unpack(ARGV, 6))
redis.call('ZADD', ARGV[2], ARGV[5], ARGV[4])
return false
"""


class RedisSagaStore:
    """A snapshot is written by one script, so a reader never sees half of one."""

    keeps_live_state = False

    def __init__(self, redis: Any, *, prefix: str = "sagaz") -> None:
        self.redis = _client(redis)
        self.prefix = prefix
        self._claim = self.redis.register_script(_SAGA_CLAIM)
        self._save = self.redis.register_script(_SAGA_SAVE)

    def _key(self, name: str, idempotency_key: str) -> str:
        return f"{self.prefix}:sagakey:{len(name)}:{name}:{idempotency_key}"

    async def save(self, state: SagaState, context: RunData,
                   idempotency_key: str | None) -> None:
        p, sid = self.prefix, state.saga_id
        fields = ["name", state.name, "status", state.status.value,
                  "state", orjson.dumps(state.to_dict()), "data", orjson.dumps(context.data),
                  "results", orjson.dumps(context.results), "key", idempotency_key or ""]
        claim = "" if idempotency_key is None else self._key(state.name, idempotency_key)
        owner = await self._save(args=[f"{p}:saga:{sid}", f"{p}:sagas", claim, sid,
                                       time.time(), *fields])
        if owner is not None:
            assert idempotency_key is not None
            raise SagaAlreadyRunning.taken_over(state.name, idempotency_key, owner.decode(),
                                                sid)

    async def load(self, saga_id: str) -> SagaRecord | None:
        raw = await self.redis.hgetall(f"{self.prefix}:saga:{saga_id}")
        if not raw:
            return None
        h = {k.decode(): v for k, v in raw.items()}
        return SagaRecord(saga_id, h["name"].decode(), orjson.loads(h["state"]),
                          orjson.loads(h["data"]), orjson.loads(h["results"]),
                          h["key"].decode() or None)

    async def claim(self, name: str, idempotency_key: str, saga_id: str, lease: float) -> str:
        owner = await self._claim(args=[
            self._key(name, idempotency_key), f"{self.prefix}:idem:{idempotency_key}",
            f"{self.prefix}:saga:", name, saga_id, max(1, round(lease * 1000))])
        return str(owner.decode())

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
                             px=int(self.ttl * 1000), nx=True)  # the first reply stands


class RedisStorage:
    def __init__(self, redis: Any, *, prefix: str = "sagaz",
                 inbox_ttl: float | None = None) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
        if inbox_ttl is not None and (isinstance(inbox_ttl, bool) or inbox_ttl <= 0):
            raise ValueError(f"inbox_ttl must be > 0 seconds or None, got {inbox_ttl!r}")
        self._owns_client = isinstance(redis, str)
        self.redis = _client(redis)
        self.prefix, self.inbox_ttl = prefix, inbox_ttl
        self.outbox = RedisOutbox(self.redis, prefix)
        self.sagas = RedisSagaStore(self.redis, prefix=prefix)
        self.replies = RedisInbox(self.redis, prefix=prefix)

    def _marker(self, consumer: str, event_id: str) -> str:
        return f"{self.prefix}:cinbox:{consumer}:{event_id}"

    async def process_idempotent(self, consumer: str, event_id: str, source_topic: str,
                                 event_type: str, payload: Any, handler: Handler) -> Any:
        """``tx`` is a MULTI/EXEC pipeline: the handler queues its own writes (and outbox
        events) on it and the marker is queued after them, so they commit together or not
        at all. The marker key is WATCHed first: if a racing delivery commits first, EXEC
        fails, nothing of ours is applied, and the first result is returned. So racing
        duplicates may *run* the handler, but only one commits: its effects must go through
        ``tx``. A handler that raises leaves no marker."""
        from redis.exceptions import WatchError

        check_inbox_args(consumer, event_id, source_topic, event_type)
        key = self._marker(consumer, event_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            seen = await pipe.get(key)
            if seen is not None:
                return orjson.loads(seen)["result"]
            pipe.multi()
            result = await handler(payload, pipe)
            marker = orjson.dumps({"result": result, "source_topic": source_topic,
                                   "event_type": event_type})
            if self.inbox_ttl is None:
                pipe.set(key, marker)
            else:
                pipe.set(key, marker, px=int(self.inbox_ttl * 1000))
            try:
                await pipe.execute()
                return result
            except WatchError:
                first = await self.redis.get(key)
                if first is None:  # another watched key changed (an outbox event id)
                    raise
        return orjson.loads(first)["result"]  # a racing delivery committed first: it stands

    async def seen(self, consumer: str, event_id: str) -> bool:
        return bool(await self.redis.exists(self._marker(consumer, event_id)))

    async def close(self) -> None:
        if self._owns_client:
            await self.redis.aclose()
