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
    for overlay in (*validate_manifests.OVERLAYS, "kserve"):
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


OVERLAYS = validate_manifests.OVERLAYS
HEALTH_PORT = 8081


def deployment_pod(overlay: str) -> dict[str, Any]:
    return dict(rendered(overlay)["Deployment/framecast"]["spec"]["template"]["spec"])


def kserve() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "deploy" / "kserve" / "inferenceservice.yaml").read_text()))


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE``."""
    for i, word in enumerate(args):
        if word == name:
            return args[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_replica_has_grpc_probes_on_the_health_port_a_drain_and_a_prepared_model(
    overlay: str,
) -> None:
    resources = rendered(overlay)
    pod = resources["Deployment/framecast"]["spec"]["template"]["spec"]
    server = container(resources)
    args = server["args"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": 50051, "health": HEALTH_PORT, "metrics": 9100}
    assert flag(args, "--port") == "50051"
    assert flag(args, "--health-port") == str(HEALTH_PORT)
    assert flag(args, "--metrics-port") == "9100"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == HEALTH_PORT
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # an engine build
    # SIGTERM comes after preStop; the server then drains for its grace period.
    pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + ServerSettings().grace_s
    assert args[:2] == ["serve", "--host"]
    assert flag(args, "--workers") == "auto"
    # The model: prepared by the init container into the pod's volume; the server never
    # downloads (--offline) and refuses random weights (--require-pretrained).
    assert {"--offline", "--require-pretrained"} <= set(args)
    (init,) = pod["initContainers"]
    assert init["args"] == ["prepare-model", "--require-pretrained"]
    assert (
        init["image"]
        == server["image"]
        == f"framecast-{'cpu' if overlay != 'gpu' else 'gpu'}:0.1.0"
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["model-cache"]
    cache_env = {"name": "FRAMECAST_CACHE_DIR", "value": "/var/cache/framecast"}
    for each in (init, server):
        assert cache_env in each["env"]
        assert {"name": "model-cache", "mountPath": "/var/cache/framecast"} in each["volumeMounts"]
    # Clients re-resolve (and reach new replicas) at least this often.
    assert float(flag(args, "--max-connection-age") or 0) > 0
    assert flag(args, "--max-connection-age-grace") is not None


def test_the_plain_overlays_say_insecure_and_the_secure_one_uses_the_secrets() -> None:
    for overlay in ("cpu", "gpu"):
        args = container(rendered(overlay))["args"]
        assert "--insecure" in args
        assert flag(args, "--tls-cert") is None
    resources = rendered("secure")
    server = container(resources)
    args = server["args"]
    assert "--insecure" not in args
    pod = resources["Deployment/framecast"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    # Each file the arguments name lies in the Secret mounted there (required, not optional).
    for name, secret, key in (
        ("--tls-cert", "framecast-tls", "tls.crt"),
        ("--tls-key", "framecast-tls", "tls.key"),
        ("--auth-tokens", "framecast-tokens", "tokens"),
    ):
        path = Path(flag(args, name) or "")
        (volume,) = [v for v in volumes.values() if v.get("secret", {}).get("secretName") == secret]
        assert not volume["secret"].get("optional", False)
        assert Path(mounts[volume["name"]]) / key == path
    # The probes cannot speak TLS: they keep the plaintext health-only port.
    assert server["readinessProbe"]["grpc"]["port"] == HEALTH_PORT
    assert flag(args, "--health-port") == str(HEALTH_PORT)
    assert "--auth-health" not in args


def test_the_gpu_target_asks_for_a_gpu_and_tensorrt_and_rolls_without_a_spare_gpu() -> None:
    resources = rendered("gpu")
    server = container(resources)
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert flag(server["args"], "--backend") == "tensorrt"
    assert "nvidia.com/gpu" not in container(rendered("cpu"))["resources"]["limits"]
    # The old pod leaves first and frees its GPU; no more replicas away than the PDB allows.
    rolling = resources["Deployment/framecast"]["spec"]["strategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 0, "maxUnavailable": 1}
    pdb = resources["PodDisruptionBudget/framecast"]["spec"]
    assert pdb["maxUnavailable"] >= rolling["maxUnavailable"]
    hpa = resources["HorizontalPodAutoscaler/framecast"]["spec"]
    assert hpa["minReplicas"] > rolling["maxUnavailable"]  # one serves during a rollout
    cpu = rendered("cpu")["Deployment/framecast"]["spec"]["strategy"]["rollingUpdate"]
    assert cpu == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_is_the_autoscalers_and_replicas_spread(overlay: str) -> None:
    resources = rendered(overlay)
    deployment = resources["Deployment/framecast"]
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
    pdb = resources["PodDisruptionBudget/framecast"]["spec"]
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    for name in ("name", "instance", "component", "part-of", "managed-by", "version"):
        for resource in resources.values():
            assert f"app.kubernetes.io/{name}" in resource["metadata"]["labels"], resource["kind"]
        assert f"app.kubernetes.io/{name}" in labels
    assert labels["app.kubernetes.io/version"] == container(resources)["image"].split(":")[1]


# Pod Security Standards, "restricted" profile (which includes "baseline"), as the Pod
# Security admission controller checks them (kubernetes.io/docs/concepts/security/
# pod-security-standards). Ephemeral containers and Windows pods do not occur here.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What a pod spec breaks of Pod Security "restricted" (empty: it passes)."""
    problems = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"{key} is set")
    pod_context = pod.get("securityContext", {})
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} is {sorted(kinds)}")
    for sysctl in pod_context.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl['name']}")
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    for c in containers:
        context = c.get("securityContext", {})
        name = c["name"]
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: does not drop ALL capabilities")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {capabilities['add']}")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")
        if context.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount {context['procMount']}")
        run_as_non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        if run_as_non_root is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        for scope in (pod_context, context):
            if scope.get("runAsUser") == 0:
                problems.append(f"{name}: runAsUser 0")
            selinux = scope.get("seLinuxOptions", {})
            if "user" in selinux or "role" in selinux:
                problems.append(f"{name}: SELinux user or role")
            if selinux.get("type", "container_t") not in (
                "container_t",
                "container_init_t",
                "container_kvm_t",
                "container_engine_t",
            ):
                problems.append(f"{name}: SELinux type {selinux['type']}")
            apparmor = scope.get("appArmorProfile", {}).get("type", "RuntimeDefault")
            if apparmor not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{name}: AppArmor {apparmor}")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp profile is {seccomp.get('type')}")
    return problems


def every_pod() -> dict[str, dict[str, Any]]:
    pods = {overlay: deployment_pod(overlay) for overlay in OVERLAYS}
    pods["kserve"] = kserve()["spec"]["predictor"]
    return pods


@pytest.mark.parametrize("name", [*OVERLAYS, "kserve"])
def test_every_pod_passes_pod_security_restricted(name: str) -> None:
    assert restricted_violations(every_pod()[name]) == []


def test_the_restricted_check_catches_what_main_had() -> None:
    # The hostPath cache and the root init container that chowned it, as they were.
    pod = copy.deepcopy(deployment_pod("cpu"))
    pod["volumes"][0] = {"name": "model-cache", "hostPath": {"path": "/var/cache/framecast"}}
    pod["initContainers"][0]["securityContext"] = {
        "runAsNonRoot": False,
        "runAsUser": 0,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
    }
    problems = restricted_violations(pod)
    assert any("hostPath" in p for p in problems)
    assert any("runAsNonRoot" in p for p in problems)
    assert any("runAsUser 0" in p for p in problems)
    assert any("CHOWN" in p for p in problems)
    pod = copy.deepcopy(deployment_pod("cpu"))
    del pod["securityContext"]["seccompProfile"]
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    problems = restricted_violations(pod)
    assert any("seccomp" in p for p in problems)
    assert any("allowPrivilegeEscalation" in p for p in problems)


def test_services_for_client_side_balancing_and_for_everyone_else() -> None:
    resources = rendered("cpu")
    headless = resources["Service/framecast-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    assert resources["Service/framecast"]["spec"]["type"] == "ClusterIP"
    labels = resources["Deployment/framecast"]["spec"]["template"]["metadata"]["labels"]
    for name in ("Service/framecast", "Service/framecast-headless"):
        assert resources[name]["spec"]["selector"].items() <= labels.items()
        assert resources[name]["spec"]["ports"][0]["targetPort"] == "grpc"
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


def test_the_kserve_example_is_a_grpc_custom_predictor_in_standard_mode() -> None:
    service = kserve()
    assert service["kind"] == "InferenceService"
    annotations = service["metadata"]["annotations"]
    # KServe 0.17 renamed RawDeployment (plain Deployment + Service + HPA) to Standard.
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    predictor = service["spec"]["predictor"]
    (server,) = predictor["containers"]
    assert server["name"] == "kserve-container"
    grpc_port, metrics_port = server["ports"]
    # Standard mode: a port whose name holds "grpc" is gRPC (appProtocol kubernetes.io/h2c),
    # and the first port is the one the Service routes to.
    assert "grpc" in grpc_port["name"]
    args = server["args"]
    assert flag(args, "--port") == str(grpc_port["containerPort"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == grpc_port["containerPort"]
    # The metrics annotations, and the port KServe's pod webhook points Prometheus at.
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["prometheus.kserve.io/port"] == "9091"
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    assert flag(args, "--metrics-port") == "9091" == str(metrics_port["containerPort"])
    assert {"--offline", "--require-pretrained"} <= set(args)
    (init,) = predictor["initContainers"]
    assert init["args"] == ["prepare-model", "--require-pretrained"]


def test_the_kserve_schema_check_catches_a_mistake() -> None:
    service = kserve()
    assert validate_manifests.validate_kserve(service) == []
    broken = copy.deepcopy(service)
    broken["spec"]["predictor"]["containers"][0]["portz"] = 8081
    (error,) = validate_manifests.validate_kserve(broken)
    assert "portz" in error
    broken = copy.deepcopy(service)
    broken["spec"]["predictor"]["minReplicas"] = "one"
    assert validate_manifests.validate_kserve(broken)
