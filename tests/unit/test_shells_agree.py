"""The two shells agree: one saga, one script of step outcomes, the same end in-process and
over Kafka.

Hypothesis draws a saga (a sequence or a DAG, each failure strategy, retries, timeouts,
steps with and without compensations) and a script saying what each attempt of each step
and compensation does: write to the context (new keys, a key every attempt of its step
overwrites, its step's list changed in place), then succeed with a result, fail
(retryable), fail for good, or hang until its timeout. The same saga and script run
through the in-process engine (``Engine.run``) and through the Kafka orchestrator's pure core
(``streams.orchestrator.Orchestrator.process``) with a real participant's ``execute``
answering its commands, timers fired in due order. Both must end with the same status,
data, results and step statuses.

Each key is written by one step's attempts and compensation only (they never overlap):
parallel steps writing one key end with the success applied last (``sagaz.run``), and
which that is, in-process, real time decides (two timeouts due together, a retry started
before or after the other branch's success was applied); over Kafka the test's broker
decides. That order is not part of what the shells must agree on; for the same reason,
in a DAG at most one step may hang (two parallel timeouts due at once: which fires first,
and whether a retry's answer comes between them, is real time's choice in-process).

A step that may hang has no compensation: over Kafka a timed-out attempt is abandoned and
compensated (it may have applied its effect), in-process it is cancelled and confirmed
stopped, so it is not. That difference is the machine's (``confirms_cancel``), on purpose.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagaz import Engine, FailureStrategy, Retry, Saga, SagaContext, messages
from sagaz.participant import Participant
from streams.orchestrator import Orchestrator, Topics

EXAMPLES = int(os.environ.get("SAGAZ_HYPOTHESIS_EXAMPLES", "3000")) // 30 or 10
TIMEOUT = 0.08  # of a step that may hang (seconds, real time in-process)
GRACE = 0.02


class Fail(Exception):
    """Retryable."""


class Fatal(Exception):
    """Not retryable (the policies give up on it)."""


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    dag = draw(st.booleans())
    steps = []
    for i in range(n):
        if dag:
            deps = draw(st.lists(st.sampled_from([f"s{j}" for j in range(i)]), unique=True,
                                 max_size=min(i, 2))) if i else []
        else:
            deps = [f"s{i - 1}"] if i else []
        # in a DAG one step at most may hang: two parallel timeouts due together end in
        # an order real time decides in-process (see the module docstring)
        may_hang = draw(st.booleans()) and not (dag and any(s["hang"] for s in steps))
        steps.append({"name": f"s{i}", "deps": deps, "attempts": draw(st.integers(1, 3)),
                      "comp_attempts": draw(st.integers(1, 2)),
                      "comp": not may_hang and draw(st.booleans() | st.just(True)),
                      "hang": may_hang})
    script: dict[str, list[str]] = {}
    for s in steps:
        run_outcomes = ["ok", "fail", "fatal"] + (["hang"] if s["hang"] else [])
        script[f"run:{s['name']}"] = draw(st.lists(st.sampled_from(run_outcomes),
                                                   min_size=s["attempts"],
                                                   max_size=s["attempts"]))
        script[f"comp:{s['name']}"] = draw(st.lists(st.sampled_from(["ok", "ok", "fail",
                                                                     "fatal"]),
                                                    min_size=s["comp_attempts"],
                                                    max_size=s["comp_attempts"]))
    return {"steps": steps, "script": script,
            "strategy": draw(st.sampled_from(list(FailureStrategy)))}


def build(sc: dict[str, Any], calls: dict[str, int]) -> Saga:
    """The scenario's saga; ``calls`` counts the calls of each action (= its attempt)."""
    strategy = sc["strategy"]
    saga = Saga("agree", failure_strategy=strategy,
                grace_period=GRACE if strategy is FailureStrategy.FAIL_FAST_WITH_GRACE
                else None)

    def action(kind: str, step: str) -> Any:
        tag = f"{kind}:{step}"

        async def fn(ctx: SagaContext) -> Any:
            calls[tag] = n = calls.get(tag, 0) + 1
            outcome = sc["script"][tag][n - 1]
            ctx.set(f"{tag}:{n}", n)
            ctx.set(f"last:{step}", f"{tag}:{n}")
            ctx.get(f"log:{step}").append(f"{tag}:{n}")
            if outcome == "hang":
                await asyncio.sleep(30)
            if outcome == "fail":
                raise Fail(f"{tag}:{n}")
            if outcome == "fatal":
                raise Fatal(f"{tag}:{n}")
            return {"by": f"{tag}:{n}"}

        return fn

    for s in sc["steps"]:
        name = s["name"]
        saga.add_step(name, action("run", name), action("comp", name) if s["comp"] else None,
                      depends_on=s["deps"],
                      retry=Retry(attempts=s["attempts"], give_up_on=(Fatal,)),
                      compensation_retry=Retry(attempts=s["comp_attempts"],
                                               give_up_on=(Fatal,)),
                      timeout=TIMEOUT if s["hang"] else None)
    return saga


def initial(sc: dict[str, Any]) -> dict[str, Any]:
    """The saga's data at its start: each step's list, which its attempts append to."""
    return {f"log:{s['name']}": [] for s in sc["steps"]}


async def in_process(sc: dict[str, Any]) -> dict[str, Any]:
    result = await Engine().run(build(sc, {}), initial(sc))
    return result.to_dict()


async def over_kafka(sc: dict[str, Any]) -> dict[str, Any]:
    calls: dict[str, int] = {}
    saga = build(sc, calls)
    orch = Orchestrator([saga], Topics("t"))
    participant = Participant("agree", [saga], bootstrap="unused:9092")
    now, row = 1000.0, None
    inputs = [("t.commands", messages.encode("start", "s1", saga="agree", data=initial(sc),
                                             idempotency_key=None))]
    timers: dict[str, float] = {}  # key -> due; insertion order breaks ties
    for _ in range(500):
        if not inputs:
            if not timers:
                break
            key = min(timers, key=lambda k: timers[k])
            due = timers.pop(key)
            now = max(now, due)
            inputs.append(("t.timers", messages.encode("timer", "s1", key=key, due=due)))
        topic, value = inputs.pop(0)
        out = orch.process(topic, b"s1", value, row, now)
        assert out.dead_letter is None, out.dead_letter
        row = out.row if out.row is not None else row
        for key in out.disarmed:
            timers.pop(key, None)
        for due, key in out.timers:
            timers[key] = due
        for t, _, v in out.sends:
            if not t.startswith("t.participant."):
                continue
            msg = orjson.loads(v)
            tag = f"{'run' if msg['type'] == 'run' else 'comp'}:{msg['step']}"
            if sc["script"][tag][msg["attempt"] - 1] == "hang":
                calls[tag] = calls.get(tag, 0) + 1  # it runs, and is never heard from
                continue
            reply, _ = await participant.execute(msg)
            inputs.append(("t.results", reply))
    assert row is not None
    return orch.view(row)


def essentials(view: dict[str, Any]) -> dict[str, Any]:
    return {"status": view["status"], "data": view["data"], "results": view["results"],
            "steps": [(s["name"], s["status"]) for s in view["steps"]],
            "failed_step": view["failed_step"]}


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sc=scenarios())
def test_engine_and_kafka_core_end_alike(sc: dict[str, Any]) -> None:
    local = asyncio.run(in_process(sc))
    remote = asyncio.run(over_kafka(sc))
    assert remote["status"] in ("completed", "compensated", "failed"), remote
    assert essentials(local) == essentials(remote), sc
