"""Versions of one saga's definition, and which of them a run may continue on. No I/O.

Deploying a changed definition while runs are in flight is routine, so each run records
the definition it started on: ``Saga("order", version=2)`` (default 1) and a *fingerprint*
(``saga.fingerprint``), a hash of what decides a run's course: steps, their order and
dependencies, participants, retries, timeouts and compensations, the failure strategy,
grace period, deadline and ``compensate_started``. Not the functions' bodies (they cannot
be hashed stably across processes and Python runs). The same definition has the same
fingerprint in every process.

The fingerprint is a string of 8-hex-digit hashes joined by dots: the saga's own policies,
the step graph (names, order, dependencies), then one per step (participant and
policies)::

    "1a2b3c4d.5e6f7a8b.<step 1>.<step 2>..."

Whole-string equality means "same definition"; the parts say *what* changed, which is what
``continues_on`` needs.

The rule (the same over Kafka and in-process), ``Definitions.resolve``:

- a run continues on the definition with its name and version; a run recorded before
  versions existed (no version) is version 1, and has no fingerprint to check;
- no definition of that version here: it waits (``DefinitionUnavailable``): never guessed
  from another version, never dropped;
- the version is here with another fingerprint (the definition changed without a version
  bump): reported, and the run continues on the definition here only if ``continues_on``
  says nothing the run still has to do changed; otherwise it waits like an unknown version;
- new runs start on the newest version (``Definitions.newest``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from sagaz.errors import SagaDefinitionError, SagazError

if TYPE_CHECKING:
    from sagaz.definition import Saga
    from sagaz.policy import Retry

# Step statuses (``StepStatus`` values) of a step the run has not passed yet: not started,
# or an attempt in flight or about to be retried. Every other status is passed: a step that
# succeeded, failed, was cancelled or skipped, or is being compensated (its compensation
# follows the definition the run continues on).
NOT_PASSED = frozenset({"pending", "running", "retrying", "cancelling"})
_ENDED = frozenset({"completed", "compensated", "failed"})


class DefinitionUnavailable(SagazError, LookupError):
    """A run's definition is not here: its version is unknown, or it changed without a
    version bump in a part the run still has to go through. The run waits (nothing about
    it is changed) until a process that has the definition takes it."""

    def __init__(self, name: str, version: int, reason: str) -> None:
        super().__init__(reason)
        self.name, self.version, self.reason = name, version, reason


def check_version(name: str, version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SagaDefinitionError(f"saga {name!r}: version must be a positive int "
                                  f"(1, 2, ...), got {version!r}")
    return version


def _hash(obj: Any) -> str:
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()[:8]


def _num(value: float | None) -> float | None:
    return None if value is None else float(value)  # 5 and 5.0 are the same timeout


def _exceptions(types: tuple[type[BaseException], ...]) -> list[str]:
    return [f"{t.__module__}.{t.__qualname__}" for t in types]


def _retry(r: Retry) -> list[Any]:
    return [r.attempts, _num(r.backoff), _num(r.multiplier), _num(r.max_backoff),
            _num(r.jitter), _exceptions(r.retry_on), _exceptions(r.give_up_on),
            r.retry_on_timeout]


def fingerprint(saga: Saga) -> str:
    """The fingerprint of a definition (compiles it: see ``Saga.validate``)."""
    plan = saga.plan
    head = _hash(["saga", plan.strategy.value, _num(plan.grace_period), _num(plan.deadline),
                  plan.compensate_started])
    graph = _hash([[sp.name, [plan.steps[d].name for d in sp.deps]] for sp in plan.steps])
    parts = [head, graph]
    for sp in plan.steps:
        step = saga.steps[sp.name]
        parts.append(_hash([step.participant or saga.name, step.action is None,
                            _retry(sp.retry), _num(sp.timeout), sp.has_compensation,
                            _retry(sp.compensation_retry), _num(sp.compensation_timeout)]))
    return ".".join(parts)


def continues_on(recorded: str, here: str, state: dict[str, Any]) -> bool:
    """Whether a run that started on fingerprint ``recorded`` may continue on the
    definition ``here`` (same name and version), given its state (``SagaState.to_dict()``):
    the same steps in the same order with the same dependencies (a run's state is
    positional), the same saga policies unless the run has ended, and the same step
    fingerprint for every step the run has not passed (``NOT_PASSED``)."""
    if recorded == here:
        return True
    old, new = recorded.split("."), here.split(".")
    steps = state.get("steps", [])
    if len(old) != len(new) or len(old) != len(steps) + 2 or old[1] != new[1]:
        return False
    if old[0] != new[0] and state.get("status") not in _ENDED:
        return False
    return all(o == n or row[0] not in NOT_PASSED
               for o, n, row in zip(old[2:], new[2:], steps, strict=True))


class Resolved(NamedTuple):
    saga: Saga
    changed: bool  # recorded fingerprint differs, compatibly: report it


class Definitions:
    """The definitions a process holds: by name, every version of each saga."""

    def __init__(self, sagas: Iterable[Saga] = ()) -> None:
        self.by_name: dict[str, dict[int, Saga]] = {}
        for saga in sagas:
            self.add(saga)

    def add(self, saga: Saga) -> None:
        """Add a definition; two different definitions of one name and version are an
        error naming both (one changed without a version bump)."""
        versions = self.by_name.setdefault(saga.name, {})
        other = versions.get(saga.version)
        if other is saga:
            return
        if other is not None:
            same = other.fingerprint == saga.fingerprint
            raise SagaDefinitionError(
                f"two definitions of saga {saga.name!r} version {saga.version}: one built at "
                f"{other.built_at} (fingerprint {other.fingerprint}), one built at "
                f"{saga.built_at} (fingerprint {saga.fingerprint})"
                + ("" if same else "; they differ: give the changed one a new version")
                + "; keep one definition per name and version")
        saga.validate()
        versions[saga.version] = saga
        self.by_name[saga.name] = dict(sorted(versions.items()))

    def __iter__(self) -> Any:
        return (s for versions in self.by_name.values() for s in versions.values())

    def newest(self, name: str) -> Saga | None:
        versions = self.by_name.get(name)
        return versions[next(reversed(versions))] if versions else None

    def get(self, name: str, version: int) -> Saga | None:
        return self.by_name.get(name, {}).get(version)

    def resolve(self, name: str, version: int | None, recorded: str | None,
                state: dict[str, Any]) -> Resolved:
        """The definition a run continues on, or DefinitionUnavailable (see the module
        docstring). ``version`` None: a run recorded before versions (version 1);
        ``recorded`` None or "": no fingerprint to compare."""
        version = 1 if version is None else version
        saga = self.get(name, version)
        if saga is None:
            have = sorted(self.by_name.get(name, {}))
            raise DefinitionUnavailable(
                name, version, f"saga {name!r} version {version} is not defined here (this "
                f"process has {'versions ' + str(have) if have else 'no version of it'}): "
                f"the run waits for a worker that has it")
        if not recorded or recorded == saga.fingerprint:
            return Resolved(saga, False)
        if continues_on(recorded, saga.fingerprint, state):
            return Resolved(saga, True)
        raise DefinitionUnavailable(
            name, version, f"saga {name!r} version {version} changed without a version bump "
            f"(the run started on fingerprint {recorded}, this definition is "
            f"{saga.fingerprint}) in a step the run has not passed yet: the run waits for a "
            f"worker with its definition; give the changed definition a new version")
