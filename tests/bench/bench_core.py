#!/usr/bin/env python3
"""Benchmark (not a test): the in-process engine against sagaz 1.5.0, measured in one run.

Scenarios, as in ../shared/peers/sagaz_1_5_bench.py: ok (a -> b -> c), fail (c raises, b and a
are compensated), dag (a, b -> c). One saga at a time, trivial async steps.

    python tests/bench/bench_core.py -n 20000              # sagaz only
    python tests/bench/bench_core.py -n 20000 --peer       # plus sagaz 1.5.0 in its own venv

--peer runs the peer's own script (from ../shared/peers, or --peer-script) with
--peer-python, or in a virtual environment it creates under ~/.cache/sagaz/peer-venv.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sagaz import DAGSaga, Saga

COMP = 0


class Boom(Exception):
    pass


async def s_a(ctx):
    return 1


async def s_b(ctx):
    return 2


async def s_c(ctx):
    return ctx.result("a") + ctx.result("b")


async def s_fail(ctx):
    raise Boom("c failed")


async def undo(ctx):
    global COMP
    COMP += 1


def build(kind: str) -> Saga:
    if kind == "dag":
        saga: Saga = DAGSaga(f"bench-{kind}")
        saga.add_step("a", s_a, undo)
        saga.add_step("b", s_b, undo)
        saga.add_step("c", s_c, depends_on=["a", "b"])
    else:
        saga = Saga(f"bench-{kind}")
        saga.add_step("a", s_a, undo)
        saga.add_step("b", s_b, undo)
        saga.add_step("c", s_fail if kind == "fail" else s_c)
    return saga


def runner(kind: str, fresh: bool):
    shared = build(kind)

    async def run():
        saga = build(kind) if fresh else shared
        r = await saga.execute(order_id="o1")
        if kind == "fail":
            assert r.status == "compensated", r
        else:
            assert r.succeeded and r.results["c"] == 3, r

    return run


def pct(v, p):
    return v[max(0, min(len(v) - 1, round(p / 100 * (len(v) - 1))))]


async def bench(name, fn, n, warmup, expect_comp):
    global COMP
    for _ in range(warmup):
        await fn()
    gc.collect()
    COMP, lat = 0, []
    perf = time.perf_counter
    t0 = perf()
    for _ in range(n):
        t1 = perf()
        await fn()
        lat.append(perf() - t1)
    total = perf() - t0
    assert COMP == expect_comp * n, (name, COMP)
    lat.sort()
    row = (n / total, statistics.median(lat) * 1e6, pct(lat, 99) * 1e6)
    print(f"{name:<30} {row[0]:>8.0f} {row[1]:>9.1f} {row[2]:>9.1f}", flush=True)
    return row


def machine() -> str:
    cpu = ""
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except Exception:
        pass
    return (f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu {cpu}; "
            f"python {sys.version.split()[0]}; load {os.getloadavg()[0]:.2f}")


def peer(args) -> dict[str, tuple[float, float, float]]:
    py = args.peer_python
    if py is None:
        venv = Path.home() / ".cache/sagaz/peer-venv"
        py = str(venv / "bin/python")
        if not Path(py).exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([py, "-m", "pip", "install", "-q", "sagaz==1.5.0"], check=True)
    # Without PYTHONPATH: set to run this tree, it would make the peer import our sagaz.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([py, args.peer_script, "-n", str(args.peer_n)], check=True,
                         capture_output=True, text=True, env=env).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"decl (ok|fail|dag)\s+\(lean\)\s+(\d+)\s+(\d+)\s+(\d+)", line)
        if m:
            rows[m.group(1)] = tuple(float(x) for x in m.group(2, 3, 4))
    print(out, end="")
    return rows


async def main() -> None:
    here = Path(__file__).resolve()
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--peer", action="store_true", help="also run sagaz 1.5.0")
    ap.add_argument("--peer-python", default=None)
    ap.add_argument("--peer-script", default=str(here.parents[2].parent /
                                                 "shared/peers/sagaz_1_5_bench.py"))
    ap.add_argument("--peer-n", type=int, default=2000)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"n={args.n} warmup={args.warmup}")
    print(f"{'variant':<30} {'sagas/s':>8} {'p50 us':>9} {'p99 us':>9}")
    ours = {}
    for kind in ("ok", "fail", "dag"):
        ours[kind] = await bench(f"sagaz {kind:<4} (one definition)", runner(kind, False),
                                 args.n, args.warmup, 2 if kind == "fail" else 0)
    for kind in ("ok", "fail", "dag"):
        await bench(f"sagaz {kind:<4} (fresh definition)", runner(kind, True),
                    args.n, args.warmup, 2 if kind == "fail" else 0)
    if not args.peer:
        return
    print("\n--- peer: sagaz 1.5.0, same machine, same run ---")
    theirs = peer(args)
    print(f"\n{'scenario':<8} {'ours/s':>9} {'peer/s':>9} {'ratio':>7} {'our p99 us':>11}")
    for kind in ("ok", "fail", "dag"):
        if kind in theirs:
            o, t = ours[kind], theirs[kind]
            print(f"{kind:<8} {o[0]:>9.0f} {t[0]:>9.0f} {o[0] / t[0]:>6.1f}x {o[2]:>11.1f}")


if __name__ == "__main__":
    asyncio.run(main())
