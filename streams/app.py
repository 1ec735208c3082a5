"""The Faust application: the orchestrator agent, its RocksDB saga table, timers and views.

Inputs (commands, step results, timer events) are three topics keyed by saga id and
co-partitioned with the ``sagas`` table changelog; one agent consumes all three. Faust
scopes table reads and writes to the partition of the "current event", which the agent
sets explicitly for each message before touching that message's saga row (so the same
code is right in a batch).

The agent runs at least once; ``streams.orchestrator`` explains why no effect repeats.
Every input ends in exactly one place: applied, ignored as stale (the machine's rule),
re-emitted as a duplicate, or sent to the dead-letter topic with the reason in a header.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any

import faust
import orjson
from faust.streams import _current_event
from prometheus_client import CollectorRegistry, Counter, Histogram

from sagaz import messages
from sagaz.definition import Saga
from sagaz.topics import ensure_topics
from streams.config import Settings
from streams.orchestrator import EXPIRY_HORIZON, Orchestrator, Topics, armed_timers
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


class OrchestratorApp:
    """One orchestrator worker. ``app`` is the Faust app; ``start``/``stop`` run it here."""

    def __init__(self, settings: Settings, sagas: list[Saga] | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.prefix)
        self.orchestrator = Orchestrator(sagas if sagas is not None else settings.load_sagas(),
                                         self.topics, inbox_size=settings.inbox_size,
                                         retention=settings.retention)
        self.timers = TimerIndex()
        self.metrics = Metrics()
        self._assignment: frozenset[Any] | None = None
        self._next_rescan = 0.0  # when to rescan the rows for expiries coming due
        self._counts: dict[str, int] = {}  # partition counts of the output topics
        n = settings.partitions
        self.app = app = faust.App(
            f"{settings.prefix}-orchestrator",
            broker=f"kafka://{settings.bootstrap}",
            store="rocksdb://",
            datadir=str(settings.tabledir),
            topic_partitions=n,
            processing_guarantee="at_least_once",
            consumer_auto_offset_reset="earliest",
            producer_linger=settings.producer_linger,
            broker_commit_interval=settings.commit_interval,
            broker_session_timeout=settings.session_timeout,
            broker_heartbeat_interval=min(3.0, settings.session_timeout / 3),
            stream_wait_empty=False,
            web_enabled=True,
            web_host=settings.web_host,
            web_bind=settings.web_host,
            web_port=settings.web_port,
            canonical_url=f"http://{settings.web_host}:{settings.web_port}",
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
        self.table = app.Table("sagas", partitions=n, options=ROCKSDB_OPTIONS,
                               key_type=bytes, value_type=bytes)
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
        return f"{self.app.conf.id}-sagas-changelog"

    # -- start-up checks

    async def declare_topics(self) -> None:
        """Create the topics; refuse to run when a co-partitioned one has another count."""
        n = self.settings.partitions
        # The first call is also the connection check: wrong credentials or an unreachable
        # listener end the start here with KafkaConnectError, before Faust would retry.
        security = self.settings.security
        await ensure_topics(self.settings.bootstrap, dict.fromkeys(self.topics.inputs, n),
                            security=security)
        self._counts = await ensure_topics(self.settings.bootstrap, {
            self.topics.outcomes: n, self.topics.dead_letters: n,
            **{self.topics.participant(p): n for p in self.orchestrator.participants()},
        }, check=False, security=security)
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
        # faust flushes them before it commits the input's offset), so batching would only
        # add the wait for a batch to fill.
        async for event in stream.events():
            t0 = time.perf_counter()
            await self.process(event)
            self.metrics.latency.observe(time.perf_counter() - t0)

    async def process(self, event: Any) -> None:
        token = _current_event.set(weakref.ref(event))  # table partition = this message's
        message = event.message
        try:
            out = self.orchestrator.process(message.topic, event.key, event.value,
                                            self.table.get(event.key), time.time())
            if out.dead_letter is not None:
                await self.dead_letter(message, out.dead_letter)
                return
            if out.row is not None:
                self.table[event.key] = out.row
                self.metrics.events.labels("applied").inc()
            elif out.delete:
                del self.table[event.key]
                self.metrics.events.labels("expired").inc()
            else:
                self.metrics.events.labels("repeated" if out.sends else "stale").inc()
            if out.timers:
                self.timers.arm(event.key.decode(), out.timers)
            if out.disarmed:
                self.timers.disarm(event.key.decode(), out.disarmed)
            # Straight to the aiokafka client (faust's wrapper costs ~60 us a message; its
            # flush before each offset commit still covers these). Every output is keyed by
            # saga id, so on a topic with as many partitions as the input its partition is
            # the input's: no need to hash the key again.
            producer = self.app.producer._ensure_producer()  # type: ignore[attr-defined]
            n = self.settings.partitions
            for topic, key, value in out.sends:
                partition = message.partition if self._counts.get(topic) == n else None
                await producer.send(topic, value, key=key, partition=partition)
                if topic == self.topics.outcomes and out.row is not None:
                    self._count_finished(value)
        except Exception as exc:  # never let faust ack and drop it silently
            log.exception("processing %s:%s@%s failed", message.topic, message.partition,
                          message.offset)
            await self.dead_letter(message, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            _current_event.reset(token)

    async def dead_letter(self, message: Any, reason: str) -> None:
        self.metrics.events.labels("dead_letter").inc()
        log.warning("dead-lettering %s:%s@%s: %s", message.topic, message.partition,
                    message.offset, reason)
        headers = messages.dead_letter_headers(reason, message.topic, message.partition,
                                               message.offset)
        await self.app.producer.send(self.topics.dead_letters, message.key, message.value,
                                     None, None, headers)

    def _count_finished(self, value: bytes) -> None:
        doc = orjson.loads(value)
        self.metrics.finished.labels(doc["saga"], doc["status"]).inc()

    # -- timers

    async def _fire_timers(self) -> None:
        if not self.ready():
            return
        assignment = frozenset(self.app.consumer.assignment())
        if assignment != self._assignment or (
                self.settings.retention and time.time() >= self._next_rescan):
            self._assignment = assignment
            self.rebuild_timers()
        self.timers.compact()
        due = self.timers.due(time.time())
        if not due:
            return
        producer = self.app.producer
        for due_at, saga_id, key in due:
            await producer.send(self.topics.timers, saga_id.encode(),
                                messages.encode("timer", saga_id, key=key, due=due_at),
                                None, None, None)
        self.metrics.timers.inc(len(due))

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
