"""The monitoring configuration names what the server really exports, and the Kubernetes
monitoring objects (PodMonitor, NetworkPolicy) select the replicas and their ports.

No Prometheus here (test_prometheus_e2e.py has one): these read the files, the server's own
metric definitions and the rendered overlays.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from framecast_server.metrics import Metrics
from framecast_server.metrics.nvml import _GPUCollector

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "deploy" / "kubernetes" / "prometheus-adapter" / "values.yaml"
HPA = ROOT / "deploy" / "kubernetes" / "base" / "horizontalpodautoscaler.yaml"
MONITORING = ROOT / "deploy" / "monitoring"
SERIES_NAME = re.compile(r"\bframecast_[a-z0-9_]+")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_series() -> set[str]:
    """Every series name a server can export: its metrics' samples, multiprocess or not, and
    the NVML collector's (exported only where a GPU answers)."""
    families = [
        *Metrics(gpu=False).registry.collect(),
        *Metrics(gpu=False, shared=True).registry.collect(),
        *_GPUCollector(None, 0).collect(),
    ]
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


def test_the_adapter_rule_and_the_hpa_name_series_the_server_exports() -> None:
    exported = exported_series()
    assert "framecast_queue_duration_seconds_bucket" in exported
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    # The series the adapter discovers: seriesQuery's metric, kept by name.matches.
    series = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    assert series[1] in exported, f"the server exports no {series[1]}"
    assert re.search(rule["name"]["matches"], series[1])
    # metricsQuery computes on that series (<<.Series>>) and names no other.
    assert set(SERIES_NAME.findall(rule["metricsQuery"])) <= exported
    assert {"<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(
        re.findall(r"<<[^>]*>>", rule["metricsQuery"])
    )
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    (metric,) = yaml.safe_load(HPA.read_text())["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]


def test_the_dashboard_and_the_alerts_query_series_the_server_exports() -> None:
    exported = exported_series()
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    alerts = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    for expr in exprs:
        names = set(SERIES_NAME.findall(expr))
        assert names, expr
        assert names <= exported, f"{expr}: the server exports no {names - exported}"
    titles = {p["title"] for p in dashboard["panels"]}
    assert titles == {
        "Frames/s by code", "Latency of unary calls (p50, p99)", "Queue time (p50, p99)",
        "Batch size", "Failures by reason", "Active streams", "GPU utilisation",
    }  # fmt: skip
    assert len({p["id"] for p in dashboard["panels"]}) == len(titles)


def load_validate_manifests() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "validate_manifests", ROOT / "scripts" / "validate_manifests.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def validate_manifests() -> ModuleType:
    if shutil.which("kubectl") is None and not os.environ.get("CI"):
        pytest.skip("kubectl is not installed (kubectl kustomize renders)")
    return load_validate_manifests()


def rendered(module: ModuleType, overlay: str) -> dict[str, dict[str, Any]]:
    return {f"{r['kind']}/{r['metadata']['name']}": r for r in module.render(overlay)}


@pytest.mark.parametrize("overlay", load_validate_manifests().OVERLAYS)
def test_prometheus_and_grpc_clients_reach_the_replicas_and_nothing_else(
    overlay: str, validate_manifests: ModuleType
) -> None:
    resources = rendered(validate_manifests, overlay)
    template = resources["Deployment/framecast"]["spec"]["template"]
    labels = template["metadata"]["labels"]
    (server,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in server.get("ports", [])}
    args = server["args"]
    # The PodMonitor scrapes the replicas' metrics port, where the server serves /metrics.
    monitor = resources["PodMonitor/framecast"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in ports, f"no container port named {endpoint['port']}: {ports}"
    assert args[args.index("--metrics-port") + 1] == str(ports[endpoint["port"]])
    # The NetworkPolicy: the replicas, ingress only, gRPC from anyone, metrics from Prometheus.
    policy = resources["NetworkPolicy/framecast"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    grpc_rule, metrics_rule = policy["ingress"]
    assert "from" not in grpc_rule
    assert [p["port"] for p in grpc_rule["ports"]] == ["grpc"]
    assert ports["grpc"] == int(args[args.index("--port") + 1])
    (peer,) = metrics_rule["from"]
    assert peer["namespaceSelector"] == {}
    # kustomize did not turn the Prometheus selector into the replicas' own labels.
    assert "matchLabels" not in peer["podSelector"]
    assert peer["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/name", "operator": "In", "values": ["prometheus"]}
    ]
    assert [p["port"] for p in metrics_rule["ports"]] == [endpoint["port"]]


def _rename(fields: dict[str, Any], old: str, new: str) -> None:
    fields[new] = fields.pop(old)


MISTAKES: dict[str, Callable[[dict[str, Any]], object]] = {
    # The text the error must name: how the PodMonitor is broken.
    "spec.podMetricEndpoints: not a documented field": lambda m: _rename(
        m["spec"], "podMetricsEndpoints", "podMetricEndpoints"
    ),
    "spec.podMetricsEndpoints.0.intervall: not a documented field": lambda m: _rename(
        m["spec"]["podMetricsEndpoints"][0], "interval", "intervall"
    ),
    "'15 seconds' is not a Prometheus duration": lambda m: m["spec"]["podMetricsEndpoints"][
        0
    ].update(interval="15 seconds"),
    "port: 9100 is not a str": lambda m: m["spec"]["podMetricsEndpoints"][0].update(port=9100),
    "spec.selector": lambda m: _rename(m["spec"]["selector"], "matchLabels", "matchLabel"),
    "is not monitoring.coreos.com/v1": lambda m: m.update(apiVersion="monitoring.coreos.com/v2"),
}


@pytest.mark.parametrize("expected", MISTAKES)
def test_the_podmonitor_check_catches_mistakes(
    expected: str, validate_manifests: ModuleType
) -> None:
    monitor = rendered(validate_manifests, "cpu")["PodMonitor/framecast"]
    assert validate_manifests.validate([monitor], "cpu") == []
    broken = copy.deepcopy(monitor)
    MISTAKES[expected](broken)
    errors = validate_manifests.validate([broken], "cpu")
    assert errors
    assert any(expected in error for error in errors), errors
