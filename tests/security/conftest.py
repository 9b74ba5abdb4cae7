"""Certificates for the security tests, made once per test session with `cryptography`."""

from __future__ import annotations

from pathlib import Path

import pytest
from certs import Certificates, make_certificates


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_files(tmp_path: Path, certificates: Certificates) -> tuple[Path, Path]:
    """The server's certificate and key copied where a test may overwrite them (rotation)."""
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(certificates.server.cert.read_bytes())
    key.write_bytes(certificates.server.key.read_bytes())
    return cert, key
