"""`python -m framecast_server.healthcheck`: exit 0 when the server on this host says SERVING.

For container health checks (Docker's HEALTHCHECK) where no grpc_health_probe is installed:
it asks the standard grpc.health.v1 service, as Kubernetes' native gRPC probes do, in
plaintext. The images ask the server's health-only port (``serve --health-port 8081``), which
answers in plaintext and without a token whether the main port serves TLS or requires tokens.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, *, service: str = "", timeout: float = 5.0) -> str:
    """The health status name of ``service`` at ``address`` (UNREACHABLE when no answer)."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        return f"UNREACHABLE ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m framecast_server.healthcheck", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--address", default="127.0.0.1", help="host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=50051, help="port (default 50051)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    status = check(f"{args.address}:{args.port}", timeout=args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
