"""Where the in-process engine keeps saga runs, so they can be inspected and resumed.

A store receives the live state and context after every applied transition, *before* the
commands of that transition are carried out (write-ahead): a run that crashes can be resumed
from the last saved state, and every step it was running is issued again under the same
command id. The in-memory store keeps live references (cheap; gone with the process);
durable stores serialise what they are given.

Idempotency keys are scoped by saga name: ``claim(name, key, saga_id, lease)`` binds the
pair (name, key) to one run, so two sagas given the same key (an order id, say) run apart.
A claim is a lease until the run's first snapshot: a process that dies between the claim
and that save would otherwise hold the key for ever with nothing behind it. While the lease
runs, the key stays with the claimer (the engine tells other callers ``SagaAlreadyRunning``);
after it, the next claim takes the key over. The first ``save`` of a keyed run checks that
the key is still its own and makes the binding permanent, so a run whose claim was taken
over stops there (``SagaAlreadyRunning``) before any step runs: one run per key, always.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sagaz.errors import SagaAlreadyRunning
from sagaz.machine import Plan, SagaState

if TYPE_CHECKING:
    from sagaz.run import Run


class RunData(Protocol):
    """What a store saves besides the state: a run's data and step results (a
    ``sagaz.run.Run``, or a ``SagaContext``)."""

    @property
    def data(self) -> dict[str, Any]: ...

    @property
    def results(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class SagaRecord:
    """A snapshot of one run as a store keeps it: machine state (``SagaState.to_dict()``),
    data, results and key. ``to_run()`` is the run record (``sagaz.run``); ``view()`` its
    JSON, the same as every other view of a run."""

    saga_id: str
    name: str
    state: dict[str, Any]
    data: dict[str, Any]
    results: dict[str, Any]
    idempotency_key: str | None = None

    @property
    def status(self) -> str:
        return str(self.state["status"])

    @property
    def version(self) -> int:
        """The definition version the run started on; 1 for a run saved before versions."""
        return int(self.state.get("version", 1))

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the definition the run started on; "" for a run saved before
        versions (nothing to compare: it continues on version 1 as defined now)."""
        return str(self.state.get("fingerprint", ""))

    def to_run(self) -> Run:
        from sagaz.run import from_record

        return from_record(self)

    def view(self, plan: Plan | None = None) -> dict[str, Any]:
        """The run's JSON (``sagaz.run.view``); step names from ``plan`` when given."""
        from sagaz.run import view

        return view(self.to_run(), plan)


class SagaStore(Protocol):
    #: True when the store keeps references to the live state and context (in-memory):
    #: the engine then saves only when a run starts and when it ends.
    keeps_live_state: bool

    async def save(self, state: SagaState, context: RunData,
                   idempotency_key: str | None) -> None:
        """Write a snapshot. With a key, first check that (state.name, key) is bound to this
        run (``SagaAlreadyRunning`` if another run took it over) and bind it for good."""
        ...

    async def load(self, saga_id: str) -> SagaRecord | None: ...

    async def claim(self, name: str, idempotency_key: str, saga_id: str, lease: float) -> str:
        """Bind (name, key) to saga_id for ``lease`` seconds (until its first save) unless it
        is bound already to a saved run or to a claim younger than its lease; return the
        saga id it is bound to."""
        ...

    async def list(self, *, status: str | None = None, name: str | None = None,
                   limit: int = 100) -> list[SagaRecord]: ...


class InMemorySagaStore:
    """Live runs plus the most recent ``max_finished`` finished ones (oldest evicted first)."""

    keeps_live_state = True

    def __init__(self, max_finished: int = 10_000) -> None:
        if isinstance(max_finished, bool) or not isinstance(max_finished, int) or max_finished < 0:
            raise ValueError(f"max_finished must be an int >= 0, got {max_finished!r}")
        self.max_finished = max_finished
        self._runs: dict[str, tuple[SagaState, RunData, str | None]] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        # (name, key) -> (saga id, monotonic expiry of the claim; None once saved)
        self._keys: dict[tuple[str, str], tuple[str, float | None]] = {}

    async def save(self, state: SagaState, context: RunData,
                   idempotency_key: str | None) -> None:
        sid = state.saga_id
        if idempotency_key is not None:
            scoped = (state.name, idempotency_key)
            bound = self._keys.get(scoped)
            if bound is not None and bound[0] != sid:
                raise SagaAlreadyRunning.taken_over(state.name, idempotency_key, bound[0], sid)
            if bound is None or bound[1] is not None:
                self._keys[scoped] = (sid, None)
        self._runs[sid] = (state, context, idempotency_key)
        if state.terminal and sid not in self._finished:
            self._finished[sid] = None
            while len(self._finished) > self.max_finished:
                old, _ = self._finished.popitem(last=False)
                old_state, _, key = self._runs.pop(old)
                if key is not None:
                    self._keys.pop((old_state.name, key), None)

    async def load(self, saga_id: str) -> SagaRecord | None:
        entry = self._runs.get(saga_id)
        if entry is None:
            return None
        state, ctx, key = entry
        return SagaRecord(saga_id, state.name, state.to_dict(), dict(ctx.data),
                          dict(ctx.results), key)

    async def claim(self, name: str, idempotency_key: str, saga_id: str, lease: float) -> str:
        now = time.monotonic()
        bound = self._keys.get((name, idempotency_key))
        if bound is not None and (bound[1] is None or bound[1] > now):
            return bound[0]
        self._keys[(name, idempotency_key)] = (saga_id, now + lease)
        return saga_id

    async def list(self, *, status: str | None = None, name: str | None = None,
                   limit: int = 100) -> list[SagaRecord]:
        out: list[SagaRecord] = []
        for sid, (state, _, _) in reversed(self._runs.items()):
            if len(out) >= limit:
                break
            if (status is None or state.status == status) and (name is None or state.name == name):
                record = await self.load(sid)
                assert record is not None
                out.append(record)
        return out
