"""The consumer inbox, under the outbox package (the product page imports it from here):
``ConsumerInbox`` runs an event's effect once; ``InboxConsumer`` feeds a Kafka topic
through one. They live in ``sagaz.consumer_inbox``; both paths give the same classes."""

from __future__ import annotations

from sagaz.consumer_inbox import ConsumerInbox, InboxConsumer, is_infrastructure_error

__all__ = ["ConsumerInbox", "InboxConsumer", "is_infrastructure_error"]
