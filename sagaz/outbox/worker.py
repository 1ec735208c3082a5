"""``OutboxWorker``: the safety net that publishes every outbox event, always.

It claims batches (per aggregate, oldest first, leased; see ``sagaz.storage``), keeps the
lease renewed while the broker holds the batch (through a broker outage the producer keeps
retrying, so the batch is neither lost nor handed to a second worker), and settles each
event by its own outcome: sent; failed (backoff, then dead with its last error); or released
untouched when an earlier event of its aggregate failed in the same batch, so order holds.
Events are published in one ordered ``publish_many`` per batch, never scattered with gather.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import Any

from sagaz.brokers import Broker, BrokerError, Skipped, start_if_needed
from sagaz.errors import mask_url
from sagaz.metrics import OutboxMetrics, shared
from sagaz.storage import Backoff, OutboxError, OutboxEvent, OutboxStore

__all__ = ["OutboxError", "OutboxEvent", "OutboxWorker"]

log = logging.getLogger("sagaz.outbox")


class OutboxWorker:
    def __init__(self, outbox: OutboxStore, broker: Broker, *, batch_size: int = 500,
                 lease: float = 30.0, poll_interval: float = 0.1, max_attempts: int = 10,
                 backoff: float = 0.5, max_backoff: float = 60.0,
                 retention: float | None = 7 * 86400, prune_interval: float = 300.0,
                 worker_id: str | None = None, registry: Any = None,
                 metrics_interval: float = 15.0) -> None:
        """``outbox``: ``storage.outbox``, or a storage of ``sagaz.outbox.storage`` (which
        is an OutboxStore too). A broker that was not started is started before the first
        claim (a failure is retried like a storage error, not counted against events).
        ``registry``: a prometheus_client CollectorRegistry to report to (None: no
        metrics); the gauges that cost a storage query (events by status, pending, age of
        the oldest pending event) are refreshed every ``metrics_interval`` s."""
        for name, count in (("batch_size", batch_size), ("max_attempts", max_attempts)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an int >= 1, got {count!r}")
        for name, value in (("lease", lease), ("poll_interval", poll_interval),
                            ("backoff", backoff), ("max_backoff", max_backoff),
                            ("prune_interval", prune_interval),
                            ("metrics_interval", metrics_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if retention is not None and (isinstance(retention, bool) or retention <= 0):
            raise ValueError(f"retention must be > 0 seconds or None, got {retention!r}")
        if not hasattr(outbox, "claim"):
            raise TypeError(f"outbox must be an OutboxStore (storage.outbox), got {outbox!r}")
        self.outbox, self.broker = outbox, broker
        self.batch_size, self.lease, self.poll_interval = batch_size, lease, poll_interval
        self.backoff = Backoff(max_attempts, backoff, max_backoff)
        self.retention, self.prune_interval = retention, prune_interval
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._stopping = asyncio.Event()
        self.published = 0
        # A batch published but not recorded (the storage went away meanwhile): recorded
        # before anything new is claimed, so it is not published a second time.
        self._unsettled: tuple[Any, ...] | None = None
        # the outbox_* families of docs/metrics.md (OutboxMetrics), or None
        self.metrics = shared(OutboxMetrics, registry) if registry is not None else None
        self.metrics_interval = metrics_interval
        # Health. A loop iteration takes at most a poll interval plus a claim and a settle,
        # except while the broker holds a batch, when the lease renewals (every lease / 3)
        # show progress instead. Silent for two leases, the worker is stuck, not waiting.
        self.stale_after = 2 * lease + poll_interval
        self._running = False
        self._progress_at = 0.0  # time.monotonic() of the last iteration or renewal
        self._storage_ok = False  # the last claim (and the storage calls after it) worked
        self._last_error: str | None = None

    async def stop(self) -> None:
        self._stopping.set()

    def live(self) -> bool:
        """``run()`` is running and made progress within ``stale_after`` seconds (a loop
        iteration completed, or a lease renewal while the broker holds a batch)."""
        return self._running and time.monotonic() - self._progress_at <= self.stale_after

    def ready(self) -> bool:
        """Live, its last claim against the storage succeeded, and the broker is started
        (a broker without a ``started`` attribute counts as started)."""
        return self.live() and self._storage_ok and bool(getattr(self.broker, "started", True))

    def health(self) -> dict[str, Any]:
        """What /health reports when a check fails."""
        return {"worker_id": self.worker_id, "running": self._running,
                "seconds_since_progress": (round(time.monotonic() - self._progress_at, 3)
                                           if self._progress_at else None),
                "stale_after": self.stale_after, "storage_ok": self._storage_ok,
                "broker_started": bool(getattr(self.broker, "started", True)),
                "last_error": self._last_error}

    async def run(self) -> None:
        """Publish until stop(); storage and broker errors are logged and retried."""
        loop = asyncio.get_running_loop()
        next_prune = next_gauges = loop.time()
        self._running, self._progress_at = True, time.monotonic()
        try:
            while not self._stopping.is_set():
                try:
                    n = await self.run_once()
                    if self.metrics is not None:
                        self.metrics.last_batch.set(time.time())
                    if self.retention is not None and loop.time() >= next_prune:
                        await self.outbox.prune(self.retention)
                        next_prune = loop.time() + self.prune_interval
                    if self.metrics is not None and loop.time() >= next_gauges:
                        next_gauges = loop.time() + self.metrics_interval
                        await self._refresh_gauges(self.metrics)
                except Exception as exc:  # the database went away, say: try again shortly
                    self._storage_ok = False
                    self._last_error = mask_url(f"{type(exc).__name__}: {exc}")
                    log.warning("outbox worker %s: %s", self.worker_id, self._last_error)
                    n = 0
                self._progress_at = time.monotonic()
                if n < self.batch_size:
                    try:
                        await asyncio.wait_for(self._stopping.wait(), self.poll_interval)
                    except TimeoutError:
                        pass
        finally:  # stopped, cancelled or died: not live any more
            self._running = False

    async def _refresh_gauges(self, metrics: OutboxMetrics) -> None:
        counts = await self.outbox.counts()
        for status in ("pending", "sent", "dead"):
            metrics.events.labels(status).set(counts[status])
        metrics.pending.set(counts["pending"])  # claimed events stay pending until settled
        metrics.oldest_pending.set(await self.outbox.oldest_pending_age())

    async def run_once(self) -> int:
        """Claim one batch, publish it, record the outcome; return how many were claimed.
        One batch at a time per worker (its own leases are free to its next claim)."""
        if self._unsettled is not None:
            await self._settle(*self._unsettled)
        # Before claiming: a broker that cannot start is an outage (retried by run()),
        # not a failed attempt of the events.
        await start_if_needed(self.broker)
        t0 = time.perf_counter()
        events = await self.outbox.claim(self.worker_id, self.batch_size, self.lease)
        self._storage_ok = True
        if not events:
            return 0
        # While the broker holds the batch (it retries through an outage), keep the lease:
        # a worker that takes the events over would publish them a second time.
        done = asyncio.Event()
        renew = asyncio.create_task(self._renew(events, done))
        try:
            errors = await self.broker.publish_many([e.message() for e in events])
        except BrokerError as exc:
            errors = [exc] * len(events)
        finally:
            # Stopped between calls, not cancelled: a query cancelled mid-flight would
            # hand its connection back to the pool in an unusable state.
            done.set()
            await asyncio.gather(renew, return_exceptions=True)
        # Per aggregate, everything after its first failure waits for it: released
        # without counting an attempt, and not claimable until the failed one goes out.
        sent: list[OutboxEvent] = []
        failed: list[tuple[OutboxEvent, str]] = []
        released: list[OutboxEvent] = []
        broken: set[str] = set()
        for e, err in zip(events, errors, strict=True):
            if e.aggregate_id in broken or isinstance(err, Skipped):
                released.append(e)
                broken.add(e.aggregate_id)
            elif err is not None:
                # stored as the event's last error, shown by `sagaz outbox dead`: masked
                failed.append((e, mask_url(f"{type(err).__name__}: {err}")))
                broken.add(e.aggregate_id)
            else:
                sent.append(e)
        if failed:
            log.warning("outbox worker %s: publishing %d events failed: %s", self.worker_id,
                        len(failed), failed[0][1])
        await self._settle(sent, failed, released)
        if self.metrics is not None:
            self.metrics.failures.inc(len(failed))
            self.metrics.dead.inc(sum(e.attempts + 1 >= self.backoff.max_attempts
                                      for e, _ in failed))
            self.metrics.batch.observe(time.perf_counter() - t0)
        return len(events)

    async def _settle(self, sent: list[OutboxEvent], failed: list[tuple[OutboxEvent, str]],
                      released: list[OutboxEvent]) -> None:
        self._unsettled = (sent, failed, released)
        await self.outbox.settle(self.worker_id, sent, failed, released, self.backoff)
        self._unsettled = None
        self.published += len(sent)
        if self.metrics is not None:
            self.metrics.published.inc(len(sent))

    async def _renew(self, events: list[OutboxEvent], done: asyncio.Event) -> None:
        while True:
            try:
                await asyncio.wait_for(done.wait(), self.lease / 3)
                return
            except TimeoutError:
                pass
            self._progress_at = time.monotonic()  # waiting on the broker, not stuck
            try:
                await self.outbox.renew(self.worker_id, events, self.lease)
            except Exception as exc:  # keep trying; the lease is the fallback
                log.warning("outbox worker %s: renewing a lease failed: %s", self.worker_id,
                            mask_url(str(exc)))

