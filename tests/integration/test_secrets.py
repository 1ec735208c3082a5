"""No password in an error, a log line or a view: every URL that reaches one is masked.

Each error here comes from a real connection attempt (a wrong password against the servers
the fixtures start, or a closed port), and must name the URL with ``user:***@`` and never
contain the password.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from sagaz.brokers import BrokerError, KafkaBroker, RabbitMQBroker, broker_from_url
from sagaz.storage import StorageError, open_storage
from sagaz.testing.kafka import free_port

SECRET = "S3cretPw"
ROOT = Path(__file__).resolve().parents[2]


def with_credentials(url: str, user: str, password: str = SECRET) -> str:
    """``url`` with its user and password replaced."""
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def assert_masked(text: str, user: str) -> None:
    assert SECRET not in text, text
    assert f"{user}:***@" in text, text


async def test_rabbitmq_wrong_password_names_the_masked_url(rabbitmq_url: str,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    url = with_credentials(rabbitmq_url, "guest")
    broker = broker_from_url(url)
    with caplog.at_level(logging.DEBUG), pytest.raises(BrokerError) as info:
        await asyncio.wait_for(broker.start(), 30)
    text = str(info.value)
    assert "cannot connect to RabbitMQ" in text and "ACCESS_REFUSED" in text
    assert_masked(text, "guest")
    assert info.value.__cause__ is not None  # the library's error, itself free of secrets
    assert SECRET not in caplog.text


async def test_rabbitmq_closed_port_names_the_masked_url() -> None:
    broker = RabbitMQBroker(f"amqp://admin:{SECRET}@127.0.0.1:{free_port()}/")
    with pytest.raises(BrokerError, match="cannot connect to RabbitMQ") as info:
        await asyncio.wait_for(broker.start(), 30)
    assert_masked(str(info.value), "admin")


async def test_postgresql_wrong_credentials_name_the_masked_url(postgres_url: str) -> None:
    # the throwaway server trusts loopback, so a user that does not exist is what fails
    url = with_credentials(postgres_url, "nobody")
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL") as info:
        await open_storage(url, min_size=1)
    assert 'role "nobody" does not exist' in str(info.value)
    assert_masked(str(info.value), "nobody")


async def test_postgresql_closed_port_and_bad_url_name_the_masked_url() -> None:
    url = f"postgresql://app:{SECRET}@127.0.0.1:{free_port()}/app"
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL") as info:
        await open_storage(url, min_size=1)
    assert_masked(str(info.value), "app")
    with pytest.raises(ValueError, match="invalid PostgreSQL URL") as bad:
        await open_storage(f"postgresql://app:{SECRET}@127.0.0.1:notaport/app")
    assert_masked(str(bad.value), "app")


async def test_redis_wrong_password_and_closed_port_name_the_masked_url(redis_url: str) -> None:
    with pytest.raises(StorageError, match="cannot connect to Redis") as info:
        await open_storage(with_credentials(redis_url, "app"))
    assert "AuthenticationError" in str(info.value)
    assert_masked(str(info.value), "app")
    with pytest.raises(StorageError, match="cannot connect to Redis") as closed:
        await open_storage(f"redis://app:{SECRET}@127.0.0.1:{free_port()}/0")
    assert_masked(str(closed.value), "app")
    with pytest.raises(ValueError, match="invalid Redis URL") as bad:
        await open_storage(f"redis://app:{SECRET}@127.0.0.1:notaport/0")
    assert_masked(str(bad.value), "app")


def test_mistyped_urls_are_rejected_masked() -> None:
    with pytest.raises(ValueError, match="unknown broker URL scheme") as info:
        broker_from_url(f"amqps+x://admin:{SECRET}@mq:5671/")
    assert_masked(str(info.value), "admin")
    with pytest.raises(ValueError, match="carries credentials") as kafka:
        broker_from_url(f"kafka://user:{SECRET}@127.0.0.1:9092")
    assert_masked(str(kafka.value), "user")
    with pytest.raises(ValueError, match="no scheme://") as noscheme:
        broker_from_url(f"admin:{SECRET}@mq:5672")
    assert SECRET not in str(noscheme.value)
    with pytest.raises(ValueError, match="unknown storage URL") as storage:
        asyncio.run(open_storage(f"postgress://app:{SECRET}@db/app"))
    assert_masked(str(storage.value), "app")


async def test_kafka_closed_port_is_a_clear_error() -> None:
    broker = KafkaBroker(f"127.0.0.1:{free_port()}", request_timeout_ms=2000)
    with pytest.raises(BrokerError, match=r"cannot connect to Kafka at 127\.0\.0\.1:\d+ "
                                          r"\(PLAINTEXT\): .*connection refused"):
        await asyncio.wait_for(broker.start(), 60)


def sagaz(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sagaz.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_the_cli_prints_connection_errors_masked(postgres_url: str,
                                                 rabbitmq_url: str) -> None:
    pg = with_credentials(postgres_url, "nobody")
    for args in (["outbox", "status", "--storage", pg],
                 ["db", "migrate", "--url", pg],
                 ["outbox", "run", "--storage", "memory://", "--broker",
                  with_credentials(rabbitmq_url, "guest")],
                 ["outbox", "status", "--storage", f"postgress://nobody:{SECRET}@db/x"]):
        out = sagaz(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert "sagaz: error: " in out.stderr, out.stderr
        assert SECRET not in out.stderr + out.stdout, out.stderr
        assert ":***@" in out.stderr, out.stderr
