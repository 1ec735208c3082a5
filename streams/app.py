"""The Faust application: the orchestrator agent, its RocksDB saga table, timers and views.

Inputs (commands, step results, timer events) are three topics keyed by saga id and
co-partitioned with the ``sagas`` table changelog; one agent consumes all three. Faust
scopes table reads and writes to the partition of the "current event", which the agent
sets explicitly for each message before touching that message's saga row (so the same
code is right in a batch).

The agent runs at least once; ``streams.orchestrator`` explains why no effect repeats.
Every input ends in exactly one place: applied, ignored as stale (the machine's rule),
re-emitted as a duplicate, or sent to the dead-letter topic with the reason in a header.

Acks are ours, not faust's (the stream is ``noack``): an input is acked, and so its
offset can be committed, only once everything it caused was acknowledged by the broker
(its commands, or its dead-letter copy), strictly in offset order per partition. An input
whose outputs or dead-letter copy cannot be written *stalls its partition*: it is not
acked, nothing after it on that partition is processed or acked (a restart or rebalance
delivers them again), and ``/health/ready`` says which partition and why. Faust would
otherwise ack a record whose handling raised, and its gap tracking can commit past an
unacked record that precedes an acked one.

Health: ``live`` is false when the agent or the producer is dead (so Kubernetes restarts
the pod); ``ready`` is false while starting, recovering or rebalancing, and while a
partition is stalled or an input or its outputs have been pending for ``stall_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from typing import Any

import faust
import orjson
from faust.streams import _current_event
from prometheus_client import CollectorRegistry, Counter, Histogram

from sagaz import messages
from sagaz.definition import Saga
from sagaz.errors import SagazError, describe
from sagaz.messages import MAX_ERROR_CHARS, clip
from sagaz.topics import ensure_topics, producer_stopped
from streams.config import Settings
from streams.orchestrator import EXPIRY_HORIZON, Orchestrator, Output, Topics, armed_timers
from streams.timers import TimerIndex

log = logging.getLogger("sagaz.streams")

# Per-partition RocksDB: faust's defaults (2 GiB block cache, 3 x 64 MiB write buffers per
# partition database) do not fit a small worker.
ROCKSDB_OPTIONS = {"block_cache_size": 16 << 20, "write_buffer_size": 8 << 20,
                   "max_write_buffer_number": 2, "max_open_files": 256}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter("sagaz_stream_events", "Input messages by outcome",
                              ["outcome"], registry=self.registry)
        self.finished = Counter("sagaz_stream_sagas_finished", "Sagas reaching an end",
                                ["saga", "status"], registry=self.registry)
        self.latency = Histogram("sagaz_stream_event_seconds", "Time to process one input",
                               registry=self.registry,
                               buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .5, 1))
        self.timers = Counter("sagaz_stream_timers_fired", "Timer events sent",
                              registry=self.registry)
        self.stalled = Counter("sagaz_stream_partitions_stalled",
                               "Partitions stopped on an input whose outputs or dead-letter "
                               "copy could not be written", registry=self.registry)


class _SagaTable(faust.Table):
    """The saga table, remembering the future of its last changelog write: an input is
    acked only once its row is in the changelog (faust only logs a failed write)."""

    last_write: Any = None

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        self.last_write = fut = super().send_changelog(*args, **kwargs)
        return fut


class DeadLetterFailed(SagazError, RuntimeError):
    """The dead-letter copy of an input could not be written."""


DEAD_LETTER_ATTEMPTS = 3
DEAD_LETTER_TIMEOUT = 20.0  # seconds to wait for the broker's ack of one attempt


class OrchestratorApp:
    """One orchestrator worker. ``app`` is the Faust app; ``start``/``stop`` run it here."""

    def __init__(self, settings: Settings, sagas: list[Saga] | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self.orchestrator = Orchestrator(sagas if sagas is not None else settings.load_sagas(),
                                         self.topics, inbox_size=settings.inbox_size,
                                         retention=settings.retention,
                                         max_message_bytes=settings.max_message_bytes)
        self.timers = TimerIndex()
        self.metrics = Metrics()
        self._stream: Any = None
        # per partition, inputs processed and not yet acked: (event, output futures, since)
        self._unacked: dict[Any, deque[tuple[Any, list[Any], float]]] = {}
        self.stalled: dict[Any, tuple[str, float]] = {}  # partition -> (reason, since)
        self._busy_since: float | None = None  # monotonic start of the input in hand
        self._agent_state: str | None = None  # None: not started; "running"; or why not
        self._assignment: frozenset[Any] | None = None
        self._next_rescan = 0.0  # when to rescan the rows for expiries coming due
        self._counts: dict[str, int] = {}  # partition counts of the output topics
        n = settings.partitions
        self.app = app = faust.App(
            self.topics.orchestrator,
            broker=f"kafka://{settings.bootstrap}",
            store="rocksdb://",
            datadir=str(settings.tabledir),
            topic_partitions=n,
            topic_replication_factor=settings.replication,
            processing_guarantee="at_least_once",
            consumer_auto_offset_reset="earliest",
            producer_linger=settings.producer_linger,
            # Rows and messages are checked against max_message_bytes before they are
            # written; the producer must never refuse what passed that check.
            producer_max_request_size=max(1_048_576, settings.max_message_bytes + 65_536),
            producer_request_timeout=max(30.0, settings.stall_timeout),
            broker_commit_interval=settings.commit_interval,
            broker_session_timeout=settings.session_timeout,
            broker_heartbeat_interval=min(3.0, settings.session_timeout / 3),
            stream_wait_empty=False,
            web_enabled=True,
            web_host=settings.web_host,
            web_bind=settings.web_bind,  # listen here; advertise web_host (canonical_url)
            web_port=settings.web_port,
            canonical_url=settings.canonical_url,
            web_tables_enabled=False,  # saga rows are served by our views only
            # SASL/TLS: faust hands these to its consumer, producer and topic creation
            broker_credentials=(settings.security.faust_credentials()
                                if settings.security is not None else None),
            table_cleanup_interval=3600,
            **self._log_options(settings),
            **settings.extra,
        )
        self.inputs = app.topic(*self.topics.inputs, partitions=n, key_type=bytes,
                                value_type=bytes, key_serializer="raw",
                                value_serializer="raw")
        # bytes in, bytes out: rows are orjson documents that the agent encodes itself
        self.table = _SagaTable(app, name="sagas", beacon=app.tables.beacon, partitions=n,
                                options=ROCKSDB_OPTIONS, key_type=bytes, value_type=bytes)
        app.tables.add(self.table)
        app.agent(self.inputs, name="orchestrate")(self._agent)
        app.timer(interval=settings.timer_interval)(self._fire_timers)
        from streams.views import register

        register(self)

    @staticmethod
    def _log_options(settings: Settings) -> dict[str, Any]:
        if settings.log_format != "json":
            return {}
        from sagaz.logs import JsonFormatter

        # faust's own console handler is replaced: one JSON object per line, nothing else
        return {"logging_config": {
            "version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": JsonFormatter}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json"}},
            "root": {"handlers": ["stderr"], "level": settings.log_level.upper()}}}

    @property
    def changelog_topic(self) -> str:
        return self.topics.changelog

    # -- start-up checks

    async def declare_topics(self) -> None:
        """Create the topics; refuse to run when a co-partitioned one has another count."""
        n = self.settings.partitions
        # The first call is also the connection check: wrong credentials or an unreachable
        # listener end the start here with KafkaConnectError, before Faust would retry.
        security = self.settings.security
        replication = self.settings.replication
        await ensure_topics(self.settings.bootstrap, dict.fromkeys(self.topics.inputs, n),
                            replication=replication, security=security)
        self._counts = await ensure_topics(self.settings.bootstrap, {
            self.topics.outcomes: n, self.topics.dead_letters: n,
            **{self.topics.participant(p): n for p in self.orchestrator.participants()},
        }, check=False, replication=replication, security=security)
        # Faust creates the changelog (compacted) itself; only its count is checked here.
        await ensure_topics(self.settings.bootstrap, {self.changelog_topic: n}, create=False,
                            security=security)

    async def prepare(self) -> None:
        """Everything a worker needs before Faust starts: its data directory and topics."""
        self.settings.tabledir.mkdir(parents=True, exist_ok=True)
        await self.declare_topics()

    async def start(self) -> None:
        await self.prepare()
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

    def ready(self) -> bool:
        app = self.app
        recovery = app.tables.recovery  # type: ignore[attr-defined]
        return bool(app.started and not app.rebalancing and recovery.completed.is_set())

    # -- the agent

    async def _agent(self, stream: Any) -> None:
        # One message at a time: nothing here waits on the broker (sends are queued, and
        # acked once the broker acknowledged them), so batching would only add the wait
        # for a batch to fill.
        self._stream = stream = stream.noack()
        self._agent_state = "running"
        try:
            async for event in stream.events():
                t0 = time.perf_counter()
                await self.process(event)
                self.metrics.latency.observe(time.perf_counter() - t0)
        except BaseException as exc:
            self._agent_state = f"agent stopped: {describe(exc)}"
            raise
        self._agent_state = "agent stopped: its stream ended"

    async def process(self, event: Any) -> None:
        message = event.message
        tp = message.tp
        if tp in self.stalled:
            return  # not acked: delivered again after a restart or rebalance
        self._busy_since = time.monotonic()
        token = _current_event.set(weakref.ref(event))  # table partition = this message's
        futures: list[Any] = []
        out: Output | None = None
        reason: str | None
        try:
            try:
                out = self.orchestrator.process(message.topic, event.key, event.value,
                                                self.table.get(event.key), time.time())
            except Exception as exc:  # a bug: never let the input vanish
                log.exception("processing %s:%s@%s failed", message.topic, message.partition,
                              message.offset)
                reason = f"internal error: {describe(exc)}"
            else:
                reason = out.dead_letter
            if out is None or reason is not None:
                await self.dead_letter(message, reason or "internal error")
            else:
                self._apply(event, out, futures)
                # Straight to the aiokafka client (faust's wrapper costs ~60 us a message).
                # Every output is keyed by saga id, so on a topic with as many partitions
                # as the input its partition is the input's: no need to hash the key again.
                producer = self.app.producer._ensure_producer()  # type: ignore[attr-defined]
                n = self.settings.partitions
                for topic, key, value in out.sends:
                    partition = message.partition if self._counts.get(topic) == n else None
                    futures.append(await producer.send(topic, value, key=key,
                                                       partition=partition))
                    if topic == self.topics.outcomes and out.row is not None:
                        self._count_finished(value)
        except Exception as exc:  # the row may be written: stall rather than skip
            self._stall(tp, message, describe(exc))
            return
        finally:
            _current_event.reset(token)
            self._busy_since = None
        if tp in self.stalled:  # stalled while this input was in hand: it must not be acked
            return
        queue = self._unacked.get(tp)
        if queue is None:
            queue = self._unacked[tp] = deque()
        queue.append((event, futures, time.monotonic()))
        await self._ack_done(tp, queue)

    def _apply(self, event: Any, out: Any, futures: list[Any]) -> None:
        """Write the row (its changelog record joins the input's futures) and arm timers."""
        if out.row is not None:
            self.table.last_write = None
            self.table[event.key] = out.row
            if self.table.last_write is not None:
                futures.append(self.table.last_write)
            self.metrics.events.labels("applied").inc()
        elif out.delete:
            self.table.last_write = None
            del self.table[event.key]
            if self.table.last_write is not None:
                futures.append(self.table.last_write)
            self.metrics.events.labels("expired").inc()
        else:
            self.metrics.events.labels("repeated" if out.sends else "stale").inc()
        if out.timers:
            self.timers.arm(event.key.decode(), out.timers)
        if out.disarmed:
            self.timers.disarm(event.key.decode(), out.disarmed)

    async def _ack_done(self, tp: Any, queue: deque[tuple[Any, list[Any], float]]) -> None:
        """Ack, in offset order, the inputs whose outputs the broker acknowledged."""
        while queue and tp not in self.stalled:
            event, futures, _ = queue[0]
            for fut in futures:
                if not fut.done():
                    return
                if fut.cancelled() or fut.exception() is not None:
                    error = "cancelled" if fut.cancelled() else describe(fut.exception())
                    queue.clear()
                    self._stall(tp, event.message, f"sending an output failed: {error}")
                    return
            queue.popleft()
            await self._stream.ack(event)

    def _stall(self, tp: Any, message: Any, reason: str) -> None:
        """Stop a partition on an input that could not be handled: it stays unacked."""
        reason = clip(f"{message.topic}:{message.partition}@{message.offset}: {reason}",
                      MAX_ERROR_CHARS)
        log.error("partition %s stalled (restart the worker once the cause is fixed): %s",
                  tp, reason)
        self.stalled[tp] = (reason, time.time())
        self._unacked.pop(tp, None)
        self.metrics.stalled.inc()
        try:
            self.app.consumer.pause_partitions([tp])
        except Exception:  # stalled all the same: nothing of it is acked
            log.exception("pausing partition %s failed", tp)

    async def dead_letter(self, message: Any, reason: str) -> None:
        """Write the input's dead-letter copy and wait for the broker's ack; raise
        DeadLetterFailed when it cannot be written. A copy that would be too large keeps a
        truncated value, with the original size and SHA-256 in headers."""
        self.metrics.events.labels("dead_letter").inc()
        log.warning("dead-lettering %s:%s@%s: %s", message.topic, message.partition,
                    message.offset, clip(reason, 500))
        key, value, headers = messages.dead_letter_record(
            message.key, message.value, reason, message.topic, message.partition,
            message.offset, self.settings.max_message_bytes)
        producer = self.app.producer._ensure_producer()  # type: ignore[attr-defined]
        error: BaseException | None = None
        for attempt in range(DEAD_LETTER_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** attempt)
            try:
                fut = await producer.send(self.topics.dead_letters, value, key=key,
                                          headers=headers)
                # shielded: a slow attempt that succeeds later is not cancelled (nor sent
                # again needlessly once it has been)
                await asyncio.wait_for(asyncio.shield(fut), DEAD_LETTER_TIMEOUT)
                return
            except Exception as exc:
                error = exc
                log.warning("dead-letter copy of %s:%s@%s not written (attempt %d): %s",
                            message.topic, message.partition, message.offset, attempt + 1,
                            describe(exc))
        raise DeadLetterFailed(f"its dead-letter copy could not be written: "
                               f"{describe(error) if error else 'unknown'}; dead-letter "
                               f"reason: {reason}")

    def health(self) -> tuple[bool, bool, dict[str, Any]]:
        """(live, ready, details): what /health/live and /health/ready answer."""
        dead = []
        if self._agent_state not in (None, "running"):
            dead.append(self._agent_state)
        if self.app.started and producer_stopped(getattr(self.app.producer, "_producer", None)):
            dead.append("producer stopped")
        buffer = getattr(self.app.producer, "buffer", None)
        crashed = getattr(buffer, "_crashed", None)
        if crashed is not None and crashed.is_set():
            dead.append(f"producer buffer crashed: {getattr(buffer, 'crash_reason', None)}")
        waiting = []
        if not self.ready():
            waiting.append("starting, recovering tables or rebalancing")
        now = time.monotonic()
        limit = self.settings.stall_timeout
        if self._busy_since is not None and now - self._busy_since > limit:
            waiting.append(f"one input has been processing for {now - self._busy_since:.0f}s")
        for tp, queue in self._unacked.items():
            if queue and now - queue[0][2] > limit:
                waiting.append(f"outputs of {tp.topic}:{tp.partition} not acknowledged for "
                               f"{now - queue[0][2]:.0f}s")
        details: dict[str, Any] = {
            "agent": self._agent_state or "not started",
            "stalled": [{"topic": tp.topic, "partition": tp.partition, "reason": reason,
                         "since": since} for tp, (reason, since) in self.stalled.items()],
            "unacked": sum(len(q) for q in self._unacked.values())}
        if dead:
            details["dead"] = dead
        if waiting:
            details["waiting"] = waiting
        return not dead, not dead and not waiting and not self.stalled, details

    def _count_finished(self, value: bytes) -> None:
        doc = orjson.loads(value)
        self.metrics.finished.labels(doc["saga"], doc["status"]).inc()

    # -- timers

    async def _fire_timers(self) -> None:
        for tp, queue in list(self._unacked.items()):  # inputs whose outputs were acked since
            await self._ack_done(tp, queue)
        if not self.ready():
            return
        assignment = frozenset(self.app.consumer.assignment())
        if assignment != self._assignment or (
                self.settings.retention and time.time() >= self._next_rescan):
            if assignment != self._assignment:
                self._reassigned(assignment)
            self._assignment = assignment
            self.rebuild_timers()
        self.timers.compact()
        due = self.timers.due(time.time())
        if not due:
            return
        producer = self.app.producer._ensure_producer()  # type: ignore[attr-defined]
        for due_at, saga_id, key in due:
            try:
                fut = await producer.send(self.topics.timers,
                                          messages.encode("timer", saga_id, key=key,
                                                          due=due_at),
                                          key=saga_id.encode())
            except Exception as exc:
                self._timer_not_sent(due_at, saga_id, key, exc)
                continue
            fut.add_done_callback(
                lambda f, d=due_at, s=saga_id, k=key: f.cancelled() or f.exception() is None
                or self._timer_not_sent(d, s, k, f.exception()))
        self.metrics.timers.inc(len(due))

    def _timer_not_sent(self, due: float, saga_id: str, key: str, exc: Any) -> bool:
        log.warning("timer %s of saga %s not sent (armed again): %s", key, saga_id, exc)
        self.timers.arm(saga_id, [(due, key)])
        return True

    def _reassigned(self, assignment: frozenset[Any]) -> None:
        """Forget the partitions this worker lost: their stalls and unacked inputs (the new
        owner processes them from the committed offset)."""
        for tp in [tp for tp in self.stalled if tp not in assignment]:
            del self.stalled[tp]
            self.app.consumer.resume_partitions([tp])
        for tp in [tp for tp in self._unacked if tp not in assignment]:
            del self._unacked[tp]

    def rebuild_timers(self) -> None:
        """Scan the rows of this worker's active partitions for armed timers: the machine's,
        and expiries due within the horizon (rescanned every half horizon)."""
        self.timers.clear()
        now = time.time()
        self._next_rescan = now + EXPIRY_HORIZON / 2
        count = 0
        t0 = time.perf_counter()
        for key, row in self.table.items():
            timers = armed_timers(row, now + EXPIRY_HORIZON)
            if timers:
                self.timers.arm(key.decode(), timers)
                count += 1
        log.info("timer index rebuilt in %.3f s: %d sagas with armed timers",
                 time.perf_counter() - t0, count)


def run_worker(settings: Settings) -> None:
    """Run one orchestrator worker in this process until SIGINT/SIGTERM (the CLI's job)."""
    oapp = OrchestratorApp(settings)
    asyncio.run(oapp.prepare())
    from faust.worker import Worker

    class QuietWorker(Worker):
        """Faust's terminal spinner sets the root logger to DEBUG (for a WARNING level),
        making every aiokafka debug call format a record: a third of the worker's time."""

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            self.spinner = None

    QuietWorker(oapp.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
