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
  participants drop the ones they had by command id. The row is written again too,
  unchanged: the worker writes its local table before the changelog, so one that died
  between the two restarts with the new row at hand while the changelog, which the
  partition's next owner recovers from, still has the one before (a saga waiting for a
  reply it applied). A finished run's repeats do the same with its outcome. Older repeats
  are dropped: later inputs prove their row and commands went out.
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
from typing import Any, NamedTuple, assert_never

import orjson

from sagaz import machine as m
from sagaz import messages
from sagaz import run as run_record
from sagaz.definition import Saga
from sagaz.machine import Plan
from sagaz.messages import MAX_ERROR_CHARS, MAX_MESSAGE_BYTES, MessageError, clip
from sagaz.metrics import Transition
from sagaz.topics import Topics
from sagaz.versions import Definitions, DefinitionUnavailable

log = logging.getLogger("sagaz.streams")

ROW_VERSION = run_record.CODEC_VERSION  # rows are sagaz.run records
EXPIRE = "sagaz:expire"  # timer key of a finished saga's retention; not a machine timer
EXPIRY_HORIZON = 3600.0  # seconds ahead that expiry timers are armed in the index
__all__ = ["EXPIRE", "EXPIRY_HORIZON", "Orchestrator", "Output", "Topics", "armed_timers",
           "row_seq"]


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
        """The JSON a web view returns for a saga row (``sagaz.run.view``)."""
        rec = run_record.decode(row)
        saga = self.definitions.get(rec.name, rec.version)
        return run_record.view(rec, saga.plan if saga is not None else None)

    def participants(self) -> set[str]:
        return {participant_of(s, n) for s in self.definitions for n in s.steps}

    def definition(self, rec: run_record.Run) -> tuple[Saga, Plan]:
        """The definition a run continues on: its own version (``sagaz.versions``), or
        DefinitionUnavailable (the input waits). A compatible change without a version bump
        is logged once and kept in ``changed``."""
        name, version, recorded = rec.name, rec.version, rec.fingerprint
        saga = self.definitions.get(name, version)
        if saga is not None and (not recorded or recorded == saga.fingerprint):
            return saga, saga.plan  # the common case, without the state's dict
        resolved = self.definitions.resolve(name, version, recorded, rec.state.to_dict())
        saga = resolved.saga
        if resolved.changed and (name, saga.version, recorded) not in self.changed:
            self.changed[(name, saga.version, recorded)] = saga.fingerprint
            log.warning("saga %r version %d changed without a version bump (rows started on "
                        "fingerprint %s, this worker has %s); runs that have not reached a "
                        "changed step continue on this definition, the others wait",
                        saga.name, saga.version, recorded, saga.fingerprint)
        return saga, saga.plan

    def waiting(self, row: bytes | run_record.Run) -> tuple[str, int] | None:
        """(saga, version) when this row is a run that cannot continue here: unfinished, and
        its definition is not on this worker. None otherwise."""
        rec = run_record.decode(row) if isinstance(row, bytes) else row
        if rec.state.terminal:
            return None
        try:
            self.definition(rec)
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
            return self._repeat(run_record.decode(row), "start")
        entry = self.sagas.get(msg["saga"])
        if entry is None:
            raise MessageError(f"unknown saga definition {msg['saga']!r}; this worker has "
                               f"{sorted(self.sagas)}", "unknown_saga")
        saga, plan = entry  # the newest version
        rec, cmds = run_record.start(plan, msg["saga_id"], msg["data"], now,
                                     idempotency_key=msg["idempotency_key"],
                                     trace=msg.get("trace"), event_id="start",
                                     version=saga.version, fingerprint=saga.fingerprint)
        out = self._commit(saga, plan, rec, cmds, None)
        too_big = self._oversize(out)
        if too_big:
            raise MessageError(f"start of saga {msg['saga_id']!r} ({saga.name}) refused: "
                               f"{too_big}; keep large payloads outside the saga and pass a "
                               f"reference", "oversized")
        return out

    def _event(self, msg: dict[str, Any], row: bytes, now: float) -> Output:
        rec = run_record.decode(row)
        if msg["type"] == "timer":  # expiry needs no definition: a finished run's is gone
            early = self._early_timer(msg["key"], rec, now)
            if early is not None:
                return early
            if msg["key"] == EXPIRE:
                return Output(None, [], [], None, delete=True)
        if rec.state.terminal and msg["type"] != "retry" and self.definitions.get(
                rec.name, rec.version) is None:
            # A finished run of a version no longer here: nothing can change it (but an
            # operator's retry, which waits for its definition); announce its outcome again.
            return self._repeat(rec, "")
        saga, plan = self.definition(rec)
        event_id, event = self._to_event(msg, plan, rec)
        elapsed = msg.get("elapsed")  # what the participant measured, for metrics
        if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or elapsed < 0:
            elapsed = None
        out = self._apply(saga, plan, rec, event_id, event, now, elapsed)
        too_big = self._oversize(out)
        if too_big and isinstance(event, m.StepSucceeded):
            # The result does not fit: the step fails (retrying would return the same).
            # Its effect happened: it is compensated if the saga aborts.
            event = run_record.refused(
                event.step, event.attempt, f"result of step {event.step!r} is too large: "
                f"{too_big}; keep large payloads outside the saga and return a reference")
            out = self._apply(saga, plan, run_record.decode(row), event_id, event, now,
                              elapsed)
            too_big = self._oversize(out)
        if too_big:
            raise MessageError(f"saga {msg['saga_id']!r} unchanged: applying this "
                               f"{msg['type']} would write {too_big}", "oversized")
        return out

    def _apply(self, saga: Saga, plan: Plan, rec: run_record.Run, event_id: str,
               event: m.Event, now: float, elapsed: float | None = None) -> Output:
        applied, cmds = run_record.apply(plan, rec, event, now, event_id, self.inbox_size)
        if applied:
            return self._commit(saga, plan, rec, cmds, event, elapsed)
        if not cmds:
            return Output(None, [], [], None)  # stale (the machine ignored it), or repeated
        # the last event again (or a finished run): its row and its commands again
        sends, timers, _ = self._translate(saga, rec, cmds)
        return Output(run_record.encode(rec), sends, timers, None, duplicate=True)

    def _early_timer(self, key: str, rec: run_record.Run, now: float) -> Output | None:
        """An armed timer whose due time has not come: nothing happens, and it is armed
        again (the index popped it). None when the timer may be applied."""
        due = rec.expires_at if key == EXPIRE else rec.state.timers.get(key)
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
    def _to_event(msg: dict[str, Any], plan: Plan, rec: run_record.Run) -> tuple[str, m.Event]:
        kind = msg["type"]
        if kind == "cancel":
            return f"cancel|{msg['request_id']}", m.CancelRequested(msg["reason"])
        if kind == "retry":
            return f"retry|{msg['request_id']}", m.RetryCompensations()
        if kind == "timer":
            return f"timer|{msg['key']}", m.TimerFired(msg["key"])
        step, attempt, action = msg["step"], msg["attempt"], msg["action"]
        if step not in plan.index:
            raise MessageError(f"saga {rec.name!r} has no step {step!r}")
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
                return event_id, m.StepSucceeded(step, attempt, msg["result"],
                                                 msg["set"] or None)
            # applied: the participant ran it but could not report its result (too large)
            return event_id, m.StepFailed(step, attempt, error, msg["retryable"],
                                          applied=msg.get("applied") is True)
        if msg["ok"]:
            return event_id, m.CompensationSucceeded(step, attempt, msg["set"] or None)
        return event_id, m.CompensationFailed(step, attempt, error, msg["retryable"])

    def _repeat(self, rec: run_record.Run, event_id: str) -> Output:
        """A repeated input changes nothing; ``sagaz.run.repeat`` says what to send again. A
        finished run announces its outcome again, which needs no definition. Both write
        the row again, unchanged (see the module docstring: a crash may have lost its
        changelog record while the worker's local table kept it)."""
        if rec.state.terminal:
            return Output(run_record.encode(rec), [(
                self.topics.outcomes, rec.saga_id.encode(), outcome_message(rec))], [], None,
                duplicate=True)
        if not rec.inbox or rec.inbox[-1] != event_id:
            return Output(None, [], [], None)  # later inputs prove its commands went out
        saga, plan = self.definition(rec)
        sends, timers, _ = self._translate(saga, rec, run_record.repeat(plan, rec, event_id))
        return Output(run_record.encode(rec), sends, timers, None, duplicate=True)

    def _commit(self, saga: Saga, plan: Plan, rec: run_record.Run,
                cmds: m.Commands, event: m.Event | None, elapsed: float | None = None) -> Output:
        """The output of a transition (``event``; None: the start) the machine made."""
        state = rec.state
        sends, timers, disarmed = self._translate(saga, rec, cmds)
        if self.retention and state.status in _EXPIRES and state.ended_at is not None:
            rec.expires_at = state.ended_at + self.retention
            if rec.expires_at <= state.ended_at + EXPIRY_HORIZON:
                timers.append((rec.expires_at, EXPIRE))
        else:
            rec.expires_at = None
        run = Transition(saga.name, state.saga_id, state.status.value, state.started_at,
                         state.ended_at, event, cmds, elapsed)
        return Output(run_record.encode(rec), sends, timers, None, disarmed, run=run)

    def _translate(self, saga: Saga, rec: run_record.Run, cmds: m.Commands
                   ) -> tuple[list[tuple[str, bytes, bytes]], list[tuple[float, str]],
                              list[str]]:
        sends: list[tuple[str, bytes, bytes]] = []
        timers: list[tuple[float, str]] = []
        disarmed: list[str] = []
        state = rec.state
        key = state.saga_id.encode()
        for cmd in cmds:
            match cmd:
                case m.RunStep() | m.RunCompensation():
                    sends.append((
                        self.topics.participant(participant_of(saga, cmd.step)), key,
                        messages.encode(
                            "run" if type(cmd) is m.RunStep else "compensate", state.saga_id,
                            rec.trace, saga=saga.name, version=saga.version, step=cmd.step,
                            attempt=cmd.attempt,
                            command_id=cmd.command_id, data=rec.data, results=rec.results)))
                case m.ScheduleTimer():
                    timers.append((cmd.due, cmd.key))
                case m.CancelTimer():
                    disarmed.append(cmd.key)
                case m.Finish():
                    sends.append((self.topics.outcomes, key, outcome_message(rec)))
                case m.CancelStep() | m.CancelCompensation():
                    pass  # a remote attempt cannot be stopped; the machine runs with
                    # confirms_cancel=False and stops waiting for it
                case _:
                    assert_never(cmd)
        return sends, timers, disarmed


_EXPIRES = frozenset({m.SagaStatus.COMPLETED, m.SagaStatus.COMPENSATED})


def row_seq(row: bytes) -> int:
    """How many events a row has applied: a row with a lower ``seq`` than another of the
    same saga is older (the changelog's recovery keeps the newest, see app._SagaTable)."""
    return int(orjson.loads(row)["state"]["seq"])


def armed_timers(row: bytes | run_record.Run, until: float) -> list[tuple[float, str]]:
    """The timers a row (bytes, or decoded) holds for the timer index: the machine's, and
    its expiry when that is due by ``until``."""
    rec = run_record.decode(row) if isinstance(row, bytes) else row
    timers = [(due, k) for k, due in rec.state.timers.items()]
    if rec.expires_at is not None and rec.expires_at <= until:
        timers.append((rec.expires_at, EXPIRE))
    return timers


def outcome_message(rec: run_record.Run) -> bytes:
    state = rec.state
    return messages.encode("outcome", state.saga_id, rec.trace, saga=state.name,
                           status=state.status.value, error=state.failure,
                           failed_step=state.failed_step, data=rec.data,
                           results=rec.results)


step_view = run_record.step_view  # where it was before sagaz.run
