"""OpenTelemetry spans, with the SDK's in-memory exporter (no collector)."""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

from sagaz import Engine, Retry, Saga
from sagaz.tracing import SagaTracer, span_for_command


def tracer_and_spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


async def test_engine_spans_a_run_and_each_attempt():
    tracer, exporter = tracer_and_spans()
    calls = 0

    async def flaky(ctx):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("first try")

    async def bad(ctx):
        raise ValueError("nope")

    async def undo(ctx):
        return None

    saga = Saga("traced")
    saga.add_step("flaky", flaky, undo, retry=Retry(attempts=2))
    saga.add_step("bad", bad)
    await Engine(tracer=SagaTracer(tracer)).run(saga, saga_id="t-1")
    spans = {(s.name, s.attributes.get("sagaz.attempt")): s for s in exporter.get_finished_spans()}
    assert set(spans) == {("saga traced", None), ("step flaky", 1), ("step flaky", 2),
                          ("step bad", 1), ("compensate flaky", 1)}
    root = spans["saga traced", None]
    assert root.status.status_code is StatusCode.ERROR and "compensated" in root.status.description
    assert spans["step flaky", 1].status.description == "ConnectionError: first try"
    assert all(s.parent.span_id == root.context.span_id
               for k, s in spans.items() if k[0] != "saga traced")


def test_participant_spans_continue_the_senders_trace():
    tracer, exporter = tracer_and_spans()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    msg = {"type": "run", "step": "charge", "saga_id": "s", "attempt": 1,
           "trace": {"traceparent": parent}}
    with span_for_command(tracer, msg):
        pass
    [span] = exporter.get_finished_spans()
    assert span.name == "run charge"
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{span.parent.span_id:016x}" == "b7ad6b7169203331"


async def test_outbox_events_carry_the_trace_they_were_added_in():
    from sagaz.memory_storage import MemoryStorage

    tracer, _ = tracer_and_spans()
    storage = MemoryStorage()
    with tracer.start_as_current_span("pay order") as span:
        event = await storage.outbox.insert(None, aggregate_id="o1", topic="orders",
                                         event_type="Paid", payload={})
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert event.headers["traceparent"].split("-")[1] == trace_id
    _, _, _, headers = event.message()
    assert headers["traceparent"] == event.headers["traceparent"]
    # outside a span: no trace headers; given headers win
    plain = await storage.outbox.insert(None, aggregate_id="o1", topic="orders",
                                     event_type="Paid", payload={},
                                     headers={"traceparent": "mine"})
    assert plain.headers == {"traceparent": "mine"}


def test_trace_ids_and_kafka_headers_without_a_span():
    from sagaz.tracing import from_kafka_headers, trace_id_of

    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert trace_id_of({"traceparent": parent}) == "0af7651916cd43dd8448eb211c80319c"
    for bad in (None, {}, {"traceparent": "garbage"}, {"traceparent": 5},
                {"traceparent": "00-" + "0" * 32 + "-b7ad6b7169203331-01"}):
        assert trace_id_of(bad) is None
    headers = [("traceparent", parent.encode()), ("sagaz-reason", b"x"),
               ("tracestate", b"k=v")]
    assert from_kafka_headers(headers) == {"traceparent": parent, "tracestate": "k=v"}
    assert from_kafka_headers(None) == {} and from_kafka_headers(()) == {}


def test_a_command_span_is_the_child_of_the_sending_span_in_its_headers():
    """The record's headers (the worker's span) win over the saga's trace field; the reply
    carries the command span's own context."""
    from sagaz.tracing import kafka_headers, trace_id_of

    tracer, exporter = tracer_and_spans()
    saga_trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    sender = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"
    msg = {"type": "compensate", "step": "charge", "saga_id": "s", "attempt": 2,
           "saga": "order", "command_id": "s|charge|2|compensate",
           "trace": {"traceparent": saga_trace}}
    with span_for_command(tracer, msg, [("traceparent", sender.encode())]) as span:
        reply_headers = dict(kafka_headers(span))
    [done] = exporter.get_finished_spans()
    assert done.name == "compensate charge"
    assert f"{done.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert done.attributes["sagaz.command_id"] == "s|charge|2|compensate"
    carried = reply_headers["traceparent"].decode()
    assert carried.split("-")[2] == f"{done.context.span_id:016x}"
    assert trace_id_of({"traceparent": carried}) == "0af7651916cd43dd8448eb211c80319c"


def test_the_cli_traces_only_when_the_process_configured_a_tracer_provider():
    """``configured_tracer``: None without OpenTelemetry (nothing imported), None with its
    API but no provider, the provider's tracer once one is set (opentelemetry-instrument)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from sagaz.tracing import configured_tracer\n"
        "out = [configured_tracer('x') is None, 'opentelemetry.trace' in sys.modules]\n"
        "from opentelemetry import trace\n"
        "out.append(configured_tracer('x') is None)\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import "
        "InMemorySpanExporter\n"
        "exporter = InMemorySpanExporter(); provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(exporter))\n"
        "trace.set_tracer_provider(provider)\n"
        "with configured_tracer('sagaz.worker').start_as_current_span('s'): pass\n"
        "out.append([s.name for s in exporter.get_finished_spans()])\n"
        "print(json.dumps(out))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [True, False, True, ["s"]]
