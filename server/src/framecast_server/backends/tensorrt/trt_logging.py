"""The one TensorRT logger of the process.

TensorRT keeps the first ILogger it is given for the life of the process: a logger handed to a
later Builder or Runtime is ignored, and if the first one is garbage-collected TensorRT logs
through a dangling pointer. So every Builder, Runtime and OnnxParser here gets the logger from
``process_logger()``, which makes it once and keeps it referenced until exit.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorrt as trt

trt_log = logging.getLogger("framecast_server.tensorrt")

_lock = threading.Lock()
# (the tensorrt module it was made for, the logger). Keyed by module so that tests swapping in
# another fake tensorrt get a logger of that module; the real process has one module.
_kept: tuple[Any, Any] | None = None


def _logging_level(trt_module: Any, severity: Any) -> int:
    sev = trt_module.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.CRITICAL,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.INFO,
        sev.VERBOSE: logging.DEBUG,
    }
    return levels.get(severity, logging.INFO)


def _make(trt_module: Any) -> Any:
    class _Logger(trt_module.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt_module.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = _logging_level(trt_module, severity)
            # TensorRT's VERBOSE stream is thousands of lines a build; skip the formatting.
            if trt_log.isEnabledFor(level):
                trt_log.log(level, "%s", msg)

    return _Logger()


def process_logger() -> trt.ILogger:
    """The process-wide TensorRT logger (forwarding to ``framecast_server.tensorrt``)."""
    global _kept
    trt_module = importlib.import_module("tensorrt")
    with _lock:
        if _kept is None or _kept[0] is not trt_module:
            _kept = (trt_module, _make(trt_module))
        logger: trt.ILogger = _kept[1]
        return logger
