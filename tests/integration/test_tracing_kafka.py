"""One saga, one trace: from ``SagaClient.start`` through the worker and every participant
step (and compensation) to the outcome, over the real broker; and the JSON log lines the
worker and the participant write while handling it name the saga, step, command and trace.

The first test runs the worker, the participant and the client in this process (as in
tests/kafka_stack.py) so the OpenTelemetry SDK's in-memory exporter sees every span. The
second runs the participant as the CLI does (``sagaz --log-format json participant``) in a
process whose TracerProvider (as ``opentelemetry-instrument`` would set it) exports to a
file, and reads its JSON log lines from its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from sagaz import messages
from sagaz.client import SagaClient
from sagaz.logs import JsonFormatter
from sagaz.participant import Participant
from sagaz.testing.kafka import free_port
from streams.app import OrchestratorApp
from streams.config import Settings
from tests.kafka_stack import PARTITIONS
from tests.sagas_traced import traced

pytestmark = pytest.mark.kafka


@dataclass(frozen=True)
class Span:
    """A finished span, from the in-memory exporter or a process's span file."""

    name: str
    action: str | None  # the worker's result spans: run or compensate
    trace: str
    span: str
    parent: str | None
    error: str | None  # the status description of a failed span
    saga_id: str | None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.action})" if self.action else self.name

    @classmethod
    def of(cls, s: ReadableSpan) -> Span:
        attrs = s.attributes or {}
        return cls(s.name, attrs.get("sagaz.action"),  # type: ignore[arg-type]
                   format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"),
                   None if s.parent is None else format(s.parent.span_id, "016x"),
                   (s.status.description or "failed") if s.status.status_code
                   is StatusCode.ERROR else None,
                   attrs.get("sagaz.saga_id"))  # type: ignore[arg-type]


#: Runs ``sagaz.cli.main(argv[2:])`` with an SDK TracerProvider exporting to argv[1].
TRACED_CLI = """
import json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

class ToFile(SpanExporter):
    def __init__(self, path):
        self.file = open(path, "a", buffering=1)

    def export(self, spans):
        for s in spans:
            self.file.write(json.dumps({
                "name": s.name, "action": s.attributes.get("sagaz.action"),
                "trace": format(s.context.trace_id, "032x"),
                "span": format(s.context.span_id, "016x"),
                "parent": None if s.parent is None else format(s.parent.span_id, "016x"),
                "error": (s.status.description or "failed")
                         if s.status.status_code is StatusCode.ERROR else None,
                "saga_id": s.attributes.get("sagaz.saga_id")}) + "\\n")
        return SpanExportResult.SUCCESS

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ToFile(sys.argv[1])))
trace.set_tracer_provider(provider)
from sagaz.cli import main
sys.exit(main(sys.argv[2:]))
"""


class JsonLines(logging.Handler):
    """The JSON lines a process would write, formatted as they are emitted."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


class Stack:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.lines = JsonLines()
        self.client: SagaClient = None  # type: ignore[assignment]
        self.span_file: Path | None = None  # a participant process's spans

    def spans(self) -> list[Span]:
        spans = [Span.of(s) for s in self.exporter.get_finished_spans()]
        if self.span_file is not None and self.span_file.exists():
            spans += [Span(**json.loads(line))
                      for line in self.span_file.read_text().splitlines()]
        return spans

    async def trace(self, trace_id: str, count: int) -> list[Span]:
        """The trace's spans once ``count`` have ended (the worker's last one ends just
        after it sent the outcome), in the order they ended."""
        deadline = time.monotonic() + 20
        while True:
            spans = [s for s in self.spans() if s.trace == trace_id]
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def traced_stack(bootstrap: str, prefix: str, tmp_path: Any,
                       participant: bool = True) -> AsyncIterator[Stack]:
    st = Stack()
    loggers = [logging.getLogger(n) for n in ("tests.steps", "sagaz.participant",
                                              "sagaz.streams")]
    for logger in loggers:
        logger.addHandler(st.lines)
        logger.setLevel(logging.INFO)
    port = free_port()
    settings = Settings(bootstrap=bootstrap, prefix=prefix, partitions=PARTITIONS,
                        datadir=str(tmp_path / "orchestrator"), web_port=port)
    oapp = OrchestratorApp(settings, [traced], tracer=st.provider.get_tracer("worker"))
    await oapp.start()
    participants = [Participant("traced", [traced], bootstrap=bootstrap, prefix=prefix,
                                tracer=st.provider.get_tracer("participant"))
                    ] if participant else []
    tasks = [asyncio.create_task(p.run()) for p in participants]
    try:
        async with asyncio.timeout(60):
            while not oapp.ready():
                await asyncio.sleep(0.05)
        async with SagaClient(bootstrap, prefix=prefix, url=f"http://127.0.0.1:{port}",
                              tracer=st.provider.get_tracer("client")) as client:
            st.client = client
            yield st
    finally:
        for p in participants:
            await p.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await oapp.stop()
        for logger in loggers:
            logger.removeHandler(st.lines)


def chain(spans: list[Span]) -> list[str]:
    """The spans as one causal chain, each the parent of the next; fails if they are not."""
    by_id = {s.span: s for s in spans}
    roots = [s for s in spans if s.parent not in by_id]
    assert len(roots) == 1, [s.label for s in roots]
    children: dict[str, list[Span]] = {}
    for s in spans:
        if s.parent in by_id:
            children.setdefault(s.parent, []).append(s)  # type: ignore[arg-type]
    out, span = [], roots[0]
    while True:
        out.append(span.label)
        kids = children.get(span.span, [])
        if not kids:
            break
        assert len(kids) == 1, (span.label, [k.label for k in kids])
        span = kids[0]
    assert len(out) == len(spans), out
    return out


HAPPY = ["start traced", "orchestrate start",
         "run reserve", "orchestrate result reserve (run)",
         "run charge", "orchestrate result charge (run)",
         "run ship", "orchestrate result ship (run)"]
AFTER_THE_TIMER = ["orchestrate timer", "run ship", "orchestrate result ship (run)",
                   "compensate charge", "orchestrate result charge (compensate)",
                   "compensate reserve", "orchestrate result reserve (compensate)"]


async def check_traces(st: Stack, ok: str, bad: str) -> dict[str, str]:
    """A completed and a compensated saga are one causal chain each; their trace ids."""
    starts = {s.saga_id: s for s in st.spans() if s.name == "start traced"}
    assert set(starts) == {ok, bad}
    assert starts[ok].parent is None and starts[bad].parent is None
    assert starts[ok].trace != starts[bad].trace
    assert chain(await st.trace(starts[ok].trace, len(HAPPY))) == HAPPY
    bad_spans = await st.trace(starts[bad].trace, len(HAPPY) + len(AFTER_THE_TIMER))
    # The retry's timer event is the child of the saga's context (the client's span); its
    # side of the trace carries on from there.
    [timer] = [s for s in bad_spans if s.name == "orchestrate timer"]
    assert timer.parent == starts[bad].span
    after: set[str] = set()
    frontier = {timer.span}
    while frontier:
        after |= frontier
        frontier = {s.span for s in bad_spans if s.parent in frontier}
    assert chain([s for s in bad_spans if s.span not in after]) == HAPPY
    assert chain([s for s in bad_spans if s.span in after]) == AFTER_THE_TIMER
    failed_runs = [s for s in bad_spans if s.name == "run ship"]
    assert len(failed_runs) == 2 and all("no courier" in (s.error or "") for s in failed_runs)
    assert all(s.saga_id == bad for s in bad_spans), [s.label for s in bad_spans]
    return {ok: starts[ok].trace, bad: starts[bad].trace}


def check_step_lines(lines: list[dict[str, Any]], traces: dict[str, str]) -> None:
    """The steps' own log lines name their saga, step, command and trace."""
    step_lines = [line for line in lines if line.get("logger") == "tests.steps"
                  and line.get("saga_id") in traces]
    assert len(step_lines) == 3 + 4 + 2  # ok: 3 steps; bad: 2, ship twice, 2 undone
    for line in step_lines:
        step = {"reserving": "reserve", "releasing": "reserve", "charging": "charge",
                "refunding": "charge", "shipping": "ship"}[line["message"]]
        action = "compensate" if line["message"] in ("releasing", "refunding") else "run"
        sid = line["saga_id"]
        assert line["step"] == step and line["trace_id"] == traces[sid], line
        assert line["command_id"] in {f"{sid}|{step}|{n}|{action}" for n in (1, 2)}, line


async def test_a_saga_is_one_trace_and_its_log_lines_name_it(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Any) -> None:
    async with traced_stack(kafka_bootstrap, topic_prefix, tmp_path) as st:
        client = st.client
        ok = await client.start("traced", {"order": 1})
        bad = await client.start("traced", {"order": 2, "fail": True})
        done, failed = await client.wait(ok, timeout=30), await client.wait(bad, timeout=30)
        assert done["status"] == "completed" and failed["status"] == "compensated"
        traces = await check_traces(st, ok, bad)
        # the outcome carries the saga's context: the client's start span
        assert failed["trace"]["traceparent"].split("-")[1] == traces[bad]
        check_step_lines(st.lines.lines, traces)

        # A start without a trace (an untraced client): the worker's span is the saga's
        # trace, carried to its outcome.
        plain = "plain-" + topic_prefix
        await client.producer.send_and_wait(
            f"{topic_prefix}.commands", messages.encode("start", plain, None, saga="traced",
                                                        data={}, idempotency_key=None),
            key=plain.encode())
        plain_done = await client.wait(plain, timeout=30)
        [root] = [s for s in st.spans() if s.name == "orchestrate start"
                  and s.saga_id == plain]
        assert root.parent is None
        assert chain(await st.trace(root.trace, len(HAPPY) - 1)) == HAPPY[1:]
        assert plain_done["trace"]["traceparent"].split("-")[1:3] == [root.trace, root.span]

        # A client without a tracer passes on the application's current span.
        async with SagaClient(kafka_bootstrap, prefix=topic_prefix, listen=False) as plain_client:
            with st.provider.get_tracer("app").start_as_current_span("checkout") as checkout:
                app_sid = await plain_client.start("traced", {})
        await client.wait(app_sid, timeout=30)
        [app_start] = [s for s in st.spans() if s.name == "orchestrate start"
                       and s.saga_id == app_sid]
        assert app_start.parent == format(checkout.get_span_context().span_id, "016x")

        # A result for a step the saga does not have: the worker dead-letters it; its
        # warning names the saga, the step, the command and the trace, its span failed.
        parent = "00-" + "1f" * 16 + "-" + "2e" * 8 + "-01"
        await client.producer.send_and_wait(
            f"{topic_prefix}.results", messages.encode(
                "result", ok, {"traceparent": parent}, command_id=f"{ok}|nope|1|run",
                step="nope", attempt=1, action="run", ok=True, result=None, error=None,
                retryable=False, set={}), key=ok.encode())
        deadline = time.monotonic() + 20
        worker: list[dict[str, Any]] = []
        while not worker:
            assert time.monotonic() < deadline, "the worker wrote no line"
            await asyncio.sleep(0.05)
            worker = [line for line in st.lines.lines if line["logger"] == "sagaz.streams"
                      and line["message"].startswith("dead-lettering")]
        [line] = worker
        assert "no step 'nope'" in line["message"]
        assert (line["saga_id"], line["step"], line["command_id"], line["trace_id"]) == (
            ok, "nope", f"{ok}|nope|1|run", "1f" * 16)
        [dead] = await st.trace("1f" * 16, 1)
        assert (dead.name, dead.parent) == ("orchestrate result nope", "2e" * 8)
        assert "no step 'nope'" in (dead.error or "")


def _cli_participant(bootstrap: str, prefix: str, span_file: Path, err: Any) -> Any:
    return subprocess.Popen(
        [sys.executable, "-c", TRACED_CLI, str(span_file), "--bootstrap", bootstrap,
         "--prefix", prefix, "--log-format", "json", "participant", "--service", "traced",
         "--sagas", "tests.sagas_traced"],
        stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def test_a_cli_participant_continues_the_trace_and_logs_json_fields(
        kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    """``sagaz participant`` in its own process, traced because its TracerProvider is set:
    its spans join the client's and the worker's traces; its JSON lines name the saga."""
    span_file, stderr = tmp_path / "participant-spans.jsonl", tmp_path / "participant.log"
    async with traced_stack(kafka_bootstrap, topic_prefix, tmp_path,
                            participant=False) as st:
        st.span_file = span_file
        with open(stderr, "wb") as err:
            proc = _cli_participant(kafka_bootstrap, topic_prefix, span_file, err)
            try:
                ok = await st.client.start("traced", {"order": 1})
                bad = await st.client.start("traced", {"order": 2, "fail": True})
                done = await st.client.wait(ok, timeout=60)
                failed = await st.client.wait(bad, timeout=60)
                assert done["status"] == "completed" and failed["status"] == "compensated"
                traces = await check_traces(st, ok, bad)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    lines = []
    for raw in stderr.read_text().splitlines():
        lines.append(json.loads(raw))  # JSON mode: every line is one object
    check_step_lines(lines, traces)
