"""Targets and the service config of framecast_client.balancing, and health-aware balancing."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from framecast_client import Client, ServerError
from framecast_client.balancing import (
    MAX_ATTEMPTS,
    channel_target,
    is_balanced,
    service_config,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


@pytest.mark.parametrize(
    "address",
    ["localhost:50051", "dns:///framecast.example:50051", "ipv4:10.0.0.1:1,10.0.0.2:1"],
)
def test_one_address_or_uri_is_passed_to_grpc_as_it_is(address: str) -> None:
    assert channel_target(address) == address


def test_a_list_of_ipv4_addresses_becomes_one_static_target() -> None:
    assert channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"


def test_a_list_of_ipv6_addresses_keeps_the_brackets() -> None:
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"


def test_names_in_a_list_are_resolved_into_the_family_all_share() -> None:
    assert channel_target(["localhost:7", "127.0.0.2:8"]) == "ipv4:127.0.0.1:7,127.0.0.2:8"


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ([], "empty"),
        ("", "empty"),
        (["127.0.0.1"], "host:port"),
        (["127.0.0.1:0"], "host:port"),
        (["127.0.0.1:http"], "host:port"),
        (["127.0.0.1:1", "[::1]:2"], "one IP family"),
        (["no-such-host.invalid:1"], "cannot resolve"),
    ],
)
def test_bad_addresses_are_refused_with_the_reason(address: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        channel_target(address)


@pytest.mark.parametrize(
    ("target", "balanced"),
    [
        ("localhost:50051", False),
        ("10.0.0.1:50051", False),
        ("unix:/run/framecast.sock", False),
        ("dns:///framecast.example:50051", True),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", True),
        ("ipv6:[::1]:1", True),
    ],
)
def test_round_robin_for_targets_of_many_replicas_only(target: str, balanced: bool) -> None:
    assert is_balanced(target) is balanced
    config = json.loads(service_config(balanced=balanced))
    assert ("loadBalancingConfig" in config) is balanced


def test_the_service_config_asks_for_round_robin_and_bounded_retries_on_unavailable() -> None:
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert {n["method"] for n in method["name"]} == {"Classify", "GetModelInfo"}
    policy = method["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= policy["maxAttempts"] == MAX_ATTEMPTS <= 5  # gRPC caps attempts at 5
    assert config["retryThrottling"]["maxTokens"] > 0


def test_grpc_accepts_the_service_config() -> None:
    # gRPC fails every call of a channel whose service config it cannot parse
    # (INVALID_ARGUMENT, "errors validating service config"); a server without the Classifier
    # service answers a parsed one with UNIMPLEMENTED.
    server = grpc.server(ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client([f"127.0.0.1:{port}"]) as client:
            assert client.address == f"127.0.0.1:{port}"
            assert client.target == f"ipv4:127.0.0.1:{port}"
            with pytest.raises(ServerError) as caught:
                client.model_info()
            assert caught.value.code is grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)


def test_a_replica_that_says_not_serving_gets_no_new_calls() -> None:
    # Client-side health checking (healthCheckConfig): round robin leaves a replica whose
    # grpc.health.v1 Watch says NOT_SERVING, as a draining server does on SIGTERM, and takes it
    # back when it serves again. Each replica answers GetModelInfo with an error naming itself.
    hits = {"a": 0, "b": 0}
    servers, healths, ports = [], {}, []
    for name in hits:

        def answer(request: bytes, context: grpc.ServicerContext, name: str = name) -> bytes:
            hits[name] += 1
            context.abort(grpc.StatusCode.INTERNAL, name)

        server = grpc.server(ThreadPoolExecutor(4))
        healths[name] = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(healths[name], server)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(
                "framecast.v1.Classifier",
                {"GetModelInfo": grpc.unary_unary_rpc_method_handler(answer)},
            )]
        )  # fmt: skip
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)

    def until(reached: dict[str, int], timeout: float = 30) -> None:
        """Call in batches until a batch's hits (before - after) are as ``reached`` says."""
        deadline = time.monotonic() + timeout
        while True:
            before = dict(hits)
            for _ in range(10):
                with pytest.raises(ServerError):
                    client.model_info(refresh=True)
            batch = {n: hits[n] - before[n] for n in hits}
            if all((batch[n] > 0) == (reached[n] > 0) for n in hits):
                return
            assert time.monotonic() < deadline, f"calls per replica: {batch}, want {reached}"

    try:
        with Client([f"127.0.0.1:{port}" for port in ports], timeout=10) as client:
            until({"a": 1, "b": 1})  # both serve: both get calls
            healths["a"].set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            until({"a": 0, "b": 1})
            healths["a"].set("", health_pb2.HealthCheckResponse.SERVING)
            until({"a": 1, "b": 1})
    finally:
        for server in servers:
            server.stop(0)
