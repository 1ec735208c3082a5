"""OpenTelemetry spans for saga runs (needs the ``otel`` extra; off unless you ask).

    from opentelemetry import trace
    engine = Engine(tracer=SagaTracer(trace.get_tracer("myapp")))

One span per run (``saga <name>``) with one child span per step attempt (``step <name>``)
and per compensation attempt (``compensate <name>``), carrying the saga id, the attempt
and, on failure, the error. Participants continue the trace of the saga that sent the
command, from the W3C ``traceparent`` in the message's trace headers. Outbox events carry
the trace context current when they were added (``current_trace_headers``), so whoever
consumes them can continue the business transaction's trace.
"""

from __future__ import annotations

import sys
from typing import Any


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


def span_for_command(tracer: Any, msg: dict[str, Any]) -> Any:
    """A span for a participant running a command, child of the sender's traceparent."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract(msg.get("trace") or {})
    return tracer.start_as_current_span(
        f"{msg['type']} {msg['step']}", context=context,
        attributes={"sagaz.saga_id": msg["saga_id"], "sagaz.step": msg["step"],
                    "sagaz.attempt": msg["attempt"]})
