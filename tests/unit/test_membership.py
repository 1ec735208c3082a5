"""The worker's membership record (``streams.app.Membership``): which group answers confirm
it, and when a rejoin means the group may have moved the partitions (issue 11). The fence
itself runs against a real broker in tests/integration/test_partition_fence.py."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from streams.app import Membership


class Coordinator:
    """The parts of aiokafka's GroupCoordinator that Membership wraps."""

    def __init__(self) -> None:
        self.member_id = "m-1"
        self.coordinator_id: int | None = 1
        self.beat_ok = True
        self.join: Any = True  # the result, or a callable run during the join

    async def _do_heartbeat(self) -> bool:
        return self.beat_ok

    async def _do_rejoin_group(self, subscription: Any) -> bool:
        if callable(self.join):
            return bool(self.join())
        return bool(self.join)


def test_before_watching_nothing_is_unconfirmed() -> None:
    assert Membership(10.0).lapse() == -math.inf


def test_heartbeats_confirm_and_failures_do_not() -> None:
    async def run() -> None:
        c = Coordinator()
        m = Membership(10.0)
        assert m.watch(c)
        m.confirmed -= 4.0
        c.beat_ok = False
        assert not await c._do_heartbeat()
        assert m.lapse() >= 4.0
        c.beat_ok = True  # (aiokafka also answers True for "rebalancing")
        assert await c._do_heartbeat()
        assert m.lapse() < 1.0

    asyncio.run(run())


def test_a_rejoin_in_time_holds_the_membership_while_it_runs() -> None:
    async def run() -> None:
        c = Coordinator()
        m = Membership(10.0)
        m.watch(c)
        m.confirmed -= 3.0  # under half the session timeout
        seen: list[float] = []
        c.join = lambda: seen.append(m.lapse()) or True
        assert await c._do_rejoin_group(None)
        assert seen == [-math.inf] and m.lapse() < 1.0 and not m.lost

    asyncio.run(run())


def test_a_failed_rejoin_confirms_only_if_the_coordinator_answered() -> None:
    async def run() -> None:
        c = Coordinator()
        m = Membership(10.0)
        m.watch(c)
        m.confirmed -= 2.0
        c.join = False  # answered (e.g. rebalance in progress): still a member
        await c._do_rejoin_group(None)
        assert m.lapse() < 1.0
        began = time.monotonic()

        def unreachable() -> bool:
            c.coordinator_id = None  # aiokafka marks the coordinator dead
            return False

        c.join = unreachable
        await c._do_rejoin_group(None)
        assert began <= m.confirmed <= time.monotonic()  # as of the attempt's start
        assert not m.lost

    asyncio.run(run())


def test_a_rejoin_after_a_lapse_or_an_eviction_loses_the_membership_for_good() -> None:
    async def run() -> None:
        c = Coordinator()
        m = Membership(10.0)
        m.watch(c)
        m.confirmed -= 6.0  # over half the session timeout: the group may have moved on
        assert await c._do_rejoin_group(None)
        assert m.lost and m.lapse() == math.inf
        assert await c._do_heartbeat()  # readmitted: still lost
        assert m.lapse() == math.inf

        c2, m2 = Coordinator(), Membership(10.0)
        m2.watch(c2)

        def evicted() -> bool:
            c2.member_id = ""  # "unknown member": aiokafka resets the member id
            return False

        c2.join = evicted
        await c2._do_rejoin_group(None)
        assert m2.lost and m2.lapse() == math.inf

    asyncio.run(run())


def test_without_the_coordinator_hooks_there_is_no_fence() -> None:
    m = Membership(10.0)
    assert not m.watch(object())
    assert m.lapse() == -math.inf


def test_a_crash_on_a_write_the_broker_did_not_take_in_time_is_a_fence() -> None:
    """faust stops the app when a table write times out (the broker down or cut off for
    longer than the producer's timeout): `sagaz worker` then exits as fenced (75)."""
    from aiokafka.errors import KafkaTimeoutError
    from faust.exceptions import ProducerSendError

    from streams.app import broker_unreachable

    try:
        try:
            raise KafkaTimeoutError()
        except KafkaTimeoutError as exc:
            raise ProducerSendError(f"Error while sending: {exc!r}") from exc
    except ProducerSendError as crash:
        assert broker_unreachable(crash)
    assert broker_unreachable(KafkaTimeoutError())
    assert not broker_unreachable(RuntimeError("a bug"))
    assert not broker_unreachable(None)
