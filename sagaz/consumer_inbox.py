"""Consumer inbox: a handler's effect and its dedup marker commit together.

    inbox = ConsumerInbox(storage, "billing")
    result = await inbox.process_idempotent(event_id, "orders", "OrderPaid", payload, handle)

``handle(payload, tx)`` runs in the transaction that records the marker keyed by
(consumer, event id), and must do its own writes through ``tx`` (an asyncpg connection on
PostgreSQL, a MULTI/EXEC pipeline on Redis, None in memory; ``sagaz.storage``). If it
raises, nothing commits, no marker remains, and a redelivery runs it again. A handler that
takes one argument, ``handle(payload)``, is called without ``tx``: for effects outside the
storage (an HTTP call, another database), which then commit on their own, before the marker
(a crash between the two runs it again on redelivery: make such an effect idempotent). A duplicate
returns the first run's (JSON) result without calling the handler; racing duplicates
commit once (PostgreSQL and memory make the second wait; Redis lets both run and commits
the first, see ``RedisStorage.process_idempotent``). ``InboxConsumer`` feeds a Kafka
topic of outbox events through an inbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from sagaz.errors import SagazError, describe
from sagaz.messages import dead_letter_headers
from sagaz.metrics import InboxConsumerMetrics, InboxMetrics, shared
from sagaz.security import KafkaSecurity, options, start_client
from sagaz.storage import Handler, Storage, check_inbox_args
from sagaz.topics import ensure_topics, topic_name

log = logging.getLogger("sagaz.consumer_inbox")


def with_tx(handler: Any) -> Handler:
    """``handler`` as the storages call it, ``(payload, tx)``: a handler taking two
    positional arguments (or ``*args``) as it is, one taking one wrapped to drop ``tx``.
    Anything else is refused here, naming the handler, rather than failing inside the
    transaction."""
    import inspect

    if not callable(handler):
        raise TypeError(f"handler must be an async function of (payload) or (payload, tx), "
                        f"got {handler!r}")
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): as before, two
        return handler
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return handler
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in params if p.default is p.empty
                and p.kind is not p.VAR_KEYWORD]
    if len(positional) >= 2 and len(required) <= 2:
        return handler
    if len(positional) == 1 and len(required) <= 1:
        async def without_tx(payload: Any, tx: Any) -> Any:
            return await handler(payload)

        return without_tx
    raise TypeError(f"handler {getattr(handler, '__qualname__', handler)!r} must take "
                    f"(payload) or (payload, tx), it takes ({', '.join(map(str, params))})")


class ConsumerInbox:
    def __init__(self, storage: Storage, consumer_name: str, *, registry: Any = None) -> None:
        """``registry``: a prometheus_client CollectorRegistry for the ``consumer_inbox_*``
        families (processed, duplicates, handler errors, processing time; None: no
        metrics)."""
        check_inbox_args(consumer_name, "-", "-", "-")
        if not hasattr(storage, "process_idempotent"):
            raise TypeError(f"storage must be a sagaz Storage (PostgresStorage, RedisStorage, "
                            f"MemoryStorage), got {storage!r}")
        self.storage, self.consumer = storage, consumer_name
        self.metrics = shared(InboxMetrics, registry) if registry is not None else None

    async def process_idempotent(self, event_id: str, source_topic: str, event_type: str,
                                 payload: Any, handler: Handler | Callable[[Any],
                                                                           Awaitable[Any]]
                                 ) -> Any:
        """Run ``handler(payload, tx)`` or ``handler(payload)`` once per ``event_id``,
        recording its JSON result; a duplicate returns that first result without running
        the handler."""
        metrics = self.metrics
        if metrics is None:
            return await self.storage.process_idempotent(
                self.consumer, event_id, source_topic, event_type, payload, with_tx(handler))
        inner, ran, consumer = with_tx(handler), False, self.consumer

        async def counted(payload: Any, tx: Any) -> Any:
            nonlocal ran
            ran = True
            try:
                return await inner(payload, tx)
            except Exception:
                metrics.handler_errors(consumer).inc()
                raise

        t0 = time.perf_counter()
        result = await self.storage.process_idempotent(consumer, event_id, source_topic,
                                                       event_type, payload, counted)
        if ran:  # the handler ran and its marker committed: handled for the first time
            metrics.processed(consumer).inc()
            metrics.seconds(consumer).observe(time.perf_counter() - t0)
        else:  # answered from the marker
            metrics.duplicates(consumer).inc()
        return result

    async def seen(self, event_id: str) -> bool:
        return await self.storage.seen(self.consumer, event_id)


class InboxConsumer:
    """Consume outbox events from Kafka through a ``ConsumerInbox``: each event's effect
    once, whatever the broker redelivers.

        consumer = InboxConsumer(storage, "billing", ["orders"], handle,
                                 bootstrap="127.0.0.1:9092")
        await consumer.run()        # until consumer.stop()

    Records are handled one at a time, in partition order, and an offset is committed only
    after its record was handled (or dead-lettered): a crash repeats records, which the
    inbox answers from its marker. The event id and type come from the ``event-id`` and
    ``event-type`` headers the outbox sets; the value must be JSON. A malformed record
    (missing, empty or null headers, a value that is not JSON), or one whose handler still
    fails after ``max_attempts`` (with backoff), goes to ``dead_letter_topic`` (created at
    start) with the reason in the ``sagaz-reason`` header and its original bytes, and
    consumption moves on. Infrastructure errors (the storage or the broker unreachable:
    connection errors and time-outs, wherever they come from) are not the record's fault:
    they are retried with backoff for as long as they last and never count as an attempt,
    so an outage dead-letters nothing.
    """

    def __init__(self, storage: Storage, consumer_name: str, topics: list[str],
                 handler: Handler | Callable[[Any], Awaitable[Any]], *, bootstrap: str,
                 group_id: str | None = None,
                 dead_letter_topic: str | None = None, max_attempts: int = 5,
                 backoff: float = 0.5, max_backoff: float = 30.0,
                 security: KafkaSecurity | None = None, registry: Any = None) -> None:
        """``registry``: a prometheus_client CollectorRegistry for the ``consumer_inbox_*``
        families, its ConsumerInbox's and the dead letters by reason (malformed,
        handler_failed); None: no metrics."""
        self.inbox = ConsumerInbox(storage, consumer_name, registry=registry)
        self.metrics = (shared(InboxConsumerMetrics, registry) if registry is not None
                        else None)
        if not topics or not all(isinstance(t, str) and t for t in topics):
            raise ValueError(f"topics must be a non-empty list of topic names, got {topics!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) \
                or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        for name, value in (("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.topics, self.bootstrap = list(topics), bootstrap
        self.handler = with_tx(handler)  # (payload) or (payload, tx), called as the latter
        self.group_id = group_id or consumer_name
        self.security = security  # SASL/TLS of its Kafka clients; None: PLAINTEXT
        self.dead_letter_topic = dead_letter_topic or topic_name(consumer_name, "dead-letters")
        self.max_attempts, self.backoff, self.max_backoff = max_attempts, backoff, max_backoff
        self.handled = self.dead_lettered = 0
        self._stopping = asyncio.Event()

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        counts = await ensure_topics(self.bootstrap, dict.fromkeys(self.topics, 1),
                                     check=False, create=False, security=self.security)
        await ensure_topics(self.bootstrap,
                            {self.dead_letter_topic: max(counts.values(), default=1)},
                            check=False, security=self.security)
        consumer = AIOKafkaConsumer(*self.topics, bootstrap_servers=self.bootstrap,
                                    group_id=self.group_id, enable_auto_commit=False,
                                    auto_offset_reset="earliest", **options(self.security))
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, enable_idempotence=True,
                                    **options(self.security))
        what = f"inbox consumer {self.group_id!r}"
        try:
            await start_client(consumer, self.bootstrap, self.security, what=what)
            await start_client(producer, self.bootstrap, self.security, what=what)
        except BaseException:  # neither may be left open (stop() is idempotent)
            await consumer.stop()
            await producer.stop()
            raise
        try:
            while not self._stopping.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=500)
                for tp, records in batch.items():
                    for record in records:
                        if not await self._handle(record, producer):
                            return  # stopping while retrying: not committed, redelivered
                        await consumer.commit({tp: record.offset + 1})
        finally:
            await producer.stop()
            await consumer.stop()

    async def _handle(self, record: Any, producer: Any) -> bool:
        """Handle (or dead-letter) one record; False if asked to stop before it was done."""
        headers = {k: v.decode("utf-8", "replace") for k, v in record.headers or ()
                   if isinstance(v, bytes)}
        event_id, event_type = headers.get("event-id"), headers.get("event-type")
        if not event_id or not event_type:
            return await self._dead_letter(record, producer,
                                           "missing, empty or null event-id or event-type "
                                           "header", "malformed")
        if record.value is None:
            return await self._dead_letter(record, producer, "no value (null)", "malformed")
        try:
            payload = orjson.loads(record.value)
        except orjson.JSONDecodeError as exc:
            return await self._dead_letter(record, producer, f"value is not JSON: {exc}",
                                           "malformed")
        handler = self.handler

        async def handle(payload: Any, tx: Any) -> Any:
            try:
                return await handler(payload, tx)
            except Exception as exc:
                if is_infrastructure_error(exc):
                    raise
                raise _HandlerFailed(describe(exc)) from exc

        attempt = outage = 0
        while True:
            try:
                await self.inbox.process_idempotent(event_id, record.topic, event_type,
                                                    payload, handle)
                self.handled += 1
                return True
            except Exception as exc:
                if isinstance(exc, _HandlerFailed) or not is_infrastructure_error(exc):
                    # the record's own failure: retried in place (order and no loss come
                    # first), then dead-lettered
                    attempt += 1
                    if attempt >= self.max_attempts:
                        reason = str(exc) if isinstance(exc, _HandlerFailed) else describe(exc)
                        return await self._dead_letter(
                            record, producer, f"handler failed {attempt} times: {reason}",
                            "handler_failed")
                    delay = self.backoff * 2 ** (attempt - 1)
                else:  # storage unreachable: wait it out, count nothing
                    outage += 1
                    log.warning("event %s of %s:%s@%s not handled yet (attempt not counted): "
                                "%s", event_id, record.topic, record.partition, record.offset,
                                describe(exc))
                    delay = self.backoff * 2 ** min(outage - 1, 10)
            try:
                await asyncio.wait_for(self._stopping.wait(), min(self.max_backoff, delay))
                return False
            except TimeoutError:
                pass

    async def _dead_letter(self, record: Any, producer: Any, reason: str, why: str) -> bool:
        """Write the dead-letter copy; a broker error is retried (never counted against
        the record) until it is acknowledged; False if asked to stop first. ``why``: the
        reason for the metrics (malformed, handler_failed)."""
        log.warning("dead-lettering %s:%s@%s: %s", record.topic, record.partition,
                    record.offset, reason)
        outage = 0
        while True:
            try:
                await producer.send_and_wait(
                    self.dead_letter_topic, record.value, key=record.key,
                    headers=dead_letter_headers(reason, record.topic, record.partition,
                                                record.offset))
                self.dead_lettered += 1
                if self.metrics is not None:
                    self.metrics.dead_letters(self.inbox.consumer, why).inc()
                return True
            except Exception as exc:
                outage += 1
                log.warning("dead-letter copy of %s:%s@%s not written yet: %s", record.topic,
                            record.partition, record.offset, describe(exc))
                try:
                    await asyncio.wait_for(self._stopping.wait(), min(
                        self.max_backoff, self.backoff * 2 ** min(outage - 1, 10)))
                    return False
                except TimeoutError:
                    pass


class _HandlerFailed(SagazError):
    """The handler itself raised (not an infrastructure error): counts as an attempt."""


def is_infrastructure_error(exc: BaseException) -> bool:
    """Whether an error (or the one it was raised from, ``raise ... from``) says a
    dependency is unreachable or slow: a connection error or time-out of the OS, asyncpg or
    redis, rather than a verdict on the record. Only explicit causes are followed: an error
    raised while handling another (``__context__``) is judged on its own."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (OSError, TimeoutError)):
            return True
        kind = type(e)
        if kind.__module__.split(".")[0] in ("asyncpg", "redis") and any(
                word in kind.__name__ for word in _INFRA_WORDS):
            return True
        e = e.__cause__
    return False


_INFRA_WORDS = ("Connection", "Timeout", "CannotConnect", "Interface", "Shutdown",
                "TooManyConnections", "Busy")
