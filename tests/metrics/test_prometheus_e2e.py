"""Metrics end to end: a real Prometheus scrapes a real `framecast serve --workers 2` under load.

Debian's `prometheus` package (Prometheus and promtool) must be installed: skipped with the
reason where it is not, and never skipped in CI (.ci/run installs it). What this proves:

- the README's alert rules (deploy/monitoring/alerts.yaml) pass `promtool check rules`, and
  their unit tests (alerts_test.yaml) pass `promtool test rules` and fail when a rule is wrong;
- Prometheus scrapes the server (target labels namespace and pod, as Kubernetes service
  discovery and the PodMonitor give them) and evaluates the alert rules without errors;
- the prometheus-adapter rule, rendered as the adapter renders it for the HPA's per-pod
  request, returns a number for the pod;
- every query of every panel of deploy/monitoring/grafana-dashboard.json returns data.

The server's backend is the null backend on the CPU, so the GPU panel's data is its labelled
CPU fallback (gpu="none (CPU backend)" at 0, from framecast_model_info{device="cpu"}), not an
NVML figure; test_the_gpu_panel_... checks with promtool that a GPU pod's NVML series is shown
instead of the fallback.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from framecast_client import Client, InvalidArgumentError
from support import Host, random_frames, serve_workers, wait_until

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ADAPTER = ROOT / "deploy" / "kubernetes" / "prometheus-adapter" / "values.yaml"
PODMONITOR = ROOT / "deploy" / "kubernetes" / "base" / "podmonitor.yaml"
README_METRICS = (ROOT / "README.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ")[0]
# What Kubernetes service discovery would label the target with (the PodMonitor keeps them).
NAMESPACE, POD = "framecast-e2e", "framecast-7d9f-abcde"
# Grafana's $__rate_interval with its data source's default 15 s scrape interval: 4 x 15 s.
GRAFANA_RATE_INTERVAL = "1m"
CPU_FALLBACK_GPU = "none (CPU backend)"
DATA_DEADLINE_S = 120.0  # generous: a loaded 2-core machine; normally data is there in seconds


def tool(name: str) -> str:
    """The path of a tool of Debian's prometheus package; skip (fail in CI) without it."""
    path = shutil.which(name)
    if path is None:
        reason = (
            f"{name} is not installed (Debian's prometheus package: apt-get install prometheus)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run installs it before the tests")
        pytest.skip(reason)
    return path


def readme_commands() -> list[str]:
    """The promtool commands the README's Metrics section shows."""
    return [
        line.strip()
        for block in re.findall(r"```sh\n(.*?)```", README_METRICS, flags=re.S)
        for line in block.splitlines()
        if line.strip().startswith("promtool ")
    ]


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_readme_promtool_commands_check_and_unit_test_the_alert_rules() -> None:
    commands = readme_commands()
    assert commands == [
        "promtool check rules deploy/monitoring/alerts.yaml",
        "promtool test rules deploy/monitoring/alerts_test.yaml",
    ]
    for command in commands:
        done = promtool(*shlex.split(command)[1:])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"FramecastDroppingFrames", "FramecastQueueingTooLong"}
    tests = (MONITORING / "alerts_test.yaml").read_text()
    for rule in rules:  # each alert has a case where it fires and one where it does not
        fired = re.findall(rf"alertname: {rule['alert']}\n\s+exp_alerts:\n", tests)
        quiet = re.findall(rf"alertname: {rule['alert']}\n\s+exp_alerts: \[\]", tests)
        assert fired, rule["alert"]
        assert quiet, rule["alert"]


@pytest.mark.parametrize(
    ("alert", "wrong"),
    [
        ("FramecastDroppingFrames", ("> 0.01", "> 0.2")),  # a threshold that misses 10%
        ("FramecastDroppingFrames", ("queue_full|deadline", "queue_full|deadline|invalid")),
        ("FramecastQueueingTooLong", ("> 0.1", "> 0.3")),
        ("FramecastQueueingTooLong", ("for: 10m", "for: 1m")),
    ],
)
def test_the_alert_unit_tests_catch_a_wrong_rule(
    alert: str, wrong: tuple[str, str], tmp_path: Path
) -> None:
    text = ALERTS.read_text()
    _, _, tail = text.partition(f"- alert: {alert}")
    end = tail.find("- alert:")
    body = tail if end < 0 else tail[:end]
    assert wrong[0] in body
    broken = body.replace(wrong[0], wrong[1], 1)
    (tmp_path / "alerts.yaml").write_text(text.replace(body, broken))
    shutil.copy(MONITORING / "alerts_test.yaml", tmp_path)
    done = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert done.returncode != 0, done.stdout
    assert alert in done.stdout + done.stderr


def panel_queries() -> list[tuple[str, str]]:
    """(panel title and target, PromQL) for every target of every panel, as Grafana sends it
    for one namespace: the dashboard's variables substituted."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", GRAFANA_RATE_INTERVAL)
            expr = expr.replace("$namespace", NAMESPACE)
            assert "$" not in expr, expr  # every variable Grafana would fill is filled
            found.append((f"{panel['title']} [{target['refId']}]", expr))
    return found


def test_the_gpu_panel_shows_nvml_where_there_is_a_gpu_and_a_labelled_zero_on_cpu_pods(
    tmp_path: Path,
) -> None:
    (expr,) = [q for title, q in panel_queries() if title.startswith("GPU utilisation")]
    ns = f'namespace="{NAMESPACE}"'
    cases = {
        "input_series": [
            {"series": f'framecast_gpu_utilization_ratio{{{ns},pod="gpu-pod",gpu="0"}}',
             "values": "0.75x5"},
            {"series": f'framecast_model_info{{{ns},pod="gpu-pod",device="NVIDIA L4"}}',
             "values": "1x5"},
            {"series": f'framecast_model_info{{{ns},pod="cpu-pod",device="cpu"}}',
             "values": "1x5"},
            # A GPU pod whose NVML figures are missing (no pynvml): nothing, not a fake zero.
            # (TensorRT labels the model with its GPU's name as the device.)
            {"series": f'framecast_model_info{{{ns},pod="blind-pod",device="NVIDIA L4"}}',
             "values": "1x5"},
        ],
        "promql_expr_test": [{
            "expr": expr,
            "eval_time": "2m",
            "exp_samples": [
                {"labels": '{pod="gpu-pod",gpu="0"}', "value": 0.75},
                {"labels": f'{{pod="cpu-pod",gpu="{CPU_FALLBACK_GPU}"}}', "value": 0},
            ],
        }],
        "interval": "1m",
    }  # fmt: skip
    (tmp_path / "gpu_panel_test.yaml").write_text(
        yaml.safe_dump({"rule_files": [], "tests": [cases]})
    )
    done = promtool("test", "rules", "gpu_panel_test.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A real Prometheus on loopback with its own config and storage, queried over its API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's vector: (labels, value) per series."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]


@pytest.fixture
def prometheus(host: Host, tmp_path: Path) -> Iterator[Prometheus]:
    binary = tool("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{
                "job_name": "framecast",
                "metrics_path": scraped_path(),
                "static_configs": [{
                    "targets": [f"127.0.0.1:{host.metrics_port}"],
                    "labels": {"namespace": NAMESPACE, "pod": POD},
                }],
            }],
        })
    )  # fmt: skip
    log = tmp_path / "prometheus.log"
    for _attempt in range(3):  # the free port can be taken before Prometheus binds it
        started = start_prometheus(binary, config, tmp_path / "data", log)
        if started is not None:
            process, server = started
            break
    else:
        raise AssertionError(f"Prometheus did not start: {log.read_text()}")
    try:
        yield server
    finally:
        stop(process)


def scraped_path() -> str:
    """The path the PodMonitor has the Operator scrape."""
    (endpoint,) = yaml.safe_load(PODMONITOR.read_text())["spec"]["podMetricsEndpoints"]
    return str(endpoint["path"])


def start_prometheus(
    binary: str, config: Path, storage: Path, log: Path
) -> tuple[subprocess.Popen[bytes], Prometheus] | None:
    """Prometheus on a free loopback port, ready; None if it exited (its port was taken)."""
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={storage}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        wait_until(
            lambda: process.poll() is not None or ready(server),
            "Prometheus to start",
            timeout_s=60.0,
        )
    except BaseException:
        stop(process)
        raise
    return (process, server) if process.poll() is None else None


def ready(server: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=5) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


@pytest.fixture
def host(cache_dir: Path, tmp_path: Path) -> Iterator[Host]:
    with serve_workers(cache_dir, tmp_path) as running:
        yield running


class Traffic:
    """Unary calls over several connections (so both workers serve), some invalid, and one
    lossless stream kept open, until stopped."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.unary_ok = self.invalid = self.stream_ok = 0
        self.threads = [threading.Thread(target=self._guard, args=(f,), daemon=True)
                        for f in (self._unary, self._stream)]  # fmt: skip

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not self.errors, self.errors

    def _guard(self, work: Any) -> None:
        try:
            work()
        except BaseException as exc:  # reported by __exit__
            self.errors.append(exc)

    def _unary(self) -> None:
        clients = [Client(self.address, timeout=30) for _ in range(4)]
        try:
            n = 0
            while not self.stopping.wait(0.02):
                client = clients[n % len(clients)]
                if n % 5 == 4:  # an image of the wrong size: failures{reason="invalid"}
                    with pytest.raises(InvalidArgumentError):
                        client.classify_preprocessed(np.zeros((1, 10, 10, 3), np.uint8))
                    self.invalid += 1
                else:
                    client.classify_preprocessed(random_frames(2, seed=n))
                    self.unary_ok += 1
                n += 1
        finally:
            for client in clients:
                client.close()

    def _stream(self) -> None:
        frame = random_frames(1)[0]

        def frames() -> Iterator[np.ndarray[Any, Any]]:
            while not self.stopping.wait(0.05):
                yield frame

        with (
            Client(self.address, timeout=30) as client,
            client.stream(frames(), mode="lossless") as session,
        ):
            for result in session:
                assert result.ok, result.error
                self.stream_ok += 1


def adapter_query(prometheus: Prometheus, pods: list[str]) -> tuple[str, str]:
    """The adapter's rule as prometheus-adapter runs it for the HPA's Pods metric request:
    the series its seriesQuery discovers and name.matches keeps, and metricsQuery rendered
    with them (pkg/naming/metrics_query.go: LabelMatchers are the namespace and the pods,
    =~ when several; GroupBy is the pod label)."""
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    series = prometheus.get("/api/v1/series", **{"match[]": rule["seriesQuery"]})
    names = sorted({s["__name__"] for s in series if re.search(rule["name"]["matches"],
                                                               s["__name__"])})  # fmt: skip
    assert len(names) == 1, (rule["seriesQuery"], names)
    pod_matcher = f'pod="{pods[0]}"' if len(pods) == 1 else f'pod=~"{"|".join(pods)}"'
    rendered = (
        rule["metricsQuery"]
        .replace("<<.Series>>", names[0])
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",{pod_matcher}')
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in rendered, rendered
    return rule["name"]["as"], rendered


@pytest.mark.slow
def test_prometheus_scrapes_a_two_worker_server_and_every_query_has_data(
    host: Host, prometheus: Prometheus
) -> None:
    panels = panel_queries()
    with Traffic(host.address) as traffic:
        # Wait for the scrapes: the target up, with the labels it was given.
        target = {"__name__": "up", "instance": f"127.0.0.1:{host.metrics_port}",
                  "job": "framecast", "namespace": NAMESPACE, "pod": POD}  # fmt: skip
        wait_until(
            lambda: prometheus.query("up") == [(target, 1.0)], "a scrape", timeout_s=DATA_DEADLINE_S
        )
        wait_until(lambda: bool(prometheus.query("framecast_queue_duration_seconds_count > 0")),
                 "the queue-time histogram", timeout_s=DATA_DEADLINE_S)  # fmt: skip
        metric, rendered = adapter_query(prometheus, [POD])
        expectations = {
            # Every target: at least one finite number; and what the traffic must show.
            "Frames/s by code [A]": lambda r: (
                value(r, code="OK") > 0 and value(r, code="INVALID_ARGUMENT") > 0
            ),
            "Failures by reason [A]": lambda r: value(r, reason="invalid") > 0,
            "Active streams [A]": lambda r: value(r, pod=POD) >= 1,  # the stream is open
        }
        results: dict[str, list[tuple[dict[str, str], float]]] = {}

        def all_have_data() -> bool:
            for title, expr in [(f"adapter {metric}", rendered), *panels]:
                results[title] = prometheus.query(expr)
                if not any(math.isfinite(v) for _, v in results[title]):
                    return False
                if title in expectations and not expectations[title](results[title]):
                    return False
            return True

        try:
            wait_until(all_have_data, "data for every query", timeout_s=DATA_DEADLINE_S)
        finally:
            for title, expr in [(f"adapter {metric}", rendered), *panels]:
                print(f"{title}: {expr}\n    -> {results.get(title)}")
        # The dashboard's namespace variable lists the server's namespace.
        (variable,) = [v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]
                       if v["name"] == "namespace"]  # fmt: skip
        found = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
        assert found, variable
        namespaces = prometheus.get(f"/api/v1/label/{found[2]}/values", **{"match[]": found[1]})
        print(f"namespace variable: {variable['query']['query']} -> {namespaces}")
        assert namespaces == [NAMESPACE]
        # The alert rules ran on the scraped data without errors. (Whether one is pending
        # depends on this machine's load; none can fire within their 10 minutes' `for:`.)
        wait_until(
            lambda: rules_evaluated(prometheus), "the alert rules to run", timeout_s=DATA_DEADLINE_S
        )
        print(f"alerts: {prometheus.get('/api/v1/alerts')['alerts']}")

    # The adapter: one number for the one pod, in seconds (the HPA's target is 20m, 0.020 s).
    ((labels, seconds),) = results[f"adapter {metric}"]
    assert labels == {"pod": POD}
    assert 0 <= seconds < 10
    # The GPU panel on this CPU host: NVML's figures where the supervisor has them, else the
    # labelled fallback at 0 from framecast_model_info{device="cpu"} (no value made up).
    gpu = next(r for title, r in results.items() if title.startswith("GPU utilisation"))
    for labels, ratio in gpu:
        assert labels["pod"] == POD
        assert labels["gpu"] != CPU_FALLBACK_GPU or ratio == 0
    print(f"traffic: {traffic.unary_ok} unary calls ok, {traffic.invalid} invalid, "
          f"{traffic.stream_ok} stream frames")  # fmt: skip


def value(results: list[tuple[dict[str, str], float]], **labels: str) -> float:
    """The value of the series with these labels (0 when absent)."""
    for found, v in results:
        if labels.items() <= found.items():
            return v
    return 0.0


def rules_evaluated(prometheus: Prometheus) -> bool:
    rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    assert len(rules) == 2
    for rule in rules:
        assert rule["health"] in ("ok", "unknown"), rule
    return all(r["health"] == "ok" for r in rules)
