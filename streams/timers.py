"""The worker's index of armed saga timers: a heap, fed by the agent, rebuilt by a scan.

Timers live in the saga state (durable). This index only says when to look. Timers the
machine disarms (a step that finished in time, a finished saga's deadline) are dropped from
it; it may still hold timers of partitions moved elsewhere, and firing one of those sends a
timer event that the machine ignores. After a rebalance or a restart the index
is rebuilt by scanning the rows of the partitions this worker now owns.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class TimerIndex:
    def __init__(self) -> None:
        self._heap: list[tuple[float, str, str]] = []
        self._armed: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return len(self._heap)

    def arm(self, saga_id: str, timers: Iterable[tuple[float, str]]) -> None:
        for due, key in timers:
            if (saga_id, key) not in self._armed:
                self._armed.add((saga_id, key))
                heapq.heappush(self._heap, (due, saga_id, key))

    def disarm(self, saga_id: str, keys: Iterable[str]) -> None:
        """Forget timers the machine disarmed (lazily: their heap entries are skipped)."""
        for key in keys:
            self._armed.discard((saga_id, key))

    def due(self, now: float, limit: int = 10_000) -> list[tuple[float, str, str]]:
        """Pop (due, saga_id, key) of every armed timer due by now (at most limit)."""
        out: list[tuple[float, str, str]] = []
        heap, armed = self._heap, self._armed
        while heap and heap[0][0] <= now and len(out) < limit:
            entry = heapq.heappop(heap)
            if (entry[1], entry[2]) in armed:
                armed.discard((entry[1], entry[2]))
                out.append(entry)
        return out

    def compact(self) -> None:
        """Drop the heap entries of disarmed timers (when they outnumber the armed ones)."""
        if len(self._heap) > 2 * len(self._armed) + 1000:
            self._heap = [e for e in self._heap if (e[1], e[2]) in self._armed]
            heapq.heapify(self._heap)

    def clear(self) -> None:
        self._heap.clear()
        self._armed.clear()
