"""mypy strict over our code, with TensorRT checked against the tensorrt-stubs package.

Usage: uv run python scripts/typecheck.py [mypy args...]

tensorrt-stubs never goes into the project environment: its wheel installs .pyi files into a
``tensorrt/`` directory, which Python would import as an empty namespace package that looks like
TensorRT. It is the workspace's ``trt-stubs`` dependency group, which this script installs (from
uv.lock, so pinned and hashed) into a separate environment, .typings/stubs-env, without the
TensorRT bindings the stubs depend on.

The stubs ship without a py.typed marker, and tensorrt_bindings/tensorrt.pyi does not parse:
parameters named ``in`` and a parameter without a default after defaulted ones; its ``bool``
DataType also shadows the builtin. This writes a repaired copy into .typings/ (git-ignored;
mypy_path points there), then runs mypy. The copy is remade whenever the installed stubs change.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent
TYPINGS = ROOT / ".typings"
STUBS_ENV = TYPINGS / "stubs-env"
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


def _uv() -> list[str]:
    # `uv run` names its own binary in $UV; otherwise uv on PATH, else the `uv` Python module.
    found = os.environ.get("UV") or shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def install_stubs() -> Path:
    """Install the locked trt-stubs group into STUBS_ENV; return its site-packages."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["UV_PROJECT_ENVIRONMENT"] = str(STUBS_ENV)
    command = [
        *_uv(),
        "sync",
        "--frozen",
        "--quiet",
        "--only-group",
        "trt-stubs",
        # The stubs' dependency on the CUDA 12 bindings is for users of TensorRT, not for us.
        "--no-install-package",
        "tensorrt-cu12-bindings",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"installing tensorrt-stubs failed:\n{result.stderr}")
    found = sorted(STUBS_ENV.glob("lib/python*/site-packages")) + sorted(
        STUBS_ENV.glob("Lib/site-packages")
    )
    if not found:
        raise SystemExit(f"no site-packages under {STUBS_ENV}")
    return found[0]


def write_stubs() -> None:
    site = install_stubs()
    bindings = site / "tensorrt_bindings"
    package = site / "tensorrt"
    if not (bindings / "tensorrt.pyi").is_file():
        raise SystemExit(f"tensorrt-stubs is not installed in {site}")
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
