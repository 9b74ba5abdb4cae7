"""Render the Kubernetes manifests of deploy/ and validate them against Kubernetes' schemas.

    python3 -m uv run python scripts/validate_manifests.py

Renders every kustomize overlay with ``kubectl kustomize`` (offline) and checks each resource
with kubernetes-validate (strict: unknown fields are errors) for the oldest Kubernetes we
support (1.27, where native gRPC probes became GA) and the newest it knows. The KServe
InferenceService is a custom resource without a schema there: it is checked against KServe's
published CRD schema (scripts/schemas/, strict as the API server's strict field validation:
unknown fields are errors), and its predictor as a core v1 Pod. The Prometheus Operator's
PodMonitor has no schema there either: its fields are checked against the ones the Operator's
API reference documents for monitoring.coreos.com/v1 (an unknown field is an error, as in
strict validation), its values' types and formats, and its label selector and metadata against
the core schema (as a PodDisruptionBudget's). CI runs this (.ci/run); tests/deploy checks what
the manifests say.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # comes with kubernetes-validate
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "secure")
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
KSERVE_SCHEMA = ROOT / "scripts" / "schemas" / "inferenceservice-v1beta1-v0.20.0.schema.json.gz"
VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def render(overlay: str) -> list[dict[str, Any]]:
    """The resources of one overlay, as ``kubectl kustomize`` renders them."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise SystemExit(
            "validate_manifests: kubectl is not on the PATH (kubectl kustomize renders)"
        )
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"validate_manifests: {overlay} does not render: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def kserve_as_pod() -> dict[str, Any]:
    """The InferenceService's predictor as a Pod, so the core schema can check its container."""
    service = yaml.safe_load(KSERVE.read_text())
    if service.get("apiVersion") != "serving.kserve.io/v1beta1":
        raise SystemExit(f"validate_manifests: {KSERVE.name} is not a v1beta1 InferenceService")
    predictor = service["spec"]["predictor"]
    pod_fields = ("containers", "initContainers", "volumes", "securityContext")
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": service["metadata"]["name"]},
        "spec": {name: predictor[name] for name in pod_fields if name in predictor},
    }


def _strict(schema: Any) -> Any:
    """A CRD schema where an object's unknown fields are errors (the API server prunes them
    silently, or refuses them under strict field validation), as kubernetes-validate's strict."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in strict
        and "additionalProperties" not in strict
        and not strict.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


def validate_kserve(service: dict[str, Any]) -> list[str]:
    """Errors of an InferenceService against KServe's v1beta1 CRD schema, one line each."""
    schema = _strict(json.loads(gzip.decompress(KSERVE_SCHEMA.read_bytes())))
    # The CRD's schema leaves metadata to the API server; check what it does not.
    validator = jsonschema.Draft7Validator(schema)
    errors = []
    for error in sorted(validator.iter_errors(service), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in error.path)
        errors.append(f"kserve: InferenceService (KServe v0.20.0 schema): {path}: {error.message}")
    return errors


# PodMonitor (monitoring.coreos.com/v1), from the Prometheus Operator's API reference: the
# fields of its spec and of a podMetricsEndpoint that we may use, with their types.
PODMONITOR_SPEC = {
    "selector": dict,
    "podMetricsEndpoints": list,
    "namespaceSelector": dict,
    "jobLabel": str,
    "podTargetLabels": list,
    "sampleLimit": int,
    "targetLimit": int,
    "labelLimit": int,
    "labelNameLengthLimit": int,
    "labelValueLengthLimit": int,
    "attachMetadata": dict,
}
PODMONITOR_ENDPOINT = {
    "port": str,
    "path": str,
    "scheme": str,
    "params": dict,
    "interval": str,
    "scrapeTimeout": str,
    "honorLabels": bool,
    "honorTimestamps": bool,
    "metricRelabelings": list,
    "relabelings": list,
    "followRedirects": bool,
    "enableHttp2": bool,
    "filterRunning": bool,
}
# The CRD's patterns: a Prometheus duration, and a port name (IANA_SVC_NAME).
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                      r"(([0-9]+)s)?(([0-9]+)ms)?)$")  # fmt: skip
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


def _fields(found: dict[str, Any], documented: dict[str, type], where: str) -> list[str]:
    errors = []
    for key, value in found.items():
        if key not in documented:
            errors.append(f"{where}.{key}: not a documented field")
        # A bool is an int to Python, not to Kubernetes: each only where documented.
        elif not isinstance(value, documented[key]) or isinstance(value, bool) is not (
            documented[key] is bool
        ):
            errors.append(f"{where}.{key}: {value!r} is not a {documented[key].__name__}")
    return errors


def podmonitor_errors(resource: dict[str, Any]) -> list[str]:
    """A PodMonitor checked against the documented fields, and its selector and metadata
    against the core schema (a PodDisruptionBudget has the same two)."""
    if resource.get("apiVersion") != "monitoring.coreos.com/v1":
        return [f"apiVersion: {resource.get('apiVersion')} is not monitoring.coreos.com/v1"]
    top = {"apiVersion", "kind", "metadata", "spec"}
    errors = [f"{key}: not a documented field" for key in resource if key not in top]
    spec = resource.get("spec")
    if not isinstance(spec, dict):
        return [*errors, "spec: missing"]
    errors += _fields(spec, PODMONITOR_SPEC, "spec")
    endpoints = spec.get("podMetricsEndpoints")
    if not endpoints:
        errors.append("spec.podMetricsEndpoints: none")
    for i, endpoint in enumerate(endpoints or []):
        where = f"spec.podMetricsEndpoints.{i}"
        if not isinstance(endpoint, dict):
            errors.append(f"{where}: not an object")
            continue
        errors += _fields(endpoint, PODMONITOR_ENDPOINT, where)
        if not PORT_NAME.match(str(endpoint.get("port", ""))):
            errors.append(f"{where}.port: {endpoint.get('port')!r} is not a container port name")
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint and not DURATION.match(str(endpoint[key])):
                errors.append(f"{where}.{key}: {endpoint[key]!r} is not a Prometheus duration")
        if not str(endpoint.get("path", "/")).startswith("/"):
            errors.append(f"{where}.path: {endpoint['path']!r} is not an absolute path")
    if "selector" not in spec:
        errors.append("spec.selector: missing")
    as_core = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": resource.get("metadata", {}),
        "spec": {"selector": spec.get("selector", {}), "minAvailable": 1},
    }
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(as_core, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{path} (Kubernetes {version}): {exc.message}")
    return errors


# Custom resources without a schema in kubernetes-validate, and how each is checked.
CUSTOM_KINDS = {"PodMonitor": podmonitor_errors}


def validate(resources: list[dict[str, Any]], what: str) -> list[str]:
    """Schema errors of ``resources``, one line each."""
    errors = []
    for resource in resources:
        name = f"{what}: {resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
        custom = CUSTOM_KINDS.get(str(resource.get("kind")))
        if custom is not None:
            errors += [f"{name}: {error}" for error in custom(resource)]
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{name} (Kubernetes {version}): {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{name} (Kubernetes {version}): {exc}")
    return errors


def main() -> int:
    errors: list[str] = []
    for overlay in OVERLAYS:
        resources = render(overlay)
        errors += validate(resources, overlay)
        kinds = ", ".join(sorted(str(r["kind"]) for r in resources))
        print(f"{overlay}: {len(resources)} resources ({kinds})")
    errors += validate([kserve_as_pod()], "kserve")
    errors += validate_kserve(yaml.safe_load(KSERVE.read_text()))
    print("kserve: the InferenceService (KServe's CRD schema) and its predictor (as a Pod)")
    for error in errors:
        print(error, file=sys.stderr)
    print(
        f"{'FAILED' if errors else 'valid'} against Kubernetes {' and '.join(VERSIONS)} "
        f"({len(errors)} errors)"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
