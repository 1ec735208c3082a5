"""Definitions versioned per run, over Kafka: a rolling update of the worker while sagas are
in flight. Workers run as processes (``sagaz worker --sagas tests.versioned_sagas:...``),
stopped and replaced the way a rollout replaces a pod; participants run here, holding both
versions (rolled first), and record in ``LEDGER`` which version's steps ran."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sagaz.client import SagaClient
from sagaz.participant import Participant
from sagaz.testing.kafka import free_port
from streams.demo import wait_ready
from tests import versioned_sagas as vs
from tests.kafka_stack import PARTITIONS, dead_letters

pytestmark = pytest.mark.kafka


def _worker(bootstrap: str, prefix: str, datadir: str, port: int, log: Any,
            sagas: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sagaz.cli", "--bootstrap", bootstrap, "--prefix", prefix,
         "worker", "--sagas", f"tests.versioned_sagas:{sagas}", "--partitions",
         str(PARTITIONS), "--datadir", datadir, "--web-port", str(port), "--log-level",
         "warning"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """A rollout's stop: SIGTERM, and wait for the process to end."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.read()


def _waiting_gauge(text: bytes) -> dict[tuple[str, str], float]:
    return {(s.labels["saga"], s.labels["version"]): s.value
            for f in text_string_to_metric_families(text.decode())
            if f.name == "saga_stream_waiting_runs" for s in f.samples}


def _orders(prefix: str, n: int, delay: float) -> list[dict[str, Any]]:
    return [{"order_id": f"{prefix}-{i}", "delay": delay} for i in range(n)]


def _ran(order_id: str) -> dict[tuple[str, str], int]:
    return {(v, step): n for (v, step, oid), n in vs.LEDGER.items() if oid == order_id and n}


class _Rollout:
    """Participants with both versions, a client, and the worker process of the moment."""

    def __init__(self, bootstrap: str, prefix: str, tmp_path: Any) -> None:
        self.bootstrap, self.prefix = bootstrap, prefix
        self.datadir = str(tmp_path / "w")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "worker.log", "ab")  # closed in close()
        self.worker: subprocess.Popen[bytes] | None = None
        self.participants = [Participant(s, vs.BOTH, bootstrap=bootstrap, prefix=prefix)
                             for s in ("vstock", "vpay")]
        self.tasks: list[asyncio.Task[None]] = []

    def run(self, sagas: str) -> None:
        if self.worker is not None:
            _stop(self.worker)
        self.worker = _worker(self.bootstrap, self.prefix, self.datadir, self.port, self.log,
                              sagas)

    async def ready(self) -> None:
        assert self.worker is not None
        await wait_ready(self.url, [self.worker], 90)

    def start_participants(self) -> None:
        self.tasks = [asyncio.create_task(p.run()) for p in self.participants]

    async def close(self) -> None:
        if self.worker is not None:
            self.worker.kill()
            self.worker.wait()
        for p in self.participants:
            await p.stop()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.log.close()

    async def wait_started(self, items: list[dict[str, Any]], at_least: int) -> None:
        async with asyncio.timeout(60):  # roll once work is under way, not before
            while sum(vs.LEDGER["v1", "reserve", it["order_id"]] for it in items) < at_least:
                await asyncio.sleep(0.02)


async def test_runs_in_flight_finish_on_v1_after_the_roll_to_v1_and_v2_new_ones_run_v2(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    n = 50
    roll = _Rollout(kafka_bootstrap, topic_prefix, tmp_path)
    try:
        roll.run("V1")
        await roll.ready()
        roll.start_participants()
        async with SagaClient(kafka_bootstrap, prefix=topic_prefix, url=roll.url) as client:
            items = _orders(topic_prefix, n, delay=1.0)  # each saga takes >= 2 s
            ids = await client.start_many("vorder", items)
            await roll.wait_started(items, 5)
            roll.run("BOTH")  # the rolling update: stop the v1 worker, start a v1+v2 one
            in_flight = n - sum(1 for i in ids if i in client._outcomes)
            rolled = time.monotonic()
            await roll.ready()
            outcomes = [await client.wait(i, timeout=120) for i in ids]
            print(f"\n{in_flight} of {n} sagas were in flight at the roll; all ended "
                  f"{time.monotonic() - rolled:.1f}s after it")
            views = [await client.status(i) for i in ids[:5]]

            fresh_items = _orders(f"{topic_prefix}-new", 5, delay=0)
            fresh = [await client.wait(i, timeout=60)
                     for i in await client.start_many("vorder", fresh_items)]
            fresh_view = await client.status(fresh[0]["saga_id"])
    finally:
        await roll.close()
    assert in_flight > 0
    for item, outcome in zip(items, outcomes, strict=True):
        assert outcome["status"] == "completed", outcome
        assert set(outcome["results"]) == {"reserve", "charge"}  # v1 has no notify
        assert _ran(item["order_id"]) == {("v1", "reserve"): 1, ("v1", "charge"): 1}
    assert all(v is not None and v["version"] == 1 and v["fingerprint"] == vs.v1.fingerprint
               for v in views)
    for item, outcome in zip(fresh_items, fresh, strict=True):
        assert outcome["status"] == "completed", outcome
        assert _ran(item["order_id"]) == {("v2", "reserve"): 1, ("v2", "charge"): 1,
                                          ("v2", "notify"): 1}
    assert fresh_view is not None and fresh_view["version"] == 2


async def test_a_worker_without_their_version_lets_runs_wait_until_one_with_it_takes_over(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    n = 20
    roll = _Rollout(kafka_bootstrap, topic_prefix, tmp_path)
    try:
        roll.run("V1")
        await roll.ready()
        roll.start_participants()
        async with SagaClient(kafka_bootstrap, prefix=topic_prefix, url=roll.url) as client:
            items = _orders(topic_prefix, n, delay=1.0)
            ids = await client.start_many("vorder", items)
            await roll.wait_started(items, 3)
            roll.run("V2")  # version 1 dropped too early
            async with asyncio.timeout(90):
                while True:
                    await asyncio.sleep(0.5)
                    try:  # the worker starts: its web server may not listen yet
                        status, body = await _get(roll.url + "/health/ready")
                    except aiohttp.ClientError:
                        continue
                    health = orjson.loads(body) if status in (200, 503) else {}
                    if health.get("definitions", {}).get("waiting"):
                        break
            await asyncio.sleep(5)  # the participants' replies reach the waiting runs
            status, body = await _get(roll.url + "/health/ready")
            health = orjson.loads(body)
            _, metrics_text = await _get(roll.url + "/metrics")
            ended_while_waiting = sum(1 for i in ids if i in client._outcomes)
            letters = await dead_letters(kafka_bootstrap, topic_prefix, 1, timeout=3)
            assert roll.worker is not None and roll.worker.poll() is None

            roll.run("BOTH")  # a worker that has version 1 takes over
            await roll.ready()
            outcomes = [await client.wait(i, timeout=120) for i in ids]
    finally:
        await roll.close()
    assert status == 503 and health["status"] == "not ready"
    [entry] = health["definitions"]["waiting"]
    assert entry["saga"] == "vorder" and entry["version"] == 1 and entry["versions_here"] == [2]
    assert 0 < entry["runs"] <= n
    assert any("waiting for a worker with saga 'vorder' version 1" in s["reason"]
               for s in health["stalled"])
    assert _waiting_gauge(metrics_text)[("vorder", "1")] == entry["runs"]
    assert letters == []  # nothing dead-lettered
    assert ended_while_waiting < n
    for item, outcome in zip(items, outcomes, strict=True):
        assert outcome["status"] == "completed", outcome
        assert _ran(item["order_id"]) == {("v1", "reserve"): 1, ("v1", "charge"): 1}
