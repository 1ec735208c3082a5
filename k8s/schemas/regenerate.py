"""Regenerate the JSON schemas kubeconform validates k8s/ against, offline from registries.

Why vendored: CI has no network but the package registries, and kubeconform's default
schema location is a web site. So the schemas live here and tests/unit/test_k8s_validate.py
points kubeconform at them (``-schema-location k8s/schemas/{{ .ResourceKind }}{{ .KindSuffix
}}.json``); nothing is downloaded at test time.

Where they come from (pinned below; change a version, run this, commit the result):

- Kubernetes kinds: the PyPI package ``kubernetes-validate`` ships the Kubernetes OpenAPI
  converted to strict JSON schemas per Kubernetes version (``<version>-local-strict``: every
  object has ``additionalProperties: false``), each kind referring to one shared
  ``_definitions.json``. kubeconform needs standalone files, so each kind used here gets the
  definitions it reaches copied into its own ``$defs`` (the "standalone-strict" layout).
- CRDs: ServiceMonitor and PrometheusRule from prometheus-operator's CRD YAML
  (``example/prometheus-operator-crd/``), ScaledObject from KEDA's (``config/crd/bases/``),
  both read from their Go module zips (``go mod download``, i.e. the Go module proxy), and
  converted as kubeconform's ``scripts/openapi2jsonschema.py`` does (``additionalProperties:
  false`` on every object with properties, root included as with its
  DENY_ROOT_ADDITIONAL_PROPERTIES; int-or-string as string or integer).
- The compose specification (docker/schemas/compose-spec.json) from the Go module
  github.com/compose-spec/compose-go/v2 (``schema/compose-spec.json``), copied unchanged.

Descriptions are dropped (they do not validate anything and are most of the bytes).

    python k8s/schemas/regenerate.py            # needs go, pip and pyyaml
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_VALIDATE = "1.37.0"          # PyPI
KUBERNETES = "v1.33.0"                  # the oldest Kubernetes these manifests target
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
KEDA = "github.com/kedacore/keda/v2@v2.21.0"
COMPOSE_GO = "github.com/compose-spec/compose-go/v2@v2.16.2"

# (kind, file stem as kubeconform names it: kind + "-" + group's first part + "-" + version)
KINDS = ["namespace-v1", "configmap-v1", "secret-v1", "service-v1", "statefulset-apps-v1",
         "deployment-apps-v1", "job-batch-v1", "horizontalpodautoscaler-autoscaling-v2",
         "poddisruptionbudget-policy-v1", "networkpolicy-networking-v1"]
CRDS = [(PROMETHEUS_OPERATOR, "example/prometheus-operator-crd/"
                              "monitoring.coreos.com_servicemonitors.yaml"),
        (PROMETHEUS_OPERATOR, "example/prometheus-operator-crd/"
                              "monitoring.coreos.com_prometheusrules.yaml"),
        (KEDA, "config/crd/bases/keda.sh_scaledobjects.yaml")]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFS_PREFIX = "/api/_definitions.json#/$defs/"


def strip_descriptions(node: Any) -> Any:
    """Drop every schema ``description`` (a string); a property named description stays."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items()
                if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def standalone(kind: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """The kind's schema with every definition it reaches under its own ``$defs``."""
    needed: dict[str, Any] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "$ref" and isinstance(v, str):
                    name = v.removeprefix(DEFS_PREFIX).removeprefix("#/$defs/")
                    if name not in needed:
                        needed[name] = None          # mark before walking: cycles
                        needed[name] = walk(defs[name])
                    out[k] = "#/$defs/" + name
                else:
                    out[k] = walk(v)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    schema = walk({k: v for k, v in kind.items() if k != "$id"})
    schema["$defs"] = dict(sorted(needed.items()))
    return strip_descriptions(schema)


# -- kubeconform's scripts/openapi2jsonschema.py, the two conversions it applies

def additional_properties(data: Any, skip: bool = False) -> Any:
    if isinstance(data, dict):
        if "properties" in data and not skip and "additionalProperties" not in data:
            data["additionalProperties"] = False
        for v in data.values():
            additional_properties(v)
    elif isinstance(data, list):   # upstream skips lists; allOf/anyOf items are schemas too
        for v in data:
            additional_properties(v)
    return data


def replace_int_or_string(data: Any) -> Any:
    if isinstance(data, dict):
        if data.get("format") == "int-or-string":
            return {"oneOf": [{"type": "string"}, {"type": "integer"}]}
        return {k: replace_int_or_string(v) for k, v in data.items()}
    if isinstance(data, list):
        return [replace_int_or_string(v) for v in data]
    return data


def crd_schemas(text: str) -> dict[str, Any]:
    """{kubeconform file stem: JSON schema} for every version of every CRD in ``text``."""
    out = {}
    for doc in yaml.safe_load_all(text):
        if not doc or doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        group = spec["group"].split(".")[0]
        for version in spec["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            schema = replace_int_or_string(additional_properties(schema))
            stem = f"{spec['names']['kind']}-{group}-{version['name']}".lower()
            out[stem] = strip_descriptions(schema)
    return out


def go_module_dir(module: str) -> Path:
    info = json.loads(subprocess.run(["go", "mod", "download", "-json", module], check=True,
                                     capture_output=True, text=True).stdout)
    return Path(info["Dir"])


def write(path: Path, schema: Any) -> None:
    path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KiB)")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        f"kubernetes-validate=={KUBERNETES_VALIDATE}"], check=True)
        wheel = next(Path(tmp).glob("kubernetes_validate-*.whl"))
        base = f"kubernetes_validate/kubernetes-json-schema/{KUBERNETES}-local-strict/"
        with zipfile.ZipFile(wheel) as z:
            defs = json.loads(z.read(base + "_definitions.json"))["$defs"]
            for stem in KINDS:
                write(HERE / f"{stem}.json", standalone(json.loads(z.read(f"{base}{stem}.json")),
                                                        defs))
    for module, path in CRDS:
        for stem, schema in crd_schemas((go_module_dir(module) / path).read_text()).items():
            if stem.startswith(("servicemonitor-monitoring-v1", "prometheusrule-monitoring-v1",
                                "scaledobject-keda-v1alpha1")):
                write(HERE / f"{stem}.json", schema)
    compose = go_module_dir(COMPOSE_GO) / "schema" / "compose-spec.json"
    (ROOT / "docker" / "schemas").mkdir(exist_ok=True)
    target = ROOT / "docker" / "schemas" / "compose-spec.json"
    target.write_bytes(compose.read_bytes())
    print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
