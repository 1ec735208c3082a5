"""OpenTelemetry spans for saga runs (needs the ``otel`` extra; off unless you ask).

    from opentelemetry import trace
    engine = Engine(tracer=SagaTracer(trace.get_tracer("myapp")))

One span per run (``saga <name>``) with one child span per step attempt (``step <name>``)
and per compensation attempt (``compensate <name>``), carrying the saga id, the attempt
and, on failure, the error. Outbox events carry the trace context current when they were
added (``current_trace_headers``), so whoever consumes them can continue the business
transaction's trace.

Over Kafka one saga is one trace, each hop the child of the one that caused it::

    SagaClient.start        "start <saga>"          (SagaClient(tracer=...))
      worker                "orchestrate start"     (OrchestratorApp(tracer=...))
        participant         "run <step>"            (Participant(tracer=...))
          worker            "orchestrate result <step>"
            participant     "run <next step>" / "compensate <step>" ...
              worker        "orchestrate result <step>"  -> the outcome

Two carriers, both W3C trace context (``traceparent``, ``tracestate``): the message's
``trace`` field is the saga's own context (the start's, kept in the saga row and stamped on
every command and outcome, as before), and the Kafka record headers carry the context of
the span that sent the record. A traced process takes its parent from the headers, else
from the ``trace`` field (else, in the worker, from the saga row: timer events have
neither); a process that is not traced adds no headers, so the next hop falls back to the
saga's context and the trace stays one. Nothing here imports OpenTelemetry unless a tracer
was given (or the application imported it): tracing off costs an ``is None`` test per
message.
"""

from __future__ import annotations

import sys
from typing import Any

#: The W3C trace-context keys carried in message ``trace`` fields and Kafka headers.
TRACE_KEYS = ("traceparent", "tracestate")


def trace_id_of(trace: Any) -> str | None:
    """The W3C trace id (32 hex digits) of trace headers (a dict with ``traceparent``) or
    of a span; None when there is none. No OpenTelemetry import for headers."""
    if not trace:
        return None
    if isinstance(trace, dict):
        parent = trace.get("traceparent")
        if isinstance(parent, str):
            parts = parent.split("-")
            if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
                return parts[1]
        return None
    get = getattr(trace, "get_span_context", None)
    if get is not None:
        ctx = get()
        if ctx.is_valid:
            return format(ctx.trace_id, "032x")
    return None


def from_kafka_headers(headers: Any) -> dict[str, str]:
    """The trace context in a record's Kafka headers ((key, bytes) pairs or a mapping)."""
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, dict) else headers
    return {k: v.decode("ascii", "replace") for k, v in items
            if k in TRACE_KEYS and isinstance(v, (bytes, bytearray))}


def kafka_headers(span: Any) -> list[tuple[str, bytes]]:
    """Kafka headers carrying ``span``'s context: the next hop's parent."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, trace.set_span_in_context(span))
    return [(k, v.encode()) for k, v in carrier.items()]


def span_headers(span: Any) -> dict[str, str]:
    """``span``'s context as trace headers (a message's ``trace`` field)."""
    return {k: v.decode() for k, v in kafka_headers(span)}


def hop_span(tracer: Any, name: str, parent: dict[str, str] | None,
             attributes: dict[str, Any], kind: str = "CONSUMER") -> Any:
    """A current span (context manager) for one hop, the child of ``parent`` (trace
    headers; none: a new trace)."""
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {k: v for k, v in parent.items() if isinstance(k, str) and isinstance(v, str)
               } if isinstance(parent, dict) else {}  # an input's: not yet validated
    context = TraceContextTextMapPropagator().extract(carrier)
    return tracer.start_as_current_span(name, context=context, kind=SpanKind[kind],
                                        attributes=attributes)


def set_error(span: Any, error: str | None) -> None:
    """Mark a span failed (a step that failed, an input that was dead-lettered)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, error or "failed"))


def configured_tracer(name: str) -> Any:
    """The process's OpenTelemetry tracer when the process configured one (a TracerProvider
    was set: by ``opentelemetry-instrument``, or a ``sitecustomize``), else None; the CLI's
    worker, participant and ``start`` use it. Imports nothing when OpenTelemetry was not."""
    if "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider.get_tracer(name)


def current_trace_headers() -> dict[str, str]:
    """W3C trace context of the current span, if the application uses OpenTelemetry (the
    API is already imported); else nothing, and OpenTelemetry is not imported."""
    if "opentelemetry.trace" not in sys.modules:
        return {}
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier


class SagaTracer:
    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    def run_span(self, saga: str, saga_id: str) -> Any:
        return self.tracer.start_span(f"saga {saga}", attributes={
            "sagaz.saga": saga, "sagaz.saga_id": saga_id})

    def attempt_span(self, parent: Any, kind: str, step: str, attempt: int,
                     saga_id: str) -> Any:
        from opentelemetry import trace

        return self.tracer.start_span(
            f"{kind} {step}", context=trace.set_span_in_context(parent),
            attributes={"sagaz.step": step, "sagaz.attempt": attempt,
                        "sagaz.saga_id": saga_id})

    @staticmethod
    def end(span: Any, error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()


def span_for_command(tracer: Any, msg: dict[str, Any], headers: Any = None) -> Any:
    """A span for a participant running a command: the child of the span that sent it (the
    record's Kafka ``headers``), else of the saga's context (the message's ``trace``)."""
    attributes = {"sagaz.saga_id": msg["saga_id"], "sagaz.step": msg["step"],
                  "sagaz.attempt": msg["attempt"]}
    for key in ("saga", "command_id"):
        if key in msg:
            attributes[f"sagaz.{key}"] = msg[key]
    return hop_span(tracer, f"{msg['type']} {msg['step']}",
                    from_kafka_headers(headers) or msg.get("trace"), attributes)
