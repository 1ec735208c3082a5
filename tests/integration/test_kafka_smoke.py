"""The stack works against a real broker: aiokafka round trip; Faust + RocksDB + changelog."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.kafka


async def test_aiokafka_round_trip(kafka_bootstrap: str, topic_prefix: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = f"{topic_prefix}-roundtrip"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for i in range(10):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=b"saga-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap,
                                group_id=f"{topic_prefix}-g", auto_offset_reset="earliest")
    await consumer.start()
    try:
        got: list[bytes] = []
        async with asyncio.timeout(30):
            while len(got) < 10:
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    got.extend(r.value for r in records)
    finally:
        await consumer.stop()
    assert got == [f"v{i}".encode() for i in range(10)]  # one key: order kept


def _faust_app(name: str, bootstrap: str, datadir: str):
    import faust

    app = faust.App(
        name, broker=f"kafka://{bootstrap}", store="rocksdb://", datadir=datadir,
        topic_partitions=2, web_enabled=False, table_cleanup_interval=3600,
        producer_linger=0.0, stream_wait_empty=False,
    )
    topic = app.topic(f"{name}-in", key_type=str, value_type=int, partitions=2)
    counts = app.Table("counts", default=int, partitions=2,
                       options={"block_cache_size": 8 << 20,
                                "write_buffer_size": 4 << 20, "max_write_buffer_number": 2})
    seen: list[tuple[str, int]] = []

    @app.agent(topic)
    async def count(stream):
        async for key, value in stream.items():
            counts[key] += value
            seen.append((key, value))

    return app, topic, counts, seen


async def test_faust_rocksdb_table_recovers_from_changelog(
    kafka_bootstrap: str, topic_prefix: str, tmp_path
) -> None:
    from sagaz.topics import ensure_topics

    name = f"{topic_prefix}-app"
    await ensure_topics(kafka_bootstrap, {f"{name}-in": 2})
    app, topic, counts, seen = _faust_app(name, kafka_bootstrap, str(tmp_path / "one"))
    await app.start()
    try:
        for key in ("a", "b", "a", "c", "a"):
            await topic.send(key=key, value=1)
        async with asyncio.timeout(60):
            while len(seen) < 5:
                await asyncio.sleep(0.1)
        assert counts["a"] == 3 and counts["b"] == 1
    finally:
        await app.stop()

    # A second app of the same name, with an empty data directory (RocksDB keeps its lock on
    # the first one: faust issue #573), must rebuild the table from the changelog topic.
    app2, _, counts2, _ = _faust_app(name, kafka_bootstrap, str(tmp_path / "two"))
    await app2.start()
    try:
        async with asyncio.timeout(60):
            while not app2.tables.recovery.completed.is_set():
                await asyncio.sleep(0.1)
        assert (counts2["a"], counts2["b"], counts2["c"]) == (3, 1, 1)
    finally:
        await app2.stop()
