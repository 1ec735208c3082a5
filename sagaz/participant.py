"""A participant service: runs the steps and compensations the orchestrator sends it.

    participant = Participant("payments", [order_saga], bootstrap="127.0.0.1:9092")
    await participant.run()          # until participant.stop()

It consumes ``{prefix}.participant.{service}``, runs the step's own function from the same
``Saga`` definition the in-process engine uses (steps whose ``participant`` is this service;
a step without one belongs to the service named after its saga), and publishes the result,
keyed by saga id, to ``{prefix}.results``. A command id it has answered before is answered
again from its inbox without running the step. An offset is committed (every
``commit_interval`` seconds) only after the replies up to it were acknowledged by the
broker, so a crash repeats replies, never loses them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import orjson

from sagaz import messages
from sagaz.context import SagaContext
from sagaz.definition import Saga, Step
from sagaz.errors import describe
from sagaz.inbox import Inbox, MemoryInbox
from sagaz.messages import MessageError
from sagaz.security import KafkaSecurity, options, start_client
from sagaz.topics import topic_partition

log = logging.getLogger("sagaz.participant")

_COMMANDS = frozenset({"run", "compensate"})


class Participant:
    def __init__(self, service: str, sagas: Iterable[Saga], *, bootstrap: str,
                 prefix: str = "sagaz", inbox: Inbox | None = None,
                 max_batch: int = 500, commit_interval: float = 0.2,
                 tracer: Any = None, registry: Any = None,
                 security: KafkaSecurity | None = None) -> None:
        """``registry``: a prometheus_client CollectorRegistry for the participant's metrics
        (commands by action and outcome, step seconds); None: no metrics. ``security``:
        SASL/TLS settings of its Kafka clients (None: PLAINTEXT)."""
        if not service or not all(c.isalnum() or c in "._-" for c in service):
            raise ValueError(f"service must be non-empty [A-Za-z0-9._-], got {service!r}")
        self.service = service
        self.bootstrap = bootstrap
        self.security = security
        self.prefix = prefix
        self.topic = f"{prefix}.participant.{service}"
        self.results_topic = f"{prefix}.results"
        self.dead_letters = f"{prefix}.dead-letters"
        self.inbox: Inbox = inbox if inbox is not None else MemoryInbox()
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        self.tracer = tracer  # an OpenTelemetry tracer: a span per command, in the saga's trace
        self.metrics = _Metrics(registry) if registry is not None else None
        self._done: dict[Any, int] = {}  # replied-to offsets not yet committed
        self._next_commit = 0.0
        self.steps: dict[tuple[str, str], Step] = {}
        for saga in sagas:
            saga.validate()
            for step in saga.steps.values():
                if (step.participant or saga.name) == service:
                    if step.action is None:
                        raise ValueError(f"step {step.name!r} of saga {saga.name!r} is bound "
                                         f"to {service!r} but has no action to run")
                    self.steps[(saga.name, step.name)] = step
        if not self.steps:
            raise ValueError(f"none of the given sagas has a step for service {service!r}")
        self._stopping = asyncio.Event()
        self._running: dict[str, asyncio.Future[bytes]] = {}  # command id -> its reply
        self.consumer: Any = None
        self.producer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap,
                                         enable_idempotence=True, linger_ms=0,
                                         **options(self.security))
        self.consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.bootstrap,
            group_id=f"{self.prefix}.participant.{self.service}",
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=self.max_batch, **options(self.security))
        what = f"participant {self.service!r}"
        try:
            await start_client(self.producer, self.bootstrap, self.security, what=what)
            await start_client(self.consumer, self.bootstrap, self.security, what=what)
        except BaseException:  # neither may be left open (stop() is idempotent)
            await self.producer.stop()
            await self.consumer.stop()
            raise

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve commands until ``stop()``; starts and stops its own Kafka clients."""
        await self.start()
        try:
            while not self._stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=100,
                                                      max_records=self.max_batch)
                records = [r for rs in batches.values() for r in rs]
                if records:
                    await self.process(records)
        finally:
            try:
                await self.commit()
            finally:
                await self.consumer.stop()
                await self.producer.stop()

    async def process(self, records: list[Any]) -> None:
        replies = await asyncio.gather(*(self.handle(r) for r in records))
        pending = [await self.producer.send(topic, value, key=key, headers=headers)
                   for topic, key, value, headers in replies]
        await asyncio.gather(*pending)  # every reply acknowledged before committing
        for r in records:
            self._done[topic_partition(r.topic, r.partition)] = r.offset + 1
        if time.monotonic() >= self._next_commit:  # not per batch: a commit is a round trip
            await self.commit()

    async def commit(self) -> None:
        if self._done:
            done, self._done = self._done, {}
            await self.consumer.commit(done)
        self._next_commit = time.monotonic() + self.commit_interval

    async def handle(self, record: Any) -> tuple[str, bytes | None, bytes | None, list[Any]]:
        try:
            msg = messages.decode(record.value, expect=_COMMANDS)
        except MessageError as exc:
            log.warning("dead-lettering %s@%s: %s", record.topic, record.offset, exc)
            self._count("unknown", "dead_letter")
            return (self.dead_letters, record.key, record.value, messages.dead_letter_headers(
                str(exc), record.topic, record.partition, record.offset))
        saga_id, command_id = msg["saga_id"], msg["command_id"]
        key = saga_id.encode()
        running = self._running.get(command_id)
        if running is not None:  # the same command is being run right now: share its reply
            self._count(msg["type"], "replayed")
            return self.results_topic, key, await asyncio.shield(running), []
        recorded = await self.inbox.get(self.service, command_id)
        if recorded is not None:
            self._count(msg["type"], "replayed")
            return self.results_topic, key, recorded, []
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._running[command_id] = fut
        t0 = time.perf_counter()
        try:
            if self.tracer is None:
                reply, ok = await self.execute(msg)
            else:
                from sagaz.tracing import span_for_command

                with span_for_command(self.tracer, msg):
                    reply, ok = await self.execute(msg)
            await self.inbox.put(self.service, command_id, reply)
            fut.set_result(reply)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: a waiting duplicate re-raises it
            raise
        finally:
            del self._running[command_id]
        if self.metrics is not None:
            self.metrics.seconds.labels(msg["type"]).observe(time.perf_counter() - t0)
            self._count(msg["type"], "ok" if ok else "error")
        return self.results_topic, key, reply, []

    def _count(self, action: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.commands.labels(action, outcome).inc()

    async def execute(self, msg: dict[str, Any]) -> tuple[bytes, bool]:
        """Run the command's step or compensation; its result message, and whether it
        succeeded."""
        action = msg["type"]
        step = self.steps.get((msg["saga"], msg["step"]))
        ok, result, error, retryable, changed = False, None, None, False, {}
        if step is None:
            error = f"participant {self.service!r} has no step {msg['step']!r} of saga " \
                    f"{msg['saga']!r}"
        else:
            fn = step.action if action == "run" else step.compensation_fn
            policy = step.retry if action == "run" else step.compensation_retry
            ctx = SagaContext(msg["saga_id"], msg["saga"])
            ctx.data, ctx.results = msg["data"], msg["results"]  # came as JSON: valid
            before = dict(ctx.data)
            try:
                if fn is None:
                    raise RuntimeError(f"step {step.name!r} has no compensation")
                result = await fn(ctx)
                ok = True
            except Exception as exc:
                error, retryable = describe(exc), policy.retryable(exc)
            if ok:
                changed = {k: v for k, v in ctx.data.items()
                           if k not in before or before[k] != v}
                try:
                    orjson.dumps([result, changed])
                except TypeError as exc:
                    ok, result, changed = False, None, {}
                    error = f"result of step {step.name!r} is not serialisable: {exc}"
        return messages.encode("result", msg["saga_id"], msg.get("trace"),
                               command_id=msg["command_id"],
                               step=msg["step"], attempt=msg["attempt"], action=action,
                               ok=ok, result=result, error=error, retryable=retryable,
                               set=changed), ok


class _Metrics:
    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.commands = Counter(
            "sagaz_participant_commands", "Commands by action (run/compensate) and outcome: "
            "ok, error, replayed (answered from the inbox), dead_letter",
            ["action", "outcome"], registry=registry)
        self.seconds = Histogram("sagaz_participant_command_seconds",
                                 "Time to run a step or compensation", ["action"],
                                 registry=registry,
                                 buckets=(.001, .005, .01, .05, .1, .5, 1, 5, 30, 120))
