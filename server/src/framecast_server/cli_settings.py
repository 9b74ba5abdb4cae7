"""From the server commands' parsed flags to ServerSettings, and the checks made before the
server listens: a user's mistake found here is one line on stderr (``CommandError``), never a
server that starts and then fails.

Heavy modules are imported inside the functions, when a command runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backends.tensorrt.settings import EngineSettings
    from .model import ModelSource
    from .settings import ServerSettings, ServerTLS


class CommandError(Exception):
    """A mistake in what the user asked for, found while running: one line, then exit."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


class SecurityFlagError(ValueError):
    """Security flags that do not go together."""


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """The TensorRT engine settings the flags ask for: the same for serve and build-engine."""
    import dataclasses

    from .backends.tensorrt.settings import EngineSettings

    opt_batch: int | None = getattr(args, "opt_batch", None)
    workspace_mib: int | None = getattr(args, "workspace_mib", None)
    level: int | None = getattr(args, "optimization_level", None)
    if opt_batch is not None and opt_batch > args.max_batch:
        raise CommandError(
            f"--opt-batch ({opt_batch}) must be at most --max-batch ({args.max_batch})", status=2
        )
    settings = EngineSettings(max_batch=args.max_batch, opt_batch=opt_batch)
    if workspace_mib is not None:
        settings = dataclasses.replace(settings, workspace_bytes=workspace_mib * 1024 * 1024)
    if level is not None:
        settings = dataclasses.replace(settings, builder_optimization_level=level)
    return settings


def limit_settings(args: argparse.Namespace) -> dict[str, float | int]:
    """The limit flags given, as ServerSettings fields (the others keep their defaults)."""
    limits: dict[str, float | int] = {}
    if args.memory_budget_mb is not None:
        limits["memory_budget_bytes"] = round(args.memory_budget_mb * 1024 * 1024)
    for name in (
        "max_connections",
        "max_streams_per_connection",
        "max_unary_calls",
        "idle_timeout_s",
        "drain_delay_s",
        "grace_s",
    ):
        if getattr(args, name) is not None:
            limits[name] = getattr(args, name)
    for flag, name in (
        ("max_connection_age", "max_connection_age_s"),
        ("max_connection_age_grace", "max_connection_age_grace_s"),
    ):
        if getattr(args, flag, None) is not None:
            limits[name] = getattr(args, flag)
    return limits


def server_tls(args: argparse.Namespace) -> ServerTLS | None:
    from .settings import ServerTLS

    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    client_ca = getattr(args, "tls_client_ca", None)
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityFlagError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise SecurityFlagError("TLS needs both --tls-cert and --tls-key")
    return ServerTLS(cert=cert, key=key, client_ca=client_ca)


def model_source(args: argparse.Namespace) -> ModelSource:
    """The model flags as a ModelSource; flags that do not apply are refused, not ignored."""
    from .model import ModelSource

    if args.preset is not None and args.onnx is None:
        what = "--weights" if args.weights is not None else "the default model"
        raise CommandError(
            f"--preset applies to --onnx models only; {what} is served with torchvision's "
            "preprocessing" + (" (use --resize for its resize)" if args.weights else ""),
            status=2,
        )
    if args.resize is not None:
        if args.onnx is None and args.weights is None:
            raise CommandError(
                "--resize applies to --weights and --onnx; the default model has its own (232)",
                status=2,
            )
        if args.preset == "caffe":
            raise CommandError(
                "--resize does not apply to --preset caffe, which stretches to 224", status=2
            )
        if args.resize < 224:
            raise CommandError(
                f"--resize must be at least the 224 crop, got {args.resize}", status=2
            )
    require = bool(getattr(args, "require_pretrained", False))
    if args.onnx is not None:
        return ModelSource(kind="onnx", path=args.onnx, preset=args.preset, resize_size=args.resize)
    if args.weights is not None:
        return ModelSource(kind="weights", path=args.weights, resize_size=args.resize)
    return ModelSource(require_pretrained=require)


def settings_from_flags(args: argparse.Namespace) -> ServerSettings:
    from .settings import ServerSettings, default_cache_dir

    model = model_source(args)
    if args.max_queue < args.max_batch:
        raise CommandError(
            f"--max-queue ({args.max_queue}) must hold at least one --max-batch ({args.max_batch})",
            status=2,
        )
    return ServerSettings(
        host=args.host,
        port=args.port,
        model=model,
        backend=args.backend,
        max_batch=args.max_batch,
        max_delay_us=args.max_delay_us,
        max_queue=args.max_queue,
        threads=args.threads,
        cache_dir=args.cache_dir or default_cache_dir(),
        allow_download=not args.offline,
        tls=server_tls(args),
        auth_tokens=getattr(args, "auth_tokens", None),
        auth_health=getattr(args, "auth_health", False),
        insecure=getattr(args, "insecure", False),
        metrics_port=getattr(args, "metrics_port", None),
        health_port=getattr(args, "health_port", None),
        engine=engine_settings(args),
        **limit_settings(args),  # type: ignore[arg-type]
    )


def checked_settings(args: argparse.Namespace) -> ServerSettings:
    """The settings, with the security flags checked: a refusal is one line and status 2.

    An address that is not this host's is said first: no flag would make it work.
    """
    from .process.wiring import check_files
    from .security.auth import TokenFileError
    from .security.tls import TLSFilesError
    from .settings import PlaintextRefusedError

    check_bindable(args.host, args.port)
    try:
        settings = settings_from_flags(args)
        check_files(settings)  # the TLS and token files, read once before anything starts
    except (PlaintextRefusedError, SecurityFlagError, TLSFilesError, TokenFileError) as exc:
        raise CommandError(str(exc), status=2) from None
    check_model_and_backend(settings)
    return settings


def check_bindable(host: str, port: int) -> None:
    """Refuse, in one line, a host or port the server could not listen on."""
    from .process.bind_check import bind_problem

    problem = bind_problem(host, port)
    if problem is not None:
        raise CommandError(problem)


def check_model_and_backend(settings: ServerSettings) -> None:
    """Refuse, before the server listens, a model file or backend that cannot work.

    Otherwise the server binds, logs its progress and only then fails: a user sees several
    lines with the reason last. What is cheap to know is checked here; the rest (a build
    that fails) is still reported by serve as its last line.
    """
    from .model.prepare import check_source

    check_source(settings.model)  # a user's mistake: _run prints it as one line
    if settings.backend == "tensorrt":
        from .backends.tensorrt.availability import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise CommandError(reason)


def model_errors() -> tuple[type[BaseException], ...]:
    """What preparing a model raises for a file that is not a model, or missing weights.

    Also serve's ModelLoadError: the model failed to load after the server started listening.
    """
    from .model.download import WeightsUnavailableError
    from .model.weights import WeightsError
    from .process.app import ModelLoadError

    return (ValueError, OSError, WeightsError, WeightsUnavailableError, ModelLoadError)
