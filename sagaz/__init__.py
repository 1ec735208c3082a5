"""sagaz: sagas (sequences or DAGs of steps with compensations) run in-process or over Kafka.

Importing sagaz is cheap and has no side effects: no logging set-up, no network, and the
heavy parts (the engine, Kafka, Faust) load only when first used.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `from typing import ...`: importing sagaz loads nothing else

__version__ = "2.0.0.dev0"

_EXPORTS = {
    "Saga": "sagaz.definition",
    "DAGSaga": "sagaz.definition",
    "Step": "sagaz.definition",
    "SagaContext": "sagaz.context",
    "Retry": "sagaz.policy",
    "FailureStrategy": "sagaz.policy",
    "SagaStatus": "sagaz.machine",
    "StepStatus": "sagaz.machine",
    "SagaResult": "sagaz.result",
    "StepRecord": "sagaz.result",
    "Engine": "sagaz.engine",
    "InMemorySagaStore": "sagaz.store",
    "SagaStore": "sagaz.store",
    "Storage": "sagaz.storage",
    "open_storage": "sagaz.storage",
    "MemoryStorage": "sagaz.memory_storage",
    "PostgresStorage": "sagaz.postgres_storage",
    "RedisStorage": "sagaz.redis_storage",
    "OutboxWorker": "sagaz.outbox.worker",
    "OptimisticPublisher": "sagaz.outbox.publisher",
    "ConsumerInbox": "sagaz.consumer_inbox",
    "InboxConsumer": "sagaz.consumer_inbox",
    "SagazError": "sagaz.errors",
    "SagaDefinitionError": "sagaz.errors",
    "SagaContextError": "sagaz.errors",
    "SagaFailed": "sagaz.errors",
    "SagaAlreadyRunning": "sagaz.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sagaz' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from typing import Any

    from sagaz.consumer_inbox import ConsumerInbox, InboxConsumer
    from sagaz.context import SagaContext
    from sagaz.definition import DAGSaga, Saga, Step
    from sagaz.engine import Engine
    from sagaz.errors import (
        SagaAlreadyRunning,
        SagaContextError,
        SagaDefinitionError,
        SagaFailed,
        SagazError,
    )
    from sagaz.machine import SagaStatus, StepStatus
    from sagaz.memory_storage import MemoryStorage
    from sagaz.outbox import OptimisticPublisher, OutboxWorker
    from sagaz.policy import FailureStrategy, Retry
    from sagaz.postgres_storage import PostgresStorage
    from sagaz.redis_storage import RedisStorage
    from sagaz.result import SagaResult, StepRecord
    from sagaz.storage import Storage, open_storage
    from sagaz.store import InMemorySagaStore, SagaStore
