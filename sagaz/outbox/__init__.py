"""Transactional outbox: never an event without its change, nor a change without its event.

The event is written by ``storage.outbox.insert(tx, ...)`` inside the caller's own transaction
(see ``sagaz.storage`` for what ``tx`` is on each backend). Two ways get it to the broker:

    event = await storage.outbox.insert(tx, ..., delay=5)     # in the business transaction
    await OptimisticPublisher(storage, broker).publish_after_commit(event)  # fast
    await OutboxWorker(storage, broker).run()                # the safety net, always

and on the consuming side ``ConsumerInbox`` runs each event's effect once.

The package, by part (every name is also importable from ``sagaz.outbox`` itself):

    sagaz.outbox.worker     OutboxWorker
    sagaz.outbox.publisher  OptimisticPublisher
    sagaz.outbox.inbox      ConsumerInbox, InboxConsumer (from ``sagaz.consumer_inbox``)
    sagaz.outbox.storage    PostgreSQLOutboxStorage, RedisOutboxStorage,
                            InMemoryOutboxStorage: storages built from a URL without a
                            server, connecting on first use (``sagaz.storage`` has the rest)
    sagaz.outbox.brokers    KafkaBroker, RabbitMQBroker, MemoryBroker, broker_from_url
                            (from ``sagaz.brokers``)

Names load on first access, so importing the package costs nothing until a class is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "OutboxWorker": "sagaz.outbox.worker",
    "OptimisticPublisher": "sagaz.outbox.publisher",
    "ConsumerInbox": "sagaz.consumer_inbox",
    "InboxConsumer": "sagaz.consumer_inbox",
    "OutboxEvent": "sagaz.storage",
    "OutboxError": "sagaz.storage",
    "OutboxStore": "sagaz.storage",
    "Storage": "sagaz.storage",
    "StorageError": "sagaz.storage",
    "open_storage": "sagaz.storage",
    "PostgreSQLOutboxStorage": "sagaz.outbox.storage",
    "RedisOutboxStorage": "sagaz.outbox.storage",
    "InMemoryOutboxStorage": "sagaz.outbox.storage",
    "Broker": "sagaz.brokers",
    "BrokerError": "sagaz.brokers",
    "KafkaBroker": "sagaz.brokers",
    "RabbitMQBroker": "sagaz.brokers",
    "MemoryBroker": "sagaz.brokers",
    "broker_from_url": "sagaz.brokers",
}
_SUBMODULES = ("worker", "publisher", "inbox", "storage", "brokers")

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from sagaz.brokers import (
        Broker,
        BrokerError,
        KafkaBroker,
        MemoryBroker,
        RabbitMQBroker,
        broker_from_url,
    )
    from sagaz.consumer_inbox import ConsumerInbox, InboxConsumer
    from sagaz.outbox.publisher import OptimisticPublisher
    from sagaz.outbox.storage import (
        InMemoryOutboxStorage,
        PostgreSQLOutboxStorage,
        RedisOutboxStorage,
    )
    from sagaz.outbox.worker import OutboxWorker
    from sagaz.storage import (
        OutboxError,
        OutboxEvent,
        OutboxStore,
        Storage,
        StorageError,
        open_storage,
    )
