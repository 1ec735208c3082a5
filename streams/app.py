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

Fences: a worker that another may have replaced as the owner of its partitions must not
write. Frozen past the group session timeout (its loop did not run), or without a group
confirmation of its membership for that long (cut off from the broker while its loop ran),
it fences itself (``sagaz worker`` exits with code 75; restarted, it recovers from the
changelog) rather than flush what it holds; while the membership is unconfirmed for half
the session timeout it processes, resends and writes nothing (``Membership``).

Versions (``sagaz.versions``): an input for a run whose definition version this worker does
not have (or whose version changed without a bump in a step the run has not passed) is
neither guessed nor dropped: it stalls its partition like an input that cannot be written
(not acked, not dead-lettered; the partition is paused), so it and everything behind it are
delivered again to the next owner of the partition, a worker that has the version once the
rollout put one there. Unfinished runs of this worker's partitions that wait so are counted
(``saga_stream_waiting_runs{saga,version}``, rescanned with the timers on every assignment)
and reported in ``/health/ready``, which is not ready while any waits: a rolling update
that dropped a version too early halts instead of proceeding.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import faust
import orjson
from faust.streams import _current_event
from prometheus_client import CollectorRegistry

from sagaz import logs, messages
from sagaz import run as run_record
from sagaz.definition import Saga
from sagaz.errors import SagazError, describe
from sagaz.messages import MAX_ERROR_CHARS, clip
from sagaz.metrics import InFlight, RunMetrics, StreamMetrics, Transition
from sagaz.topics import ensure_topics, producer_stopped
from sagaz.versions import DefinitionUnavailable
from streams.config import Settings
from streams.orchestrator import (
    EXPIRY_HORIZON,
    Orchestrator,
    Output,
    Topics,
    armed_timers,
    row_seq,
)
from streams.timers import TimerIndex

log = logging.getLogger("sagaz.streams")

# Per-partition RocksDB: faust's defaults (2 GiB block cache, 3 x 64 MiB write buffers per
# partition database) do not fit a small worker.
ROCKSDB_OPTIONS = {"block_cache_size": 16 << 20, "write_buffer_size": 8 << 20,
                   "max_write_buffer_number": 2, "max_open_files": 256}


class _SagaTable(faust.Table):
    """The saga table, remembering the future of its last changelog write: an input is
    acked only once its row is in the changelog (faust only logs a failed write).

    Recovery (and a standby applying the changelog) keeps the newest row of a saga by its
    ``seq``, not simply the last record: a record older than the row already held is a
    zombie's late write (a worker that lost the partition and still flushed what it had)
    and is skipped; its key is kept in ``stale`` so the owner writes the current row again
    (the changelog's last record is then the newest, and compaction keeps that one)."""

    last_write: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stale: set[tuple[int, bytes]] = set()  # (partition, key) to write again

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        self.last_write = fut = super().send_changelog(*args, **kwargs)
        return fut

    def stored(self, partition: int, key: bytes) -> bytes | None:
        """The row this worker's store holds for ``key`` in ``partition``."""
        try:
            return self.data._db_for_partition(partition).get(key)  # type: ignore[attr-defined]
        except Exception:  # not a RocksDB store: no check
            return None

    def apply_changelog_batch(self, batch: Any) -> None:
        kept = []
        newest: dict[tuple[int, bytes], int] = {}
        for event in batch:
            msg = event.message
            k = (msg.partition, msg.key)
            if msg.value is None:
                newest[k] = -1  # deleted: any later row is newer
            elif msg.key is not None:
                try:
                    seq = row_seq(msg.value)
                except Exception:  # not a row this version reads: keep, as faust would
                    seq = None
                if seq is not None:
                    held = newest.get(k)
                    if held is None:
                        raw = self.stored(msg.partition, msg.key)
                        held = row_seq(raw) if raw is not None else -1
                    if seq < held:
                        log.warning("changelog %s:%s@%s: skipped a stale row of saga %s "
                                    "(seq %d, newest %d): a zombie's late write",
                                    msg.topic, msg.partition, msg.offset, msg.key, seq, held)
                        self.stale.add(k)
                        continue
                    newest[k] = seq
            kept.append(event)
        super().apply_changelog_batch(kept)


class SeekGuard:
    """Keeps faust from committing past input records it dropped while seeking.

    After a rebalance faust's recovery resumes the input partitions and *then* seeks them
    to their committed offsets (``Recovery.on_recovery_completed``, ``_resume_streams``),
    while its flow is already running (it ran for the changelogs). During the seek's broker
    round trip the fetcher hands the agent records from the old position, and the buffer
    clear that follows the seek (``flow_control.resume()``) drops those still queued,
    although faust counted them as read. The read offsets it keeps then jump over them: a
    jump becomes a "gap" that ``Consumer._new_offset`` counts as acked, and a single missing
    offset at the committed one is tolerated, so the worker commits offsets that no agent
    processed; the inputs are lost (chaos scenario 5: a start the partition's new owner
    never applied after a scale-in; tests/integration/test_scale_in.py).

    The guard wraps the consumer's ``perform_seek`` and ``resume_flow``: when a seek starts
    while the flow runs, the input partitions are paused in the same step (before any
    record of theirs can be handed over) and stay paused until the flow is resumed after
    the seek, once faust cleared the buffers; the first record handed over is then the
    committed one. Nothing on the per-record path changes."""

    def __init__(self, inputs: frozenset[str], wanted: Callable[[Any], bool]) -> None:
        """``inputs``: the topics the agent consumes; ``wanted(tp)``: whether a partition
        may be resumed (not one the worker stalled)."""
        self.inputs = inputs
        self.wanted = wanted
        self.held: set[Any] = set()  # input partitions paused until the flow resumes
        self.consumer: Any = None

    def install(self, consumer: Any) -> None:
        self.consumer = consumer
        seek, resume_flow = consumer.perform_seek, consumer.resume_flow

        def perform_seek() -> Awaitable[None]:
            # Not a coroutine function on purpose: faust calls it right after resuming
            # the partitions, in the same step, and the pause must happen before the
            # fetcher runs again.
            if consumer.flow_active:
                held = {tp for tp in consumer._get_active_partitions()
                        if tp.topic in self.inputs}
                consumer.pause_partitions(held)
                self.held |= held
            return seek()

        def resumed_flow() -> None:
            resume_flow()
            if self.held:
                held, self.held = self.held, set()
                assigned = consumer.assignment()
                consumer.resume_partitions(
                    {tp for tp in held if tp in assigned and self.wanted(tp)})

        consumer.perform_seek = perform_seek
        consumer.resume_flow = resumed_flow

    def forget(self) -> None:
        """A rebalance began: the next assignment resumes what it owns itself."""
        self.held = set()


class _App(faust.App):
    """faust.App whose consumer gets a SeekGuard when faust creates it."""

    seek_guard: SeekGuard | None = None

    def _new_consumer(self) -> Any:
        consumer = super()._new_consumer()
        if self.seek_guard is not None:
            self.seek_guard.install(consumer)
        return consumer


class DeadLetterFailed(SagazError, RuntimeError):
    """The dead-letter copy of an input could not be written."""


WATCHDOG_INTERVAL = 0.25  # seconds between checks that the event loop is running
FROZEN_EXIT_CODE = 75  # `sagaz worker` exits with this when it fenced itself (EX_TEMPFAIL)
RESEND_INTERVAL = 1.0  # seconds between sends again of a partition's failed output


class Membership:
    """When the consumer group last confirmed this worker as a member, for the partition
    fence (``OrchestratorApp._watch_loop``).

    A worker cut off from the broker keeps running: its loop is alive (so the frozen-loop
    watchdog sees nothing), it still holds fetched inputs, and its producer still holds
    the changelog rows it queued. Once the session timeout passes without a heartbeat, the
    group gives its partitions to another worker; when the network heals, whatever this
    one still writes lands after the new owner's rows (a saga's changelog goes backwards).
    aiokafka keeps the confirmation to itself, in the consumer's own thread and loop
    (faust's ``AIOKafkaConsumerThread``): its coordinator's ``_do_heartbeat`` and
    ``_do_rejoin_group`` are wrapped to record it here. ``confirmed`` is a ``monotonic``
    time, only ever replaced (a float store: safe across the threads), and read once per
    input on the hot path:

    - a heartbeat the coordinator accepted (also "rebalancing": the group keeps a member
      through a rebalance) confirms the membership now;
    - while a rejoin (JoinGroup, SyncGroup) is in flight the group holds the member, so
      it counts as confirmed (``inf``) until it ends: confirmed at its end if it
      succeeded or the coordinator answered, else (the coordinator unreachable) as of its
      start;
    - a rejoin after the group forgot this member (aiokafka reset its member id: "unknown
      member"), or that begins after a lapse longer than ``session_timeout / 2``, may be
      the group readmitting a member it had evicted, its partitions served by another
      worker meanwhile: the membership is ``lost`` for good (``-inf``), and the worker
      fences itself rather than resume with what it holds.
    Before ``watch`` (no assignment yet), ``confirmed`` is ``inf``: nothing to fence."""

    def __init__(self, session_timeout: float) -> None:
        self.session_timeout = session_timeout
        self.confirmed = math.inf
        self.lost = False
        self.watching = False

    def watch(self, coordinator: Any) -> bool:
        """Wrap the group coordinator's heartbeat and rejoin; False if aiokafka has not
        got them (no fence then: logged by the caller)."""
        beat = getattr(coordinator, "_do_heartbeat", None)
        rejoin = getattr(coordinator, "_do_rejoin_group", None)
        if beat is None or rejoin is None:
            return False
        half = self.session_timeout / 2

        async def heartbeat() -> bool:
            ok: bool = await beat()
            if ok and not self.lost:
                self.confirmed = time.monotonic()
            return ok

        def forgotten() -> bool:  # the coordinator answered "unknown member"
            return not getattr(coordinator, "member_id", "x")

        async def rejoin_group(*args: Any, **kwargs: Any) -> bool:
            began = time.monotonic()
            if self.lost:
                pass
            elif forgotten() or began - self.confirmed > half:
                log.critical("rejoining the group %s: it may have given this worker's "
                             "partitions to another", "that evicted this worker"
                             if forgotten() else f"after {began - self.confirmed:.1f}s "
                             f"without a confirmed membership")
                self.lost, self.confirmed = True, -math.inf
            else:
                self.confirmed = math.inf  # the group holds its member while it rejoins
            ok = False
            try:
                ok = bool(await rejoin(*args, **kwargs))
            finally:
                if not self.lost:
                    if forgotten():
                        self.lost, self.confirmed = True, -math.inf
                    elif ok or getattr(coordinator, "coordinator_id", None) is not None:
                        self.confirmed = time.monotonic()  # it answered: still a member
                    else:
                        self.confirmed = began  # unreachable: no news since it began
            return ok

        coordinator._do_heartbeat = heartbeat
        coordinator._do_rejoin_group = rejoin_group
        self.confirmed = time.monotonic()
        self.watching = True
        return True

    def lapse(self) -> float:
        """Seconds since the group last confirmed this worker (<= 0 while it holds it
        anyway; ``inf`` once lost)."""
        return time.monotonic() - self.confirmed


def transient(exc: BaseException) -> bool:
    """A send failure that the broker coming back cures (not connected, no leader, timed
    out): the output is sent again, the input stays unacked meanwhile. Anything else
    (too large, not authorised) stalls the partition."""
    from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError

    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, (KafkaTimeoutError, KafkaConnectionError, TimeoutError, ConnectionError))


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


Resend = Callable[[], Awaitable[Any]]  # sends one output again; returns its new future

DEAD_LETTER_ATTEMPTS = 3
DEAD_LETTER_TIMEOUT = 20.0  # seconds to wait for the broker's ack of one attempt


class OrchestratorApp:
    """One orchestrator worker. ``app`` is the Faust app; ``start``/``stop`` run it here."""

    def __init__(self, settings: Settings, sagas: list[Saga] | None = None, *,
                 tracer: Any = None) -> None:
        """``tracer``: an OpenTelemetry tracer, a span per input (``sagaz.tracing``)."""
        self.settings = settings
        self.tracer = tracer
        self.topics = Topics(settings.prefix)
        self.orchestrator = Orchestrator(sagas if sagas is not None else settings.load_sagas(),
                                         self.topics, inbox_size=settings.inbox_size,
                                         retention=settings.retention,
                                         max_message_bytes=settings.max_message_bytes)
        self.timers = TimerIndex()
        # /metrics: the saga run families (as the in-process engine's) and saga_stream_*
        self.registry = CollectorRegistry(auto_describe=True)
        self.run_metrics = RunMetrics(self.registry)
        self.metrics = StreamMetrics(self.registry)
        # sagas of this worker's active partitions not yet ended: kept up to date from the
        # rows the agent writes, rebuilt from the table with the timer index
        self.in_flight = InFlight()
        self.run_metrics.add_in_flight(self.in_flight.counts, self.in_flight.oldest)
        self.metrics.bind(stalled_partitions=self._stalled_sample,
                          unacked_inputs=self._unacked_sample,
                          table_recovery_seconds=self._recovery_sample,
                          consumer_lag=self._lag_samples, ready=self._ready_sample)
        self._last_recovery: float | None = None
        self.waiting_gauge: Any = self.metrics.waiting_runs  # a prometheus_client Gauge
        # (saga, version) -> unfinished runs of this worker's partitions that wait for it
        self.waiting_runs: dict[tuple[str, int], int] = {}
        self._stream: Any = None
        # per partition, inputs processed and not yet acked:
        # (event, output futures, since, how to send each output again)
        self._unacked: dict[Any, deque[tuple[Any, list[Any], float, list[Resend]]]] = {}
        self._resend_at: dict[Any, float] = {}  # partition -> when to send again
        self._resend_logged: dict[Any, float] = {}
        self.stalled: dict[Any, tuple[str, float]] = {}  # partition -> (reason, since)
        self._busy_since: float | None = None  # monotonic start of the input in hand
        self._agent_state: str | None = None  # None: not started; "running"; or why not
        self._assignment: frozenset[Any] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_tick = 0.0
        self.fenced: str | None = None  # why this worker stopped handling inputs
        # the group's confirmation of this worker's membership (the partition fence)
        self.membership = Membership(settings.session_timeout)
        self._half_session = settings.session_timeout / 2
        self.on_frozen: Callable[[str], None] = lambda reason: None
        self._next_rescan = 0.0  # when to rescan the rows for expiries coming due
        self._counts: dict[str, int] = {}  # partition counts of the output topics
        n = settings.partitions
        self.app = app = _App(
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
            # A write not acknowledged within a quarter of the session timeout fails (and
            # is sent again by _ack_done while the group still confirms this worker): one
            # queued before a partition from the broker can never land after the session
            # timeout, once another worker may own its partition (the partition fence).
            producer_request_timeout=settings.session_timeout / 4,
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
        app.on_partitions_assigned.connect(self._on_assigned)
        # input partitions stay paused while faust seeks them (SeekGuard)
        self.seek_guard = app.seek_guard = SeekGuard(frozenset(self.topics.inputs),
                                                     lambda tp: tp not in self.stalled)
        app.on_partitions_revoked.connect(self._on_revoked)
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
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self.app.stop()

    # -- fencing a frozen worker

    def _watch_loop(self) -> None:
        """Every WATCHDOG_INTERVAL: a worker whose event loop did not run for longer than
        the group session timeout (the process was paused: SIGSTOP, a VM freeze, a swap
        storm) has been evicted, and another worker owns its partitions now. Anything it
        still holds (inputs in its buffers, rows in flight) would land after the new
        owner's writes, a zombie's stale changelog rows. So it fences itself at once:
        ``on_frozen`` (``sagaz worker``: exit, to be restarted; in-process: stop handling
        inputs and report not live)."""
        now = time.monotonic()
        gap, self._last_tick = now - self._last_tick, now
        if self.fenced is not None:
            return
        if gap > self.settings.session_timeout:
            self._fence(f"the event loop was frozen for {gap:.1f}s, longer than the group "
                        f"session timeout ({self.settings.session_timeout:.0f}s): another "
                        f"worker owns these partitions now; restart this worker")
            return
        if self._check_membership():
            return
        self._watchdog = asyncio.get_running_loop().call_later(WATCHDOG_INTERVAL,
                                                               self._watch_loop)

    def _fence(self, reason: str) -> None:
        self.fenced = reason
        log.critical("fenced: %s", reason)
        self.on_frozen(reason)

    def _check_membership(self) -> bool:
        """The partition fence, from the watchdog: a worker whose group membership was not
        confirmed for longer than the session timeout (cut off from the broker, or the
        broker unreachable that long), or that was readmitted after a lapse, may have lost
        its partitions to another worker; whatever it still holds or has queued would land
        after the new owner's writes. It fences itself (``sagaz worker`` exits: the process
        manager restarts it and it recovers from the changelog). True when fenced now."""
        membership = self.membership
        lapse = membership.lapse()
        if (lapse <= self.settings.session_timeout and not membership.lost) \
                or self.app.should_stop:  # stopping: the consumer has left (or is leaving)
            return False
        why = ("the group readmitted it after a lapse in its membership" if membership.lost
               else f"its group membership was not confirmed for {lapse:.1f}s, longer than "
                    f"the session timeout ({self.settings.session_timeout:.0f}s)")
        self._fence(f"{why} (cut off from the broker?): another worker may own these "
                    f"partitions now; restart this worker")
        return True

    def member(self) -> bool:
        """The group confirmed this worker's membership within half the session timeout
        (and it is not fenced): it may process, write rows and send outputs again."""
        return self.fenced is None and self.membership.lapse() <= self._half_session

    async def _wait_for_membership(self) -> None:
        """Hold the agent while the membership is unconfirmed: nothing is processed or
        written until a heartbeat confirms it again (or the fence ends the worker)."""
        log.warning("group membership not confirmed for %.1fs: processing paused",
                    self.membership.lapse())
        t0 = time.monotonic()
        while True:
            if self.fenced is not None:
                return
            if self.membership.lapse() <= self._half_session:
                break
            await asyncio.sleep(0.05)
        if self.fenced is None:
            log.warning("group membership confirmed again: processing resumed after %.1fs",
                        time.monotonic() - t0)

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._last_tick = time.monotonic()
            self._watchdog = asyncio.get_running_loop().call_later(WATCHDOG_INTERVAL,
                                                                   self._watch_loop)

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
        self._start_watchdog()
        try:
            async for event in stream.events():
                t0 = time.perf_counter()
                await self.process(event)
                self.metrics.event_seconds.observe(time.perf_counter() - t0)
        except BaseException as exc:
            self._agent_state = f"agent stopped: {describe(exc)}"
            raise
        self._agent_state = "agent stopped: its stream ended"

    async def process(self, event: Any) -> None:
        """Handle one input. Its log lines carry its saga fields (``sagaz.logs``, worked out
        from the input only when a line is written); traced, it runs in a span."""
        logged = logs.bind(None, raw=event.value)
        try:
            if self.tracer is None:
                await self._process(event)
            else:
                await self._traced(event)
        finally:
            logs.unbind(logged)

    async def _traced(self, event: Any) -> None:
        """``_process`` in a span, the child of the span that sent the input (its Kafka
        headers), else of the saga's trace (the message's, else the row's: timer events
        carry none); every output carries the span's context in its headers. A start
        without a trace makes this span the saga's trace."""
        from sagaz import tracing

        value = event.value
        try:
            msg = orjson.loads(value)
        except (orjson.JSONDecodeError, TypeError):  # malformed (dead-lettered below)
            msg = None
        msg = msg if isinstance(msg, dict) else {}
        parent = tracing.from_kafka_headers(event.message.headers) or msg.get("trace")
        if not parent and msg.get("type") != "start":
            token = _current_event.set(weakref.ref(event))
            try:
                row = self.table.get(event.key)
            finally:
                _current_event.reset(token)
            parent = orjson.loads(row).get("trace") if row is not None else None
        kind = msg.get("type")
        name = f"orchestrate {kind} {msg['step']}" if kind == "result" and isinstance(
            msg.get("step"), str) else f"orchestrate {kind or 'input'}"
        attributes = {f"sagaz.{k}": msg[k] for k in ("saga_id", "step", "attempt", "action",
                                                    "ok", "command_id")
                      if isinstance(msg.get(k), (str, int, bool))}
        with tracing.hop_span(self.tracer, name, parent, attributes) as span:
            if kind == "start" and msg.get("trace") is None:
                msg["trace"] = tracing.span_headers(span)
                value = orjson.dumps(msg)
            logged = logs.bind(None, trace=span, raw=event.value)
            try:
                await self._process(event, tracing.kafka_headers(span), value)
            finally:
                logs.unbind(logged)

    async def _process(self, event: Any, headers: list[tuple[str, bytes]] | None = None,
                       value: bytes | None = None) -> None:
        """``value``: the input's value when it is not ``event.value`` as it came."""
        message = event.message
        tp = message.tp
        if time.monotonic() - self.membership.confirmed > self._half_session:
            await self._wait_for_membership()  # the partition fence
        if tp in self.stalled or self.fenced is not None:
            return  # not acked: delivered again after a restart or rebalance
        self._busy_since = time.monotonic()
        token = _current_event.set(weakref.ref(event))  # table partition = this message's
        futures: list[Any] = []
        resends: list[Resend] = []
        out: Output | None = None
        reason: str | None
        try:
            try:
                out = self.orchestrator.process(message.topic, event.key,
                                                event.value if value is None else value,
                                                self.table.get(event.key), time.time())
            except DefinitionUnavailable as exc:  # wait for a worker that has it
                self._wait_for_definition(tp, message, exc)
                return
            except Exception as exc:  # a bug: never let the input vanish
                log.exception("processing %s:%s@%s failed", message.topic, message.partition,
                              message.offset)
                reason = f"internal error: {describe(exc)}"
            else:
                reason = out.dead_letter
            if out is None or reason is not None:
                await self.dead_letter(message, reason or "internal error",
                                       "internal_error" if out is None
                                       else out.dead_letter_kind or "malformed")
            else:
                self._apply(event, out, futures, resends)
                # Straight to the aiokafka client (faust's wrapper costs ~60 us a message).
                # Every output is keyed by saga id, so on a topic with as many partitions
                # as the input its partition is the input's: no need to hash the key again.
                producer = self.app.producer._ensure_producer()  # type: ignore[attr-defined]
                n = self.settings.partitions
                commands = self.metrics.commands
                for topic, key, value in out.sends:
                    partition = message.partition if self._counts.get(topic) == n else None
                    send = functools.partial(producer.send, topic, value, key=key,
                                             partition=partition, headers=headers)
                    resends.append(send)
                    try:
                        futures.append(await send())
                    except Exception as exc:
                        if not transient(exc):
                            raise
                        futures.append(_failed(exc))  # sent again by _ack_done
                    commands(self._command_kind(topic, value)).inc()
                if out.run is not None:
                    self._observe(out.run)
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
        queue.append((event, futures, time.monotonic(), resends))
        await self._ack_done(tp, queue)

    def _apply(self, event: Any, out: Any, futures: list[Any], resends: list[Resend]) -> None:
        """Write the row (its changelog record joins the input's futures) and arm timers."""
        if out.row is not None:
            self.table.last_write = None
            self.table[event.key] = out.row
            if self.table.last_write is not None:
                futures.append(self.table.last_write)
                resends.append(functools.partial(self._resend_row, event))
            # a repeat writes its row again, unchanged (orchestrator: a crash may have lost it)
            self.metrics.events("duplicate" if out.duplicate else "applied").inc()
        elif out.delete:
            self.table.last_write = None
            del self.table[event.key]
            if self.table.last_write is not None:
                futures.append(self.table.last_write)
                resends.append(functools.partial(self._resend_row, event))
            self.metrics.events("expired").inc()
        else:
            self.metrics.events("duplicate" if out.duplicate else "ignored").inc()
        if out.timers:
            self.metrics.timers_armed.inc(len(out.timers))
            self.timers.arm(event.key.decode(), out.timers)
        if out.disarmed:
            self.timers.disarm(event.key.decode(), out.disarmed)

    async def _ack_done(self, tp: Any,
                        queue: deque[tuple[Any, list[Any], float, list[Resend]]]) -> None:
        """Ack, in offset order, the inputs whose outputs the broker acknowledged. An output
        whose send failed for a transient reason (the broker restarting, a leader moving) is
        sent again every RESEND_INTERVAL until it is acknowledged; its input and the ones
        behind it stay unacked meanwhile (and readiness turns red after stall_timeout)."""
        while queue and tp not in self.stalled:
            event, futures, _, resends = queue[0]
            for i, fut in enumerate(futures):
                if not fut.done():
                    return
                exc = None if fut.cancelled() else fut.exception()
                if exc is None and not fut.cancelled():
                    continue
                if exc is not None and transient(exc) and i < len(resends):
                    await self._resend(tp, futures, i, resends[i], exc)
                    return
                error = "cancelled" if exc is None else describe(exc)
                self.metrics.produce_errors.inc()
                queue.clear()
                self._stall(tp, event.message, f"sending an output failed: {error}")
                return
            queue.popleft()
            self._resend_at.pop(tp, None)
            await self._stream.ack(event)

    async def _resend(self, tp: Any, futures: list[Any], i: int, resend: Resend,
                      exc: BaseException) -> None:
        now = time.monotonic()
        if now < self._resend_at.get(tp, 0.0) or not self.member():
            return  # never a write the group may no longer want from this worker
        self._resend_at[tp] = now + RESEND_INTERVAL
        self.metrics.produce_errors.inc()  # one failed send, sent again now
        if now - self._resend_logged.get(tp, -60.0) >= 30:
            self._resend_logged[tp] = now
            log.warning("%s:%s: an output was not acknowledged (%s); sending it again every "
                        "%.0f s until the broker takes it", tp.topic, tp.partition,
                        describe(exc), RESEND_INTERVAL)
        try:
            futures[i] = await resend()
        except Exception as again:
            futures[i] = _failed(again)

    async def _resend_row(self, event: Any) -> Any:
        """The row's changelog record again: the row as it is now (a later input may have
        changed it: never write an older one over it)."""
        token = _current_event.set(weakref.ref(event))  # read this input's partition
        try:
            value = self.table.get(event.key)
        finally:
            _current_event.reset(token)
        return self.table.send_changelog(event.message.partition, event.key, value)

    def _stall(self, tp: Any, message: Any, reason: str) -> None:
        """Stop a partition on an input that could not be handled: it stays unacked."""
        reason = clip(f"{message.topic}:{message.partition}@{message.offset}: {reason}",
                      MAX_ERROR_CHARS)
        log.error("partition %s stalled (restart the worker once the cause is fixed): %s",
                  tp, reason)
        self.stalled[tp] = (reason, time.time())
        self._unacked.pop(tp, None)
        self.metrics.stalls.inc()
        try:
            self.app.consumer.pause_partitions([tp])
        except Exception:  # stalled all the same: nothing of it is acked
            log.exception("pausing partition %s failed", tp)

    def _wait_for_definition(self, tp: Any, message: Any, exc: DefinitionUnavailable) -> None:
        """The input's run needs a definition this worker lacks: stall its partition (the
        input stays unacked, so the partition's next owner gets it again) and count the
        run as waiting until the next rescan counts them all."""
        key = (exc.name, exc.version)
        self._set_waiting({**self.waiting_runs, key: max(1, self.waiting_runs.get(key, 0))})
        self._stall(tp, message, f"waiting for a worker with saga {exc.name!r} version "
                                 f"{exc.version}: {exc.reason}")

    def _set_waiting(self, counts: dict[tuple[str, int], int]) -> None:
        for saga, version in set(self.waiting_runs) - set(counts):
            self.waiting_gauge.remove(saga, str(version))
        for (saga, version), n in counts.items():
            self.waiting_gauge.labels(saga, str(version)).set(n)
        self.waiting_runs = counts

    async def dead_letter(self, message: Any, reason: str, kind: str = "malformed") -> None:
        """Write the input's dead-letter copy and wait for the broker's ack; raise
        DeadLetterFailed when it cannot be written. A copy that would be too large keeps a
        truncated value, with the original size and SHA-256 in headers. ``kind``: the
        reason's class for the metrics (``MessageError.kind``, or internal_error)."""
        self.metrics.events("dead_letter").inc()
        if self.tracer is not None:
            from opentelemetry.trace import get_current_span

            from sagaz.tracing import set_error

            set_error(get_current_span(), clip(reason, 500))
        log.warning("dead-lettering %s:%s@%s: %s", message.topic, message.partition,
                    message.offset, clip(reason, 500))
        key, value, headers = messages.dead_letter_record(
            message.key, message.value, reason, message.topic, message.partition,
            message.offset, self.settings.max_message_bytes)
        producer = self.app.producer._ensure_producer()  # type: ignore[attr-defined]
        error: BaseException | None = None
        # The producer gives up on a write after a quarter of the session timeout (the
        # partition fence), so a transient failure (the broker restarting) is tried again
        # for as long as DEAD_LETTER_ATTEMPTS slow attempts would have taken.
        deadline = time.monotonic() + DEAD_LETTER_ATTEMPTS * DEAD_LETTER_TIMEOUT
        attempt = 0
        while True:
            try:
                fut = await producer.send(self.topics.dead_letters, value, key=key,
                                          headers=headers)
                # shielded: a slow attempt that succeeds later is not cancelled (nor sent
                # again needlessly once it has been)
                await asyncio.wait_for(asyncio.shield(fut), DEAD_LETTER_TIMEOUT)
                self.metrics.dead_letters(kind).inc()
                return
            except Exception as exc:
                error = exc
                attempt += 1
                self.metrics.produce_errors.inc()
                log.warning("dead-letter copy of %s:%s@%s not written (attempt %d): %s",
                            message.topic, message.partition, message.offset, attempt,
                            describe(exc))
            if self.fenced is not None or (attempt >= DEAD_LETTER_ATTEMPTS and not (
                    transient(error) and time.monotonic() < deadline)):
                break
            await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0))
        raise DeadLetterFailed(f"its dead-letter copy could not be written: "
                               f"{describe(error) if error else 'unknown'}; dead-letter "
                               f"reason: {reason}")

    def health(self) -> tuple[bool, bool, dict[str, Any]]:
        """(live, ready, details): what /health/live and /health/ready answer."""
        dead = []
        if self._agent_state not in (None, "running"):
            dead.append(self._agent_state)
        if self.fenced is not None:
            dead.append(f"fenced: {self.fenced}")
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
        lapse = self.membership.lapse()
        if lapse > self._half_session:
            waiting.append(f"group membership not confirmed for {lapse:.0f}s: paused")
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
        if self.waiting_runs or self.orchestrator.changed:
            details["definitions"] = self._definitions_details()
        return not dead, (not dead and not waiting and not self.stalled
                          and not self.waiting_runs), details

    def _definitions_details(self) -> dict[str, Any]:
        """Runs waiting for a definition version, and versions changed without a bump."""
        have = {name: sorted(v) for name, v in self.orchestrator.definitions.by_name.items()}
        return {
            "waiting": [{"saga": saga, "version": version, "runs": n,
                         "versions_here": have.get(saga, [])}
                        for (saga, version), n in sorted(self.waiting_runs.items())],
            "changed_without_version_bump": [
                {"saga": saga, "version": version, "runs_started_on": recorded,
                 "fingerprint_here": here}
                for (saga, version, recorded), here in sorted(self.orchestrator.changed.items())]}

    # -- metrics

    def _observe(self, run: Transition) -> None:
        """A transition written to the table: the run families and the in-flight index."""
        self.in_flight.update(run.saga_id, run.saga, run.status, run.started_at)
        self.run_metrics.transition(run)

    def _command_kind(self, topic: str, value: bytes) -> str:
        """step, compensation or outcome. Commands are ``messages.encode`` documents, which
        begin with the version and the type: no need to decode them."""
        if topic == self.topics.outcomes:
            return "outcome"
        return "compensation" if value.startswith(b'{"v":1,"type":"compensate"') else "step"

    def _on_assigned(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        self.metrics.rebalances.inc()
        if not self.membership.watching:
            self._watch_membership()

    def _watch_membership(self) -> None:
        """Start the partition fence once the consumer joined its group (its coordinator
        exists from then on, in faust's consumer thread)."""
        thread = getattr(self.app.consumer, "_thread", None)
        coordinator = getattr(getattr(thread, "_consumer", None), "_coordinator", None)
        if not self.membership.watch(coordinator):
            self.membership.watching = True  # warn once
            log.warning("no aiokafka group coordinator with _do_heartbeat/_do_rejoin_group: "
                        "this worker is not fenced when cut off from the broker")

    def _on_revoked(self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        self.seek_guard.forget()

    def _stalled_sample(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), float(len(self.stalled)))]

    def _unacked_sample(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), float(sum(len(q) for q in self._unacked.values())))]

    def _ready_sample(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), 1.0 if self.health()[1] else 0.0)]

    def _recovery_sample(self) -> list[tuple[tuple[str, ...], float]]:
        """Seconds faust's last table recovery took (the previous one while one runs)."""
        recovery = getattr(self.app.tables, "recovery", None)
        began = getattr(recovery, "_recovery_started_at", None)
        ended = getattr(recovery, "_recovery_ended_at", None)
        if began is not None and ended is not None and ended >= began:
            self._last_recovery = ended - began
        return [] if self._last_recovery is None else [((), self._last_recovery)]

    def _lag_samples(self) -> list[tuple[tuple[str, ...], float]]:
        """Per assigned input partition: its high watermark as of the last fetch less the
        next offset to read (the last one read + 1, else the committed one). Read from the
        consumer's bookkeeping when Prometheus scrapes: no broker request."""
        out: list[tuple[tuple[str, ...], float]] = []
        if not self.app.started:
            return out
        consumer = self.app.consumer
        inputs = self.topics.inputs
        read = getattr(consumer, "_read_offset", {})
        committed = getattr(consumer, "_committed_offset", {})
        for tp in consumer.assignment():
            if tp.topic not in inputs:
                continue
            end = consumer.highwater(tp)
            if end is None:
                continue
            last = read.get(tp)
            position = last + 1 if last is not None else committed.get(tp) or 0
            out.append(((tp.topic, str(tp.partition)), float(max(0, end - position))))
        return out

    # -- timers

    async def _fire_timers(self) -> None:
        if not self.member():  # the partition fence: no acks, resends, timers or rows
            return
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
        if self.table.stale:
            self._heal(assignment)
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
        self.metrics.timers_fired.inc(len(due))

    def _heal(self, assignment: frozenset[Any]) -> None:
        """Write again the rows whose changelog got a stale record after them, for the
        partitions this worker owns (a standby only remembers them until it owns them)."""
        active = {tp.partition for tp in assignment if tp.topic == self.topics.commands}
        for partition, key in [k for k in self.table.stale if k[0] in active]:
            self.table.stale.discard((partition, key))
            row = self.table.stored(partition, key)
            if row is not None:
                self.table.send_changelog(partition, key, row)
                log.warning("saga %s: its newest row written to the changelog again", key)

    def _timer_not_sent(self, due: float, saga_id: str, key: str, exc: Any) -> bool:
        self.metrics.produce_errors.inc()
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
        and expiries due within the horizon (rescanned every half horizon); and for the
        sagas in flight (the metrics' index)."""
        self.timers.clear()
        self.in_flight.clear()
        now = time.time()
        self._next_rescan = now + EXPIRY_HORIZON / 2
        count = 0
        t0 = time.perf_counter()
        waiting: dict[tuple[str, int], int] = {}
        for key, row in self.table.items():
            rec = run_record.decode(row)
            state = rec.state
            self.in_flight.update(state.saga_id, state.name, state.status.value,
                                  state.started_at)
            timers = armed_timers(rec, now + EXPIRY_HORIZON)
            if timers:
                self.timers.arm(key.decode(), timers)
                count += 1
            missing = self.orchestrator.waiting(rec)
            if missing is not None:
                waiting[missing] = waiting.get(missing, 0) + 1
        self._set_waiting(waiting)
        log.info("timer index rebuilt in %.3f s: %d sagas with armed timers",
                 time.perf_counter() - t0, count)


def broker_unreachable(reason: BaseException | None) -> bool:
    """Whether a crash (or its cause) is a send the broker did not acknowledge in time."""
    from aiokafka.errors import KafkaTimeoutError
    from faust.exceptions import ProducerSendError

    seen: set[int] = set()
    while reason is not None and id(reason) not in seen:
        seen.add(id(reason))
        if isinstance(reason, (KafkaTimeoutError, ProducerSendError)):
            return True
        reason = reason.__cause__ or reason.__context__
    return False


def run_worker(settings: Settings) -> None:
    """Run one orchestrator worker in this process until SIGINT/SIGTERM (the CLI's job)."""
    from sagaz.tracing import configured_tracer

    oapp = OrchestratorApp(settings, tracer=configured_tracer("sagaz.worker"))
    asyncio.run(oapp.prepare())

    def exit_now(reason: str) -> None:
        # No clean shutdown: it would flush what this zombie holds. The changelog and the
        # committed offsets have everything; the restarted worker recovers from them.
        logging.shutdown()
        os._exit(FROZEN_EXIT_CODE)

    oapp.on_frozen = exit_now
    from faust.worker import Worker

    class QuietWorker(Worker):
        """Faust's terminal spinner sets the root logger to DEBUG (for a WARNING level),
        making every aiokafka debug call format a record: a third of the worker's time."""

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            self.spinner = None

    worker = QuietWorker(oapp.app, loglevel=settings.log_level, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        reason = worker.crash_reason or oapp.app.crash_reason
        if reason is not None and broker_unreachable(reason):
            # faust stops the whole app when a table write is not acknowledged in time (the
            # producer gives up after a quarter of the session timeout, see Settings): the
            # broker is down or cut off, and what this worker holds may be stale. Exit as
            # fenced, for the process manager to restart it once the broker is back.
            log.critical("fenced: the broker did not take a write in time (%s); restart this "
                         "worker", describe(reason))
            logging.shutdown()
            os._exit(FROZEN_EXIT_CODE)
