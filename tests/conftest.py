"""Fixtures for real services.

Kafka: KAFKA_BOOTSTRAP_SERVERS when set; else a testcontainers broker when a Docker engine
answers; else a broker the project starts from Maven Central jars (sagaz.testing.kafka).
With CI=true a broker that cannot start fails the run; elsewhere the Kafka tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

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
