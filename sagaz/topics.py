"""Declaring Kafka topics with the partition counts sagaz needs, and checking existing ones.

Saga state is partitioned by saga id: every topic that feeds the orchestrator must have the
same partition count as its tables' changelogs, or a saga's events land on a partition whose
local table does not hold its state. So topics are created up front, never auto-created.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from sagaz.errors import SagazError
from sagaz.security import KafkaSecurity, options, start_client

#: Every kind of topic sagaz uses, and how its name is made ({p}: the deployment's
#: prefix, {s}: a service). ``topic_name`` is the only place names are built.
TOPIC_KINDS: dict[str, str] = {
    "commands": "{p}.commands",  # start, cancel, retry: clients -> orchestrator
    "results": "{p}.results",  # step results: participants -> orchestrator
    "timers": "{p}.timers",  # timer events: orchestrator -> itself
    "outcomes": "{p}.outcomes",  # saga ends: orchestrator -> clients
    "dead-letters": "{p}.dead-letters",  # inputs that cannot be processed, with the reason
    "participant": "{p}.participant.{s}",  # commands of one service (also its group id)
    "participant-inbox": "{p}.participant.{s}.inbox",  # its replies, compacted
    "orchestrator": "{p}-orchestrator",  # the Faust app id (group id, changelog prefix)
    "changelog": "{p}-orchestrator-sagas-changelog",  # the saga table's changelog
}


def topic_name(prefix: str, kind: str, service: str | None = None) -> str:
    """The name of a topic of the deployment ``prefix``: see ``TOPIC_KINDS``."""
    pattern = TOPIC_KINDS.get(kind)
    if pattern is None:
        raise ValueError(f"unknown topic kind {kind!r}; one of {sorted(TOPIC_KINDS)}")
    if not prefix or not all(c.isalnum() or c in "._-" for c in prefix):
        raise ValueError(f"topic prefix must be non-empty [A-Za-z0-9._-], got {prefix!r}")
    if ("{s}" in pattern) != (service is not None):
        raise ValueError(f"topic kind {kind!r} " + ("needs a service" if service is None
                                                    else "takes no service"))
    if service is not None and (not service or not all(c.isalnum() or c in "._-"
                                                       for c in service)):
        raise ValueError(f"service must be non-empty [A-Za-z0-9._-], got {service!r}")
    return pattern.format(p=prefix, s=service)


class Topics:
    """Topic names of one sagaz deployment, all derived from a prefix by ``topic_name``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.commands = topic_name(prefix, "commands")
        self.results = topic_name(prefix, "results")
        self.timers = topic_name(prefix, "timers")
        self.outcomes = topic_name(prefix, "outcomes")
        self.dead_letters = topic_name(prefix, "dead-letters")
        self.changelog = topic_name(prefix, "changelog")
        self.orchestrator = topic_name(prefix, "orchestrator")
        self._participants: dict[str, str] = {}

    @property
    def inputs(self) -> tuple[str, str, str]:
        return (self.commands, self.results, self.timers)

    def participant(self, service: str) -> str:
        name = self._participants.get(service)  # per command sent: built once per service
        if name is None:
            name = self._participants[service] = topic_name(self.prefix, "participant",
                                                            service)
        return name

    def participant_inbox(self, service: str) -> str:
        return topic_name(self.prefix, "participant-inbox", service)


def topic_partition(topic: str, partition: int) -> Any:
    """aiokafka's TopicPartition, imported when first needed (aiokafka is optional)."""
    from aiokafka import TopicPartition

    return TopicPartition(topic, partition)


def producer_stopped(producer: Any) -> bool:
    """Whether an aiokafka producer was closed or its sender task died (it then sends
    nothing more, and says so nowhere): what the health checks report as dead."""
    if producer is None:
        return False
    sender = getattr(getattr(producer, "_sender", None), "_sender_task", None)
    return bool(getattr(producer, "_closed", False)) or (sender is not None and sender.done())


class TopicMismatch(SagazError, RuntimeError):
    """An existing topic has a partition count other than the one required."""


async def ensure_topics(bootstrap: str, partitions: Mapping[str, int], *,
                        replication: int = 1, check: bool = True,
                        create: bool = True,
                        configs: Mapping[str, str] | None = None,
                        security: KafkaSecurity | None = None) -> dict[str, int]:
    """Create missing topics (unless ``create`` is false); return their partition counts.

    ``security``: SASL/TLS settings of the admin client (None: PLAINTEXT). A cluster that
    cannot be reached or refuses the credentials raises KafkaConnectError, in bounded time.

    With ``check``, raise TopicMismatch naming each topic whose count differs (a missing
    topic counts as different only when it was to be created). ``configs`` are topic
    configs for the topics created here (e.g. ``{"cleanup.policy": "compact"}``).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000,
                                **options(security))
    await start_client(admin, bootstrap, security, what="topic admin client")
    try:
        existing = await _partition_counts(admin, list(partitions))
        missing = [NewTopic(name, n, replication, topic_configs=dict(configs or {}))
                   for name, n in partitions.items() if name not in existing and create]
        if missing:
            response = await admin.create_topics(missing, timeout_ms=15000)
            for name, code, *_ in getattr(response, "topic_errors", []):
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise RuntimeError(f"creating topic {name!r} failed with error code {code}")
            # CreateTopics returns when the controller has them; the broker's metadata can
            # lag a little. Wait (bounded) until they are visible before checking counts.
            created = [t.name for t in missing]
            for _ in range(100):
                found = await _partition_counts(admin, created)
                if len(found) == len(created):
                    break
                await asyncio.sleep(0.1)
            existing.update(found)
    finally:
        await admin.close()
    if check:
        wrong = {t: (existing.get(t), n) for t, n in partitions.items()
                 if existing.get(t) != n and (create or t in existing)}
        if wrong:
            detail = "; ".join(f"{t} has {have} partitions, needs {need}"
                               for t, (have, need) in sorted(wrong.items()))
            raise TopicMismatch(
                f"topic partition counts differ from the configuration ({detail}). Saga "
                f"topics must be co-partitioned with the saga tables: recreate the topics or "
                f"set the configured partition count to match")
    return existing


async def _partition_counts(admin: object, names: list[str]) -> dict[str, int]:
    # Describe only topics that exist: a metadata request for a missing topic may make a
    # broker with auto.create.topics.enable create it, with the wrong partition count.
    present = set(await admin.list_topics())  # type: ignore[attr-defined]
    names = [n for n in names if n in present]
    if not names:
        return {}
    described = await admin.describe_topics(names)  # type: ignore[attr-defined]
    out: dict[str, int] = {}
    for topic in described:
        if topic.get("error_code", 0) == 0 and topic.get("partitions"):
            out[topic["topic"]] = len(topic["partitions"])
    return out
