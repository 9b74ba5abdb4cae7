"""TLS and mutual TLS against a real server with certificates made in the test run."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from certs import CertificateAuthority, Certificates
from framecast_client import TLS, Client, UnavailableError
from framecast_server.process.background import BackgroundServer
from framecast_server.settings import ServerTLS
from support import random_frames, running_server


@pytest.fixture
def tls_server(cache_dir: Path, tls_files: tuple[Path, Path]) -> Iterator[BackgroundServer]:
    cert, key = tls_files
    with running_server(cache_dir, tls=ServerTLS(cert=cert, key=key)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(cache_dir: Path, certificates: Certificates) -> Iterator[BackgroundServer]:
    tls = ServerTLS(
        cert=certificates.server.cert, key=certificates.server.key, client_ca=certificates.ca.cert
    )
    with running_server(cache_dir, tls=tls, metrics_port=0) as server:
        yield server


def _classifies(client: Client) -> bool:
    results = client.classify_preprocessed(random_frames(2), top_k=1)
    return len(results) == 2


def test_tls_serves_a_client_that_trusts_the_ca(
    tls_server: BackgroundServer, certificates: Certificates
) -> None:
    with Client(tls_server.address, tls=TLS(ca=certificates.ca.cert), timeout=30) as client:
        assert _classifies(client)
        assert client.model_info().backend == "null"


def test_server_name_override_is_what_the_certificate_is_checked_against(
    tls_server: BackgroundServer, certificates: Certificates
) -> None:
    named = TLS(ca=certificates.ca.cert, server_name="framecast.test")
    with Client(tls_server.address, tls=named, timeout=30) as client:
        assert _classifies(client)
    wrong = TLS(ca=certificates.ca.cert, server_name="not-the-server.test")
    with (
        Client(tls_server.address, tls=wrong, timeout=10) as client,
        pytest.raises(UnavailableError),
    ):
        client.model_info()


def test_plaintext_to_a_tls_port_fails_clearly(tls_server: BackgroundServer) -> None:
    with Client(tls_server.address, timeout=10) as client, pytest.raises(UnavailableError) as e:
        client.model_info()
    assert tls_server.address in str(e.value)
    assert "may require TLS" in str(e.value)


def test_a_client_that_does_not_trust_the_ca_is_refused(
    tls_server: BackgroundServer, certificates: Certificates
) -> None:
    with (
        Client(tls_server.address, tls=TLS(ca=certificates.other_ca.cert), timeout=10) as client,
        pytest.raises(UnavailableError),
    ):
        client.model_info()


def test_mutual_tls_serves_a_client_certificate_from_the_ca(
    mtls_server: BackgroundServer, certificates: Certificates
) -> None:
    camera = certificates.camera
    tls = TLS(ca=certificates.ca.cert, cert=camera.cert, key=camera.key)
    with Client(mtls_server.address, tls=tls, timeout=30) as client:
        assert _classifies(client)
        frames = [np.full((224, 224, 3), i, dtype=np.uint8) for i in range(5)]
        with client.stream(frames, mode="lossless") as session:
            assert [r.ok for r in session] == [True] * 5
    # The certificate's subject is the caller's identity (in the metrics, never a secret).
    port = mtls_server.server.wiring.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    assert 'framecast_caller_requests_total{caller="camera-7"}' in text


@pytest.mark.parametrize("which", ["none", "foreign", "expired"])
def test_mutual_tls_refuses_a_missing_foreign_or_expired_certificate(
    which: str, mtls_server: BackgroundServer, certificates: Certificates
) -> None:
    if which == "none":
        tls = TLS(ca=certificates.ca.cert)
    else:
        issued = certificates.foreign_camera if which == "foreign" else certificates.expired_camera
        tls = TLS(ca=certificates.ca.cert, cert=issued.cert, key=issued.key)
    with (
        Client(mtls_server.address, tls=tls, timeout=10) as client,
        pytest.raises(UnavailableError),
    ):
        client.model_info()


def test_a_certificate_rotated_on_disk_is_used_by_new_connections(
    tls_server: BackgroundServer,
    tls_files: tuple[Path, Path],
    certificates: Certificates,
    tmp_path: Path,
) -> None:
    old = Client(tls_server.address, tls=TLS(ca=certificates.ca.cert), timeout=30)
    with old:
        assert _classifies(old)  # a connection made with the old certificate
        # Rotate: a certificate from a new CA, written over the files the server reads.
        new_ca = CertificateAuthority(tmp_path, "rotated")
        issued = new_ca.issue("framecast.test", server=True, file_stem="rotated-server")
        cert, key = tls_files
        cert.write_bytes(issued.cert.read_bytes())
        key.write_bytes(issued.key.read_bytes())
        # The stamp compares mtime and size: make sure it changed even on coarse clocks.
        stat = os.stat(cert)
        os.utime(cert, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        with Client(tls_server.address, tls=TLS(ca=new_ca.cert), timeout=30) as fresh:
            assert _classifies(fresh)  # a new connection gets the new certificate
        assert tls_server.server.wiring.tls_reloader is not None
        assert tls_server.server.wiring.tls_reloader.reloads == 1
        assert _classifies(old)  # the open connection was not dropped


def test_a_key_that_does_not_fit_the_certificate_is_refused_at_start(
    cache_dir: Path, certificates: Certificates
) -> None:
    tls = ServerTLS(cert=certificates.server.cert, key=certificates.camera.key)
    with (
        pytest.raises(ValueError, match="cannot be used together"),
        running_server(cache_dir, tls=tls),
    ):
        pass
