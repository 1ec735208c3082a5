"""Message brokers the outbox publishes to, chosen by URL.

    kafka://host:port[,host:port]   aiokafka, idempotent producer, keyed by aggregate id
                                    (``security=``: a sagaz.security.KafkaSecurity)
    amqp://user:pass@host:port/     RabbitMQ via aio-pika, publisher confirms, durable exchange
    memory://                       in-process, for tests of code above the broker

``publish`` returns only once the broker acknowledged the message; it raises otherwise.
``publish_many`` reports each message's outcome, so a partly failed batch is not retried
whole. Messages with one key are published in the order they were given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from sagaz.errors import SagazError, mask_url, safe_cause, url_for_error

if TYPE_CHECKING:
    from sagaz.security import KafkaSecurity


class BrokerError(SagazError, RuntimeError):
    pass


class Skipped(BrokerError):
    """Not sent, because an earlier message with the same key failed in the same call."""


class Broker(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, topic: str, key: str, value: bytes,
                      headers: dict[str, str] | None = None) -> None: ...

    async def publish_many(self, messages: list[tuple[str, str, bytes,
                                                      dict[str, str] | None]]
                           ) -> list[BaseException | None]:
        """Publish in order; when all are settled, return each one's error (None: acked)."""
        ...


async def start_if_needed(broker: Any) -> None:
    """Start a broker that is not started yet (``OptimisticPublisher`` and ``OutboxWorker``
    call it before publishing, so a broker built without a server needs no explicit
    ``start()``). Concurrent callers start it once; a broker without a ``started``
    attribute counts as started."""
    if getattr(broker, "started", True):
        return
    lock = getattr(broker, "_start_lock", None)
    if lock is None:
        await broker.start()
        return
    async with lock:
        if not broker.started:
            await broker.start()


class _PublishOne:
    """``publish`` for brokers that implement ``publish_many``."""

    async def publish_many(self, messages: list[tuple[str, str, bytes,
                                                      dict[str, str] | None]]
                           ) -> list[BaseException | None]:
        raise NotImplementedError

    async def publish(self, topic: str, key: str, value: bytes,
                      headers: dict[str, str] | None = None) -> None:
        [error] = await self.publish_many([(topic, key, value, headers)])
        if error is not None:
            raise BrokerError(f"publish to {topic!r} failed: {type(error).__name__}: {error}")


class MemoryBroker:
    def __init__(self) -> None:
        self.topics: dict[str, list[tuple[str, bytes, dict[str, str]]]] = defaultdict(list)

    @property
    def started(self) -> bool:
        """Always usable (``OutboxWorker.ready`` asks each broker)."""
        return True

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def publish(self, topic: str, key: str, value: bytes,
                      headers: dict[str, str] | None = None) -> None:
        self.topics[topic].append((key, value, dict(headers or {})))

    async def publish_many(self, messages: list[tuple[str, str, bytes,
                                                      dict[str, str] | None]]
                           ) -> list[BaseException | None]:
        for m in messages:
            await self.publish(*m)
        return [None] * len(messages)


class KafkaBroker(_PublishOne):
    def __init__(self, bootstrap: str | None = None, *, bootstrap_servers: str | list[str]
                 | None = None, linger_ms: int = 2, request_timeout_ms: int = 10000,
                 security: KafkaSecurity | None = None, **producer_options: Any) -> None:
        """``bootstrap`` (or, as aiokafka names it, ``bootstrap_servers``: one of the two)
        is ``host:port[,host:port]`` or a list of ``host:port``. Nothing connects here:
        ``start()`` does, or the first publish through ``OptimisticPublisher`` or
        ``OutboxWorker``. ``security``: SASL/TLS settings (None: PLAINTEXT);
        ``producer_options`` go to AIOKafkaProducer as they are."""
        if (bootstrap is None) == (bootstrap_servers is None):
            raise TypeError("KafkaBroker needs the Kafka address once: bootstrap or "
                            "bootstrap_servers ('host:port[,host:port]')")
        given = bootstrap if bootstrap is not None else bootstrap_servers
        name = "bootstrap" if bootstrap is not None else "bootstrap_servers"
        if isinstance(given, (list, tuple)) and given and all(
                isinstance(b, str) and b for b in given):
            given = ",".join(given)
        if not isinstance(given, str) or not given.strip():
            raise ValueError(f"{name} must be 'host:port[,host:port]' or a list of "
                             f"'host:port', got {mask_url(repr(given))}")
        self.bootstrap = given
        self._start_lock = asyncio.Lock()
        self.security = security
        self.options = {"linger_ms": linger_ms, "request_timeout_ms": request_timeout_ms,
                        **producer_options}
        self.producer: Any = None

    @property
    def started(self) -> bool:
        """start() succeeded and stop() was not called (aiokafka reconnects by itself)."""
        return self.producer is not None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        from sagaz.security import KafkaConnectError, options, start_client

        # Idempotent: a retried produce is not duplicated, and per-partition order holds.
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True,
                                    **{**options(self.security), **self.options})
        try:
            await start_client(producer, self.bootstrap, self.security,
                               what="outbox Kafka producer")
        except KafkaConnectError as exc:
            raise BrokerError(mask_url(str(exc))) from None  # it names the servers
        except BaseException:  # cancelled while starting: leave nothing open
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        # only now: `started` (and publish) must not see a producer still connecting
        self.producer = producer

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def publish_many(self, messages: list[tuple[str, str, bytes,
                                                      dict[str, str] | None]]
                           ) -> list[BaseException | None]:
        if self.producer is None:
            raise BrokerError("broker not started")
        futures = []
        refused: set[str] = set()  # keys with a message refused here: send none after it
        loop = asyncio.get_running_loop()
        for topic, key, value, headers in messages:
            try:
                if key in refused:
                    raise Skipped(f"an earlier message with key {key!r} failed")
                futures.append(await self.producer.send(
                    topic, value, key=key.encode(),
                    headers=[(k, v.encode()) for k, v in (headers or {}).items()]))
            except Exception as exc:  # not even queued
                refused.add(key)
                failed: asyncio.Future[None] = loop.create_future()
                failed.set_exception(exc)
                futures.append(failed)
        results = await asyncio.gather(*futures, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]


class RabbitMQBroker(_PublishOne):
    """aio-pika, publisher confirms, a durable topic exchange; the topic is the routing key.

    Messages are persistent; the aggregate key travels as the ``sagaz-key`` header and as
    ``correlation_id``. ``publish_many`` publishes in order on one channel and returns once
    the broker confirmed (or refused) each message.
    """

    def __init__(self, url: str, *, exchange: str = "sagaz") -> None:
        self.url, self.exchange_name = url, exchange
        self._start_lock = asyncio.Lock()
        self.connection: Any = None
        self.exchange: Any = None

    @property
    def started(self) -> bool:
        """start() succeeded and the connection is up (not closed, not reconnecting)."""
        return (self.exchange is not None and not self.connection.is_closed
                and self.connection.connected.is_set())

    async def start(self) -> None:
        import aio_pika

        try:
            self.connection = await aio_pika.connect_robust(self.url)
            channel = await self.connection.channel(publisher_confirms=True)
            self.exchange = await channel.declare_exchange(
                self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        except Exception as exc:
            raise BrokerError(f"cannot connect to RabbitMQ at {url_for_error(self.url)}: "
                              f"{type(exc).__name__}: {mask_url(str(exc))}") from safe_cause(exc)

    async def stop(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = self.exchange = None

    async def publish_many(self, messages: list[tuple[str, str, bytes,
                                                      dict[str, str] | None]]
                           ) -> list[BaseException | None]:
        import aio_pika

        if self.exchange is None:
            raise BrokerError("broker not started")
        pending = [self.exchange.publish(
            aio_pika.Message(value, headers={**(headers or {}), "sagaz-key": key},
                             correlation_id=key,
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=topic) for topic, key, value, headers in messages]
        results = await asyncio.gather(*pending, return_exceptions=True)
        return [r if isinstance(r, BaseException) else None for r in results]


def broker_from_url(url: str, *, security: KafkaSecurity | None = None,
                    **options: Any) -> Broker:
    """The broker a URL names; ``security`` (SASL/TLS) applies to kafka:// only. Every
    error names the URL with its password masked."""
    parts = urlsplit(url)
    if security is not None and parts.scheme != "kafka":
        raise ValueError(f"security= (Kafka SASL/TLS settings) applies to kafka:// URLs, "
                         f"not {parts.scheme}://")
    if parts.scheme == "kafka":
        if not parts.netloc:
            raise ValueError(f"kafka URL needs host:port, got {mask_url(url)!r}")
        if "@" in parts.netloc:
            # aiokafka would take 'user:pw@host' for a host name (and print it back); Kafka
            # credentials are SASL settings, not part of the bootstrap address.
            raise ValueError(f"kafka URL {mask_url(url)!r} carries credentials: give host:port "
                             f"only, and the credentials as SAGAZ_KAFKA_SASL_USERNAME and "
                             f"SAGAZ_KAFKA_SASL_PASSWORD")
        return KafkaBroker(parts.netloc, security=security, **options)
    if parts.scheme == "memory":
        return MemoryBroker()
    if parts.scheme in ("amqp", "amqps"):
        return RabbitMQBroker(url, **options)
    raise ValueError(f"unknown broker URL scheme {parts.scheme!r} in {url_for_error(url)}; "
                     f"use kafka://, amqp:// or memory://")
