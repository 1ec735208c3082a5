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
