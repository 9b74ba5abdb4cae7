"""mypy strict over our code, with TensorRT checked against the tensorrt-stubs package.

Usage: uv run python scripts/typecheck.py [mypy args...]

tensorrt-stubs (installed by the dev group) ships .pyi files without a py.typed marker, and its
tensorrt_bindings/tensorrt.pyi does not parse: parameters named ``in`` and a parameter without a
default after defaulted ones; its ``bool`` DataType also shadows the builtin. This writes a
repaired copy into .typings/ (git-ignored; mypy_path points there), then runs mypy. The copy is
remade whenever the installed stubs change.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
from importlib.util import find_spec
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent
TYPINGS = ROOT / ".typings"
_DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*->.*:\s*(?:\.\.\.)?\s*)$")


def _fix_def(line: str) -> str:
    match = _DEF.match(line)
    if match is None:
        return line
    head, params, tail = match.groups()
    fixed: list[str] = []
    seen_default = False
    for param in (p.strip() for p in params.split(", ")) if params else ():
        param = re.sub(r"^in:", "in_:", param)  # `in` is a keyword
        if "=" in param:
            seen_default = True
        elif seen_default and not param.startswith("*"):
            param += " = ..."  # a stub may leave the default unsaid
        fixed.append(param)
    return head + ", ".join(fixed) + tail


def repair(source: str) -> str:
    """The stub text with every def line that does not parse rewritten.

    The module also binds ``bool`` to a DataType, which shadows the builtin in every signature
    that says ``-> bool``: those signatures get ``builtins.bool``.
    """
    lines = ["import builtins", *source.splitlines()]
    for index, line in enumerate(lines):
        if line.lstrip().startswith("def "):
            line = lines[index] = re.sub(r"(->|:) bool\b", r"\1 builtins.bool", line)
            try:
                ast.parse(line.strip())
            except SyntaxError:
                lines[index] = _fix_def(line)
    repaired = "\n".join(lines) + "\n"
    ast.parse(repaired)  # fail here, loudly, if a new kind of breakage appears
    return repaired


def write_stubs() -> None:
    spec = find_spec("tensorrt_bindings")
    if spec is None or spec.origin is None:
        raise SystemExit("tensorrt-stubs is not installed: run `uv sync`")
    bindings = Path(spec.origin).parent
    package = bindings.parent / "tensorrt"
    sources = {
        "tensorrt/__init__.pyi": package / "__init__.pyi",
        "tensorrt_bindings/__init__.pyi": bindings / "__init__.pyi",
        "tensorrt_bindings/tensorrt.pyi": bindings / "tensorrt.pyi",
    }
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources.values()))
    digest.update(Path(__file__).read_bytes())
    stamp = TYPINGS / ".stamp"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return
    for name, path in sources.items():
        target = TYPINGS / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(repair(path.read_text()))
    stamp.write_text(digest.hexdigest())


def main(argv: list[str]) -> int:
    write_stubs()
    stdout, stderr, status = api.run(argv)
    sys.stdout.write(stdout)
    sys.stderr.write(stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
