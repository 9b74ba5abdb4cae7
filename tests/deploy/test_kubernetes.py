"""The Kubernetes manifests render, pass the schemas, and say what a Framecast replica needs."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from framecast_server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "validate_manifests.py"

if shutil.which("kubectl") is None and not os.environ.get("CI"):
    # CI has kubectl and fails without it (.ci/run renders the manifests too).
    pytest.skip("kubectl is not installed (kubectl kustomize renders)", allow_module_level=True)


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("validate_manifests", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


validate_manifests = load_script()


def rendered(overlay: str) -> dict[str, dict[str, Any]]:
    by_name: dict[str, dict[str, Any]] = {}
    for resource in validate_manifests.render(overlay):
        by_name[f"{resource['kind']}/{resource['metadata']['name']}"] = resource
    return by_name


def container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = resources["Deployment/framecast"]["spec"]["template"]["spec"]["containers"]
    return dict(only)


def test_the_readme_command_renders_and_validates_every_target() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "valid against Kubernetes 1.27.0" in done.stdout
    for overlay in ("cpu", "gpu", "kserve"):
        assert f"{overlay}: " in done.stdout


def test_the_schema_check_catches_a_mistake() -> None:
    deployment = rendered("cpu")["Deployment/framecast"]
    broken = copy.deepcopy(deployment)
    probe = broken["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    probe["grpc"]["portt"] = probe["grpc"].pop("port")
    errors = validate_manifests.validate([broken], "cpu")
    assert errors
    assert "grpc" in errors[0]
    assert validate_manifests.validate([deployment], "cpu") == []


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_a_replica_has_grpc_probes_a_drain_and_a_node_cache(overlay: str) -> None:
    resources = rendered(overlay)
    pod = resources["Deployment/framecast"]["spec"]["template"]["spec"]
    server = container(resources)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 50051
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # an engine build
    # SIGTERM comes after preStop; the server then drains for its grace period.
    pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + ServerSettings().grace_s
    assert server["args"][:2] == ["serve", "--host"]
    assert "--workers" in server["args"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["engine-cache"]["hostPath"]["path"] == "/var/cache/framecast"
    assert {"framecast-tls", "framecast-tokens"} <= {
        v["secret"]["secretName"] for v in volumes.values() if "secret" in v
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert server["image"] == f"framecast-{overlay}:0.1.0"


def test_the_gpu_target_asks_for_a_gpu_and_tensorrt() -> None:
    server = container(rendered("gpu"))
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["args"][server["args"].index("--backend") + 1] == "tensorrt"
    assert "nvidia.com/gpu" not in container(rendered("cpu"))["resources"]["limits"]


def test_services_for_client_side_balancing_and_for_everyone_else() -> None:
    resources = rendered("cpu")
    headless = resources["Service/framecast-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    assert resources["Service/framecast"]["spec"]["type"] == "ClusterIP"
    labels = resources["Deployment/framecast"]["spec"]["template"]["metadata"]["labels"]
    for name in ("Service/framecast", "Service/framecast-headless"):
        assert resources[name]["spec"]["selector"].items() <= labels.items()
    pdb = resources["PodDisruptionBudget/framecast"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_the_autoscaler_uses_the_queue_time_metric_the_adapter_serves() -> None:
    hpa = rendered("cpu")["HorizontalPodAutoscaler/framecast"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load(
        (ROOT / "deploy" / "kubernetes" / "prometheus-adapter" / "values.yaml").read_text()
    )
    (rule,) = adapter["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]


def test_the_kserve_example_serves_our_container_on_its_h2c_port() -> None:
    service = yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    assert service["kind"] == "InferenceService"
    (predictor,) = service["spec"]["predictor"]["containers"]
    (port,) = predictor["ports"]
    assert port["name"] == "h2c"
    args = predictor["args"]
    assert args[args.index("--port") + 1] == str(port["containerPort"])
    assert predictor["readinessProbe"]["grpc"]["port"] == port["containerPort"]
