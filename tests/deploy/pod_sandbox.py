"""Run one container's command as its pod would, inside namespaces of the test's own.

    unshare --user --map-root-user --mount --net --fork python pod_sandbox.py SPEC.json

The caller (tests/deploy/test_manifest_args.py) writes SPEC.json from a rendered manifest or a
Dockerfile. Here, in a private mount and network namespace (no root needed, nothing outside
changes): the loopback interface comes up and nothing else (no network, so no download can
happen); the volumes are bind-mounted at the paths the manifest mounts them (a writable
overlay over /etc or /var/cache lets their directories be made); the init containers run, then
the container with its arguments unchanged. Its probes are asked as the kubelet asks them
(grpc.health.v1, plaintext, on the probe's port; the startup probe within period x threshold),
a Docker HEALTHCHECK command is run as written, then the SDK calls the gRPC port (with TLS and
a token when the arguments ask for them) and /metrics is read; SIGTERM must end the server
within the pod's grace period with status 0. Prints one JSON line of what it saw; any failure
is a message on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]

# The kubelet allows a startup probe period x threshold; a test has less patience.
MAX_STARTUP_S = 240.0
POLL_S = 0.2


class PodFailedError(Exception):
    """What went wrong, for the test's message."""


def mount_volumes(mounts: list[dict[str, str]], scratch: Path) -> None:
    """Bind each volume's directory at its mount path, making missing directories on the way."""
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(scratch)], check=True)
    overlaid: set[Path] = set()
    ours = [scratch, *(Path(m["source"]) for m in mounts)]

    def hides_ours(mount: dict[str, str]) -> bool:
        return any(path.is_relative_to(mount["target"]) for path in ours)

    # This checkout and its Python must stay visible under a volume mounted above them (a clone
    # under /tmp, as CI's may be, under the pod's /tmp emptyDir): each is held open before the
    # volume covers it and bound back at its own path inside the volume after.
    wanted = {Path(p).resolve() for p in (ROOT, sys.prefix, sys.base_prefix)}
    keep = {p for p in wanted if not any(p != q and p.is_relative_to(q) for q in wanted)}

    # A volume at /tmp would hide the test's directories there: it goes last.
    for mount in sorted(mounts, key=hides_ours):
        target = Path(mount["target"])
        covered = {path: os.open(path, os.O_PATH) for path in keep if path.is_relative_to(target)}
        if not target.is_dir():
            existing = target
            while not existing.exists():
                existing = existing.parent
            if not any(existing.is_relative_to(done) for done in overlaid):
                # A writable layer over the existing directory (e.g. /etc), private to us.
                name = str(len(overlaid))
                upper, work = scratch / f"upper{name}", scratch / f"work{name}"
                upper.mkdir()
                work.mkdir()
                options = f"lowerdir={existing},upperdir={upper},workdir={work}"
                subprocess.run(
                    ["mount", "-t", "overlay", "overlay", "-o", options, str(existing)], check=True
                )
                overlaid.add(existing)
            target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", mount["source"], str(target)], check=True)
        for path, held in covered.items():
            path.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    "mount",
                    "--no-canonicalize",
                    "--bind",
                    f"/proc/{os.getpid()}/fd/{held}",
                    str(path),
                ],
                check=True,
            )
            os.close(held)


def health(port: int, timeout: float) -> str:
    """The probe's view: grpc.health.v1 Check on the pod's loopback, plaintext, no token."""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
    except grpc.RpcError as exc:
        return f"no answer ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_startup(server: subprocess.Popen[bytes], probe: dict[str, Any]) -> float:
    """Ask the startup probe until it says SERVING; returns the seconds it took."""
    started = time.monotonic()
    budget = min(MAX_STARTUP_S, probe["period_s"] * probe["failure_threshold"])
    last = ""
    while time.monotonic() - started < budget:
        if server.poll() is not None:
            code = server.returncode
            raise PodFailedError(f"the server exited with {code} before its probe passed")
        last = health(probe["port"], probe["timeout_s"])
        if last == "SERVING":
            return time.monotonic() - started
        time.sleep(POLL_S)
    raise PodFailedError(f"the startup probe on port {probe['port']} never passed (last: {last})")


def call_the_service(spec: dict[str, Any]) -> dict[str, Any]:
    """What a client sees on the gRPC port: the model, and one classification."""
    from framecast_client import TLS, Client

    tls = TLS(ca=Path(spec["tls_ca"])) if spec.get("tls_ca") else None
    address = f"127.0.0.1:{spec['grpc_port']}"
    with Client(address, tls=tls, token=spec.get("token"), timeout=60) as client:
        info = client.model_info()
        frame = np.zeros((1, 224, 224, 3), dtype=np.uint8)
        (result,) = client.classify_preprocessed(frame, top_k=1)
    return {
        "model": info.name,
        "pretrained": info.pretrained,
        "warning": info.warning,
        "backend": info.backend,
        "classified": len(result.predictions),
    }


def refuses_plaintext(port: int) -> bool:
    """Whether the gRPC port refuses a plaintext health check (it serves TLS)."""
    return health(port, 5.0) != "SERVING"


def run(spec: dict[str, Any]) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # A volume at /tmp hides the test's files there: the log is opened and the CA's directory
    # held open before the mounts, and the CA is read through that descriptor after them.
    log = open(spec["log"], "wb")  # noqa: SIM115 (the server's output, closed below)
    if spec.get("tls_ca"):
        ca = Path(spec["tls_ca"])
        held = os.open(ca.parent, os.O_PATH)
        spec["tls_ca"] = f"/proc/self/fd/{held}/{ca.name}"
    mount_volumes(spec["mounts"], Path(spec["scratch"]))
    env = spec["env"]
    seen: dict[str, Any] = {"init": []}
    for init in spec["init"]:
        done = subprocess.run(init["argv"], env=init["env"], capture_output=True, timeout=600)
        if done.returncode != 0:
            raise PodFailedError(
                f"init container {init['name']} exited with {done.returncode}: "
                f"{done.stderr.decode(errors='replace')[-2000:]}"
            )
        seen["init"].append(init["name"])
    server = subprocess.Popen(spec["argv"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        seen["startup_s"] = round(wait_startup(server, spec["probes"]["startup"]), 1)
        for kind in ("readiness", "liveness"):
            probe = spec["probes"].get(kind)
            if probe is not None:
                status = health(probe["port"], probe["timeout_s"])
                if status != "SERVING":
                    raise PodFailedError(f"the {kind} probe on port {probe['port']} got {status}")
        if spec.get("healthcheck"):
            done = subprocess.run(spec["healthcheck"], env=env, capture_output=True, timeout=60)
            out = done.stdout.decode().strip()
            if done.returncode != 0 or out != "SERVING":
                raise PodFailedError(f"HEALTHCHECK exited {done.returncode}: {out} {done.stderr!r}")
            seen["healthcheck"] = out
        seen.update(call_the_service(spec))
        if spec.get("tls_ca"):
            seen["plaintext_refused"] = refuses_plaintext(spec["grpc_port"])
        if spec.get("metrics_port") is not None:
            url = f"http://127.0.0.1:{spec['metrics_port']}/metrics"
            with urllib.request.urlopen(url, timeout=30) as reply:
                text = reply.read().decode()
            seen["metrics"] = sum(1 for line in text.splitlines() if line.startswith("framecast_"))
        server.send_signal(signal.SIGTERM)
        try:
            seen["exit"] = server.wait(timeout=spec["grace_s"])
        except subprocess.TimeoutExpired:
            raise PodFailedError(f"SIGTERM did not end the server in {spec['grace_s']} s") from None
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
    return seen


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    try:
        seen = run(spec)
    except (PodFailedError, OSError, subprocess.SubprocessError) as exc:
        print(f"pod_sandbox: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
