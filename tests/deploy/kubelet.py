"""A kubelet and a Deployment controller for tests: the rendered manifests run here, as written.

What a cluster would do with ``kubectl kustomize deploy/kubernetes/overlays/<overlay>``, done on
this machine with real processes:

- **Images**: the Dockerfile the container's image is built from gives ENTRYPOINT, CMD, ENV and
  HEALTHCHECK; its install step (``deploy/install.sh``) runs word for word into a virtual
  environment that every container sees at the image's path, ``/opt/framecast``.
- **Pods**: each in a network namespace of its own (an address on a bridge this module makes and
  removes), so every replica binds the same ``--host 0.0.0.0 --port 50051``; each container in
  a mount namespace of its own, its volumes where its ``volumeMounts`` say (emptyDir: a fresh
  directory; secret: files the test gives; persistentVolumeClaim and hostPath: one directory
  per claim or path), missing mount points made on an overlay, never on this machine's disk,
  and the root file system read-only where ``readOnlyRootFilesystem`` says so. Init containers
  run first, in order, and must succeed; then each container's ``command``/``args`` (or the
  image's ENTRYPOINT/CMD) unchanged, its env over the image's ENV.
- **Probes**: startup, readiness and liveness (grpc, exec, tcpSocket) with their delays,
  periods, timeouts and thresholds, from this host to the pod's IP as a kubelet does (a gRPC
  probe is plaintext, as before Kubernetes 1.37). A failed liveness or startup probe, or a
  container that exits, restarts the container (counted).
- **Termination**: the pod leaves the endpoints at once, its preStop hook runs in the
  container, then SIGTERM to the container's main process, then SIGKILL to all its processes
  when ``terminationGracePeriodSeconds`` (counted from the start) is up.
- **Service DNS**: a DNS server on loopback answers the headless Service's name with the ready
  pods' addresses, as cluster DNS does, so clients use ``dns://127.0.0.1:PORT/NAME:PORT``.
- **Deployment**: replicas, a rolling update that follows ``maxSurge``/``maxUnavailable``, and
  a scale-up.

Not emulated (only a real cluster proves these): the container runtime's user namespace and
``runAsUser`` (containers run as root here), cgroup limits, image pulls, scheduling, kube-proxy
and the ClusterIP Service, NetworkPolicy, Pod Security admission.

Needs root (network and mount namespaces), ``ip``, ``nsenter``, ``unshare`` and ``kubectl``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import itertools
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from framecast_server.healthcheck import check as grpc_health_check

from .test_images import exec_form, instructions

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# The PATH of the images' base (python:3.12-slim): what ENV PATH=/opt/framecast/bin:$PATH extends.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_VENV = "/opt/framecast"  # where the Dockerfiles install; the install step names it
NAMESPACE = "default"
CLUSTER_DOMAIN = "cluster.local"


def log(message: str) -> None:
    """A line of the harness' timeline on stdout (pytest shows it with -s or on failure)."""
    print(f"[kubelet {time.strftime('%H:%M:%S')}] {message}", flush=True)


def missing_tools() -> str | None:
    """Why this machine cannot run pods (not root, a tool missing), or None."""
    if os.geteuid() != 0:
        return "network and mount namespaces need root"
    for tool in ("ip", "nsenter", "unshare", "mount", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


# ---------------------------------------------------------------------------------------------
# Manifests


def _load_validate_manifests() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "validate_manifests", ROOT / "scripts" / "validate_manifests.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(overlay: str) -> list[dict[str, Any]]:
    """The overlay's resources, rendered by ``kubectl kustomize`` (scripts/validate_manifests)."""
    resources: list[dict[str, Any]] = _load_validate_manifests().render(overlay)
    return resources


@dataclass(frozen=True)
class Probe:
    """A container probe as the kubelet reads it, defaults filled in."""

    kind: str  # "grpc", "exec" or "tcpSocket"
    port: int | None
    service: str
    command: tuple[str, ...]
    initial_delay_s: float
    period_s: float
    timeout_s: float
    success_threshold: int
    failure_threshold: int

    @classmethod
    def parse(cls, spec: Mapping[str, Any], ports: Mapping[str, int]) -> Probe:
        kinds = [k for k in ("grpc", "exec", "tcpSocket", "httpGet") if k in spec]
        assert len(kinds) == 1, f"a probe has one handler: {spec}"
        kind = kinds[0]
        if kind == "httpGet":
            raise NotImplementedError("httpGet probes are not emulated (Framecast has none)")
        handler = spec[kind]
        port = None
        if kind in ("grpc", "tcpSocket"):
            raw = handler["port"]
            port = ports[raw] if isinstance(raw, str) else int(raw)
        return cls(
            kind=kind,
            port=port,
            service=str(handler.get("service", "")) if kind == "grpc" else "",
            command=tuple(handler["command"]) if kind == "exec" else (),
            initial_delay_s=float(spec.get("initialDelaySeconds", 0)),
            period_s=float(spec.get("periodSeconds", 10)),
            timeout_s=float(spec.get("timeoutSeconds", 1)),
            success_threshold=int(spec.get("successThreshold", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
        )


@dataclass(frozen=True)
class Container:
    """What the kubelet runs for one container of a pod template."""

    name: str
    image: str
    command: tuple[str, ...] | None
    args: tuple[str, ...] | None
    env: tuple[Mapping[str, Any], ...]
    ports: Mapping[str, int]  # by name (unnamed ports under their number)
    startup: Probe | None
    readiness: Probe | None
    liveness: Probe | None
    pre_stop: tuple[str, ...] | None
    mounts: tuple[Mapping[str, Any], ...]
    read_only_root: bool
    working_dir: str | None

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> Container:
        ports = {str(p.get("name", p["containerPort"])): int(p["containerPort"])
                 for p in spec.get("ports", [])}  # fmt: skip
        pre_stop = None
        hook = spec.get("lifecycle", {}).get("preStop")
        if hook is not None:
            if "exec" not in hook:
                raise NotImplementedError(f"only exec preStop hooks are emulated: {hook}")
            pre_stop = tuple(hook["exec"]["command"])

        def probe(name: str) -> Probe | None:
            return Probe.parse(spec[name], ports) if name in spec else None

        return cls(
            name=spec["name"],
            image=spec["image"],
            command=tuple(spec["command"]) if "command" in spec else None,
            args=tuple(spec["args"]) if "args" in spec else None,
            env=tuple(spec.get("env", [])),
            ports=ports,
            startup=probe("startupProbe"),
            readiness=probe("readinessProbe"),
            liveness=probe("livenessProbe"),
            pre_stop=pre_stop,
            mounts=tuple(spec.get("volumeMounts", [])),
            read_only_root=bool(spec.get("securityContext", {}).get("readOnlyRootFilesystem")),
            working_dir=spec.get("workingDir"),
        )


@dataclass(frozen=True)
class PodTemplate:
    containers: tuple[Container, ...]
    init_containers: tuple[Container, ...]
    volumes: Mapping[str, Mapping[str, Any]]
    grace_s: float
    restart_policy: str = "Always"


def _count(value: int | str, replicas: int, *, round_up: bool) -> int:
    """maxSurge / maxUnavailable: a number, or a percentage of the replicas."""
    if isinstance(value, int):
        return value
    percent = float(value.rstrip("%")) * replicas / 100
    return math.ceil(percent) if round_up else math.floor(percent)


@dataclass(frozen=True)
class Deployment:
    name: str
    replicas: int  # spec.replicas, else what the HorizontalPodAutoscaler starts with
    max_replicas: int
    max_surge: int | str
    max_unavailable: int | str
    min_ready_s: float
    template: PodTemplate

    def surge(self, replicas: int) -> int:
        return _count(self.max_surge, replicas, round_up=True)

    def unavailable(self, replicas: int) -> int:
        return _count(self.max_unavailable, replicas, round_up=False)


def deployment(resources: Sequence[Mapping[str, Any]], name: str = "framecast") -> Deployment:
    """The Deployment ``name`` of rendered ``resources``, with its autoscaler's bounds."""
    (found,) = [r for r in resources if r["kind"] == "Deployment" and r["metadata"]["name"] == name]
    spec = found["spec"]
    pod = spec["template"]["spec"]
    hpa = [r["spec"] for r in resources if r["kind"] == "HorizontalPodAutoscaler"
           and r["spec"]["scaleTargetRef"]["name"] == name]  # fmt: skip
    replicas = spec.get("replicas")
    if replicas is None:  # the autoscaler sets it; without one the API server's default is 1
        replicas = hpa[0].get("minReplicas", 1) if hpa else 1
    strategy = spec.get("strategy", {})
    assert strategy.get("type", "RollingUpdate") == "RollingUpdate", strategy
    rolling = strategy.get("rollingUpdate", {})
    return Deployment(
        name=name,
        replicas=int(replicas),
        max_replicas=int(hpa[0]["maxReplicas"]) if hpa else int(replicas) + 1,
        max_surge=rolling.get("maxSurge", "25%"),
        max_unavailable=rolling.get("maxUnavailable", "25%"),
        min_ready_s=float(spec.get("minReadySeconds", 0)),
        template=PodTemplate(
            containers=tuple(Container.parse(c) for c in pod["containers"]),
            init_containers=tuple(Container.parse(c) for c in pod.get("initContainers", [])),
            volumes={v["name"]: v for v in pod.get("volumes", [])},
            grace_s=float(pod.get("terminationGracePeriodSeconds", 30)),
            restart_policy=pod.get("restartPolicy", "Always"),
        ),
    )


@dataclass(frozen=True)
class ServiceName:
    """A headless Service: the DNS name clients use and the port they dial."""

    fqdn: str
    port: int


def headless_service(resources: Sequence[Mapping[str, Any]], template: PodTemplate) -> ServiceName:
    """The headless Service of ``resources``, its port resolved against the pods' ports."""
    (service,) = [r for r in resources
                  if r["kind"] == "Service" and r["spec"].get("clusterIP") == "None"]  # fmt: skip
    port = service["spec"]["ports"][0]
    target = port.get("targetPort", port["port"])
    if isinstance(target, str):
        target = next(c.ports[target] for c in template.containers if target in c.ports)
    # A headless Service's DNS answers with pod addresses: the client dials the target port.
    name = service["metadata"]["name"]
    return ServiceName(f"{name}.{NAMESPACE}.svc.{CLUSTER_DOMAIN}", int(target))


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class HealthCheck:
    command: tuple[str, ...]
    interval_s: float
    timeout_s: float
    start_period_s: float
    retries: int


@dataclass(frozen=True)
class Image:
    """The final stage of a Dockerfile, as a container runtime reads it."""

    dockerfile: Path
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str
    volumes: tuple[str, ...]
    healthcheck: HealthCheck | None
    install: str  # the RUN line that runs deploy/install.sh


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def _seconds(text: str) -> float:
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[unit] for n, unit in _DURATION.findall(text))


def _env_pairs(arguments: str) -> list[tuple[str, str]]:
    words = shlex.split(arguments)
    if len(words) == 2 and "=" not in words[0]:  # ENV KEY VALUE
        return [(words[0], words[1])]
    return [tuple(w.split("=", 1)) for w in words]  # type: ignore[misc]


def image(dockerfile: Path) -> Image:
    """ENTRYPOINT, CMD, ENV, WORKDIR, VOLUME and HEALTHCHECK of ``dockerfile``'s final stage."""
    steps = instructions(dockerfile)
    install = next(a for i, a in steps if i == "RUN" and "deploy/install.sh" in a)
    final = max(n for n, (i, _) in enumerate(steps) if i == "FROM")
    env = {"PATH": BASE_PATH}
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    workdir = "/"
    volumes: list[str] = []
    health = None
    for instruction, arguments in steps[final:]:
        if instruction == "ENV":
            for key, value in _env_pairs(arguments):
                env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
        elif instruction == "ENTRYPOINT":
            entrypoint, cmd = tuple(exec_form(arguments)), ()  # a new ENTRYPOINT resets CMD
        elif instruction == "CMD":
            cmd = tuple(exec_form(arguments))
        elif instruction == "WORKDIR":
            workdir = arguments.strip()
        elif instruction == "VOLUME":
            volumes.extend(exec_form(arguments) if "[" in arguments else arguments.split())
        elif instruction == "HEALTHCHECK":
            options = dict(re.findall(r"--([\w-]+)=(\S+)", arguments))
            health = HealthCheck(
                command=tuple(exec_form(arguments[arguments.index("CMD") + 3 :])),
                interval_s=_seconds(options.get("interval", "30s")),
                timeout_s=_seconds(options.get("timeout", "30s")),
                start_period_s=_seconds(options.get("start-period", "0s")),
                retries=int(options.get("retries", "3")),
            )
    return Image(dockerfile, entrypoint, cmd, env, workdir, tuple(volumes), health, install)


def dockerfile_for(image_name: str) -> Path:
    """The Dockerfile an image of the manifests is built from (framecast-cpu: cpu.Dockerfile)."""
    match = re.fullmatch(r"framecast-(\w+)(:[\w.-]+)?", image_name)
    assert match, f"no Dockerfile builds {image_name}"
    return DEPLOY / f"{match.group(1)}.Dockerfile"


# ---------------------------------------------------------------------------------------------
# Mount namespaces


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = False


def mount_script(mounts: Sequence[Mount], scratch: Path, *, read_only_root: bool) -> str:
    """Shell lines that put ``mounts`` in place inside a fresh mount namespace.

    ``scratch`` is an empty directory: a tmpfs goes over it (only inside the namespace) and
    holds the sources' staging points and the overlays' upper layers. A mount point that does
    not exist is made on an overlay of its nearest existing parent, so this machine's disk is
    never written.
    """
    lines = ["set -e", f"mount -t tmpfs -o mode=755 framecast-scratch {shlex.quote(str(scratch))}"]
    staged: list[tuple[str, Mount]] = []
    for n, m in enumerate(mounts):
        # Staged first: a later mount (on /tmp, say) may hide the source's own path.
        stage = f"{scratch}/src{n}"
        make = "mkdir" if m.source.is_dir() else "touch"
        lines += [f"{make} {shlex.quote(stage)}",
                  f"mount --bind {shlex.quote(str(m.source))} {shlex.quote(stage)}"]  # fmt: skip
        staged.append((stage, m))
    missing = [m.target for m in mounts if not os.path.lexists(m.target)]
    overlays: list[str] = []
    for target in missing:
        parent = os.path.dirname(target)
        while not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        assert parent != "/", f"will not lay an overlay over / for {target}"
        if parent not in overlays:
            overlays.append(parent)
    for n, parent in enumerate(sorted(overlays, key=lambda p: p.count("/"))):
        upper, work = f"{scratch}/overlay{n}/upper", f"{scratch}/overlay{n}/work"
        lines += [f"mkdir -p {upper} {work}",
                  f"mount -t overlay framecast-overlay -o lowerdir={parent},upperdir={upper},"
                  f"workdir={work} {shlex.quote(parent)}"]  # fmt: skip
    for _, m in staged:
        if m.target in missing:
            make = "mkdir -p" if m.source.is_dir() else "touch"
            lines.append(f"{make} {shlex.quote(m.target)}")

    def order(item: tuple[str, Mount]) -> tuple[bool, int]:
        # Parents before children; a mount that hides the scratch directory last of all.
        target = item[1].target.rstrip("/") + "/"
        return (str(scratch).startswith(target), target.count("/"))

    for stage, m in sorted(staged, key=order):
        target = shlex.quote(m.target)
        lines.append(f"mount --bind {shlex.quote(stage)} {target}")
        if m.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    if read_only_root:
        lines.append("mount -o remount,bind,ro /")
    return "\n".join(lines)


def run_in_mounts(
    mounts: Sequence[Mount], scratch: Path, command: Sequence[str], *, cwd: str = "/",
    env: Mapping[str, str] | None = None, timeout: float = 900,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``command`` in a private mount namespace with ``mounts`` (this host's network)."""
    script = mount_script(mounts, scratch, read_only_root=False)
    script += f'\ncd {shlex.quote(cwd)}\nexec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *command],
        env=dict(env) if env is not None else None, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def install_image(image_: Image, venv: Path, scratch: Path) -> None:
    """The Dockerfile's install RUN line, word for word, with ``venv`` at /opt/framecast."""
    venv.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    done = run_in_mounts(
        [Mount(venv, IMAGE_VENV)], scratch, ["sh", "-c", image_.install], cwd=str(ROOT)
    )
    assert done.returncode == 0, f"{image_.install}:\n{done.stdout}{done.stderr}"


# ---------------------------------------------------------------------------------------------
# Network: a bridge on this host, one namespace per pod


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Network:
    """A bridge with a private /24 of its own and a network namespace per pod on it.

    Names carry this process's id: namespaces and bridges left by a test process that died
    (killed before its cleanup), and the processes still in them, are removed when the next
    one starts.
    """

    PREFIX = "fck"

    def __init__(self) -> None:
        self.tag = f"{os.getpid():x}"
        self.bridge = f"{self.PREFIX}{self.tag}"
        self.subnet = self._free_subnet()
        hosts = self.subnet.hosts()
        self.gateway = next(hosts)
        self._addresses = iter(hosts)
        self._namespaces: list[str] = []
        self._count = itertools.count()
        self._lock = threading.Lock()

    @classmethod
    def sweep(cls) -> None:
        """Remove the namespaces and bridges of test processes that are gone."""
        for line in _ip("netns", "list").stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            match = re.fullmatch(rf"{cls.PREFIX}([0-9a-f]+)-\d+", name)
            if match and not _pid_alive(int(match.group(1), 16)):
                # Its pods' processes outlived the test that started them: they end with it.
                for pid in _ip("netns", "pids", name, check=False).stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                _ip("netns", "del", name, check=False)
        for line in _ip("-o", "link", "show", "type", "bridge").stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            match = re.fullmatch(rf"{cls.PREFIX}([0-9a-f]+)", name)
            if match and not _pid_alive(int(match.group(1), 16)):
                _ip("link", "del", name, check=False)

    @staticmethod
    def _free_subnet() -> ipaddress.IPv4Network:
        used = [ipaddress.ip_network(word, strict=False)
                for word in _ip("-4", "-o", "addr").stdout.split() if "/" in word]  # fmt: skip
        used += [ipaddress.ip_network(line.split()[0])
                 for line in _ip("-4", "route").stdout.splitlines()
                 if line and line.split()[0] != "default"]  # fmt: skip
        rng = random.Random(os.getpid())
        for _ in range(100):
            candidate = ipaddress.IPv4Network(
                f"10.{rng.randrange(64, 250)}.{rng.randrange(256)}.0/24"
            )
            if not any(candidate.overlaps(u) for u in used):
                return candidate
        raise RuntimeError("no free private /24 for the test's pods")

    def __enter__(self) -> Network:
        self.sweep()
        _ip("link", "add", self.bridge, "type", "bridge")
        try:
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            _ip("link", "del", self.bridge, check=False)
            raise
        return self

    def add(self) -> tuple[str, str]:
        """A new namespace on the bridge: (its name, its address)."""
        with self._lock:
            n = next(self._count)
            address = str(next(self._addresses))
            namespace = f"{self.PREFIX}{self.tag}-{n}"
            self._namespaces.append(namespace)
        host_end = f"fcv{self.tag}x{n}"[:15]
        _ip("netns", "add", namespace)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("link", "set", host_end, "master", self.bridge, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        return namespace, address

    def remove(self, namespace: str) -> None:
        """Remove a pod's namespace (its veth pair goes with it)."""
        _ip("netns", "del", namespace, check=False)
        with self._lock:
            if namespace in self._namespaces:
                self._namespaces.remove(namespace)

    def __exit__(self, *exc_info: object) -> None:
        for namespace in list(self._namespaces):
            self.remove(namespace)
        _ip("link", "del", self.bridge, check=False)


# ---------------------------------------------------------------------------------------------
# Cluster DNS


class ClusterDns:
    """A DNS server on loopback answering A queries for names with the addresses it is given.

    What cluster DNS does for a headless Service: the ready endpoints' addresses, TTL 0 (a
    client asks again when it wants to), NXDOMAIN for names it does not know.
    """

    def __init__(self) -> None:
        self._records: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self.queries = 0
        self.asked: list[float] = []  # when each A query came (time.monotonic())
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = int(self._socket.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cluster-dns", daemon=True)

    def set(self, name: str, addresses: Sequence[str]) -> None:
        with self._lock:
            self._records[name.rstrip(".").lower()] = list(addresses)

    def target(self, service: ServiceName) -> str:
        """The gRPC target that resolves ``service`` through this server."""
        return f"dns://127.0.0.1:{self.port}/{service.fqdn}:{service.port}"

    def __enter__(self) -> ClusterDns:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(Exception):  # a malformed query gets no answer
                self._socket.sendto(self._answer(data), peer)

    def _answer(self, query: bytes) -> bytes:
        ident, flags, questions = struct.unpack("!HHH", query[:6])
        assert questions == 1
        offset, labels = 12, []
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1 : offset + 1 + length].decode("ascii"))
            offset += 1 + length
        qtype, _ = struct.unpack("!HH", query[offset + 1 : offset + 5])
        question = query[12 : offset + 5]
        with self._lock:
            self.queries += 1
            if qtype == 1:
                self.asked.append(time.monotonic())
            addresses = self._records.get(".".join(labels).lower())
        rd = flags & 0x0100
        if addresses is None:
            return struct.pack("!HHHHHH", ident, 0x8483 | rd, 1, 0, 0, 0) + question
        answers = [b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton(a)
                   for a in addresses] if qtype == 1 else []  # fmt: skip
        header = struct.pack("!HHHHHH", ident, 0x8480 | rd, 1, len(answers), 0, 0)
        return header + question + b"".join(answers)


# ---------------------------------------------------------------------------------------------
# Pods


@dataclass
class Secrets:
    """The Secrets of the test's cluster: name -> file name -> bytes."""

    data: dict[str, dict[str, bytes]] = field(default_factory=dict)


# Called with a volume's name and directory when the volume is made: what the test puts there.
Seed = Callable[[str, Path], None]


class Node:
    """One node's disk: the image's environment, hostPath directories, volume claims, pods."""

    def __init__(self, root: Path, venv: Path, secrets: Secrets, seed: Seed | None) -> None:
        self.root = root
        self.venv = venv
        self.secrets = secrets
        self.seed = seed
        self._lock = threading.Lock()

    def directory(self, kind: str, key: str) -> Path:
        """A directory that outlives pods: a hostPath's or a persistent volume claim's."""
        with self._lock:
            path = self.root / kind / key.strip("/").replace("/", "_")
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
            return path

    def volume(self, pod_dir: Path, name: str, spec: Mapping[str, Any]) -> Path:
        """A pod's volume ``name`` as a directory on this node, seeded by the test."""
        path = self._volume(pod_dir, name, spec)
        if self.seed is not None:
            self.seed(name, path)
        return path

    def _volume(self, pod_dir: Path, name: str, spec: Mapping[str, Any]) -> Path:
        if "emptyDir" in spec or "ephemeral" in spec:
            path = pod_dir / "volumes" / name
            path.mkdir(parents=True)
            path.chmod(0o777)  # as the kubelet makes an emptyDir
            return path
        if "hostPath" in spec:
            return self.directory("hostpath", spec["hostPath"]["path"])
        if "persistentVolumeClaim" in spec:
            return self.directory("pvc", spec["persistentVolumeClaim"]["claimName"])
        if "secret" in spec:
            secret = spec["secret"]
            path = pod_dir / "volumes" / name
            path.mkdir(parents=True)
            data = self.secrets.data.get(secret["secretName"])
            if data is None:
                assert secret.get("optional"), f"Secret {secret['secretName']} is not in the test"
                return path
            items = secret.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                target = path / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data[item["key"]])
                target.chmod(item.get("mode", secret.get("defaultMode", 0o644)))
            return path
        raise NotImplementedError(f"volume {name}: {sorted(spec)} is not emulated")


def container_env(container: Container, image_: Image, pod: Pod) -> dict[str, str]:
    """The image's ENV, then the container's env, as the runtime merges them."""
    env = dict(image_.env)
    env["HOSTNAME"] = pod.name
    for entry in container.env:
        if "value" in entry:
            env[entry["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(entry["value"])
            )
        elif "valueFrom" in entry and "fieldRef" in entry["valueFrom"]:
            path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            fields = {"status.podIP": pod.ip, "metadata.name": pod.name,
                      "metadata.namespace": NAMESPACE}  # fmt: skip
            env[entry["name"]] = fields[path]
        else:
            raise NotImplementedError(f"env {entry['name']}: {entry} is not emulated")
    return env


class ContainerProcess:
    """A running container: its main process (the container's PID 1) and its process group."""

    def __init__(self, pod: Pod, container: Container, image_: Image, run_dir: Path) -> None:
        self.container = container
        self.env = container_env(container, image_, pod)
        self.argv = [*(container.command if container.command is not None else image_.entrypoint),
                     *(container.args if container.args is not None
                       else (image_.cmd if container.command is None else ()))]  # fmt: skip
        run_dir.mkdir(parents=True)
        mounts = [Mount(pod.node.venv, IMAGE_VENV, read_only=True)]
        for mount in container.mounts:
            source = pod.volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            mounts.append(Mount(source, mount["mountPath"], bool(mount.get("readOnly"))))
        scratch = run_dir / "scratch"
        scratch.mkdir()
        workdir = container.working_dir or image_.workdir
        script = mount_script(mounts, scratch, read_only_root=container.read_only_root)
        script += f'\ncd {shlex.quote(workdir)}\nexec "$@"'
        self.log_path = run_dir / "log"
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", pod.namespace, "sh", "-c", script, "sh", *self.argv],
                env=self.env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: what SIGKILL ends
            )  # fmt: skip
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def exec(self, command: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the container (its mounts and network), with its env."""
        return subprocess.run(
            ["nsenter", "--target", str(self.pid), "--mount", "--net", "--",
             "sh", "-c", 'cd /; exec "$@"', "sh", *command],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def signal_main(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)


@dataclass
class Termination:
    """How a pod's termination went (times in seconds from its start)."""

    pre_stop_s: float = 0.0
    exited_s: float | None = None  # after deletion began
    exit_code: int | None = None
    killed: bool = False  # SIGKILL at the grace period


class Pod:
    """A pod of the Deployment's template on this node: init containers, containers, probes."""

    def __init__(self, name: str, template: PodTemplate, node: Node, network: Network) -> None:
        self.name = name
        self.template = template
        self.node = node
        self.network = network
        self.dir = node.root / "pods" / name
        self.dir.mkdir(parents=True)
        self.namespace, self.ip = network.add()
        self.volumes = {n: node.volume(self.dir, n, spec) for n, spec in template.volumes.items()}
        self.containers: dict[str, ContainerProcess] = {}
        self.started: dict[str, bool] = {}
        self.ready_by: dict[str, bool] = {}
        self.restarts = 0
        self.restart_reasons: list[str] = []
        self.events: list[str] = []
        self.created = time.monotonic()
        self.ready_at: float | None = None
        self.termination: Termination | None = None
        self.terminating = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.failed: str | None = None

    def event(self, text: str) -> None:
        line = f"{self.name} ({self.ip}) +{time.monotonic() - self.created:.1f}s: {text}"
        self.events.append(line)
        log(line)

    @property
    def ready(self) -> bool:
        return (
            not self.terminating.is_set()
            and len(self.ready_by) == len(self.template.containers)
            and all(self.ready_by.values())
        )

    def _image(self, container: Container) -> Image:
        return image(dockerfile_for(container.image))

    def start(self) -> None:
        """Init containers in order, then the containers and their probes (in a thread)."""
        thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        try:
            for n, init in enumerate(self.template.init_containers):
                process = ContainerProcess(self, init, self._image(init), self.dir / f"init{n}")
                self.event(f"init container {init.name}: {shlex.join(process.argv)}")
                try:
                    code = process.process.wait(timeout=600)
                finally:
                    process.kill_all()
                if code != 0:
                    self.failed = f"init container {init.name} exited {code}:\n{process.log_tail()}"
                    self.event(self.failed)
                    return
                self.event(f"init container {init.name} succeeded")
            for container in self.template.containers:
                self._start_container(container)
        except Exception as exc:  # the test reads pod.failed
            self.failed = f"{type(exc).__name__}: {exc}"
            self.event(self.failed)

    def _start_container(self, container: Container) -> None:
        run = self.dir / f"{container.name}-{self.restarts}"
        process = ContainerProcess(self, container, self._image(container), run)
        self.containers[container.name] = process
        self.started[container.name] = container.startup is None
        self.ready_by[container.name] = container.readiness is None
        self.event(f"container {container.name}: {shlex.join(process.argv)}")
        for kind in ("startup", "readiness", "liveness"):
            probe = getattr(container, kind)
            if probe is not None:
                thread = threading.Thread(
                    target=self._probe_loop, args=(container, process, kind, probe), daemon=True,
                    name=f"{kind}-{self.name}",
                )  # fmt: skip
                self._threads.append(thread)
                thread.start()
        watcher = threading.Thread(target=self._watch, args=(container, process), daemon=True)
        self._threads.append(watcher)
        watcher.start()

    def _probe_once(self, process: ContainerProcess, probe: Probe) -> bool:
        try:
            if probe.kind == "grpc":
                status = grpc_health_check(
                    f"{self.ip}:{probe.port}", service=probe.service, timeout=probe.timeout_s
                )
                return status == "SERVING"
            if probe.kind == "tcpSocket":
                with socket.create_connection((self.ip, probe.port or 0), probe.timeout_s):
                    return True
            return process.exec(probe.command, timeout=probe.timeout_s).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _probe_loop(
        self, container: Container, process: ContainerProcess, kind: str, probe: Probe
    ) -> None:
        name = container.name
        if self._stop.wait(probe.initial_delay_s):
            return
        successes = failures = 0
        while not self._stop.is_set() and self.containers.get(name) is process:
            began = time.monotonic()
            # Readiness and liveness wait for the startup probe, as the kubelet's do.
            if kind == "startup" or self.started.get(name):
                ok = self._probe_once(process, probe)
                if self._stop.is_set() or self.containers.get(name) is not process:
                    return
                successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
                if kind == "startup" and not self.started[name]:
                    if successes >= 1:
                        self.started[name] = True
                        self.event(f"{name} started (startup probe)")
                        return
                    if failures >= probe.failure_threshold:
                        self._restart(container, process, "startup probe failed")
                        return
                elif kind == "readiness":
                    if ok and successes >= probe.success_threshold and not self.ready_by[name]:
                        self.ready_by[name] = True
                        self.event(f"{name} ready")
                        if self.ready_at is None and self.ready:
                            self.ready_at = time.monotonic()
                    elif not ok and failures >= probe.failure_threshold and self.ready_by[name]:
                        self.ready_by[name] = False
                        self.event(f"{name} not ready ({failures} failed probes)")
                elif kind == "liveness" and failures >= probe.failure_threshold:
                    self._restart(container, process, "liveness probe failed")
                    return
            self._stop.wait(max(0.0, probe.period_s - (time.monotonic() - began)))

    def _watch(self, container: Container, process: ContainerProcess) -> None:
        code = process.process.wait()
        if self._stop.is_set() or self.terminating.is_set():
            return
        if self.containers.get(container.name) is process:
            self._restart(container, process, f"exited {code}:\n{process.log_tail()}")

    def _restart(self, container: Container, process: ContainerProcess, why: str) -> None:
        if self.terminating.is_set() or self.containers.get(container.name) is not process:
            return
        self.ready_by[container.name] = False
        if self.template.restart_policy == "Never":
            self.failed = f"{container.name} {why}"
            self.event(self.failed)
            self._stop_container(process)
            return
        self.restarts += 1
        self.restart_reasons.append(f"{container.name} {why}")
        # The kubelet's crash loop back-off: 10 s, doubling, at most 5 min.
        delay = min(300.0, 10.0 * 2 ** (self.restarts - 1))
        self.event(f"{container.name} restarts in {delay:.0f}s: {why}")
        self._stop_container(process)
        if not self._stop.wait(delay) and not self.terminating.is_set():
            self._start_container(container)

    def _stop_container(self, process: ContainerProcess) -> Termination:
        """preStop, SIGTERM, SIGKILL at the grace period: what the kubelet does to stop it."""
        began = time.monotonic()
        deadline = began + self.template.grace_s
        result = Termination()
        if process.container.pre_stop is not None and process.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.exec(process.container.pre_stop, timeout=self.template.grace_s)
            result.pre_stop_s = time.monotonic() - began
        process.signal_main(signal.SIGTERM)
        try:
            result.exit_code = process.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            result.killed = True
        process.kill_all()  # SIGKILL to whatever is left of it
        if result.exit_code is None:
            result.exit_code = process.process.wait()
        result.exited_s = time.monotonic() - began
        return result

    def terminate(self) -> Termination:
        """Delete the pod: out of the endpoints (the caller), preStop, SIGTERM, SIGKILL."""
        self.terminating.set()
        self.event("terminating")
        results = [self._stop_container(p) for p in list(self.containers.values())]
        self._stop.set()
        self.termination = results[0] if results else Termination()
        t = self.termination
        self.event(
            f"terminated: preStop {t.pre_stop_s:.1f}s, exited {t.exit_code} after "
            f"{t.exited_s or 0:.1f}s{' (SIGKILL at the grace period)' if t.killed else ''}"
        )
        self.network.remove(self.namespace)
        return self.termination

    def kill(self) -> None:
        """Cleanup after a test: everything of this pod ends now."""
        self.terminating.set()
        self._stop.set()
        for process in self.containers.values():
            process.kill_all()
        self.network.remove(self.namespace)

    def scrape(self, port: int) -> str:
        with urllib.request.urlopen(f"http://{self.ip}:{port}/metrics", timeout=10) as reply:
            return str(reply.read().decode())


# ---------------------------------------------------------------------------------------------
# The Deployment controller


class Cluster:
    """A Deployment's pods on one node, the endpoints of its headless Service in DNS."""

    def __init__(
        self, resources: Sequence[Mapping[str, Any]], node: Node, network: Network,
        dns: ClusterDns,
    ) -> None:  # fmt: skip
        self.deployment = deployment(resources)
        self.service = headless_service(resources, self.deployment.template)
        self.node = node
        self.network = network
        self.dns = dns
        self.pods: list[Pod] = []  # not terminating
        self.gone: list[Pod] = []
        self.revision = 1
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._endpoints = threading.Thread(target=self._sync_endpoints, daemon=True)
        self.replicas = self.deployment.replicas
        self.endpoint_changes: list[tuple[float, list[str]]] = []

    @property
    def target(self) -> str:
        return self.dns.target(self.service)

    def __enter__(self) -> Cluster:
        self.dns.set(self.service.fqdn, [])
        self._endpoints.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._endpoints.join(timeout=5)
        for pod in self.pods + self.gone:
            pod.kill()

    def _sync_endpoints(self) -> None:
        """The endpoints controller and cluster DNS: the ready pods' addresses, kept current."""
        current: list[str] = []
        while not self._stop.wait(0.1):
            with self._lock:
                ready = [p.ip for p in self.pods if p.ready]
            if ready != current:
                current = ready
                self.dns.set(self.service.fqdn, ready)
                self.endpoint_changes.append((time.monotonic(), ready))
                log(f"endpoints: {', '.join(ready) or 'none'}")

    def add_pod(self) -> Pod:
        name = f"{self.deployment.name}-r{self.revision}-{next(self._names)}"
        pod = Pod(name, self.deployment.template, self.node, self.network)
        with self._lock:
            self.pods.append(pod)
        pod.start()
        return pod

    def delete_pod(self, pod: Pod) -> threading.Thread:
        """Delete ``pod``: it leaves the endpoints now, its termination runs on a thread."""
        with self._lock:
            self.pods.remove(pod)
            self.gone.append(pod)
        pod.terminating.set()
        thread = threading.Thread(target=pod.terminate, daemon=True, name=f"delete-{pod.name}")
        thread.start()
        return thread

    def _check(self) -> None:
        """A pod that failed, or restarted (the kubelet would crash-loop it): the test's failure."""
        for pod in self.pods:
            if pod.failed:
                raise AssertionError(f"pod {pod.name} failed: {pod.failed}")
            if pod.restart_reasons:
                raise AssertionError(f"pod {pod.name} restarted: {pod.restart_reasons[0]}")

    def available(self, pods: Sequence[Pod]) -> list[Pod]:
        now = time.monotonic()
        return [p for p in pods if p.ready and p.ready_at is not None
                and now - p.ready_at >= self.deployment.min_ready_s]  # fmt: skip

    def wait_available(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.available(self.pods)) < count:
            self._check()
            if time.monotonic() > deadline:
                states = "; ".join(f"{p.name}: {p.events[-1:] or 'no events'}" for p in self.pods)
                raise AssertionError(f"{count} pods not available in {timeout:.0f}s: {states}")
            time.sleep(0.2)

    def create(self, timeout: float) -> None:
        """The Deployment's first rollout: all its replicas, available."""
        for _ in range(self.replicas):
            self.add_pod()
        self.wait_available(self.replicas, timeout)

    def scale(self, replicas: int, timeout: float) -> list[Pod]:
        """Scale up to ``replicas`` (as the autoscaler would): the new pods, once available."""
        assert self.replicas < replicas <= self.deployment.max_replicas
        added = [self.add_pod() for _ in range(replicas - self.replicas)]
        self.replicas = replicas
        self.wait_available(replicas, timeout)
        return added

    def rolling_update(self, timeout: float) -> list[threading.Thread]:
        """Replace every pod with one of a new revision, within maxSurge and maxUnavailable."""
        self.revision += 1
        deadline = time.monotonic() + timeout
        want = self.replicas
        surge = self.deployment.surge(want)
        min_available = want - self.deployment.unavailable(want)
        assert surge + self.deployment.unavailable(want) > 0, "maxSurge and maxUnavailable are 0"
        deletions: list[threading.Thread] = []
        prefix = f"{self.deployment.name}-r{self.revision}-"
        while True:
            self._check()
            new = [p for p in self.pods if p.name.startswith(prefix)]
            old = [p for p in self.pods if not p.name.startswith(prefix)]
            if not old and len(self.available(new)) == want:
                return deletions
            assert time.monotonic() < deadline, f"the rollout did not finish in {timeout:.0f}s"
            # Scale the new revision up as far as maxSurge allows.
            while len(old) + len(new) < want + surge and len(new) < want:
                new.append(self.add_pod())
            # Scale the old one down as far as maxUnavailable allows: unready pods first.
            available = len(self.available(self.pods))
            for pod in sorted(old, key=lambda p: p.ready):
                if not pod.ready or available - 1 >= min_available:
                    if pod.ready:
                        available -= 1
                    deletions.append(self.delete_pod(pod))
                    old.remove(pod)
            time.sleep(0.2)


def metric_value(text: str, name: str, labels: Mapping[str, str]) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` in a scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


@contextlib.contextmanager
def node(
    root: Path, venv: Path, secrets: Secrets, seed: Seed | None
) -> Iterator[tuple[Node, Network, ClusterDns]]:
    """A node with its network and cluster DNS; everything is removed on the way out."""
    with Network() as network, ClusterDns() as dns:
        yield Node(root, venv, secrets, seed), network, dns
