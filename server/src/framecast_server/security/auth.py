"""Authentication: bearer tokens and mutual-TLS identities, checked in one interceptor.

Servicers never look at tokens. The interceptor checks ``authorization: Bearer <token>`` once
per call (a stream is one call: its frames are not checked again), answers UNAUTHENTICATED with
a plain message when it is missing or unknown, and sets :data:`~framecast_server.core.caller.
current_caller` for the call: the token's name, or the client certificate's subject under
mutual TLS (the handshake already verified the certificate). Tokens are compared in constant
time and never logged; the token file is re-read when it changes.

The health service stays open unless ``protect_health`` (so probes work without a token);
every other service, reflection included, needs a token when tokens are configured.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # generic in grpc-stubs only; not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

from ..core.caller import current_caller
from ..service.handlers import rejecting, wrapped

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
HEALTH_WATCH = HEALTH_PREFIX + "Watch"
BEARER = "bearer "
# The token file is looked at (one stat) at most this often; a change is seen within this time.
RELOAD_CHECK_S = 1.0
# Refusals are logged at most once per this many seconds (with a count of those left out): a
# client retrying with a wrong token must not flood the log.
REFUSAL_LOG_INTERVAL_S = 10.0
# gRPC refuses calls whose metadata exceeds its soft limit, 8 KiB by default (past it, some
# calls at random, up to the hard limit of 16 KiB, then all): a longer token could never be
# used. The token's header ("authorization: Bearer ...") must fit with the call's others
# (some 600 bytes: path, authority, timeout, user agent).
METADATA_LIMIT_BYTES = 8 * 1024
MAX_TOKEN_BYTES = METADATA_LIMIT_BYTES - 1024


class TokenFileError(ValueError):
    """The token file cannot be read or has a malformed line (the message names the line)."""


def parse_tokens(text: str, source: str = "token file") -> dict[str, bytes]:
    """Tokens by name from a token file's text: ``token`` or ``name:token`` per line.

    Blank lines and ``#`` comments are skipped; an unnamed token is called ``token<N>`` (its
    position among the tokens), which is what logs and metrics show, never the token.
    """
    tokens: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = f"token{len(tokens) + 1}", line
        name, token = name.strip(), token.strip()
        if not name or not token:
            raise TokenFileError(f"{source} line {number}: expected 'token' or 'name:token'")
        if any(c.isspace() for c in token):
            raise TokenFileError(f"{source} line {number}: a token must not contain spaces")
        if len(token.encode()) > MAX_TOKEN_BYTES:
            raise TokenFileError(
                f"{source} line {number}: the token is {len(token.encode())} bytes long, more "
                f"than {MAX_TOKEN_BYTES}: gRPC refuses calls with over "
                f"{METADATA_LIMIT_BYTES // 1024} KiB of metadata, so no client could use it"
            )
        if name in tokens:
            raise TokenFileError(f"{source} line {number}: the name {name!r} is used twice")
        tokens[name] = token.encode()
    if not tokens:
        raise TokenFileError(f"{source} holds no token")
    return tokens


class TokenStore:
    """The tokens of a file, re-read when the file changes (checked at most once a second)."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._tokens = self._load()  # raises TokenFileError: a server must not start without

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self._path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> dict[str, bytes]:
        try:
            stamp = self._file_stamp()
            text = self._path.read_text()
        except OSError as exc:
            raise TokenFileError(
                f"cannot read the token file {self._path}: {exc.strerror or exc}"
            ) from exc
        tokens = parse_tokens(text, str(self._path))
        self._stamp = stamp
        return tokens

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                if self._file_stamp() == self._stamp:
                    return
                self._tokens = self._load()
                logger.info("token file %s reloaded: %d tokens", self._path, len(self._tokens))
            except (OSError, TokenFileError) as exc:
                # Keep the tokens we have: a half-written or deleted file must not lock
                # every client out (nor let anyone in).
                logger.error("token file changed but cannot be used, keeping the old: %s", exc)
                with contextlib.suppress(OSError):
                    self._stamp = self._file_stamp()

    @property
    def names(self) -> list[str]:
        """The names of the tokens now in force."""
        self._refresh()
        return list(self._tokens)

    def identify(self, token: str) -> str | None:
        """The name of ``token``, or None; compared in constant time against every token."""
        self._refresh()
        candidate = token.encode()
        found: str | None = None
        for name, known in self._tokens.items():
            # No early exit: the time taken does not tell which token, or how much, matched.
            if hmac.compare_digest(candidate, known):
                found = name
        return found


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in call metadata, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text[: len(BEARER)].lower() == BEARER:
                return text[len(BEARER) :].strip()
            return ""  # present but not a bearer token
    return None


def certificate_identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The verified client certificate's common name (or first subject name), if any."""
    auth = context.auth_context()
    for key in ("x509_common_name", "x509_subject_alternative_name", "x509_subject"):
        for value in auth.get(key, ()):
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


class AuthInterceptor(_ServerInterceptor):
    """Checks every call's credentials before any servicer runs; service-agnostic."""

    def __init__(
        self,
        tokens: TokenStore | None,
        *,
        mutual_tls: bool = False,
        protect_health: bool = False,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        """``on_failure(reason)`` is told of each refusal ("missing" or "invalid" token)."""
        self._tokens = tokens
        self._mutual_tls = mutual_tls
        self._protect_health = protect_health
        self._on_failure = on_failure
        self._log_refusal = _RateLimitedLog(REFUSAL_LOG_INTERVAL_S)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # None for a method nobody serves (gRPC then answers UNIMPLEMENTED); the stubs omit it.
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None:
            return handler  # type: ignore[return-value]
        if not self._protect_health and method.startswith(HEALTH_PREFIX):
            return handler
        if self._tokens is not None:
            metadata = handler_call_details.invocation_metadata
            token = bearer_token(metadata)
            name = self._tokens.identify(token) if token else None
            if name is None and not token and method == HEALTH_WATCH:
                # A client over several replicas watches health on each connection (client-side
                # health checking) and gRPC sends no call metadata with that watch. Refused with
                # UNAUTHENTICATED, every replica would look unhealthy to it and every call fail;
                # UNIMPLEMENTED makes gRPC turn that client's health checking off instead. The
                # health state itself stays behind the token (Check, and Watch with a bad token).
                unwatched: grpc.RpcMethodHandler[Any, Any] = rejecting(
                    handler,
                    grpc.StatusCode.UNIMPLEMENTED,
                    "health needs a token on this server (--auth-health): "
                    "client-side health checking is off for this connection",
                )
                return unwatched
            if name is None:
                reason = "missing" if not token else "invalid"
                if self._on_failure is not None:
                    self._on_failure(reason)
                # Never the token itself: it may be a real one with a typo, or someone's guess.
                self._log_refusal(f"refused {method}: {reason} token")
                message = (
                    "this server needs a token: send 'authorization: Bearer <token>' "
                    "(framecast --token or $FRAMECAST_TOKEN; Client(token=...))"
                    if reason == "missing"
                    else "the token is not valid on this server"
                )
                rejected: grpc.RpcMethodHandler[Any, Any] = rejecting(
                    handler, grpc.StatusCode.UNAUTHENTICATED, message
                )
                return rejected
            current_caller.set(name)
            logger.debug("%s called %s", name, method)
        if self._mutual_tls:
            adopting: grpc.RpcMethodHandler[Any, Any] = wrapped(
                handler, before=_adopt_certificate_identity
            )
            return adopting
        return handler


async def _adopt_certificate_identity(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    # The auth context is on the call's context only, not on HandlerCallDetails: read it here.
    identity = certificate_identity(context)
    if identity:
        current_caller.set(identity)
        logger.debug("certificate %s connected", identity)


class _RateLimitedLog:
    """Logs a warning at most once per interval, saying how many were left out meanwhile."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, message: str) -> None:
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more refused since the last report)"
        logger.warning("%s", message)
        self._next = now + self._interval_s
        self._suppressed = 0
