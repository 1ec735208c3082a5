"""One contract for every Storage backend: PostgreSQL and Redis (real servers) and memory.

Outbox events, consumer-inbox markers and saga snapshots behave the same on each; where
a backend cannot (memory has no transactions) the test says so.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from sagaz import Engine, Saga, SagaAlreadyRunning
from sagaz.brokers import KafkaBroker, MemoryBroker
from sagaz.consumer_inbox import ConsumerInbox
from sagaz.memory_storage import MemoryStorage
from sagaz.outbox import OptimisticPublisher, OutboxWorker
from sagaz.storage import Backoff, OutboxError, Storage, open_storage
from sagaz.topics import ensure_topics
from tests.store_contract import crash_then_resume

BACKENDS = ["postgres", "redis", "memory"]


@pytest.fixture(params=BACKENDS)
async def storage(request: Any) -> AsyncIterator[Storage]:
    if request.param == "postgres":
        from sagaz.postgres_storage import PostgresStorage
        from tests.conftest import fresh_pg_pool

        async with fresh_pg_pool(request.getfixturevalue("postgres_url")) as pool:
            yield PostgresStorage(pool)
        return
    if request.param == "redis":
        from sagaz.redis_storage import RedisStorage

        store: Any = RedisStorage(request.getfixturevalue("redis_url"),
                                  prefix=f"t{uuid.uuid4().hex[:8]}")
    else:
        store = MemoryStorage()
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def transaction(storage: Any) -> AsyncIterator[Any]:
    """The backend's business transaction: commits on exit, rolls back on an exception."""
    if hasattr(storage, "pool"):
        async with storage.pool.acquire() as conn, conn.transaction():
            yield conn
    elif hasattr(storage, "redis"):
        async with storage.redis.pipeline(transaction=True) as pipe:
            pipe.multi()
            yield pipe
            await pipe.execute()
    else:
        yield None


async def add(storage: Storage, tx: Any, aggregate: str, n: int, **kw: Any) -> Any:
    return await storage.outbox.insert(tx, aggregate_id=aggregate, topic=kw.pop("topic", "t"),
                                    event_type=kw.pop("event_type", "Counted"),
                                    payload={"n": n}, **kw)


async def fill(storage: Storage, n: int, aggregates: int, **kw: Any) -> None:
    async with transaction(storage) as tx:
        for i in range(n):
            await add(storage, tx, f"agg-{i % aggregates}", i, **kw)


async def test_an_event_commits_or_rolls_back_with_the_business_change(
        storage: Storage) -> None:
    async with transaction(storage) as tx:
        event = await add(storage, tx, "o1", 1, headers={"tenant": "acme"})
    assert event.payload == {"n": 1} and event.headers == {"tenant": "acme"}
    assert await storage.outbox.counts() == {"pending": 1, "sent": 0, "dead": 0}
    if isinstance(storage, MemoryStorage):
        return  # no transactions in memory: nothing to roll back
    with pytest.raises(RuntimeError, match="business failure"):
        async with transaction(storage) as tx:
            await add(storage, tx, "o2", 2)
            raise RuntimeError("business failure")
    assert (await storage.outbox.counts())["pending"] == 1
    with pytest.raises(OutboxError, match="needs the caller's"):
        await add(storage, None, "o3", 3)
    with pytest.raises(OutboxError, match="needs the caller's"):  # a pool, a client
        await add(storage, getattr(storage, "pool", None) or storage.redis, "o4", 4)


@pytest.mark.parametrize(("kw", "error"), [
    ({"aggregate_id": ""}, "aggregate_id must be a non-empty str"),
    ({"topic": 5}, "topic must be a non-empty str"),
    ({"payload": {"when": {1, 2}}}, "payload of 'E' is not JSON-serialisable"),
    ({"headers": {"n": 1}}, "headers must map str to str"),
    ({"delay": -1}, "delay must be a number of seconds >= 0"),
    ({"event_id": ""}, "event_id must be a non-empty str or None"),
])
async def test_malformed_events_are_rejected_at_insert(storage: Storage, kw: dict[str, Any],
                                                    error: str) -> None:
    args: dict[str, Any] = {"aggregate_id": "a", "topic": "t", "event_type": "E",
                            "payload": {}, **kw}
    async with transaction(storage) as tx:
        with pytest.raises(OutboxError, match=error):
            await storage.outbox.insert(tx, **args)
    assert (await storage.outbox.counts())["pending"] == 0


async def test_claims_hand_each_aggregate_to_one_worker_oldest_events_first(
        storage: Storage) -> None:
    await fill(storage, 60, aggregates=6)  # interleaved: agg-0 has 0, 6, 12, ...
    expected = {f"agg-{k}": list(range(k, 60, 6)) for k in range(6)}

    def per_aggregate(batch: list[Any]) -> dict[str, list[int]]:
        per: dict[str, list[int]] = {}
        for e in batch:
            per.setdefault(e.aggregate_id, []).append(e.payload["n"])
        return per

    outbox = storage.outbox
    a = await outbox.claim("A", 5, 30)
    b = await outbox.claim("B", 5, 30)
    # The second worker gets other aggregates at once (a claim by id window would give it
    # nothing: every window holds an earlier event of an aggregate the first one holds).
    assert len(a) == len(b) == 5
    assert not per_aggregate(a).keys() & per_aggregate(b).keys()
    for batch in (a, b):  # a prefix of each aggregate's queue, in order
        for agg, ns in per_aggregate(batch).items():
            assert ns == expected[agg][:len(ns)], agg
    rest = await outbox.claim("C", 100, 30)
    assert len(rest) == 40  # the four other aggregates, whole; not the rest of A's or B's
    assert not per_aggregate(rest).keys() & (per_aggregate(a).keys() | per_aggregate(b).keys())
    # A settles: its aggregates go to the next claim, from where A left off.
    await outbox.settle("A", a, [], [], Backoff())
    again = per_aggregate(await outbox.claim("D", 100, 30))
    done = per_aggregate(a)
    assert again.keys() == done.keys()
    for agg, ns in again.items():
        assert ns == expected[agg][len(done[agg]):], agg


async def test_two_workers_publish_interleaved_aggregates_once_in_order_both_working(
        storage: Storage) -> None:
    await fill(storage, 3000, aggregates=60)
    broker = MemoryBroker()
    workers = [OutboxWorker(storage.outbox, broker, batch_size=50, poll_interval=0.01)
               for _ in range(2)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        async with asyncio.timeout(60):
            while (await storage.outbox.counts())["pending"]:
                await asyncio.sleep(0.05)
    finally:
        for w in workers:
            await w.stop()
        await asyncio.gather(*tasks)
    published = broker.topics["t"]
    assert len(published) == 3000 == sum(w.published for w in workers)
    per: dict[str, list[int]] = {}
    for key, value, _ in published:
        per.setdefault(key, []).append(orjson.loads(value)["n"])
    assert all(ns == sorted(ns) and len(ns) == 50 for ns in per.values())
    assert all(w.published > 0 for w in workers), [w.published for w in workers]


async def test_a_dead_workers_lease_expires_and_its_events_are_taken_over(
        storage: Storage) -> None:
    await fill(storage, 10, aggregates=2)
    outbox = storage.outbox
    crashed = await outbox.claim("crashed", 100, 0.4)
    assert len(crashed) == 10
    assert await outbox.claim("B", 100, 30) == []  # leased: hands off
    await outbox.renew("B", crashed, 30)  # renewing someone else's lease does nothing
    await asyncio.sleep(0.6)
    taken = await outbox.claim("B", 100, 30)
    assert sorted(e.event_id for e in taken) == sorted(e.event_id for e in crashed)
    await outbox.renew("crashed", crashed, 30)  # too late: no longer the owner
    await outbox.settle("B", taken, [], [], Backoff())
    await outbox.settle("crashed", crashed, [], [], Backoff())  # a late settle changes nothing
    assert await outbox.counts() == {"pending": 0, "sent": 10, "dead": 0}


async def test_failing_events_back_off_go_dead_with_their_error_and_can_be_requeued(
        storage: Storage, kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}-dead"
    await ensure_topics(kafka_bootstrap, {topic: 1})
    # a real client that refuses a message larger than its max_request_size
    small = KafkaBroker(kafka_bootstrap, max_request_size=256)
    await small.start()
    async with transaction(storage) as tx:
        big = await storage.outbox.insert(tx, aggregate_id="a", topic=topic, event_type="Big",
                                       payload={"blob": "x" * 400})
        await storage.outbox.insert(tx, aggregate_id="a", topic=topic, event_type="Next",
                                 payload={})
        await storage.outbox.insert(tx, aggregate_id="b", topic=topic, event_type="Other",
                                 payload={})
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    worker = OutboxWorker(storage.outbox, small, max_attempts=3, backoff=0.2,
                          max_backoff=0.4, registry=registry)
    try:
        assert await worker.run_once() == 3  # Big fails, Next is released, Other goes out
        assert await storage.outbox.counts() == {"pending": 2, "sent": 1, "dead": 0}
        assert await worker.run_once() == 0  # Big backs off; Next waits behind it
        async with asyncio.timeout(20):
            while not await storage.outbox.dead():
                await worker.run_once()
                await asyncio.sleep(0.05)
        [(event, error)] = await storage.outbox.dead()
        assert event.event_id == big.event_id and event.attempts == 3
        assert "MessageSizeTooLarge" in error
        assert await worker.run_once() == 1  # a dead event no longer holds its aggregate
        assert await storage.outbox.counts() == {"pending": 0, "sent": 2, "dead": 1}
        assert {name: registry.get_sample_value(f"outbox_{name}_total") for name in
                ("published_events", "publish_failures", "dead_letter_events")} == \
            {"published_events": 2, "publish_failures": 3, "dead_letter_events": 1}
    finally:
        await small.stop()
    # the operator raises the limit and requeues it
    broker = KafkaBroker(kafka_bootstrap)
    await broker.start()
    try:
        assert await storage.outbox.requeue([big.event_id, "no-such-event"]) == 1
        assert await OutboxWorker(storage.outbox, broker).run_once() == 1
    finally:
        await broker.stop()
    assert await storage.outbox.counts() == {"pending": 0, "sent": 3, "dead": 0}


async def test_optimistic_publish_marks_sent_only_in_order_and_after_an_ack(
        storage: Storage) -> None:
    from prometheus_client import CollectorRegistry

    broker = MemoryBroker()
    registry = CollectorRegistry()
    publisher = OptimisticPublisher(storage.outbox, broker, registry=registry)
    async with transaction(storage) as tx:
        first = await add(storage, tx, "a", 1, delay=5)
        second = await add(storage, tx, "a", 2, delay=5)
    assert await publisher.publish_after_commit(second) is False  # 'first' is not out yet
    assert await publisher.publish_after_commit(first) is True
    assert await publisher.publish_after_commit(second) is True
    # left to the worker for its order: neither a success nor a failure
    assert [registry.get_sample_value(f"outbox_optimistic_send_{name}") for name in
            ("success_total", "failures_total", "duration_seconds_count")] == [2, 0, 2]
    assert [orjson.loads(v)["n"] for _, v, _ in broker.topics["t"]] == [1, 2]
    assert await storage.outbox.counts() == {"pending": 0, "sent": 2, "dead": 0}
    # the worker leaves a delayed event alone meanwhile
    async with transaction(storage) as tx:
        await add(storage, tx, "b", 3, delay=5)
    assert await OutboxWorker(storage.outbox, broker).run_once() == 0


async def test_the_age_of_the_oldest_pending_event(storage: Storage) -> None:
    """outbox_oldest_pending_age_seconds: 0 when nothing waits, then how long the oldest
    pending event has waited, 0 again once it is out."""
    assert await storage.outbox.oldest_pending_age() == 0
    await fill(storage, 3, aggregates=2)
    await asyncio.sleep(0.3)
    assert 0.25 <= await storage.outbox.oldest_pending_age() < 10
    worker = OutboxWorker(storage.outbox, MemoryBroker())
    assert await worker.run_once() == 3
    assert await storage.outbox.oldest_pending_age() == 0


async def test_sent_events_are_pruned_after_the_retention(storage: Storage) -> None:
    await fill(storage, 4, aggregates=4)
    outbox = storage.outbox
    await outbox.settle("w", await outbox.claim("w", 2, 30), [], [], Backoff())
    assert await outbox.prune(3600) == 0  # too recent
    await asyncio.sleep(0.2)
    assert await outbox.prune(0.1) == 2
    assert await outbox.counts() == {"pending": 2, "sent": 0, "dead": 0}
    with pytest.raises(ValueError, match="retention must be > 0"):
        OutboxWorker(outbox, MemoryBroker(), retention=0)


async def test_the_inbox_marker_commits_with_the_handlers_writes(storage: Storage) -> None:
    """A handler's own write (a ledger row) and an outbox event it emits commit with the
    marker; a failing handler leaves neither; duplicates, racing too, apply once."""
    is_pg, is_redis = hasattr(storage, "pool"), hasattr(storage, "redis")
    ledger: list[tuple[str, int]] = []  # memory: the handler's "database"
    if is_pg:
        async with storage.pool.acquire() as conn:  # type: ignore[attr-defined]
            await conn.execute("CREATE TABLE ledger (event_id TEXT, amount INT)")
    key = f"{getattr(storage, 'prefix', '')}:ledger"
    calls = 0

    async def handler(payload: Any, tx: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if is_pg:
            await tx.execute("INSERT INTO ledger VALUES ($1, $2)", payload["id"],
                             payload["amt"])
        elif is_redis:
            tx.rpush(key, f"{payload['id']}:{payload['amt']}")
        await storage.outbox.insert(tx, aggregate_id=payload["id"], topic="billing",
                                 event_type="Booked", payload=payload)
        await asyncio.sleep(0.01)  # let racing duplicates overlap
        if payload.get("fail") and calls == 1:
            raise RuntimeError("handler failed")
        if not (is_pg or is_redis):
            ledger.append((payload["id"], payload["amt"]))
        return {"booked": payload["amt"]}

    inbox = ConsumerInbox(storage, "billing")
    fail = {"id": "e1", "amt": 5, "fail": True}
    with pytest.raises(RuntimeError, match="handler failed"):
        await inbox.process_idempotent("e1", "orders", "Paid", fail, handler)
    assert not await inbox.seen("e1")  # no marker: a redelivery runs it again
    assert await inbox.process_idempotent("e1", "orders", "Paid", fail, handler) == \
        {"booked": 5}
    results = await asyncio.gather(*(inbox.process_idempotent(
        "e2", "orders", "Paid", {"id": "e2", "amt": 7}, handler) for _ in range(5)))
    assert results == [{"booked": 7}] * 5
    # keyed by (consumer, event id): another consumer runs its own handler
    assert await ConsumerInbox(storage, "shipping").process_idempotent(
        "e2", "orders", "Paid", {"id": "e2", "amt": 7}, handler) == {"booked": 7}
    if is_pg:
        async with storage.pool.acquire() as conn:  # type: ignore[attr-defined]
            rows = await conn.fetch("SELECT event_id, amount FROM ledger ORDER BY event_id")
        ledger = [(r["event_id"], r["amount"]) for r in rows]
    elif is_redis:
        raw = await storage.redis.lrange(key, 0, -1)  # type: ignore[attr-defined]
        ledger = sorted(tuple(x.decode().split(":")) for x in raw)  # type: ignore[misc]
        ledger = [(i, int(a)) for i, a in ledger]
    assert sorted(ledger) == [("e1", 5), ("e2", 7), ("e2", 7)]
    if is_pg or not is_redis:
        assert calls == 4  # the racing duplicates waited for the first, then returned
    if not isinstance(storage, MemoryStorage):  # the outbox event committed with each
        assert (await storage.outbox.counts())["pending"] == 3
    with pytest.raises(ValueError, match="event_id must be a non-empty str"):
        await inbox.process_idempotent("", "t", "E", {}, handler)
    with pytest.raises(ValueError, match="consumer_name must be a non-empty str"):
        ConsumerInbox(storage, "")


async def test_participant_replies_are_kept_per_service_and_command(storage: Storage) -> None:
    replies = storage.replies
    reply = b'{"v":1,"type":"result","saga_id":"s1","ok":true}'
    assert await replies.get("payments", "s1|charge|1|run") is None
    await replies.put("payments", "s1|charge|1|run", reply)
    await replies.put("payments", "s1|charge|1|run", b'{"v":1,"other":true}')  # first stays
    assert orjson.loads(await replies.get("payments", "s1|charge|1|run") or b"") == \
        orjson.loads(reply)
    assert await replies.get("shipping", "s1|charge|1|run") is None


async def test_saga_snapshots_resume_a_crashed_run(storage: Storage) -> None:
    await crash_then_resume(storage.sagas, f"resume-{type(storage).__name__}")


async def test_storage_urls() -> None:
    storage = await open_storage("memory://")
    assert isinstance(storage, MemoryStorage)
    with pytest.raises(ValueError, match="unknown storage URL 'mysql://x'"):
        await open_storage("mysql://x")
    with pytest.raises(TypeError, match="storage must be a sagaz Storage"):
        ConsumerInbox(object(), "billing")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="outbox must be an OutboxStore"):
        OutboxWorker(storage, MemoryBroker())  # type: ignore[arg-type]


async def test_a_repeated_settle_changes_nothing_and_own_leases_are_free_to_reclaim(
        storage: Storage) -> None:
    await fill(storage, 4, aggregates=2)
    outbox = storage.outbox
    batch = await outbox.claim("A", 10, 30)
    assert len(batch) == 4
    # the connection broke after the claim: A's next claim gets the batch back at once
    again = await outbox.claim("A", 10, 30)
    assert sorted(e.event_id for e in again) == sorted(e.event_id for e in batch)
    assert await outbox.claim("B", 10, 30) == []  # still A's to everyone else
    agg0 = [e for e in batch if e.aggregate_id == "agg-0"]
    agg1 = [e for e in batch if e.aggregate_id == "agg-1"]
    outcome = (agg0, [(agg1[0], "boom")], agg1[1:])
    for _ in range(2):  # the first reply was lost; the worker settles again
        await outbox.settle("A", *outcome, Backoff(max_attempts=2, base=30, cap=30))
    assert await outbox.counts() == {"pending": 2, "sent": 2, "dead": 0}  # one attempt only


# -- engine idempotency keys (issue 9, items 12 and 13)

def _one_step_saga(name: str, ran: list[str]) -> Saga:
    async def only(ctx: Any) -> str:
        ran.append(f"{name}:{ctx.saga_id}")
        return name

    saga = Saga(name)
    saga.add_step("only", only)
    return saga


async def test_idempotency_keys_are_scoped_by_saga_name(storage: Storage) -> None:
    """One key given to two different sagas names two runs: `ship` with `pay`'s key is not
    pay's result."""
    ran: list[str] = []
    pay, ship = _one_step_saga("pay", ran), _one_step_saga("ship", ran)
    await Engine(storage.sagas).run(pay, saga_id="p1", idempotency_key="order-1")
    shipped = await Engine(storage.sagas).run(ship, saga_id="s1", idempotency_key="order-1")
    assert (shipped.name, shipped.saga_id, shipped.results) == ("ship", "s1", {"only": "ship"})
    assert ran == ["pay:p1", "ship:s1"]
    for saga, saga_id in ((pay, "p1"), (ship, "s1")):  # each key still names its own run
        again = await Engine(storage.sagas).run(saga, idempotency_key="order-1")
        assert (again.saga_id, again.name) == (saga_id, saga.name) and again.succeeded
    assert ran == ["pay:p1", "ship:s1"]


class StalledFirstSave:
    """Wraps a SagaStore: the first snapshot waits for ``gate``, as if the process stalled
    (or died) between claiming its idempotency key and saving its first snapshot."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.keeps_live_state = inner, inner.keeps_live_state
        self.entered, self.gate, self.first = asyncio.Event(), asyncio.Event(), True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def save(self, *args: Any) -> None:
        if self.first:
            self.first = False
            self.entered.set()
            await self.gate.wait()
        await self.inner.save(*args)


async def test_a_claim_without_a_snapshot_is_busy_then_taken_over_after_its_lease(
        storage: Storage) -> None:
    ran: list[str] = []
    saga = _one_step_saga("pay", ran)
    stalled_store = StalledFirstSave(storage.sagas)
    stalled = asyncio.create_task(Engine(stalled_store, claim_lease=1.0).run(
        saga, saga_id="stalled", idempotency_key="k"))
    await stalled_store.entered.wait()  # claimed; no snapshot yet
    # another process (engine) meanwhile: a clear error, not a KeyError
    with pytest.raises(SagaAlreadyRunning, match=r"key 'k' is held by run 'stalled'") as busy:
        await Engine(storage.sagas, claim_lease=1.0).run(saga, idempotency_key="k")
    assert (busy.value.name, busy.value.idempotency_key, busy.value.saga_id) == \
        ("pay", "k", "stalled")
    await asyncio.sleep(1.1)  # the lease ran out: the claim is stale and taken over
    taken = await Engine(storage.sagas, claim_lease=1.0).run(saga, saga_id="next",
                                                              idempotency_key="k")
    assert taken.saga_id == "next" and taken.succeeded and ran == ["pay:next"]
    # the stalled run wakes up: its first snapshot is refused, none of its steps runs
    stalled_store.gate.set()
    with pytest.raises(SagaAlreadyRunning, match="held by run 'next'"):
        await stalled
    assert ran == ["pay:next"]
    again = await Engine(storage.sagas).run(saga, idempotency_key="k")
    assert again.saga_id == "next" and again.succeeded and ran == ["pay:next"]


async def test_racing_runs_of_one_key_in_one_engine_share_the_run(storage: Storage) -> None:
    ran: list[str] = []
    saga = _one_step_saga("pay", ran)
    engine = Engine(storage.sagas)
    results = await asyncio.gather(*(engine.run(saga, idempotency_key="k") for _ in range(5)))
    assert len({r.saga_id for r in results}) == 1 and all(r.succeeded for r in results)
    assert len(ran) == 1


async def test_postgres_keys_from_before_the_name_scoping_stay_readable(
        postgres_url: str, monkeypatch: Any) -> None:
    """Migration 3 scopes keys by saga name; a run saved before it keeps its key."""
    import asyncpg

    from sagaz import migrations
    from sagaz.postgres_storage import PostgresStorage, init_connection
    from tests.conftest import fresh_pg_url

    with monkeypatch.context() as patch:  # a database as version 2 left it
        patch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
        url = await fresh_pg_url(postgres_url)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4, init=init_connection)
    try:
        ran: list[str] = []
        pay, ship = _one_step_saga("pay", ran), _one_step_saga("ship", ran)
        old = PostgresStorage(pool).sagas
        await Engine(old).run(pay, saga_id="s-old")
        async with pool.acquire() as conn:  # what version 2 stored: a keyed run, a bare claim
            await conn.execute("UPDATE sagaz_sagas SET idempotency_key = 'k' "
                               "WHERE saga_id = 's-old'")
            await conn.execute(
                "INSERT INTO sagaz_sagas (saga_id, name, status, state, data, results, "
                "idempotency_key) VALUES ('s-stale', '', 'claimed', '{}', '{}', '{}', 'k2')")
            assert await migrations.migrate(conn) == [3]
        assert ran == ["pay:s-old"]
        again = await Engine(old).run(pay, idempotency_key="k")
        assert again.saga_id == "s-old" and ran == ["pay:s-old"]
        other = await Engine(old).run(ship, saga_id="s-new", idempotency_key="k")
        assert other.saga_id == "s-new" and ran == ["pay:s-old", "ship:s-new"]
        stale = await Engine(old).run(pay, saga_id="s-fresh", idempotency_key="k2")
        assert stale.saga_id == "s-fresh"  # a nameless claim of version 2 binds nothing
    finally:
        await pool.close()


async def test_redis_keys_from_before_the_name_scoping_stay_readable(redis_url: str) -> None:
    from sagaz.redis_storage import RedisStorage

    storage = RedisStorage(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}")
    try:
        ran: list[str] = []
        pay, ship = _one_step_saga("pay", ran), _one_step_saga("ship", ran)
        await Engine(storage.sagas).run(pay, saga_id="s-old")
        p = storage.prefix  # what the previous version stored for idempotency key 'k'
        await storage.redis.set(f"{p}:idem:k", "s-old")
        await storage.redis.hset(f"{p}:saga:s-old", "key", "k")
        again = await Engine(storage.sagas).run(pay, idempotency_key="k")
        assert again.saga_id == "s-old" and ran == ["pay:s-old"]
        other = await Engine(storage.sagas).run(ship, saga_id="s-new", idempotency_key="k")
        assert other.saga_id == "s-new" and ran == ["pay:s-old", "ship:s-new"]
    finally:
        await storage.close()


# -- the outbox insert is all-or-nothing with the business writes (issue 9, item 14)

async def test_a_duplicate_event_id_rejects_the_whole_transaction(storage: Storage) -> None:
    """PostgreSQL rolls the transaction back; Redis refuses before EXEC (MULTI/EXEC would
    apply the business writes around a failing command); memory has no transaction, and
    its insert refuses the same way."""
    is_pg, is_redis = hasattr(storage, "pool"), hasattr(storage, "redis")
    balance_key = f"{getattr(storage, 'prefix', '')}:balance"

    async def debit(tx: Any, amount: int) -> None:
        if is_pg:
            await tx.execute("UPDATE account SET balance = balance - $1", amount)
        elif is_redis:
            tx.decrby(balance_key, amount)

    async def balance() -> int | None:
        if is_pg:
            async with storage.pool.acquire() as conn:  # type: ignore[attr-defined]
                return int(await conn.fetchval("SELECT balance FROM account"))
        if is_redis:
            return int(await storage.redis.get(balance_key))  # type: ignore[attr-defined]
        return None

    if is_pg:
        async with storage.pool.acquire() as conn:  # type: ignore[attr-defined]
            await conn.execute("CREATE TABLE account (balance INT)")
            await conn.execute("INSERT INTO account VALUES (100)")
    elif is_redis:
        await storage.redis.set(balance_key, 100)  # type: ignore[attr-defined]
    async with transaction(storage) as tx:
        await add(storage, tx, "acct", 1, event_id="debit-1")
    expected = 100 if is_pg or is_redis else None
    # a retry of the same business operation: the same event id refuses all of it
    with pytest.raises(OutboxError, match="event_id 'debit-1' is already in the outbox"):
        async with transaction(storage) as tx:
            await debit(tx, 30)
            await add(storage, tx, "acct", 2, event_id="debit-1")
    assert await balance() == expected
    # the same id twice in one transaction
    with pytest.raises(OutboxError, match="event_id 'debit-2' is already in the outbox"):
        async with transaction(storage) as tx:
            await add(storage, tx, "acct", 3, event_id="debit-2")
            await debit(tx, 30)
            await add(storage, tx, "acct", 4, event_id="debit-2")
    assert await balance() == expected
    counts = {"pending": 1, "sent": 0, "dead": 0}
    if not (is_pg or is_redis):
        counts["pending"] = 2  # memory: the first debit-2 went in (no transaction to undo)
    assert await storage.outbox.counts() == counts
    if is_redis:
        # a concurrent transaction adds the id between our insert and our EXEC: WATCH
        # aborts ours whole
        from redis.exceptions import WatchError

        with pytest.raises(WatchError):
            async with transaction(storage) as tx:
                await add(storage, tx, "acct", 5, event_id="debit-3")
                tx.decrby(balance_key, 30)
                async with transaction(storage) as rival:
                    await add(storage, rival, "acct", 6, event_id="debit-3")
        assert await balance() == 100
        assert await storage.outbox.counts() == {"pending": 2, "sent": 0, "dead": 0}


async def test_a_broken_batch_stays_with_its_worker_and_a_settle_frees_whole_aggregates(
        storage: Storage) -> None:
    """What test_outbox_model checks at random, made certain: a worker that lost a claim's
    reply claims again; what it does not take this time stays its own (others wait for the
    lease), and settling an aggregate frees all of it."""
    async with transaction(storage) as tx:
        a1, a2 = await add(storage, tx, "a", 1), await add(storage, tx, "a", 2)
        b1 = await add(storage, tx, "b", 3)
    outbox = storage.outbox
    assert len(await outbox.claim("A", 10, 30)) == 3  # the reply is lost: A forgets them
    again = await outbox.claim("A", 1, 30)  # a smaller batch this time
    assert [e.event_id for e in again] == [a1.event_id]
    assert await outbox.claim("B", 10, 30) == []  # a and b are still A's
    await outbox.settle("A", again, [], [], Backoff())
    assert [e.event_id for e in await outbox.claim("B", 10, 30)] == [a2.event_id]
    assert [e.event_id for e in await outbox.claim("A", 10, 30)] == [b1.event_id]
