"""A sagaz deployment on loopback, started as a user deploys it, for the chaos suite.

One broker of its own (``LocalKafka``, killed and restarted on its data directory), N
orchestrator workers (``sagaz worker``) and M participant processes per service
(``sagaz participant``), each a subprocess with its own data directory kept across restarts
(as a pod's volume is). Faults go by pid (SIGKILL, SIGSTOP/SIGCONT) or through a TCP proxy
(``tests/proxy.py``) in front of a broker listener that only one process is bootstrapped
on: every connection of that process then runs through the proxy, which the test cuts,
heals or slows down. Every wait is bounded; every process is ended by pid at ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from sagaz import messages
from sagaz.client import SagaClient
from sagaz.testing.kafka import LocalKafka, _die_with_parent, free_port
from tests.chaos import check
from tests.chaos.sagas import SAGAS, SERVICES
from tests.proxy import Proxy

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4
FENCED_EXIT = 75  # streams.app.FROZEN_EXIT_CODE: a worker that fenced itself
LONG = os.environ.get("SAGAZ_CHAOS", "").lower() == "long"  # make chaos: the long sizes
OUT = ROOT / "var" / "chaos"  # each scenario's figures, for docs/chaos.md


def size(short: int, long: int) -> int:
    return long if LONG else short


@dataclass
class Proc:
    name: str
    role: str                    # worker | participant
    args: list[str]
    port: int                    # its /health and /metrics port
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    stopped: bool = False        # SIGSTOPped

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class Fault:
    kind: str
    target: str
    at: float                    # monotonic: injected
    recovered: float | None = None
    ended: float | None = None   # the fault was lifted: restarted, healed, continued

    @property
    def recovery(self) -> float | None:
        """From the end of the fault (or its start, for one that ends at once) until work
        flows again."""
        if self.recovered is None:
            return None
        return self.recovered - (self.ended if self.ended is not None else self.at)


@dataclass
class Figures:
    scenario: str
    sagas: int
    faults: list[Fault] = field(default_factory=list)
    report: check.Report | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        rec = sorted(r for f in self.faults if (r := f.recovery) is not None)
        r = self.report or check.Report()
        return {
            "scenario": self.scenario, "sagas": self.sagas, "faults": len(self.faults),
            "fault_kinds": sorted({f.kind for f in self.faults}),
            "lost": len(r.lost), "not_terminal": len(r.not_terminal),
            "duplicated": len(r.duplicated), "redelivered": r.redelivered,
            "violations": len(r.violations), "completed": r.completed,
            "compensated": r.compensated,
            "recovery_p50": round(statistics.median(rec), 2) if rec else None,
            "recovery_max": round(rec[-1], 2) if rec else None,
            "unrecovered": sum(1 for f in self.faults if f.recovered is None),
            "seconds": round(self.seconds, 1), "notes": self.notes,
            "fault_list": [[f.kind, f.target, None if f.recovery is None
                            else round(f.recovery, 1)] for f in self.faults],
        }


class Cluster:
    def __init__(self, tmp: Path, prefix: str, *, proxied: Iterable[str] = ()) -> None:
        self.tmp, self.prefix = tmp, prefix
        self.ledger = tmp / "ledger.txt"
        self.ledger.touch()
        self.broker = LocalKafka(partitions=PARTITIONS, workdir=tmp / "broker",
                                 proxied=proxied, heap="768m")
        self.proxies: dict[str, Proxy] = {}
        self.procs: dict[str, Proc] = {}
        self.outcomes: dict[str, tuple[str, float]] = {}  # saga id -> (status, monotonic)
        self.started: dict[str, str] = {}                 # saga id -> saga name
        self.faults: list[Fault] = []
        self.fenced_exits: list[str] = []  # workers restarted after exit code 75
        self._watcher: asyncio.Task[None] | None = None
        self.client: SagaClient | None = None

    # -- set-up

    async def start_broker(self) -> None:
        for name, port in self.broker.proxied_ports.items():
            proxy = await Proxy("127.0.0.1", port).start()
            self.proxies[name] = proxy
            self.broker.advertised_ports[name] = proxy.port
        await asyncio.to_thread(self.broker.start)

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap_servers

    def via(self, listener: str | None) -> str:
        """The bootstrap address of a process: the broker, or the proxy of a listener."""
        return self.bootstrap if listener is None else \
            f"127.0.0.1:{self.proxies[listener].port}"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1", "SAGAZ_CHAOS_LEDGER": str(self.ledger),
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def add_worker(self, i: int, *, listener: str | None = None) -> Proc:
        port = free_port()
        name = f"worker-{i}"
        args = [sys.executable, "-m", "sagaz.cli", "--bootstrap", self.via(listener),
                "--prefix", self.prefix, "worker", "--sagas", "tests.chaos.sagas",
                "--partitions", str(PARTITIONS), "--datadir", str(self.tmp / name),
                "--web-port", str(port), "--worker-id", str(i), "--log-level", "warning"]
        proc = self.procs[name] = Proc(name, "worker", args, port, self.tmp / f"{name}.log")
        return proc

    def add_participant(self, service: str, i: int, *, listener: str | None = None) -> Proc:
        port = free_port()
        name = f"{service}-{i}"
        args = [sys.executable, "-m", "sagaz.cli", "--bootstrap", self.via(listener),
                "--prefix", self.prefix, "participant", "--service", service,
                "--sagas", "tests.chaos.sagas", "--datadir", str(self.tmp / name),
                "--metrics-port", str(port), "--log-level", "warning"]
        proc = self.procs[name] = Proc(name, "participant", args, port,
                                       self.tmp / f"{name}.log")
        return proc

    def spawn(self, proc: Proc) -> None:
        with open(proc.log, "ab") as log:
            proc.popen = subprocess.Popen(proc.args, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self._env(),
                                          preexec_fn=_die_with_parent)
        proc.stopped = False

    async def up(self, workers: int = 2, per_service: int = 2) -> None:
        """Broker, workers and participants, ready; the outcome watcher and a client."""
        await self.start_broker()
        for i in range(workers):
            self.spawn(self.add_worker(i))
        await self.wait_ready([p for p in self.procs.values() if p.role == "worker"], 120)
        for service in SERVICES:
            for i in range(per_service):
                self.spawn(self.add_participant(service, i))
        await self.wait_ready(list(self.procs.values()), 120)
        await self.connect()

    async def connect(self) -> None:
        self.client = SagaClient(self.bootstrap, prefix=self.prefix, listen=False)
        await self.client.start_client()
        self._watcher = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.close(), 20)
        for proc in self.procs.values():
            if proc.running:
                assert proc.popen is not None
                if proc.stopped:
                    proc.popen.send_signal(signal.SIGCONT)
                proc.popen.terminate()
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            if proc.popen is not None:
                try:
                    proc.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.popen.kill()
                    proc.popen.wait()
        for proxy in self.proxies.values():
            await proxy.stop()
        await asyncio.to_thread(self.broker.stop)

    # -- health

    async def ready(self, proc: Proc) -> bool:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s, \
                    s.get(f"http://127.0.0.1:{proc.port}/health/ready") as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def wait_ready(self, procs: list[Proc], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(procs)
        while pending:
            for p in list(pending):
                if not p.running and p.role == "worker" and p.popen is not None \
                        and p.popen.poll() == FENCED_EXIT:
                    # A worker that fenced itself (frozen past the session timeout, or cut
                    # off from the broker that long) exits 75 for its process manager to
                    # restart it: do what the manager would.
                    self.fenced_exits.append(p.name)
                    await self.restart(p)
                    continue
                if not p.running:
                    raise AssertionError(f"{p.name} exited with {p.popen and p.popen.poll()}; "
                                         f"log tail:\n{tail(p.log)}")
                if await self.ready(p):
                    pending.remove(p)
            if pending and time.monotonic() > deadline:
                raise AssertionError(f"not ready within {timeout:.0f}s: "
                                     f"{[p.name for p in pending]}; log tail of "
                                     f"{pending[0].name}:\n{tail(pending[0].log)}")
            await asyncio.sleep(0.2)

    # -- load and outcomes

    async def _watch(self) -> None:
        """Every outcome on ``<prefix>.outcomes`` from the beginning: saga id -> status and
        when this process first saw it. Reconnects by itself (aiokafka) when the broker
        goes away."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = f"{self.prefix}.outcomes"
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
            while True:
                try:
                    batches = await consumer.getmany(timeout_ms=200)
                except Exception:  # the broker is down: keep trying
                    await asyncio.sleep(0.5)
                    continue
                now = time.monotonic()
                for records in batches.values():
                    for record in records:
                        try:
                            msg = messages.decode(record.value, expect=frozenset({"outcome"}))
                        except messages.MessageError:
                            continue
                        self.outcomes.setdefault(msg["saga_id"], (msg["status"], now))
        finally:
            await consumer.stop()

    def items(self, n: int, start: int = 0, *, flaky: float = 0.3, fail_every: int = 7,
              delay: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        """A mixed load: sequences and DAGs; one in ``fail_every`` fails for good at a
        rotating step; every attempt fails at ``flaky`` rate (retried)."""
        out = []
        for i in range(start, start + n):
            name = "party" if i % 3 == 2 else "trip"
            data: dict[str, Any] = {"n": i, "flaky": flaky, "delay": delay}
            if fail_every and i % fail_every == 0:
                data["fail"] = ("flight", "hotel", "pay")[(i // fail_every) % 3]
            out.append((name, data))
        return out

    async def load(self, items: list[tuple[str, dict[str, Any]]], *, rate: float) -> None:
        """Start ``items`` at ``rate`` sagas/s (batches of 20), riding out broker outages."""
        assert self.client is not None
        t0 = time.monotonic()
        for b in range(0, len(items), 20):
            batch = items[b:b + 20]
            for name, data in batch:
                for _ in range(600):  # bounded: ~5 min of a broker that does not come back
                    try:
                        sid = await self.client.start(name, data,
                                                      idempotency_key=f"{self.prefix}-{data['n']}")
                        self.started[sid] = name
                        break
                    except Exception:
                        await asyncio.sleep(0.5)
                else:
                    raise AssertionError("the broker did not take a start for 5 minutes")
            ahead = t0 + (b + len(batch)) / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)

    async def settle(self, timeout: float) -> None:
        """Wait until every started saga has an outcome (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s in self.outcomes for s in self.started):
                return
            await asyncio.sleep(0.5)

    async def changelog(self) -> dict[str, list[tuple[int, str]]]:
        """Every row of the saga table's changelog, in offset order: saga id -> [(seq,
        status)]. What a fresh worker recovers is the last of each."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        topic = f"{self.prefix}-orchestrator-sagas-changelog"
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        out: dict[str, list[tuple[int, str]]] = {}
        try:
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            deadline = time.monotonic() + 120
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise AssertionError("reading the changelog took over 120 s")
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        if r.value is None or r.key is None:
                            continue
                        seq, status = row_summary(r.value)
                        out.setdefault(r.key.decode(), []).append((seq, status))
        finally:
            await consumer.stop()
        return out

    def report(self) -> check.Report:
        ledger = check.parse_ledger(self.ledger.read_text().splitlines())
        outcomes = {s: st for s, (st, _) in self.outcomes.items()}
        return check.check(check.plans_of(SAGAS), self.started, outcomes, ledger)

    # -- faults

    def kill(self, proc: Proc, kind: str = "SIGKILL") -> Fault:
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait()
        return self.record(kind, proc.name)

    def record(self, kind: str, target: str) -> Fault:
        fault = Fault(kind, target, time.monotonic())
        self.faults.append(fault)
        return fault

    def stop(self, proc: Proc) -> Fault:
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGSTOP)
        proc.stopped = True
        return self.record("SIGSTOP", proc.name)

    def cont(self, proc: Proc) -> None:
        assert proc.popen is not None
        proc.popen.send_signal(signal.SIGCONT)
        proc.stopped = False

    async def retire(self, proc: Proc, timeout: float = 60) -> None:
        """Scale in: SIGTERM (a clean shutdown hands its partitions over) and forget it."""
        assert proc.popen is not None
        proc.popen.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.popen.wait), timeout)
        except TimeoutError:
            proc.popen.kill()
            proc.popen.wait()
            raise AssertionError(f"{proc.name} did not stop within {timeout:.0f}s of SIGTERM") \
                from None
        del self.procs[proc.name]

    async def restart(self, proc: Proc) -> None:
        proc.restarts += 1
        self.spawn(proc)

    async def recovered(self, fault: Fault, procs: list[Proc], timeout: float = 180) -> None:
        """Marks ``fault`` recovered once ``procs`` are ready again and an outcome arrived
        after that (work flows through them), or every saga has ended; bounded. Left
        unrecovered (None) if that does not happen within ``timeout``."""
        deadline = time.monotonic() + timeout
        try:
            await self.wait_ready(procs, timeout)
        except AssertionError:
            return
        back = time.monotonic()
        while time.monotonic() < deadline:
            if any(t >= back for _, t in self.outcomes.values()) or \
                    all(s in self.outcomes for s in self.started):
                fault.recovered = time.monotonic()
                return
            await asyncio.sleep(0.1)

    def figures(self, scenario: str, t0: float) -> Figures:
        fig = Figures(scenario, len(self.started), list(self.faults), self.report(),
                      time.monotonic() - t0)
        if self.fenced_exits:
            fig.notes.append(f"workers that fenced themselves (exit 75) and were restarted: "
                             f"{self.fenced_exits}")
        return fig


def save(fig: Figures) -> dict[str, Any]:
    OUT.mkdir(parents=True, exist_ok=True)
    data = fig.as_dict()
    data["size"] = "long" if LONG else "short"
    (OUT / f"{fig.scenario}.json").write_text(json.dumps(data, indent=1))
    print(f"\n{fig.scenario}: {json.dumps(data)}")
    return data


def row_summary(raw: bytes) -> tuple[int, str]:
    """(seq, status) of a saga table row."""
    import orjson

    state = orjson.loads(raw)["state"]
    return int(state["seq"]), str(state["status"])


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""
