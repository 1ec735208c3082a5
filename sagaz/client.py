"""Start, cancel, await and inspect sagas run by the Kafka orchestrator.

    async with SagaClient("127.0.0.1:9092", url="http://127.0.0.1:6066") as client:
        saga_id = await client.start("order", {"order_id": "o1"}, idempotency_key="o1")
        outcome = await client.wait(saga_id, timeout=30)
        state = await client.status(saga_id)

A start with an idempotency key gets a saga id derived from (saga name, key), so starting
twice with one key names one saga, which the orchestrator starts once. ``wait`` listens to
the outcomes topic from the moment the client starts (``listen=True``, the default).

Bounded memory: outcomes that arrive are kept for ``wait`` calls that come later, at most
``keep_outcomes`` of them and for at most ``keep_outcomes_for`` seconds (oldest dropped
first; a dropped outcome can still be read with ``status``); a ``wait`` that times out or
is cancelled leaves nothing behind. A start whose data would make a message larger than
``max_message_bytes`` (less ``ROW_HEADROOM`` for the saga's state) is refused here with
``ValueError``, before anything is sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from sagaz import messages
from sagaz.definition import Saga
from sagaz.messages import MAX_MESSAGE_BYTES
from sagaz.metrics import ClientMetrics, shared
from sagaz.security import KafkaSecurity, options, start_client
from sagaz.topics import Topics, topic_partition
from sagaz.tracing import current_trace_headers

#: Bytes of a saga row that are not its data: state, step records, inbox of event ids.
ROW_HEADROOM = 64 * 1024

_NAMESPACE = uuid.UUID("5d3c1a52-8f9e-4c59-9a36-0f9b4b1f2a77")


def saga_id_for(saga: str, idempotency_key: str) -> str:
    """The saga id that an idempotency key names, for one saga definition."""
    return uuid.uuid5(_NAMESPACE, f"{saga}\x00{idempotency_key}").hex


class SagaClient:
    def __init__(self, bootstrap: str, *, prefix: str = "sagaz", url: str | None = None,
                 listen: bool = True, keep_outcomes: int = 10_000,
                 keep_outcomes_for: float = 600.0,
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 on_outcome: Callable[[dict[str, Any]], None] | None = None,
                 security: KafkaSecurity | None = None, tracer: Any = None,
                 registry: Any = None) -> None:
        """``tracer``: an OpenTelemetry tracer; each start is then a span whose context
        the saga carries (one trace to its outcome, ``sagaz.tracing``). ``registry``: a
        prometheus_client CollectorRegistry for ``saga_client_starts_total`` (None: no
        metrics)."""
        for name, value, low in (("keep_outcomes", keep_outcomes, 0),
                                 ("keep_outcomes_for", keep_outcomes_for, 0),
                                 ("max_message_bytes", max_message_bytes, ROW_HEADROOM + 1024)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ValueError(f"{name} must be a number >= {low}, got {value!r}")
        self.bootstrap = bootstrap
        self.keep_outcomes_for = keep_outcomes_for
        self.max_message_bytes = max_message_bytes
        self.security = security  # SASL/TLS of its Kafka clients; None: PLAINTEXT
        self.prefix = prefix
        self.topics = Topics(prefix)  # checks the prefix
        self.url = url.rstrip("/") if url else None
        self.listen = listen
        self.keep_outcomes = keep_outcomes
        self.on_outcome = on_outcome  # called with each outcome message as it arrives
        self.tracer = tracer
        self.producer: Any = None
        self._consumer: Any = None
        self._listener: asyncio.Task[None] | None = None
        # saga id -> (monotonic arrival, outcome), oldest first
        self._outcomes: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self.metrics = shared(ClientMetrics, registry) if registry is not None else None

    async def __aenter__(self) -> SagaClient:
        try:
            await self.start_client()
        except BaseException:  # e.g. KafkaConnectError: leave no client open
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start_client(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap,
                                         enable_idempotence=True, linger_ms=1,
                                         **options(self.security))
        await start_client(self.producer, self.bootstrap, self.security, what="saga client")
        if self.listen:
            topic = self.topics.outcomes
            self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                              enable_auto_commit=False,
                                              **options(self.security))
            await start_client(self._consumer, self.bootstrap, self.security,
                               what="saga client")
            partitions = await self._wait_for_partitions(topic)
            tps = [topic_partition(topic, p) for p in partitions]
            self._consumer.assign(tps)
            await self._consumer.seek_to_end(*tps)
            for tp in tps:  # resolve the end offsets now: later outcomes are not missed
                await self._consumer.position(tp)
            self._listener = asyncio.create_task(self._listen())

    async def _wait_for_partitions(self, topic: str) -> set[int]:
        for _ in range(100):
            partitions = self._consumer.partitions_for_topic(topic)
            if partitions:
                return set(partitions)
            await self._consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"topic {topic!r} does not exist: is an orchestrator worker "
                           f"running with prefix {self.prefix!r}?")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self.producer is not None:
            await self.producer.stop()

    async def _listen(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    try:
                        msg = messages.decode(record.value, expect=frozenset({"outcome"}))
                    except messages.MessageError:
                        continue
                    self._outcome(msg)

    def _outcome(self, msg: dict[str, Any]) -> None:
        sid = msg["saga_id"]
        if self.on_outcome is not None and sid not in self._outcomes:
            self.on_outcome(msg)
        now = time.monotonic()
        outcomes = self._outcomes
        outcomes.pop(sid, None)
        outcomes[sid] = (now, msg)
        while outcomes and (len(outcomes) > self.keep_outcomes
                            or next(iter(outcomes.values()))[0] < now - self.keep_outcomes_for):
            outcomes.popitem(last=False)
        for fut in self._waiters.pop(sid, []):
            if not fut.done():
                fut.set_result(msg)

    # -- commands

    async def start(self, saga: str | Saga, data: dict[str, Any] | None = None, *,
                    saga_id: str | None = None, idempotency_key: str | None = None,
                    trace: dict[str, str] | None = None) -> str:
        """Publish a start command; return the saga id."""
        name = saga.kafka_name() if isinstance(saga, Saga) else saga
        if not isinstance(name, str) or not name:
            raise ValueError(f"saga must be a Saga or its name, got {saga!r}")
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"data must be a dict, got {type(data).__name__}")
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not idempotency_key:
                raise ValueError("idempotency_key must be a non-empty str")
            derived = saga_id_for(name, idempotency_key)
            if saga_id is not None and saga_id != derived:
                raise ValueError("give saga_id or idempotency_key, not both")
            saga_id = derived
        saga_id = saga_id or uuid.uuid4().hex
        try:
            if self.tracer is not None:
                await self._traced_start(saga_id, trace, name, data or {}, idempotency_key)
            else:
                value = self._start_message(saga_id, trace or current_trace_headers(), name,
                                            data or {}, idempotency_key)
                await self.producer.send_and_wait(self.topics.commands, value,
                                                  key=saga_id.encode())
        except Exception:
            self._count(name, "failed")
            raise
        self._count(name, "sent")
        return saga_id

    def _count(self, saga: str, outcome: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.starts(saga, outcome).inc(n)

    async def _traced_start(self, saga_id: str, trace: dict[str, str] | None, name: str,
                            data: dict[str, Any], idempotency_key: str | None) -> str:
        """A start in a span, the child of ``trace`` (else of the current span); the saga
        carries the span's context."""
        from sagaz import tracing

        parent = trace or current_trace_headers()
        with tracing.hop_span(self.tracer, f"start {name}", parent,
                              {"sagaz.saga": name, "sagaz.saga_id": saga_id},
                              kind="PRODUCER") as span:
            value = self._start_message(saga_id, tracing.span_headers(span), name, data,
                                        idempotency_key)
            await self.producer.send_and_wait(self.topics.commands, value,
                                              key=saga_id.encode())
        return saga_id

    async def start_many(self, saga: str | Saga, items: list[dict[str, Any]]) -> list[str]:
        """Publish many starts, waiting for the broker once; returns their saga ids."""
        name = saga.kafka_name() if isinstance(saga, Saga) else saga
        ids, futures = [], []
        for data in items:
            sid = uuid.uuid4().hex
            value = self._start_message(sid, None, name, data, None)
            futures.append(await self.producer.send(self.topics.commands, value,
                                                    key=sid.encode()))
            ids.append(sid)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        self._count(name, "sent", len(outcomes) - len(errors))
        if errors:
            self._count(name, "failed", len(errors))
            raise errors[0]
        return ids

    def _start_message(self, saga_id: str, trace: dict[str, str] | None, name: str,
                       data: dict[str, Any], idempotency_key: str | None) -> bytes:
        value = messages.encode("start", saga_id, trace, saga=name, data=data,
                                idempotency_key=idempotency_key)
        limit = self.max_message_bytes - ROW_HEADROOM
        if len(value) > limit:
            self._count(name, "refused")
            raise ValueError(f"saga data too large: the start of {name!r} is {len(value)} "
                             f"bytes, over {limit} (max_message_bytes {self.max_message_bytes}"
                             f" less {ROW_HEADROOM} for the saga's state); keep large "
                             f"payloads outside the saga and pass a reference")
        return value

    async def cancel(self, saga_id: str, reason: str = "cancelled by client",
                     request_id: str | None = None) -> None:
        value = messages.encode("cancel", saga_id, reason=reason,
                                request_id=request_id or uuid.uuid4().hex)
        await self.producer.send_and_wait(self.topics.commands, value,
                                          key=saga_id.encode())

    async def retry_compensations(self, saga_id: str, request_id: str | None = None) -> None:
        """Operator action: retry the failed compensations of a FAILED saga."""
        value = messages.encode("retry", saga_id, request_id=request_id or uuid.uuid4().hex)
        self._outcomes.pop(saga_id, None)  # a new outcome will follow
        await self.producer.send_and_wait(self.topics.commands, value,
                                          key=saga_id.encode())

    async def wait(self, saga_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The outcome message of a saga (status, error, data, results)."""
        if not self.listen:
            raise RuntimeError("this client was made with listen=False")
        kept = self._outcomes.get(saga_id)
        if kept is not None:
            return kept[1]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(saga_id, [])
        waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:  # timed out or cancelled: leave nothing behind
            if not fut.done() or fut.cancelled():
                waiters = self._waiters.get(saga_id, [])
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    self._waiters.pop(saga_id, None)

    # -- queries (HTTP on any worker)

    async def status(self, saga_id: str) -> dict[str, Any] | None:
        return await self._get(f"/sagas/{saga_id}")

    async def list(self, *, status: str | None = None, name: str | None = None,
                   limit: int = 100) -> dict[str, Any] | None:
        query = {k: v for k, v in (("status", status), ("name", name)) if v}
        query["limit"] = str(limit)
        return await self._get("/sagas", query)

    async def _get(self, path: str, query: dict[str, str] | None = None) -> Any:
        if self.url is None:
            raise RuntimeError("give the client url= (a worker's http address) for queries")
        import aiohttp

        async with aiohttp.ClientSession() as session, session.get(
                self.url + path, params=query) as resp:
            body = orjson.loads(await resp.read())
            if resp.status == 404:
                return None
            if resp.status >= 400:
                raise RuntimeError(f"GET {path} -> {resp.status}: {body.get('error')}")
            return body
