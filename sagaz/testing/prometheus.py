"""A throwaway Prometheus server on 127.0.0.1 (Debian's /usr/bin/prometheus), for tests.

    with LocalPrometheus({"sagaz-orchestrator": ["127.0.0.1:6066"]},
                         rule_files=["k8s/monitoring/sagaz-alerts.rules.yml"]) as prom:
        prom.query('up{job="sagaz-orchestrator"}')       # the instant vector's samples
        prom.alerts()                                    # /api/v1/alerts
        prom.rule_groups()                               # /api/v1/rules, with each health

The server scrapes and evaluates every second (``scrape_interval`` and
``evaluation_interval``), keeps its data in a temporary directory removed on stop, and
listens on a free loopback port. A rule file Prometheus cannot load makes ``start()`` fail
with Prometheus's own error. It dies with the Python process that started it
(PR_SET_PDEATHSIG), and ``stop()`` ends it by its pid. The configuration is written as JSON,
which is YAML, so nothing beyond the standard library is needed.

Command line (development)::

    python -m sagaz.testing.prometheus start --target sagaz-outbox-worker=127.0.0.1:9108 \\
        --rules k8s/monitoring/sagaz-alerts.rules.yml
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sagaz.errors import SagazError
from sagaz.testing.kafka import _die_with_parent, free_port

DEFAULT_BINARY = "/usr/bin/prometheus"
_DURATION = re.compile(r"(?:\d+y)?(?:\d+w)?(?:\d+d)?(?:\d+h)?(?:\d+m)?(?:\d+s)?(?:\d+ms)?")
_JOB = re.compile(r"[a-zA-Z_][a-zA-Z0-9_.:-]*")


class PrometheusToolError(SagazError, RuntimeError):
    """The server could not be found, started or asked; the message says what to do."""


def find_binary(name: str = "prometheus") -> str | None:
    """``name`` (prometheus or promtool) on PATH, else in /usr/bin, else None."""
    found = shutil.which(name)
    if found:
        return found
    path = f"/usr/bin/{name}"
    return path if os.access(path, os.X_OK) else None


def _check_targets(targets: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if not isinstance(targets, Mapping):
        raise TypeError(f"targets must map a job name to a list of 'host:port', got "
                        f"{targets!r}")
    out: dict[str, list[str]] = {}
    for job, addresses in targets.items():
        if not isinstance(job, str) or not _JOB.fullmatch(job):
            raise ValueError(f"job names must be words like 'sagaz-outbox-worker', got {job!r}")
        if isinstance(addresses, str) or not isinstance(addresses, Sequence) or not addresses:
            raise ValueError(f"job {job!r}: give a non-empty list of 'host:port', got "
                             f"{addresses!r}")
        for address in addresses:
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"job {job!r}: {address!r} is not 'host:port'")
        out[job] = [str(a) for a in addresses]
    return out


def _check_duration(name: str, value: str) -> str:
    if not isinstance(value, str) or not value or not _DURATION.fullmatch(value):
        raise ValueError(f"{name} must be a Prometheus duration such as '1s' or '500ms', "
                         f"got {value!r}")
    return value


class LocalPrometheus:
    """One Prometheus server on 127.0.0.1. Use as a context manager or start()/stop()."""

    def __init__(self, targets: Mapping[str, Sequence[str]] | None = None, *,
                 rule_files: Sequence[str | os.PathLike[str]] = (), port: int | None = None,
                 scrape_interval: str = "1s", evaluation_interval: str = "1s",
                 binary: str | None = None) -> None:
        """``targets``: job name -> ["host:port", ...] scraped at /metrics over HTTP.
        ``rule_files``: Prometheus rules files, loaded at start."""
        self.targets = _check_targets(targets or {})
        self.rule_files = [Path(f).resolve() for f in rule_files]
        for f in self.rule_files:
            if not f.is_file():
                raise FileNotFoundError(f"rule file {f} does not exist")
        self.scrape_interval = _check_duration("scrape_interval", scrape_interval)
        self.evaluation_interval = _check_duration("evaluation_interval", evaluation_interval)
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 0 < port < 65536):
            raise ValueError(f"port must be a TCP port, got {port!r}")
        self.port = port or free_port()
        self.binary = binary
        self.workdir = Path(tempfile.mkdtemp(prefix="sagaz-prometheus-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "prometheus.log"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval,
                       "scrape_timeout": self.scrape_interval,
                       "evaluation_interval": self.evaluation_interval},
            "rule_files": [str(f) for f in self.rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addresses}]}
                               for job, addresses in self.targets.items()],
        }

    def start(self, timeout: float = 30) -> LocalPrometheus:
        binary = self.binary or find_binary("prometheus")
        if binary is None:
            raise PrometheusToolError("prometheus not found: apt-get install prometheus "
                                      "(Debian), or pass binary=")
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))
        t0 = time.monotonic()
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                preexec_fn=_die_with_parent)
        while time.monotonic() - t0 < timeout:
            code = self.proc.poll()
            if code is not None:
                log_text = self.log()
                self.stop()
                raise PrometheusToolError(f"prometheus exited with status {code}:\n"
                                          f"{log_text[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        self.started_in = time.monotonic() - t0
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        log_text = self.log()
        self.stop()
        raise PrometheusToolError(f"prometheus did not become ready within {timeout}s:\n"
                                  f"{log_text[-4000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the HTTP API -----------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>: its ``data``, or PrometheusToolError with Prometheus's error."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400/422/503 carry an error body
            body = json.loads(exc.read() or b"{}")
        except (OSError, urllib.error.URLError) as exc:
            raise PrometheusToolError(f"prometheus at {self.url} did not answer "
                                      f"/api/v1/{path}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusToolError(f"/api/v1/{path} {params}: {body.get('errorType')}: "
                                      f"{body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The samples of an instant query: [{"metric": {labels}, "value": [ts, "v"]}]."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts: [{"labels", "annotations", "state", "value", ...}]."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts()
                if a["labels"].get("alertname") == alertname and a["state"] == "firing"]

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups; each rule has ``health`` ("ok", "err", "unknown") and
        ``lastError``."""
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def targets_health(self) -> dict[str, list[str]]:
        """job -> the ``health`` of each of its active targets ("up", "down", "unknown")."""
        out: dict[str, list[str]] = {}
        for t in self.api("targets")["activeTargets"]:
            out.setdefault(t["labels"]["job"], []).append(t["health"])
        return out

    def wait_for(self, check: Callable[[], Any], timeout: float = 30,
                 what: str = "the condition") -> Any:
        """Call ``check`` until it returns something true; that, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            got = check()
            if got:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not happen within {timeout}s")
            time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sagaz.testing.prometheus")
    sub = ap.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run a Prometheus server until Ctrl-C")
    start.add_argument("--target", action="append", default=[], metavar="JOB=HOST:PORT")
    start.add_argument("--rules", action="append", default=[], metavar="FILE")
    start.add_argument("--port", type=int)
    args = ap.parse_args(argv)
    targets: dict[str, list[str]] = {}
    for spec in args.target:
        job, sep, address = spec.partition("=")
        if not sep:
            ap.error(f"--target takes JOB=HOST:PORT, got {spec!r}")
        targets.setdefault(job, []).append(address)
    with LocalPrometheus(targets, rule_files=args.rules, port=args.port) as prom:
        print(f"prometheus at {prom.url} (Ctrl-C stops it)", flush=True)
        try:
            while prom.proc is not None and prom.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
