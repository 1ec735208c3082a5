"""Fixtures for real services.

Kafka: KAFKA_BOOTSTRAP_SERVERS when set; else a testcontainers broker when a Docker engine
answers; else a broker the project starts from Maven Central jars (sagaz.testing.kafka).
PostgreSQL: SAGAZ_TEST_POSTGRES_URL when set; else a server started from the Debian
binaries (sagaz.testing.postgres); else testcontainers. Each test gets its own database.
Redis and RabbitMQ likewise (SAGAZ_TEST_REDIS_URL, SAGAZ_TEST_RABBITMQ_URL).
With CI=true a service that cannot start fails the run; elsewhere its tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(what: str, why: str) -> None:
    message = f"{what} is not available: {why}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: required services must start)", pytrace=False)
    pytest.skip(message)


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    given = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    if _docker_answers():
        try:
            from testcontainers.kafka import KafkaContainer

            with KafkaContainer() as container:
                yield container.get_bootstrap_server()
            return
        except Exception as exc:  # fall through to the local broker
            print(f"testcontainers Kafka failed ({exc}); starting a local broker")
    from sagaz.testing.kafka import KafkaToolError, LocalKafka

    broker = LocalKafka(partitions=4)
    try:
        broker.start()
    except KafkaToolError as exc:
        _unavailable("Kafka", str(exc))
    print(f"\nlocal Kafka at {broker.bootstrap_servers} started in {broker.started_in:.1f}s")
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A prefix unique to this test: tests never see each other's topics or groups."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    given = os.environ.get("SAGAZ_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    from sagaz.testing.postgres import LocalPostgres, PostgresToolError

    try:
        server = LocalPostgres().start()
    except PostgresToolError as exc:
        if _docker_answers():
            from testcontainers.postgres import PostgresContainer

            with PostgresContainer("postgres:16") as pg:
                yield pg.get_connection_url(driver=None)
            return
        _unavailable("PostgreSQL", str(exc))
    print(f"\nlocal PostgreSQL at {server.url} started in {server.started_in:.1f}s")
    try:
        yield server.url
    finally:
        server.stop()


async def fresh_pg_url(postgres_url: str) -> str:
    """The URL of a fresh, migrated database of its own."""
    import asyncpg

    from sagaz.migrations import migrate

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return url


@asynccontextmanager
async def fresh_pg_pool(postgres_url: str) -> AsyncIterator[Any]:
    """A pool on a fresh, migrated database of its own."""
    import asyncpg

    from sagaz.postgres_storage import init_connection

    pool = await asyncpg.create_pool(await fresh_pg_url(postgres_url), min_size=1,
                                     max_size=10, init=init_connection)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def pg_url(postgres_url: str) -> str:
    return await fresh_pg_url(postgres_url)


@pytest.fixture
async def pg_pool(postgres_url: str) -> AsyncIterator[Any]:
    async with fresh_pg_pool(postgres_url) as pool:
        yield pool


@pytest.fixture
async def pg_storage(postgres_url: str) -> AsyncIterator[Any]:
    from sagaz.postgres_storage import PostgresStorage

    async with fresh_pg_pool(postgres_url) as pool:
        yield PostgresStorage(pool)


def _local_service(env: str, what: str, factory: Any, container: Any) -> Iterator[str]:
    given = os.environ.get(env)
    if given:
        yield given
        return
    try:
        server = factory().start()
    except RuntimeError as exc:
        if _docker_answers():
            with container() as c:
                yield c
            return
        _unavailable(what, str(exc))
    from sagaz.errors import mask_url

    # RabbitMQ's URL carries guest:guest: no password in a log line, throwaway or not
    print(f"\nlocal {what} at {mask_url(server.url)} started in {server.started_in:.1f}s")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    from sagaz.testing.redis import LocalRedis

    def container() -> Any:
        from testcontainers.redis import RedisContainer

        class Url(RedisContainer):
            def __enter__(self) -> Any:
                super().__enter__()
                return f"redis://{self.get_container_host_ip()}:" \
                       f"{self.get_exposed_port(6379)}/0"
        return Url()

    yield from _local_service("SAGAZ_TEST_REDIS_URL", "Redis", LocalRedis, container)


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    from sagaz.testing.rabbitmq import LocalRabbitMQ

    def container() -> Any:
        from testcontainers.rabbitmq import RabbitMqContainer

        class Url(RabbitMqContainer):
            def __enter__(self) -> Any:
                super().__enter__()
                return f"amqp://guest:guest@{self.get_container_host_ip()}:" \
                       f"{self.get_exposed_port(5672)}/"
        return Url()

    yield from _local_service("SAGAZ_TEST_RABBITMQ_URL", "RabbitMQ", LocalRabbitMQ, container)
