"""Render the Kubernetes manifests of deploy/ and validate them against Kubernetes' schemas.

    python3 -m uv run python scripts/validate_manifests.py

Renders every kustomize overlay with ``kubectl kustomize`` (offline) and checks each resource
with kubernetes-validate (strict: unknown fields are errors) for the oldest Kubernetes we
support (1.27, where native gRPC probes became GA) and the newest it knows. The KServe
InferenceService is a custom resource without a schema there: its predictor container is
checked as a core v1 container. CI runs this (.ci/run); tests/deploy checks what the
manifests say.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
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
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": service["metadata"]["name"]},
        "spec": {"containers": predictor["containers"]},
    }


def validate(resources: list[dict[str, Any]], what: str) -> list[str]:
    """Schema errors of ``resources``, one line each."""
    errors = []
    for resource in resources:
        name = f"{what}: {resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
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
    print("kserve: the InferenceService's predictor container (as a Pod)")
    for error in errors:
        print(error, file=sys.stderr)
    print(
        f"{'FAILED' if errors else 'valid'} against Kubernetes {' and '.join(VERSIONS)} "
        f"({len(errors)} errors)"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
