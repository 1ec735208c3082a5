"""Every Prometheus metric sagaz exposes, in one place: the catalogue is the documentation.

Each process registers the families of its components into its own registry (no global
registry, nothing at import time)::

    m = metrics.create(registry, "saga_execution_total", "saga_in_flight")
    m["saga_execution_total"].labels(saga="order", status="completed").inc()

Names are the exposed names (counters end in ``_total``; a histogram ``x_seconds`` exposes
``x_seconds_bucket``/``_sum``/``_count``). Labels never carry a saga id, command id or
anything else unbounded. The product page's names (``page=True``) keep the page's meaning.
``docs/metrics.md`` is generated from this table (``python -m sagaz.metrics``) and a test
keeps the two equal; alert rules and dashboards are checked against it too.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

from sagaz.errors import SagazError

log = logging.getLogger("sagaz.metrics")
T = TypeVar("T")

SECONDS = (.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300)
FAST_SECONDS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5)


@dataclass(frozen=True)
class Family:
    name: str                    # as exposed; counters end in _total
    kind: str                    # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str
    component: str               # which process exposes it
    buckets: tuple[float, ...] | None = None
    page: bool = False           # a name the product page promises


ENGINE_OR_WORKER = "engine+worker"
WORKER = "worker"
PARTICIPANT = "participant"
OUTBOX = "outbox"
INBOX = "inbox"
CLIENT = "client"

_FAMILIES = (
    # Saga runs: the same names in the in-process engine and the stream worker.
    Family("saga_execution_total", "counter", ("saga", "status"),
           "Sagas that reached an end, by saga and final status "
           "(completed, compensated, failed)", ENGINE_OR_WORKER, page=True),
    Family("saga_execution_duration_seconds", "histogram", ("saga", "status"),
           "Start to end of a saga, by final status", ENGINE_OR_WORKER, SECONDS, page=True),
    Family("saga_started_total", "counter", ("saga",), "Sagas started", ENGINE_OR_WORKER),
    Family("saga_in_flight", "gauge", ("saga", "status"),
           "Sagas started and not yet ended, by current status (running, aborting, "
           "compensating)",
           ENGINE_OR_WORKER),
    Family("saga_oldest_in_flight_age_seconds", "gauge", ("saga",),
           "Age of the oldest saga not yet ended (0 when none)", ENGINE_OR_WORKER),
    Family("saga_step_duration_seconds", "histogram", ("saga", "step_name", "action"),
           "Time one attempt of a step (action=run) or compensation (action=compensate) "
           "took: in-process measured around the call; in the stream worker as the "
           "participant reported it (attempts abandoned at their timeout have none)",
           ENGINE_OR_WORKER, SECONDS, page=True),
    Family("saga_step_total", "counter", ("saga", "step_name", "outcome"),
           "Step attempts by outcome (succeeded, failed, timed_out; in-process also "
           "cancelled: stopped by the saga's abort)", ENGINE_OR_WORKER),
    Family("saga_step_retries_total", "counter", ("saga", "step_name"),
           "Step attempts that were retries of an earlier failed attempt", ENGINE_OR_WORKER),
    Family("saga_step_timeouts_total", "counter", ("saga", "step_name"),
           "Step attempts that exceeded their timeout", ENGINE_OR_WORKER),
    Family("saga_compensation_total", "counter", ("saga", "step_name", "outcome"),
           "Compensation attempts by outcome (succeeded, failed, timed_out)",
           ENGINE_OR_WORKER),
    # The stream worker (streams/), beyond the run families above.
    Family("saga_stream_events_total", "counter", ("outcome",),
           "Inputs handled, by outcome (applied; expired: a finished saga's row deleted at "
           "the end of its retention; duplicate: a repeat answered by re-sending what is in "
           "flight; ignored: stale or repeated, nothing to do; dead_letter)", WORKER),
    Family("saga_stream_event_duration_seconds", "histogram", (),
           "Time to handle one input", WORKER, FAST_SECONDS),
    Family("saga_stream_commands_total", "counter", ("kind",),
           "Commands and replies sent, by kind (step, compensation, timer, outcome)", WORKER),
    Family("saga_stream_timers_armed_total", "counter", (),
           "Timers armed in the worker's index by the inputs it handled (saga timers, "
           "retention expiries, early timer events armed again; not the index rebuilds "
           "after a rebalance)", WORKER),
    Family("saga_stream_timers_fired_total", "counter", (), "Timer events sent when due",
           WORKER),
    Family("saga_stream_dead_letters_total", "counter", ("reason",),
           "Inputs dead-lettered, by reason (malformed; oversized; unknown_saga: a "
           "definition this worker lacks; no_saga: an event for a saga not in the table; "
           "internal_error)", WORKER),
    Family("saga_stream_stalls_total", "counter", (),
           "Partitions stopped on an input whose outputs or dead-letter copy could not be "
           "written", WORKER),
    Family("saga_stream_stalled_partitions", "gauge", (),
           "Partitions currently stalled (the worker is not ready while any is)", WORKER),
    Family("saga_stream_unacked_inputs", "gauge", (),
           "Inputs handled whose outputs are not yet acknowledged by the broker", WORKER),
    Family("saga_stream_rebalances_total", "counter", (), "Partition assignments received",
           WORKER),
    Family("saga_stream_table_recovery_seconds", "gauge", (),
           "Seconds the last recovery of the saga table took", WORKER),
    Family("saga_stream_consumer_lag", "gauge", ("topic", "partition"),
           "Records behind the end of each assigned input partition (high watermark of "
           "the last fetch less the next offset to read)", WORKER),
    Family("saga_stream_produce_errors_total", "counter", (),
           "Sends to the broker that failed (outputs, dead-letter copies, timer events)",
           WORKER),
    Family("saga_stream_waiting_runs", "gauge", ("saga", "version"),
           "Runs whose definition version this worker does not have: they wait, neither "
           "guessed nor dropped, for a worker that has it", WORKER),
    Family("saga_stream_ready", "gauge", (), "1 while /health/ready is green, else 0", WORKER),
    # Participants (sagaz participant).
    Family("saga_participant_commands_total", "counter", ("service", "action", "outcome"),
           "Commands by action (run, compensate) and outcome (ok, error, timeout, replayed, "
           "dead_letter; action unknown for a malformed command)", PARTICIPANT),
    Family("saga_participant_step_duration_seconds", "histogram",
           ("service", "step_name", "action"),
           "Time a step or compensation took in the participant", PARTICIPANT, SECONDS),
    Family("saga_participant_replays_total", "counter", ("service",),
           "Repeated commands answered from the inbox without running the step again",
           PARTICIPANT),
    Family("saga_participant_timeouts_total", "counter", ("service", "step_name", "action"),
           "Steps and compensations cancelled at their timeout", PARTICIPANT),
    Family("saga_participant_in_flight", "gauge", ("service",),
           "Commands being run now", PARTICIPANT),
    Family("saga_participant_dead_letters_total", "counter", ("service", "reason"),
           "Commands dead-lettered, by reason (malformed; crash_loop: started max_crashes "
           "times without an answer)", PARTICIPANT),
    Family("saga_participant_consumer_lag", "gauge", ("service", "partition"),
           "Commands behind the end of each assigned command partition (high watermark of "
           "the last fetch less the oldest command not yet answered)", PARTICIPANT),
    Family("saga_participant_ready", "gauge", ("service",),
           "1 while /health/ready is green, else 0", PARTICIPANT),
    # Transactional outbox (sagaz outbox run, OptimisticPublisher).
    Family("outbox_pending_events_total", "gauge", (),
           "Events waiting to be published (pending, or claimed and not yet settled)", OUTBOX,
           page=True),
    Family("outbox_events", "gauge", ("status",), "Events in the outbox by status", OUTBOX),
    Family("outbox_oldest_pending_age_seconds", "gauge", (),
           "Age of the oldest event waiting to be published, 0 when none (PostgreSQL and "
           "memory: since it was added; Redis: since the oldest head of an unclaimed "
           "aggregate became due)", OUTBOX),
    Family("outbox_published_events_total", "counter", (),
           "Events published by the worker and marked sent", OUTBOX, page=True),
    Family("outbox_publish_failures_total", "counter", (),
           "Failed publish attempts (each backs off, or goes dead)", OUTBOX),
    Family("outbox_dead_letter_events_total", "counter", (),
           "Events that exhausted their attempts and went dead", OUTBOX),
    Family("outbox_batch_duration_seconds", "histogram", (),
           "Claim, publish and settle of one batch", OUTBOX, SECONDS),
    Family("outbox_last_batch_timestamp_seconds", "gauge", (),
           "Unix time the worker last finished a poll (stale: the worker is stuck)", OUTBOX),
    Family("outbox_optimistic_send_success_total", "counter", (),
           "Events published right after commit by OptimisticPublisher", OUTBOX, page=True),
    Family("outbox_optimistic_send_failures_total", "counter", (),
           "Optimistic sends that failed or timed out (the worker publishes them later)",
           OUTBOX),
    Family("outbox_optimistic_send_duration_seconds", "histogram", (),
           "Time of one optimistic send", OUTBOX, FAST_SECONDS),
    # Consumer inbox (ConsumerInbox, InboxConsumer).
    Family("consumer_inbox_processed_total", "counter", ("consumer",),
           "Events handled for the first time", INBOX),
    Family("consumer_inbox_duplicates_total", "counter", ("consumer",),
           "Events already handled, skipped without running the handler", INBOX, page=True),
    Family("consumer_inbox_handler_errors_total", "counter", ("consumer",),
           "Handler attempts that raised", INBOX),
    Family("consumer_inbox_dead_letters_total", "counter", ("consumer", "reason"),
           "Records dead-lettered, by reason (malformed, handler_failed)", INBOX),
    Family("consumer_inbox_processing_duration_seconds", "histogram", ("consumer",),
           "Time to handle one event, handler and inbox marker", INBOX, SECONDS),
    # SagaClient.
    Family("saga_client_starts_total", "counter", ("saga", "outcome"),
           "Starts by SagaClient, by outcome (sent; refused: too large, nothing sent; "
           "failed: the broker did not acknowledge it)", CLIENT),
)

CATALOGUE: dict[str, Family] = {f.name: f for f in _FAMILIES}


def exposed_names(family: Family) -> list[str]:
    """The series names Prometheus scrapes for ``family``."""
    if family.kind == "histogram":
        return [family.name + s for s in ("_bucket", "_sum", "_count")]
    return [family.name]


def _family(name: str) -> Family:
    f = CATALOGUE.get(name)
    if f is None:
        raise KeyError(f"{name!r} is not in sagaz.metrics.CATALOGUE; add it there "
                       f"(with its help text) before using it")
    return f


def create(registry: Any, *names: str) -> dict[str, Any]:
    """prometheus_client collectors for ``names``, registered in ``registry``."""
    import prometheus_client as pc

    out: dict[str, Any] = {}
    for name in names:
        f = _family(name)
        if f.kind == "counter":
            out[name] = pc.Counter(name.removesuffix("_total"), f.help, f.labels,
                                   registry=registry)
        elif f.kind == "gauge":
            out[name] = pc.Gauge(name, f.help, f.labels, registry=registry)
        else:
            out[name] = pc.Histogram(name, f.help, f.labels, registry=registry,
                                     buckets=f.buckets or SECONDS)
    return out


Samples = Iterable[tuple[tuple[str, ...], float]]


class Computed:
    """A gauge family read from live objects when Prometheus scrapes, not kept up to date
    on the hot path: each source (held weakly, so a dropped component stops reporting) is a
    callable yielding ``(label values, value)``. Values of several sources for the same
    labels are combined with ``agg`` (sum, min or max); label values seen once keep being
    reported (as 0) when no source yields them any more, so a series does not vanish."""

    def __init__(self, registry: Any, name: str, agg: Callable[[Iterable[float]], float]
                 = sum) -> None:
        self.family = _family(name)
        if self.family.kind != "gauge":
            raise ValueError(f"{name} is a {self.family.kind}, not a gauge")
        self.agg = agg
        self._sources: list[Any] = []
        self._seen: set[tuple[str, ...]] = set()
        registry.register(self)

    def add(self, source: Callable[[], Samples]) -> None:
        ref: Any = (weakref.WeakMethod(source) if hasattr(source, "__self__")
                    else (lambda: source))
        self._sources.append(ref)

    def seen(self, *labels: str) -> None:
        """Report these label values from now on (0 while no source yields them)."""
        self._seen.add(labels)

    def describe(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        f = self.family
        return [GaugeMetricFamily(f.name, f.help, labels=f.labels)]

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        f = self.family
        values: dict[tuple[str, ...], list[float]] = {}
        for ref in list(self._sources):
            source = ref()
            if source is None:
                self._sources.remove(ref)
                continue
            try:
                for labels, value in source():
                    values.setdefault(labels, []).append(value)
            except _Gone:
                self._sources.remove(ref)
            except Exception:  # a scrape must not fail on one source
                log.exception("metric %s: a source failed", f.name)
        self._seen.update(values)
        family = GaugeMetricFamily(f.name, f.help, labels=f.labels)
        for labels in sorted(self._seen):
            found = values.get(labels)
            family.add_metric(list(labels), self.agg(found) if found else 0.0)
        yield family


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds, self.counts, self.sum = bounds, [0] * len(bounds), 0.0

    def observe(self, value: float) -> None:
        # bounds end with +Inf; a value equal to a bound belongs to it (le is inclusive)
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class Fast:
    """A counter or histogram family of the catalogue for a hot path that runs on one
    thread (the engine's event loop, the worker's agent): children are plain Python
    numbers, without prometheus_client's lock per value (about a microsecond each), read
    when Prometheus scrapes. Same interface: ``labels(*values).inc()`` / ``.observe(v)``."""

    def __init__(self, registry: Any, name: str) -> None:
        self.family = f = _family(name)
        if f.kind not in ("counter", "histogram"):
            raise ValueError(f"{name} is a {f.kind}: Fast is for counters and histograms")
        self._bounds = [float(b) for b in (f.buckets or SECONDS)] + [float("inf")]
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.family.labels):
                raise ValueError(f"{self.family.name} takes labels {self.family.labels}, "
                                 f"got {values!r}")
            child = self._children[values] = (
                _CounterChild() if self.family.kind == "counter"
                else _HistogramChild(self._bounds))
        return child

    def inc(self, amount: float = 1.0) -> None:
        """A family without labels: ``inc`` (counter) and ``observe`` (histogram)."""
        self.labels().inc(amount)

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def _empty(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        f = self.family
        if f.kind == "counter":
            return CounterMetricFamily(f.name, f.help, labels=f.labels)
        return HistogramMetricFamily(f.name, f.help, labels=f.labels)

    def describe(self) -> list[Any]:
        return [self._empty()]

    def collect(self) -> Iterator[Any]:
        family = self._empty()
        for values, child in list(self._children.items()):
            if self.family.kind == "counter":
                family.add_metric(list(values), child.value)
            else:
                running, buckets = 0, []
                for bound, n in zip(child.bounds, list(child.counts), strict=True):
                    running += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound),
                                    running))
                family.add_metric(list(values), buckets, child.sum)
        yield family


_shared: weakref.WeakKeyDictionary[Any, dict[type, Any]] = weakref.WeakKeyDictionary()


def shared(cls: type[T], registry: Any) -> T:
    """The one ``cls`` (a component's metrics) of ``registry``: components of the same kind
    in one process report into the same families instead of registering them twice."""
    if not hasattr(registry, "register"):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry, "
                        f"got {registry!r}")
    per = _shared.setdefault(registry, {})
    found = per.get(cls)
    if found is None:
        found = per[cls] = cls(registry)  # type: ignore[call-arg]
    return cast(T, found)


def _labels(metric: Any) -> Callable[..., Any]:
    """``metric.labels``, its children cached: a label lookup costs a microsecond or two in
    prometheus_client, a dict lookup a few dozen nanoseconds."""
    cache: dict[tuple[str, ...], Any] = {}

    def child(*values: str) -> Any:
        c = cache.get(values)
        if c is None:
            c = cache[values] = metric.labels(*values)
        return c
    return child


class RunMetrics:
    """The saga run families (component ``engine+worker``): the in-process engine
    (``Engine(metrics=registry)``) and the stream worker report the same names. Counters
    and histograms are ``Fast``: updated on the event loop that runs the sagas only.

    In-flight gauges are read from the shells' sources at scrape time
    (``add_in_flight(counts, oldest)``: ``counts()`` -> {(saga, status): n},
    ``oldest()`` -> {saga: age in seconds})."""

    def __init__(self, registry: Any) -> None:
        m = {name: Fast(registry, name) for name in (
            "saga_execution_total", "saga_execution_duration_seconds", "saga_started_total",
            "saga_step_duration_seconds", "saga_step_total", "saga_step_retries_total",
            "saga_step_timeouts_total", "saga_compensation_total")}
        self._executions = _labels(m["saga_execution_total"])
        self._durations = _labels(m["saga_execution_duration_seconds"])
        self._started = _labels(m["saga_started_total"])
        self._step_seconds = _labels(m["saga_step_duration_seconds"])
        self._steps = _labels(m["saga_step_total"])
        self._retries = _labels(m["saga_step_retries_total"])
        self._timeouts = _labels(m["saga_step_timeouts_total"])
        self._compensations = _labels(m["saga_compensation_total"])
        self.in_flight = Computed(registry, "saga_in_flight", sum)
        self.oldest = Computed(registry, "saga_oldest_in_flight_age_seconds", max)

    def add_in_flight(self, counts: Callable[[], dict[tuple[str, str], int]],
                      oldest: Callable[[], dict[str, float]]) -> None:
        self.in_flight.add(_items(counts))
        self.oldest.add(_items(oldest, single=True))

    def started(self, saga: str) -> None:
        self._started(saga).inc()
        self.oldest.seen(saga)  # reported (0 when none in flight) from now on

    def ended(self, saga: str, status: str, seconds: float | None) -> None:
        self._executions(saga, status).inc()
        if seconds is not None and seconds >= 0:
            self._durations(saga, status).observe(seconds)

    def attempt(self, saga: str, step: str, action: str, outcome: str,
                seconds: float | None) -> None:
        """An attempt of a step (action ``run``) or compensation (``compensate``) ended:
        succeeded, failed, timed_out or cancelled."""
        if action == "run":
            self._steps(saga, step, outcome).inc()
            if outcome == "timed_out":
                self._timeouts(saga, step).inc()
        else:
            self._compensations(saga, step, outcome).inc()
        if seconds is not None:
            self._step_seconds(saga, step, action).observe(seconds)

    def retry(self, saga: str, step: str) -> None:
        self._retries(saga, step).inc()

    def transition(self, t: Transition) -> None:
        """What one transition of a remote run (the stream worker's) says: started, ended,
        an attempt's outcome as reported (its duration as the participant measured it),
        an attempt abandoned at its timeout, retries issued."""
        from sagaz import machine as m

        saga, event = t.saga, t.event
        if event is None:
            self.started(saga)
        else:
            kind = type(event)
            if kind is m.StepSucceeded or kind is m.StepFailed:
                self.attempt(saga, event.step, "run",
                             "succeeded" if kind is m.StepSucceeded else "failed", t.elapsed)
            elif kind is m.CompensationSucceeded or kind is m.CompensationFailed:
                self.attempt(saga, event.step, "compensate",
                             "succeeded" if kind is m.CompensationSucceeded else "failed",
                             t.elapsed)
            elif kind is m.TimerFired and "|" in event.key:
                timer, step, _ = event.key.split("|")
                if timer == "timeout":
                    self.attempt(saga, step, "run", "timed_out", None)
                elif timer == "ctimeout":
                    self.attempt(saga, step, "compensate", "timed_out", None)
        for cmd in t.commands:
            if type(cmd) is m.RunStep and cmd.attempt > 1:
                self.retry(saga, cmd.step)
        if t.status in ENDED:
            self.ended(saga, t.status, None if t.ended_at is None
                       else t.ended_at - t.started_at)


class Transition(NamedTuple):
    """One change of a run as a shell without the attempts in hand sees it (the stream
    worker: the participant runs them), for ``RunMetrics.transition``."""

    saga: str
    saga_id: str
    status: str  # after the transition (a SagaStatus value)
    started_at: float
    ended_at: float | None
    event: Any  # the machine event applied; None: the run started
    commands: list[Any]  # the machine's commands
    elapsed: float | None = None  # seconds the attempt ran, as its participant reported


def _items(fn: Callable[[], dict[Any, Any]], single: bool = False) -> Callable[[], Samples]:
    """A Computed source from a dict-returning callable (held weakly when it is a bound
    method: the source is dropped with its object)."""
    ref: Any = weakref.WeakMethod(fn) if hasattr(fn, "__self__") else (lambda: fn)

    def samples() -> Samples:
        f = ref()
        if f is None:
            raise _Gone
        return [(((key,) if single else key), value) for key, value in f().items()]
    return samples


class _Gone(SagazError):
    """A source whose object is gone: dropped from its Computed."""


class InFlight:
    """Sagas not yet ended, maintained one row change at a time (the stream worker's rows
    are in RocksDB; a scan per event or per scrape would cost as much as the work): counts
    per (saga, status) and, per saga, a heap of start times whose stale entries are dropped
    when read. ``clear`` and ``update`` for every row rebuild it (after a recovery)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.runs: dict[str, tuple[str, str, float]] = {}  # saga id -> (saga, status, start)
        self._counts: dict[tuple[str, str], int] = {}
        self._heaps: dict[str, list[tuple[float, str]]] = {}

    def __len__(self) -> int:
        return len(self.runs)

    def update(self, saga_id: str, saga: str, status: str | None, started_at: float) -> None:
        """The run's current status; None (or an end status) once it is over or gone."""
        old = self.runs.get(saga_id)
        live = status is not None and status not in ENDED
        if old is not None:
            if live and old[1] == status and old[0] == saga:
                return
            key = (old[0], old[1])
            self._counts[key] -= 1
        if not live:
            if old is not None:
                del self.runs[saga_id]
            return
        assert status is not None
        self.runs[saga_id] = (saga, status, started_at)
        key = (saga, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        if old is None or old[2] != started_at or old[0] != saga:
            heap = self._heaps.setdefault(saga, [])
            heapq.heappush(heap, (started_at, saga_id))
            if len(heap) > 2 * self._counts_of(saga) + 1000:
                self._heaps[saga] = heap = [(t, i) for t, i in heap if self._live(saga, t, i)]
                heapq.heapify(heap)

    def _counts_of(self, saga: str) -> int:
        return sum(n for (s, _), n in self._counts.items() if s == saga)

    def _live(self, saga: str, started_at: float, saga_id: str) -> bool:
        run = self.runs.get(saga_id)
        return run is not None and run[0] == saga and run[2] == started_at

    def clear(self) -> None:
        self.runs.clear()
        self._counts = dict.fromkeys(self._counts, 0)
        for heap in self._heaps.values():
            heap.clear()

    def counts(self) -> dict[tuple[str, str], int]:
        return dict(self._counts)

    def oldest(self) -> dict[str, float]:
        now = self.clock()
        out: dict[str, float] = {}
        for saga, heap in self._heaps.items():
            while heap and not self._live(saga, heap[0][0], heap[0][1]):
                heapq.heappop(heap)
            out[saga] = max(0.0, now - heap[0][0]) if heap else 0.0
        return out


ENDED = frozenset({"completed", "compensated", "failed"})


class StreamMetrics:
    """The stream worker's own families (component ``worker``); the computed ones read
    the worker given to ``bind``. Counters and histograms are ``Fast``: the worker updates
    them on its event loop only."""

    def __init__(self, registry: Any) -> None:
        m = {name: Fast(registry, name) for name in (
            "saga_stream_events_total", "saga_stream_event_duration_seconds",
            "saga_stream_commands_total", "saga_stream_timers_armed_total",
            "saga_stream_timers_fired_total", "saga_stream_dead_letters_total",
            "saga_stream_stalls_total", "saga_stream_rebalances_total",
            "saga_stream_produce_errors_total")}
        m.update(create(registry, "saga_stream_waiting_runs"))
        self.events = _labels(m["saga_stream_events_total"])
        self.event_seconds = m["saga_stream_event_duration_seconds"]
        self.commands = _labels(m["saga_stream_commands_total"])
        self.timers_armed = m["saga_stream_timers_armed_total"]
        self.timers_fired = m["saga_stream_timers_fired_total"]
        self.dead_letters = _labels(m["saga_stream_dead_letters_total"])
        self.stalls = m["saga_stream_stalls_total"]
        self.rebalances = m["saga_stream_rebalances_total"]
        self.produce_errors = m["saga_stream_produce_errors_total"]
        #: runs waiting for a definition version this worker lacks; set by the versioning
        self.waiting_runs = m["saga_stream_waiting_runs"]
        self.computed = {name: Computed(registry, name, agg) for name, agg in (
            ("saga_stream_stalled_partitions", sum), ("saga_stream_unacked_inputs", sum),
            ("saga_stream_table_recovery_seconds", max), ("saga_stream_consumer_lag", sum),
            ("saga_stream_ready", min))}

    def bind(self, **sources: Callable[[], Samples]) -> None:
        """``sources``: family name without the ``saga_stream_`` prefix -> its source."""
        for name, source in sources.items():
            self.computed[f"saga_stream_{name}"].add(source)


class ParticipantMetrics:
    """``sagaz participant`` (component ``participant``)."""

    def __init__(self, registry: Any) -> None:
        m = create(registry, "saga_participant_commands_total",
                   "saga_participant_step_duration_seconds", "saga_participant_replays_total",
                   "saga_participant_timeouts_total", "saga_participant_dead_letters_total")
        self.commands = _labels(m["saga_participant_commands_total"])
        self.step_seconds = _labels(m["saga_participant_step_duration_seconds"])
        self.replays = _labels(m["saga_participant_replays_total"])
        self.timeouts = _labels(m["saga_participant_timeouts_total"])
        self.dead_letters = _labels(m["saga_participant_dead_letters_total"])
        self.in_flight = Computed(registry, "saga_participant_in_flight", sum)
        self.consumer_lag = Computed(registry, "saga_participant_consumer_lag", sum)
        self.ready = Computed(registry, "saga_participant_ready", min)


class OutboxMetrics:
    """``OutboxWorker`` (component ``outbox``): the gauges are refreshed by the worker every
    ``metrics_interval`` (they cost a storage query)."""

    def __init__(self, registry: Any) -> None:
        m = create(registry, "outbox_pending_events_total", "outbox_events",
                   "outbox_oldest_pending_age_seconds", "outbox_published_events_total",
                   "outbox_publish_failures_total", "outbox_dead_letter_events_total",
                   "outbox_batch_duration_seconds", "outbox_last_batch_timestamp_seconds")
        self.pending = m["outbox_pending_events_total"]
        self.events = m["outbox_events"]
        self.oldest_pending = m["outbox_oldest_pending_age_seconds"]
        self.published = m["outbox_published_events_total"]
        self.failures = m["outbox_publish_failures_total"]
        self.dead = m["outbox_dead_letter_events_total"]
        self.batch = m["outbox_batch_duration_seconds"]
        self.last_batch = m["outbox_last_batch_timestamp_seconds"]


class OptimisticMetrics:
    """``OptimisticPublisher`` (component ``outbox``)."""

    def __init__(self, registry: Any) -> None:
        m = create(registry, "outbox_optimistic_send_success_total",
                   "outbox_optimistic_send_failures_total",
                   "outbox_optimistic_send_duration_seconds")
        self.success = m["outbox_optimistic_send_success_total"]
        self.failures = m["outbox_optimistic_send_failures_total"]
        self.seconds = m["outbox_optimistic_send_duration_seconds"]


class InboxMetrics:
    """``ConsumerInbox`` (component ``inbox``)."""

    def __init__(self, registry: Any) -> None:
        m = create(registry, "consumer_inbox_processed_total",
                   "consumer_inbox_duplicates_total", "consumer_inbox_handler_errors_total",
                   "consumer_inbox_processing_duration_seconds")
        self.processed = _labels(m["consumer_inbox_processed_total"])
        self.duplicates = _labels(m["consumer_inbox_duplicates_total"])
        self.handler_errors = _labels(m["consumer_inbox_handler_errors_total"])
        self.seconds = _labels(m["consumer_inbox_processing_duration_seconds"])


class InboxConsumerMetrics:
    """``InboxConsumer`` (component ``inbox``), besides its ConsumerInbox's."""

    def __init__(self, registry: Any) -> None:
        self.dead_letters = _labels(create(registry, "consumer_inbox_dead_letters_total")[
            "consumer_inbox_dead_letters_total"])


class ClientMetrics:
    """``SagaClient`` (component ``client``)."""

    def __init__(self, registry: Any) -> None:
        self.starts = _labels(create(registry, "saga_client_starts_total")[
            "saga_client_starts_total"])


#: every component's metrics class: together they register the whole catalogue
COMPONENTS: tuple[type, ...] = (RunMetrics, StreamMetrics, ParticipantMetrics, OutboxMetrics,
                                OptimisticMetrics, InboxMetrics, InboxConsumerMetrics,
                                ClientMetrics)


def for_component(component: str) -> list[str]:
    return [f.name for f in _FAMILIES if f.component == component]


def markdown() -> str:
    """docs/metrics.md."""
    lines = ["# Metrics", "",
             "Every metric sagaz exposes (generated from `sagaz/metrics.py` by "
             "`python -m sagaz.metrics > docs/metrics.md`; a test keeps them equal). "
             f"{len(_FAMILIES)} families. Names marked **page** are the product page's.",
             "", "Where: `engine+worker` = the in-process engine (when given a registry) and "
             "the stream worker (`sagaz worker`); `worker` = the stream worker; "
             "`participant` = `sagaz participant`; `outbox` = `sagaz outbox run` and "
             "`OptimisticPublisher`; `inbox` = `ConsumerInbox` / `InboxConsumer`; "
             "`client` = `SagaClient`.", "",
             "| name | type | labels | where | meaning |", "|---|---|---|---|---|"]
    for f in _FAMILIES:
        name = f"`{f.name}`" + (" **page**" if f.page else "")
        labels = ", ".join(f"`{lb}`" for lb in f.labels) or "-"
        lines.append(f"| {name} | {f.kind} | {labels} | {f.component} | {f.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
