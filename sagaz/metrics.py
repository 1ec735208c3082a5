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

import sys
from dataclasses import dataclass
from typing import Any

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
           "Sagas started and not yet ended, by current status (running, compensating)",
           ENGINE_OR_WORKER),
    Family("saga_oldest_in_flight_age_seconds", "gauge", ("saga",),
           "Age of the oldest saga not yet ended (0 when none)", ENGINE_OR_WORKER),
    Family("saga_step_duration_seconds", "histogram", ("saga", "step_name", "action"),
           "Time a step (action=run) or compensation (action=compensate) took",
           ENGINE_OR_WORKER, SECONDS, page=True),
    Family("saga_step_total", "counter", ("saga", "step_name", "outcome"),
           "Step attempts by outcome (succeeded, failed, timed_out)", ENGINE_OR_WORKER),
    Family("saga_step_retries_total", "counter", ("saga", "step_name"),
           "Step attempts that were retries of an earlier failed attempt", ENGINE_OR_WORKER),
    Family("saga_step_timeouts_total", "counter", ("saga", "step_name"),
           "Step attempts that exceeded their timeout", ENGINE_OR_WORKER),
    Family("saga_compensation_total", "counter", ("saga", "step_name", "outcome"),
           "Compensations by outcome (succeeded, failed)", ENGINE_OR_WORKER),
    # The stream worker (streams/), beyond the run families above.
    Family("saga_stream_events_total", "counter", ("outcome",),
           "Inputs handled, by outcome (applied, ignored, duplicate, dead_letter)", WORKER),
    Family("saga_stream_event_duration_seconds", "histogram", (),
           "Time to handle one input", WORKER, FAST_SECONDS),
    Family("saga_stream_commands_total", "counter", ("kind",),
           "Commands and replies sent, by kind (step, compensation, timer, outcome)", WORKER),
    Family("saga_stream_timers_armed_total", "counter", (), "Timers armed", WORKER),
    Family("saga_stream_timers_fired_total", "counter", (), "Timer events sent when due",
           WORKER),
    Family("saga_stream_dead_letters_total", "counter", ("reason",),
           "Inputs dead-lettered, by reason (malformed, oversized, unknown_saga, ...)", WORKER),
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
           "Records behind the end of each assigned input partition", WORKER),
    Family("saga_stream_produce_errors_total", "counter", (),
           "Sends to the broker that failed", WORKER),
    Family("saga_stream_waiting_runs", "gauge", ("saga", "version"),
           "Runs whose definition version this worker does not have: they wait, neither "
           "guessed nor dropped, for a worker that has it", WORKER),
    Family("saga_stream_ready", "gauge", (), "1 while /health/ready is green, else 0", WORKER),
    # Participants (sagaz participant).
    Family("saga_participant_commands_total", "counter", ("service", "action", "outcome"),
           "Commands by action (run, compensate) and outcome (ok, error, timeout, replayed, "
           "dead_letter)", PARTICIPANT),
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
           "Commands dead-lettered, by reason (malformed, crash_loop, ...)", PARTICIPANT),
    Family("saga_participant_consumer_lag", "gauge", ("service", "partition"),
           "Commands behind the end of each assigned command partition", PARTICIPANT),
    Family("saga_participant_ready", "gauge", ("service",),
           "1 while /health/ready is green, else 0", PARTICIPANT),
    # Transactional outbox (sagaz outbox run, OptimisticPublisher).
    Family("outbox_pending_events_total", "gauge", (),
           "Events waiting to be published (pending, or claimed and not yet settled)", OUTBOX,
           page=True),
    Family("outbox_events", "gauge", ("status",), "Events in the outbox by status", OUTBOX),
    Family("outbox_oldest_pending_age_seconds", "gauge", (),
           "Age of the oldest event waiting to be published (0 when none)", OUTBOX),
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
           "Starts sent by SagaClient, by outcome (sent, refused)", CLIENT),
)

CATALOGUE: dict[str, Family] = {f.name: f for f in _FAMILIES}


def exposed_names(family: Family) -> list[str]:
    """The series names Prometheus scrapes for ``family``."""
    if family.kind == "histogram":
        return [family.name + s for s in ("_bucket", "_sum", "_count")]
    return [family.name]


def create(registry: Any, *names: str) -> dict[str, Any]:
    """prometheus_client collectors for ``names``, registered in ``registry``."""
    import prometheus_client as pc

    out: dict[str, Any] = {}
    for name in names:
        f = CATALOGUE.get(name)
        if f is None:
            raise KeyError(f"{name!r} is not in sagaz.metrics.CATALOGUE; add it there "
                           f"(with its help text) before using it")
        if f.kind == "counter":
            out[name] = pc.Counter(name.removesuffix("_total"), f.help, f.labels,
                                   registry=registry)
        elif f.kind == "gauge":
            out[name] = pc.Gauge(name, f.help, f.labels, registry=registry)
        else:
            out[name] = pc.Histogram(name, f.help, f.labels, registry=registry,
                                     buckets=f.buckets or SECONDS)
    return out


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
