"""``OptimisticPublisher``: publish an event right after its transaction commits.

The fast path next to ``OutboxWorker``: the event goes out within milliseconds of the
commit instead of at the worker's next poll, and whatever this path fails to do the worker
does later, so it never loses an event and never needs a retry of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sagaz.brokers import Broker, start_if_needed
from sagaz.errors import mask_url
from sagaz.metrics import OptimisticMetrics, shared
from sagaz.storage import OutboxEvent, OutboxStore

__all__ = ["OptimisticPublisher"]

log = logging.getLogger("sagaz.outbox")


#: Seconds a publish waits for a broker that is not started yet before leaving the event to
#: the worker (the start goes on in the background).
START_WAIT = 1.0


class OptimisticPublisher:
    """Publish right after commit; the worker is the safety net.

    The event should be added with ``delay`` (e.g. 5 s) so workers leave it alone
    meanwhile. Marked sent only after the broker acknowledged it; on any failure it stays
    pending and a worker publishes it when the delay is over. An event that has an earlier
    unsent event of its aggregate is left to the worker, to keep the order.
    """

    def __init__(self, outbox: OutboxStore, broker: Broker, *,
                 enabled: bool = True, registry: Any = None) -> None:
        """``outbox``: ``storage.outbox``, or a storage of ``sagaz.outbox.storage`` (which
        is an OutboxStore too). ``enabled=False`` turns the fast path off (a switch for
        operators, e.g. while the broker is known to be down): ``publish_after_commit``
        then touches neither the storage nor the broker and leaves every event to the
        worker. A broker that was not started is started by the first publish, which waits
        at most ``START_WAIT`` seconds for it: a broker that cannot start (or starts slowly)
        never holds a publish longer; the start goes on in the background and the events
        are left to the worker meanwhile. ``registry``: a prometheus_client
        CollectorRegistry for the ``outbox_optimistic_send_*`` families (None: no
        metrics): a send that fails or waits out ``START_WAIT`` counts as a failure; an
        event left to the worker because an earlier one of its aggregate is pending, or
        while disabled, counts as neither."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        if not hasattr(outbox, "is_next"):
            raise TypeError(f"outbox must be an OutboxStore (storage.outbox), got {outbox!r}")
        self.outbox, self.broker = outbox, broker
        self.enabled = enabled
        self.metrics = shared(OptimisticMetrics, registry) if registry is not None else None
        self._starting: asyncio.Task[None] | None = None

    async def publish_after_commit(self, event: OutboxEvent) -> bool:
        """True if published and marked sent now; False if left to the worker (disabled,
        an earlier event of its aggregate pending, or any failure, logged)."""
        if not self.enabled:
            return False
        if not isinstance(event, OutboxEvent):
            raise TypeError(f"publish_after_commit takes the OutboxEvent that insert() "
                            f"returned, got {event!r}")
        t0 = time.perf_counter()
        sent = await self._publish(event)
        if self.metrics is not None and sent is not None:
            self.metrics.seconds.observe(time.perf_counter() - t0)
            (self.metrics.success if sent else self.metrics.failures).inc()
        return bool(sent)

    async def _publish(self, event: OutboxEvent) -> bool | None:
        """True: sent; False: failed (left to the worker); None: not tried (an earlier
        event of its aggregate is pending)."""
        try:
            if not getattr(self.broker, "started", True):
                if self._starting is None or self._starting.done():
                    self._starting = asyncio.create_task(start_if_needed(self.broker))
                    self._starting.add_done_callback(
                        lambda t: t.cancelled() or t.exception())  # retrieved: no warning
                try:
                    await asyncio.wait_for(asyncio.shield(self._starting), START_WAIT)
                except TimeoutError:
                    log.info("optimistic publish of %s left to the worker: the broker is "
                             "still starting", event.event_id)
                    return False
            if not await self.outbox.is_next(event):
                return None
            [error] = await self.broker.publish_many([event.message()])
            if error is not None:
                raise error
            await self.outbox.mark_sent(event)
            return True
        except Exception as exc:
            log.info("optimistic publish of %s left to the worker: %s", event.event_id,
                     mask_url(str(exc)))
            return False
