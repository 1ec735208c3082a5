#!/usr/bin/env python3
"""Benchmark (not a test): sagas through Kafka, one orchestrator worker, one participant.

A 3-step saga with trivial steps (streams.examples.bench). Full load: publish N sagas at
once, measure sagas/s until every outcome arrived. Half load: publish at half that rate,
measure end-to-end latency (start published -> outcome received) p50/p99.

    python tests/bench/bench_streams.py [-n 5000] [--profile]

Uses KAFKA_BOOTSTRAP_SERVERS when set, else a local broker from Maven jars. The worker and
the participant are separate processes, as deployed; --profile runs the worker under
cProfile and prints where its time went.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine


def pct(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[max(0, min(len(v) - 1, round(p / 100 * (len(v) - 1))))]


def spawn(args: list[str], log: Path, profile: Path | None = None) -> subprocess.Popen[bytes]:
    pre = [sys.executable]
    if profile is not None:
        pre += ["-m", "cProfile", "-o", str(profile)]
    with open(log, "ab") as out:
        return subprocess.Popen([*pre, "-m", "sagaz.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT)


async def run(bootstrap: str, args: argparse.Namespace, work: Path) -> None:
    from sagaz.client import SagaClient
    from sagaz.testing.kafka import free_port
    from streams.demo import wait_ready

    prefix, port = f"bench{int(time.time())}", free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["--bootstrap", bootstrap, "--prefix", prefix]
    prof = work / "worker.prof" if args.profile else None
    worker = spawn([*common, "worker", "--sagas", "streams.examples:bench", "--partitions",
                    str(args.partitions), "--datadir", str(work / "data"), "--web-port",
                    str(port), "--log-level", "warning"], work / "worker.log", prof)
    procs = [worker]
    try:
        await wait_ready(url, procs, 120)
        procs.append(spawn([*common, "participant", "--service", "bench", "--sagas",
                            "streams.examples:bench"], work / "participant.log"))
        sent: dict[str, float] = {}
        done: dict[str, float] = {}
        clock = time.perf_counter

        def arrived(msg: dict[str, Any]) -> None:
            done[msg["saga_id"]] = clock()

        async with SagaClient(bootstrap, prefix=prefix, on_outcome=arrived) as client:
            async def wave(n: int, rate: float | None) -> tuple[float, list[float]]:
                ids: list[str] = []
                t0 = clock()
                chunk = 50 if rate is None else 1  # paced: a steady stream, not bursts
                for i in range(0, n, chunk):
                    if rate is not None:  # pace: chunk i is due at t0 + i / rate
                        await asyncio.sleep(max(0.0, t0 + i / rate - clock()))
                    now = clock()
                    batch = await client.start_many("bench", [{"i": j} for j in
                                                               range(i, min(n, i + chunk))])
                    for sid in batch:
                        sent[sid] = now
                    ids += batch
                deadline = clock() + 300
                while any(s not in done for s in ids) and clock() < deadline:
                    await asyncio.sleep(0.01)
                missing = [s for s in ids if s not in done]
                if missing:
                    raise RuntimeError(f"{len(missing)} sagas had no outcome in 300 s")
                elapsed = max(done[s] for s in ids) - t0
                return n / elapsed, [done[s] - sent[s] for s in ids]

            await wave(min(500, args.n), None)  # warm-up
            full_rate, full_lat = await wave(args.n, None)
            half_rate, half_lat = await wave(args.n // 2, full_rate / 2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
    print(f"{'load':<22} {'sagas/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'full (' + str(args.n) + ' at once)':<22} {full_rate:>8.0f} "
          f"{pct(full_lat, 50) * 1e3:>8.1f} {pct(full_lat, 99) * 1e3:>8.1f}")
    print(f"{'half (paced)':<22} {half_rate:>8.0f} {pct(half_lat, 50) * 1e3:>8.1f} "
          f"{pct(half_lat, 99) * 1e3:>8.1f}")
    if prof is not None and prof.exists():
        print("\nworker profile (cumulative, top 25):")
        pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="sagaz-bench-"))
    from sagaz.testing.kafka import LocalKafka

    broker = None
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        broker = LocalKafka(partitions=args.partitions).start()
        bootstrap = broker.bootstrap_servers
    print(f"broker {bootstrap}; n={args.n}; partitions={args.partitions}; logs {work}")
    try:
        asyncio.run(run(bootstrap, args, work))
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
