"""What the orchestrator does with one input message, without Kafka or Faust.

``Orchestrator.process`` takes the message, the saga's current row (bytes, from the
``sagas`` table) and the time, feeds the state machine and returns the new row, the
messages to send, the timers to arm, or the reason to dead-letter the input. The Faust
agent (streams/app.py) only moves bytes between Kafka, the table and this function.

Effectively once, over at-least-once delivery:
- The row keeps the ids of the last events it applied (its inbox) next to the state, in
  one value, so one changelog record carries both: they cannot disagree after a crash.
- A repeated input (its id is in the inbox) changes nothing. If it repeats the last event
  applied, a crash may have lost that event's commands (the row was written, they were
  not), so every command still in flight is emitted again (``machine.resume``);
  participants drop the ones they had by command id. Older repeats are dropped: later
  inputs prove their commands went out.
- Any other stale input (old attempt, disarmed timer, finished saga) is ignored by the
  machine itself.
- Faust commits an input offset only after flushing the producer, so a committed input's
  row update and commands were all written; an uncommitted one is delivered again.

Sizes: every row and message is at most ``max_message_bytes`` (default
``sagaz.messages.MAX_MESSAGE_BYTES``, under the producer's and the broker's 1 MiB limits),
checked here, before anything is written. A step result that would make the row or a
command too large fails that step (not retryable; the reason is the saga's error), so the
saga compensates; a start whose data is too large, or any other input whose outcome cannot
be written, is dead-lettered and the row stays as it was. Large payloads belong outside
the saga (store them, pass a reference: a claim check).

Timers: a timer event is applied only when its timer is armed in the row and due; an early
one (forged, or fired by a worker whose clock runs ahead) changes nothing and the timer is
armed again in the index.

Retention: a saga that ends completed or compensated gets an ``expires_at`` in its row and
an expiry timer (key ``EXPIRE``, outside the machine's timers); when that timer event comes
back through the timers topic the row is deleted (a changelog tombstone), in the saga's own
partition like every other change. Failed sagas are kept for the operator. After expiry the
saga id is unknown again: idempotent starts hold for the retention period. Only expiries
due within ``EXPIRY_HORIZON`` are armed in the worker's timer index (whose memory would
otherwise hold every finished saga of the retention period); the worker rescans its rows
every half horizon to arm the next ones.

Versions (``sagaz.versions``): a row records the definition it started on, ``version`` and
``fingerprint`` (rows written before have neither: version 1 of whatever definition the
worker has, no fingerprint check). A worker may hold several versions of a saga: a start
takes the newest, every other input the row's own (``definition``), and its commands carry
that version so participants run that version's steps. An input for a row whose definition
this worker does not have raises ``DefinitionUnavailable``: the app leaves it unacked, its
partition waits (streams/app.py), nothing is guessed or dead-lettered.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import orjson

from sagaz import machine as m
from sagaz import messages
from sagaz.definition import Saga
from sagaz.machine import Plan, SagaState
from sagaz.messages import MAX_ERROR_CHARS, MAX_MESSAGE_BYTES, MessageError, clip
from sagaz.metrics import Transition
from sagaz.versions import Definitions, DefinitionUnavailable

log = logging.getLogger("sagaz.streams")
ROW_VERSION = 1
EXPIRE = "sagaz:expire"  # timer key of a finished saga's retention; not a machine timer
EXPIRY_HORIZON = 3600.0  # seconds ahead that expiry timers are armed in the index


class Topics:
    """Topic names of one sagaz deployment, all derived from a prefix."""

    def __init__(self, prefix: str) -> None:
        if not prefix or not all(c.isalnum() or c in "._-" for c in prefix):
            raise ValueError(f"topic prefix must be non-empty [A-Za-z0-9._-], got {prefix!r}")
        self.prefix = prefix
        self.commands = f"{prefix}.commands"
        self.results = f"{prefix}.results"
        self.timers = f"{prefix}.timers"
        self.outcomes = f"{prefix}.outcomes"
        self.dead_letters = f"{prefix}.dead-letters"

    @property
    def inputs(self) -> tuple[str, str, str]:
        return (self.commands, self.results, self.timers)

    def participant(self, service: str) -> str:
        return f"{self.prefix}.participant.{service}"


class Output(NamedTuple):
    row: bytes | None  # the new row to write; None: unchanged
    sends: list[tuple[str, bytes, bytes]]  # (topic, key, value)
    timers: list[tuple[float, str]]  # (due, timer key) to arm
    dead_letter: str | None  # reason, when the input is rejected
    disarmed: Sequence[str] = ()  # timer keys no longer armed
    delete: bool = False  # the row expired: delete it
    # for metrics: the transition the machine made (None: none), a repeat re-sending what
    # is in flight, the dead letter's class (MessageError.kind)
    run: Transition | None = None
    duplicate: bool = False
    dead_letter_kind: str | None = None


_EXPECT = {
    "commands": frozenset({"start", "cancel", "retry"}),
    "results": frozenset({"result"}),
    "timers": frozenset({"timer"}),
}


def participant_of(saga: Saga, step: str) -> str:
    """The service that runs a step: its ``participant``, else one named after the saga."""
    return saga.steps[step].participant or saga.name


class Orchestrator:
    def __init__(self, sagas: Iterable[Saga], topics: Topics, *, inbox_size: int = 64,
                 retention: float = 0.0, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.topics = topics
        self.max_message_bytes = max_message_bytes
        self.inbox_size = inbox_size
        self.retention = retention  # 0: rows are kept forever
        sagas = list(sagas)
        for saga in sagas:
            saga.kafka_name()  # a default name is not stable across processes: refused
        # every version of each saga; ``sagas``: the newest of each, which new runs start on
        self.definitions = Definitions(sagas)
        self.sagas: dict[str, tuple[Saga, Plan]] = {}
        for name in self.definitions.by_name:
            newest = self.definitions.newest(name)
            assert newest is not None
            self.sagas[name] = (newest, newest.plan)
        # (saga, version, row fingerprint) -> this worker's fingerprint: rows whose version
        # changed without a bump, compatibly (they continue); reported by the app's health
        self.changed: dict[tuple[str, int, str], str] = {}
        self._expect = {getattr(topics, k): v for k, v in _EXPECT.items()}

    def view(self, row: bytes) -> dict[str, Any]:
        """The JSON a web view returns for a saga row."""
        doc = orjson.loads(row)
        state = SagaState.from_dict(doc["state"])
        saga = self.definitions.get(doc["saga"], doc.get("version", 1))
        names = [sp.name for sp in saga.plan.steps] if saga is not None and len(
            saga.plan.steps) == len(state.steps) else [f"#{i}" for i in range(len(state.steps))]
        return {"saga_id": state.saga_id, "saga": doc["saga"], "status": state.status.value,
                "error": state.failure, "failed_step": state.failed_step,
                "started_at": state.started_at, "updated_at": state.updated_at,
                "ended_at": state.ended_at, "expires_at": doc.get("expires_at"),
                "idempotency_key": doc["key"], "version": doc.get("version", 1),
                "fingerprint": doc.get("fingerprint", ""),
                "data": doc["data"], "results": doc["results"],
                "steps": [step_view(n, st) for n, st in zip(names, state.steps, strict=True)]}

    def participants(self) -> set[str]:
        return {participant_of(s, n) for s in self.definitions for n in s.steps}

    def definition(self, doc: dict[str, Any]) -> tuple[Saga, Plan]:
        """The definition a row continues on: its own version (``sagaz.versions``), or
        DefinitionUnavailable (the input waits). A compatible change without a version bump
        is logged once and kept in ``changed``."""
        version, recorded = doc.get("version"), doc.get("fingerprint") or ""
        resolved = self.definitions.resolve(doc["saga"], version, recorded, doc["state"])
        saga = resolved.saga
        if resolved.changed and (doc["saga"], saga.version, recorded) not in self.changed:
            self.changed[(doc["saga"], saga.version, recorded)] = saga.fingerprint
            log.warning("saga %r version %d changed without a version bump (rows started on "
                        "fingerprint %s, this worker has %s); runs that have not reached a "
                        "changed step continue on this definition, the others wait",
                        saga.name, saga.version, recorded, saga.fingerprint)
        return saga, saga.plan

    def waiting(self, row: bytes) -> tuple[str, int] | None:
        """(saga, version) when this row is a run that cannot continue here: unfinished, and
        its definition is not on this worker. None otherwise."""
        doc = orjson.loads(row)
        if doc["state"]["status"] in _ENDED:
            return None
        try:
            self.definition(doc)
        except DefinitionUnavailable as exc:
            return exc.name, exc.version
        return None

    # -- one message

    def process(self, topic: str, key: bytes | None, value: bytes | None, row: bytes | None,
                now: float) -> Output:
        try:
            msg = messages.decode(value, expect=self._expect.get(topic))
            saga_id = msg["saga_id"]
            if key is None or key.decode("utf-8", "replace") != saga_id:
                raise MessageError(f"message key {key!r} is not the saga id {saga_id!r}: saga "
                                   f"messages must be keyed by saga id")
            if msg["type"] == "start":
                return self._start(msg, row, now)
            if row is None and msg["type"] == "timer" and msg["key"] == EXPIRE:
                return Output(None, [], [], None)  # a repeated expiry: already deleted
            if row is None:
                raise MessageError(f"no saga {saga_id!r} here (never started, or its start "
                                   f"has not been processed)", "no_saga")
            return self._event(msg, row, now)
        except MessageError as exc:
            return Output(None, [], [], str(exc), dead_letter_kind=exc.kind)

    def _start(self, msg: dict[str, Any], row: bytes | None, now: float) -> Output:
        if row is not None:  # idempotent start: same saga id, same saga
            return self._repeat(orjson.loads(row), "start")
        entry = self.sagas.get(msg["saga"])
        if entry is None:
            raise MessageError(f"unknown saga definition {msg['saga']!r}; this worker has "
                               f"{sorted(self.sagas)}", "unknown_saga")
        saga, plan = entry  # the newest version
        state, cmds = m.start(plan, msg["saga_id"], now)
        doc = {"v": ROW_VERSION, "saga": saga.name, "state": None, "data": msg["data"],
               "results": {}, "inbox": ["start"], "key": msg["idempotency_key"],
               "trace": msg.get("trace"), "version": saga.version,
               "fingerprint": saga.fingerprint}
        out = self._commit(saga, plan, doc, state, cmds, None)
        too_big = self._oversize(out)
        if too_big:
            raise MessageError(f"start of saga {msg['saga_id']!r} ({saga.name}) refused: "
                               f"{too_big}; keep large payloads outside the saga and pass a "
                               f"reference", "oversized")
        return out

    def _event(self, msg: dict[str, Any], row: bytes, now: float) -> Output:
        doc = orjson.loads(row)
        if msg["type"] == "timer":  # expiry needs no definition: a finished run's is gone
            early = self._early_timer(msg["key"], doc, now)
            if early is not None:
                return early
            if msg["key"] == EXPIRE:
                return Output(None, [], [], None, delete=True)
        status = doc["state"]["status"]
        if status in _ENDED and msg["type"] != "retry" and self.definitions.get(
                doc["saga"], doc.get("version", 1)) is None:
            # A finished run of a version no longer here: nothing can change it (but an
            # operator's retry, which waits for its definition); announce its outcome again.
            return self._repeat(doc, "")
        saga, plan = self.definition(doc)
        event_id, event, result = self._to_event(msg, plan, doc)
        if event_id in doc["inbox"]:
            return self._repeat(doc, event_id)
        elapsed = msg.get("elapsed")  # what the participant measured, for metrics
        if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or elapsed < 0:
            elapsed = None
        out = self._apply(saga, plan, doc, event_id, event, result, msg.get("set"), now,
                          elapsed)
        too_big = self._oversize(out)
        if too_big and isinstance(event, m.StepSucceeded):
            # The result does not fit: the step fails (retrying would return the same).
            # Its effect happened: it is compensated if the saga aborts.
            event = m.StepFailed(event.step, event.attempt, f"result of step {event.step!r} "
                                 f"is too large: {too_big}; keep large payloads outside the "
                                 f"saga and return a reference", False, applied=True)
            out = self._apply(saga, plan, orjson.loads(row), event_id, event, None, None, now,
                              elapsed)
            too_big = self._oversize(out)
        if too_big:
            raise MessageError(f"saga {msg['saga_id']!r} unchanged: applying this "
                               f"{msg['type']} would write {too_big}", "oversized")
        return out

    def _apply(self, saga: Saga, plan: Plan, doc: dict[str, Any], event_id: str, event: Any,
               result: Any, changed: dict[str, Any] | None, now: float,
               elapsed: float | None = None) -> Output:
        state = SagaState.from_dict(doc["state"])
        seq = state.seq
        _, cmds = m.handle(plan, state, event, now)
        if state.seq == seq:
            return Output(None, [], [], None)  # stale: the machine ignored it
        if isinstance(event, m.StepSucceeded):
            if result is not None:
                doc["results"][event.step] = result
            doc["data"].update(changed or {})  # context keys the step set, as in-process
        inbox = doc["inbox"]
        inbox.append(event_id)
        del inbox[:-self.inbox_size]
        return self._commit(saga, plan, doc, state, cmds, event, elapsed)

    def _early_timer(self, key: str, doc: dict[str, Any], now: float) -> Output | None:
        """An armed timer whose due time has not come: nothing happens, and it is armed
        again (the index popped it). None when the timer may be applied."""
        due = doc.get("expires_at") if key == EXPIRE else doc["state"]["timers"].get(key)
        if due is None:
            # Not armed: a stale timer (the machine ignores it) or a repeated expiry of a
            # saga that a retry made unfinished again (kept: it has no expires_at).
            return Output(None, [], [], None) if key == EXPIRE else None
        if due <= now:
            return None
        if key == EXPIRE and due > now + EXPIRY_HORIZON:
            return Output(None, [], [], None)  # the rescan arms it when it comes near
        return Output(None, [], [(due, key)], None)

    def _oversize(self, out: Output) -> str | None:
        """What in an output exceeds ``max_message_bytes``, or None."""
        limit = self.max_message_bytes
        if out.row is not None and len(out.row) > limit:
            return f"a saga row of {len(out.row)} bytes (max_message_bytes is {limit})"
        for topic, _, value in out.sends:
            if len(value) > limit:
                return f"a {topic} message of {len(value)} bytes (max_message_bytes is {limit})"
        return None

    @staticmethod
    def _to_event(msg: dict[str, Any], plan: Plan, doc: dict[str, Any]) -> tuple[str, Any, Any]:
        kind = msg["type"]
        if kind == "cancel":
            return f"cancel|{msg['request_id']}", m.CancelRequested(msg["reason"]), None
        if kind == "retry":
            return f"retry|{msg['request_id']}", m.RetryCompensations(), None
        if kind == "timer":
            return f"timer|{msg['key']}", m.TimerFired(msg["key"]), None
        step, attempt, action = msg["step"], msg["attempt"], msg["action"]
        if step not in plan.index:
            raise MessageError(f"saga {doc['saga']!r} has no step {step!r}")
        if action not in ("run", "compensate"):
            raise MessageError(f"result action must be 'run' or 'compensate', got {action!r}")
        expected = m.command_id(msg["saga_id"], step, attempt, action)
        if msg["command_id"] != expected:
            raise MessageError(f"command_id {msg['command_id']!r} does not match "
                               f"{expected!r}")
        event_id = f"{expected}|{'ok' if msg['ok'] else 'error'}"
        error = clip(msg["error"] or "failed", MAX_ERROR_CHARS)
        if action == "run":
            if msg["ok"]:
                return event_id, m.StepSucceeded(step, attempt), msg["result"]
            # applied: the participant ran it but could not report its result (too large)
            return event_id, m.StepFailed(step, attempt, error, msg["retryable"],
                                          applied=msg.get("applied") is True), None
        if msg["ok"]:
            return event_id, m.CompensationSucceeded(step, attempt), None
        return event_id, m.CompensationFailed(step, attempt, error, msg["retryable"]), None

    def _repeat(self, doc: dict[str, Any], event_id: str) -> Output:
        """A repeated input changes nothing. Only a repeat of the last applied event can mean
        its commands were lost (a crash after the row was written, before they were): then
        re-emit what is in flight. A finished saga re-announces its outcome."""
        state = SagaState.from_dict(doc["state"])
        if state.terminal:  # announce the outcome again: needs no definition
            return Output(None, [(self.topics.outcomes, state.saga_id.encode(),
                                  outcome_message(doc, state))], [], None, duplicate=True)
        if doc["inbox"][-1] == event_id:
            saga, plan = self.definition(doc)
            sends, timers, _ = self._translate(saga, doc, state, m.resume(plan, state))
            return Output(None, sends, timers, None, duplicate=True)
        return Output(None, [], [], None)

    def _commit(self, saga: Saga, plan: Plan, doc: dict[str, Any], state: SagaState,
                cmds: list[Any], event: Any, elapsed: float | None = None) -> Output:
        """The output of a transition (``event``; None: the start) the machine made."""
        doc["state"] = state.to_dict()
        sends, timers, disarmed = self._translate(saga, doc, state, cmds)
        if self.retention and state.status in _EXPIRES and state.ended_at is not None:
            doc["expires_at"] = state.ended_at + self.retention
            if doc["expires_at"] <= state.ended_at + EXPIRY_HORIZON:
                timers.append((doc["expires_at"], EXPIRE))
        else:
            doc.pop("expires_at", None)
        run = Transition(saga.name, state.saga_id, state.status.value, state.started_at,
                         state.ended_at, event, cmds, elapsed)
        return Output(orjson.dumps(doc), sends, timers, None, disarmed, run=run)

    def _translate(self, saga: Saga, doc: dict[str, Any], state: SagaState,
                   cmds: list[Any]) -> tuple[list[tuple[str, bytes, bytes]],
                                             list[tuple[float, str]], list[str]]:
        sends: list[tuple[str, bytes, bytes]] = []
        timers: list[tuple[float, str]] = []
        disarmed: list[str] = []
        key = state.saga_id.encode()
        for cmd in cmds:
            kind = type(cmd)
            if kind is m.RunStep or kind is m.RunCompensation:
                sends.append((self.topics.participant(participant_of(saga, cmd.step)), key,
                              messages.encode(
                                  "run" if kind is m.RunStep else "compensate", state.saga_id,
                                  doc.get("trace"), saga=saga.name, version=saga.version,
                                  step=cmd.step,
                                  attempt=cmd.attempt, command_id=cmd.command_id,
                                  data=doc["data"],
                                  results=doc["results"])))
            elif kind is m.ScheduleTimer:
                timers.append((cmd.due, cmd.key))
            elif kind is m.CancelTimer:
                disarmed.append(cmd.key)
            elif kind is m.Finish:
                sends.append((self.topics.outcomes, key, outcome_message(doc, state)))
            # CancelStep/CancelCompensation: a remote attempt cannot be stopped; the machine
            # runs with confirms_cancel=False and stops waiting for it.
        return sends, timers, disarmed


_EXPIRES = frozenset({m.SagaStatus.COMPLETED, m.SagaStatus.COMPENSATED})
_ENDED = frozenset({"completed", "compensated", "failed"})


def row_seq(row: bytes) -> int:
    """How many events a row has applied: a row with a lower ``seq`` than another of the
    same saga is older (the changelog's recovery keeps the newest, see app._SagaTable)."""
    return int(orjson.loads(row)["state"]["seq"])


def armed_timers(row: bytes | dict[str, Any], until: float) -> list[tuple[float, str]]:
    """The timers a row (bytes, or decoded) holds for the timer index: the machine's, and
    its expiry when that is due by ``until``."""
    doc = orjson.loads(row) if isinstance(row, bytes) else row
    timers = [(due, k) for k, due in doc["state"]["timers"].items()]
    if doc.get("expires_at", until + 1) <= until:
        timers.append((doc["expires_at"], EXPIRE))
    return timers


def outcome_message(doc: dict[str, Any], state: SagaState) -> bytes:
    return messages.encode("outcome", state.saga_id, doc.get("trace"), saga=doc["saga"],
                           status=state.status.value, error=state.failure,
                           failed_step=state.failed_step, data=doc["data"],
                           results=doc["results"])


def step_view(name: str, st: m.StepState) -> dict[str, Any]:
    return {"name": name, "status": st.status.value, "attempts": st.attempt,
            "compensation_attempts": st.comp_attempt, "started_at": st.started_at,
            "ended_at": st.ended_at, "error": st.error, "compensation_error": st.comp_error}
