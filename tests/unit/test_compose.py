"""docker/compose.yaml, the local stack, is checked without a Docker engine: against the
compose specification's JSON schema (vendored from compose-go, docker/schemas/), and for
what the schema cannot see: commands the CLI accepts, settings the worker accepts, mounts
of files that exist, and Prometheus and Grafana configured for the services that exist.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from sagaz.cli import build_parser
from streams.config import Settings, load_sagas
from streams.orchestrator import participant_of

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# written by the alerts-and-dashboard change in k8s/monitoring/; mounted from there
MONITORING_FILES = {ROOT / "k8s" / "monitoring" / "sagaz-alerts.rules.yml",
                    ROOT / "k8s" / "monitoring" / "sagaz-dashboard.json"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the x-* anchors and << merges


def sagaz_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items()
            if str(s.get("image", "")).startswith("sagaz:")}


def binds(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of every bind mount (short syntax, relative host path)."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((COMPOSE.parent / source).resolve(), target))
    return out


def environment(service: dict[str, Any]) -> dict[str, str]:
    """What the process sees: the image's ENV (docker/Dockerfile), then the service's."""
    env: dict[str, str] = {}
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split())
    env.update({k: str(v) for k, v in service.get("environment", {}).items()})
    return env


def served_port(service: dict[str, Any]) -> int:
    args = build_parser().parse_args(service["command"])
    if args.command == "worker":
        return Settings.from_env(environment(service)).web_port
    return int(args.metrics_port)


def test_compose_file_matches_the_compose_specification() -> None:
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        message = "check-jsonschema is not installed (pip install -e '.[dev]')"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile",
                          str(DOCKER / "schemas" / "compose-spec.json"), str(COMPOSE)],
                         capture_output=True, text=True, timeout=120)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr


def test_check_jsonschema_rejects_what_the_specification_does_not_allow(tmp_path: Path) -> None:
    pytest.importorskip("check_jsonschema")
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace('    restart: "no"\n',
                                               '    restart: "no"\n    restart_policy: x\n'))
    out = subprocess.run([sys.executable, "-m", "check_jsonschema", "--schemafile",
                          str(DOCKER / "schemas" / "compose-spec.json"), str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "restart_policy" in out.stdout


def test_the_stack_has_every_part() -> None:
    services = compose()["services"]
    commands = {n: build_parser().parse_args(s["command"]) for n, s in sagaz_services().items()}
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"].startswith("postgres:")
    assert {"prometheus", "grafana"} <= set(services)
    what = {(a.command, getattr(a, "db_command", None) or getattr(a, "outbox_command", None))
            for a in commands.values()}
    assert {("worker", None), ("participant", None), ("db", "migrate"),
            ("outbox", "run")} <= what
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper


def test_every_participant_of_the_example_saga_runs() -> None:
    """The stack runs the `order` saga end to end: each of its participants has a service."""
    order = next(s for s in load_sagas(["streams.examples"]) if s.name == "order")
    needed = {participant_of(order, step) for step in order.steps}
    running = {build_parser().parse_args(s["command"]).service
               for s in sagaz_services().values()
               if build_parser().parse_args(s["command"]).command == "participant"}
    assert needed <= running, needed - running


@pytest.mark.parametrize("name", sorted(sagaz_services()))
def test_sagaz_services_run_like_the_k8s_pods(name: str) -> None:
    service = sagaz_services()[name]
    args = build_parser().parse_args(service["command"])  # SystemExit on a stale argument
    assert callable(args.fn)
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert "user" not in service  # the image's uid 10001
    build = service["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == \
        DOCKER / "Dockerfile"
    if args.command == "worker":
        settings = Settings.from_env(environment(service))
        assert settings.web_bind == "0.0.0.0" and settings.web_host == name
        datadir = settings.datadir
        assert any(v.endswith(f":{datadir}") for v in service["volumes"]), "tables on a volume"
    if args.command in ("participant",) or (args.command == "outbox"):
        assert args.metrics_host == "0.0.0.0", "Prometheus scrapes from another container"
    if args.command == "participant":
        assert args.datadir in service["tmpfs"]  # writable on the read-only root


def test_every_mounted_file_exists() -> None:
    monitoring_landed = any(p.name != "kustomization.yaml"
                            for p in (ROOT / "k8s" / "monitoring").iterdir())
    for name, service in compose()["services"].items():
        for source, _ in binds(service):
            if source in MONITORING_FILES and not monitoring_landed:
                continue  # k8s/monitoring/ is another change's; checked once it is there
            assert source.exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_scrapes_every_sagaz_process_on_its_metrics_port() -> None:
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {t: job["job_name"] for job in config["scrape_configs"]
               for sc in job["static_configs"] for t in sc["targets"]}
    long_running = {n: s for n, s in sagaz_services().items()
                    if build_parser().parse_args(s["command"]).command != "db"}
    for name, service in long_running.items():
        target = f"{name}:{served_port(service)}"
        assert target in targets, f"{name} is not scraped at {target}"
        # the alert rules find the processes by these words in the job name
        word = {"worker": "orchestrator", "participant": "participant",
                "outbox": "outbox"}[build_parser().parse_args(service["command"]).command]
        assert word in targets[target]
    services = compose()["services"]
    for target in targets:
        host = target.split(":")[0]
        assert host == "localhost" or host in services, f"no service {host}"


def test_prometheus_loads_the_mounted_rules_and_grafana_the_mounted_dashboard() -> None:
    services = compose()["services"]
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    prom_mounts = dict((t, s) for s, t in binds(services["prometheus"]))
    config_dir = next(PurePosixPath(t).parent for t, s in prom_mounts.items()
                      if s == DOCKER / "prometheus" / "prometheus.yml")
    assert f"--config.file={config_dir}/prometheus.yml" in services["prometheus"]["command"]
    rules = [t for t, s in prom_mounts.items() if s.name == "sagaz-alerts.rules.yml"]
    assert rules and all(any(fnmatch.fnmatch(r, str(config_dir / g))
                             for g in config["rule_files"]) for r in rules)

    provisioning = DOCKER / "grafana" / "provisioning"
    graf_mounts = dict((t, s) for s, t in binds(services["grafana"]))
    assert graf_mounts["/etc/grafana/provisioning"] == provisioning
    dashboard = next(t for t, s in graf_mounts.items() if s.name == "sagaz-dashboard.json")
    providers = yaml.safe_load((provisioning / "dashboards" / "sagaz.yml").read_text())
    assert str(PurePosixPath(dashboard).parent) in {p["options"]["path"]
                                                     for p in providers["providers"]}
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    url = next(d["url"] for d in sources["datasources"] if d["type"] == "prometheus")
    assert url == "http://prometheus:9090" and "prometheus" in services


def test_promtool_accepts_the_prometheus_config_with_the_rules(tmp_path: Path) -> None:
    """promtool (Debian's prometheus package) checks the configuration and the rule files
    it loads, laid out as in the container."""
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool is not installed (apt-get install prometheus; .ci/run does)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    shutil.copy(DOCKER / "prometheus" / "prometheus.yml", tmp_path / "prometheus.yml")
    rules = ROOT / "k8s" / "monitoring" / "sagaz-alerts.rules.yml"
    if rules.exists():
        (tmp_path / "rules").mkdir()
        shutil.copy(rules, tmp_path / "rules" / rules.name)
    out = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=120)
    print(out.stdout, out.stderr)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr
