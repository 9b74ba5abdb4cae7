"""Every entry point's arguments, unmodified, start a server that answers its probes.

The entry points: each container of each rendered overlay (``kubectl kustomize``), the KServe
predictor, and both Dockerfiles' ENTRYPOINT + CMD. Each runs here as its pod (or ``docker
run``) would run it: the image's ENTRYPOINT and ENV, the container's env and arguments word
for word, the init containers first, the volumes at their mount paths, in namespaces of the
test's own (pod_sandbox.py): no network but loopback, so nothing can be downloaded, and
0.0.0.0:50051 is the pod's own. The probes are asked on the ports they name; a Docker
HEALTHCHECK runs as written; the SDK then calls the gRPC port, with TLS and a token where the
arguments ask for them; SIGTERM ends the server with status 0 within the grace period.

What the test plays: the download. With no network here, the weights are put where the init
container would have downloaded them (``<cache>/weights``): random ResNet-50 weights made
here, with their SHA-256 recorded as a download records the published one. The init
container's own arguments then run unchanged and prepare the model from them. The Secrets: a
certificate from a CA made here and a token file, mounted where the manifest mounts them.
Probe periods are not waited out (the startup probe gets its period x threshold as a deadline);
tests/deploy/kubelet.py, where present, runs them with their timing. The TensorRT entry points
need TensorRT and a GPU and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from certs import CertificateAuthority
from support import write_downloaded_weights

from .test_images import exec_form, instructions
from .test_kubernetes import validate_manifests

ROOT = Path(__file__).resolve().parents[2]
SANDBOX = Path(__file__).with_name("pod_sandbox.py")
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
DOCKERFILES = {"framecast-cpu": "cpu.Dockerfile", "framecast-gpu": "gpu.Dockerfile"}
TOKEN = "manifest-test-token"
# A Dockerfile has no grace period: docker stop waits 10 s before SIGKILL.
DOCKER_STOP_S = 10
SANDBOX_TIMEOUT_S = 400


def sandbox_problem() -> str | None:
    """Why namespaces of our own cannot be had here (None: they can)."""
    for tool in ("unshare", "ip", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "--net", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"unprivileged user, mount and network namespaces: {done.stderr.strip()}"
    return None


@dataclass(frozen=True)
class Image:
    """What a Dockerfile gives a container: ENTRYPOINT, CMD, ENV, VOLUME, HEALTHCHECK."""

    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    volumes: list[str]
    healthcheck: list[str]
    backend_tensorrt: bool


def image(dockerfile: str) -> Image:
    steps = instructions(ROOT / "deploy" / dockerfile)
    stage = steps[max(i for i, (name, _) in enumerate(steps) if name == "FROM") :]
    env: dict[str, str] = {}
    for name, arguments in stage:
        if name == "ENV":
            for word in shlex.split(arguments):
                key, _, value = word.partition("=")
                env[key] = value.replace("$PATH", os.environ["PATH"])
    last = {name: arguments for name, arguments in stage}
    check = last["HEALTHCHECK"]
    cmd = exec_form(last["CMD"])
    return Image(
        entrypoint=exec_form(last["ENTRYPOINT"]),
        cmd=cmd,
        env=env,
        volumes=last["VOLUME"].split(),
        healthcheck=exec_form(check[check.index("CMD") + 3 :]),
        backend_tensorrt="tensorrt" in cmd,
    )


def with_our_python(env: dict[str, str]) -> dict[str, str]:
    """The image's PATH with this environment's bin first, where the image has /opt/framecast."""
    ours = str(Path(sys.executable).parent)
    env = dict(env)
    env["PATH"] = env.get("PATH", os.environ["PATH"]).replace("/opt/framecast/bin", ours)
    if ours not in env["PATH"].split(":"):
        env["PATH"] = f"{ours}:{env['PATH']}"
    return env


@dataclass(frozen=True)
class Entry:
    """One entry point: a pod spec (rendered manifest) or a Dockerfile's `docker run`."""

    name: str
    pod: dict[str, Any] | None  # None: the Dockerfile's CMD as `docker run` runs it
    image_name: str


def pod_entries() -> list[Entry]:
    entries = []
    for overlay in validate_manifests.OVERLAYS:
        for resource in validate_manifests.render(overlay):
            if resource["kind"] == "Deployment":
                pod = resource["spec"]["template"]["spec"]
                name = pod["containers"][0]["image"].split(":")[0]
                entries.append(Entry(f"overlay {overlay}", pod, name))
    predictor = yaml.safe_load(KSERVE.read_text())["spec"]["predictor"]
    entries.append(Entry("kserve", predictor, predictor["containers"][0]["image"].split(":")[0]))
    for name in DOCKERFILES:
        entries.append(Entry(f"docker run {name}", None, name))
    return entries


def tensorrt_problem() -> str | None:
    from framecast_server.backends.tensorrt.availability import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason()


def needs_tensorrt(entry: Entry) -> bool:
    if entry.pod is None:
        return image(DOCKERFILES[entry.image_name]).backend_tensorrt
    return any("tensorrt" in c.get("args", []) for c in entry.pod["containers"])


ENTRIES = pod_entries()


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache as the init container's download leaves it: the weights and their checksum."""
    cache = tmp_path_factory.mktemp("downloaded")
    write_downloaded_weights(cache)
    return cache


@pytest.fixture(scope="module")
def prepared_cache(weights_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache once an init container has run in it: the weights and the prepared model."""
    from framecast_server.model import ModelSource, prepare_model

    cache = tmp_path_factory.mktemp("prepared") / "cache"
    shutil.copytree(weights_cache, cache)
    prepare_model(ModelSource(require_pretrained=True), cache, allow_download=False)
    return cache


# These start from the weights alone (an init container or the server prepares the model);
# the others find it prepared, as a restarted pod does, which keeps the test short.
FROM_WEIGHTS = {"overlay cpu", "docker run framecast-cpu", "docker run framecast-gpu"}


def port_of(probe: dict[str, Any]) -> int:
    assert "grpc" in probe, f"not a gRPC probe: {probe}"
    return int(probe["grpc"]["port"])


def probe_spec(probe: dict[str, Any]) -> dict[str, Any]:
    return {
        "port": port_of(probe),
        "period_s": probe.get("periodSeconds", 10),
        "failure_threshold": probe.get("failureThreshold", 3),
        "timeout_s": probe.get("timeoutSeconds", 1),
    }


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args``."""
    for i, word in enumerate(args):
        if word == name:
            return args[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def pod_spec(entry: Entry, pod: dict[str, Any], tmp: Path, cache: Path) -> dict[str, Any]:
    """The sandbox's spec for a pod: volumes where they mount, init containers, the server."""
    built = image(DOCKERFILES[entry.image_name])
    (server,) = pod["containers"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    sources: dict[str, Path] = {}
    ca = CertificateAuthority(tmp, "manifest-test")
    issued = ca.issue("framecast.test", server=True, file_stem="server")
    for name, volume in volumes.items():
        if "emptyDir" in volume or "hostPath" in volume:
            # (hostPath: Pod Security "restricted" forbids it; test_kubernetes says so. Here,
            # a directory like any other, so that the arguments are what is judged.)
            sources[name] = cache if name in ("model-cache", "engine-cache") else tmp / name
            sources[name].mkdir(exist_ok=True)
        elif "secret" in volume:
            # The Secret's keys as the kubelet writes them: kubernetes.io/tls, and the tokens.
            directory = tmp / f"secret-{name}"
            directory.mkdir()
            secret = volume["secret"]["secretName"]
            if secret == "framecast-tls":
                shutil.copy(issued.cert, directory / "tls.crt")
                shutil.copy(issued.key, directory / "tls.key")
            elif secret == "framecast-tokens":
                (directory / "tokens").write_text(f"camera:{TOKEN}\n")
            else:
                pytest.fail(f"{entry.name}: a Secret the test does not know: {secret}")
            sources[name] = directory
        else:
            pytest.fail(f"{entry.name}: a volume the test does not know: {volume}")
    mounts: dict[str, str] = {}
    for container in [*pod.get("initContainers", []), server]:
        for mount in container.get("volumeMounts", []):
            known = mounts.setdefault(mount["mountPath"], str(sources[mount["name"]]))
            assert known == str(sources[mount["name"]]), "two volumes at one path"

    def environment(container: dict[str, Any]) -> dict[str, str]:
        env = with_our_python(built.env)
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        return env

    def argv(container: dict[str, Any]) -> list[str]:
        # The kubelet: command replaces ENTRYPOINT, args replace CMD.
        command = container.get("command", built.entrypoint)
        return [*command, *container.get("args", built.cmd)]

    args = server.get("args", built.cmd)
    probes = {
        kind: probe_spec(server[f"{kind}Probe"])
        for kind in ("startup", "readiness", "liveness")
        if f"{kind}Probe" in server
    }
    probes.setdefault("startup", probes.get("readiness") or probes["liveness"])
    tls = flag(args, "--tls-cert") is not None
    return {
        "mounts": [{"source": s, "target": t} for t, s in sorted(mounts.items())],
        "init": [
            {"name": c["name"], "argv": argv(c), "env": environment(c)}
            for c in pod.get("initContainers", [])
        ],
        "argv": argv(server),
        "env": environment(server),
        "probes": probes,
        "grpc_port": int(flag(args, "--port") or 50051),
        "tls_ca": str(ca.cert) if tls else None,
        "token": TOKEN if flag(args, "--auth-tokens") else None,
        "metrics_port": int(flag(args, "--metrics-port") or 0) or None,
        "grace_s": pod.get("terminationGracePeriodSeconds", 30),
    }


def docker_spec(entry: Entry, tmp: Path, cache: Path) -> dict[str, Any]:
    """`docker run -v framecast-cache:/var/cache/framecast IMAGE`: CMD, VOLUME, HEALTHCHECK."""
    built = image(DOCKERFILES[entry.image_name])
    assert built.volumes == ["/var/cache/framecast"]
    args = built.cmd
    health_port = int(flag(built.healthcheck, "--port") or 50051)
    probe = {"port": health_port, "period_s": 10, "failure_threshold": 24, "timeout_s": 5}
    return {
        "mounts": [{"source": str(cache), "target": built.volumes[0]}],
        "init": [],
        "argv": [*built.entrypoint, *args],
        "env": with_our_python(built.env),
        "probes": {"startup": probe},
        "healthcheck": built.healthcheck,
        "grpc_port": int(flag(args, "--port") or 50051),
        "tls_ca": None,
        "token": None,
        "metrics_port": int(flag(args, "--metrics-port") or 0) or None,
        "grace_s": DOCKER_STOP_S,
    }


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_the_entry_point_starts_and_answers_its_probes(
    entry: Entry, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if needs_tensorrt(entry) and (reason := tensorrt_problem()) is not None:
        pytest.skip(f"{entry.name} serves with TensorRT: {reason}")
    problem = sandbox_problem()
    if problem is not None:
        pytest.skip(f"cannot make a pod's namespaces here: {problem}")
    cache = tmp_path / "model-cache"
    seed = "weights_cache" if entry.name in FROM_WEIGHTS else "prepared_cache"
    shutil.copytree(request.getfixturevalue(seed), cache)
    if entry.pod is not None:
        spec = pod_spec(entry, entry.pod, tmp_path, cache)
    else:
        spec = docker_spec(entry, tmp_path, cache)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    spec.update(scratch=str(scratch), log=str(tmp_path / "server.log"))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "--net", "--fork",
         sys.executable, str(SANDBOX), str(spec_file)],
        capture_output=True, text=True, timeout=SANDBOX_TIMEOUT_S, check=False,
    )  # fmt: skip
    log = Path(spec["log"]).read_text() if Path(spec["log"]).exists() else ""
    assert done.returncode == 0, f"{entry.name}: {done.stderr.strip()}\nserver log:\n{log[-3000:]}"
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # The pretrained model the init container prepared (or the volume held), not random weights.
    assert seen["pretrained"] is True, seen
    assert seen["warning"] == ""
    assert seen["classified"] == 1
    assert seen["exit"] == 0
    if spec["tls_ca"]:
        assert seen["plaintext_refused"] is True
    if spec["metrics_port"]:
        assert seen["metrics"] > 0
    assert seen["init"] == [c["name"] for c in (entry.pod or {}).get("initContainers", [])]


def test_without_the_weights_the_init_container_fails_in_one_line(tmp_path: Path) -> None:
    # Where the download cannot happen (HF_HUB_OFFLINE here; closed egress in a cluster), the
    # pod stops at its init container, saying why, instead of serving random weights.
    (entry,) = [e for e in ENTRIES if e.name == "overlay cpu"]
    assert entry.pod is not None
    (init,) = entry.pod["initContainers"]
    env = with_our_python(image(DOCKERFILES[entry.image_name]).env)
    env.update({e["name"]: e["value"] for e in init.get("env", [])})
    env.update(FRAMECAST_CACHE_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    command = [*init.get("command", image(DOCKERFILES[entry.image_name]).entrypoint), *init["args"]]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("framecast prepare-model: pretrained weights are required")
    assert not list(tmp_path.glob("prepared/*.onnx"))
