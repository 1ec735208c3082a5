"""The product page's "Transactional Outbox + Optimistic Sending" and "Consumer Inbox"
snippets, run as written against a real PostgreSQL (and, once, a real Kafka): the page's
import paths, storages and brokers that construct without a server, ``enabled=False``,
one- and two-argument inbox handlers, duplicates answered with the first result."""

from __future__ import annotations

import asyncio
import socket
import uuid
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest

from sagaz.outbox import ConsumerInbox, OptimisticPublisher, OutboxWorker
from sagaz.outbox.brokers import KafkaBroker, MemoryBroker
from sagaz.outbox.storage import InMemoryOutboxStorage, PostgreSQLOutboxStorage, StorageError
from tests.proxy import Proxy


def _with_password(url: str, password: str, port: int | None = None) -> str:
    """The fixture's URL with a password (the test server trusts any) and maybe a port."""
    parts = urlsplit(url)
    host = f"{parts.hostname}:{port or parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{password}@{host}"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _status(storage: PostgreSQLOutboxStorage, event_id: str) -> str:
    async with storage.pool.acquire() as conn:
        status: str = await conn.fetchval(
            "SELECT status FROM sagaz_outbox WHERE event_id = $1", event_id)
    return status


async def _orders_table(storage: PostgreSQLOutboxStorage) -> None:
    async with storage.pool.acquire() as db:
        await db.execute("CREATE TABLE orders (id text PRIMARY KEY, status text)")
        await db.execute("INSERT INTO orders VALUES ('o-1', 'new')")


@pytest.mark.kafka
async def test_page_outbox_snippet_publishes_through_kafka(
        pg_url: str, kafka_bootstrap: str, topic_prefix: str) -> None:
    from aiokafka import AIOKafkaConsumer

    from sagaz.topics import ensure_topics

    topic = f"{topic_prefix}-orders"
    await ensure_topics(kafka_bootstrap, {topic: 1})
    # -- the page, with the fixture's addresses for localhost --
    storage = PostgreSQLOutboxStorage(pg_url)
    broker = KafkaBroker(bootstrap_servers=kafka_bootstrap)
    publisher = OptimisticPublisher(storage, broker, enabled=True)
    try:
        await _orders_table(storage)
        async with storage.pool.acquire() as db, db.transaction():
            await db.execute("UPDATE orders SET status = 'paid' WHERE id = 'o-1'")
            event = await storage.insert(db, aggregate_id="o-1", topic=topic,
                                         event_type="OrderPaid", payload={"id": "o-1"},
                                         delay=5)
        assert broker.started is False  # nobody called start(): the publish does
        assert await publisher.publish_after_commit(event) is True
        assert await _status(storage, event.event_id) == "sent"
        assert await OutboxWorker(storage, broker).run_once() == 0  # nothing left for it
    finally:
        await broker.stop()
        await storage.close()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap,
                                auto_offset_reset="earliest", group_id=f"{topic}-reader")
    await consumer.start()
    try:
        records: list[Any] = []
        for _ in range(50):
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
            if records:
                break
    finally:
        await consumer.stop()
    assert [(r.key, orjson.loads(r.value)) for r in records] == [(b"o-1", {"id": "o-1"})]
    assert dict(records[0].headers)["event-id"] == event.event_id.encode()


async def test_disabled_publisher_leaves_the_event_to_the_worker(pg_url: str) -> None:
    storage = PostgreSQLOutboxStorage(pg_url)
    # a broker nobody listens for: enabled=False must not even try it
    unreachable = KafkaBroker(bootstrap_servers=f"127.0.0.1:{_closed_port()}")
    publisher = OptimisticPublisher(storage, unreachable, enabled=False)
    try:
        async with storage.pool.acquire() as db, db.transaction():
            event = await storage.insert(db, aggregate_id="o-1", topic="orders",
                                         event_type="OrderPaid", payload={"id": "o-1"})
        assert await publisher.publish_after_commit(event) is False
        assert unreachable.started is False
        assert await _status(storage, event.event_id) == "pending"
        broker = MemoryBroker()
        assert await OutboxWorker(storage, broker).run_once() == 1
        assert await _status(storage, event.event_id) == "sent"
        assert [orjson.loads(v) for _, v, _ in broker.topics["orders"]] == [{"id": "o-1"}]
    finally:
        await storage.close()
    with pytest.raises(TypeError, match="enabled must be True or False"):
        OptimisticPublisher(storage, unreachable, enabled="no")  # type: ignore[arg-type]


async def test_an_unstartable_broker_never_holds_the_fast_path(pg_url: str) -> None:
    """The page promises < 10 ms, falling back to the worker: a broker that cannot start
    (here one that accepts connections and never answers, like a black-holed address) must
    not hold a publish for its connect bound."""
    import time

    from sagaz.outbox import publisher as publisher_module

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; returns when the client goes away
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    storage = PostgreSQLOutboxStorage(pg_url)
    unreachable = KafkaBroker(bootstrap_servers=f"127.0.0.1:{port}")
    publisher = OptimisticPublisher(storage, unreachable)
    wait = getattr(publisher_module, "START_WAIT", 1.0)
    try:
        async with storage.pool.acquire() as db, db.transaction():
            event = await storage.insert(db, aggregate_id="o-1", topic="orders",
                                         event_type="OrderPaid", payload={"id": "o-1"})
        for _ in range(3):
            t0 = time.monotonic()
            assert await publisher.publish_after_commit(event) is False
            assert time.monotonic() - t0 < wait + 0.5
        assert await _status(storage, event.event_id) == "pending"  # the worker's now
    finally:
        starting = getattr(publisher, "_starting", None)
        if starting is not None:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
        await unreachable.stop()
        await storage.close()
        server.close()


async def test_everything_constructs_without_a_server_and_connects_on_first_use(
        pg_url: str) -> None:
    """Built while the database is unreachable; the first use fails with the URL, masked;
    once the database answers, the same objects work (a failed opening is not kept)."""
    real = urlsplit(pg_url)
    proxy = await Proxy(str(real.hostname), int(real.port or 5432)).start()
    proxy.cut()
    url = _with_password(pg_url, "s3cret-pw", proxy.port)
    try:
        storage = PostgreSQLOutboxStorage(url)
        broker = KafkaBroker(bootstrap_servers=f"127.0.0.1:{_closed_port()}")
        publisher = OptimisticPublisher(storage, broker, enabled=True)
        worker = OutboxWorker(storage, MemoryBroker())
        inbox = ConsumerInbox(storage, consumer_name="order-service")
        assert "s3cret" not in repr(storage)

        async def handler(payload: dict[str, Any]) -> dict[str, Any]:
            return payload

        for use in (inbox.process_idempotent("e-1", "orders", "OrderCreated", {}, handler),
                    worker.run_once()):
            with pytest.raises(StorageError) as caught:
                await use
            text = str(caught.value)
            assert f"postgres:***@127.0.0.1:{proxy.port}" in text, text
            assert "s3cret" not in text and "cannot connect to PostgreSQL" in text
        proxy.heal()
        assert await inbox.process_idempotent("e-1", "orders", "OrderCreated",
                                              {"n": 1}, handler) == {"n": 1}
        async with storage.pool.acquire() as db, db.transaction():
            event = await storage.insert(db, aggregate_id="a", topic="t", event_type="E",
                                         payload={}, delay=5)
        # the broker cannot start: left to the worker, which publishes it
        assert await publisher.publish_after_commit(event) is False
        assert await _status(storage, event.event_id) == "pending"
        await storage.close()
    finally:
        await proxy.stop()


async def test_page_inbox_snippet_one_argument_handler_and_duplicates(pg_url: str) -> None:
    storage = PostgreSQLOutboxStorage(pg_url)
    created: list[dict[str, Any]] = []

    async def create_order(payload: dict[str, Any]) -> Any:
        created.append(payload)
        return SimpleNamespace(id=f"order-{len(created)}")

    msg = SimpleNamespace(headers={"message_id": uuid.uuid4().hex}, topic="orders",
                          value={"sku": "A-1", "qty": 2})
    try:
        # -- the page --
        inbox = ConsumerInbox(storage, consumer_name="order-service")

        async def process_order(payload: dict[str, Any]) -> dict[str, Any]:
            order = await create_order(payload)
            return {"order_id": order.id}

        result = await inbox.process_idempotent(
            event_id=msg.headers['message_id'],
            source_topic=msg.topic,
            event_type="OrderCreated",
            payload=msg.value,
            handler=process_order
        )
        # -- end of the page --
        assert result == {"order_id": "order-1"}
        # a redelivery: the first result, the handler not run again
        again = await inbox.process_idempotent(
            event_id=msg.headers['message_id'], source_topic=msg.topic,
            event_type="OrderCreated", payload=msg.value, handler=process_order)
        assert again == {"order_id": "order-1"} and created == [msg.value]
        assert await inbox.seen(msg.headers['message_id'])
        # racing duplicates: still once
        twins = await asyncio.gather(*(inbox.process_idempotent(
            "e-race", "orders", "OrderCreated", {"n": 2}, process_order) for _ in range(3)))
        assert twins == [{"order_id": "order-2"}] * 3 and len(created) == 2
    finally:
        await storage.close()


async def test_two_argument_handler_writes_in_the_inbox_transaction(pg_url: str) -> None:
    storage = PostgreSQLOutboxStorage(pg_url)
    inbox = ConsumerInbox(storage, consumer_name="billing")
    try:
        await _orders_table(storage)

        async def pay(payload: dict[str, Any], tx: Any) -> str:
            await tx.execute("UPDATE orders SET status = 'paid' WHERE id = $1", payload["id"])
            return "paid"

        async def pay_then_fail(payload: dict[str, Any], tx: Any) -> str:
            await tx.execute("UPDATE orders SET status = 'lost' WHERE id = $1", payload["id"])
            raise RuntimeError("card declined")

        with pytest.raises(RuntimeError, match="card declined"):
            await inbox.process_idempotent("e-1", "orders", "OrderPaid", {"id": "o-1"},
                                           pay_then_fail)
        async with storage.pool.acquire() as db:  # rolled back with the marker
            assert await db.fetchval("SELECT status FROM orders") == "new"
        assert not await inbox.seen("e-1")
        assert await inbox.process_idempotent("e-1", "orders", "OrderPaid", {"id": "o-1"},
                                              pay) == "paid"
        async with storage.pool.acquire() as db:
            assert await db.fetchval("SELECT status FROM orders") == "paid"

        class Handler:  # a bound method taking (payload, tx) gets tx too
            async def handle(self, payload: Any, tx: Any) -> bool:
                return tx is not None

        assert await inbox.process_idempotent("e-2", "orders", "OrderPaid", {},
                                              Handler().handle) is True
    finally:
        await storage.close()


async def test_wrong_calls_say_what_to_write_instead() -> None:
    storage = InMemoryOutboxStorage()
    inbox = ConsumerInbox(storage, consumer_name="c")

    async def no_args() -> None: ...

    async def three(payload: Any, tx: Any, extra: Any) -> None: ...

    for bad in (no_args, three):
        with pytest.raises(TypeError, match=r"must take \(payload\) or \(payload, tx\)"):
            await inbox.process_idempotent("e", "t", "E", {}, bad)
    assert not await inbox.seen("e")
    # the page's `outbox_storage.insert(event)`: refused with the call to write
    event = await storage.insert(None, aggregate_id="a", topic="t", event_type="E",
                                 payload={})
    for call in (storage.insert(event), storage.insert(None, event)):
        with pytest.raises(TypeError, match=r"storage.insert\(tx, aggregate_id=\.\.\., "):
            await call
    with pytest.raises(TypeError, match="bootstrap or bootstrap_servers"):
        KafkaBroker()
    with pytest.raises(TypeError, match="bootstrap or bootstrap_servers"):
        KafkaBroker("a:1", bootstrap_servers="b:2")
    with pytest.raises(ValueError, match="bootstrap_servers must be"):
        KafkaBroker(bootstrap_servers="")
    assert KafkaBroker(bootstrap_servers=["a:1", "b:2"]).bootstrap == "a:1,b:2"
    with pytest.raises(ValueError, match="expected a postgresql:// URL"):
        PostgreSQLOutboxStorage("mysql://u:pw@h/db")
    with pytest.raises(TypeError, match="pool options"):
        PostgreSQLOutboxStorage(object(), min_size=1)


async def test_memory_storage_runs_the_page_inbox_snippet() -> None:
    inbox = ConsumerInbox(InMemoryOutboxStorage(), consumer_name="order-service")
    calls: list[Any] = []

    async def process_order(payload: dict[str, Any]) -> dict[str, Any]:
        calls.append(payload)
        return {"order_id": "o-1"}

    for _ in range(2):
        assert await inbox.process_idempotent(
            event_id="m-1", source_topic="orders", event_type="OrderCreated",
            payload={"sku": "A"}, handler=process_order) == {"order_id": "o-1"}
    assert calls == [{"sku": "A"}]


def test_old_and_new_import_paths_name_the_same_classes() -> None:
    import sagaz
    import sagaz.brokers
    import sagaz.consumer_inbox
    import sagaz.outbox
    import sagaz.outbox.brokers
    import sagaz.outbox.inbox
    import sagaz.outbox.publisher
    import sagaz.outbox.worker
    import sagaz.storage

    assert sagaz.outbox.OutboxWorker is sagaz.outbox.worker.OutboxWorker is sagaz.OutboxWorker
    assert sagaz.outbox.OptimisticPublisher is sagaz.outbox.publisher.OptimisticPublisher \
        is sagaz.OptimisticPublisher
    assert sagaz.outbox.ConsumerInbox is sagaz.outbox.inbox.ConsumerInbox \
        is sagaz.consumer_inbox.ConsumerInbox is sagaz.ConsumerInbox
    assert sagaz.outbox.InboxConsumer is sagaz.consumer_inbox.InboxConsumer
    assert sagaz.outbox.OutboxEvent is sagaz.storage.OutboxEvent
    assert sagaz.outbox.OutboxError is sagaz.storage.OutboxError
    assert sagaz.outbox.brokers.KafkaBroker is sagaz.brokers.KafkaBroker
