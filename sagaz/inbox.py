"""Participant inboxes: the recorded reply to each command id, so a redelivered command is
answered with the first reply instead of running the step again.

The reply is recorded (and, on the default ``ChangelogInbox``, acknowledged by the broker)
before it is sent, so a step whose reply the broker acknowledged never runs again. A
participant that crashes after the step ran and before its reply was recorded runs the step
again when the command is redelivered: only the attempts running at a crash may repeat,
so a step's effect should be idempotent on its own (key it by ``ctx.saga_id``, or do its
writes through a ``ConsumerInbox``). ``ChangelogInbox`` (the participant's default) keeps
replies in RocksDB backed by a compacted Kafka topic; ``storage.replies`` of a PostgreSQL
or Redis ``Storage`` survives restarts too; ``MemoryInbox`` does not.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from typing import Any, Protocol

from sagaz.errors import SagazError
from sagaz.topics import topic_partition


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


class PartitionRevoked(SagazError, RuntimeError):
    """The partition moved to another participant: its new owner answers the command."""


class ChangelogInbox:
    """A participant's durable, Kafka-native inbox: per partition of its command topic, a
    RocksDB database (rocksdict) backed by a compacted changelog topic with the same
    partition count, so the records of command partition p live in changelog partition p.

    When a partition is assigned, its database is brought up to date from the changelog
    (from the offset it had reached, or from the start with an empty data directory: a
    participant restarted on another node still knows what it did). A record is written to
    the changelog, acknowledged by the broker, and then applied locally. Two kinds of
    record, one key (``c:`` and the command id): ``S<n>``, the command was started n times
    (so a command that keeps crashing the process is recognised), and ``R<reply>``, its
    reply (which compaction then keeps in place of the start count). The topic is
    ``compact,delete``: what is older than its retention (``INBOX_RETENTION_MS`` of the
    participant, 14 days) is forgotten.

    One owner per partition at a time (the consumer group's assignment); ``get`` reads the
    local database only, and waits while its partition is being restored (the consumer may
    hand out a partition's records before the rebalance callback that restores it is over).
    """

    OFFSET_KEY = b"\x00sagaz:changelog-offset"

    def __init__(self, topic: str, datadir: str, *, bootstrap: str,
                 client_options: dict[str, Any] | None = None) -> None:
        self.topic, self.datadir, self.bootstrap = topic, datadir, bootstrap
        self.client_options = client_options or {}
        self.producer: Any = None  # the participant's (idempotent) producer
        self._dbs: dict[int, Any] = {}  # restored partitions
        self._ready: dict[int, asyncio.Event] = {}  # assigned partitions: set once restored

    def _open(self, partition: int) -> Any:
        from rocksdict import Options, Rdict

        os.makedirs(self.datadir, exist_ok=True)
        return Rdict(os.path.join(self.datadir, f"inbox-{partition}.db"),
                     Options(raw_mode=True))

    async def assign(self, partitions: list[int]) -> float:
        """Restore the given partitions from the changelog; the seconds it took."""
        from aiokafka import AIOKafkaConsumer

        t0 = time.monotonic()
        fresh = [p for p in partitions if p not in self._ready]
        if not fresh:
            return 0.0
        for p in fresh:
            self._ready[p] = asyncio.Event()
        dbs = {p: self._open(p) for p in fresh}
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", **self.client_options)
        await consumer.start()
        try:
            tps = [topic_partition(self.topic, p) for p in fresh]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            todo = {}
            for tp in tps:
                raw = dbs[tp.partition].get(self.OFFSET_KEY)
                start = int(raw) if raw is not None else 0
                if start < ends[tp]:
                    consumer.seek(tp, start)
                    todo[tp] = ends[tp]
            while todo:
                batches = await consumer.getmany(*todo, timeout_ms=500, max_records=5000)
                for tp, records in batches.items():
                    db = dbs[tp.partition]
                    for r in records:
                        if r.key is not None:
                            if r.value is None:
                                db.delete(r.key)
                            else:
                                db[r.key] = r.value
                    if records:
                        db[self.OFFSET_KEY] = str(records[-1].offset + 1).encode()
                for tp in list(todo):
                    if await consumer.position(tp) >= todo[tp]:
                        del todo[tp]
        except BaseException:
            for p in fresh:
                ready = self._ready.pop(p, None)
                if ready is not None:
                    ready.set()  # a waiting get() finds the partition unrestored
                dbs[p].close()
            raise
        finally:
            await consumer.stop()
        self._dbs.update(dbs)
        for p in fresh:
            self._ready[p].set()
        return time.monotonic() - t0

    def revoke(self, partitions: list[int]) -> None:
        for p in partitions:
            ready = self._ready.pop(p, None)
            if ready is not None:
                ready.set()  # a get() waiting for the restore finds it revoked
            db = self._dbs.pop(p, None)
            if db is not None:
                db.close()

    def close(self) -> None:
        self.revoke(list(self._dbs))

    async def get(self, partition: int, command_id: str) -> tuple[bytes | None, int]:
        """(the recorded reply or None, how many times the command was started)."""
        ready = self._ready.get(partition)
        if ready is None:
            raise PartitionRevoked(f"inbox partition {partition} of {self.topic!r} is not "
                                   f"assigned to this participant")
        await ready.wait()
        db = self._dbs.get(partition)
        if db is None:
            raise PartitionRevoked(f"inbox partition {partition} of {self.topic!r} was "
                                   f"revoked while it was being restored")
        raw = db.get(b"c:" + command_id.encode())
        if raw is None:
            return None, 0
        if raw[:1] == b"R":
            return raw[1:], 0
        return None, int(raw[1:])

    async def started(self, partition: int, command_id: str, count: int) -> None:
        await self._write(partition, command_id, b"S%d" % count)

    async def replied(self, partition: int, command_id: str, reply: bytes) -> None:
        await self._write(partition, command_id, b"R" + reply)

    async def _write(self, partition: int, command_id: str, value: bytes) -> None:
        key = b"c:" + command_id.encode()  # never the offset key, whatever the id
        meta = await (await self.producer.send(self.topic, value, key=key,
                                               partition=partition))
        db = self._dbs.get(partition)
        if db is not None:  # still ours
            db[key] = value
            raw = db.get(self.OFFSET_KEY)
            if raw is None or int(raw) <= meta.offset:
                db[self.OFFSET_KEY] = str(meta.offset + 1).encode()
