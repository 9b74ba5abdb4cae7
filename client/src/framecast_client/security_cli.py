"""The TLS and token flags every client command takes, mapped one to one onto Client's options."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .security import TLS, TOKEN_ENV, token_from


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --token, --token-file, ..."""
    group = parser.add_argument_group("security (for a server with TLS or tokens)")
    group.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's CAs (implied below)"
    )
    group.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA bundle to trust")
    group.add_argument(
        "--tls-cert", type=Path, metavar="PEM", help="client certificate (mutual TLS)"
    )
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="key of --tls-cert")
    group.add_argument(
        "--tls-server-name", metavar="NAME", help="name to verify the server certificate against"
    )
    tokens = group.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token", metavar="TOKEN", help=f"bearer token (else --token-file, else ${TOKEN_ENV})"
    )
    tokens.add_argument("--token-file", type=Path, metavar="FILE", help="read the token from FILE")
    group.add_argument(
        "--insecure-token",
        action="store_true",
        help="allow sending the token without TLS to another host",
    )


def client_security(args: argparse.Namespace) -> dict[str, Any]:
    """The Client keyword arguments the flags ask for; ValueError for unusable values."""
    wants_tls = args.tls or any(
        value is not None
        for value in (args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    )
    tls = (
        TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
        if wants_tls
        else None
    )
    return {
        "tls": tls,
        "token": token_from(args.token, args.token_file),
        "allow_insecure_token": args.insecure_token,
    }
