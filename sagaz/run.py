"""The run record: what one saga run is, every rule about its data, its codec and its view.

No I/O. The state machine (``sagaz.machine``) decides what happens to the *steps*; this
module decides what happens to the run's *data*, the same way for both shells (the
in-process engine and the Kafka orchestrator), so a saga ends with the same context and
results wherever it ran:

    applied, commands = apply(plan, run, event, now, event_id)

Data rules (the one rule both shells follow)
--------------------------------------------
- A step attempt works on its own copy of the run's data (``attempt_data``: containers are
  copied too), taken when it starts. Its writes (``ctx.set``, ``ctx[key] = ...``, also a
  list changed in place) are the keys whose value differs from that snapshot
  (``changes``); keys it deletes are not changes.
- Those writes are merged into the run's data when, and only when, the machine *applies*
  the attempt's success: ``StepSucceeded`` or ``CompensationSucceeded``. A failed,
  cancelled, timed-out or stale attempt leaves no trace in the data, so a retry starts from
  the data its first attempt saw, and nothing an abandoned attempt did is kept.
  Compensations follow the same rule as steps: a compensation that succeeds may record what
  it undid (``ctx.set("refund_id", ...)``).
- A step's return value is kept in ``results[step]`` when its success is applied (``None``
  is not kept). A compensation's return value is ignored.
- Merges happen in the order the machine applies the events: of two parallel steps writing
  one key, the later applied success wins. The commands of a transition see the data
  merged by it.
- A step whose result or writes cannot be serialised (``refusal``) fails, not retryable,
  with ``applied=True`` (it ran: it is compensated if the saga aborts). A compensation
  whose writes cannot be serialised fails, not retryable.

Deduplication: an event with an ``event_id`` already in the run's inbox (the ids of the
last events applied) is not applied again; if it repeats the *last* applied event (or the
run is over), the commands still in flight are returned again (``applied`` is False), since
a crash may have lost them. Without an id only the machine's rules apply (stale attempts,
disarmed timers are ignored).

Codec: ``encode``/``decode`` (bytes, orjson) with a version field ``v``. ``CODEC_VERSION``
2 is version 1 (the Kafka row written before this module) plus the definition's
``version`` and ``fingerprint``; version 1 rows decode with ``version=1, fingerprint=""``.
The stores' format (``sagaz.store.SagaRecord``) converts with ``from_record``.

View: ``view(run, names)`` is the one JSON shape of a run: ``SagaResult.to_dict()``, the
stores' records, the orchestrator's web views and the CLI show the same keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from sagaz import machine as m
from sagaz.errors import SagazError
from sagaz.machine import Plan, SagaState

if TYPE_CHECKING:
    from sagaz.store import SagaRecord

CODEC_VERSION = 2
INBOX_SIZE = 64  # event ids kept for deduplication (the orchestrator's default)


class RunCodecError(SagazError, ValueError):
    """Bytes that are not a run record this version of sagaz can read."""


_NO_IDS: tuple[str, ...] = ()


class Run:
    """One saga run: machine state, data, results, and what identifies and dedupes it.

    ``version`` and ``fingerprint`` name the saga definition the run started on (kept in
    the state, which the stores save; the codec writes them next to it)."""

    __slots__ = ("data", "expires_at", "idempotency_key", "inbox", "results", "state", "trace")

    def __init__(self, state: SagaState, data: dict[str, Any] | None = None,
                 results: dict[str, Any] | None = None, idempotency_key: str | None = None,
                 *, trace: dict[str, str] | None = None,
                 inbox: list[str] | None = None, expires_at: float | None = None,
                 version: int | None = None, fingerprint: str | None = None) -> None:
        self.state = state
        if version is not None:
            state.version = version
        if fingerprint is not None:
            state.fingerprint = fingerprint
        self.data: dict[str, Any] = data if data is not None else {}
        self.results: dict[str, Any] = results if results is not None else {}
        self.idempotency_key = idempotency_key
        self.trace = trace
        # no list until an id is kept: in-process runs never dedupe by id (and many finished
        # runs stay in memory)
        self.inbox: list[str] = inbox if inbox is not None else _NO_IDS  # type: ignore[assignment]
        self.expires_at = expires_at

    @property
    def saga_id(self) -> str:
        return self.state.saga_id

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def version(self) -> int:
        return self.state.version

    @version.setter
    def version(self, value: int) -> None:
        self.state.version = value

    @property
    def fingerprint(self) -> str:
        return self.state.fingerprint

    @fingerprint.setter
    def fingerprint(self, value: str) -> None:
        self.state.fingerprint = value

    def __repr__(self) -> str:
        return (f"Run(saga_id={self.saga_id!r}, name={self.name!r}, "
                f"status={self.state.status.value!r})")


def start(plan: Plan, saga_id: str, data: dict[str, Any], now: float, *,
          confirms_cancel: bool = False, idempotency_key: str | None = None,
          trace: dict[str, str] | None = None, event_id: str | None = None,
          version: int = 1, fingerprint: str = "") -> tuple[Run, m.Commands]:
    """A new run of ``plan`` and the commands that begin it."""
    state, cmds = m.start(plan, saga_id, now, confirms_cancel=confirms_cancel)
    return Run(state, data, {}, idempotency_key=idempotency_key, trace=trace,
               inbox=[event_id] if event_id is not None else [], version=version,
               fingerprint=fingerprint), cmds


_StepSucceeded = m.StepSucceeded
_CompensationSucceeded = m.CompensationSucceeded
_RetryCompensations = m.RetryCompensations
_TERMINAL = m.TERMINAL
_HANDLERS = m._HANDLERS


def apply(plan: Plan, run: Run, event: m.Event, now: float, event_id: str | None = None,
          inbox_size: int = INBOX_SIZE) -> tuple[bool, m.Commands]:
    """Apply one event to the run: (applied, commands). See the module docstring."""
    if event_id is not None and event_id in run.inbox:
        return False, repeat(plan, run, event_id)
    # machine.transition, inlined: this is the hot path of every event of every run
    state, kind = run.state, type(event)
    if state.status in _TERMINAL and kind is not _RetryCompensations:
        return False, []
    cmds: m.Commands = []
    if not _HANDLERS[kind](plan, state, event, now, cmds):
        return False, cmds
    state.updated_at = now
    state.seq += 1
    if kind is _StepSucceeded:
        result, changed = event.result, event.changes  # type: ignore[union-attr]
        if result is not None:
            run.results[event.step] = result  # type: ignore[union-attr]
        if changed:
            run.data = {**run.data, **changed}  # a new dict: attempts keep their snapshot
    elif kind is _CompensationSucceeded:
        changed = event.changes  # type: ignore[union-attr]
        if changed:
            run.data = {**run.data, **changed}
    if event_id is not None:
        inbox = run.inbox
        if inbox is _NO_IDS:
            inbox = run.inbox = []
        inbox.append(event_id)
        if len(inbox) > inbox_size:
            del inbox[:-inbox_size]
    return True, cmds


def repeat(plan: Plan, run: Run, event_id: str) -> m.Commands:
    """Commands for a repeated input: only a repeat of the last applied event can mean its
    commands were lost (a crash after the record was written, before they were), so then
    everything in flight is issued again; a finished run announces its end again."""
    if run.state.terminal or (run.inbox and run.inbox[-1] == event_id):
        return m.resume(plan, run.state)
    return []


# --------------------------------------------------------------------------- attempt data


def _deep(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _deep(v) for k, v in value.items()}
    if kind is list:
        return [_deep(v) for v in value]
    return value


_CONTAINERS = (dict, list)


def has_containers(data: dict[str, Any]) -> bool:
    """Whether ``attempt_data`` must copy more than the dict (a shell may remember it for
    a data dict: merges replace the dict, never change it)."""
    for value in data.values():
        if type(value) in _CONTAINERS:
            return True
    return False


def attempt_data(data: dict[str, Any]) -> dict[str, Any]:
    """The copy of the run's data one attempt works on: changing it, even a list in place,
    changes nothing else until the attempt's success is applied."""
    copy = dict(data)
    for key, value in copy.items():
        if type(value) in _CONTAINERS:
            copy[key] = _deep(value)
    return copy


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """The keys an attempt set: new, or with a value other than in its snapshot."""
    if after == before:
        return None
    missing = object()
    return {k: v for k, v in after.items() if before.get(k, missing) != v} or None


def refusal(step: str, result: Any, changed: dict[str, Any] | None) -> str | None:
    """Why a step's result or writes cannot be kept (not orjson-serialisable), or None."""
    try:
        if changed:
            orjson.dumps(changed)
        if result is not None and type(result) not in _PLAIN:
            orjson.dumps(result)
    except TypeError as exc:
        return f"result of step {step!r} is not serialisable: {exc}"
    return None


_PLAIN = frozenset({str, int, float, bool})


def refused(step: str, attempt: int, reason: str) -> m.StepFailed:
    """The event for a step attempt that ran but whose outcome cannot be kept."""
    return m.StepFailed(step, attempt, reason, False, applied=True)


# --------------------------------------------------------------------------- codec


def to_doc(run: Run) -> dict[str, Any]:
    """The record as an orjson-ready dict (``encode`` without the bytes)."""
    state = run.state.to_dict()
    doc: dict[str, Any] = {
        "v": CODEC_VERSION, "saga": run.state.name, "state": state,
        "data": run.data, "results": run.results, "inbox": run.inbox,
        "key": run.idempotency_key, "trace": run.trace}
    if "fingerprint" in state:  # kept once, next to the state (a run from before versions
        # has none: it stays without, see sagaz.versions)
        doc["version"], doc["fingerprint"] = state.pop("version"), state.pop("fingerprint")
    if run.expires_at is not None:
        doc["expires_at"] = run.expires_at
    return doc


def encode(run: Run) -> bytes:
    return orjson.dumps(to_doc(run))


def from_doc(doc: Any) -> Run:
    """A record from ``to_doc`` of this or an earlier codec version."""
    if not isinstance(doc, dict):
        raise RunCodecError(f"a run record is a JSON object, got {type(doc).__name__}")
    v = doc.get("v")
    if v not in (1, 2):
        raise RunCodecError(f"unsupported run record version {v!r} (this sagaz reads 1 and "
                            f"{CODEC_VERSION}); was it written by a newer sagaz?")
    try:
        # Slots set directly: this runs for every input of the stream worker.
        run = _new_run(Run)
        run.state = _from_dict(doc["state"])
        run.data, run.results, run.inbox = doc["data"], doc["results"], doc["inbox"]
        run.idempotency_key, run.trace = doc["key"], doc.get("trace")
        run.expires_at = doc.get("expires_at")
        state = run.state
        state.version, state.fingerprint = doc.get("version", 1), doc.get("fingerprint", "")
        return run
    except (KeyError, TypeError, ValueError) as exc:
        raise RunCodecError(f"malformed run record (version {v}): {exc!r}") from None


_new_run = object.__new__
_from_dict = SagaState.from_dict


def decode(raw: bytes) -> Run:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RunCodecError(f"a run record is not JSON: {exc}") from None
    return from_doc(doc)


def from_record(record: SagaRecord) -> Run:
    """The run a store's record holds (the stores keep state, data, results and key)."""
    return Run(SagaState.from_dict(record.state), dict(record.data), dict(record.results),
               idempotency_key=record.idempotency_key)  # version: in the state


# --------------------------------------------------------------------------- view


def step_view(name: str, st: m.StepState) -> dict[str, Any]:
    return {"name": name, "status": st.status.value, "attempts": st.attempt,
            "compensation_attempts": st.comp_attempt, "started_at": st.started_at,
            "ended_at": st.ended_at, "error": st.error, "compensation_error": st.comp_error}


def step_names(plan: Plan | None, state: SagaState) -> Sequence[str]:
    """Step names of a run: its plan's, or ``#i`` when the definition is not known here."""
    if plan is not None and len(plan.steps) == len(state.steps):
        return [sp.name for sp in plan.steps]
    return [f"#{i}" for i in range(len(state.steps))]


def view(run: Run, plan: Plan | None) -> dict[str, Any]:
    """The JSON of a run, the same everywhere (result, stores, web views, CLI)."""
    state = run.state
    names = step_names(plan, state)
    return {"saga_id": state.saga_id, "saga": state.name, "status": state.status.value,
            "error": state.failure, "failed_step": state.failed_step,
            "started_at": state.started_at, "updated_at": state.updated_at,
            "ended_at": state.ended_at, "expires_at": run.expires_at,
            "idempotency_key": run.idempotency_key, "version": run.version,
            "fingerprint": run.fingerprint, "data": run.data, "results": run.results,
            "steps": [step_view(n, st) for n, st in zip(names, state.steps, strict=True)]}
