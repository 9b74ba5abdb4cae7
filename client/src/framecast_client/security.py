"""How a client proves who it talks to and who it is: TLS settings and a bearer token.

The one place of the SDK that knows about certificates and tokens. ``Client(..., tls=TLS(...),
token=...)`` turns them into channel credentials, channel options and call metadata here.

A token travels as plain ``authorization: Bearer <token>`` metadata on every call, over TLS or
plaintext alike: gRPC's call credentials would be dropped without a word on a plaintext
channel, which is what a loopback deployment uses. Over plaintext to another host a token
could be read by anyone on the path, so the client refuses that unless told otherwise.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "FRAMECAST_TOKEN"
AUTHORIZATION = "authorization"


@dataclass(frozen=True, slots=True, kw_only=True)
class TLS:
    """TLS for a client's channel (files in PEM).

    Attributes:
        ca: CA certificates to verify the server with; None trusts the system's roots.
        cert: This client's certificate, for a server that requires mutual TLS.
        key: The private key of ``cert`` (both or neither).
        server_name: The name to verify the server's certificate against when it differs
            from the address's host (an IP address, a tunnel, a load balancer).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        if self.server_name is not None and not self.server_name.strip():
            raise ValueError("server_name must not be empty")

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files; ValueError names a file that cannot be read."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA bundle"),
            private_key=_read(self.key, "client key"),
            certificate_chain=_read(self.cert, "client certificate"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """The channel options this TLS setting needs (the server name override)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def check_token(token: str) -> str:
    """The token stripped of surrounding whitespace; ValueError if it cannot be sent."""
    token = token.strip()
    if not token:
        raise ValueError("the token is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError("a token must not contain whitespace or control characters")
    return token


def read_token_file(path: Path) -> str:
    """The token in a file (its first line); ValueError if it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
    lines = text.splitlines()
    return check_token(lines[0] if lines else "")


def token_from(
    token: str | None = None,
    token_file: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> str | None:
    """The token to use: given, else read from ``token_file``, else ``$FRAMECAST_TOKEN``."""
    if token is not None:
        return check_token(token)
    if token_file is not None:
        return read_token_file(token_file)
    value = environ.get(TOKEN_ENV)
    return check_token(value) if value else None


def address_host(address: str) -> str:
    """The host part of a gRPC target (``host:port``, ``[v6]:port``, ``dns:///host:port``)."""
    target = address
    if "://" in target:
        target = target.split("://", 1)[1].lstrip("/")
    elif target.startswith("dns:"):
        target = target[4:]
    if target.startswith("["):
        return target[1:].split("]", 1)[0]
    if target.count(":") == 1:
        return target.split(":", 1)[0]
    return target


def is_local(address: str) -> bool:
    """Whether a target stays on this machine: loopback hosts only, or a Unix socket.

    ``ipv4:``/``ipv6:`` lists and comma-separated addresses are local when every entry is.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    for prefix in ("ipv4:", "ipv6:"):
        if address.startswith(prefix):
            address = address[len(prefix) :]
            break
    return all(_is_loopback(address_host(entry.strip())) for entry in address.split(","))


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ChannelSecurity:
    """What a client's channels and calls carry: credentials, options and call metadata."""

    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]


def channel_security(
    address: str, *, tls: TLS | None, token: str | None, allow_insecure_token: bool
) -> ChannelSecurity:
    """Check the combination and build what the channels need; raises ValueError."""
    metadata: tuple[tuple[str, str], ...] = ()
    if token is not None:
        if tls is None and not allow_insecure_token and not is_local(address):
            raise ValueError(
                f"refusing to send a token in plaintext to {address}: anyone on the network "
                "could read it. Use TLS (tls=TLS(...), --tls-ca), or allow_insecure_token=True "
                "(--insecure-token) on a network you trust"
            )
        metadata = ((AUTHORIZATION, f"Bearer {check_token(token)}"),)
    if tls is None:
        return ChannelSecurity(None, (), metadata)
    return ChannelSecurity(tls.credentials(), tuple(tls.channel_options()), metadata)
