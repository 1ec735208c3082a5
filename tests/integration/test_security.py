"""Secured Kafka clusters, for real: one local broker with SASL_PLAINTEXT, SASL_SSL and
(mutual) SSL listeners, and every Kafka client of sagaz going through each of them.

Topics are made by ensure_topics and an outbox KafkaBroker publish is read back by an
InboxConsumer through each listener; a saga runs end to end (an orchestrator worker, a
participant, a SagaClient and the ``sagaz start`` command line) through SASL_SSL and mTLS.
A wrong password or a mismatched listener is a KafkaConnectError naming the bootstrap and
the mechanism, in seconds, never with the password.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from sagaz import Saga, SagaContext
from sagaz.brokers import BrokerError, KafkaBroker
from sagaz.client import SagaClient
from sagaz.consumer_inbox import InboxConsumer
from sagaz.memory_storage import MemoryStorage
from sagaz.participant import Participant
from sagaz.security import KafkaConnectError, KafkaSecurity
from sagaz.testing.kafka import free_port
from sagaz.topics import ensure_topics
from streams.app import OrchestratorApp
from streams.config import Settings

pytestmark = pytest.mark.kafka
PARTITIONS = 2
USER, PASSWORD = "alice", "alice-Pa55word-7f3e"
WRONG = "not-the-Pa55word-91c2"

vault = Saga("vault")


@vault.step(participant="keeper")
async def store_secret(ctx: SagaContext) -> dict[str, str]:
    return {"stored": ctx["item"]}


@pytest.fixture(scope="module")
def secured() -> Iterator[Any]:
    """One broker, every secured listener (a broker start costs seconds: one for all)."""
    from sagaz.testing.kafka import KafkaToolError, LocalKafka
    from tests.conftest import _unavailable

    broker = LocalKafka(secure=("SASL_PLAINTEXT", "SASL_SSL", "SSL"), users={USER: PASSWORD},
                        partitions=PARTITIONS)
    try:
        broker.start()
    except KafkaToolError as exc:
        _unavailable("a local Kafka broker with secured listeners", str(exc))
    try:
        yield broker
    finally:
        broker.stop()


def security_for(broker: Any, case: str, password: str = PASSWORD) -> tuple[str, KafkaSecurity]:
    """(bootstrap, security) of one secured listener of ``broker``."""
    if case == "SCRAM-SHA-256":
        return broker.listener("SASL_PLAINTEXT"), KafkaSecurity(
            "SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256", sasl_username=USER,
            sasl_password=password)
    if case == "SCRAM-SHA-512+TLS":
        return broker.listener("SASL_SSL"), KafkaSecurity(
            "SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username=USER,
            sasl_password=password, ssl_cafile=broker.ca_file)
    assert case == "mTLS"
    return broker.listener("SSL"), KafkaSecurity(
        "SSL", ssl_cafile=broker.ca_file, ssl_certfile=broker.client_cert,
        ssl_keyfile=broker.client_key)


def cli_args(security: KafkaSecurity) -> tuple[list[str], dict[str, str]]:
    """Flags for all settings but the password, which comes from the environment."""
    flags = ["--kafka-security-protocol", security.security_protocol]
    for name in ("sasl_mechanism", "sasl_username", "ssl_cafile", "ssl_certfile",
                 "ssl_keyfile"):
        value = getattr(security, name)
        if value is not None:
            flags += ["--kafka-" + name.replace("_", "-"), value]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAZ_KAFKA_")}
    if security.sasl_password:
        env["SAGAZ_KAFKA_SASL_PASSWORD"] = security.sasl_password
    env["PYTHONPATH"] = os.getcwd()
    return flags, env


@asynccontextmanager
async def worker_and_participant(bootstrap: str, security: KafkaSecurity, prefix: str,
                                 tmp_path: Any) -> AsyncIterator[str]:
    port = free_port()
    oapp = OrchestratorApp(Settings(bootstrap=bootstrap, prefix=prefix, partitions=PARTITIONS,
                                    datadir=str(tmp_path / "worker"), web_port=port,
                                    security=security), [vault])
    await oapp.start()
    participant = Participant("keeper", [vault], bootstrap=bootstrap, prefix=prefix,
                              security=security)
    task = asyncio.create_task(participant.run())
    try:
        async with asyncio.timeout(60):
            while not oapp.ready():
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        await participant.stop()
        await asyncio.gather(task, return_exceptions=True)
        await oapp.stop()


async def outbox_to_inbox(bootstrap: str, security: KafkaSecurity, prefix: str) -> None:
    """ensure_topics, an outbox KafkaBroker publish, an InboxConsumer reading it back."""
    topic = f"{prefix}.events"
    assert await ensure_topics(bootstrap, {topic: PARTITIONS}, security=security) == \
        {topic: PARTITIONS}
    broker = KafkaBroker(bootstrap, security=security)
    await broker.start()
    try:
        await broker.publish(topic, "a-1", orjson.dumps({"n": 1}),
                             {"event-id": "e-1", "event-type": "Stored"})
    finally:
        await broker.stop()
    seen: list[Any] = []

    async def handle(payload: Any, tx: Any) -> None:
        seen.append(payload)
        await inbox.stop()

    inbox = InboxConsumer(MemoryStorage(), "audit", [topic], handle, bootstrap=bootstrap,
                          group_id=f"{prefix}-audit", security=security)
    await asyncio.wait_for(inbox.run(), 30)
    assert seen == [{"n": 1}]


@pytest.mark.parametrize(("case", "saga"), [("SCRAM-SHA-256", False),
                                            ("SCRAM-SHA-512+TLS", True), ("mTLS", True)])
async def test_every_client_works_through_a_secured_listener(
        secured: Any, case: str, saga: bool, topic_prefix: str, tmp_path: Any) -> None:
    """Each listener: topics, outbox and inbox. With ``saga`` (a worker start costs seconds:
    SASL over TLS and mutual TLS cover what Faust and the CLI do with SASL and with TLS
    files), also a saga through a worker, a participant, a client and ``sagaz start``."""
    bootstrap, security = security_for(secured, case)
    # (run side by side with the worker's start: the file stays quick)
    outbox = asyncio.create_task(outbox_to_inbox(bootstrap, security, topic_prefix))
    if not saga:
        await outbox
        return
    async with worker_and_participant(bootstrap, security, topic_prefix, tmp_path) as url:
        async with SagaClient(bootstrap, prefix=topic_prefix, url=url,
                              security=security) as client:
            flags, env = cli_args(security)  # the password comes from the environment
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sagaz.cli", "--bootstrap", bootstrap, "--prefix",
                topic_prefix, *flags, "start", "vault", "--data", '{"item": "key-2"}',
                "--wait", "--timeout", "30", env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            sid = await client.start("vault", {"item": "key-1"})
            outcome = await client.wait(sid, timeout=30)
            assert outcome["status"] == "completed"
            assert outcome["results"]["store_secret"] == {"stored": "key-1"}
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            assert '"stored": "key-2"' in out.decode()
            assert '"status": "completed"' in out.decode()
    await outbox


async def test_a_wrong_password_is_a_clear_error_in_bounded_time(
        secured: Any, topic_prefix: str, tmp_path: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bootstrap, security = security_for(secured, "SCRAM-SHA-256", password=WRONG)
    inbox = InboxConsumer(MemoryStorage(), "audit", ["x"], lambda p, tx: None,
                          bootstrap=bootstrap, security=security)  # type: ignore[arg-type]
    settings = Settings(bootstrap=bootstrap, prefix=topic_prefix, partitions=PARTITIONS,
                        datadir=str(tmp_path / "w"), web_port=free_port(), security=security)
    attempts: dict[str, Any] = {
        "ensure_topics": lambda: ensure_topics(bootstrap, {f"{topic_prefix}.t": 1},
                                               security=security),
        "participant": Participant("keeper", [vault], bootstrap=bootstrap,
                                   security=security).run,
        "saga client": SagaClient(bootstrap, prefix=topic_prefix, security=security)
        .start_client,
        "inbox consumer": inbox.run,
        "outbox broker": KafkaBroker(bootstrap, security=security).start,
        "worker": OrchestratorApp(settings, [vault]).start,
    }
    for what, attempt in attempts.items():
        t0 = time.monotonic()
        with pytest.raises((KafkaConnectError, BrokerError)) as info:
            await asyncio.wait_for(attempt(), 20)
        message = str(info.value)
        assert time.monotonic() - t0 < 10, what
        assert bootstrap in message and "SCRAM-SHA-256" in message, (what, message)
        assert "authentication failed" in message and repr(USER) in message, (what, message)
        assert WRONG not in message and WRONG not in repr(info.value), what
    del attempts, inbox, attempt  # a client left open says so when collected
    gc.collect()
    assert "Unclosed" not in caplog.text
    # the command line: exit 2 with the same message, the password in no output
    flags, env = cli_args(security)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sagaz.cli", "--bootstrap", bootstrap, *flags,
        "start", "vault", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, err.decode()
    assert "authentication failed" in err.decode() and "SCRAM-SHA-256" in err.decode()
    assert WRONG not in (out + err).decode()
    assert WRONG not in caplog.text


async def test_a_listener_that_speaks_another_protocol_is_named_in_the_error(
        secured: Any) -> None:
    cases = [
        # a plaintext client at a SASL listener, a SASL client at a TLS one
        (secured.listener("SASL_PLAINTEXT"), None, "closed the connection"),
        (secured.listener("SSL"), security_for(secured, "SCRAM-SHA-256")[1], "closed"),
        # TLS without the CA that signed the broker, and without the client certificate
        (secured.listener("SASL_SSL"), KafkaSecurity(
            "SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username=USER,
            sasl_password=PASSWORD), "certificate was not accepted"),
        (secured.listener("SSL"), KafkaSecurity("SSL", ssl_cafile=secured.ca_file),
         "require a client certificate"),
    ]
    for bootstrap, security, expected in cases:
        t0 = time.monotonic()
        with pytest.raises(KafkaConnectError) as info:
            await ensure_topics(bootstrap, {f"t{uuid.uuid4().hex[:8]}": 1}, security=security)
        assert time.monotonic() - t0 < 10
        assert bootstrap in str(info.value) and expected in str(info.value), str(info.value)
        assert PASSWORD not in str(info.value)
