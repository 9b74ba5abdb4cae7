"""The server's TLS credentials, re-read from disk when the files change.

gRPC's dynamic server credentials ask a callback for the certificate configuration at every
new connection's handshake; the callback answers None while the files are unchanged (a few
stat calls) and a fresh configuration once they changed. Connections already open keep the
certificate they were made with, so a rotation drops nobody.

A rotation writes the certificate and the key one after the other: in between, the pair does
not match. A new pair is checked (parsed, key against certificate) before it is handed over;
until it passes, new connections keep getting the previous good pair.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from ..settings import ServerTLS

logger = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


class TLSFilesError(ValueError):
    """The TLS files cannot be used: unreadable, not PEM, or a key that does not fit."""


def _stamp(paths: list[Path]) -> _Stamp:
    stamps = []
    for path in paths:
        st = os.stat(path)
        stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSFilesError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from exc


def _check_pair(cert: bytes, key: bytes, client_ca: bytes | None, tls: ServerTLS) -> None:
    """Parse the PEM data with the standard library's OpenSSL; TLSFilesError if unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # load_cert_chain reads files only: check the very bytes that will be served, not whatever
    # the paths hold a moment later. The directory is private to this process.
    with tempfile.TemporaryDirectory(prefix="framecast-tls-") as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(cert)
        key_file.write_bytes(key)
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, ValueError) as exc:
            raise TLSFilesError(
                f"the TLS certificate {tls.cert} and key {tls.key} cannot be used together: "
                f"{getattr(exc, 'reason', None) or exc}"
            ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise TLSFilesError(
                f"the client CA file {tls.client_ca} holds no usable certificate: "
                f"{getattr(exc, 'reason', None) or exc}"
            ) from None


class CertificateReloader:
    """Serves the certificate configuration; a new one whenever the files change.

    One reloader may feed the credentials of several servers on one port (app.py's
    ACCEPT_LOOPS): each gets its own callback (:meth:`fetcher`), so each sees a change once.
    """

    def __init__(self, tls: ServerTLS) -> None:
        self._tls = tls
        self._paths = [tls.cert, tls.key] + ([tls.client_ca] if tls.client_ca else [])
        self._lock = threading.Lock()  # the callbacks may run on gRPC's threads
        self._stamp: _Stamp | None = None
        self.reloads = 0  # configurations handed over after the first, over every server

    @property
    def requires_client_certificate(self) -> bool:
        """Mutual TLS: clients must present a certificate from the client CA."""
        return self._tls.client_ca is not None

    def load(self) -> grpc.ServerCertificateConfiguration:
        """Read and check the files now; raises TLSFilesError."""
        try:
            stamp = _stamp(self._paths)
        except OSError as exc:
            raise TLSFilesError(f"cannot read a TLS file: {exc}") from exc
        tls = self._tls
        cert, key = _read(tls.cert, "certificate"), _read(tls.key, "key")
        client_ca = _read(tls.client_ca, "client CA") if tls.client_ca else None
        _check_pair(cert, key, client_ca, tls)
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], client_ca)

    def fetcher(self) -> Callable[[], grpc.ServerCertificateConfiguration | None]:
        """gRPC's callback for one server's credentials, from the configuration loaded last."""
        seen = self._stamp

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            """None while the files are unchanged for this server, else the new configuration."""
            nonlocal seen
            with self._lock:
                try:
                    if _stamp(self._paths) == seen:
                        return None
                    config = self.load()
                except (OSError, TLSFilesError) as exc:
                    # Mid-rotation or broken: keep serving the previous pair; say so once per
                    # change (and server).
                    logger.warning(
                        "TLS files changed but cannot be used yet, keeping the old: %s", exc
                    )
                    with contextlib.suppress(OSError):
                        seen = _stamp(self._paths)
                    return None
                seen = self._stamp
                self.reloads += 1
                logger.info("TLS certificate reloaded from %s", self._tls.cert)
                return config

        return fetch


def server_credentials(reloader: CertificateReloader) -> grpc.ServerCredentials:
    """Dynamic server credentials for one server, fed by ``reloader``; raises TLSFilesError."""
    initial = reloader.load()
    return grpc.dynamic_ssl_server_credentials(
        initial,
        reloader.fetcher(),  # type: ignore[arg-type]  # None (unchanged) is allowed; stubs omit it
        require_client_authentication=reloader.requires_client_certificate,
    )
