"""Participant inboxes: the recorded reply to each command id, so a redelivered command is
answered with the first reply instead of running the step again.

The reply is recorded after the step ran and before it is sent. A participant that
crashes in between runs the step again when the command is redelivered, so a step's
effect must be idempotent on its own (key it by ``ctx.saga_id``, or do its writes through
a ``ConsumerInbox``). The in-memory inbox lives as long as the participant process;
``storage.replies`` of a PostgreSQL or Redis ``Storage`` survives restarts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol


class Inbox(Protocol):
    async def get(self, consumer: str, command_id: str) -> bytes | None: ...

    async def put(self, consumer: str, command_id: str, reply: bytes) -> None:
        """Record the reply unless one is recorded already (the first reply stands)."""
        ...


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
        self._replies.setdefault((consumer, command_id), reply)  # the first reply stands
        if len(self._replies) > self.max_entries:
            self._replies.popitem(last=False)
