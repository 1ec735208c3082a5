"""Issue 11: an orchestrator worker cut off from the broker for longer than the group session
timeout must not write stale saga rows once the network heals.

Real processes on a real broker, as the chaos suite runs them (tests/chaos/cluster.py): two
``sagaz worker`` processes, one of them bootstrapped on a proxied listener so every
connection it makes runs through ``tests/proxy.py``. Under load, that proxy first slows
(so outputs and changelog rows of the worker are in flight), then is cut for longer than
the session timeout while the other worker takes the partitions and advances their sagas,
then heals. Before the fence, the cut worker (its event loop running, so not fenced as a
frozen one) flushed the changelog rows it had queued after the new owner's: a saga's rows
went backwards in the changelog (a fresh worker recovering from it would resume an old
state), and once it rejoined it dead-lettered results of sagas it did not have ("no saga
here"), leaving them stuck (on the old code: 66 of 700 sagas backwards, 28 never ended, 31
results dead-lettered). Now it stops processing once its group membership is unconfirmed
for half the session timeout and exits with code 75 past the session timeout, flushing
nothing; the test restarts it, as a process manager would.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from tests.chaos.cluster import Cluster
from tests.chaos.test_chaos import check_changelog

pytestmark = pytest.mark.kafka

CUT = 20.0  # seconds: twice the workers' session timeout (10 s)


async def test_a_worker_cut_off_from_the_broker_writes_no_stale_row(tmp_path: Path) -> None:
    n, rate = 700, 25  # ~28 s of starts: load before, during and after the cut
    cluster = Cluster(tmp_path, f"fence-{uuid.uuid4().hex[:8]}", proxied=["WORKER1"])
    t0 = time.monotonic()
    exit_code: int | None = None
    try:
        await cluster.start_broker()
        for i, listener in ((0, None), (1, "WORKER1")):
            cluster.spawn(cluster.add_worker(i, listener=listener))
        await cluster.wait_ready(list(cluster.procs.values()), 120)
        for service in ("flights", "hotels", "payments"):
            cluster.spawn(cluster.add_participant(service, 0))
        await cluster.wait_ready(list(cluster.procs.values()), 120)
        await cluster.connect()
        loader = asyncio.create_task(cluster.load(cluster.items(n, delay=0.02), rate=rate))
        proxy, cut_off = cluster.proxies["WORKER1"], cluster.procs["worker-1"]
        await asyncio.sleep(5)
        proxy.latency = 0.3  # the worker's writes pile up in flight ...
        await asyncio.sleep(3)
        fault = cluster.record(f"cut {CUT:.0f}s", "WORKER1")
        proxy.cut()  # ... and are cut off with them
        await asyncio.sleep(CUT)
        proxy.latency = 0.0
        proxy.heal()
        fault.ended = time.monotonic()
        for _ in range(50):  # a fenced worker exits at once; restart it as a supervisor would
            if not cut_off.running:
                break
            await asyncio.sleep(0.1)
        assert cut_off.popen is not None
        exit_code = cut_off.popen.poll()
        if exit_code is not None:
            await cluster.restart(cut_off)
        await cluster.recovered(fault, list(cluster.procs.values()))
        await loader
        await cluster.settle(timeout=120)
        history = await cluster.changelog()
        fig = cluster.figures("partition-fence", t0)
    finally:
        await cluster.close()
    backwards = check_changelog(cluster, fig, history)
    report = fig.report
    assert report is not None
    # Before the fence the rejoined worker also dead-lettered results ("no saga ... here"):
    # these sagas send nothing malformed, so no input may be dead-lettered at all.
    dead_lettered = [line for proc in cluster.procs.values() if proc.role == "worker"
                     for line in proc.log.read_text(errors="replace").splitlines()
                     if "dead-lettering" in line]
    print(f"\nexit code of the cut worker: {exit_code}; {fig.notes[-1]}; "
          f"{len(dead_lettered)} inputs dead-lettered; {report.summary()}")
    assert not backwards, f"changelog rows went backwards (or end wrong) for {backwards[:5]}"
    assert not dead_lettered, dead_lettered[:3]
    assert report.ok, report.summary()
    assert report.sagas == n
    assert fault.recovered is not None, "the cluster did not recover after the heal"
    # A worker whose membership lapsed past the session timeout fences itself like a
    # frozen one: exit code 75 (EX_TEMPFAIL), for its process manager to restart it.
    assert exit_code == 75, f"the cut-off worker's exit code: {exit_code}"
