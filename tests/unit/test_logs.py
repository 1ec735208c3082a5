from __future__ import annotations

import json
import logging

import pytest

from sagaz.logs import JsonFormatter, handler


def test_json_lines_carry_level_logger_message_extras_and_exceptions():
    record = logging.LogRecord("sagaz.outbox", logging.WARNING, __file__, 1,
                               "published %d events", (3,), None)
    record.saga_id = "s-1"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "warning" and doc["logger"] == "sagaz.outbox"
    assert doc["message"] == "published 3 events" and doc["saga_id"] == "s-1"
    assert doc["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exception"]
    with pytest.raises(ValueError, match="log format must be 'text' or 'json'"):
        handler("xml")


class _Lines(logging.Handler):
    """Formats with the JsonFormatter in the emitting task, as a stream handler does."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def app_log():
    handler = _Lines()
    logger = logging.getLogger("tests.app")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger, handler.lines
    finally:
        logger.removeHandler(handler)


async def test_engine_log_lines_carry_the_saga_step_command_and_trace(app_log):
    """Every line a step (or compensation) writes, before and after it suspends, names its
    saga, step and command; lines outside the run name none."""
    import asyncio

    from sagaz import Engine, Saga

    log, lines = app_log

    async def reserve(ctx):
        log.info("reserving")
        await asyncio.sleep(0.01)  # continues in a task
        log.info("reserved for postgresql://app:s3cret@db/app")

    async def release(ctx):
        log.info("releasing")

    async def charge(ctx):
        await asyncio.sleep(0)
        log.info("charging")
        raise RuntimeError("declined")

    saga = Saga("logged")
    saga.add_step("reserve", reserve, release)
    saga.add_step("charge", charge)
    log.info("before")
    result = await Engine().run(saga, saga_id="L-1")
    log.info("after")
    assert result.status.value == "compensated"
    by_message = {line["message"]: line for line in lines}
    assert set(by_message) == {"before", "reserving", "reserved for postgresql://app:***@db/app",
                               "charging", "releasing", "after"}  # password masked
    for outside in ("before", "after"):
        assert "saga_id" not in by_message[outside]
    expected = {"reserving": ("reserve", "run"), "charging": ("charge", "run"),
                "reserved for postgresql://app:***@db/app": ("reserve", "run"),
                "releasing": ("reserve", "compensate")}
    for message, (step, action) in expected.items():
        line = by_message[message]
        assert (line["saga_id"], line["step"], line["command_id"], line["trace_id"]) == (
            "L-1", step, f"L-1|{step}|1|{action}", None), line


async def test_engine_log_lines_carry_the_runs_trace_id(app_log):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sagaz import Engine, Saga
    from sagaz.tracing import SagaTracer

    log, lines = app_log
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def step(ctx):
        log.info("in step")

    saga = Saga("traced-log")
    saga.add_step("only", step)
    await Engine(tracer=SagaTracer(provider.get_tracer("t"))).run(saga, saga_id="L-2")
    [line] = lines
    trace_ids = {format(s.context.trace_id, "032x") for s in exporter.get_finished_spans()}
    assert trace_ids == {line["trace_id"]} and line["step"] == "only"


def test_fields_of_a_raw_input_are_worked_out_when_a_line_is_written():
    """The worker binds an input's bytes; a line names what the message says."""
    from sagaz import logs, messages

    raw = messages.encode("result", "s-9", {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8
                                            + "-01"}, command_id="s-9|pay|2|run",
                          step="pay", attempt=2, action="run", ok=True, result=None,
                          error=None, retryable=False, set={})
    record = logging.LogRecord("sagaz.streams", logging.INFO, __file__, 1, "x", (), None)
    with logs.saga_fields(None, raw=raw):
        doc = json.loads(JsonFormatter().format(record))
    assert (doc["saga_id"], doc["step"], doc["command_id"], doc["trace_id"]) == (
        "s-9", "pay", "s-9|pay|2|run", "ab" * 16)
    with logs.saga_fields(None, raw=b"not json"):  # a malformed input: nulls, no error
        doc = json.loads(JsonFormatter().format(record))
    assert doc["saga_id"] is None and doc["trace_id"] is None
    assert logs.current_fields() is None  # cleared after
    assert "saga_id" not in json.loads(JsonFormatter().format(record))


def test_no_opentelemetry_import_when_tracing_is_off():
    """JSON lines with saga fields, the engine, the client, the participant and the worker
    module: none imports OpenTelemetry unless a tracer is given."""
    import subprocess
    import sys

    code = (
        "import asyncio, io, json, logging, sys\n"
        "import sagaz.client, sagaz.participant, streams.app\n"
        "from sagaz import Engine, Saga, logs, messages\n"
        "stream = io.StringIO()\n"
        "h = logs.handler('json'); h.stream = stream\n"
        "logging.getLogger('app').addHandler(h)\n"
        "async def step(ctx): logging.getLogger('app').warning('in step')\n"
        "saga = Saga('plain'); saga.add_step('one', step)\n"
        "asyncio.run(Engine().run(saga, saga_id='p-1'))\n"
        "raw = messages.encode('run', 'p-2', {'traceparent': '00-' + 'a1' * 16 + '-' + "
        "'b2' * 8 + '-01'}, saga='plain', step='one', attempt=1, command_id='c', data={}, "
        "results={})\n"
        "with logs.saga_fields(None, raw=raw): logging.getLogger('app').warning('worker')\n"
        "lines = [json.loads(x) for x in stream.getvalue().splitlines()]\n"
        "print(json.dumps({'otel': sorted(m for m in sys.modules if 'opentelemetry' in m),\n"
        "                  'lines': [[x['saga_id'], x['step'], x['trace_id']] for x in lines]}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {
        "otel": [], "lines": [["p-1", "one", None], ["p-2", "one", "a1" * 16]]}
