"""Argument checks and the parser class shared by every ``framecast`` command.

The type functions turn a flag's text into a value or raise ``argparse.ArgumentTypeError`` with
a sentence a person understands; :class:`CommandParser` prints that sentence as one line (and
exits 2) instead of argparse's usage block, and shows each option's default in ``--help``.
Every command, client or server, builds its flags from these, so ``--port 70000`` or
``--max-batch 0`` reads the same wherever it is given.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, NoReturn, TypeVar

N = TypeVar("N", int, float)

__all__ = [
    "CommandParser",
    "HelpFormatter",
    "existing_file",
    "non_negative_float",
    "non_negative_int",
    "port",
    "positive_float",
    "positive_int",
]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _not_negative(value: N, text: str) -> N:
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (batch sizes, queue lengths, threads, top-k)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (delays, seeds)."""
    return _not_negative(_int(text), text)


def positive_float(text: str) -> float:
    """A finite number above 0 (timeouts, durations, rates)."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0."""
    return _not_negative(_float(text), text)


def port(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free port), got {text!r}")
    return value


def existing_file(text: str) -> Path:
    """A path to a file that exists and can be read."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"not a file: {text!r}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc.strerror}") from None
    return path


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions and epilogs as written and appends each option's default.

    Options whose help already names the default, and those without one (None, False), are
    left as they are.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not text
            or "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return action.help
        if isinstance(default, tuple | list):
            shown = ",".join(str(v) for v in default)
        else:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
        return f"{text} (default {shown.replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, and whose help shows defaults.

    Subcommand parsers made with ``add_subparsers().add_parser`` are of this class too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("formatter_class") in (None, argparse.RawDescriptionHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: MESSAGE (PROG --help shows the options)`` and exit 2."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")
