"""One saga, one trace: from ``SagaClient.start`` through the worker and every participant
step (and compensation) to the outcome, over the real broker; and the JSON log lines the
worker and the participant write while handling it name the saga, step, command and trace.

The worker, the participant and the client run in this process (as in tests/kafka_stack.py)
so the OpenTelemetry SDK's in-memory exporter sees every span.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from sagaz import Retry, Saga, SagaContext, messages
from sagaz.client import SagaClient
from sagaz.logs import JsonFormatter
from sagaz.participant import Participant
from sagaz.testing.kafka import free_port
from streams.app import OrchestratorApp
from streams.config import Settings
from tests.kafka_stack import PARTITIONS

pytestmark = pytest.mark.kafka

step_log = logging.getLogger("tests.steps")


def traced_saga() -> Saga:
    saga = Saga("traced")

    async def reserve(ctx: SagaContext) -> str:
        step_log.info("reserving")
        return "r-1"

    async def release(ctx: SagaContext) -> None:
        step_log.info("releasing")

    async def charge(ctx: SagaContext) -> str:
        await asyncio.sleep(0)
        step_log.info("charging")
        return "c-1"

    async def refund(ctx: SagaContext) -> None:
        step_log.info("refunding")

    async def ship(ctx: SagaContext) -> str:
        step_log.info("shipping")
        if ctx.get("fail"):
            raise RuntimeError("no courier")
        return "s-1"

    saga.add_step("reserve", reserve, release)
    saga.add_step("charge", charge, refund)
    # a retry after a backoff: the second attempt is caused by a timer event, which
    # carries no trace context of its own (the worker takes the saga row's)
    saga.add_step("ship", ship, retry=Retry(attempts=2, backoff=0.1))
    return saga


class JsonLines(logging.Handler):
    """The JSON lines a process would write, formatted as they are emitted."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@contextlib.asynccontextmanager
async def traced_stack(bootstrap: str, prefix: str, tmp_path: Any
                       ) -> AsyncIterator[tuple[SagaClient, InMemorySpanExporter, JsonLines]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    lines = JsonLines()
    loggers = [logging.getLogger(n) for n in ("tests.steps", "sagaz.participant",
                                              "sagaz.streams")]
    for logger in loggers:
        logger.addHandler(lines)
        logger.setLevel(logging.INFO)
    port = free_port()
    settings = Settings(bootstrap=bootstrap, prefix=prefix, partitions=PARTITIONS,
                        datadir=str(tmp_path / "orchestrator"), web_port=port)
    sagas = [traced_saga()]
    oapp = OrchestratorApp(settings, sagas, tracer=provider.get_tracer("worker"))
    await oapp.start()
    participant = Participant("traced", sagas, bootstrap=bootstrap, prefix=prefix,
                              tracer=provider.get_tracer("participant"))
    task = asyncio.create_task(participant.run())
    try:
        async with asyncio.timeout(60):
            while not oapp.ready():
                await asyncio.sleep(0.05)
        async with SagaClient(bootstrap, prefix=prefix, url=f"http://127.0.0.1:{port}",
                              tracer=provider.get_tracer("client")) as client:
            yield client, exporter, lines
    finally:
        await participant.stop()
        await asyncio.gather(task, return_exceptions=True)
        await oapp.stop()
        for logger in loggers:
            logger.removeHandler(lines)


async def spans_of(exporter: InMemorySpanExporter, trace_id: int, count: int
                   ) -> list[ReadableSpan]:
    """The trace's spans, once ``count`` have ended (the worker's last one ends just after
    it sent the outcome)."""
    deadline = time.monotonic() + 20
    while True:
        spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        if len(spans) >= count or time.monotonic() > deadline:
            return sorted(spans, key=lambda s: s.start_time or 0)
        await asyncio.sleep(0.05)


def label(span: ReadableSpan) -> str:
    """name, with the action for the worker's result spans (run or compensate)"""
    attrs = span.attributes or {}
    action = f" ({attrs['sagaz.action']})" if "sagaz.action" in attrs else ""
    return f"{span.name}{action}"


def chain(spans: list[ReadableSpan]) -> list[str]:
    """The spans as one causal chain, each the parent of the next; fails if they are not."""
    by_id = {s.context.span_id: s for s in spans}
    roots = [s for s in spans if s.parent is None or s.parent.span_id not in by_id]
    assert len(roots) == 1, [label(s) for s in roots]
    children: dict[int, list[ReadableSpan]] = {}
    for s in spans:
        if s.parent is not None and s.parent.span_id in by_id:
            children.setdefault(s.parent.span_id, []).append(s)
    out, span = [], roots[0]
    while True:
        out.append(label(span))
        kids = children.get(span.context.span_id, [])
        if not kids:
            break
        assert len(kids) == 1, (label(span), [label(k) for k in kids])
        span = kids[0]
    assert len(out) == len(spans), out
    return out


async def test_a_saga_is_one_trace_and_its_log_lines_name_it(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    async with traced_stack(kafka_bootstrap, topic_prefix, tmp_path) as (client, exporter,
                                                                         lines):
        ok = await client.start("traced", {"order": 1})
        bad = await client.start("traced", {"order": 2, "fail": True})
        done, failed = await client.wait(ok, timeout=30), await client.wait(bad, timeout=30)
        assert done["status"] == "completed" and failed["status"] == "compensated"

        # -- traces
        starts = {s.attributes["sagaz.saga_id"]: s for s in exporter.get_finished_spans()
                  if s.name == "start traced"}
        assert set(starts) == {ok, bad}
        assert starts[ok].context.trace_id != starts[bad].context.trace_id
        ok_trace, bad_trace = starts[ok].context.trace_id, starts[bad].context.trace_id
        assert chain(await spans_of(exporter, ok_trace, 8)) == [
            "start traced", "orchestrate start",
            "run reserve", "orchestrate result reserve (run)",
            "run charge", "orchestrate result charge (run)",
            "run ship", "orchestrate result ship (run)"]
        bad_spans = await spans_of(exporter, bad_trace, 15)
        # the retry's timer event is the child of the saga's context (the start span); its
        # side of the trace carries on from there
        timer = [s for s in bad_spans if s.name == "orchestrate timer"]
        assert len(timer) == 1 and timer[0].parent.span_id == starts[bad].context.span_id
        before_timer = [s for s in bad_spans if s.start_time < timer[0].start_time]
        after_timer = [s for s in bad_spans if s.start_time >= timer[0].start_time]
        assert chain(before_timer) == [
            "start traced", "orchestrate start",
            "run reserve", "orchestrate result reserve (run)",
            "run charge", "orchestrate result charge (run)",
            "run ship", "orchestrate result ship (run)"]
        assert chain(after_timer) == [
            "orchestrate timer", "run ship", "orchestrate result ship (run)",
            "compensate charge", "orchestrate result charge (compensate)",
            "compensate reserve", "orchestrate result reserve (compensate)"]
        failed_runs = [s for s in bad_spans if s.name == "run ship"]
        assert [s.status.status_code for s in failed_runs] == [StatusCode.ERROR] * 2
        assert "no courier" in (failed_runs[0].status.description or "")
        for span in bad_spans:  # every hop names its saga
            assert span.attributes["sagaz.saga_id"] == bad, label(span)
        # the outcome carries the saga's context: the client's start span
        assert failed["trace"]["traceparent"].split("-")[1] == format(bad_trace, "032x")

        # a start without a trace (an untraced client): the worker's span is the saga's
        # trace, carried to its outcome
        plain = "plain-" + topic_prefix
        await client.producer.send_and_wait(
            f"{topic_prefix}.commands", messages.encode("start", plain, None, saga="traced",
                                                        data={}, idempotency_key=None),
            key=plain.encode())
        plain_done = await client.wait(plain, timeout=30)
        [root] = [s for s in exporter.get_finished_spans() if s.name == "orchestrate start"
                  and s.attributes["sagaz.saga_id"] == plain]
        assert root.parent is None
        assert chain(await spans_of(exporter, root.context.trace_id, 7)) == [
            "orchestrate start", "run reserve", "orchestrate result reserve (run)",
            "run charge", "orchestrate result charge (run)",
            "run ship", "orchestrate result ship (run)"]
        assert plain_done["trace"]["traceparent"].split("-")[1:3] == [
            format(root.context.trace_id, "032x"), format(root.context.span_id, "016x")]

        # -- log lines: the participant's (the steps' own) and the worker's
        trace_hex = {ok: format(ok_trace, "032x"), bad: format(bad_trace, "032x")}
        step_lines = [line for line in lines.lines if line["logger"] == "tests.steps"
                      and line["saga_id"] != plain]
        assert len(step_lines) == 3 + 4 + 2  # ok: 3 steps; bad: 2 + ship twice + 2 undo
        for line in step_lines:
            step = {"reserving": "reserve", "releasing": "reserve", "charging": "charge",
                    "refunding": "charge", "shipping": "ship"}[line["message"]]
            action = "compensate" if line["message"] in ("releasing", "refunding") else "run"
            sid = line["saga_id"]
            assert sid in (ok, bad), line
            assert line["step"] == step and line["trace_id"] == trace_hex[sid], line
            assert line["command_id"] in {f"{sid}|{step}|{n}|{action}" for n in (1, 2)}, line

        # a result for a step the saga does not have: the worker dead-letters it, and its
        # warning names the saga, the step, the command and the trace
        parent = "00-" + "1f" * 16 + "-" + "2e" * 8 + "-01"
        await client.producer.send_and_wait(
            f"{topic_prefix}.results", messages.encode(
                "result", ok, {"traceparent": parent}, command_id=f"{ok}|nope|1|run",
                step="nope", attempt=1, action="run", ok=True, result=None, error=None,
                retryable=False, set={}), key=ok.encode())
        deadline = time.monotonic() + 20
        worker = []
        while not worker:
            assert time.monotonic() < deadline, "the worker wrote no line"
            await asyncio.sleep(0.05)
            worker = [line for line in lines.lines if line["logger"] == "sagaz.streams"
                      and line["message"].startswith("dead-lettering")]
        [line] = worker
        assert "no step 'nope'" in line["message"]
        assert (line["saga_id"], line["step"], line["command_id"]) == (
            ok, "nope", f"{ok}|nope|1|run")
        assert line["trace_id"] == "1f" * 16
        [dead] = await spans_of(exporter, int("1f" * 16, 16), 1)
        assert dead.name == "orchestrate result nope" and dead.parent.span_id == 0x2e2e2e2e2e2e2e2e
        assert dead.status.status_code is StatusCode.ERROR
