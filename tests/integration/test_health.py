"""sagaz.health over real HTTP, and the outbox worker's live()/ready() behind it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter

from sagaz.brokers import KafkaBroker, MemoryBroker
from sagaz.health import HealthServer
from sagaz.memory_storage import MemoryStorage
from sagaz.outbox import OutboxWorker
from sagaz.testing.kafka import free_port

ROOT = Path(__file__).resolve().parents[2]


class StubParticipant:
    """What the CLI hands the server for a participant: live() and ready()."""

    def __init__(self) -> None:
        self.is_live, self.is_ready = True, False

    def live(self) -> bool:
        return self.is_live

    def ready(self) -> bool:
        return self.is_ready


async def get(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}{path}") as resp:
        body = await resp.json() if resp.content_type == "application/json" \
            else await resp.text()
        return resp.status, body


async def test_health_paths_answer_from_the_checks_and_metrics_from_the_registry() -> None:
    stub = StubParticipant()
    registry = CollectorRegistry()
    Counter("sagaz_test_things", "things", registry=registry).inc(3)
    async with HealthServer(live=stub.live, ready=stub.ready, registry=registry,
                            details=lambda: {"why": "partitions not assigned"}) as server:
        assert server.port > 0
        assert await get(server.port, "/health/live") == (200, {"status": "live"})
        assert await get(server.port, "/health/ready") == (
            503, {"status": "not ready", "details": {"why": "partitions not assigned"}})
        stub.is_ready = True
        assert await get(server.port, "/health/ready") == (200, {"status": "ready"})
        stub.is_live = False
        status, body = await get(server.port, "/health/live")
        assert status == 503 and body["status"] == "not live"
        status, text = await get(server.port, "/metrics")
        assert status == 200 and "sagaz_test_things_total 3.0" in text
        assert (await get(server.port, "/nope"))[0] == 404
    with pytest.raises(aiohttp.ClientConnectionError):  # stopped: the port is closed
        await get(server.port, "/health/live")


async def test_a_check_that_raises_fails_with_its_error_masked() -> None:
    def broken() -> bool:
        raise ConnectionError("redis://app:S3cretPw@cache:6379/0 unreachable")

    async with HealthServer(live=lambda: True, ready=broken) as server:
        status, body = await get(server.port, "/health/ready")
        assert status == 503
        assert body["details"]["check_error"] == \
            "ConnectionError: redis://app:***@cache:6379/0 unreachable"
        assert (await get(server.port, "/metrics"))[0] == 404  # no registry given


async def test_health_server_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="live must be a callable"):
        HealthServer(live=True, ready=lambda: True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port must be a TCP port"):
        HealthServer(live=lambda: True, ready=lambda: True, port=70000)
    async with HealthServer(live=lambda: True, ready=lambda: True) as taken:
        other = HealthServer(live=lambda: True, ready=lambda: True, port=taken.port)
        with pytest.raises(RuntimeError, match=f"cannot serve health and metrics on "
                                               f"127.0.0.1:{taken.port}"):
            await other.start()


def worker_server(worker: OutboxWorker) -> HealthServer:
    return HealthServer(live=worker.live, ready=worker.ready, details=worker.health)


class Fatal(BaseException):
    """Not an Exception: the run loop does not catch it, and the task dies."""


async def test_an_outbox_worker_whose_run_task_died_is_not_live() -> None:
    storage = MemoryStorage()

    class DyingBroker(MemoryBroker):
        async def publish_many(self, messages: list[Any]) -> list[BaseException | None]:
            raise Fatal("the worker's task dies here")

    worker = OutboxWorker(storage.outbox, DyingBroker(), poll_interval=0.02)
    async with worker_server(worker) as server:
        assert (await get(server.port, "/health/live"))[0] == 503  # not running yet
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.1)
        assert await get(server.port, "/health/live") == (200, {"status": "live"})
        assert await get(server.port, "/health/ready") == (200, {"status": "ready"})
        await storage.outbox.insert(None, aggregate_id="a", topic="t", event_type="E",
                                    payload={})
        with pytest.raises(Fatal):
            await asyncio.wait_for(task, 5)
        status, body = await get(server.port, "/health/live")
        assert status == 503 and body["details"]["running"] is False
        assert (await get(server.port, "/health/ready"))[0] == 503


async def test_a_cancelled_or_stuck_outbox_worker_is_not_live() -> None:
    storage = MemoryStorage()
    hang = asyncio.Event()

    class Outbox:  # the memory outbox, whose claim can be made to hang
        def __getattr__(self, name: str) -> Any:
            return getattr(storage.outbox, name)

        async def claim(self, *args: Any) -> Any:
            if hang.is_set():
                await asyncio.Event().wait()
            return await storage.outbox.claim(*args)

    worker = OutboxWorker(Outbox(), MemoryBroker(), poll_interval=0.02,  # type: ignore[arg-type]
                          lease=0.1)
    assert worker.stale_after == pytest.approx(0.22)
    async with worker_server(worker) as server:
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.1)
        assert (await get(server.port, "/health/live"))[0] == 200
        hang.set()  # the loop stops making progress, the task is still there
        await asyncio.sleep(0.5)
        assert not task.done()
        status, body = await get(server.port, "/health/live")
        assert status == 503 and body["details"]["running"] is True
        assert body["details"]["seconds_since_progress"] > worker.stale_after
        hang.clear()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert (await get(server.port, "/health/live"))[0] == 503


async def test_an_outbox_worker_is_not_ready_while_claims_fail_or_the_broker_is_down(
        ) -> None:
    storage = MemoryStorage()
    failing = asyncio.Event()

    class Outbox:
        def __getattr__(self, name: str) -> Any:
            return getattr(storage.outbox, name)

        async def claim(self, *args: Any) -> Any:
            if failing.is_set():
                raise ConnectionError("postgresql://app:S3cretPw@db/app: connection refused")
            return await storage.outbox.claim(*args)

    worker = OutboxWorker(Outbox(), MemoryBroker(), poll_interval=0.02)  # type: ignore[arg-type]
    async with worker_server(worker) as server:
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.1)
        assert (await get(server.port, "/health/ready"))[0] == 200
        failing.set()
        await asyncio.sleep(0.1)
        assert (await get(server.port, "/health/live"))[0] == 200  # running, retrying
        status, body = await get(server.port, "/health/ready")
        assert status == 503 and body["details"]["storage_ok"] is False
        assert body["details"]["last_error"] == \
            "ConnectionError: postgresql://app:***@db/app: connection refused"
        failing.clear()
        await asyncio.sleep(0.1)
        assert (await get(server.port, "/health/ready"))[0] == 200
        await worker.stop()
        await task

    # a broker that is not started (Kafka never connected): live, not ready
    kafka = OutboxWorker(storage.outbox, KafkaBroker("127.0.0.1:1"), poll_interval=0.02)
    task = asyncio.create_task(kafka.run())
    await asyncio.sleep(0.1)
    assert kafka.live() and not kafka.ready() and kafka.health()["broker_started"] is False
    await kafka.stop()
    await task


async def test_outbox_run_serves_health_and_metrics_on_its_metrics_port() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagaz.cli", "outbox", "run", "--storage", "memory://",
        "--broker", "memory://", "--poll-interval", "0.05", "--metrics-port", str(port),
        "--metrics-interval", "0.1", stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        async with asyncio.timeout(30):
            while True:
                try:
                    if (await get(port, "/health/ready"))[0] == 200:
                        break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
        assert await get(port, "/health/live") == (200, {"status": "live"})
        status, text = await get(port, "/metrics")
        assert status == 200 and 'outbox_events{status="pending"} 0.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
