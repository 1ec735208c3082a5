"""The chaos checker catches each kind of violation (a checker that cannot fail is a defect)."""

from __future__ import annotations

from tests.chaos.check import check, parse_ledger, plans_of
from tests.chaos.sagas import SAGAS

PLANS = plans_of(SAGAS)


def run(lines: list[str], started: dict[str, str], outcomes: dict[str, str]):  # type: ignore[no-untyped-def]
    return check(PLANS, started, outcomes, parse_ledger(lines))


def test_plans_follow_the_definitions() -> None:
    assert PLANS["trip"] == {"flight": (), "hotel": ("flight",), "pay": ("hotel",)}
    assert PLANS["party"] == {"flight": (), "hotel": (), "pay": ("flight", "hotel")}


def test_a_clean_run_passes_and_redeliveries_are_absorbed() -> None:
    lines = ["run a flight c1 1", "run a hotel c2 1", "run a hotel c2 2", "run a pay c3 1",
             "run b flight c4 1", "run b hotel c5 1", "comp b hotel c6 1", "comp b flight c7 1"]
    r = run(lines, {"a": "trip", "b": "trip"}, {"a": "completed", "b": "compensated"})
    assert r.ok, r.summary()
    assert (r.completed, r.compensated, r.redelivered) == (1, 1, 1)


def test_each_violation_is_caught() -> None:
    started = {s: "trip" for s in "abcdefg"} | {"h": "party"}
    lines = [
        "run a flight c1 1", "run a flight c9 1", "run a hotel c2 1", "run a pay c3 1",  # dup
        "run b flight c1 1", "run b hotel c2 1",                      # completed, pay missing
        "run c flight c1 1", "run c hotel c2 1", "comp c hotel c3 1",  # flight not undone
        "run d flight c1 1", "run d hotel c2 1", "comp d flight c3 1", "comp d hotel c4 1",
        "run e flight c1 1", "comp e flight c2 1", "comp e hotel c3 1",  # undid what never ran
        "run h flight c1 1", "run h hotel c2 1", "run h pay c3 1", "comp h flight c4 1",
        "comp h pay c5 1", "comp h hotel c6 1",                        # flight before pay
    ]
    outcomes = {"a": "completed", "b": "completed", "c": "compensated", "d": "compensated",
                "e": "compensated", "f": "running", "h": "compensated"}
    r = run(lines, started, outcomes)
    assert r.duplicated == ["a"]
    assert r.lost == ["g"] and r.not_terminal == ["f"]
    text = "\n".join(r.violations)
    for saga in "bcdeh":
        assert f"{saga}:" in text, (saga, text)
    assert "d: flight compensated before its dependent hotel" in text
    assert "h: flight compensated before its dependent pay" in text
    assert not r.ok
