"""The Kafka orchestrator against a real broker: a Faust worker, participants, a client."""

from __future__ import annotations

import asyncio
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

from sagaz import DAGSaga, FailureStrategy, Retry, Saga, SagaContext
from sagaz.client import SagaClient
from sagaz.participant import Participant
from sagaz.testing.kafka import free_port
from sagaz.topics import TopicMismatch, ensure_topics
from streams import examples
from streams.app import OrchestratorApp
from streams.config import Settings
from streams.demo import wait_ready
from tests.kafka_stack import PARTITIONS, dead_letters, stack

pytestmark = pytest.mark.kafka


def orders(prefix: str, n: int, **data: Any) -> list[dict[str, Any]]:
    return [{"order_id": f"{prefix}-{i}", "amount": 10 + i, **data} for i in range(n)]


async def test_order_saga_completes_or_compensates_in_reverse_order(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [examples.order],
                     ["inventory", "payment", "shipping"]) as st:
        ok = await st.client.start("order", {"order_id": f"{topic_prefix}-ok", "amount": 5})
        bad = await st.client.start("order", {"order_id": f"{topic_prefix}-bad",
                                              "decline": True})
        done = await st.client.wait(ok, timeout=30)
        failed = await st.client.wait(bad, timeout=30)
        assert done["status"] == "completed"
        assert done["results"]["ship_order"] == {"tracking": f"t-{topic_prefix}-ok"}
        assert failed["status"] == "compensated" and failed["failed_step"] == "charge_payment"
        assert "PaymentDeclined" in failed["error"]
        ledger = examples.LEDGER
        assert [ledger[e, f"{topic_prefix}-ok"] for e in ("reserve", "charge", "ship")] == [1, 1, 1]
        assert [ledger[e, f"{topic_prefix}-bad"] for e in ("reserve", "release", "charge")] == \
            [1, 1, 0]
        view = await st.client.status(bad)
        assert view is not None
        assert [s["status"] for s in view["steps"]] == ["compensated", "failed", "skipped"]


def _dag(strategy: FailureStrategy, log: list[str], **kw: Any) -> DAGSaga:
    saga = DAGSaga(f"dag-{strategy.value}", failure_strategy=strategy, **kw)

    def step(name: str, sleep: float = 0.0, fail: bool = False) -> Any:
        async def run(ctx: SagaContext) -> str:
            log.append(f"start {name}")
            await asyncio.sleep(sleep)
            if fail:
                raise RuntimeError(f"{name} failed")
            log.append(f"done {name}")
            return name

        async def undo(ctx: SagaContext) -> None:
            log.append(f"undo {name}")

        return run, undo

    saga.add_step("a", *step("a", sleep=0.3), participant="svc")
    saga.add_step("b", *step("b", fail=True), participant="svc",
                  retry=Retry(attempts=2, backoff=0.05))
    saga.add_step("c", *step("c"), participant="svc")
    saga.add_step("d", *step("d"), depends_on=["a", "b", "c"], participant="svc")
    return saga


@pytest.mark.parametrize("strategy", list(FailureStrategy))
async def test_dag_runs_branches_in_parallel_and_each_strategy_compensates(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any,
        strategy: FailureStrategy) -> None:
    log: list[str] = []
    extra = {"grace_period": 0.05} if strategy is FailureStrategy.FAIL_FAST_WITH_GRACE else {}
    saga = _dag(strategy, log, **extra)
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [saga], ["svc"]) as st:
        sid = await st.client.start(saga.name, {})
        outcome = await st.client.wait(sid, timeout=30)
    assert outcome["status"] == "compensated" and outcome["failed_step"] == "b"
    # a, b and c started together; b failed twice; d never started
    assert set(log[:3]) == {"start a", "start b", "start c"}
    assert log.count("start b") == 2 and "start d" not in log
    # a remote step cannot be cancelled: the orchestrator waits for a's real outcome and,
    # since it completed, undoes it; c completed at once and is undone too
    assert "done a" in log and log.index("done a") < log.index("undo a")
    assert sorted(x for x in log if x.startswith("undo")) == ["undo a", "undo c"]


async def test_retries_timeouts_and_deadline_through_kafka(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    calls: Counter[str] = Counter()
    undone: list[str] = []

    async def flaky(ctx: SagaContext) -> int:
        calls["flaky", ctx.saga_id] += 1
        if calls["flaky", ctx.saga_id] < 3:
            raise ConnectionError("transient")
        return calls["flaky", ctx.saga_id]

    async def first(ctx: SagaContext) -> str:
        return "first"

    async def undo_first(ctx: SagaContext) -> None:
        undone.append(ctx.saga_id)

    async def slow(ctx: SagaContext) -> None:
        await asyncio.sleep(ctx.get("sleep", 0))
        applied.append(ctx.saga_id)  # too late for the orchestrator, but it happened

    async def undo_slow(ctx: SagaContext) -> None:
        undone_slow.append(ctx.saga_id)

    applied: list[str] = []
    undone_slow: list[str] = []

    retrying = Saga("retrying")
    retrying.add_step("flaky", flaky, participant="svc",
                      retry=Retry(attempts=3, backoff=0.1, multiplier=2))
    timing_out = Saga("timing-out")
    timing_out.add_step("first", first, undo_first, participant="svc")
    timing_out.add_step("slow", slow, undo_slow, participant="svc", timeout=0.3)
    deadline = Saga("deadline", timeout=0.4)
    deadline.add_step("first", first, undo_first, participant="svc")
    deadline.add_step("slow", slow, participant="svc")

    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [retrying, timing_out, deadline],
                     ["svc"]) as st:
        t0 = time.monotonic()
        r = await st.client.wait(await st.client.start("retrying", {}), timeout=30)
        assert r["status"] == "completed" and r["results"]["flaky"] == 3
        assert time.monotonic() - t0 >= 0.1 + 0.2  # both backoffs were waited through Kafka
        view = await st.client.status(r["saga_id"])
        assert view is not None and view["steps"][0]["attempts"] == 3

        t = await st.client.wait(await st.client.start("timing-out", {"sleep": 1}), timeout=30)
        assert t["status"] == "compensated" and t["failed_step"] == "slow"
        assert "timed out after 0.3s" in t["error"] and t["saga_id"] in undone
        # the participant cancels the step at its own timeout: its effect never happens
        # (whether the orchestrator abandoned the attempt first and compensated it, or got
        # the participant's "timed out" reply first, is a race; both are right)
        await asyncio.sleep(1.2)
        assert t["saga_id"] not in applied

        d = await st.client.wait(await st.client.start("deadline", {"sleep": 1.0}), timeout=30)
        assert d["status"] == "compensated" and d["error"] == "saga deadline of 0.4s exceeded"
        assert d["saga_id"] in undone
        # the worker's run metrics saw the retries and the timeout
        sample = st.oapp.registry.get_sample_value

        def steps(saga: str, step: str, outcome: str) -> float:
            return sample("saga_step_total", {"saga": saga, "step_name": step,
                                              "outcome": outcome}) or 0.0
        assert sample("saga_step_retries_total", {"saga": "retrying", "step_name": "flaky"}) \
            == 2
        assert (steps("retrying", "flaky", "failed"), steps("retrying", "flaky", "succeeded")) \
            == (2, 1)
        # abandoned at its timeout here, or reported timed out by the participant first
        assert steps("timing-out", "slow", "timed_out") + steps("timing-out", "slow",
                                                                 "failed") == 1
        assert sample("saga_compensation_total", {"saga": "timing-out", "step_name": "first",
                                                  "outcome": "succeeded"}) == 1
        assert sample("saga_execution_total", {"saga": "deadline",
                                               "status": "compensated"}) == 1


async def test_duplicates_poison_and_idempotent_start(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [examples.order],
                     ["inventory", "payment", "shipping"]) as st:
        # idempotent start: one key, one saga, one effect
        key = f"{topic_prefix}-idem"
        data = {"order_id": key, "amount": 1}
        s1 = await st.client.start("order", data, idempotency_key=key)
        s2 = await st.client.start("order", data, idempotency_key=key)
        assert s1 == s2
        assert (await st.client.wait(s1, timeout=30))["status"] == "completed"

        # poison: undecodable bytes, a schema violation, an unknown saga id, a wrong key
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            commands = f"{topic_prefix}.commands"
            await producer.send_and_wait(commands, b"\xff\x00not json", key=b"p1")
            await producer.send_and_wait(commands, b'{"v":1,"type":"start","saga_id":"p2"}',
                                         key=b"p2")
            await producer.send_and_wait(
                f"{topic_prefix}.results",
                orjson.dumps({"v": 1, "type": "result", "saga_id": "ghost", "command_id": "x",
                              "step": "s", "attempt": 1, "action": "run", "ok": True,
                              "result": None, "error": None, "retryable": False, "set": {}}),
                key=b"ghost")
            await producer.send_and_wait(commands, b'{"v":1,"type":"cancel","saga_id":"p4",'
                                         b'"reason":"x","request_id":"r"}', key=b"other")

            # duplicates: every command and result this saga produced, delivered again
            replay = AIOKafkaConsumer(
                f"{topic_prefix}.participant.inventory", f"{topic_prefix}.participant.payment",
                f"{topic_prefix}.participant.shipping", f"{topic_prefix}.results",
                bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                group_id=f"{topic_prefix}-replay")
            await replay.start()
            copies: list[Any] = []
            try:
                quiet_since = time.monotonic()
                while time.monotonic() - quiet_since < 1.0:
                    for records in (await replay.getmany(timeout_ms=200)).values():
                        mine = [r for r in records if r.key == s1.encode()]
                        copies += mine
                        quiet_since = time.monotonic() if mine else quiet_since
            finally:
                await replay.stop()
            commands = {orjson.loads(r.value)["command_id"] for r in copies
                        if ".participant." in r.topic}
            assert len(commands) == 3  # one attempt of each step
            for r in copies:
                await producer.send_and_wait(r.topic, r.value, key=r.key)
        finally:
            await producer.stop()

        letters = await dead_letters(kafka_bootstrap, topic_prefix, 4)
        reasons = {r.key: dict(r.headers)["sagaz-reason"].decode() for r in letters}
        assert reasons[b"p1"].startswith("not JSON")
        assert "lacks field 'saga'" in reasons[b"p2"]
        assert "no saga 'ghost' here" in reasons[b"ghost"]
        assert "is not the saga id 'p4'" in reasons[b"other"]
        assert next(r.value for r in letters if r.key == b"p1") == b"\xff\x00not json"

        # the worker kept going, and the duplicates changed nothing
        after = await st.client.wait(await st.client.start(
            "order", {"order_id": f"{topic_prefix}-after"}), timeout=30)
        assert after["status"] == "completed"
        await asyncio.sleep(1.0)
        assert [examples.LEDGER[e, key] for e in ("reserve", "charge", "ship")] == [1, 1, 1]
        view = await st.client.status(s1)
        assert view is not None and view["status"] == "completed"
        assert [s["attempts"] for s in view["steps"]] == [1, 1, 1]


async def test_operator_retry_of_a_failed_saga_through_kafka(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    state = {"refund_works": False, "refunds": 0}

    async def charge(ctx: SagaContext) -> str:
        return "charged"

    async def refund(ctx: SagaContext) -> None:
        state["refunds"] += 1
        if not state["refund_works"]:
            raise RuntimeError("refund service down")

    async def ship(ctx: SagaContext) -> None:
        raise RuntimeError("no courier")

    saga = Saga("op-retry")
    saga.add_step("charge", charge, refund, participant="svc")
    saga.add_step("ship", ship, participant="svc")
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [saga], ["svc"]) as st:
        sid = await st.client.start("op-retry", {}, trace={"traceparent": "00-abc-def-01"})
        failed = await st.client.wait(sid, timeout=30)
        assert failed["status"] == "failed" and state["refunds"] == 1
        assert failed["trace"] == {"traceparent": "00-abc-def-01"}  # carried to the outcome
        state["refund_works"] = True
        await st.client.retry_compensations(sid)
        fixed = await st.client.wait(sid, timeout=30)
        assert fixed["status"] == "compensated" and state["refunds"] == 2
        view = await st.client.status(sid)
        assert view is not None and view["steps"][0]["compensation_attempts"] == 2


async def test_cancel_through_kafka_compensates_what_completed(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [examples.order],
                     ["inventory", "payment", "shipping"]) as st:
        oid = f"{topic_prefix}-cancel"
        sid = await st.client.start("order", {"order_id": oid, "delay": 0.5})
        await asyncio.sleep(0.8)  # reserve done, charge running
        await st.client.cancel(sid, reason="customer changed their mind")
        outcome = await st.client.wait(sid, timeout=30)
    assert outcome["status"] == "compensated"
    assert outcome["error"] == "customer changed their mind"
    ledger = examples.LEDGER
    # charge was running: its real outcome was awaited and, as it completed, undone too
    assert (ledger["reserve", oid], ledger["release", oid]) == (1, 1)
    assert ledger["charge", oid] == ledger["refund", oid] and ledger["ship", oid] == 0


async def test_web_views_answer_json_errors(kafka_bootstrap: str, topic_prefix: str,
                                            tmp_path: Any) -> None:
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [examples.order],
                     ["inventory", "payment", "shipping"]) as st:
        sid = await st.client.start("order", {"order_id": f"{topic_prefix}-v"})
        await st.client.wait(sid, timeout=30)
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> tuple[int, Any]:
                async with http.get(st.url + path) as resp:
                    return resp.status, orjson.loads(await resp.read())

            status, body = await get("/health/live")
            assert (status, body["status"], body["agent"]) == (200, "live", "running")
            status, body = await get("/health/ready")
            assert (status, body["status"], body["stalled"]) == (200, "ready", [])
            status, body = await get("/sagas/nope")
            assert status == 404 and body == {"error": "no saga 'nope'"}
            status, body = await get(f"/sagas/{sid}")
            assert status == 200 and body["status"] == "completed"
            status, body = await get("/sagas?status=completed&name=order&limit=5")
            assert status == 200 and body["count"] == 1 and body["sagas"][0]["saga_id"] == sid
            for bad in ("/sagas?limit=abc", "/sagas?limit=0", "/sagas?status=bogus",
                        "/sagas?colour=red"):
                status, body = await get(bad)
                assert status == 400 and "error" in body, bad
            async with http.get(st.url + "/table/sagas/") as resp:
                assert resp.status == 404  # faust's raw table endpoint is off
            async with http.get(st.url + "/metrics") as resp:
                assert b"saga_stream_events_total" in await resp.read()


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(series name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_of_a_worker_and_its_participants_move(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    """/metrics of a real worker and of participants (served as `sagaz participant` serves
    them): the catalogue's names, moving with the sagas."""
    from prometheus_client import CollectorRegistry

    from sagaz.health import HealthServer

    registry = CollectorRegistry()
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [examples.order],
                     ["inventory", "payment", "shipping"],
                     participant_options={"registry": registry}) as st:
        ok = await st.client.start("order", {"order_id": f"{topic_prefix}-m1"})
        bad = await st.client.start("order", {"order_id": f"{topic_prefix}-m2",
                                              "decline": True})
        assert (await st.client.wait(ok, timeout=30))["status"] == "completed"
        assert (await st.client.wait(bad, timeout=30))["status"] == "compensated"
        p = st.participants[1]
        async with aiohttp.ClientSession() as http, HealthServer(
                live=p.live, ready=p.ready, registry=registry) as server:
            async def get(url: str) -> dict[Any, float]:
                async with http.get(url) as resp:
                    assert resp.status == 200
                    return scrape(await resp.text())

            w = await get(st.url + "/metrics")
            part = await get(f"http://127.0.0.1:{server.port}/metrics")
    order = (("saga", "order"),)
    assert w["saga_started_total", order] == 2
    assert w["saga_execution_total", (("saga", "order"), ("status", "completed"))] == 1
    assert w["saga_execution_total", (("saga", "order"), ("status", "compensated"))] == 1
    assert w["saga_execution_duration_seconds_count",
             (("saga", "order"), ("status", "completed"))] == 1
    assert w["saga_in_flight", (("saga", "order"), ("status", "running"))] == 0
    assert w["saga_oldest_in_flight_age_seconds", order] == 0
    # durations as the participants measured them
    assert w["saga_step_duration_seconds_count",
             (("action", "run"), ("saga", "order"), ("step_name", "ship_order"))] == 1
    assert w["saga_step_total", (("outcome", "failed"), ("saga", "order"),
                                 ("step_name", "charge_payment"))] == 1
    assert w["saga_compensation_total", (("outcome", "succeeded"), ("saga", "order"),
                                         ("step_name", "reserve_inventory"))] == 1
    assert w["saga_stream_events_total", (("outcome", "applied"),)] >= 8
    assert w["saga_stream_commands_total", (("kind", "step"),)] == 5
    assert w["saga_stream_commands_total", (("kind", "compensation"),)] == 1
    assert w["saga_stream_commands_total", (("kind", "outcome"),)] == 2
    assert w["saga_stream_ready", ()] == 1 and w["saga_stream_stalled_partitions", ()] == 0
    assert w["saga_stream_rebalances_total", ()] >= 1
    assert w["saga_stream_table_recovery_seconds", ()] >= 0
    lag = {labels: v for (name, labels), v in w.items() if name == "saga_stream_consumer_lag"}
    assert {dict(labels)["topic"] for labels in lag} == {f"{topic_prefix}.commands",
                                                        f"{topic_prefix}.results",
                                                        f"{topic_prefix}.timers"}
    assert all(v == 0 for v in lag.values()), lag  # everything handled
    assert part["saga_participant_commands_total",
                (("action", "run"), ("outcome", "ok"), ("service", "payment"))] == 1
    assert part["saga_participant_commands_total",
                (("action", "run"), ("outcome", "error"), ("service", "payment"))] == 1
    assert part["saga_participant_commands_total",
                (("action", "compensate"), ("outcome", "ok"), ("service", "inventory"))] == 1
    assert part["saga_participant_step_duration_seconds_count",
                (("action", "run"), ("service", "shipping"), ("step_name", "ship_order"))] == 1
    assert part["saga_participant_ready", (("service", "payment"),)] == 1
    assert part["saga_participant_in_flight", (("service", "payment"),)] == 0
    assert {dict(labels)["service"] for (name, labels) in part
            if name == "saga_participant_consumer_lag"} == {"inventory", "payment", "shipping"}


async def test_finished_sagas_expire_from_the_table_after_the_retention(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    async with stack(kafka_bootstrap, topic_prefix, tmp_path, [examples.order],
                     ["inventory", "payment", "shipping"], retention=1.5) as st:
        sid = await st.client.start("order", {"order_id": f"{topic_prefix}-x"})
        assert (await st.client.wait(sid, timeout=30))["status"] == "completed"
        view = await st.client.status(sid)
        assert view is not None and view["expires_at"] == view["ended_at"] + 1.5
        async with asyncio.timeout(20):
            while await st.client.status(sid) is not None:
                await asyncio.sleep(0.2)
        assert st.oapp.registry.get_sample_value("saga_stream_events_total",
                                                 {"outcome": "expired"}) == 1
    # the deletion went to the changelog: nothing came back for a dead letter either
    assert await dead_letters(kafka_bootstrap, topic_prefix, 1, timeout=2) == []


async def test_worker_refuses_mismatched_partitions(kafka_bootstrap: str,
                                                   topic_prefix: str, tmp_path: Any) -> None:
    await ensure_topics(kafka_bootstrap, {f"{topic_prefix}.results": 2})
    oapp = OrchestratorApp(Settings(bootstrap=kafka_bootstrap, prefix=topic_prefix,
                                    partitions=PARTITIONS, datadir=str(tmp_path),
                                    web_port=free_port()), [examples.order])
    with pytest.raises(TopicMismatch, match=rf"{topic_prefix}.results has 2 partitions, "
                                            rf"needs {PARTITIONS}"):
        await oapp.declare_topics()


def _worker(bootstrap: str, prefix: str, datadir: str, port: int, log: Any,
            worker_id: str = "1") -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "sagaz.cli", "--bootstrap", bootstrap, "--prefix", prefix,
         "worker", "--sagas", "streams.examples", "--partitions", str(PARTITIONS),
         "--datadir", datadir, "--web-port", str(port), "--log-level", "warning",
         "--worker-id", worker_id],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def test_kill_9_the_worker_with_200_sagas_in_flight(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    n, prefix, datadir, port = 200, topic_prefix, str(tmp_path / "w"), free_port()
    url = f"http://127.0.0.1:{port}"
    services = ["inventory", "payment", "shipping"]
    participants = [Participant(s, [examples.order], bootstrap=kafka_bootstrap, prefix=prefix)
                    for s in services]
    with open(tmp_path / "worker.log", "ab") as log:
        worker = _worker(kafka_bootstrap, prefix, datadir, port, log)
        tasks: list[asyncio.Task[None]] = []
        try:
            await wait_ready(url, [worker], 90)
            tasks = [asyncio.create_task(p.run()) for p in participants]
            async with SagaClient(kafka_bootstrap, prefix=prefix, url=url) as client:
                items = orders(prefix, n, delay=0.3)  # each saga takes >= 0.9 s
                for i, item in enumerate(items):
                    item["decline"] = i % 4 == 0
                ids = await client.start_many("order", items)
                async with asyncio.timeout(60):  # kill once work is under way, not before
                    while sum(examples.LEDGER["reserve", it["order_id"]] for it in items) < 20:
                        await asyncio.sleep(0.02)
                worker.send_signal(signal.SIGKILL)  # mid-flight: no clean shutdown
                worker.wait()
                killed = time.monotonic()
                in_flight = n - sum(1 for i in ids if i in client._outcomes)  # kept outcomes
                worker = _worker(kafka_bootstrap, prefix, datadir, port, log)
                outcomes = [await client.wait(i, timeout=120) for i in ids]
                recovered = time.monotonic() - killed
        finally:
            worker.kill()
            worker.wait()
            for p in participants:
                await p.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
    print(f"\n{in_flight} of {n} sagas were in flight when the worker was killed; all ended "
          f"{recovered:.1f}s after the kill")
    assert in_flight > 0
    for item, outcome in zip(items, outcomes, strict=True):
        oid = item["order_id"]
        effects = {e: examples.LEDGER[e, oid] for e in
                   ("reserve", "release", "charge", "refund", "ship")}
        if item["decline"]:
            assert outcome["status"] == "compensated", outcome
            assert effects == {"reserve": 1, "release": 1, "charge": 0, "refund": 0,
                               "ship": 0}, oid
        else:
            assert outcome["status"] == "completed", outcome
            assert effects == {"reserve": 1, "release": 0, "charge": 1, "refund": 0,
                               "ship": 1}, oid


@pytest.mark.parametrize("backend", ["postgres", "redis"])
async def test_a_restarted_participant_answers_a_redelivered_command_from_storage(
        kafka_bootstrap: str, topic_prefix: str, backend: str, request: Any) -> None:
    """`sagaz participant --storage`: replies outlive the process, so a command redelivered
    after a restart is answered with the first reply, without running the step again."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from prometheus_client import CollectorRegistry

    from sagaz import messages
    from sagaz.machine import command_id
    from sagaz.storage import open_storage

    if backend == "postgres":
        from tests.conftest import fresh_pg_url

        url = await fresh_pg_url(request.getfixturevalue("postgres_url"))
    else:
        url = request.getfixturevalue("redis_url")
    runs: Counter[str] = Counter()

    async def charge(ctx: SagaContext) -> int:
        runs[ctx.saga_id] += 1
        return 42

    saga = Saga("pay")
    saga.add_step("charge", charge, participant="billing")
    await ensure_topics(kafka_bootstrap, {f"{topic_prefix}.participant.billing": 1,
                                          f"{topic_prefix}.results": 1})
    cid = command_id("s1", "charge", 1, "run")
    command = messages.encode("run", "s1", saga="pay", step="charge", attempt=1,
                              command_id=cid, data={}, results={})
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    results = AIOKafkaConsumer(f"{topic_prefix}.results", bootstrap_servers=kafka_bootstrap,
                               auto_offset_reset="earliest", group_id=f"{topic_prefix}-r")
    await results.start()
    replies: list[Any] = []
    try:
        for _ in range(2):  # a participant process, then its replacement after a restart
            storage = await open_storage(url, **({"prefix": topic_prefix}
                                                 if backend == "redis" else {}))
            registry = CollectorRegistry()
            participant = Participant("billing", [saga], bootstrap=kafka_bootstrap,
                                      prefix=topic_prefix, inbox=storage.replies,
                                      registry=registry)
            task = asyncio.create_task(participant.run())
            await producer.send_and_wait(f"{topic_prefix}.participant.billing", command,
                                         key=b"s1")
            async with asyncio.timeout(30):
                while len(replies) < _ + 1:
                    for records in (await results.getmany(timeout_ms=200)).values():
                        replies.extend(orjson.loads(r.value) for r in records)
            await participant.stop()
            await task
            await storage.close()
            counted = {outcome: registry.get_sample_value(
                "saga_participant_commands_total",
                {"service": "billing", "action": "run", "outcome": outcome})
                for outcome in ("ok", "replayed")}
            assert counted == ({"ok": 1.0, "replayed": None} if _ == 0 else
                               {"ok": None, "replayed": 1.0})
    finally:
        await producer.stop()
        await results.stop()
    assert runs == {"s1": 1}  # the step ran once
    assert [(r["command_id"], r["ok"], r["result"]) for r in replies] == [(cid, True, 42)] * 2


async def test_listing_sagas_gathers_every_workers_partitions(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    prefix, datadir = topic_prefix, str(tmp_path / "w")
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    participants = [Participant(s, [examples.order], bootstrap=kafka_bootstrap, prefix=prefix)
                    for s in ("inventory", "payment", "shipping")]
    tasks = [asyncio.create_task(p.run()) for p in participants]
    with open(tmp_path / "workers.log", "ab") as log:
        workers = [_worker(kafka_bootstrap, prefix, datadir, port, log, worker_id=f"w{i}")
                   for i, port in enumerate(ports)]
        try:
            await wait_ready(urls[0], workers, 90)
            await wait_ready(urls[1], workers, 90)
            async with SagaClient(kafka_bootstrap, prefix=prefix, url=urls[0]) as client:
                items = orders(prefix, 24)
                for i, item in enumerate(items):
                    item["decline"] = i % 3 == 0
                ids = await client.start_many("order", items)
                for i in ids:
                    await client.wait(i, timeout=60)

                async def listing(url: str, **query: str) -> dict[str, Any]:
                    async with aiohttp.ClientSession() as http, \
                            http.get(url + "/sagas", params=query) as resp:
                        assert resp.status == 200
                        return orjson.loads(await resp.read())

                async with asyncio.timeout(60):  # until both own partitions (rebalanced)
                    while True:
                        local = [await listing(u, scope="local", limit="100") for u in urls]
                        if all(0 < doc["count"] < 24 for doc in local):
                            break
                        await asyncio.sleep(0.5)
                assert sum(doc["count"] for doc in local) == 24
                for url in urls:  # either worker answers for all
                    every = await listing(url, limit="100")
                    assert every["workers"] == 2 and every["unreachable"] == []
                    assert sorted(v["saga_id"] for v in every["sagas"]) == sorted(ids)
                    updated = [v["updated_at"] for v in every["sagas"]]
                    assert updated == sorted(updated, reverse=True)
                declined = await listing(urls[1], status="compensated", limit="5")
                assert declined["matched"] == 8 and declined["count"] == 5
                assert all(v["status"] == "compensated" for v in declined["sagas"])
                workers[1].kill()  # a worker that does not answer is named, not skipped
                workers[1].wait()
                partial = await listing(urls[0], limit="100")
                assert [u["worker"].rstrip("/") for u in partial["unreachable"]] == [urls[1]]
                assert partial["count"] == local[0]["count"]
        finally:
            for w in workers:
                w.kill()
                w.wait()
            for p in participants:
                await p.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
