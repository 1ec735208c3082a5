from __future__ import annotations

from streams.timers import TimerIndex


def test_due_timers_pop_in_order_and_disarmed_ones_never_fire():
    index = TimerIndex()
    index.arm("s1", [(10.0, "deadline"), (5.0, "timeout|a|1")])
    index.arm("s2", [(7.0, "retry|b|2")])
    index.arm("s1", [(5.0, "timeout|a|1")])  # armed twice: listed once
    index.disarm("s1", ["timeout|a|1"])  # the step finished in time
    assert index.due(6.0) == []
    assert index.due(20.0) == [(7.0, "s2", "retry|b|2"), (10.0, "s1", "deadline")]
    assert index.due(30.0) == []


def test_compact_drops_disarmed_entries():
    index = TimerIndex()
    for i in range(3000):
        index.arm(f"s{i}", [(100.0 + i, "deadline")])
    for i in range(2990):
        index.disarm(f"s{i}", ["deadline"])
    index.compact()
    assert len(index) == 10
    assert [sid for _, sid, _ in index.due(10_000.0)] == [f"s{i}" for i in range(2990, 3000)]
