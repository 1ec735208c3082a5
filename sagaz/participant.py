"""A participant service: runs the steps and compensations the orchestrator sends it.

    participant = Participant("payments", [order_saga], bootstrap="127.0.0.1:9092")
    await participant.run()          # until participant.stop()

It consumes ``{prefix}.participant.{service}``, runs the step's own function from the same
``Saga`` definition the in-process engine uses (steps whose ``participant`` is this service;
a step without one belongs to the service named after its saga), and publishes the result,
keyed by saga id, to ``{prefix}.results``.

- Concurrency: up to ``concurrency`` commands run at once; commands for one step of one
  saga (its run, a retry, its compensation) run one after another, in the order they
  arrived, while a DAG's independent steps run in parallel as the orchestrator sent them.
  A step runs at most its ``timeout=`` (a compensation its ``compensation_timeout=``):
  then it is cancelled and reported failed (retryable per its
  ``Retry.retry_on_timeout``), so one hung step does not hold back the commands behind it.
- Effectively once: by default the inbox is a ``ChangelogInbox`` (RocksDB backed by the
  compacted topic ``{prefix}.participant.{service}.inbox``, restored when partitions are
  assigned). Before a step runs, the inbox records that it started (acknowledged by the
  broker); the reply is recorded (acknowledged) before it is sent. A command id that has a
  recorded reply is answered from it without running the step; a command that was started
  ``max_crashes`` times without a reply (it keeps killing the process) is dead-lettered and
  answered with a failure. ``inbox=`` takes ``storage.replies`` or a ``MemoryInbox``
  instead (no crash count there).
- Sizes: a reply larger than ``max_message_bytes`` becomes a failed step (not retryable)
  saying so; it is never left unsendable.
- Offsets: a partition's offset is committed up to its oldest command not yet answered,
  every ``commit_interval`` seconds whether or not new commands arrive, and when
  partitions are revoked or the participant stops. A crash repeats replies, never loses
  them.
- Shutdown: ``stop()`` stops fetching, waits up to ``shutdown_timeout`` for running steps,
  cancels the rest (their commands are delivered again), commits and closes.
- Health: ``live()`` is false once the loop or the producer died or a reply could not be
  sent; ``ready()`` is false until partitions are assigned and restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import orjson

from sagaz import logs, messages
from sagaz import run as run_record
from sagaz.context import SagaContext
from sagaz.definition import Saga, Step
from sagaz.errors import SagazError, describe
from sagaz.inbox import ChangelogInbox, Inbox, PartitionRevoked
from sagaz.messages import MAX_ERROR_CHARS, MAX_MESSAGE_BYTES, MessageError, clip
from sagaz.metrics import ParticipantMetrics, shared
from sagaz.security import KafkaSecurity, options, start_client
from sagaz.topics import ensure_topics, producer_stopped, topic_name
from sagaz.versions import Definitions

log = logging.getLogger("sagaz.participant")

SESSION_TIMEOUT = 10.0  # seconds: aiokafka's group session timeout, which the consumer keeps


class StaleCommand(SagazError):
    """A command fetched before this participant lost (or may have lost) its partition:
    not started here; the partition's owner answers it."""

_COMMANDS = frozenset({"run", "compensate"})
COMMIT_GRACE = 60.0  # seconds of failing offset commits before the participant is unready
#: how long the inbox topic keeps what a participant did (compacted, then deleted): twice
#: Kafka's default retention of the command topic it answers
INBOX_RETENTION_MS = 14 * 24 * 3600 * 1000


def _positive(name: str, value: Any, kind: Any = int, minimum: Any = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")


class Participant:
    def __init__(self, service: str, sagas: Iterable[Saga], *, bootstrap: str,
                 prefix: str = "sagaz", inbox: Inbox | None = None,
                 datadir: str | None = None, max_batch: int = 500,
                 concurrency: int = 64, commit_interval: float = 0.2,
                 shutdown_timeout: float = 10.0, max_crashes: int = 3,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, replication: int = 1,
                 tracer: Any = None, registry: Any = None,
                 security: KafkaSecurity | None = None) -> None:
        """``inbox``: None (the durable ``ChangelogInbox``, its RocksDB under ``datadir``,
        a temporary directory when None: restored from Kafka on every start), or
        ``storage.replies`` / ``MemoryInbox()``. ``registry``: a prometheus_client
        CollectorRegistry for the participant's metrics; None: no metrics. ``replication``:
        replicas of the inbox topic it creates (3 on a production cluster). ``security``:
        SASL/TLS settings of its Kafka clients (None: PLAINTEXT)."""
        if not service or not all(c.isalnum() or c in "._-" for c in service):
            raise ValueError(f"service must be non-empty [A-Za-z0-9._-], got {service!r}")
        _positive("max_batch", max_batch)
        _positive("concurrency", concurrency)
        _positive("max_crashes", max_crashes)
        _positive("max_message_bytes", max_message_bytes, minimum=1024)
        _positive("replication", replication)
        _positive("commit_interval", commit_interval, (int, float), 0.01)
        _positive("shutdown_timeout", shutdown_timeout, (int, float), 0)
        self.service = service
        self.bootstrap = bootstrap
        self.security = security
        self.prefix = prefix
        self.topic = topic_name(prefix, "participant", service)
        self.results_topic = topic_name(prefix, "results")
        self.dead_letters = topic_name(prefix, "dead-letters")
        self.inbox_topic = topic_name(prefix, "participant-inbox", service)
        self.inbox = inbox
        self.datadir = datadir
        self.max_batch, self.concurrency = max_batch, concurrency
        self.commit_interval, self.shutdown_timeout = commit_interval, shutdown_timeout
        self.max_crashes, self.max_message_bytes = max_crashes, max_message_bytes
        self.replication = replication
        self.tracer = tracer  # an OpenTelemetry tracer: a span per command, in the saga's trace
        self.metrics: ParticipantMetrics | None = None
        if registry is not None:  # the saga_participant_* families (docs/metrics.md)
            self.metrics = shared(ParticipantMetrics, registry)
            self.metrics.in_flight.add(self._in_flight_sample)
            self.metrics.consumer_lag.add(self._lag_samples)
            self.metrics.ready.add(self._ready_sample)
        self._timed_out: set[str] = set()  # command ids whose step hit its timeout
        self.steps: dict[tuple[str, str], Step] = {}  # of each saga's newest version
        # (saga, version, step): a command runs the step of its run's version (sagaz.versions)
        self.versions: dict[tuple[str, int, str], Step] = {}
        sagas = list(sagas)
        for saga in sagas:
            saga.kafka_name()  # a default name is not stable across processes: refused
        for saga in Definitions(sagas):  # every version; two of one version: an error
            for step in saga.steps.values():
                if (step.participant or saga.name) == service:
                    if step.action is None:
                        raise ValueError(f"step {step.name!r} of saga {saga.name!r} is bound "
                                         f"to {service!r} but has no action to run")
                    self.steps[(saga.name, step.name)] = step  # ascending: newest wins
                    self.versions[(saga.name, saga.version, step.name)] = step
        if not self.steps:
            raise ValueError(f"none of the given sagas has a step for service {service!r}")
        self._stopping = asyncio.Event()
        self._running: dict[str, asyncio.Future[bytes]] = {}  # command id -> its reply
        self._tasks: set[asyncio.Task[None]] = set()
        self._by_tp: dict[Any, set[asyncio.Task[None]]] = {}
        self._chains: dict[Any, asyncio.Task[None]] = {}  # (saga, step) -> its last task
        self._pending: dict[Any, set[int]] = {}  # partition -> offsets not yet answered
        self._fetched: dict[Any, int] = {}  # partition -> offset after the last one fetched
        self._committed: dict[Any, int] = {}
        self._changelog: ChangelogInbox | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._fatal: str | None = None
        self._loop_state: str | None = None  # None: not started; "running"; or why not
        self._assigned = False
        # Fencing a participant cut off from its group (see _still_member): rebalances seen
        # (a command fetched before one is not started after it), and when the group last
        # confirmed this member (a successful heartbeat or join).
        self._epoch = 0
        self._confirmed = time.monotonic()
        self._heartbeats_seen = False
        self._commit_failing_since: float | None = None
        self._commit_error: str | None = None
        self.consumer: Any = None
        self.producer: Any = None

    # -- health

    def live(self) -> bool:
        return (self._fatal is None and self._loop_state in (None, "running", "stopping")
                and not producer_stopped(self.producer))

    def ready(self) -> bool:
        """Live, its partitions assigned and restored, and offsets committing (commits
        failing for over ``COMMIT_GRACE`` seconds make it unready)."""
        failing = self._commit_failing_since
        return (self.live() and self._loop_state == "running" and self._assigned
                and (failing is None or time.monotonic() - failing < COMMIT_GRACE))

    def health(self) -> dict[str, Any]:
        """Details for /health: why the participant is not live or not ready."""
        failing = self._commit_failing_since
        return {"loop": self._loop_state or "not started", "fatal": self._fatal,
                "assigned": self._assigned, "running": len(self._tasks),
                "commit_error": self._commit_error,
                "commit_failing_for": None if failing is None
                else round(time.monotonic() - failing, 1)}

    # -- metrics read when Prometheus scrapes

    def _in_flight_sample(self) -> list[tuple[tuple[str, ...], float]]:
        return [((self.service,), len(self._running))]

    def _ready_sample(self) -> list[tuple[tuple[str, ...], float]]:
        return [((self.service,), 1.0 if self.ready() else 0.0)]

    def _lag_samples(self) -> list[tuple[tuple[str, ...], float]]:
        """Per assigned partition: its high watermark (as of the last fetch) less the
        oldest command not yet answered (or the next to fetch, or the committed offset)."""
        consumer = self.consumer
        out: list[tuple[tuple[str, ...], float]] = []
        if consumer is None or self._loop_state != "running":
            return out
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            pending = self._pending.get(tp)
            position = min(pending) if pending else self._fetched.get(
                tp, self._committed.get(tp))
            if end is not None and position is not None:
                out.append(((self.service, str(tp.partition)), float(max(0, end - position))))
        return out

    # -- lifecycle

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener

        participant = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                await participant._revoked(list(revoked))

            async def on_partitions_assigned(self, assigned: Any) -> None:
                await participant._assigned_to(list(assigned))

        if self.inbox is None:
            for _ in range(120):  # the orchestrator worker creates the topics: wait for it
                partitions = (await ensure_topics(self.bootstrap, {self.topic: 1},
                                                  check=False, create=False,
                                                  security=self.security)).get(self.topic)
                if partitions is not None or self._stopping.is_set():
                    break
                await asyncio.sleep(0.5)
            if partitions is None:
                raise RuntimeError(f"topic {self.topic!r} does not exist after 60 s: start "
                                   f"an orchestrator worker (it creates the topics) first")
            await ensure_topics(self.bootstrap, {self.inbox_topic: partitions},
                                replication=self.replication,
                                configs={"cleanup.policy": "compact,delete",
                                         "retention.ms": str(INBOX_RETENTION_MS)},
                                security=self.security)
            datadir = self.datadir
            if datadir is None:
                self._tmpdir = tempfile.TemporaryDirectory(prefix=f"sagaz-{self.service}-")
                datadir = self._tmpdir.name
            self._changelog = ChangelogInbox(self.inbox_topic, datadir,
                                             bootstrap=self.bootstrap,
                                             client_options=options(self.security))
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, enable_idempotence=True, linger_ms=0,
            max_request_size=max(1_048_576, self.max_message_bytes + 65_536),
            **options(self.security))
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.topic,  # the group is named like its topic
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=self.max_batch, **options(self.security))
        what = f"participant {self.service!r}"
        try:
            await start_client(self.producer, self.bootstrap, self.security, what=what)
            if self._changelog is not None:
                self._changelog.producer = self.producer
            self.consumer.subscribe([self.topic], listener=Listener())
            await start_client(self.consumer, self.bootstrap, self.security, what=what)
            self._watch_heartbeats()
        except BaseException:  # neither may be left open (stop() is idempotent)
            await self.producer.stop()
            await self.consumer.stop()
            raise

    async def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve commands until ``stop()``; starts and stops its own Kafka clients."""
        await self.start()
        self._loop_state = "running"
        committer = asyncio.create_task(self._commit_every_interval())
        paused = False
        try:
            while not self._stopping.is_set():
                # Full: keep polling (the group needs it) but fetch nothing. Paused again on
                # every turn: a rebalance hands out partitions unpaused.
                if len(self._tasks) >= self.concurrency:
                    self.consumer.pause(*self.consumer.assignment())
                    paused = True
                elif paused:
                    self.consumer.resume(*self.consumer.assignment())
                    paused = False
                batches = await self.consumer.getmany(
                    timeout_ms=100, max_records=max(1, min(
                        self.max_batch, self.concurrency - len(self._tasks))))
                for tp, records in batches.items():
                    for record in records:
                        self._spawn(tp, record)
            self._loop_state = "stopping"  # live while it drains; "stopped" once closed
        except BaseException as exc:
            self._loop_state = f"stopped: {describe(exc)}"
            raise
        finally:
            committer.cancel()
            try:
                await self._drain(list(self._tasks))
                await self.commit()
            finally:
                await self.consumer.stop()
                await self.producer.stop()
                if self._changelog is not None:
                    self._changelog.close()
                if self._tmpdir is not None:
                    self._tmpdir.cleanup()
                if self._loop_state == "stopping":
                    self._loop_state = "stopped"

    async def _drain(self, tasks: list[asyncio.Task[None]]) -> None:
        """Let running commands finish (up to shutdown_timeout), cancel the rest."""
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
        for t in late:
            t.cancel()
        if late:
            log.warning("cancelled %d commands still running after %ss (they will be "
                        "delivered again)", len(late), self.shutdown_timeout)
            await asyncio.wait(late)

    # -- offsets

    async def _commit_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.commit_interval)
            try:
                await self.commit()
                self._commit_failing_since = self._commit_error = None
            except Exception as exc:  # a rebalance in progress: the next tick retries
                log.warning("offset commit failed: %s", describe(exc))
                self._commit_error = describe(exc)
                if self._commit_failing_since is None:
                    self._commit_failing_since = time.monotonic()

    async def commit(self, tps: Iterable[Any] | None = None) -> None:
        """Commit, per partition, up to the oldest command not yet answered."""
        offsets = {}
        for tp in (self._fetched if tps is None else tps):
            if tp not in self._fetched:
                continue
            pending = self._pending.get(tp)
            position = min(pending) if pending else self._fetched[tp]
            if position > self._committed.get(tp, -1):
                offsets[tp] = position
        if offsets:
            await self.consumer.commit(offsets)
            self._committed.update(offsets)

    def _watch_heartbeats(self) -> None:
        """Note each heartbeat the group coordinator accepts (aiokafka keeps that to itself:
        its coordinator's ``_do_heartbeat`` is wrapped; without it, no heartbeat fence)."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        beat = getattr(coordinator, "_do_heartbeat", None)
        if beat is None:
            log.warning("aiokafka without GroupCoordinator._do_heartbeat: commands are not "
                        "fenced against a lost group membership")
            self._heartbeats_seen = False
            return

        async def heartbeat() -> bool:
            ok: bool = await beat()
            if ok:
                self._confirmed = time.monotonic()
            return ok

        coordinator._do_heartbeat = heartbeat  # type: ignore[union-attr]
        self._heartbeats_seen = True

    async def _still_member(self, epoch: int) -> None:
        """Right before a step runs: the group still counts this participant as the owner
        of the command's partition. A participant cut off from the broker longer than the
        session timeout has lost its partitions to another member, which runs their
        commands (and retries: new attempts); starting one it fetched before would apply an
        attempt's effect after the saga moved on, a duplicate nobody compensates. So a
        command waits while the last confirmation (a heartbeat the coordinator accepted) is
        older than half the session timeout, and is dropped (left to the partition's owner,
        its offset not committed) once a rebalance began after it was fetched."""
        limit = SESSION_TIMEOUT / 2
        while True:
            if epoch != self._epoch:
                raise StaleCommand("a rebalance began after it was fetched")
            if not self._heartbeats_seen or time.monotonic() - self._confirmed < limit:
                return
            await asyncio.sleep(0.05)

    async def _revoked(self, revoked: list[Any]) -> None:
        self._epoch += 1  # commands fetched before this are not started any more
        tasks = [t for tp in revoked for t in self._by_tp.get(tp, ())]
        await self._drain(tasks)
        try:
            await self.commit(revoked)
        except Exception as exc:
            log.warning("commit on revoke failed: %s", describe(exc))
        for tp in revoked:
            for d in (self._pending, self._fetched, self._committed, self._by_tp):
                d.pop(tp, None)
        if self._changelog is not None:
            self._changelog.revoke([tp.partition for tp in revoked])
        self._assigned = False  # until the next assignment is restored

    async def _assigned_to(self, assigned: list[Any]) -> None:
        if self._changelog is not None:
            try:
                took = await self._changelog.assign([tp.partition for tp in assigned])
            except Exception as exc:  # aiokafka would only log it: make it seen
                self._fatal = f"restoring the inbox of partitions " \
                              f"{sorted(tp.partition for tp in assigned)} failed: " \
                              f"{describe(exc)}"
                log.error("%s", self._fatal)
                return
            log.info("inbox partitions %s restored in %.3f s",
                     sorted(tp.partition for tp in assigned), took)
        self._assigned = bool(self.consumer.assignment())
        self._confirmed = time.monotonic()  # the group just (re)admitted this member

    # -- one command

    def _spawn(self, tp: Any, record: Any) -> None:
        self._pending.setdefault(tp, set()).add(record.offset)
        self._fetched[tp] = record.offset + 1
        try:
            msg: dict[str, Any] | str = messages.decode(record.value, expect=_COMMANDS)
            chain: Any = (msg["saga_id"], msg["step"])  # type: ignore[index]
        except MessageError as exc:
            msg, chain = str(exc), None
        previous = self._chains.get(chain) if chain is not None else None
        task = asyncio.create_task(self._one(tp, record, msg, previous, self._epoch))
        if chain is not None:
            self._chains[chain] = task
        self._tasks.add(task)
        self._by_tp.setdefault(tp, set()).add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._by_tp.get(tp, set()).discard(t)
            if chain is not None and self._chains.get(chain) is t:
                del self._chains[chain]
        task.add_done_callback(done)

    async def _one(self, tp: Any, record: Any, msg: dict[str, Any] | str,
                   previous: asyncio.Task[None] | None, epoch: int = 0) -> None:
        if previous is not None:  # one step's commands run in order
            await asyncio.wait([previous])
        # this command's log lines (the step's own included) carry its saga fields
        logged = logs.bind(msg["saga_id"], msg["step"], msg["command_id"], msg.get("trace")
                           ) if isinstance(msg, dict) else logs.bind(None, raw=record.value)
        try:
            topic, key, value, headers = await self.handle(record, msg, epoch)
            await (await self.producer.send(topic, value, key=key, headers=headers))
        except asyncio.CancelledError:
            raise
        except StaleCommand as exc:
            log.info("command %s:%s@%s not started: %s; left to the partition's owner",
                     record.topic, record.partition, record.offset, exc)
            return
        except PartitionRevoked as exc:
            if tp not in self.consumer.assignment():  # its new owner answers it
                log.info("command %s:%s@%s left to the partition's new owner: %s",
                         record.topic, record.partition, record.offset, exc)
                return
            self._fatal = f"command {record.topic}:{record.partition}@{record.offset} " \
                          f"not answered: {exc}"
            log.error("%s", self._fatal)
            return
        except Exception as exc:
            # Not answered: the offset stays uncommitted; restart to deliver it again.
            self._fatal = f"command {record.topic}:{record.partition}@{record.offset} " \
                          f"not answered: {describe(exc)}"
            log.error("%s", self._fatal)
            return
        finally:
            logs.unbind(logged)
        pending = self._pending.get(tp)
        if pending is not None:
            pending.discard(record.offset)

    async def handle(self, record: Any, msg: dict[str, Any] | str, epoch: int | None = None
                     ) -> tuple[str, bytes | None, bytes | None, list[Any]]:
        """The message to send for one command (``msg``: decoded, or why it is not)."""
        if isinstance(msg, str):
            return self._dead_letter(record, msg)
        saga_id, command_id = msg["saga_id"], msg["command_id"]
        key = saga_id.encode()
        running = self._running.get(command_id)
        if running is not None:  # the same command is being run right now: share its reply
            self._count(msg["type"], "replayed")
            self._replayed()
            return self.results_topic, key, await asyncio.shield(running), []
        recorded, starts = await self._recorded(record.partition, command_id)
        if recorded is not None:
            self._count(msg["type"], "replayed")
            self._replayed()
            return self.results_topic, key, recorded, []
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._running[command_id] = fut
        out_headers: list[tuple[str, bytes]] = []  # the step span's context, when tracing
        outcome = "ok"
        try:
            if starts >= self.max_crashes:
                reason = f"command {command_id} was started {starts} times without an " \
                         f"answer (it crashes the participant); dead-lettered"
                log.error("%s", reason)
                dead = self._dead_letter(record, reason, "crash_loop")
                await (await self.producer.send(dead[0], dead[2], key=dead[1],
                                                headers=dead[3]))
                # it may have applied its effect before the crash: compensated if aborted
                reply = self._reply(msg, False, None, reason, False, {},
                                    applied=msg["type"] == "run")
                ok, outcome = False, "dead_letter"
            else:
                if epoch is not None:
                    await self._still_member(epoch)
                if self._changelog is not None:
                    await self._changelog.started(record.partition, command_id, starts + 1)
                if epoch is not None:  # that write may have waited out a lost membership
                    try:
                        await self._still_member(epoch)
                    except StaleCommand:
                        if self._changelog is not None:  # not a crash: count it back
                            with contextlib.suppress(Exception):
                                await asyncio.shield(self._changelog.started(
                                    record.partition, command_id, starts))
                        raise
                t0 = time.perf_counter()
                try:
                    if self.tracer is None:
                        reply, ok = await self.execute(msg)
                    else:
                        from sagaz import tracing

                        with tracing.span_for_command(self.tracer, msg, record.headers) as span:
                            reply, ok = await self.execute(msg)
                            if not ok:
                                tracing.set_error(span, orjson.loads(reply).get("error"))
                        # the reply's record headers: the worker's next span is its child
                        out_headers = tracing.kafka_headers(span)
                    if self.metrics is not None:
                        self.metrics.step_seconds(self.service, msg["step"], msg["type"]
                                                  ).observe(time.perf_counter() - t0)
                        outcome = ("timeout" if command_id in self._timed_out
                                   else "ok" if ok else "error")
                except asyncio.CancelledError:
                    # Cancelled here (shutdown, revoke): not a crash. Count it back.
                    if self._changelog is not None:
                        with contextlib.suppress(Exception):
                            await asyncio.shield(self._changelog.started(
                                record.partition, command_id, starts))
                    raise
            await self._record(record.partition, command_id, reply)
            fut.set_result(reply)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: a waiting duplicate re-raises it
            raise
        finally:
            del self._running[command_id]
            self._timed_out.discard(command_id)
        self._count(msg["type"], outcome)
        return self.results_topic, key, reply, out_headers

    async def _recorded(self, partition: int, command_id: str) -> tuple[bytes | None, int]:
        if self._changelog is not None:
            return await self._changelog.get(partition, command_id)
        assert self.inbox is not None
        return await self.inbox.get(self.service, command_id), 0

    async def _record(self, partition: int, command_id: str, reply: bytes) -> None:
        if self._changelog is not None:
            await self._changelog.replied(partition, command_id, reply)
        else:
            assert self.inbox is not None
            await self.inbox.put(self.service, command_id, reply)

    def _dead_letter(self, record: Any, reason: str, why: str = "malformed"
                     ) -> tuple[str, bytes | None, bytes | None, list[Any]]:
        """The dead-letter record of a command; ``why``: its reason for the metrics
        (malformed, or crash_loop)."""
        log.warning("dead-lettering %s@%s: %s", record.topic, record.offset, clip(reason, 500))
        if self.metrics is not None:
            self.metrics.dead_letters(self.service, why).inc()
        if why == "malformed":  # a crash loop is counted with its command's action
            self._count("unknown", "dead_letter")
        key, value, headers = messages.dead_letter_record(
            record.key, record.value, reason, record.topic, record.partition, record.offset,
            self.max_message_bytes)
        return self.dead_letters, key, value, headers

    def _count(self, action: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.commands(self.service, action, outcome).inc()

    def _replayed(self) -> None:
        if self.metrics is not None:
            self.metrics.replays(self.service).inc()

    def _reply(self, msg: dict[str, Any], ok: bool, result: Any, error: str | None,
               retryable: bool, changed: dict[str, Any], applied: bool = False,
               elapsed: float | None = None) -> bytes:
        """A result message; ``applied``: the step ran, but its result cannot be carried
        (so the orchestrator compensates it if the saga aborts); ``elapsed``: seconds the
        step ran here (the orchestrator's step duration metric)."""
        extra: dict[str, Any] = {"applied": True} if applied else {}
        if elapsed is not None:
            extra["elapsed"] = round(elapsed, 6)
        return messages.encode("result", msg["saga_id"], msg.get("trace"),
                               command_id=msg["command_id"],
                               step=msg["step"], attempt=msg["attempt"], action=msg["type"],
                               ok=ok, result=result,
                               error=None if error is None else clip(error, MAX_ERROR_CHARS),
                               retryable=retryable, set=changed, **extra)

    async def execute(self, msg: dict[str, Any]) -> tuple[bytes, bool]:
        """Run the command's step or compensation; its result message, and whether it
        succeeded."""
        action = msg["type"]
        version = msg.get("version", 1)  # commands of orchestrators before versions: 1
        step = self.versions.get((msg["saga"], version, msg["step"]))
        ok, result, error, retryable, changed = False, None, None, False, {}
        applied = False  # ran, but its result cannot be carried
        elapsed: float | None = None  # seconds it ran
        if step is None:
            have = sorted(v for s, v, n in self.versions if (s, n) == (msg["saga"], msg["step"]))
            error = f"participant {self.service!r} has no step {msg['step']!r} of saga " \
                    f"{msg['saga']!r} version {version!r}" + (
                        f" (it has versions {have}: give it every version runs are in flight "
                        f"on)" if have else "")
        else:
            fn = step.action if action == "run" else step.compensation_fn
            policy = step.retry if action == "run" else step.compensation_retry
            timeout = step.timeout if action == "run" else step.compensation_timeout
            ctx = SagaContext(msg["saga_id"], msg["saga"])
            # came as JSON: valid. The step works on a copy (sagaz.run: the same rule as
            # in-process), so its writes, also in place, are found by comparing.
            before = msg["data"]
            ctx.data, ctx.results = run_record.attempt_data(before), msg["results"]
            deadline = asyncio.timeout(timeout)
            t0 = time.perf_counter()
            try:
                if fn is None:
                    raise RuntimeError(f"step {step.name!r} has no compensation")
                async with deadline:
                    result = await fn(ctx)
                ok = True
            except TimeoutError as exc:
                if deadline.expired():  # ours: the step was cancelled at its timeout
                    error = f"timed out after {timeout}s"
                    self._timed_out.add(msg["command_id"])
                    if self.metrics is not None:
                        self.metrics.timeouts(self.service, step.name, action).inc()
                    retryable = policy.retry_on_timeout
                else:
                    error, retryable = describe(exc), policy.retryable(exc)
            except Exception as exc:
                error, retryable = describe(exc), policy.retryable(exc)
            elapsed = time.perf_counter() - t0
            if ok:
                if action != "run":
                    result = None  # a compensation's return value is not used
                changed = run_record.changes(before, ctx.data) or {}
                refused = run_record.refusal(step.name, result, changed)
                if refused is not None:  # not retryable; a step ran: compensate it
                    ok, result, changed, applied = False, None, {}, action == "run"
                    error = refused
        reply = self._reply(msg, ok, result, error, retryable, changed, applied, elapsed)
        if len(reply) > self.max_message_bytes and ok and action == "compensate":
            # it undid its step: say so without the writes that do not fit (they are lost,
            # which is better than a saga FAILED over a note a compensation made)
            reply = self._reply(msg, True, None, None, False, {}, elapsed=elapsed)
        if len(reply) > self.max_message_bytes:
            ok = False
            reply = self._reply(msg, False, None, f"result of step {msg['step']!r} is too "
                                f"large: a reply of {len(reply)} bytes (max_message_bytes is "
                                f"{self.max_message_bytes}); keep large payloads outside the "
                                f"saga and return a reference", False, {},
                                applied=action == "run", elapsed=elapsed)
        return reply, ok

