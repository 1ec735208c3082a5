"""Participant inboxes: the recorded reply to each command id, so a redelivered command is
answered with the first reply instead of running the step again.

The in-memory inbox lives as long as the participant process; a durable one (PostgreSQL,
Redis) keeps the marker in the same transaction as the step's own writes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class Inbox(Protocol):
    async def get(self, consumer: str, command_id: str) -> bytes | None: ...

    async def put(self, consumer: str, command_id: str, reply: bytes) -> None: ...


class MemoryInbox:
    """Bounded: the oldest of more than ``max_entries`` replies are forgotten."""

    def __init__(self, max_entries: int = 100_000) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._replies: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    async def get(self, consumer: str, command_id: str) -> bytes | None:
        return self._replies.get((consumer, command_id))

    async def put(self, consumer: str, command_id: str, reply: bytes) -> None:
        self._replies[(consumer, command_id)] = reply
        if len(self._replies) > self.max_entries:
            self._replies.popitem(last=False)
