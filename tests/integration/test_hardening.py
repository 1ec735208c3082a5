"""Faults a production cluster meets, on the real broker: oversized sagas and records,
dead letters that cannot be written, health that tells the truth, hung and oversized steps,
idle participants, and a participant killed with sagas in flight."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest

from sagaz import Saga, SagaContext
from sagaz import messages as msgs
from sagaz.topics import ensure_topics
from tests.kafka_stack import PARTITIONS, dead_letters, stack

pytestmark = pytest.mark.kafka


def partition_of(key: bytes) -> int:
    """The partition the producers' default partitioner gives a key (murmur2)."""
    from aiokafka.partitioner import DefaultPartitioner

    every = list(range(PARTITIONS))
    return int(DefaultPartitioner()(key, every, every))


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, orjson.loads(await resp.read())


async def committed(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


async def end_offsets(bootstrap: str, topic: str) -> dict[tuple[str, int], int]:
    from aiokafka import AIOKafkaConsumer

    from sagaz.topics import topic_partition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [topic_partition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): n for tp, n in ends.items() if n}


async def test_an_oversized_saga_fails_its_step_and_the_worker_keeps_working(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    """Item 1: 600 KB of data and a 500 KB step result. The row would be 1.1 MB: the step
    fails (not retryable, reason in the saga's error), the saga compensates, nothing too
    large is written, and the sagas started after it complete."""
    runs: Counter[str] = Counter()
    undone: list[str] = []

    async def reserve(ctx: SagaContext) -> str:
        runs[ctx.saga_id] += 1
        return "r" * ctx.get("result_size", 10)

    async def release(ctx: SagaContext) -> None:
        undone.append(ctx.saga_id)

    async def ship(ctx: SagaContext) -> str:
        return "shipped"

    saga = Saga("big")
    saga.add_step("reserve", reserve, release, participant="stock")
    saga.add_step("ship", ship, participant="stock")
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [saga], ["stock"]) as st:
        big = await st.client.start("big", {"blob": "d" * 600_000, "result_size": 500_000})
        small = [await st.client.start("big", {"n": i}) for i in range(6)]
        outcome = await st.client.wait(big, timeout=60)
        assert outcome["status"] == "compensated" and outcome["failed_step"] == "reserve"
        assert "result of step 'reserve' is too large: a saga row of" in outcome["error"]
        assert undone == [big] and runs[big] == 1  # ran once, not retried, undone
        for sid in small:
            assert (await st.client.wait(sid, timeout=30))["status"] == "completed"
        status, body = await get(st.url + "/health/ready")
        assert status == 200 and body["stalled"] == [], body
        # a start too large for a row is refused by the client, before anything is sent
        with pytest.raises(ValueError, match="saga data too large"):
            await st.client.start("big", {"blob": "d" * 1_000_000})
        # ... and by the CLI, with the same message
        (tmp_path / "big.json").write_bytes(orjson.dumps({"blob": "d" * 1_000_000}))
        cli = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "sagaz.cli", "--bootstrap", kafka_bootstrap,
                             "--prefix", topic_prefix, "start", "big", "--data",
                             f"@{tmp_path / 'big.json'}"],
            capture_output=True, text=True, timeout=60)
        assert cli.returncode == 2 and "saga data too large" in cli.stderr, cli.stderr


async def test_records_that_cannot_be_dead_lettered_stall_their_partition_unacked(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    """Item 2: a valid 1,010,000-byte input (the broker takes it; its row could not be
    written) is dead-lettered with a truncated value, its size and hash. When even the
    dead-letter copy is refused, the partition stops: the record is not committed, nothing
    behind it on that partition is processed, /health/ready names it; other partitions
    go on."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async def step(ctx: SagaContext) -> None: ...

    saga = Saga("s")
    saga.add_step("one", step, participant="svc")
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [saga], ["svc"]) as st:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap,
                                    max_request_size=2_000_000)
        await producer.start()
        try:
            huge = msgs.encode("start", "huge", saga="s", data={"blob": "x" * 1_010_000},
                               idempotency_key=None)
            await producer.send_and_wait(f"{topic_prefix}.commands", huge, key=b"huge")
            [letter] = await dead_letters(kafka_bootstrap, topic_prefix, 1)
            headers = dict(letter.headers)
            assert headers["sagaz-truncated"] == b"true"
            assert int(headers["sagaz-original-size"]) == len(huge)
            assert headers["sagaz-original-sha256"] == hashlib.sha256(huge).hexdigest().encode()
            assert b"start of saga 'huge' (s) refused" in headers["sagaz-reason"]
            assert len(letter.value) < 10_000 and huge.startswith(letter.value)

            # now the dead-letter topic refuses everything: a malformed record stalls its
            # partition
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            await admin.start()
            try:
                await admin.alter_configs([ConfigResource(
                    ConfigResourceType.TOPIC, f"{topic_prefix}.dead-letters",
                    configs={"max.message.bytes": "200"})])
            finally:
                await admin.close()
            meta = await producer.send_and_wait(f"{topic_prefix}.commands", b"x" * 300,
                                                key=b"stuck")
            behind = msgs.encode("start", "stuck", saga="s", data={}, idempotency_key=None)
            await producer.send_and_wait(f"{topic_prefix}.commands", behind, key=b"stuck")
            async with asyncio.timeout(60):
                while True:
                    status, body = await get(st.url + "/health/ready")
                    if body["stalled"]:
                        break
                    await asyncio.sleep(0.2)
            assert status == 503
            [stall] = body["stalled"]
            assert (stall["topic"], stall["partition"]) == (f"{topic_prefix}.commands",
                                                           meta.partition)
            assert "dead-letter copy could not be written" in stall["reason"]
            assert (await get(st.url + "/health/live"))[0] == 200  # alive: restart to retry
            # other partitions go on; the stalled one holds its records
            other = next(f"k{i}" for i in range(100)
                         if partition_of(f"k{i}".encode()) != meta.partition)
            done = await st.client.wait(await st.client.start("s", {}, saga_id=other), 30)
            assert done["status"] == "completed"
            await asyncio.sleep(2 * st.oapp.settings.commit_interval + 0.5)
            assert await st.client.status("stuck") is None  # behind the stall: untouched
            offsets = await committed(kafka_bootstrap, f"{topic_prefix}-orchestrator")
            assert offsets.get((f"{topic_prefix}.commands", meta.partition), 0) \
                <= meta.offset  # the stalled record was not committed
        finally:
            await producer.stop()


async def test_live_turns_red_when_the_agent_dies(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    """Item 3: a dead orchestrating agent makes /health/live (and ready) fail."""
    async def step(ctx: SagaContext) -> None: ...

    saga = Saga("s")
    saga.add_step("one", step, participant="svc")
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [saga], []) as st:
        assert (await get(st.url + "/health/live"))[0] == 200
        [agent] = st.oapp.app.agents.values()
        await agent.stop()
        status, body = await get(st.url + "/health/live")
        assert status == 503 and body["status"] == "dead", body
        assert any("agent stopped" in d for d in body["dead"]), body
        assert (await get(st.url + "/health/ready"))[0] == 503


async def test_hung_and_oversized_steps_do_not_stop_a_participant_and_idle_offsets_commit(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    """Items 5-7: a step that hangs is cancelled at its timeout while the commands behind
    it flow; a 1.5 MB result becomes a failed step, run once, and the participant stays
    up; once idle, every command offset is committed."""
    runs: Counter[str] = Counter()
    cancelled: list[str] = []

    async def hang(ctx: SagaContext) -> None:
        runs[ctx.saga_id] += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.saga_id)
            raise

    async def huge(ctx: SagaContext) -> str:
        runs[ctx.saga_id] += 1
        return "h" * 1_500_000

    async def quick(ctx: SagaContext) -> int:
        runs[ctx.saga_id] += 1
        return 1

    hung, big, fast = Saga("hung"), Saga("big"), Saga("fast")
    hung.add_step("hang", hang, participant="svc", timeout=1.0)
    big.add_step("huge", huge, participant="svc")
    fast.add_step("quick", quick, participant="svc")
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [hung, big, fast], ["svc"],
                     participant_options={"commit_interval": 0.2}) as st:
        stuck = [await st.client.start("hung", {}) for _ in range(3)]
        t0 = time.monotonic()
        quick_ids = await st.client.start_many("fast", [{}] * 30)
        for sid in quick_ids:
            assert (await st.client.wait(sid, timeout=30))["status"] == "completed"
        assert time.monotonic() - t0 < 1.0 or not set(stuck) & set(cancelled), \
            "the quick sagas waited for the hung steps"
        for sid in stuck:
            outcome = await st.client.wait(sid, timeout=30)
            assert outcome["status"] == "compensated" and "timed out after 1.0s" in \
                outcome["error"], outcome
        async with asyncio.timeout(10):  # the participant cancels them at their timeout
            while sorted(cancelled) != sorted(stuck):
                await asyncio.sleep(0.05)
        sid = await st.client.start("big", {})
        outcome = await st.client.wait(sid, timeout=30)
        assert outcome["status"] == "compensated", outcome
        assert "result of step 'huge' is too large: a reply of" in outcome["error"]
        assert runs[sid] == 1 and st.participants[0].live()
        # idle: the participant commits what it answered without a new batch
        topic = f"{topic_prefix}.participant.svc"
        await asyncio.sleep(1.0)
        ends = await end_offsets(kafka_bootstrap, topic)
        done = await committed(kafka_bootstrap, topic)
        assert {k: done.get(k) for k in ends} == ends


def _participant(bootstrap: str, prefix: str, ledger: str, log: Any) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "sagaz.cli", "--bootstrap", bootstrap, "--prefix", prefix,
         "participant", "--service", "books", "--sagas", "tests.sagas_ledger"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "SAGAZ_TEST_LEDGER": ledger})


async def test_kill_9_a_participant_with_100_sagas_in_flight_repeats_no_acknowledged_step(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    """Item 8: with the defaults (the changelog inbox), kill -9 of a participant while 100
    sagas are in flight, then a fresh one (another data directory: restored from Kafka).
    No step whose reply the broker acknowledged runs again; only the attempts running at
    the kill may."""
    from aiokafka import AIOKafkaConsumer

    from tests import sagas_ledger

    ledger = str(tmp_path / "ledger")
    n = 100
    with open(tmp_path / "participant.log", "ab") as log:
        async with stack(kafka_bootstrap, topic_prefix, tmp_path, [sagas_ledger.ledger],
                         []) as st:
            proc = _participant(kafka_bootstrap, topic_prefix, ledger, log)
            try:
                ids = await st.client.start_many("ledger", [{"delay": 0.05}] * n)
                async with asyncio.timeout(60):  # kill once replies went out (a confirm
                    # runs only after its book reply was acknowledged and applied)
                    while not os.path.exists(ledger) or \
                            open(ledger).read().count("confirm ") < 20:
                        await asyncio.sleep(0.01)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_pid = proc.pid
                proc = _participant(kafka_bootstrap, topic_prefix, ledger, log)
                outcomes = [await st.client.wait(i, timeout=120) for i in ids]
            finally:
                proc.kill()
                proc.wait()
    assert all(o["status"] == "completed" for o in outcomes)
    effects: Counter[tuple[str, str]] = Counter()
    by_killed: set[tuple[str, str]] = set()
    for line in open(ledger).read().splitlines():
        effect, sid, pid = line.split()
        effects[effect, sid] += 1
        if int(pid) == killed_pid:
            by_killed.add((effect, sid))
    # replies the broker acknowledged, by the process that sent them
    consumer = AIOKafkaConsumer(f"{topic_prefix}.results", bootstrap_servers=kafka_bootstrap,
                                auto_offset_reset="earliest")
    await consumer.start()
    acked: set[tuple[str, str]] = set()
    try:
        deadline = time.monotonic() + 20
        while len(acked) < 2 * n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                for r in records:
                    reply = orjson.loads(r.value)
                    if reply["ok"] and reply["result"]["pid"] == killed_pid:
                        acked.add((reply["step"], reply["saga_id"]))
    finally:
        await consumer.stop()
    assert acked, "the killed participant had answered nothing: kill later"
    repeated = {k for k, count in effects.items() if count > 1}
    assert not repeated & acked, f"acknowledged steps ran again: {sorted(repeated & acked)}"
    assert len(repeated) <= 64  # at most the attempts running at the kill (concurrency)
    assert {(e, sid) for e in ("book", "confirm") for sid in ids} == set(effects)
    print(f"\nkill -9 of a participant: {len(acked)} acknowledged steps by the killed "
          f"process, none repeated; {len(repeated)} in-flight attempts ran again")


async def test_inbox_consumer_dead_letters_malformed_records_and_rides_out_an_outage(
        kafka_bootstrap: str, topic_prefix: str, postgres_url: str) -> None:
    """Item 9: a record with a null header value is dead-lettered (to a dead-letter topic
    the consumer created) and the healthy record behind it is handled; a database outage
    longer than every retry's backoff dead-letters nothing, and every event is handled
    once when the database is back."""
    from urllib.parse import urlsplit

    import asyncpg
    from aiokafka import AIOKafkaProducer

    from sagaz.consumer_inbox import InboxConsumer
    from sagaz.postgres_storage import PostgresStorage, init_connection
    from tests.conftest import fresh_pg_url
    from tests.proxy import Proxy

    url = await fresh_pg_url(postgres_url)
    parts = urlsplit(url)
    proxy = await Proxy(parts.hostname or "127.0.0.1", parts.port or 5432).start()
    proxied = url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    admin = await asyncpg.connect(url)
    await admin.execute("CREATE TABLE ledger (event_id TEXT)")
    pool = await asyncpg.create_pool(proxied, min_size=1, max_size=4, init=init_connection)
    topic, name = f"{topic_prefix}-orders", f"{topic_prefix}-billing"
    await ensure_topics(kafka_bootstrap, {topic: 1})

    async def book(payload: dict[str, Any], conn: Any) -> None:
        await conn.execute("INSERT INTO ledger VALUES ($1)", payload["id"])

    consumer = InboxConsumer(PostgresStorage(pool), name, [topic], book,
                             bootstrap=kafka_bootstrap, max_attempts=2, backoff=0.05,
                             max_backoff=0.5)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()

    async def send(event_id: bytes | None, n: int) -> None:
        await producer.send_and_wait(topic, orjson.dumps({"id": f"e{n}"}), key=b"k",
                                     headers=[("event-id", event_id),
                                              ("event-type", b"Paid")])

    task = asyncio.create_task(consumer.run())
    try:
        await send(None, 0)  # a null header value
        await send(b"e1", 1)
        async with asyncio.timeout(30):
            while consumer.handled < 1 or task.done():
                if task.done():
                    task.result()  # the consumer died: say why
                await asyncio.sleep(0.05)
        assert consumer.dead_lettered == 1
        [letter] = await dead_letters_of(kafka_bootstrap, f"{name}.dead-letters", 1)
        assert b"null event-id" in dict(letter.headers)["sagaz-reason"]

        proxy.cut()  # the database goes away for longer than all the backoffs together
        for n in range(2, 7):
            await send(f"e{n}".encode(), n)
        await asyncio.sleep(4)
        assert consumer.handled == 1 and consumer.dead_lettered == 1
        proxy.heal()
        async with asyncio.timeout(30):
            while consumer.handled < 6:
                await asyncio.sleep(0.05)
        assert consumer.dead_lettered == 1  # the outage dead-lettered nothing
        rows = await admin.fetch("SELECT event_id FROM ledger ORDER BY event_id")
        assert [r["event_id"] for r in rows] == [f"e{n}" for n in range(1, 7)]
    finally:
        await consumer.stop()
        await asyncio.gather(task, return_exceptions=True)
        await producer.stop()
        await pool.close()
        await admin.close()
        await proxy.stop()


async def dead_letters_of(bootstrap: str, topic: str, expect: int) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest")
    await consumer.start()
    got: list[Any] = []
    try:
        async with asyncio.timeout(20):
            while len(got) < expect:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend(records)
    finally:
        await consumer.stop()
    return got


async def test_a_command_that_keeps_killing_the_participant_is_dead_lettered(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    """Item 6: a step that kills its process is run at most max_crashes (3) times across
    restarts; then its command goes to the dead-letter topic and the saga gets a failure,
    so the partition moves on."""
    from tests import sagas_ledger

    ledger = str(tmp_path / "ledger")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SAGAZ_TEST_LEDGER": ledger}
    with open(tmp_path / "participant.log", "ab") as log:
        async with stack(kafka_bootstrap, topic_prefix, tmp_path, [sagas_ledger.crasher],
                         []) as st:
            sid = await st.client.start("crasher", {})
            waiting = asyncio.create_task(st.client.wait(sid, timeout=120))
            exits = []
            for _ in range(6):  # a supervisor restarting the crashed process
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "sagaz.cli", "--bootstrap", kafka_bootstrap,
                    "--prefix", topic_prefix, "participant", "--service", "crashy",
                    "--sagas", "tests.sagas_ledger", stdout=log, stderr=log, env=env)
                done, _ = await asyncio.wait({waiting, asyncio.ensure_future(proc.wait())},
                                             timeout=60, return_when=asyncio.FIRST_COMPLETED)
                if waiting in done:
                    proc.terminate()
                    await proc.wait()
                    break
                exits.append(proc.returncode)
            outcome = waiting.result()
    assert exits == [3, 3, 3]  # three runs killed it; the fourth delivery was not run
    assert outcome["status"] == "compensated" and outcome["failed_step"] == "explode"
    assert "was started 3 times without an answer" in outcome["error"]
    assert open(ledger).read().split().count("explode") == 3
    [letter] = await dead_letters(kafka_bootstrap, topic_prefix, 1)
    assert b"started 3 times" in dict(letter.headers)["sagaz-reason"]


async def test_a_participant_shutdown_cancels_a_long_step_which_runs_again_elsewhere(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    """Item 5 (shutdown): stop() waits shutdown_timeout for running steps, then cancels
    them; their commands are not committed, so the next participant runs them again, and a
    cancellation does not count toward max_crashes."""
    from sagaz.participant import Participant

    runs: list[str] = []
    cancelled: list[str] = []

    async def slow_once(ctx: SagaContext) -> int:
        runs.append(ctx.saga_id)
        if len(runs) == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(ctx.saga_id)
                raise
        return len(runs)

    saga = Saga("slow")
    saga.add_step("work", slow_once, participant="svc")
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [saga], ["svc"],
                     participant_options={"shutdown_timeout": 0.5, "max_crashes": 1}) as st:
        sid = await st.client.start("slow", {})
        async with asyncio.timeout(30):
            while not runs:
                await asyncio.sleep(0.02)
        first = st.participants[0]
        t0 = time.monotonic()
        await first.stop()
        async with asyncio.timeout(15):  # it drains, cancels and closes
            while first._loop_state != "stopped":
                await asyncio.sleep(0.02)
        assert time.monotonic() - t0 < 10 and cancelled == [sid]
        second = Participant("svc", [saga], bootstrap=kafka_bootstrap, prefix=topic_prefix,
                             max_crashes=1)
        task = asyncio.create_task(second.run())
        try:
            outcome = await st.client.wait(sid, timeout=60)
        finally:
            await second.stop()
            await task
    # max_crashes=1: had the cancellation counted as a crash, the command would have been
    # dead-lettered instead of run again
    assert outcome["status"] == "completed" and outcome["results"]["work"] == 2
    assert runs == [sid, sid]
