"""A real Prometheus (Debian's server, sagaz.testing.prometheus) scraping a real orchestrator
worker, participant and outbox worker, each its own `sagaz` process: the alert rules of
k8s/monitoring load, the product page's metrics are scraped, and alerts really fire.

The rules are the shipped file, but for a copy where the alerts this test waits for have
``for: 0s`` (an outage of two minutes is not a test). Prometheus scrapes and evaluates every
second.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sagaz.client import SagaClient
from sagaz.metrics import CATALOGUE, exposed_names
from sagaz.participant import Participant
from sagaz.testing.kafka import free_port
from sagaz.testing.prometheus import LocalPrometheus, PrometheusToolError, find_binary
from sagaz.topics import ensure_topics
from streams import examples
from tests.kafka_stack import PARTITIONS, dead_letters

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "monitoring" / "sagaz-alerts.rules.yml"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
EVENTS = 40
# Alerts this test waits for, evaluated without their `for:` delay.
AT_ONCE = ("DeadLettersGrowing", "OutboxWorkerDown")
JOBS = ("sagaz-orchestrator", "sagaz-participant-inventory", "sagaz-outbox-worker")


@pytest.fixture
def prometheus_binary() -> str:
    path = find_binary("prometheus")
    if path is None:
        message = "prometheus is not installed (Debian: apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"{message}; CI=true needs it", pytrace=False)
        pytest.skip(message)
    return path


def rules_for_the_test(tmp_path: Path) -> Path:
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in AT_ONCE:
                rule["for"] = "0s"
    path = tmp_path / "sagaz-alerts.rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll a (blocking, quick) check off the event loop until it returns something true."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    got = await asyncio.to_thread(check)
                except PrometheusToolError:
                    got = None
                if got:
                    return got
                await asyncio.sleep(0.3)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout}s") from None


async def http_ok(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def sagaz(*args: str, log: Any) -> Any:
    return asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagaz.cli", *args, stdout=log, stderr=log,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})


async def end(proc: Any) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def value(prom: LocalPrometheus, expr: str) -> float | None:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else None


def test_the_launcher_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="'nope' is not 'host:port'"):
        LocalPrometheus({"job": ["nope"]})
    with pytest.raises(ValueError, match="give a non-empty list of 'host:port'"):
        LocalPrometheus({"job": "127.0.0.1:80"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="job names must be words"):
        LocalPrometheus({"a job": ["127.0.0.1:80"]})
    with pytest.raises(ValueError, match="scrape_interval must be a Prometheus duration"):
        LocalPrometheus(scrape_interval="1 second")
    with pytest.raises(FileNotFoundError, match=r"rule file .*missing\.yml does not exist"):
        LocalPrometheus(rule_files=["missing.yml"])


def test_the_launcher_serves_queries_and_fails_on_a_rule_file_prometheus_rejects(
        prometheus_binary: str, tmp_path: Path) -> None:
    port = free_port()
    with LocalPrometheus({"self": [f"127.0.0.1:{port}"]}, port=port, rule_files=[RULES],
                         binary=prometheus_binary) as prom:
        up = prom.wait_for(lambda: prom.query('up{job="self"} == 1'), 20, "self scraped")
        assert up[0]["metric"]["instance"] == f"127.0.0.1:{port}"
        assert prom.targets_health() == {"self": ["up"]}
        # no orchestrator is scraped at all: pending (it has a `for:`), not yet firing
        prom.wait_for(lambda: any(a["labels"]["alertname"] == "OrchestratorDown"
                                  for a in prom.alerts()), 20, "OrchestratorDown pending")
        assert prom.firing("OrchestratorDown") == []
        with pytest.raises(PrometheusToolError, match=r"bad_data: .*parse error"):
            prom.query("sum(")
        pid = prom.proc.pid if prom.proc else None
    assert pid is not None and prom.proc is None and not prom.workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    bad = tmp_path / "bad.rules.yml"
    bad.write_text("groups: [{name: g, rules: [{alert: A, expr: 'sum(up'}]}]\n")
    with pytest.raises(PrometheusToolError, match=r"(?s)prometheus exited with status 1"
                                                  r".*unclosed left parenthesis"):
        LocalPrometheus(rule_files=[bad], binary=prometheus_binary).start()


@pytest.mark.kafka
async def test_prometheus_scrapes_worker_participant_and_outbox_and_alerts_fire(
        prometheus_binary: str, kafka_bootstrap: str, topic_prefix: str, pg_url: str,
        tmp_path: Path) -> None:
    from aiokafka import AIOKafkaProducer

    from sagaz.storage import open_storage

    prefix = topic_prefix
    web, participant_port, outbox_port = free_port(), free_port(), free_port()
    outbox_topic = f"{prefix}-outbox"
    await ensure_topics(kafka_bootstrap, {outbox_topic: 2})
    storage: Any = await open_storage(pg_url)
    async with storage.pool.acquire() as conn, conn.transaction():
        for i in range(EVENTS):
            await storage.outbox.insert(conn, aggregate_id=f"a{i % 4}", topic=outbox_topic,
                                        event_type="Counted", payload={"n": i})

    log = open(tmp_path / "processes.log", "ab")  # closed in finally
    procs: list[Any] = []
    inproc = [Participant(s, [examples.order], bootstrap=kafka_bootstrap, prefix=prefix)
              for s in ("payment", "shipping")]
    tasks: list[asyncio.Task[None]] = []
    prom = LocalPrometheus(
        {"sagaz-orchestrator": [f"127.0.0.1:{web}"],
         "sagaz-participant-inventory": [f"127.0.0.1:{participant_port}"],
         "sagaz-outbox-worker": [f"127.0.0.1:{outbox_port}"]},
        rule_files=[rules_for_the_test(tmp_path)], binary=prometheus_binary)
    try:
        common = ("--bootstrap", kafka_bootstrap, "--prefix", prefix)
        procs.append(worker := await sagaz(
            *common, "worker", "--sagas", "streams.examples", "--partitions", str(PARTITIONS),
            "--datadir", str(tmp_path / "worker"), "--web-port", str(web),
            "--log-level", "warning", log=log))
        procs.append(await sagaz(
            *common, "participant", "--service", "inventory", "--sagas", "streams.examples",
            "--datadir", str(tmp_path / "inventory"), "--metrics-port", str(participant_port),
            log=log))
        procs.append(outbox := await sagaz(
            *common, "outbox", "run", "--storage", pg_url, "--broker",
            f"kafka://{kafka_bootstrap}", "--poll-interval", "0.05", "--metrics-port",
            str(outbox_port), "--metrics-interval", "0.2", log=log))
        await asyncio.to_thread(prom.start)

        # -- the rules load: every group of the file, no rule in error ---------------------
        expected = [g["name"] for g in yaml.safe_load(RULES.read_text())["groups"]]

        def evaluated() -> list[dict[str, Any]] | None:
            groups = prom.rule_groups()
            rules = [r for g in groups for r in g["rules"]]
            return groups if rules and all(r["health"] != "unknown" for r in rules) else None

        groups = await until(evaluated, 30, "every rule evaluated once")
        assert [g["name"] for g in groups] == expected
        errors = {r["name"]: r.get("lastError") for g in groups for r in g["rules"]
                  if r["health"] != "ok"}
        assert errors == {}

        # -- every process is scraped ------------------------------------------------------
        async with asyncio.timeout(90):
            for port in (web, participant_port, outbox_port):
                while not await http_ok(f"http://127.0.0.1:{port}/health/ready"):
                    await asyncio.sleep(0.2)
        for job in JOBS:
            await until(lambda j=job: value(prom, f'up{{job="{j}"}}') == 1, 30,
                        f"{job} scraped")

        # -- work: sagas (one compensated), outbox events, a malformed input ---------------
        tasks = [asyncio.create_task(p.run()) for p in inproc]
        async with SagaClient(kafka_bootstrap, prefix=prefix,
                              url=f"http://127.0.0.1:{web}") as client:
            items = [{"order_id": f"{prefix}-{i}", "amount": 1, "decline": i == 0}
                     for i in range(5)]
            ids = await client.start_many("order", items)
            outcomes = [await client.wait(i, timeout=60) for i in ids]
        assert sorted(o["status"] for o in outcomes) == ["compensated"] + ["completed"] * 4
        async with asyncio.timeout(60):
            while (await storage.outbox.counts())["sent"] < EVENTS:
                await asyncio.sleep(0.1)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(f"{prefix}.commands", b"\xff\x00not json", key=b"p1")
        finally:
            await producer.stop()
        [letter] = await dead_letters(kafka_bootstrap, prefix, 1)
        assert dict(letter.headers)["sagaz-reason"].decode().startswith("not JSON")
        await asyncio.sleep(3)  # a few scrapes of everything that happened

        # -- an alert fires: the outbox worker goes away -----------------------------------
        await end(outbox)
        down = await until(lambda: prom.firing("OutboxWorkerDown"), 30,
                           "OutboxWorkerDown firing")
        assert down[0]["labels"]["job"] == "sagaz-outbox-worker"
        assert down[0]["labels"]["severity"] == "critical"
        assert down[0]["annotations"]["runbook_url"] == "docs/operations.md#outboxworkerdown"

        # -- the page's metrics were scraped, with what happened (needs the instrumentation
        # that exposes sagaz.metrics.CATALOGUE's names) -----------------------------------
        def last(expr: str) -> float | None:
            return value(prom, f"sum(last_over_time({expr}[5m]))")

        assert last('saga_execution_total{saga="order",status="completed"}') == 4
        assert last('saga_execution_total{saga="order",status="compensated"}') == 1
        assert last('saga_execution_duration_seconds_count{saga="order"}') == 5
        assert last('saga_step_duration_seconds_count{saga="order"}') is not None
        assert last("saga_started_total") == 5
        assert last('saga_stream_ready') == 1
        assert last('saga_participant_commands_total{service="inventory"}') is not None
        assert last('saga_participant_ready{service="inventory"}') == 1
        assert last("outbox_published_events_total") == EVENTS
        assert last("outbox_pending_events_total") == 0
        # and every sagaz series the three processes expose is in the catalogue
        # (prometheus_client adds x_created beside each counter x_total and histogram x)
        names = {r["metric"]["__name__"] for r in prom.query(
            'group by (__name__) ({__name__=~"sagaz?_.+|outbox_.+|consumer_inbox_.+"})')}
        exposed = {n for f in CATALOGUE.values() for n in exposed_names(f)}
        exposed |= {f.name.removesuffix("_total") + "_created" for f in CATALOGUE.values()
                    if f.kind in ("counter", "histogram")}
        assert names and names <= exposed, sorted(names - exposed)

        # -- the malformed input makes DeadLettersGrowing fire -----------------------------
        letters = await until(lambda: prom.firing("DeadLettersGrowing"), 30,
                              "DeadLettersGrowing firing")
        assert {a["labels"]["dead_letters"] for a in letters} == {"orchestrator"}
        assert letters[0]["labels"]["job"] == "sagaz-orchestrator"
        assert worker.returncode is None  # the worker kept going
    finally:
        await asyncio.to_thread(prom.stop)
        for p in inproc:
            await p.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proc in procs:
            await end(proc)
        log.close()
        await storage.close()
