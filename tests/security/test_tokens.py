"""Bearer tokens: the token file, the interceptor against a real server, the client's refusals."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from framecast_client import Client, UnauthenticatedError
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.security import token_from
from framecast_server.process.background import BackgroundServer
from framecast_server.security.auth import (
    MAX_TOKEN_BYTES,
    TokenFileError,
    TokenStore,
    _RateLimitedLog,
    parse_tokens,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import make_settings, random_frames, running_server

SECRET = "s3cr3t-camera-token"
OTHER = "another-one"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(f"# cameras\ncamera-1:{SECRET}\n\n{OTHER}\n")
    return path


@pytest.fixture(scope="module")
def token_server(cache_dir: Path, token_file: Path) -> Iterator[BackgroundServer]:
    with running_server(cache_dir, auth_tokens=token_file) as server:
        yield server


def test_parse_tokens_names_them_and_rejects_malformed_lines() -> None:
    assert parse_tokens("a:x\ny\n# c\n\nb: z \n") == {"a": b"x", "token2": b"y", "b": b"z"}
    with pytest.raises(TokenFileError, match="line 2"):
        parse_tokens("a:x\n:nameless\n")
    with pytest.raises(TokenFileError, match="twice"):
        parse_tokens("a:x\na:y\n")
    with pytest.raises(TokenFileError, match="no token"):
        parse_tokens("# only a comment\n")


def test_a_token_too_long_for_grpc_metadata_is_refused_when_the_file_is_read(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"camera:short-token\nlong:{'x' * 20_000}\n")
    with pytest.raises(TokenFileError) as refused:
        TokenStore(tokens)
    message = str(refused.value)
    assert "\n" not in message
    assert "line 2" in message
    assert "20000 bytes" in message
    assert "8 KiB" in message


def test_the_longest_token_allowed_is_served(cache_dir: Path, tmp_path: Path) -> None:
    longest = "y" * MAX_TOKEN_BYTES
    tokens = tmp_path / "tokens"
    tokens.write_text(f"long:{longest}\n")
    settings = make_settings(cache_dir, backend="null", auth_tokens=tokens)
    with BackgroundServer(settings) as server, Client(server.address, token=longest) as client:
        assert len(client.classify_preprocessed(random_frames(1))) == 1


def test_token_store_rereads_the_file_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("old:first\n")
    now = [0.0]
    store = TokenStore(path, clock=lambda: now[0])
    assert store.identify("first") == "old"
    path.write_text("new:second-token\n")
    assert store.identify("second-token") is None  # not looked at again within a second
    now[0] = 5.0
    assert store.identify("second-token") == "new"
    assert store.identify("first") is None
    path.write_text("broken:\n")  # a bad edit keeps the tokens in force
    now[0] = 10.0
    assert store.identify("second-token") == "new"


def test_a_known_token_is_served(token_server: BackgroundServer) -> None:
    for token in (SECRET, OTHER):
        with Client(token_server.address, token=token, timeout=30) as client:
            assert len(client.classify_preprocessed(random_frames(1))) == 1


def test_a_missing_token_gets_unauthenticated_with_a_clear_message(
    token_server: BackgroundServer,
) -> None:
    with (
        Client(token_server.address, timeout=30) as client,
        pytest.raises(UnauthenticatedError) as e,
    ):
        client.model_info()
    assert e.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in e.value.message


def test_a_wrong_token_is_refused_and_never_logged(
    token_server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-token-do-not-log-me"
    with (
        caplog.at_level(logging.DEBUG),
        Client(token_server.address, token=wrong, timeout=30) as client,
        pytest.raises(UnauthenticatedError, match="not valid"),
    ):
        client.model_info()
    assert wrong not in caplog.text
    assert SECRET not in caplog.text


def test_health_is_open_while_the_classifier_and_reflection_are_closed(
    token_server: BackgroundServer,
) -> None:
    with grpc.insecure_channel(token_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ClassifierStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as e:
            list(reflection.ServerReflectionInfo(iter([request]), timeout=30))
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_auth_health_protects_health_too(
    start_server: Callable[..., BackgroundServer],
    token_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = start_server(auth_tokens=token_file, auth_health=True)
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "refused /grpc.health.v1.Health/Check: missing token" in caplog.text
        reply = health.Check(
            health_pb2.HealthCheckRequest(),
            timeout=30,
            metadata=(("authorization", f"Bearer {SECRET}"),),
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # A watch without a token learns nothing either (UNIMPLEMENTED: see the next test).
        with pytest.raises(grpc.RpcError) as e:
            next(health.Watch(health_pb2.HealthCheckRequest(), timeout=30))
        assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_a_stream_is_authenticated_once(
    token_server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[str] = []
    identify = TokenStore.identify

    def counting(self: TokenStore, token: str) -> str | None:
        checks.append(token)
        return identify(self, token)

    monkeypatch.setattr(TokenStore, "identify", counting)
    frames = [np.full((224, 224, 3), i, dtype=np.uint8) for i in range(20)]
    with (
        Client(token_server.address, token=SECRET, timeout=30) as client,
        client.stream(frames, mode="lossless") as session,
    ):
        assert sum(r.ok for r in session) == 20
    # One GetModelInfo (the session reads the model first) and one ClassifyStream: 2 checks
    # for 20 frames.
    assert len(checks) == 2


def test_the_client_refuses_a_token_in_plaintext_to_another_host() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        Client("192.0.2.10:50051", token=SECRET)
    # Asked for, or on loopback, it is allowed (no connection is made until a call).
    Client("192.0.2.10:50051", token=SECRET, allow_insecure_token=True).close()
    Client("localhost:50051", token=SECRET).close()
    Client("[::1]:50051", token=SECRET).close()


def test_token_from_flag_file_or_environment(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text("from-file\n")
    env = {"FRAMECAST_TOKEN": "from-env"}
    assert token_from("given", file, env) == "given"
    assert token_from(None, file, env) == "from-file"
    assert token_from(None, None, env) == "from-env"
    assert token_from(None, None, {}) is None
    with pytest.raises(ValueError, match="whitespace"):
        token_from("two words")


def test_refusals_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = _RateLimitedLog(10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            log("refused X: invalid token")
        now[0] = 11.0
        log("refused Y: missing token")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused X: invalid token",
        "refused Y: missing token (4 more refused since the last report)",
    ]


async def test_the_async_client_and_its_streams_send_the_token(
    token_server: BackgroundServer,
) -> None:
    from framecast_client import AsyncClient

    frames = [np.full((224, 224, 3), i, dtype=np.uint8) for i in range(4)]
    async with AsyncClient(token_server.address, token=SECRET, timeout=30) as client:
        assert len(await client.classify_preprocessed(random_frames(1))) == 1
        async with client.stream(frames, mode="lossless") as session:
            assert [r.ok async for r in session] == [True] * 4
    async with AsyncClient(token_server.address, timeout=30) as anonymous:
        with pytest.raises(UnauthenticatedError):
            await anonymous.model_info()


def test_a_balanced_client_with_a_token_is_served_where_health_needs_one_too(
    start_server: Callable[..., BackgroundServer], token_file: Path
) -> None:
    # A client over several replicas watches grpc.health.v1 on each connection (client-side
    # health checking); that watch carries no call metadata, so with --auth-health it must not
    # leave every replica unhealthy and every call UNAVAILABLE.
    servers = [start_server(auth_tokens=token_file, auth_health=True) for _ in range(2)]
    with Client([s.address for s in servers], token=SECRET, timeout=30) as client:
        for _ in range(4):
            assert len(client.classify_preprocessed(random_frames(1))) == 1
