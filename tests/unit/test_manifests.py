"""The k8s manifests and the Dockerfile name commands, settings and files that exist.

No Docker engine or cluster here; this catches what drifts: an argument the CLI no longer
accepts, a setting the worker rejects, a path the image build would miss.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sagaz.cli import build_parser
from streams.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = [d for f in sorted((ROOT / "k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text()) if d]


def containers() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for doc in DOCS:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for c in pod.get("containers", []):
            if c["image"].startswith("sagaz:"):
                out.append((doc["metadata"]["name"], c))
    return out


def pods() -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) for every sagaz container of every workload."""
    out = []
    for doc in DOCS:
        if doc["kind"] in ("StatefulSet", "Deployment", "Job", "DaemonSet", "CronJob"):
            pod = doc["spec"]["template"]["spec"]
            out.extend((doc, pod, c) for c in pod["containers"]
                       if c["image"].startswith("sagaz:"))
    return out


POD_IDS = [f"{d['kind']}/{d['metadata']['name']}/{c['name']}" for d, _, c in pods()]
LONG_RUNNING = [(d, p, c) for d, p, c in pods() if d["kind"] in ("StatefulSet", "Deployment")]
LONG_RUNNING_IDS = [f"{d['metadata']['name']}/{c['name']}" for d, _, c in LONG_RUNNING]


def dockerfile() -> str:
    return (ROOT / "docker" / "Dockerfile").read_text()


def image_env() -> dict[str, str]:
    """ENV name=value pairs of the Dockerfile (the environment every container starts with)."""
    env: dict[str, str] = {}
    for line in dockerfile().splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line[4:].split())
    return env


def talks_to_kafka(container: dict[str, Any]) -> bool:
    args = build_parser().parse_args(container["args"])
    return args.command in ("worker", "participant") or (
        args.command == "outbox" and args.outbox_command == "run")


def test_every_manifest_parses_and_names_its_kind() -> None:
    kinds = {d["kind"] for d in DOCS}
    assert {"ConfigMap", "StatefulSet", "Deployment", "Job", "Service"} <= kinds


@pytest.mark.parametrize(("name", "container"), containers(), ids=lambda v: str(v)[:30])
def test_container_args_are_accepted_by_the_cli(name: str, container: dict[str, Any]) -> None:
    args = build_parser().parse_args(container["args"])  # SystemExit on a stale argument
    assert callable(args.fn)


def test_the_orchestrator_settings_in_the_manifests_are_valid() -> None:
    config = next(d for d in DOCS if d["kind"] == "ConfigMap" and d["metadata"]["name"] ==
                  "sagaz")["data"]
    worker = next(c for n, c in containers() if n == "sagaz-orchestrator")
    env = dict(config)
    for var in worker.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(POD_NAME\)", "sagaz-orchestrator-0", var["value"])
    settings = Settings.from_env(env)
    assert settings.retention == 604800 and settings.partitions == 8
    assert settings.worker_id == "sagaz-orchestrator-0"


def test_the_dockerfile_copies_paths_that_exist() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"


@pytest.mark.parametrize(("workload", "pod", "container"), pods(), ids=POD_IDS)
def test_every_pod_runs_unprivileged_on_a_read_only_root(
        workload: dict[str, Any], pod: dict[str, Any], container: dict[str, Any]) -> None:
    # the container's securityContext overrides the pod's, field by field
    ctx = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    assert ctx.get("runAsNonRoot") is True
    assert ctx.get("runAsUser") == 10001 and ctx.get("runAsGroup") == 10001
    assert pod.get("securityContext", {}).get("fsGroup") == 10001  # pod-level only
    assert ctx.get("readOnlyRootFilesystem") is True
    assert ctx.get("allowPrivilegeEscalation") is False
    assert ctx.get("capabilities", {}).get("drop") == ["ALL"]
    assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}
    # read-only root: every path the process writes is a volume
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for path, name in mounts.items():
        assert name in volumes or name in claims, f"{path} mounts unknown volume {name}"
    if build_parser().parse_args(container["args"]).command == "worker":
        datadir = image_env()["SAGAZ_DATADIR"]
        assert mounts.get(datadir) in claims, f"RocksDB datadir {datadir} is not a volume"


@pytest.mark.parametrize(("workload", "pod", "container"), pods(), ids=POD_IDS)
def test_every_pod_has_resource_requests_and_limits(
        workload: dict[str, Any], pod: dict[str, Any], container: dict[str, Any]) -> None:
    resources = container.get("resources", {})
    assert {"cpu", "memory"} <= set(resources.get("requests", {}))
    assert {"cpu", "memory"} <= set(resources.get("limits", {}))


@pytest.mark.parametrize(("workload", "pod", "container"), LONG_RUNNING, ids=LONG_RUNNING_IDS)
def test_every_long_running_pod_has_health_probes_on_a_served_port(
        workload: dict[str, Any], pod: dict[str, Any], container: dict[str, Any]) -> None:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    args = build_parser().parse_args(container["args"])
    if args.command == "worker":
        served = Settings(web_port=ports["http"]).web_port  # the worker's web server
    else:  # participant, outbox run: sagaz.health on --metrics-port, on every interface
        served = args.metrics_port
        assert args.metrics_host == "0.0.0.0", "a probe cannot reach 127.0.0.1 in the pod"
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert port == served, f"{probe} checks port {port}, the process serves {served}"


@pytest.mark.parametrize(("workload", "pod", "container"), pods(), ids=POD_IDS)
def test_kafka_credentials_come_from_the_optional_sagaz_kafka_secret(
        workload: dict[str, Any], pod: dict[str, Any], container: dict[str, Any]) -> None:
    refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
    kafka = [r for r in refs if r["name"] == "sagaz-kafka"]
    if talks_to_kafka(container):
        assert kafka == [{"name": "sagaz-kafka", "optional": True}]
    else:
        assert kafka == []
    for var in container.get("env", []):  # no credential written into a manifest
        assert not var["name"].startswith("SAGAZ_KAFKA_SASL") or "valueFrom" in var


KAFKA_SETTINGS = {"SAGAZ_KAFKA_SECURITY_PROTOCOL", "SAGAZ_KAFKA_SASL_MECHANISM",
                  "SAGAZ_KAFKA_SASL_USERNAME", "SAGAZ_KAFKA_SASL_PASSWORD",
                  "SAGAZ_KAFKA_SSL_CAFILE", "SAGAZ_KAFKA_SSL_CERTFILE",
                  "SAGAZ_KAFKA_SSL_KEYFILE", "SAGAZ_KAFKA_SSL_KEY_PASSWORD"}


def test_the_example_kafka_secret_is_commented_out_and_names_the_settings() -> None:
    text = (ROOT / "k8s" / "kafka-secret.example.yaml").read_text()
    assert all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())
    # uncommented once: the Secret a user would create from it
    example = text[text.index("# apiVersion:"):]
    secret = yaml.safe_load("\n".join(re.sub(r"^# ?", "", line)
                                      for line in example.splitlines()))
    assert secret["kind"] == "Secret" and secret["apiVersion"] == "v1"
    assert secret["metadata"]["name"] == "sagaz-kafka"
    data = secret["stringData"]
    assert set(data) <= KAFKA_SETTINGS and "SAGAZ_KAFKA_SASL_PASSWORD" in data
    assert data["SAGAZ_KAFKA_SASL_PASSWORD"].startswith("<")  # a placeholder, not a value
    commented = set(re.findall(r"SAGAZ_KAFKA_[A-Z_]+", text))
    assert commented <= KAFKA_SETTINGS, commented - KAFKA_SETTINGS


def test_the_orchestrator_binds_every_interface_and_advertises_its_pod_name() -> None:
    service = next(d for d in DOCS if d["kind"] == "Service" and
                   d["metadata"]["name"] == "sagaz-orchestrator")
    # peers resolve each other while starting and rebalancing, before they are ready
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    worker = next(c for n, c in containers() if n == "sagaz-orchestrator")
    env = {v["name"]: v["value"] for v in worker["env"] if "value" in v}
    pod = "sagaz-orchestrator-0"
    settings = Settings.from_env({k: v.replace("$(POD_NAME)", pod) for k, v in env.items()})
    assert settings.web_bind == "0.0.0.0"
    assert settings.canonical_url == f"http://{pod}.sagaz-orchestrator:6066"


def test_the_image_runs_as_the_manifests_user_with_its_writable_paths() -> None:
    text = dockerfile()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users[-1] == "10001:10001"
    assert "--uid 10001" in text and "--gid 10001" in text
    datadir = image_env()["SAGAZ_DATADIR"]
    assert f"chown 10001:10001 {datadir}" in text
    volumes = next(line for line in text.splitlines() if line.startswith("VOLUME "))
    assert datadir in volumes and "/tmp" in volumes
