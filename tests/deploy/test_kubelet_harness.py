"""The rendered manifests and the Dockerfiles, run here as a kubelet and Docker would run them.

``kubelet.py`` renders an overlay, installs the image's environment with its own install step,
and runs the Deployment's pods unchanged (init containers, command and args, env, volumes,
probes, preStop, grace period), each in its own network namespace, behind a headless Service's
DNS. Under unary calls and lossless streams from SDK clients on that Service it rolls every
replica over to a new revision and then scales up by one, and checks: no unary call fails, no
stream frame is lost or duplicated, and the added replica gets at least a third of its fair
share of the clients' calls (the clients connected before it came) within the servers'
maximum connection age plus 10 s.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from certs import CertificateAuthority
from framecast_client import TLS, Backoff, Client, StreamResult
from numpy.typing import NDArray
from support import wait_until

from . import kubelet
from .kubelet import Container, Image, Pod, PodTemplate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(kubelet.missing_tools() is not None, reason=str(kubelet.missing_tools())),
]

CLASSIFY = "/framecast.v1.Classifier/Classify"
UNARY_CLIENTS = 3
STREAMS = 2
DISTINCT_FRAMES = 8
UNARY_PACE_S = 0.25  # each unary client's pause between calls: the load stays modest on 2 cores
STREAM_PACE_S = 0.25
START_TIMEOUT_S = 240.0  # a pod's init containers, start and probes on a loaded machine


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CPU image's /opt/framecast: its install step, word for word, once per session."""
    where = tmp_path_factory.mktemp("image")
    image = kubelet.image(kubelet.DEPLOY / "cpu.Dockerfile")
    kubelet.install_image(image, where / "opt-framecast", where / "scratch")
    return where / "opt-framecast"


@pytest.fixture(scope="session")
def hub_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the default model's download puts into a cache: weights and their checksum.

    There is no egress here, so the weights a pod would download are put where the download
    writes them (random weights of the real ResNet-50 shape, with a checksum that matches):
    the init container then prepares the model from them as it would after a download.
    """
    from framecast_server.model import PRESETS, random_weights
    from framecast_server.model.download import CACHED_FILENAME, CHECKSUM_SUFFIX
    from safetensors.numpy import save_file

    directory = tmp_path_factory.mktemp("hub") / "weights"
    directory.mkdir()
    path = directory / CACHED_FILENAME
    save_file(random_weights(7, PRESETS["torchvision"]), str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + CHECKSUM_SUFFIX).write_text(f"{digest}\n")
    return directory


def cache_volume(template: PodTemplate) -> str | None:
    """The volume that holds FRAMECAST_CACHE_DIR in the pod's first container."""
    container = (template.init_containers or template.containers)[0]
    image = kubelet.image(kubelet.dockerfile_for(container.image))
    cache = image.env.get("FRAMECAST_CACHE_DIR")
    for entry in container.env:
        if entry["name"] == "FRAMECAST_CACHE_DIR":
            cache = entry.get("value")
    return next((m["name"] for m in container.mounts if m["mountPath"] == cache), None)


def seeder(volume: str | None, weights: Path) -> kubelet.Seed:
    def seed(name: str, path: Path) -> None:
        if name == volume and not (path / weights.name).exists():
            shutil.copytree(weights, path / weights.name)
            for item in (path / weights.name).iterdir():
                item.chmod(0o644)

    return seed


def flag(args: tuple[str, ...], name: str) -> str | None:
    """The value of option ``name`` in ``args`` (``--name VALUE`` or ``--name=VALUE``)."""
    for n, arg in enumerate(args):
        if arg == name and n + 1 < len(args):
            return args[n + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def credentials(
    template: PodTemplate, service: kubelet.ServiceName, directory: Path
) -> tuple[kubelet.Secrets, dict[str, Any]]:
    """The Secrets the server's args read (certificates of a CA of the test, a token file),
    and what a client needs to call it (``Client`` keyword arguments)."""
    (server,) = template.containers
    args = server.args or ()
    ca = CertificateAuthority(directory, "framecast-harness")
    # Clients dial the headless Service's name: the certificate is for that name.
    issued = ca.issue(service.fqdn, server=True, file_stem="server")
    client = ca.issue("harness-client")
    token = secrets.token_hex(16)
    contents = {
        "--tls-cert": issued.cert.read_bytes(),
        "--tls-key": issued.key.read_bytes(),
        "--tls-client-ca": ca.cert.read_bytes(),
        "--auth-tokens": f"harness:{token}\n".encode(),
    }
    mounts = {m["name"]: m["mountPath"].rstrip("/") + "/" for m in server.mounts}
    data: dict[str, dict[str, bytes]] = {}
    for name, volume in template.volumes.items():
        if "secret" not in volume or name not in mounts:
            continue
        keys = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
        for option, content in contents.items():
            value = flag(args, option)
            if value is not None and value.startswith(mounts[name]):
                relative = value[len(mounts[name]) :]
                data.setdefault(volume["secret"]["secretName"], {})[
                    keys.get(relative, relative)
                ] = content
    kwargs: dict[str, Any] = {}
    if flag(args, "--tls-cert") is not None:
        mutual = flag(args, "--tls-client-ca") is not None
        kwargs["tls"] = TLS(ca=ca.cert, cert=client.cert if mutual else None,
                            key=client.key if mutual else None)  # fmt: skip
    if flag(args, "--auth-tokens") is not None:
        kwargs["token"] = token
    return kubelet.Secrets(data), kwargs


# ---------------------------------------------------------------------------------------------
# Load: SDK clients on the headless Service


def frames() -> NDArray[np.uint8]:
    rng = np.random.default_rng(20)
    return rng.integers(0, 256, size=(DISTINCT_FRAMES, 224, 224, 3), dtype=np.uint8)


@dataclass(frozen=True)
class Expected:
    unary: list[int]
    stream: list[int]


@dataclass
class LoadResults:
    unary_ok: int = 0
    unary_failures: list[str] = field(default_factory=list)
    wrong_answers: int = 0
    stream_frames: list[int] = field(default_factory=list)  # frames each stream sent
    stream_results: list[list[int]] = field(default_factory=list)  # indices received, in order
    stream_errors: list[str] = field(default_factory=list)
    reconnects: int = 0


class Load:
    """Unary clients and lossless stream sessions running until ``stop``."""

    def __init__(self, target: str, expected: Expected, client_kwargs: dict[str, Any]) -> None:
        self.target = target
        self.frames = frames()
        self.expected = expected
        self.results = LoadResults()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.clients = [Client(target, timeout=60, **client_kwargs)
                        for _ in range(UNARY_CLIENTS + STREAMS)]  # fmt: skip
        for client in self.clients:
            client.model_info()  # connected before the test changes anything

    def start(self) -> None:
        for n, client in enumerate(self.clients[:UNARY_CLIENTS]):
            self._threads.append(threading.Thread(target=self._unary, args=(client, n)))
        for n, client in enumerate(self.clients[UNARY_CLIENTS:]):
            self.results.stream_results.append([])
            self.results.stream_frames.append(0)
            self._threads.append(threading.Thread(target=self._stream, args=(client, n)))
        for thread in self._threads:
            thread.start()

    def finish(self) -> LoadResults:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        for client in self.clients:
            client.close()
        return self.results

    def _unary(self, client: Client, seed: int) -> None:
        i = seed
        while not self.stop.is_set():
            key = i % DISTINCT_FRAMES
            try:
                (result,) = client.classify_preprocessed(self.frames[key][None], top_k=1)
            except Exception as exc:  # every failure is one the test reports
                with self._lock:
                    self.results.unary_failures.append(f"{type(exc).__name__}: {exc}")
            else:
                with self._lock:
                    self.results.unary_ok += 1
                    self.results.wrong_answers += (
                        result.predictions[0].index != self.expected.unary[key]
                    )
            i += 1
            self.stop.wait(UNARY_PACE_S)

    def _source(self, n: int) -> Iterator[NDArray[np.uint8]]:
        i = 0
        while not self.stop.is_set():
            yield self.frames[i % DISTINCT_FRAMES]
            i += 1
            self.results.stream_frames[n] = i
            self.stop.wait(STREAM_PACE_S)

    def _stream(self, client: Client, n: int) -> None:
        received = self.results.stream_results[n]
        try:
            backoff = Backoff(initial_s=0.05, max_s=0.5)
            with client.stream(self._source(n), mode="lossless", backoff=backoff) as session:
                result: StreamResult
                for result in session:
                    received.append(result.index)
                    if not result.ok:
                        self.results.stream_errors.append(f"frame {result.index}: {result.error}")
                    elif (
                        result.classification.predictions[0].index
                        != self.expected.stream[result.index % DISTINCT_FRAMES]
                    ):
                        self.results.stream_errors.append(f"frame {result.index}: wrong result")
                with self._lock:
                    self.results.reconnects += session.stats.reconnects
        except Exception as exc:
            self.results.stream_errors.append(f"stream {n}: {type(exc).__name__}: {exc}")


def served(pods: list[Pod], port: int) -> dict[str, float]:
    """Unary Classify calls each pod has answered OK so far (its /metrics)."""
    return {
        pod.name: kubelet.metric_value(
            pod.scrape(port), "framecast_requests_total", {"method": CLASSIFY, "code": "OK"}
        )
        for pod in pods
    }


# ---------------------------------------------------------------------------------------------
# The Deployment


def run_deployment(
    overlay: str, root: Path, venv: Path, weights: Path, *, scale_up: bool = True
) -> None:
    """Run ``overlay``'s Deployment; under load, a rolling update, then (``scale_up``) one
    replica more and the share of the calls it gets."""
    resources = kubelet.render(overlay)
    spec = kubelet.deployment(resources)
    (server,) = spec.template.containers
    args = server.args or ()
    service = kubelet.headless_service(resources, spec.template)
    cluster_secrets, client_kwargs = credentials(spec.template, service, root)
    seed = seeder(cache_volume(spec.template), weights)
    timings: dict[str, float] = {}
    began = time.monotonic()
    with (
        kubelet.node(root, venv, cluster_secrets, seed) as (node, network, dns),
        kubelet.Cluster(resources, node, network, dns) as cluster,
    ):
        kubelet.log(f"{overlay}: {spec.replicas} replicas of {server.name}: {server.args}")
        cluster.create(START_TIMEOUT_S)
        timings["first rollout"] = time.monotonic() - began
        max_age = flag(args, "--max-connection-age")
        assert max_age is not None, f"{overlay}: no --max-connection-age in the args: {args}"
        metrics = server.ports.get("metrics")
        assert metrics is not None, f"{overlay}: the container declares no port named metrics"
        with Client(cluster.target, timeout=60, **client_kwargs) as first:
            # Each frame's class, sent as it is (unary) and preprocessed (as streams send it).
            expected = Expected(
                unary=[r.predictions[0].index for r in first.classify_preprocessed(frames())],
                stream=[r.predictions[0].index for r in first.classify(list(frames()))],
            )
        load = Load(cluster.target, expected, client_kwargs)
        load.start()
        try:
            time.sleep(3)
            started = time.monotonic()
            deletions = cluster.rolling_update(START_TIMEOUT_S * spec.replicas)
            for thread in deletions:
                thread.join(timeout=spec.template.grace_s + 30)
            timings["rolling update"] = time.monotonic() - started

            calls: dict[str, float] = {}
            last: dict[str, float] = {}
            asked: list[float] = []
            if scale_up:
                started = time.monotonic()
                (added,) = cluster.scale(spec.replicas + 1, START_TIMEOUT_S)
                assert added.ready_at is not None
                timings["scale-up to ready"] = time.monotonic() - started
                # Calls per replica from its /metrics: when the added one is ready, when the
                # maximum connection age has passed (every connection the clients had is then
                # at its end), and 10 s later.
                window = float(max_age) + 10
                counts = [served(cluster.pods, metrics)]
                for at in (float(max_age), window):
                    time.sleep(max(0.0, added.ready_at + at - time.monotonic()))
                    counts.append(served(cluster.pods, metrics))
                calls = {n: counts[2][n] - counts[0].get(n, 0.0) for n in counts[2]}
                # When clients asked DNS again: when they could learn of the added replica.
                asked = [round(t - added.ready_at, 1) for t in dns.asked if t > added.ready_at]
                last = {n: counts[2][n] - counts[1][n] for n in counts[2]}
        finally:
            results = load.finish()
        timings["total"] = time.monotonic() - began

        restarts = {p.name: p.restarts for p in cluster.pods + cluster.gone if p.restarts}
        terminations = {p.name: p.termination for p in cluster.gone}

    kubelet.log(f"{overlay} timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    kubelet.log(
        f"unary calls: {results.unary_ok} ok, {len(results.unary_failures)} failed, "
        f"{results.wrong_answers} wrong; stream frames sent {results.stream_frames}, "
        f"results {[len(r) for r in results.stream_results]}, reconnects {results.reconnects}"
    )
    fair = sum(calls.values()) / len(calls) if calls else 0.0
    fair_last = sum(last.values()) / len(last) if last else 0.0
    if scale_up:
        for what, counted, share in (
            (f"the {window:.0f}s after {added.name} was ready", calls, fair),
            (f"its last 10 s (from the max connection age, {max_age}s, on)", last, fair_last),
        ):
            kubelet.log(
                f"unary calls in {what}: " + ", ".join(f"{n} {c:.0f}" for n, c in counted.items())
                + f"; fair share {share:.1f}, the added replica's {counted[added.name]:.0f} "
                f"({counted[added.name] / share if share else 0:.2f} of it)"
            )  # fmt: skip
        kubelet.log(f"DNS queries after {added.name} was ready, at +s: {asked}")
    for name, termination in terminations.items():
        kubelet.log(f"{name}: {termination}")

    assert results.unary_failures == [], results.unary_failures[:5]
    assert results.wrong_answers == 0
    assert results.unary_ok > 0
    for sent, received in zip(results.stream_frames, results.stream_results, strict=True):
        # Every frame read from the source got exactly one result, in order.
        assert received == list(range(sent)), f"sent {sent}, results {len(received)}"
    assert results.stream_errors == [], results.stream_errors[:5]
    assert restarts == {}, restarts
    for name, termination in terminations.items():
        assert termination is not None
        assert not termination.killed, f"{name} needed SIGKILL at the grace period"
        assert termination.exit_code == 0, f"{name} exited {termination.exit_code}"
    if scale_up:
        # Within the maximum connection age plus 10 s the added replica takes at least a third
        # of its fair share: by then every connection that predates it has ended and its client
        # has resolved the Service again. (Over the whole window its share depends on when in
        # their age the connections were when it came: printed above, not asserted.)
        assert fair_last > 0
        assert last[added.name] >= fair_last / 3, last


OVERLAYS = sorted(p.name for p in (kubelet.DEPLOY / "kubernetes" / "overlays").iterdir())


@pytest.mark.timeout(900)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_rolls_over_and_scales_up_under_load(
    overlay: str, tmp_path: Path, image_venv: Path, hub_weights: Path
) -> None:
    (server,) = kubelet.deployment(kubelet.render(overlay)).template.containers
    if "tensorrt" in (server.args or ()):
        # Its image is NVIDIA's TensorRT container (deploy/gpu.Dockerfile), not installable here.
        pytest.skip(f"the {overlay} overlay serves TensorRT: needs its image on an NVIDIA GPU")
    # The scale-up and its share of the calls once, on the plain overlay: the secure one differs
    # in its transport (TLS, tokens, the health port), which the rollout under load exercises.
    run_deployment(overlay, tmp_path, image_venv, hub_weights, scale_up=overlay == "cpu")


# ---------------------------------------------------------------------------------------------
# The Dockerfiles


def docker_template(image: Image, name: str) -> PodTemplate:
    """What ``docker run`` makes of the image: its command, ENV, an anonymous volume per
    VOLUME, ``docker stop``'s 10 s before SIGKILL."""
    volumes: dict[str, dict[str, Any]] = {
        f"volume{n}": {"emptyDir": {}} for n in range(len(image.volumes))
    }
    container = Container(
        name="framecast", image=name, command=None, args=None, env=(), ports={}, startup=None,
        readiness=None, liveness=None, pre_stop=None,
        mounts=tuple({"name": f"volume{n}", "mountPath": path}
                     for n, path in enumerate(image.volumes)),
        read_only_root=False, working_dir=None,
    )  # fmt: skip
    return PodTemplate(
        containers=(container,), init_containers=(), volumes=volumes, grace_s=10,
        restart_policy="Never",  # `docker run` without --restart
    )  # fmt: skip


@pytest.mark.timeout(600)
@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_the_dockerfile_command_serves_and_its_health_check_passes(
    flavour: str, tmp_path: Path, image_venv: Path, hub_weights: Path
) -> None:
    name = f"framecast-{flavour}"
    image = kubelet.image(kubelet.dockerfile_for(name))
    if "tensorrt" in image.cmd:
        pytest.skip(f"{image.dockerfile.name} serves TensorRT: needs its base image on a GPU")
    health = image.healthcheck
    assert health is not None
    template = docker_template(image, name)
    seed = seeder(
        next((f"volume{n}" for n, v in enumerate(image.volumes)
              if v == image.env.get("FRAMECAST_CACHE_DIR")), None), hub_weights,
    )  # fmt: skip
    with kubelet.node(tmp_path, image_venv, kubelet.Secrets(), seed) as (node, network, _):
        pod = Pod("docker-" + flavour, template, node, network)
        try:
            pod.start()
            wait_until(lambda: "framecast" in pod.containers or pod.failed is not None,
                       "the container to start", timeout_s=60)  # fmt: skip
            assert pod.failed is None, pod.failed
            process = pod.containers["framecast"]
            # Docker's health check: every interval (the first one interval after the start),
            # failures inside the start period do not count, `retries` in a row mark it unhealthy.
            started = time.monotonic()
            failures = 0
            status = "starting"
            checks: list[str] = []
            while status == "starting":
                next_check = time.monotonic() + health.interval_s
                while time.monotonic() < next_check:
                    assert pod.failed is None, pod.failed
                    time.sleep(0.2)
                done = process.exec(health.command, timeout=health.timeout_s + 5)
                checks.append(f"{done.returncode} {done.stdout.strip()}")
                if done.returncode == 0:
                    status = "healthy"
                elif time.monotonic() - started > health.start_period_s:
                    failures += 1
                    if failures >= health.retries:
                        status = "unhealthy"
            kubelet.log(f"{name}: {status} after {time.monotonic() - started:.0f}s: {checks}")
            assert status == "healthy", process.log_tail()
            # `docker stop`: SIGTERM, then SIGKILL after 10 s.
            termination = pod.terminate()
            assert not termination.killed, process.log_tail()
            assert termination.exit_code == 0, process.log_tail()
        finally:
            pod.kill()


def test_the_harness_cleans_up_its_namespaces(tmp_path: Path, image_venv: Path) -> None:
    """Every network namespace and bridge a node made is gone after it, failure or not."""
    names: list[str] = []

    def fail_inside() -> None:
        with kubelet.node(tmp_path, image_venv, kubelet.Secrets(), None) as (_, network, _):
            names.extend([network.add()[0], network.bridge])
            raise RuntimeError("on purpose")

    with pytest.raises(RuntimeError, match="on purpose"):
        fail_inside()
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert names[0] not in namespaces.split()
    assert f" {names[1]}:" not in links


def test_what_a_killed_test_left_is_swept() -> None:
    """Namespaces of a test process that is gone, and the processes in them, end at the next
    node's start (a test killed by SIGKILL runs no cleanup)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    namespace = f"{kubelet.Network.PREFIX}{gone.pid:x}-0"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    left = subprocess.Popen(["ip", "netns", "exec", namespace, "sleep", "300"])
    try:
        wait_until(
            lambda: str(left.pid) in subprocess.run(
                ["ip", "netns", "pids", namespace], capture_output=True, text=True
            ).stdout.split(),
            "the process to be in the namespace",
            timeout_s=10,
            interval_s=0.1,
        )  # fmt: skip
        kubelet.Network.sweep()
        assert left.wait(timeout=10) == -signal.SIGKILL
        assert (
            namespace
            not in subprocess.run(
                ["ip", "netns", "list"], capture_output=True, text=True
            ).stdout.split()
        )
    finally:
        left.kill()
        subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)
