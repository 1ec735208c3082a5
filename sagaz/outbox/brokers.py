"""The outbox's brokers, under the outbox package (the product page imports them from
here). They live in ``sagaz.brokers``; both paths give the same classes.

    KafkaBroker(bootstrap_servers="host:9092")   # or KafkaBroker("host:9092")

Nothing connects when a broker is built; ``OptimisticPublisher`` and ``OutboxWorker``
start it on their first publish if nobody called ``start()``."""

from __future__ import annotations

from sagaz.brokers import (
    Broker,
    BrokerError,
    KafkaBroker,
    MemoryBroker,
    RabbitMQBroker,
    Skipped,
    broker_from_url,
)

__all__ = ["Broker", "BrokerError", "KafkaBroker", "MemoryBroker", "RabbitMQBroker",
           "Skipped", "broker_from_url"]
