"""The chaos suite's checker: pure, over the ledger, the started sagas and their outcomes.

Invariants (each violation is listed by saga id):
- nothing lost: every started saga has an outcome, and it is terminal (completed or
  compensated; nothing in these sagas can leave one FAILED);
- effects at most once per command id (a repeat of the same command id is a redelivery the
  step's idempotency absorbs; it is counted, not a violation) and at most one distinct
  command id per (saga, step, action): two are a duplicated effect;
- a completed saga has every step run and none compensated;
- a compensated saga has every step that ran compensated exactly once, no step compensated
  that did not run, and compensations in reverse dependency order (a step is compensated
  only after every step depending on it was).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# saga name -> step -> the steps it depends on
Plans = Mapping[str, Mapping[str, tuple[str, ...]]]


@dataclass
class Report:
    sagas: int = 0
    completed: int = 0
    compensated: int = 0
    lost: list[str] = field(default_factory=list)         # no outcome at all
    not_terminal: list[str] = field(default_factory=list)  # an outcome other than an end
    duplicated: list[str] = field(default_factory=list)    # one effect under two command ids
    redelivered: int = 0                                   # same command id applied again
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.not_terminal or self.duplicated or self.violations)

    def summary(self) -> str:
        return (f"{self.sagas} sagas: {self.completed} completed, {self.compensated} "
                f"compensated, {len(self.lost)} lost, {len(self.not_terminal)} not terminal, "
                f"{len(self.duplicated)} duplicated effects, {self.redelivered} redelivered "
                f"commands absorbed, {len(self.violations)} other violations"
                + ("".join(f"\n  {v}" for v in self.violations[:20])))


def parse_ledger(lines: Iterable[str]) -> dict[str, list[tuple[str, str, str]]]:
    """saga id -> [(action, step, command id)] in the order the effects happened."""
    out: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for line in lines:
        parts = line.split()
        if len(parts) == 5:
            action, saga_id, step, command_id, _pid = parts
            out[saga_id].append((action, step, command_id))
    return out


def check(plans: Plans, started: Mapping[str, str], outcomes: Mapping[str, str],
          ledger: Mapping[str, list[tuple[str, str, str]]]) -> Report:
    """``started``: saga id -> saga name; ``outcomes``: saga id -> final status."""
    r = Report(sagas=len(started))
    for saga_id, name in started.items():
        status = outcomes.get(saga_id)
        if status is None:
            r.lost.append(saga_id)
            continue
        if status not in ("completed", "compensated"):
            r.not_terminal.append(saga_id)
            r.violations.append(f"{saga_id}: ended {status}")
            continue
        deps = plans[name]
        effects = ledger.get(saga_id, [])
        ids: dict[tuple[str, str], set[str]] = defaultdict(set)
        position: dict[tuple[str, str], int] = {}
        for i, (action, step, command_id) in enumerate(effects):
            key = (action, step)
            if command_id in ids[key]:
                r.redelivered += 1
            ids[key].add(command_id)
            position.setdefault(key, i)
            if step not in deps:
                r.violations.append(f"{saga_id}: effect of unknown step {step!r}")
        if any(len(v) > 1 for v in ids.values()):
            r.duplicated.append(saga_id)
        ran = {s for s in deps if ids.get(("run", s))}
        comped = {s for s in deps if ids.get(("comp", s))}
        if status == "completed":
            r.completed += 1
            if ran != set(deps) or comped:
                r.violations.append(f"{saga_id}: completed with steps run {sorted(ran)}, "
                                    f"compensated {sorted(comped)}")
        else:
            r.compensated += 1
            if comped != ran:
                r.violations.append(f"{saga_id}: compensated, but ran {sorted(ran)} and "
                                    f"compensated {sorted(comped)}")
            for step in comped:
                for dependent in (s for s, d in deps.items() if step in d and s in comped):
                    if position[("comp", dependent)] > position[("comp", step)]:
                        r.violations.append(f"{saga_id}: {step} compensated before its "
                                            f"dependent {dependent}")
                if position[("comp", step)] < position.get(("run", step), -1):
                    r.violations.append(f"{saga_id}: {step} compensated before it ran")
    return r


def plans_of(sagas: Mapping[str, object]) -> dict[str, dict[str, tuple[str, ...]]]:
    """Dependencies of each saga's steps: a DAG's as declared; a sequence's, the step
    before."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for name, saga in sagas.items():
        steps = list(saga.steps.values())  # type: ignore[attr-defined]
        if any(s.depends_on is not None for s in steps):
            out[name] = {s.name: tuple(s.depends_on or ()) for s in steps}
        else:
            out[name] = {s.name: ((steps[i - 1].name,) if i else ()) for i, s in
                         enumerate(steps)}
    return out
