"""`make demo`: a local broker, an orchestrator worker, three participants, 1,000 orders.

    python -m streams.demo [--sagas 1000] [--decline 0.2] [--hold | --no-hold]

Uses KAFKA_BOOTSTRAP_SERVERS when set, else starts Apache Kafka from Maven jars. The worker
and the inventory, payment and shipping participants run as separate processes (logs under
var/demo/). A share of orders is declined at payment, so their reservations are released.
Prints the outcome counts and where to look; with --hold (the default on a terminal) it
keeps everything running for queries until Ctrl-C, then shuts it all down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

SERVICES = ("inventory", "payment", "shipping")
LOGS = Path("var/demo")


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    from sagaz.testing.kafka import _die_with_parent

    with open(log, "ab") as out:
        # Own sessions: Ctrl-C reaches the demo alone, which then stops the participants
        # and the worker before the broker, instead of everything at once.
        return subprocess.Popen([sys.executable, "-m", "sagaz.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)


def _bar(done: int, total: int, started: float, width: int = 40) -> str:
    filled = width * done // max(total, 1)
    rate = done / max(time.monotonic() - started, 1e-9)
    return f"\r  [{'#' * filled}{'.' * (width - filled)}] {done:>5}/{total}  {rate:7.0f} sagas/s"



async def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Poll a worker's /health/ready; fail early if one of ``procs`` exits."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a demo process exited early (code {p.returncode}); "
                                       f"see var/demo/*.log")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url + "/health/ready") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the worker was not ready after {timeout:.0f}s; see var/demo/worker.log")


async def run(args: argparse.Namespace, bootstrap: str, procs: list[Any]) -> None:
    from sagaz.client import SagaClient
    from sagaz.testing.kafka import free_port

    logs = LOGS
    prefix = f"demo{int(time.time())}"
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = ["--bootstrap", bootstrap, "--prefix", prefix]
    print(f"starting the orchestrator worker ({url}) and participants {', '.join(SERVICES)}")
    procs.append(_spawn([*common, "worker", "--sagas", "streams.examples", "--partitions", "4",
                         "--datadir", str(logs / f"data-{prefix}"), "--web-port", str(port),
                         "--log-level", "warning"], logs / "worker.log", env))
    await wait_ready(url, procs, 120)  # the worker declares the topics the others use
    for service in SERVICES:
        procs.append(_spawn([*common, "participant", "--service", service, "--sagas",
                             "streams.examples"], logs / f"{service}.log", env))

    rng = random.Random(7)
    items = [{"order_id": f"order-{i:05d}", "amount": round(rng.uniform(5, 500), 2),
              "decline": rng.random() < args.decline} for i in range(args.sagas)]
    async with SagaClient(bootstrap, prefix=prefix, url=url) as client:
        print(f"publishing {args.sagas} order sagas ({args.decline:.0%} will be declined)")
        started = time.monotonic()
        ids = await client.start_many("order", items)
        counts: Counter[str] = Counter()
        outcomes: dict[str, dict[str, Any]] = {}

        tty = sys.stdout.isatty()
        step = max(1, len(ids) // (100 if tty else 10))

        async def one(sid: str) -> None:
            outcome = await client.wait(sid, timeout=300)
            outcomes[sid] = outcome
            counts[outcome["status"]] += 1
            if len(outcomes) % step == 0 or len(outcomes) == len(ids):
                print(_bar(len(outcomes), len(ids), started), end="" if tty else "\n",
                      flush=True)

        await asyncio.gather(*(one(s) for s in ids))
        elapsed = time.monotonic() - started
    print(f"\n\n{len(ids)} sagas ended in {elapsed:.1f}s ({len(ids) / elapsed:.0f} sagas/s):")
    for status, n in sorted(counts.items()):
        print(f"  {status:<12} {n}")
    done = next(s for s in ids if outcomes[s]["status"] == "completed")
    undone = next((s for s in ids if outcomes[s]["status"] == "compensated"), done)
    print("\nwhere to look:")
    print(f"  curl {url}/sagas/{done}")
    print(f"  curl {url}/sagas/{undone}      (a declined order, compensated)")
    print(f"  curl '{url}/sagas?status=compensated&limit=5'")
    print(f"  curl {url}/metrics")
    print(f"  .venv/bin/sagaz status {undone} --url {url}")
    print("  logs: var/demo/*.log")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streams.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sagas", type=int, default=1000)
    ap.add_argument("--decline", type=float, default=0.2, help="share of declined payments")
    ap.add_argument("--port", type=int, default=6066, help="worker HTTP port (0: any free)")
    hold = ap.add_mutually_exclusive_group()
    hold.add_argument("--hold", dest="hold", action="store_true", default=None)
    hold.add_argument("--no-hold", dest="hold", action="store_false")
    args = ap.parse_args(argv)
    if args.sagas < 1 or not 0 <= args.decline <= 1:
        ap.error("--sagas must be >= 1 and --decline between 0 and 1")
    if args.hold is None:
        args.hold = sys.stdin.isatty()

    from sagaz.testing.kafka import KafkaToolError, LocalKafka

    broker = None
    procs: list[subprocess.Popen[bytes]] = []
    LOGS.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            print("starting a local Apache Kafka broker (first run fetches it from Maven)...")
            broker = LocalKafka(partitions=4).start()
            bootstrap = broker.bootstrap_servers
            print(f"Kafka at {bootstrap}, ready in {broker.started_in:.1f}s")
        asyncio.run(run(args, bootstrap, procs))
        if args.hold:
            print("\nrunning; Ctrl-C stops the worker, the participants and the broker")
            signal.pause()
    except KeyboardInterrupt:
        print("\ninterrupted")
    except (KafkaToolError, RuntimeError) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        print("shutting down...", flush=True)
        for p in reversed(procs):  # participants first, then the worker
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if broker is not None:
            broker.stop()
        print("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
