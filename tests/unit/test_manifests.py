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
K8S = ROOT / "k8s"


def manifest_files() -> list[Path]:
    """Every manifest in k8s/ and its subdirectories (optional/, prometheus-adapter/), not
    the kustomize files and not k8s/monitoring/ (the alerts and dashboard change's)."""
    return sorted(p for p in K8S.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and p.relative_to(K8S).parts[0]
                  not in ("monitoring", "schemas"))


DOCS = [d for f in manifest_files() for d in yaml.safe_load_all(f.read_text()) if d]


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


# -- the whole deployment: every workload (sagaz's and PostgreSQL), autoscaling, monitoring,
# network policies. Static checks of what kubeconform cannot see: names that must agree.

WORKLOAD_KINDS = ("StatefulSet", "Deployment", "Job", "DaemonSet")
# labels prometheus-operator puts on every target of a ServiceMonitor
TARGET_LABELS = {"namespace", "service", "pod", "container", "endpoint", "job", "instance"}


def docs_of(kind: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name)


def workloads() -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] in WORKLOAD_KINDS]


def all_containers() -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec, container) for every container of every workload, any image."""
    return [(d, d["spec"]["template"]["spec"], c) for d in workloads()
            for c in d["spec"]["template"]["spec"]["containers"]]


ALL_IDS = [f"{d['kind']}/{d['metadata']['name']}/{c['name']}" for d, _, c in all_containers()]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if (op == "In" and labels.get(key) not in values) or \
                (op == "NotIn" and labels.get(key) in values) or \
                (op == "Exists" and key not in labels) or \
                (op == "DoesNotExist" and key in labels):
            return False
    return True


def pod_labels() -> list[tuple[dict[str, Any], dict[str, str]]]:
    return [(d, d["spec"]["template"]["metadata"]["labels"]) for d in workloads()]


def selected(selector: dict[str, Any]) -> list[dict[str, Any]]:
    """The workloads whose pods ``selector`` selects."""
    return [d for d, labels in pod_labels() if matches(selector, labels)]


def component(container: dict[str, Any]) -> str | None:
    """The catalogue component a sagaz container exposes metrics of."""
    if not container["image"].startswith("sagaz:"):
        return None
    args = build_parser().parse_args(container["args"])
    return {"worker": "worker", "participant": "participant",
            "outbox": "outbox"}.get(args.command)


def families_of(comp: str) -> list[Any]:
    from sagaz import metrics
    comps = {comp, metrics.ENGINE_OR_WORKER} if comp == metrics.WORKER else {comp}
    return [f for f in metrics.CATALOGUE.values() if f.component in comps]


def test_the_kustomization_deploys_every_manifest_and_the_monitoring_directory() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")
             if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")}
    resources = set(kustomization["resources"])
    assert files | {"monitoring"} == resources, files ^ (resources - {"monitoring"})
    assert kustomization["namespace"] == "sagaz"
    assert (K8S / "monitoring" / "kustomization.yaml").exists()
    # the KEDA alternative is a Component, off by default
    assert "components" not in kustomization
    keda = yaml.safe_load((K8S / "optional" / "keda" / "kustomization.yaml").read_text())
    assert keda["kind"] == "Component"


@pytest.mark.parametrize(("workload", "pod", "container"), all_containers(), ids=ALL_IDS)
def test_every_container_is_locked_down(
        workload: dict[str, Any], pod: dict[str, Any], container: dict[str, Any]) -> None:
    """PostgreSQL too: non-root, read-only root, no capabilities, RuntimeDefault seccomp
    (the Pod Security "restricted" profile the namespace enforces)."""
    pod_ctx = pod.get("securityContext", {})
    ctx = {**pod_ctx, **container.get("securityContext", {})}
    assert ctx.get("runAsNonRoot") is True
    assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0
    assert isinstance(pod_ctx.get("fsGroup"), int)
    assert ctx.get("readOnlyRootFilesystem") is True
    assert ctx.get("allowPrivilegeEscalation") is False
    assert ctx.get("capabilities", {}).get("drop") == ["ALL"]
    assert not ctx.get("capabilities", {}).get("add")
    assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False
    assert pod.get("enableServiceLinks") is False  # no <SERVICE>_PORT next to SAGAZ_*
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"] for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    assert "/tmp" in mounts
    assert set(mounts.values()) <= volumes | claims


@pytest.mark.parametrize(("workload", "pod", "container"), all_containers(), ids=ALL_IDS)
def test_every_container_has_resources_and_every_server_probes(
        workload: dict[str, Any], pod: dict[str, Any], container: dict[str, Any]) -> None:
    resources = container.get("resources", {})
    assert {"cpu", "memory"} <= set(resources.get("requests", {}))
    assert {"cpu", "memory"} <= set(resources.get("limits", {}))
    if workload["kind"] != "Job":
        assert "readinessProbe" in container and "livenessProbe" in container


def test_updates_keep_a_quorum() -> None:
    for d in docs_of("Deployment"):
        strategy = d["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, d["metadata"]["name"]
        assert strategy["rollingUpdate"]["maxSurge"] >= 1
    for d in docs_of("StatefulSet"):
        assert d["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    orchestrator = named("StatefulSet", "sagaz-orchestrator")["spec"]
    assert orchestrator["updateStrategy"]["rollingUpdate"]["partition"] == 0
    assert orchestrator.get("podManagementPolicy", "OrderedReady") == "OrderedReady"
    for pdb in docs_of("PodDisruptionBudget"):
        targets = selected(pdb["spec"]["selector"])
        assert len(targets) == 1 and targets[0]["kind"] != "Job", pdb["metadata"]["name"]
        assert pdb["spec"]["maxUnavailable"] == 1
    covered = {pdb["metadata"]["name"] for pdb in docs_of("PodDisruptionBudget")}
    assert covered == {"sagaz-orchestrator", "sagaz-participant-payments",
                       "sagaz-outbox-worker"}


def test_postgresql_keeps_its_data_on_20gi_with_credentials_from_a_secret() -> None:
    sts = named("StatefulSet", "sagaz-postgres")
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": "sagaz-postgres"}} in container["envFrom"]
    env = {e["name"]: e for e in container.get("env", [])}
    assert not {"POSTGRES_PASSWORD", "POSTGRES_USER"} & set(env)
    data = next(m["mountPath"] for m in container["volumeMounts"]
                if m["name"] == claim["metadata"]["name"])
    assert env["PGDATA"]["value"].startswith(data + "/")
    service = named("Service", sts["spec"]["serviceName"])
    assert matches({"matchLabels": service["spec"]["selector"]},
                   sts["spec"]["template"]["metadata"]["labels"])


def example_secrets() -> dict[str, dict[str, str]]:
    out = {}
    for path in sorted(K8S.glob("*.example.yaml")):
        text = path.read_text()
        assert all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines())
        example = text[text.index("# apiVersion:"):]
        for doc in yaml.safe_load_all("\n".join(re.sub(r"^# ?", "", line)
                                                for line in example.splitlines())):
            assert doc["kind"] == "Secret"
            out[doc["metadata"]["name"]] = doc["stringData"]
    return out


def test_every_secret_the_manifests_use_has_a_commented_example_with_placeholders() -> None:
    examples = example_secrets()
    for _, _, c in all_containers():
        for ref in [e["secretRef"] for e in c.get("envFrom", []) if "secretRef" in e]:
            assert ref["name"] in examples, f"no example of the Secret {ref['name']}"
        for var in c.get("env", []):
            key_ref = var.get("valueFrom", {}).get("secretKeyRef")
            if key_ref:
                assert key_ref["key"] in examples[key_ref["name"]], key_ref
    for name, data in examples.items():
        for key, value in data.items():
            if "PASSWORD" in key or re.search(r"://[^/@]+:[^/@]*@", value):  # user:pw@
                assert "<" in value, f"{name}.{key} must be a placeholder"
    # the URLs name the PostgreSQL this deployment runs, as its Secret defines it
    pg = examples["sagaz-postgres"]
    service = named("Service", "sagaz-postgres")
    expected = (f"postgresql://{pg['POSTGRES_USER']}:<password>@sagaz-postgres:"
                f"{service['spec']['ports'][0]['port']}/{pg['POSTGRES_DB']}")
    assert examples["sagaz-db"]["url"] == expected
    assert examples["sagaz-outbox"]["SAGAZ_STORAGE_URL"] == expected


def hpa(name: str) -> dict[str, Any]:
    return named("HorizontalPodAutoscaler", name)["spec"]


def metric_names(promql: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers followed by a label matcher."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", promql))


def test_autoscalers_use_catalogue_metrics_within_the_page_and_partition_bounds() -> None:
    from sagaz import metrics
    for d in docs_of("HorizontalPodAutoscaler"):
        spec = d["spec"]
        target = named(spec["scaleTargetRef"]["kind"], spec["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"], "a re-apply would reset the autoscaler"
        for m in spec["metrics"]:
            metric = m["external"]["metric"]
            family = metrics.CATALOGUE[metric["name"]]  # KeyError: not a sagaz metric
            assert set(metric.get("selector", {}).get("matchLabels", {})) <= set(family.labels)
    outbox = hpa("sagaz-outbox-worker")
    assert (outbox["minReplicas"], outbox["maxReplicas"]) == (3, 10)  # the page's 3-10
    assert outbox["metrics"][0]["external"]["metric"]["name"] == "outbox_pending_events_total"
    participant = hpa("sagaz-participant-payments")
    assert participant["metrics"][0]["external"]["metric"]["name"] == \
        "saga_participant_consumer_lag"
    # a participant beyond its command topic's partitions would get none
    partitions = int(named("ConfigMap", "sagaz")["data"]["SAGAZ_PARTITIONS"])
    assert participant["maxReplicas"] <= partitions


def test_prometheus_adapter_serves_every_external_metric_the_autoscalers_ask_for() -> None:
    from sagaz import metrics
    config = yaml.safe_load(named("ConfigMap", "adapter-config")["data"]["config.yaml"])
    served = {}
    for rule in config["externalRules"]:
        (series,) = metric_names(rule["seriesQuery"])
        family = metrics.CATALOGUE[series]
        labels = set(re.findall(r"([a-zA-Z_]+)!?=", rule["seriesQuery"]))
        assert labels <= set(family.labels) | TARGET_LABELS, labels
        assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
        served[rule["name"]["as"]] = rule
    # every outbox worker reports the whole table: the max; lag is per partition: the sum
    assert served["outbox_pending_events_total"]["metricsQuery"].startswith("max ")
    assert served["saga_participant_consumer_lag"]["metricsQuery"].startswith("sum ")
    for d in docs_of("HorizontalPodAutoscaler"):
        for m in d["spec"]["metrics"]:
            assert m["external"]["metric"]["name"] in served


def test_the_keda_alternative_scales_like_the_autoscalers() -> None:
    from sagaz import metrics
    for so in docs_of("ScaledObject"):
        name = so["metadata"]["name"]
        assert named("Deployment", so["spec"]["scaleTargetRef"]["name"])
        same = hpa(name)
        assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == \
            (same["minReplicas"], same["maxReplicas"])
        for trigger in so["spec"]["triggers"]:
            names = metric_names(trigger["metadata"]["query"])
            assert names and all(n in metrics.CATALOGUE for n in names), names
            assert trigger["metadata"]["threshold"] == \
                same["metrics"][0]["external"]["target"]["averageValue"]


def scraped() -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]]:
    """(ServiceMonitor, endpoint, container, container port) for every scraped container."""
    out = []
    for sm in docs_of("ServiceMonitor"):
        services = [s for s in docs_of("Service")
                    if matches(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        assert len(services) == 1, f"{sm['metadata']['name']} selects {len(services)} Services"
        service = services[0]
        targets = selected({"matchLabels": service["spec"]["selector"]})
        assert targets, f"Service {service['metadata']['name']} selects no pod"
        for endpoint in sm["spec"]["endpoints"]:
            port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
            target_port = port.get("targetPort", port["port"])
            for workload in targets:
                for c in workload["spec"]["template"]["spec"]["containers"]:
                    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                    number = ports.get(target_port) if isinstance(target_port, str) \
                        else target_port
                    if number in ports.values():
                        out.append((sm, endpoint, c, number))
    return out


def test_service_monitors_scrape_the_metrics_port_of_every_sagaz_process() -> None:
    found = {(sm["metadata"]["name"], c["name"]) for sm, _, c, _ in scraped()}
    assert found == {("sagaz-orchestrator", "worker"), ("sagaz-participant-payments",
                     "participant"), ("sagaz-outbox-worker", "outbox")}
    for sm, endpoint, container, port in scraped():
        assert endpoint["path"] == "/metrics"
        # /metrics is served by the same server as the health probes
        probe_port = container["readinessProbe"]["httpGet"]["port"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get(probe_port, probe_port) == port
        # the job label (the Service name) carries the word the alert rules look for
        word = {"worker": "orchestrator", "participant": "participant",
                "outbox": "outbox"}[component(container) or ""]
        assert word in sm["metadata"]["name"]
        # a metric label named like a target label is renamed exported_<name> unless the
        # endpoint honours the scraped labels; the autoscaler selects service="payments"
        clash = {lb for f in families_of(component(container) or "") for lb in f.labels} & \
            TARGET_LABELS
        assert bool(endpoint.get("honorLabels")) == bool(clash), (sm["metadata"]["name"], clash)


def test_network_policies_select_existing_pods_and_let_prometheus_and_peers_in() -> None:
    policies = docs_of("NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and p["spec"]["policyTypes"] == ["Ingress"]
               and not p["spec"].get("ingress") for p in policies), "no default deny"

    def allowed(workload: dict[str, Any], port: int, peer_labels: dict[str, str],
                peer_namespace: str) -> bool:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for p in policies:
            if not matches(p["spec"]["podSelector"], labels):
                continue
            for rule in p["spec"].get("ingress", []):
                if port not in {x["port"] for x in rule.get("ports", [])}:
                    continue
                for peer in rule.get("from", []):
                    ns_sel = peer.get("namespaceSelector")
                    ns_ok = (peer_namespace == "sagaz") if ns_sel is None else matches(
                        ns_sel, {"kubernetes.io/metadata.name": peer_namespace})
                    if ns_ok and matches(peer.get("podSelector", {}), peer_labels):
                        return True
        return False

    for p in policies:
        if p["spec"]["podSelector"]:
            assert selected(p["spec"]["podSelector"]), f"{p['metadata']['name']} selects none"
        for rule in p["spec"].get("ingress", []):
            ports = {x["port"] for x in rule["ports"]}
            for d in selected(p["spec"]["podSelector"]):
                served = {cp["containerPort"] for c in
                          d["spec"]["template"]["spec"]["containers"] for cp in c["ports"]}
                assert ports <= served, (p["metadata"]["name"], ports, served)
            for peer in rule.get("from", []):
                if "namespaceSelector" not in peer:  # a peer in this namespace: must exist
                    assert selected(peer["podSelector"]), p["metadata"]["name"]
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    for sm, _, container, port in scraped():
        owner = next(d for d in workloads()
                     if container in d["spec"]["template"]["spec"]["containers"])
        assert allowed(owner, port, prometheus, "monitoring"), sm["metadata"]["name"]
        assert not allowed(owner, port, {"app": "someone-else"}, "sagaz")
    orchestrator = named("StatefulSet", "sagaz-orchestrator")
    peer = orchestrator["spec"]["template"]["metadata"]["labels"]
    assert allowed(orchestrator, 6066, peer, "sagaz"), "workers route to each other"
    # PostgreSQL: from every pod that uses the database, from nothing outside sagaz
    postgres = named("StatefulSet", "sagaz-postgres")
    for d in workloads():
        refs = {e.get("secretRef", {}).get("name") for c in
                d["spec"]["template"]["spec"]["containers"] for e in c.get("envFrom", [])}
        refs |= {v["valueFrom"]["secretKeyRef"]["name"] for c in
                 d["spec"]["template"]["spec"]["containers"] for v in c.get("env", [])
                 if "secretKeyRef" in v.get("valueFrom", {})}
        if refs & {"sagaz-db", "sagaz-outbox"}:
            assert allowed(postgres, 5432, d["spec"]["template"]["metadata"]["labels"],
                           "sagaz"), d["metadata"]["name"]
    assert not allowed(postgres, 5432, {"app": "someone-else"}, "sagaz")
    assert not allowed(postgres, 5432, prometheus, "monitoring")
