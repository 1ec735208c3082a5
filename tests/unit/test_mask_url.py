"""mask_url: the one place URL passwords are masked, and the places that must use it."""

from __future__ import annotations

import json
import logging

import pytest

from sagaz.errors import mask_url, safe_cause, url_for_error
from sagaz.logs import JsonFormatter, TextFormatter

SECRET = "S3cretPw"


@pytest.mark.parametrize(("text", "masked"), [
    ("cannot connect to RabbitMQ at amqp://admin:S3cretPw@mq:5672/",
     "cannot connect to RabbitMQ at amqp://admin:***@mq:5672/"),
    ("'kafka://user:S3cretPw@k:9092'", "'kafka://user:***@k:9092'"),
    ("redis://:S3cretPw@r:6379/0", "redis://:***@r:6379/0"),
    # a raw '@' or ':' in the password: masked up to the host
    ("postgresql://app:S3c@ret:Pw@db/app", "postgresql://app:***@db/app"),
    ("two: amqp://a:S3cretPw@x/ and postgresql+asyncpg://b:S3cretPw@y/z",
     "two: amqp://a:***@x/ and postgresql+asyncpg://b:***@y/z"),
    ("URL('amqp://a:S3cretPw@c')", "URL('amqp://a:***@c')"),
    # '/', '#' and '?' in a password (found in review), and passwords as query parameters
    ("postgresql://u:S3/cret@h/db", "postgresql://u:***@h/db"),
    ("redis://:S3#cret@h:6379/0", "redis://:***@h:6379/0"),
    ("postgresql://h/db?user=a&password=S3cret&x=1", "postgresql://h/db?user=a&password=***&x=1"),
    ("redis://h/0?PASSWORD=S3cret", "redis://h/0?PASSWORD=***"),
    ("redis://:1234@h", "redis://:***@h"),
    # nothing to mask: no password, no user, a port, an '@' in the path
    ("postgresql://app@db:5432/app", "postgresql://app@db:5432/app"),
    ("kafka://k1:9092,k2:9092", "kafka://k1:9092,k2:9092"),
    ("http://host:8080/a@b", "http://host:8080/a@b"),
    ("user@example.com: S3cretPw-free", "user@example.com: S3cretPw-free"),
])
def test_mask_url(text: str, masked: str) -> None:
    assert mask_url(text) == masked


def test_url_for_error_hides_what_mask_url_cannot_parse() -> None:
    assert url_for_error(f"amqp://a:{SECRET}@h/") == "'amqp://a:***@h/'"
    assert url_for_error("memory://") == "'memory://'"
    assert SECRET not in url_for_error(f"amqp:/admin:{SECRET}@mq")
    assert SECRET not in url_for_error(f"admin:{SECRET}@mq:5672")


def test_safe_cause_drops_a_cause_that_shows_a_password() -> None:
    harmless = OSError("connection refused")
    assert safe_cause(harmless) is harmless
    assert safe_cause(ValueError(f"bad url amqp://a:{SECRET}@h")) is None


def test_log_lines_are_masked_in_both_formats() -> None:
    record = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1,
                               "connecting to %s failed", (f"amqp://a:{SECRET}@mq/",), None)
    record.url = f"redis://u:{SECRET}@r/0"
    try:
        raise ConnectionError(f"postgresql://p:{SECRET}@db/x refused")
    except ConnectionError:
        import sys

        record.exc_info = sys.exc_info()
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert SECRET not in line and "a:***@mq" in line and "p:***@db" in line
    doc = json.loads(JsonFormatter().format(record))
    assert doc["url"] == "redis://u:***@r/0"


def test_a_worker_setting_error_masks_the_value() -> None:
    from streams.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="bootstrap") as info:
        Settings(bootstrap=f"kafka://u:{SECRET}@k:9092")
    assert SECRET not in str(info.value) and "u:***@" in str(info.value)


async def test_the_outbox_stores_and_shows_last_errors_masked() -> None:
    """A broker error quoting its URL is stored as the event's last error, which
    `sagaz outbox dead` shows: it is masked before it is stored."""
    from sagaz.memory_storage import MemoryStorage
    from sagaz.outbox import OutboxWorker

    class Refusing:
        async def publish_many(self, messages: list) -> list:
            return [ConnectionError(f"amqp://guest:{SECRET}@mq/ refused")] * len(messages)

    storage = MemoryStorage()
    await storage.outbox.insert(None, aggregate_id="a", topic="t", event_type="E",
                                payload={})
    worker = OutboxWorker(storage.outbox, Refusing(), max_attempts=1)  # type: ignore[arg-type]
    assert await worker.run_once() == 1
    [(_, error)] = await storage.outbox.dead()
    assert SECRET not in error and "guest:***@mq" in error


async def test_step_errors_are_recorded_masked() -> None:
    """A step's error is stored in the saga's state and shown by the views: a library's
    message quoting its DSN must not carry the password there."""
    from sagaz import Saga, SagaContext

    saga = Saga("order")

    @saga.step()
    async def charge(ctx: SagaContext) -> None:
        raise ConnectionError(f"postgresql://app:{SECRET}@db/app: connection refused")

    result = await saga.execute(order_id="1")
    assert result.status.value == "compensated"
    shown = repr(result.error) + repr(result.steps)
    assert SECRET not in shown and "app:***@db" in shown
